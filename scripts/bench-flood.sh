#!/usr/bin/env bash
# Licence latency with and without a connection flood: starts a real `flashgate broker` (soft HSM, SQLite
# ledger, default admission limits) as bench-licences.sh does, then `flashgate bench flood`: one window of
# licence requests without a flood, then one under IDLE idle TCP connections plus STALLED stalled TLS
# handshakes from 127.0.0.2, kept up (reconnected as the broker sheds or drops them). Prints the figures
# and the broker's own summary of what its admission control dropped.
# Usage: scripts/bench-flood.sh STATIONS RATE DURATION [IDLE] [STALLED] [CONNECT_RATE]
# (CONNECT_RATE: most flood connects per second; absent or 0: every closed socket reconnects at once).
set -euo pipefail
cd "$(dirname "$0")/.."
tdir=${CARGO_TARGET_DIR:-target}
case $tdir in /*) ;; *) tdir=$(pwd)/$tdir ;; esac
bin=$tdir/release/flashgate
stations=${1:-16}
rate=${2:-500}
duration=${3:-20s}
idle=${4:-5000}
stalled=${5:-500}
work=$(mktemp -d)
pids=()
. "$(pwd)/scripts/bench-broker.sh"
trap cleanup EXIT
cd "$work"
start_broker 4 'kind = "soft"
path = "keys.fgks"'

"$bin" bench flood --broker "https://$addr" --pki pki --admin ops --site berlin \
  --vendor-ca-key vendor/vendor-ca.key --stations "$stations" --rate "$rate" --duration "$duration" \
  --warmup 2s --chips "${CHIPS:-15000}" --broker-pid "$broker_pid" \
  --idle "$idle" --stalled "$stalled" --source 127.0.0.2 --connect-rate "${6:-0}"
echo
echo "broker's admission summaries (logged at most every 10 s):"
grep -h "dropped by admission control" broker.out broker.err | cut -c1-400 || echo "(none)"
