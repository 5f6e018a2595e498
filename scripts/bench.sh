#!/usr/bin/env bash
# Runs every benchmark with the release binary and writes BENCHMARKS.md.
# Invoked by `make bench` (which builds the release binary first).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/flashgate
out=BENCHMARKS.md
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

{
  echo "# Benchmarks"
  echo
  echo "Produced by \`make bench\` (scripts/bench.sh) on $(date -u +%Y-%m-%d), $(nproc) cores,"
  echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(rustc --version)."
  echo "Figures come from one run on this machine; rerun \`make bench\` to reproduce them."
  echo "Load average when the run started: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine lowers the MB/s"
  echo "figures; the ratios against raw AES-GCM are measured in the same run and are the meaningful part)."
  echo
  echo "## .sfi pack and parse throughput"
  echo
  echo "Command: \`$bin bench sfi --size 64M --area 1M --runs 5\`. Target: pack and parse ≥ 70% of raw AES-128-GCM."
  echo
  "$bin" bench sfi --size 64M --area 1M --runs 5
  echo
  echo "## Install throughput into a simulated STM32L4 at 115200 baud"
  echo
  echo "Command: \`$bin bench install --family stm32l4 --size 256K --baud 115200 --speed 1\`."
  echo "Real-time link model (11 bits per byte plus one byte time per ACK turnaround) over loopback TCP."
  echo "Target: ≥ 90% of the link's payload capacity (baud / 11 bytes per second)."
  echo
  "$bin" bench install --family stm32l4 --size 256K --baud 115200 --speed 1
} >"$tmp"
mv "$tmp" "$out"
trap - EXIT
cat "$out"
