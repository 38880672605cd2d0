#!/usr/bin/env bash
# Restart to ready at any state size: times a start of the service over a
# Redis holding LEADS lead states and their decay timers, beside a start over
# an empty Redis in the same run (the group join and start-up that every
# start pays). For each start prints start -> /readyz 200 and start -> first
# event applied (the group has joined, every shard is taken with one page of
# timers, events flow).
#   LEADS=10000000 PARTITIONS=4 RUNS=3 scripts/restart.sh
# The states are written by `leadscore loadgen --mode prefill-state`: each
# lead's first synthetic event applied by the engine and stored with its
# timer through the store's own writes (not by draining a backlog: 10 M
# distinct leads would take a 25 M-event backlog). Redis needs ~4 GB for 10 M.
# Starts a tansu broker and a Redis on spare loopback ports (bench-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
LEADS=${LEADS:-10000000} RUNS=${RUNS:-3} BATCH=${BATCH:-20000}
source scripts/bench-env.sh

consumed() { curl -s "http://127.0.0.1:$HPORT/metrics" | awk '$1 ~ /^leadscore_events_consumed_total/ { s += $2 } END { printf "%.0f", s }'; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# One start with a new group: the shard records in Redis decide where it
# resumes, as after a deploy. A fresh batch of events waits on the inputs.
start() {
  local label=$1 seed=$2
  $BIN loadgen --mode prefill --brokers "127.0.0.1:$KPORT" --events "$BATCH" --leads "$LEADS" --partitions "$PARTITIONS" --seed "$seed" >/dev/null
  local t0 ready first
  t0=$(now_ms)
  LEADSCORE__KAFKA__GROUP_ID="restart-$seed-$RANDOM" $BIN run >"$WORK/service-$seed.log" 2>&1 &
  local svc=$!
  until curl -sf "http://127.0.0.1:$HPORT/readyz" >/dev/null; do
    kill -0 "$svc" 2>/dev/null || { cat "$WORK/service-$seed.log"; exit 1; }
    sleep 0.02
  done
  ready=$(now_ms)
  until [ "$(consumed)" -gt 0 ]; do sleep 0.02; done
  first=$(now_ms)
  kill -TERM "$svc"; wait "$svc" || true
  echo "$label: start -> /readyz 200 in $(( ready - t0 )) ms; start -> first event applied in $(( first - t0 )) ms"
}

start "empty Redis" 1
redis-cli -p "$RPORT" flushall >/dev/null
$BIN loadgen --mode prefill-state --leads "$LEADS" --partitions "$PARTITIONS"
states=$(redis-cli -p "$RPORT" dbsize)
timers=0
for p in $(seq 0 $(( PARTITIONS - 1 ))); do
  timers=$(( timers + $(redis-cli -p "$RPORT" zcard "leadscore:{p$p}:timers") ))
done
echo "Redis: $states keys, $timers decay timers, used_memory $(redis-cli -p "$RPORT" info memory | awk -F: '/^used_memory_human:/{print $2}' | tr -d '\r')"
for run in $(seq "$RUNS"); do
  start "$LEADS leads in Redis, run $run" $(( run + 1 ))
done
