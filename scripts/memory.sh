#!/usr/bin/env bash
# Bounded memory: streams EVENTS synthetic events over LEADS leads (most of
# them distinct: the synthetic stream picks leads at random) through the
# service with `state.max_leads_in_memory = LIMIT`, and samples the service's
# resident memory (VmRSS) every 5 s while it drains. Twice: with the explain
# log and the dedup ring off (0), then on (16 each). For each run prints the
# RSS samples, the leads held at the end and their bytes as the cache counts
# them (state + key + slot overhead) right after the drain and again SETTLE
# (5) seconds later, once every decay timer has fired and the leads held
# carry their segment transitions, the decay timers held in memory, the
# mean stored state size, the lead
# states Redis holds and Redis memory per state; then restarts the service
# over that Redis and times start -> /readyz 200.
# librdkafka prefetches up to queued.max.messages.kbytes per partition (64 MB
# by default, so up to 1 GB over 16 input partitions); the runs set it to
# QUEUE_KB (8 MB) so that resident memory shows leadscore's own.
#   EVENTS=8000000 LEADS=5000000 LIMIT=200000 scripts/memory.sh
# Starts a tansu broker and a Redis on spare loopback ports (bench-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-8000000} LEADS=${LEADS:-5000000} LIMIT=${LIMIT:-200000} QUEUE_KB=${QUEUE_KB:-8192} SETTLE=${SETTLE:-5}
export LEADSCORE__KAFKA__CONSUMER__QUEUED_MAX_MESSAGES_KBYTES=$QUEUE_KB
source scripts/bench-env.sh

metric() { curl -s "http://127.0.0.1:$HPORT/metrics" | awk -v m="$1" '$1 == m { s += $2 } END { printf "%.0f", s }'; }
$BIN loadgen --mode prefill --brokers "127.0.0.1:$KPORT" --events "$EVENTS" --leads "$LEADS" --partitions "$PARTITIONS" >/dev/null
for W in 0 16; do
  redis-cli -p "$RPORT" flushall >/dev/null
  LEADSCORE__STATE__EXPLAIN_WINDOW=$W LEADSCORE__STATE__DEDUP_WINDOW=$W \
    LEADSCORE__STATE__MAX_LEADS_IN_MEMORY=$LIMIT LEADSCORE__KAFKA__GROUP_ID="mem-$W-$RANDOM" \
    $BIN run >"$WORK/service.log" 2>&1 &
  svc=$!
  samples=()
  ( while kill -0 "$svc" 2>/dev/null; do awk '/VmRSS/{printf "%d ", $2 / 1024}' /proc/$svc/status 2>/dev/null; sleep 5; done ) >"$WORK/rss" &
  sampler=$!
  $BIN loadgen --mode drain --events "$EVENTS" --metrics-url "http://127.0.0.1:$HPORT/metrics" | grep -oE '= [0-9]+ events/s'
  held=$(metric leadscore_leads_in_memory) bytes=$(metric leadscore_lead_cache_bytes)
  evicted=$(metric leadscore_lead_cache_evictions_total) timers=$(metric leadscore_decay_timers_pending)
  # Once the inputs are idle each shard's clock follows the wall clock, and
  # the synthetic stream is dated in the past: every decay timer fires, and
  # the leads held move through their segments (a full history each).
  sleep "$SETTLE"
  held_later=$(metric leadscore_leads_in_memory) bytes_later=$(metric leadscore_lead_cache_bytes)
  rss=$(awk '/VmRSS/{print int($2 / 1024)}' /proc/$svc/status)
  kill -TERM "$svc"; wait "$svc" || true
  kill "$sampler" 2>/dev/null || true
  states=$(redis-cli -p "$RPORT" eval "return #redis.call('keys', '*:l:*')" 0)
  mean=$(redis-cli -p "$RPORT" eval "local ks = redis.call('keys', '*:l:*'); local n, s = 0, 0; for i = 1, #ks, 97 do s = s + redis.call('strlen', ks[i]); n = n + 1 end; return math.floor(s / math.max(n, 1))" 0)
  used=$(redis-cli -p "$RPORT" info memory | awk -F: '/^used_memory:/{print $2}' | tr -d '\r')
  echo "explain_window = dedup_window = $W, state.max_leads_in_memory = $LIMIT:"
  echo "  RSS every 5 s (MiB): $(cat "$WORK/rss")-> $rss at the end"
  echo "  held at the end: $held leads, $bytes bytes = $(( bytes / (held > 0 ? held : 1) )) bytes per lead held; $evicted evictions; $timers decay timers in memory"
  echo "  held ${SETTLE} s later, decay timers fired: $held_later leads, $bytes_later bytes = $(( bytes_later / (held_later > 0 ? held_later : 1) )) bytes per lead held"
  echo "  stored state (mean of a sample): $mean bytes; Redis holds $states lead states, used_memory $used bytes = $(( used / (states > 0 ? states : 1) )) bytes per state"
done
# Restart to ready over the states left in Redis (a new group: the shard
# records in Redis decide where it resumes, as after a deploy).
t0=$(date +%s%N)
LEADSCORE__KAFKA__GROUP_ID="restart-$RANDOM" $BIN run >"$WORK/restart.log" 2>&1 &
svc=$!
until curl -sf "http://127.0.0.1:$HPORT/readyz" >/dev/null; do sleep 0.05; done
t1=$(date +%s%N)
echo "restart: start -> /readyz 200 in $(( (t1 - t0) / 1000000 )) ms with $states lead states in Redis"
kill -TERM "$svc"; wait "$svc" || true
