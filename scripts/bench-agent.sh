#!/usr/bin/env bash
# Agent benchmark: a real `flashgate broker` (soft HSM, SQLite) and a `flashgate sim` process with TARGETS
# simulated STM32L4 targets, then `flashgate agent run --once --stats` installing one device per target
# through as many probes. The agent process reports its own wall time, CPU time per device and peak
# memory. Usage: scripts/bench-agent.sh TARGETS SPEED [FIRMWARE_KIB]
set -euo pipefail
cd "$(dirname "$0")/.."
tdir=${CARGO_TARGET_DIR:-target}
case $tdir in /*) ;; *) tdir=$(pwd)/$tdir ;; esac
bin=$tdir/release/flashgate
targets=${1:-64}
speed=${2:-0}
kib=${3:-64}
work=$(mktemp -d)
pids=()
. "$(pwd)/scripts/bench-broker.sh"
trap cleanup EXIT
cd "$work"
start_broker 1 'kind = "soft"
path = "keys.fgks"'
admin=("$bin" admin --broker "https://$addr" --pki pki --name ops --json)
key=$("${admin[@]}" key generate --label bench | sed -n 's/.*"key_id":"\([0-9a-f]*\)".*/\1/p')
head -c $((kib * 1024)) /dev/urandom >fw.bin
sha=$("${admin[@]}" image pack --key-id "$key" --family stm32l4 fw.bin@0x08000000 | sed -n 's/.*"sha256":"\([0-9a-f]*\)".*/\1/p')
"${admin[@]}" batch create bench --product 46201002 --image "$sha" --quota "$targets" --site berlin >/dev/null

port=$((20000 + RANDOM % 20000))
"$bin" sim --targets "$targets" --listen "127.0.0.1:$port" --vendor-ca vendor/vendor-ca.key --speed "$speed" >sim.out 2>&1 &
pids+=($!)
sleep 1
{
  echo "[broker]"
  echo "endpoints = [\"https://$addr\"]"
  echo "[tls]"
  echo 'cert = "pki/stations/berlin-1.pem"'
  echo 'key = "pki/stations/berlin-1.key"'
  echo 'ca = "pki/ca.pem"'
  echo "[state]"
  echo 'dir = "agent-state"'
  echo "[probes]"
  echo "usb_scan = false"
  for i in $(seq 0 $((targets - 1))); do
    echo "[[probes.static]]"
    echo "id = \"fixture-$((i + 1))\""
    echo "target = \"tcp://127.0.0.1:$((port + i))\""
  done
  echo "[run]"
  echo "max_parallel = $targets"
} >agent.toml
"$bin" agent run --config agent.toml --batch bench --once --stats 2>/dev/null | grep -E "^agent stats|^[0-9]+ installed, "
