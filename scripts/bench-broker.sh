# Sourced by the benchmark scripts: in the current (temporary) directory, a development PKI with
# STATIONS berlin stations and admin `ops`, the simulator's test vendor CA, and a `flashgate broker`
# (SQLite ledger) whose one HSM member is MEMBER_TOML; sets `addr` (host:port) and appends the broker's
# pid to `pids` and sets `broker_pid`. Needs `bin` (the flashgate binary). BROKER_WRAP prefixes the broker
# command (e.g. a profiler); BROKER_START_TRIES is how many 0.1 s waits it gets to start (default 100).
# Usage: start_broker STATIONS MEMBER_TOML
start_broker() {
  local stations=$1 member=$2
  export FLASHGATE_KEYSTORE_PASSPHRASE="bench passphrase"
  "$bin" pki init --dir pki --trust-domain factory.test --site berlin --stations "$stations" --admin ops \
    --broker broker-1 --broker-ip 127.0.0.1 >/dev/null
  "$bin" sim vendor-ca --out vendor >/dev/null
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
  ${BROKER_WRAP:-} "$bin" broker --config broker.toml >broker.out 2>broker.err &
  broker_pid=$!
  pids+=($broker_pid)
  for _ in $(seq 1 "${BROKER_START_TRIES:-100}"); do
    grep -q 'serving gRPC on' broker.out 2>/dev/null && break
    sleep 0.1
  done
  addr=$(sed -n 's/.* serving gRPC on \([^ ]*\).*/\1/p' broker.out | head -1)
  [ -n "$addr" ] || { echo "broker did not start:"; cat broker.err; return 1; }
}

# Kills every process in `pids` and removes `work`; install with `trap cleanup EXIT`.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
