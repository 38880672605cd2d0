#!/usr/bin/env bash
# Runs the whole test suite, installing what it needs first:
#   - Debian packages: redis-server (and the C toolchain pieces librdkafka builds with),
#   - the tansu 0.6.0 Kafka-protocol broker from crates.io (built once, ~12 min, then reused).
# Each integration test starts its own Redis and broker on free loopback ports
# and stops them when it ends. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

TANSU="${TANSU_BIN:-$HOME/.cargo/bin/tansu}"
if ! "$TANSU" --version 2>/dev/null | grep -q '0\.6\.0'; then
  echo "test.sh: installing tansu 0.6.0 (one-off, about 12 minutes)"
  cargo install tansu@0.6.0 --locked --features dynostore,libsql
  TANSU="$HOME/.cargo/bin/tansu"
fi
export TANSU_BIN="$TANSU"

cargo test --locked "$@"
