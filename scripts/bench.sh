#!/usr/bin/env bash
# End-to-end benchmark: starts a tansu broker and a Redis on spare loopback
# ports, prefills the input topics, then runs the service RUNS times from the
# same backlog (fresh group, empty Redis) and reports each drain rate; then a
# fixed-rate latency run. Prints the figures the README quotes.
#   EVENTS=1000000 LEADS=100000 RUNS=3 RATE=20000 scripts/bench.sh
# STORAGE=sqlite://tansu.db puts the broker on tansu's sqlite engine (much slower).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-env.sh

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
