#!/usr/bin/env bash
# Runs the whole test suite, installing what it needs first:
#   - Debian packages: redis-server, prometheus (for promtool), openssl,
#     python3-venv and the C toolchain pieces librdkafka builds with;
#   - the tansu 0.6.0 Kafka-protocol broker from crates.io (built once, about
#     12 minutes, then reused from ~/.cargo/bin);
#   - a Python virtualenv under .tmp/test-venv with confluent-kafka[avro]
#     (the Schema Registry interop tests) and jsonschema (the contract tests).
# Then it validates the deploy files (scripts/check-deploy.sh: promtool rules
# and rule tests, compose, Grafana, Kubernetes) and runs `cargo test`.
# Each integration test starts its own Redis, broker and registry on free
# loopback ports and stops them when it ends. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf 'test.sh: %s\n' "$*" >&2; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
dpkg -s python3-venv >/dev/null 2>&1 || missing+=(python3-venv)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Installing `prometheus` or `redis-server` must not start their services
  # here: the tests start their own on spare ports.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$own_policy" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d
fi

TANSU="${TANSU_BIN:-$HOME/.cargo/bin/tansu}"
if ! "$TANSU" --version 2>/dev/null | grep -q '0\.6\.0'; then
  log "installing tansu 0.6.0 (one-off, about 12 minutes)"
  cargo install tansu@0.6.0 --locked --features dynostore,libsql
  TANSU="$HOME/.cargo/bin/tansu"
fi
export TANSU_BIN="$TANSU"

VENV=$ROOT/.tmp/test-venv
STAMP=$VENV/.requirements
wanted=$(cat tests/support/requirements.txt scripts/requirements-tests.txt | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$wanted" ]; then
  log "creating $VENV (confluent-kafka[avro], jsonschema)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -r tests/support/requirements.txt -r scripts/requirements-tests.txt
  echo "$wanted" >"$STAMP"
fi
export LEADSCORE_TEST_PYTHON="$VENV/bin/python"

log "validating deploy files (scripts/check-deploy.sh)"
./scripts/check-deploy.sh >"$ROOT/.tmp/check-deploy.log" 2>&1 || {
  cat "$ROOT/.tmp/check-deploy.log"
  log "deploy checks failed"
  exit 1
}
tail -n1 "$ROOT/.tmp/check-deploy.log"

cargo test --locked "$@"
