#!/bin/sh
# One-shot for sites.yml: the development PKI (brokers central, site-berlin, site-austin; stations
# berlin/1..2 and austin/1..2; operator ops), the test vendor CA, the firmware key file and every
# configuration, written into the shared /fg volume (idempotent: does nothing when /fg/pki exists).
# FG_TARGETS static probes per station (tcp://127.0.0.1:7000 onwards, the station's simulator),
# default 12; FG_LEASE_UNITS / FG_LOW_WATER / FG_LEASE_TTL the site brokers' [upstream] lease
# settings (default 12 / 8 / 180s); FG_PARALLEL each station's [run] max_parallel (default 1).
set -eu
[ -d /fg/pki ] && exit 0
cd /fg
flashgate pki init --dir pki --trust-domain factory.test --site berlin --site austin --stations 2 \
  --admin ops --broker central --broker site-berlin --broker site-austin \
  --broker-dns central --broker-dns site-berlin --broker-dns site-austin >/dev/null
flashgate sim vendor-ca --out vendor >/dev/null
head -c 16 /dev/urandom > key.bin
# Common to every broker: listeners, TLS, vendor CA, a SoftHSM2 token of its own.
broker_conf() {
  cat <<CONF
name = "$1"
trust_domain = "factory.test"
[listen]
grpc = "0.0.0.0:7443"
metrics = "0.0.0.0:9464"
[tls]
cert = "pki/brokers/$1.pem"
key = "pki/brokers/$1.key"
ca = "pki/ca.pem"
[vendor]
ca_keys = ["vendor/vendor-ca.pub"]
[hsm]
[[hsm.members]]
kind = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "fg-$1"
pin_env = "FLASHGATE_TOKEN_PIN"
CONF
}
# Central: the PostgreSQL ledger, and the site brokers it grants leases to.
{
  broker_conf central
  cat <<CONF
[ledger]
url = "postgres://flashgate@db:5432/flashgate"
[site_brokers]
site-berlin = "berlin"
site-austin = "austin"
CONF
} > central.toml
# Site brokers: their own SQLite ledger (in a volume: a restart keeps it), leases from central.
for site in berlin austin; do
  {
    broker_conf site-$site
    cat <<CONF
[ledger]
url = "sqlite:///var/lib/flashgate/site/ledger.db"
[upstream]
site = "$site"
endpoints = ["https://central:7443"]
batches = ["${FG_BATCH:-lot-sites}"]
lease_units = ${FG_LEASE_UNITS:-12}
low_water = ${FG_LOW_WATER:-8}
lease_ttl = "${FG_LEASE_TTL:-180s}"
refresh_interval = "1s"
CONF
  } > site-$site.toml
done
# Stations: their site broker first, central second.
for site in berlin austin; do
  for n in 1 2; do
    {
      echo '[broker]'
      echo "endpoints = [\"https://site-$site:7443\", \"https://central:7443\"]"
      echo '[tls]'
      echo "cert = \"pki/stations/$site-$n.pem\""
      echo "key = \"pki/stations/$site-$n.key\""
      echo 'ca = "pki/ca.pem"'
      echo '[state]'
      echo "dir = \"/var/lib/flashgate-agent\""
      echo '[run]'
      echo "max_parallel = ${FG_PARALLEL:-1}"
      echo '[probes]'
      echo 'usb_scan = false'
      i=0
      while [ "$i" -lt "${FG_TARGETS:-12}" ]; do
        echo '[[probes.static]]'
        echo "id = \"fixture-$((i + 1))\""
        echo "target = \"tcp://127.0.0.1:$((7000 + i))\""
        i=$((i + 1))
      done
      echo '[station]'
      echo 'heartbeat_interval = "1s"'
    } > agent-$site-$n.toml
  done
done
