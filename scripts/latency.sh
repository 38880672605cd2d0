#!/usr/bin/env bash
# Latency, event produced -> segment change consumed, at RATE events/s with
# event time = wall time (`leadscore loadgen --mode latency`), measured after
# a 5 s warm-up for DURATION, RUNS times each:
#   1. against librdkafka's mock cluster in the load generator's process,
#      the service in the same process, state in a real Redis
#      (`--broker mock`): the broker is not the bottleneck at this rate;
#      a. the default settings;
#      b. low-latency settings: event_time.idle_timeout_ms = 0 (caught-up
#         inputs never hold a shard's merge back) and the service's producer
#         linger.ms = 1;
#   2. against a tansu broker (memory://) with the service as its own process:
#      tansu's figures, for comparison (its fetches slow down as topics grow).
# Prints each run and the medians of p50 / p99 / p99.9.
#   RATE=20000 DURATION=20s RUNS=3 scripts/latency.sh
# Starts a tansu broker and a Redis on spare loopback ports (bench-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-20s} RUNS=${RUNS:-3}
source scripts/bench-env.sh
export LEADSCORE__LOG__LEVEL=error
# Runs "$@" RUNS times, printing each result and the medians under label $1.
measure() {
  local label=$1; shift
  local p50=() p99=() p999=()
  for run in $(seq "$RUNS"); do
    [ "${KEEP_REDIS:-}" ] || redis-cli -p "$RPORT" flushall >/dev/null
    local line
    if ! line=$("$@" | grep '^latency:'); then
      echo "  $label, run $run: no segment change came back within the run (the broker or the service fell behind)"
      continue
    fi
    echo "  $label, run $run: ${line#latency: }"
    p50+=("$(grep -oE 'p50 [0-9-]+' <<<"$line" | cut -d' ' -f2)")
    p99+=("$(grep -oE 'p99 [0-9-]+' <<<"$line" | cut -d' ' -f2)")
    p999+=("$(grep -oE 'p99.9 [0-9-]+' <<<"$line" | cut -d' ' -f2)")
  done
  [ ${#p50[@]} -gt 0 ] || { echo "$label: no run gave a result"; return; }
  echo "$label: median of ${#p50[@]} runs at $RATE events/s: p50 $(median "${p50[@]}") ms, p99 $(median "${p99[@]}") ms, p99.9 $(median "${p999[@]}") ms"
}
latency=($BIN loadgen --mode latency --rate "$RATE" --duration "$DURATION" --leads "$LEADS" --partitions "$PARTITIONS")

measure "mock broker, default settings" "${latency[@]}" --broker mock
LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS=0 LEADSCORE__KAFKA__PRODUCER__LINGER_MS=1 \
  measure "mock broker, idle_timeout_ms = 0, producer linger.ms = 1" "${latency[@]}" --broker mock

# tansu: topics created by an empty prefill, the service in its own process,
# started once (a new group would first re-read the earlier runs' events),
# over an empty Redis (the mock runs left shard records whose positions are
# offsets in the mock's topics of the same names).
redis-cli -p "$RPORT" flushall >/dev/null
$BIN loadgen --mode prefill --brokers "127.0.0.1:$KPORT" --events 0 --partitions "$PARTITIONS" >/dev/null
LEADSCORE__KAFKA__GROUP_ID="latency-$RANDOM" $BIN run >"$WORK/service.log" 2>&1 &
svc=$!
pids+=($svc)
until curl -sf "http://127.0.0.1:$HPORT/readyz" >/dev/null; do sleep 0.05; done
KEEP_REDIS=1 measure "tansu broker (memory://), default settings" "${latency[@]}" --broker external --brokers "127.0.0.1:$KPORT"
