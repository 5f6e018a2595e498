#!/usr/bin/env bash
# Broker memory under the "item 3" flood of issue 10: starts a real `flashgate broker` (soft HSM, SQLite
# ledger) with STATIONS station certificates, then `flashgate bench attach-flood`, which opens STREAMS
# Attach streams per station and fills them with probe registrations, progress and results of fresh
# 128-byte probe ids for DURATION, reading the broker process's VmRSS/VmHWM from /proc/PID/status.
# Usage: scripts/bench-attach.sh STATIONS STREAMS DURATION
set -euo pipefail
cd "$(dirname "$0")/.."
tdir=${CARGO_TARGET_DIR:-target}
case $tdir in /*) ;; *) tdir=$(pwd)/$tdir ;; esac
bin=$tdir/release/flashgate
stations=${1:-8}
streams=${2:-8}
duration=${3:-30s}
work=$(mktemp -d)
pids=()
. "$(pwd)/scripts/bench-broker.sh"
trap cleanup EXIT
cd "$work"
start_broker "$stations" 'kind = "soft"
path = "keys.fgks"'

"$bin" bench attach-flood --broker "https://$addr" --pki pki --site berlin --broker-pid "$broker_pid" \
  --streams "$streams" --duration "$duration" ${ATTACH_ARGS:-}
