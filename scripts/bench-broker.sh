# Sourced by the benchmark scripts: in the current (temporary) directory, a development PKI with
# STATIONS berlin stations and admin `ops`, the simulator's test vendor CA, and a `flashgate broker`
# (SQLite ledger) whose one HSM member is MEMBER_TOML; sets `addr` (host:port) and appends the broker's
# pid to `pids` and sets `broker_pid`. Needs `bin` (the flashgate binary). BROKER_WRAP prefixes the broker
# command (e.g. a profiler); BROKER_START_TRIES is how many 0.1 s waits it gets to start (default 100).
# Usage: start_broker STATIONS MEMBER_TOML
start_broker() {
  local stations=$1 member=$2
  bench_pki "$stations"
  run_broker . broker-1 "$member"
}

# The PKI and vendor CA of start_broker alone; further arguments go to `flashgate pki init` (e.g. more
# `--broker NAME`s; broker-1 is always made). Usage: bench_pki STATIONS [PKI_INIT_ARGS…]
bench_pki() {
  local stations=$1
  shift
  export FLASHGATE_KEYSTORE_PASSPHRASE="bench passphrase"
  "$bin" pki init --dir pki --trust-domain factory.test --site berlin --stations "$stations" --admin ops \
    --broker broker-1 "$@" --broker-ip 127.0.0.1 >/dev/null
  "$bin" sim vendor-ca --out vendor >/dev/null
}

# One broker of the PKI bench_pki made: DIR/broker.toml (its keystore and ledger land in DIR, its output
# in DIR/broker.out and DIR/broker.err) under the certificate pki/brokers/NAME.pem, EXTRA_TOML appended
# (e.g. `[upstream]` or `[site_brokers]`); sets `addr`, `broker_pid` and appends to `pids` as above.
# Usage: run_broker DIR NAME MEMBER_TOML [EXTRA_TOML]
run_broker() {
  local dir=$1 name=$2 member=$3 extra=${4:-} pki
  pki=$(pwd)/pki
  mkdir -p "$dir"
  cat >"$dir/broker.toml" <<CONF
name = "$name"
trust_domain = "factory.test"
[listen]
grpc = "127.0.0.1:0"
[tls]
cert = "$pki/brokers/$name.pem"
key = "$pki/brokers/$name.key"
ca = "$pki/ca.pem"
[vendor]
ca_keys = ["$(pwd)/vendor/vendor-ca.pub"]
[ledger]
url = "sqlite://ledger.db"
[hsm]
timeout = "5s"
[[hsm.members]]
$member
$extra
CONF
  # An absolute --config: `flashgate broker` joins a relative one's directory onto its paths twice.
  ${BROKER_WRAP:-} "$bin" broker --config "$(cd "$dir" && pwd)/broker.toml" >"$dir/broker.out" 2>"$dir/broker.err" &
  broker_pid=$!
  pids+=($broker_pid)
  for _ in $(seq 1 "${BROKER_START_TRIES:-100}"); do
    grep -q 'serving gRPC on' "$dir/broker.out" 2>/dev/null && break
    sleep 0.1
  done
  addr=$(sed -n 's/.* serving gRPC on \([^ ]*\).*/\1/p' "$dir/broker.out" | head -1)
  [ -n "$addr" ] || { echo "broker $name did not start:"; cat "$dir/broker.err"; return 1; }
}

# Kills every process in `pids` and removes `work`; install with `trap cleanup EXIT`.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
