#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-env.sh
$BIN loadgen --mode prefill --brokers "127.0.0.1:$KPORT" --events "$EVENTS" --leads "$LEADS" --partitions "$PARTITIONS" >/dev/null
for b in ${ORDER:-target/release/leadscore /tmp/leadscore-old}; do
  redis-cli -p "$RPORT" flushall >/dev/null; redis-cli -p "$RPORT" config resetstat >/dev/null
  LEADSCORE__KAFKA__GROUP_ID="w-$RANDOM" $b run >"$WORK/service.log" 2>&1 &
  svc=$!
  out=$($BIN loadgen --mode drain --events "$EVENTS" --metrics-url "http://127.0.0.1:$HPORT/metrics")
  m=$(curl -s "http://127.0.0.1:$HPORT/metrics")
  rss=$(awk "/VmRSS/{print int(\$2 / 1024)}" /proc/$svc/status); held=$(echo "$m" | grep "^leadscore_leads_in_memory " | awk "{print \$2}")
  kill -TERM $svc; wait $svc || true
  echo "$b: $(echo "$out" | grep -oE 'sustained: [0-9]+') leads written $(echo "$m" | grep '^leadscore_redis_flush_leads_sum' | awk '{print $2}') flushes $(echo "$m" | grep '^leadscore_redis_flush_leads_count' | awk '{print $2}') rss $rss held $held redis cpu $(redis-cli -p "$RPORT" info cpu | grep used_cpu_user: | tr -d '\r')"
done
