#!/usr/bin/env bash
# Builds every Flashgate image with no registry: a Debian bookworm base made with mmdebstrap from the
# Debian mirror this machine is configured with, imported with `docker import`, then the broker, agent
# and simulator images on top of it, each holding the release `flashgate` binary (dynamically linked
# against bookworm's glibc, which the base provides).
#
# Usage: deploy/docker/build.sh [--rebuild-base]
# Images: flashgate-base:bookworm, flashgate-broker:dev, flashgate-agent:dev, flashgate-sim:dev.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

# The mirror and suites from /etc/apt/sources.list.d (deb822) or /etc/apt/sources.list.
mirror=$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^deb \(http[^ ]*\/debian\) bookworm .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -1)
fi
mirror=${mirror:-http://deb.debian.org/debian}

if ! docker image inspect flashgate-base:bookworm >/dev/null 2>&1 || [ "${1:-}" = "--rebuild-base" ]; then
  command -v mmdebstrap >/dev/null || {
    echo "installing mmdebstrap"
    sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd=sudo
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap
  }
  echo "building flashgate-base:bookworm from $mirror"
  # PostgreSQL (the shared ledger), SoftHSM2 (the brokers' tokens), opensc for pkcs11-tool,
  # ca-certificates, procps and iproute2 for health checks and fault injection.
  mmdebstrap --variant=minbase \
    --include=ca-certificates,postgresql,softhsm2,opensc,procps,iproute2,netcat-openbsd \
    --aptopt='Acquire::Retries "3"' \
    bookworm - "$mirror" \
    | docker import --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - flashgate-base:bookworm
fi

echo "building the release binary"
cargo build --release -p flashgate
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp target/release/flashgate "$ctx/flashgate"
strip "$ctx/flashgate" 2>/dev/null || true
for role in broker agent sim; do
  cp "$root/deploy/docker/$role.Dockerfile" "$ctx/Dockerfile"
  docker build -q -t "flashgate-$role:dev" "$ctx" >/dev/null
  echo "built flashgate-$role:dev"
done
