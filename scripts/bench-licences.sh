#!/usr/bin/env bash
# Licence-service benchmark: starts a real `flashgate broker` (soft HSM or SoftHSM2, SQLite ledger) in a
# temporary directory with a development PKI and a test vendor CA, drives it with
# `flashgate bench licences` (virtual stations over mutual TLS), prints the figures as Markdown and stops
# the broker. Usage: scripts/bench-licences.sh soft|softhsm2 STATIONS DURATION [RATE]
# (RATE: open loop at RATE requests/s in total; absent or 0: closed loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(pwd)/target/release/flashgate
kind=${1:-soft}
stations=${2:-64}
duration=${3:-30s}
rate=${4:-0}
work=$(mktemp -d)
broker_pid=""
cleanup() {
  [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
export FLASHGATE_KEYSTORE_PASSPHRASE="bench passphrase"
"$bin" pki init --dir pki --trust-domain factory.test --site berlin --stations 4 --admin ops \
  --broker broker-1 --broker-ip 127.0.0.1 >/dev/null
"$bin" sim vendor-ca --out vendor >/dev/null

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

cat >broker.toml <<CONF
name = "broker-1"
trust_domain = "factory.test"
[listen]
grpc = "127.0.0.1:0"
[tls]
cert = "pki/brokers/broker-1.pem"
key = "pki/brokers/broker-1.key"
ca = "pki/ca.pem"
[vendor]
ca_keys = ["vendor/vendor-ca.pub"]
[ledger]
url = "sqlite://ledger.db"
[hsm]
timeout = "5s"
[[hsm.members]]
$member
CONF

"$bin" broker --config broker.toml >broker.out 2>broker.err &
broker_pid=$!
for _ in $(seq 1 100); do
  grep -q 'serving gRPC on' broker.out 2>/dev/null && break
  sleep 0.1
done
addr=$(sed -n 's/.* serving gRPC on \([^ ]*\).*/\1/p' broker.out | head -1)
[ -n "$addr" ] || { echo "broker did not start:"; cat broker.err; exit 1; }

"$bin" bench licences --broker "https://$addr" --pki pki --admin ops --site berlin \
  --vendor-ca-key vendor/vendor-ca.key --stations "$stations" --duration "$duration" --rate "$rate" \
  --chips "${CHIPS:-150000}"
