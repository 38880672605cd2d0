#!/usr/bin/env bash
# End-to-end benchmark: starts a tansu broker and a Redis on spare loopback
# ports, prefills the input topics, then runs the service RUNS times from the
# same backlog (fresh group, empty Redis) and reports each drain rate; then a
# fixed-rate latency run. Prints the figures the README quotes.
#   EVENTS=1000000 LEADS=100000 RUNS=3 RATE=20000 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-1000000} LEADS=${LEADS:-100000} RUNS=${RUNS:-3} RATE=${RATE:-20000}
TANSU="${TANSU_BIN:-$HOME/.cargo/bin/tansu}"
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
"$TANSU" --version >/dev/null 2>&1 || cargo install tansu@0.6.0 --locked --features dynostore,libsql
cargo build --release --locked -q
BIN=target/release/leadscore

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
KPORT=$(port) RPORT=$(port) HPORT=$(port)
WORK=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
# memory:// is fine here (every consumer reads from the start); anything that
# resumes from a committed position needs sqlite:// (DEVELOPERS.md).
(cd "$WORK" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$KPORT" --advertised-listener-url "tcp://127.0.0.1:$KPORT" --storage-engine memory://tansu/ >"$WORK/broker.log" 2>&1) &
pids+=($!)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
pids+=($!)
sleep 1

export LEADSCORE__KAFKA__BROKERS="127.0.0.1:$KPORT"
export LEADSCORE__REDIS__URL="redis://127.0.0.1:$RPORT/0"
export LEADSCORE__HTTP__LISTEN="127.0.0.1:$HPORT"
export LEADSCORE__KAFKA__CONSUMER__FETCH_WAIT_MAX_MS=5
export LEADSCORE__LOG__LEVEL=warn

$BIN loadgen --mode prefill --brokers "127.0.0.1:$KPORT" --events "$EVENTS" --leads "$LEADS" --partitions 4
for run in $(seq "$RUNS"); do
  redis-cli -p "$RPORT" flushall >/dev/null
  LEADSCORE__KAFKA__GROUP_ID="bench-$run-$RANDOM" $BIN run >"$WORK/service.log" 2>&1 &
  svc=$!
  $BIN loadgen --mode drain --events "$EVENTS" --metrics-url "http://127.0.0.1:$HPORT/metrics"
  kill -TERM "$svc"; wait "$svc" || true
done

redis-cli -p "$RPORT" flushall >/dev/null
LEADSCORE__KAFKA__GROUP_ID="latency-$RANDOM" $BIN run >"$WORK/service.log" 2>&1 &
svc=$!
pids+=($svc)
# Let it consume the backlog first, then measure at a fixed rate.
$BIN loadgen --mode drain --events "$EVENTS" --metrics-url "http://127.0.0.1:$HPORT/metrics" >/dev/null
$BIN loadgen --mode latency --brokers "127.0.0.1:$KPORT" --rate "$RATE" --duration 30s --leads "$LEADS"
kill -TERM "$svc"; wait "$svc" || true
