#!/usr/bin/env bash
# Site-broker benchmark (issue 14): licences per second at a site broker against a central broker in the
# same run, and the replication lag under that load. Starts two real `flashgate broker` processes in a
# temporary directory (soft keystore + SQLite ledger each, one development PKI): central (broker-1, whose
# [site_brokers] maps site-berlin to berlin) and a site broker of berlin (site-berlin, [upstream] pointing
# at central). Imports one firmware key into both HSMs under the same key id, packs an image and opens a
# batch at central, waits until the site has mirrored the batch and holds a lease (its `admin batch
# status` shows quota > 0), then runs the same closed-loop `flashgate bench licences --batch` against
# central and then against the site broker. During the site run it samples once a second, in parallel,
# central's `admin sites --json` and the site's `admin batch status --json`; after the load it keeps
# sampling until central holds every licence the site issued. Prints Markdown.
# Usage: scripts/bench-sites.sh [STATIONS [DURATION]]   (defaults 64, 25s)
# Environment: CHIPS (chips pre-generated per run, default 150000), LEASE_UNITS / LOW_WATER (the site's
# [upstream] lease_units / low_water, default 200000 / 50000), CATCH_UP_LIMIT (seconds to wait after the
# load for central to hold everything, default 120). Exits non-zero when a run failed (more than 1% of
# requests refused, a sampled licence wrong) or the lag did not catch up, after printing what it saw.
# With OFFLINE=1 a third run follows: central stopped (SIGSTOP) until the site has marked it unreachable,
# so the site licenses without asking central (no ClaimDevice) from its lease; then central is continued
# (SIGCONT) and the time until it holds every licence again is reported.
set -euo pipefail
cd "$(dirname "$0")/.."
tdir=${CARGO_TARGET_DIR:-target}
case $tdir in /*) ;; *) tdir=$(pwd)/$tdir ;; esac
bin=$tdir/release/flashgate
stations=${1:-64}
duration=${2:-25s}
chips=${CHIPS:-150000}
lease_units=${LEASE_UNITS:-200000}
low_water=${LOW_WATER:-50000}
catch_up_limit=${CATCH_UP_LIMIT:-120}
# The batch's quota: both runs together issue well under this.
quota=10000000
# How long the site gets to mirror the batch and take its first lease (seconds).
mirror_limit=60
work=$(mktemp -d)
pids=()
. "$(pwd)/scripts/bench-broker.sh"
central_pid=""
# A stopped central would not die of cleanup's SIGTERM.
trap '[ -z "$central_pid" ] || kill -CONT "$central_pid" 2>/dev/null; cleanup' EXIT
cd "$work"

now_ms() { date +%s%3N; }
adm() { local a=$1; shift; "$bin" admin --pki pki --name ops --broker "https://$a" "$@"; }
# utime + stime of PID in seconds.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat"; }

bench_pki 4 --broker site-berlin
member='kind = "soft"
path = "keys.fgks"'
run_broker central broker-1 "$member" '[site_brokers]
site-berlin = "berlin"'
central=$addr
central_pid=$broker_pid

# Key, image and batch at central.
head -c 16 /dev/urandom >key.bin
key_id=$(adm "$central" --json key import --label fw --key key.bin | jq -er .key_id)
head -c 1024 /dev/urandom >fw.bin
image=$(adm "$central" --json image pack --key-id "$key_id" --family stm32l4 fw.bin@0x08000000 | jq -er .sha256)
batch=bench-sites-$(date +%s)
state=$(adm "$central" --json batch create "$batch" --product 46201002 --image "$image" --quota "$quota" \
  --site berlin | jq -er .state)
[ "$state" = open ] || adm "$central" batch open "$batch" >/dev/null

run_broker site site-berlin "$member" "[upstream]
site = \"berlin\"
endpoints = [\"https://$central\"]
batches = [\"$batch\"]
lease_units = $lease_units
low_water = $low_water
lease_ttl = \"1h\"
refresh_interval = \"1s\""
site=$addr
site_pid=$broker_pid
adm "$site" key import --label fw --key key.bin --key-id "$key_id" >/dev/null

site_quota=0
for _ in $(seq 1 $((mirror_limit * 2))); do
  site_quota=$(adm "$site" --json batch status "$batch" 2>/dev/null | jq -r '.quota // 0' || echo 0)
  [ "${site_quota:-0}" -gt 0 ] && break
  sleep 0.5
done
if [ "${site_quota:-0}" -le 0 ]; then
  echo "the site broker did not mirror batch $batch within ${mirror_limit}s; its log:"
  tail -20 site/broker.out site/broker.err
  exit 1
fi

# One closed-loop run of `bench licences` on the batch. Usage: load ADDR PID NAME (output in NAME.txt,
# NAME.err; exit status in NAME.rc).
load() {
  local rc=0
  "$bin" bench licences --broker "https://$1" --pki pki --admin ops --site berlin \
    --vendor-ca-key vendor/vendor-ca.key --stations "$stations" --duration "$duration" \
    --chips "$chips" --broker-pid "$2" --batch "$batch" >"$3.txt" 2>"$3.err" || rc=$?
  echo "$rc" >"$3.rc"
}

# One lag sample: ms_at_midpoint acked_seq site_head_seq lag_records lag_ms last_record_at_ms
# central_licences site_issued (central's figures for site berlin; the site's issued count of the batch).
# A sample either call failed on is left out (and counted).
sample() {
  local t0 t1 p1 p2 c s
  t0=$(now_ms)
  adm "$central" --json sites >sites.json 2>>sample.err &
  p1=$!
  adm "$site" --json batch status "$batch" >status.json 2>>sample.err &
  p2=$!
  if ! wait "$p1" || ! wait "$p2"; then
    wait "$p2" 2>/dev/null || true
    echo x >>sample.failed
    return 0
  fi
  t1=$(now_ms)
  c=$(jq -r '.[] | select(.site == "berlin") | "\(.acked_seq) \(.site_head_seq) \(.lag_records) \(.lag_ms) \(.last_record_at_ms // 0) \(.licences)"' sites.json)
  s=$(jq -r .issued status.json)
  [ -n "$c" ] && [ -n "$s" ] || { echo x >>sample.failed; return 0; }
  echo "$(((t0 + t1) / 2)) $c $s"
}

load "$central" "$central_pid" central
central_rc=$(cat central.rc)

# The site run, sampled once a second from the moment its stations start until they stop.
load "$site" "$site_pid" site &
load_job=$!
until grep -q '^running ' site.err 2>/dev/null || ! kill -0 "$load_job" 2>/dev/null; do sleep 0.1; done
central_cpu0=$(cpu_s "$central_pid")
load_t0=$(now_ms)
: >lag.txt
while kill -0 "$load_job" 2>/dev/null; do
  next=$(($(now_ms) + 1000))
  sample >>lag.txt
  left=$((next - $(now_ms)))
  [ "$left" -gt 0 ] && sleep "$(printf '0.%03d' "$left")"
done
wait "$load_job" || true
load_t1=$(now_ms)
central_cpu1=$(cpu_s "$central_pid")
site_rc=$(cat site.rc)

# After the load: until central holds every licence the site issued and sees no records missing.
: >catchup.txt
caught_up=""
for _ in $(seq 1 "$catch_up_limit"); do
  next=$(($(now_ms) + 1000))
  sample >>catchup.txt
  last=$(tail -1 catchup.txt)
  if [ -n "$last" ] && awk '{ exit !($4 == 0 && $7 == $8) }' <<<"$last"; then
    caught_up=$(awk -v t="$load_t1" '{ printf "%.1f", ($1 - t) / 1000 }' <<<"$last")
    break
  fi
  left=$((next - $(now_ms)))
  [ "$left" -gt 0 ] && sleep "$(printf '0.%03d' "$left")"
done

# Optional: the site with central stopped, then the catch-up once central runs again.
offline_caught_up=""
if [ -n "${OFFLINE:-}" ]; then
  kill -STOP "$central_pid"
  t_stop=$(now_ms)
  for _ in $(seq 1 $((mirror_limit * 2))); do
    grep -q 'central broker unreachable' site/broker.out site/broker.err 2>/dev/null && break
    sleep 0.5
  done
  offline_wait=$(awk -v a="$t_stop" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
  load "$site" "$site_pid" offline
  kill -CONT "$central_pid"
  t_cont=$(now_ms)
  : >offline-catchup.txt
  for _ in $(seq 1 "$catch_up_limit"); do
    next=$(($(now_ms) + 1000))
    sample >>offline-catchup.txt
    last=$(tail -1 offline-catchup.txt)
    if [ -n "$last" ] && awk '{ exit !($4 == 0 && $7 == $8) }' <<<"$last"; then
      offline_caught_up=$(awk -v t="$t_cont" '{ printf "%.1f", ($1 - t) / 1000 }' <<<"$last")
      break
    fi
    left=$((next - $(now_ms)))
    [ "$left" -gt 0 ] && sleep "$(printf '0.%03d' "$left")"
  done
fi

# Figures.
rate() { awk '/^licences\/s/ { print $2 }' "$1.txt"; }
field() { sed -n "s/^$2 *//p" "$1.txt" | head -1; }
central_rate=$(rate central)
site_rate=$(rate site)
# p50 and max of column COL of FILE (nearest rank).
stats() {
  awk -v c="$2" '{ print $c }' "$1" | sort -n | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "- -"; exit }
    r = int(NR * 0.5 + 0.999999); if (r < 1) r = 1; print v[r], v[NR] }'
}
# Derived columns: 9 = licences the site issued that central does not hold yet, 10 = age of the newest
# site record central holds (s): how far back in time central's copy of the site ledger ends while the
# site issues continuously.
# The age counts from the load's start at most: before it the idle site wrote nothing central could lack.
awk -v t0="$load_t0" '{ at = $6 > t0 ? $6 : t0; printf "%s %.2f\n", $0 " " ($8 - $7), ($1 - at) / 1000 }' lag.txt >lag2.txt

echo "| broker | licences/s | errors | latency | broker CPU/licence |"
echo "|---|---:|---|---|---|"
runs="central site"
[ -z "${OFFLINE:-}" ] || runs="central site offline"
for r in $runs; do
  echo "| $r | $(rate $r) | $(field $r errors) | $(field $r latency | sed 's/ (successful requests)//') | $(field $r CPU\\/licence) |"
done
echo
if [ -n "$central_rate" ] && [ -n "$site_rate" ]; then
  awk -v s="$site_rate" -v c="$central_rate" 'BEGIN { printf "site / central: %.2f (%.1f / %.1f licences/s, same run)\n", s / c, s, c }'
fi
awk -v a="$central_cpu0" -v b="$central_cpu1" -v t0="$load_t0" -v t1="$load_t1" 'BEGIN {
  w = (t1 - t0) / 1000; printf "central CPU during the site run: %.2f s over %.1f s of load (%.0f%% of one core): ClaimDevice per new device, Replicate\n", b - a, w, 100 * (b - a) / w }'
echo
n=$(wc -l <lag2.txt)
read -r behind_p50 behind_max <<<"$(stats lag2.txt 9)"
read -r age_p50 age_max <<<"$(stats lag2.txt 10)"
read -r rec_p50 rec_max <<<"$(stats lag2.txt 4)"
read -r ms_p50 ms_max <<<"$(stats lag2.txt 5)"
failed=$( [ -e sample.failed ] && wc -l <sample.failed || echo 0)
echo "Replication lag during the site run ($n samples, one a second, each central's \`admin sites --json\` and the site's"
echo "\`admin batch status --json\` started together, timed at the midpoint of the two calls; $failed samples failed):"
echo
echo "| quantity | p50 | max |"
echo "|---|---:|---:|"
echo "| licences issued at the site not yet held at central (site \`batch status\` issued − central \`admin sites\` licences) | $behind_p50 | $behind_max |"
echo "| age of the newest site record central holds (sample time − \`last_record_at_ms\`, at most since the load began), s | $age_p50 | $age_max |"
echo "| central's \`lag_records\` (site head as last reported − held) | $rec_p50 | $rec_max |"
echo "| central's \`lag_ms\` / 1000, s | $(awk -v v="$ms_p50" 'BEGIN { printf "%.2f", v / 1000 }') | $(awk -v v="$ms_max" 'BEGIN { printf "%.2f", v / 1000 }') |"
echo
final=$(tail -1 catchup.txt)
if [ -n "$caught_up" ]; then
  read -r _ acked head lagr lagms _ lic issued <<<"$final"
  echo "After the load: caught up ${caught_up} s after the site's stations stopped: central holds seq $acked of the site's head $head (lag_records $lagr, lag_ms $lagms), $lic licences of the $issued the site issued."
else
  echo "After the load: NOT caught up within ${catch_up_limit} s; last sample (ms acked head lag_records lag_ms last_record_at licences issued): $final"
fi
if [ -n "${OFFLINE:-}" ]; then
  echo
  echo "offline: the site with central stopped (SIGSTOP; the site marked it unreachable ${offline_wait} s later), licensing from its lease without ClaimDevice: $(rate offline) licences/s, $(awk -v o="$(rate offline)" -v c="$central_rate" 'BEGIN { printf "%.2f", o / c }') of central's."
  if [ -n "$offline_caught_up" ]; then
    read -r _ acked head lagr lagms _ lic issued <<<"$(tail -1 offline-catchup.txt)"
    echo "After central was continued (SIGCONT): caught up ${offline_caught_up} s later (held seq $acked of head $head, $lic licences of the $issued the site issued)."
    echo "Licences held at central, one sample a second from SIGCONT: $(awk '{ printf "%s%s", (NR > 1 ? ", " : ""), $7 }' offline-catchup.txt)."
  else
    echo "After central was continued (SIGCONT): NOT caught up within ${catch_up_limit} s; last sample: $(tail -1 offline-catchup.txt)"
  fi
fi
echo
echo "Each run (\`flashgate bench licences --batch $batch\`, $stations stations, $duration):"
for r in $runs; do
  echo
  echo "$r (exit status $(cat $r.rc)):"
  echo '```'
  cat "$r.txt"
  grep -E '^(warning|note|Error|error)' "$r.err" || true
  echo '```'
done
warnings=$(grep -hE ' (WARN|ERROR) ' site/broker.out site/broker.err central/broker.out central/broker.err 2>/dev/null | cut -c1-300 | sort | uniq -c | sort -rn | head -10 || true)
if [ -n "$warnings" ]; then
  echo
  echo "Broker warnings and errors (count, first 300 characters; expected: the site's \"cannot mirror batch\" before"
  echo "its HSM holds the key, which is imported once it runs, and central's note that no station of berlin has"
  echo "connected when the batch is created):"
  echo '```'
  echo "$warnings"
  echo '```'
fi
echo
echo "At central after the run (\`flashgate admin sites\`):"
echo '```'
adm "$central" sites
echo '```'
[ "$central_rc" = 0 ] && [ "$site_rc" = 0 ] && [ -n "$caught_up" ] &&
  { [ -z "${OFFLINE:-}" ] || { [ "$(cat offline.rc)" = 0 ] && [ -n "$offline_caught_up" ]; }; }
