#!/bin/sh
# One-shot: the development PKI, the test vendor CA, the firmware key file and every configuration,
# written into the shared /fg volume (idempotent: does nothing when /fg/pki exists). FG_TARGETS
# static probes per station (tcp://127.0.0.1:7000 onwards, the station's simulator), default 4.
set -eu
[ -d /fg/pki ] && exit 0
cd /fg
flashgate pki init --dir pki --trust-domain factory.test --site berlin --site austin --stations 2 \
  --admin ops --broker broker-1 --broker broker-2 --broker-dns broker-1 --broker-dns broker-2 >/dev/null
flashgate sim vendor-ca --out vendor >/dev/null
head -c 16 /dev/urandom > key.bin
for b in 1 2; do
  cat > broker-$b.toml <<CONF
name = "broker-$b"
trust_domain = "factory.test"
[listen]
grpc = "0.0.0.0:7443"
metrics = "0.0.0.0:9464"
[tls]
cert = "pki/brokers/broker-$b.pem"
key = "pki/brokers/broker-$b.key"
ca = "pki/ca.pem"
[vendor]
ca_keys = ["vendor/vendor-ca.pub"]
[ledger]
url = "postgres://flashgate@db:5432/flashgate"
[hsm]
[[hsm.members]]
kind = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "fg-broker-$b"
pin_env = "FLASHGATE_TOKEN_PIN"
CONF
done
for site in berlin austin; do
  for n in 1 2; do
    {
      echo '[broker]'
      echo 'endpoints = ["https://broker-1:7443", "https://broker-2:7443"]'
      echo '[tls]'
      echo "cert = \"pki/stations/$site-$n.pem\""
      echo "key = \"pki/stations/$site-$n.key\""
      echo 'ca = "pki/ca.pem"'
      echo '[state]'
      echo "dir = \"/var/lib/flashgate-agent\""
      echo '[probes]'
      echo 'usb_scan = false'
      i=0
      while [ "$i" -lt "${FG_TARGETS:-4}" ]; do
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
