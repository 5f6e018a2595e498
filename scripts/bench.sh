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
  echo
  echo "## Licence service"
  echo
  echo "A real \`flashgate broker\` process on loopback (mutual TLS 1.3, SQLite ledger with group commit,"
  echo "\`synchronous=FULL\`) driven by \`flashgate bench licences\`: virtual stations, each its own mTLS connection,"
  echo "a fresh simulated chip (vendor-signed certificate) per request, every licence checked and a sample"
  echo "opened and used to decrypt the image. Client and broker share this machine's $(nproc) cores."
  echo "A licence costs one ECDSA-P256 verify, one P-256 key generation and one ECDH; the same-run OpenSSL"
  echo "reference for those operations:"
  echo
  echo '```'
  echo "$ openssl speed -seconds 3 ecdhp256 ecdsap256"
  openssl speed -seconds 3 ecdhp256 ecdsap256 2>/dev/null | grep -E '^ *(sign|op|256 bits|[0-9]+ bits)' | tail -4
  echo '```'
  echo
  echo "### Soft HSM + SQLite, 64 stations, closed loop"
  echo
  echo "Command: \`scripts/bench-licences.sh soft 64 30s\` (each station sends its next request when the previous"
  echo "one is answered: this measures capacity; latency is then queueing, mean ≈ stations / throughput)."
  echo "Target: ≥ 2,000 licences/s."
  echo
  echo '```'
  scripts/bench-licences.sh soft 64 30s 2>/dev/null
  echo '```'
  echo
  echo "### Soft HSM + SQLite, 64 stations, open loop at 2,000 licences/s"
  echo
  echo "Command: \`scripts/bench-licences.sh soft 64 30s 2000\` (the 64 stations together send 2,000 requests/s on a"
  echo "fixed schedule; latency from each request's scheduled time). Target: p99 ≤ 20 ms at 2,000/s."
  echo
  echo '```'
  scripts/bench-licences.sh soft 64 30s 2000 2>/dev/null
  echo '```'
  echo
  echo "### SoftHSM2 (PKCS#11, 4 sessions) + SQLite, 64 stations, closed loop"
  echo
  echo "Command: \`scripts/bench-licences.sh softhsm2 64 30s\`. Target: ≥ 1,000 licences/s."
  echo
  echo '```'
  scripts/bench-licences.sh softhsm2 64 30s 2>/dev/null
  echo '```'
  echo
  echo "## Agent"
  echo
  echo "The agent's pipeline streams areas through the same AN3155 host client as \`bench install\` above,"
  echo "so its link efficiency at 115200 baud is the figure measured there."
  echo
  echo "### 64 simulated targets on one agent, no link delays"
  echo
  echo "Command: \`scripts/bench-agent.sh 64 0 64\`: a broker process, a \`flashgate sim --targets 64 --speed 0\` process"
  echo "and one \`flashgate agent run --once --stats\` installing a 64 KiB image on all 64 targets at once through"
  echo "64 probes; the agent reports its own wall time, CPU time per device and peak resident memory."
  echo
  echo '```'
  scripts/bench-agent.sh 64 0 64
  echo '```'
} >"$tmp"
mv "$tmp" "$out"
trap - EXIT
cat "$out"
