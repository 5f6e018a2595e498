#!/usr/bin/env bash
# Where the broker's CPU time per licence goes: the broker of bench-licences.sh (soft HSM, SQLite) runs
# under `valgrind --tool=callgrind` (instrumentation switched on only once its setup is done), loaded by
# `flashgate bench licences` with STATIONS closed-loop stations for DURATION; then callgrind_annotate
# prints the inclusive and exclusive costs (instructions) of the hottest functions.
# Usage: scripts/profile-licences.sh [STATIONS] [DURATION] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
tdir=${CARGO_TARGET_DIR:-target}
case $tdir in /*) ;; *) tdir=$(pwd)/$tdir ;; esac
bin=$tdir/release/flashgate
stations=${1:-8}
duration=${2:-20s}
out=${3:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
pids=()
. "$(pwd)/scripts/bench-broker.sh"
trap cleanup EXIT
cd "$work"
BROKER_WRAP="valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$out/callgrind.out" \
  BROKER_START_TRIES=3000 start_broker 4 'kind = "soft"
path = "keys.fgks"'
callgrind_control -i on "$broker_pid" >/dev/null
"$bin" bench licences --broker "https://$addr" --pki pki --admin ops --site berlin \
  --vendor-ca-key vendor/vendor-ca.key --stations "$stations" --duration "$duration" --warmup 1s \
  --chips 20000 --broker-pid "$broker_pid" --verify 0
kill -INT "$broker_pid"
wait "$broker_pid" 2>/dev/null || true
echo "callgrind output: $out/callgrind.out"
callgrind_annotate --inclusive=yes "$out/callgrind.out" 2>/dev/null | head -60
