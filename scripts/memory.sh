#!/usr/bin/env bash
# Memory per lead held: starts a tansu broker and a Redis on spare loopback
# ports, prefills the input topics, drains them with the service once with
# the explain log on (16) and once off (0), and prints the growth of the
# service's resident memory per lead in memory. The growth includes
# librdkafka's fetch buffers and allocator slack, so it overstates the state.
#   EVENTS=1000000 LEADS=100000 scripts/memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-env.sh

$BIN loadgen --mode prefill --brokers "127.0.0.1:$KPORT" --events "$EVENTS" --leads "$LEADS" --partitions 4
for W in 16 0; do
redis-cli -p "$RPORT" flushall >/dev/null
LEADSCORE__STATE__EXPLAIN_WINDOW=$W LEADSCORE__KAFKA__GROUP_ID="mem-$RANDOM" $BIN run >"$WORK/service.log" 2>&1 &
svc=$!
sleep 0.3; a=$(awk '/VmRSS/{print $2}' /proc/$svc/status)
$BIN loadgen --mode drain --events "$EVENTS" --metrics-url "http://127.0.0.1:$HPORT/metrics" >/dev/null
sleep 2
b=$(awk '/VmRSS/{print $2}' /proc/$svc/status)
n=$(curl -s "http://127.0.0.1:$HPORT/metrics" | awk '/^leadscore_leads_in_memory/{print $2}')
echo "explain_window=$W: RSS $a kB -> $b kB with $n leads = $(( (b-a)*1024/n )) bytes per lead"
kill -TERM "$svc"; wait "$svc" || true
done
