#!/usr/bin/env bash
# Licence-service benchmark: starts a real `flashgate broker` (soft HSM or SoftHSM2, SQLite ledger) in a
# temporary directory with a development PKI and a test vendor CA, drives it with
# `flashgate bench licences` (virtual stations over mutual TLS), prints the figures as Markdown and stops
# the broker. Usage: scripts/bench-licences.sh soft|softhsm2 STATIONS DURATION [RATE]
# (RATE: open loop at RATE requests/s in total; absent or 0: closed loop). The broker's own CPU time per
# licence (/proc/PID/stat of the broker process) is always reported; with CRYPTO_FLOOR=1 it is compared
# with the same-run `openssl speed` floor.
set -euo pipefail
cd "$(dirname "$0")/.."
tdir=${CARGO_TARGET_DIR:-target}
case $tdir in /*) ;; *) tdir=$(pwd)/$tdir ;; esac
bin=$tdir/release/flashgate
kind=${1:-soft}
stations=${2:-64}
duration=${3:-30s}
rate=${4:-0}
work=$(mktemp -d)
pids=()
. "$(pwd)/scripts/bench-broker.sh"
trap cleanup EXIT
cd "$work"

member='kind = "soft"
path = "keys.fgks"'
if [ "$kind" = softhsm2 ]; then
  module=$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so 2>/dev/null | head -1)
  mkdir tokens
  printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" >softhsm2.conf
  export SOFTHSM2_CONF=$work/softhsm2.conf
  softhsm2-util --init-token --free --label fg-bench --so-pin 5678 --pin 1234 >/dev/null
  export FLASHGATE_BENCH_PIN=1234
  member="kind = \"pkcs11\"
module = \"$module\"
token_label = \"fg-bench\"
pin_env = \"FLASHGATE_BENCH_PIN\"
sessions = 4"
fi

start_broker 4 "$member"

"$bin" bench licences --broker "https://$addr" --pki pki --admin ops --site berlin \
  --vendor-ca-key vendor/vendor-ca.key --stations "$stations" --duration "$duration" --rate "$rate" \
  --chips "${CHIPS:-150000}" --broker-pid "$broker_pid" ${CRYPTO_FLOOR:+--crypto-floor}
