#!/usr/bin/env bash
# How long DELETE /v1/leads/{id} takes: starts a tansu broker and a Redis
# (bench-env.sh), creates the topics with PARTITIONS partitions, starts the
# service and times REQUESTS sequential erasure requests (each goes to every
# CRM partition). BEFORE_BIN=path/to/leadscore times another build the same
# way, alternating, RUNS times.
#   PARTITIONS=32 REQUESTS=50 RUNS=3 BEFORE_BIN=… scripts/erase.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-env.sh
REQUESTS=${REQUESTS:-50}
"$BIN" loadgen --mode prefill --brokers "127.0.0.1:$KPORT" --events 10 --leads 10 --partitions "$PARTITIONS" >/dev/null
# Prints the mean milliseconds per request of build $1.
per_request() {
  LEADSCORE__KAFKA__GROUP_ID="erase-$RANDOM" "$1" run >"$WORK/service.log" 2>&1 &
  local svc=$!
  for _ in $(seq 150); do curl -sf "localhost:$HPORT/readyz" >/dev/null && break; sleep 0.2; done
  curl -sf -X DELETE "localhost:$HPORT/v1/leads/warm-up" >/dev/null
  local start end
  start=$(date +%s%N)
  for i in $(seq "$REQUESTS"); do curl -sf -o /dev/null -X DELETE "localhost:$HPORT/v1/leads/lead-$i"; done
  end=$(date +%s%N)
  kill -TERM "$svc"; wait "$svc" || true
  awk -v ns=$((end - start)) -v n="$REQUESTS" 'BEGIN { printf "%.1f\n", ns / n / 1e6 }'
}
this=() before=()
for run in $(seq "$RUNS"); do
  this+=("$(per_request "$BIN")")
  echo "run $run: $BIN ${this[-1]} ms per DELETE"
  if [ -n "${BEFORE_BIN:-}" ]; then
    before+=("$(per_request "$BEFORE_BIN")")
    echo "run $run: $BEFORE_BIN ${before[-1]} ms per DELETE"
  fi
done
echo "median of $RUNS runs ($REQUESTS sequential requests, $PARTITIONS partitions): $BIN $(median "${this[@]}") ms per DELETE"
[ -z "${BEFORE_BIN:-}" ] || echo "median: $BEFORE_BIN $(median "${before[@]}") ms per DELETE"
