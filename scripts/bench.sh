#!/usr/bin/env bash
# End-to-end throughput beside its ceiling, in the same run: starts a tansu
# broker and a Redis on spare loopback ports, prefills the four input topics
# with EVENTS synthetic events for LEADS leads, then RUNS times:
#   1. a consumer that does nothing but read (`leadscore loadgen --mode read`)
#      reads the whole backlog: the ceiling this broker gives on this machine;
#   2. the service (fresh group, empty Redis) drains the same backlog: consume,
#      decode, score, produce outputs, write Redis, commit
#      (`loadgen --mode drain`).
# Each is reported two ways:
#   - sustained: the rate from the moment 10 % of the events were handled to
#     the moment 90 % were (the target's "sustained" rate);
#   - whole drain: from the first event to the last one handled and written.
#     Its end includes the wait at the end of a finite backlog, where each
#     shard's last events wait for its sparser inputs to go idle
#     (event_time.idle_timeout_ms, 1 s by default).
# Prints each run and the medians with the service/ceiling ratio (sustained).
#   EVENTS=2000000 LEADS=200000 RUNS=5 PARTITIONS=4 scripts/bench.sh
# STORAGE=sqlite://tansu.db puts the broker on tansu's sqlite engine (slower).
# BEFORE_BIN=path/to/leadscore adds, in each run, another build of the
# service (e.g. an earlier commit's) draining the same backlog the same way:
# a before/after comparison in one run. PREFILL_BIN=path/to/leadscore
# prefills with that build's synthetic stream instead (the first version
# panics on the current stream's anonymous visitors, so a comparison with it
# drains its own stream).
# Extra LEADSCORE__… variables in the environment reach the service.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-env.sh

"${PREFILL_BIN:-$BIN}" loadgen --mode prefill --brokers "127.0.0.1:$KPORT" --events "$EVENTS" --leads "$LEADS" --partitions "$PARTITIONS"
# Drains the backlog with build $1 in a fresh group over an empty Redis;
# prints its sustained rate, then its whole-drain rate.
drain_rate() {
  redis-cli -p "$RPORT" flushall >/dev/null
  LEADSCORE__KAFKA__GROUP_ID="$2-$RANDOM" "$1" run >"$WORK/service.log" 2>&1 &
  local svc=$!
  local out
  out=$($BIN loadgen --mode drain --events "$EVENTS" --metrics-url "http://127.0.0.1:$HPORT/metrics")
  echo "$out" >&2
  # Lead states written to Redis over the drain: what the write-behind saved.
  curl -s "http://127.0.0.1:$HPORT/metrics" | awk -v e="$EVENTS" '$1 == "leadscore_redis_flush_leads_sum" {
    printf "lead states written to Redis: %.0f (%.2f per event)\n", $2, $2 / e }' >&2 || true
  kill -TERM "$svc"; wait "$svc" || true
  echo "$out" | grep -oE 'sustained: [0-9]+' | grep -oE '[0-9]+'
  echo "$out" | grep -oE '= [0-9]+ events/s' | grep -oE '[0-9]+'
}
reader=() service=() whole=() before=() before_whole=()
for run in $(seq "$RUNS"); do
  r=$($BIN loadgen --mode read --brokers "127.0.0.1:$KPORT" --events "$EVENTS" | tee >(cat >&2) | grep -oE 'sustained: [0-9]+' | grep -oE '[0-9]+')
  mapfile -t d < <(drain_rate "$BIN" "bench-$run")
  reader+=("$r") service+=("${d[0]}") whole+=("${d[1]}")
  awk -v r="$r" -v s="${d[0]}" -v w="${d[1]}" -v n="$run" 'BEGIN { printf "run %d: service %.0f events/s sustained (whole drain %.0f), do-nothing reader %.0f events/s, ratio %.2f\n", n, s, w, r, s / r }'
  if [ -n "${BEFORE_BIN:-}" ]; then
    mapfile -t b < <(drain_rate "$BEFORE_BIN" "before-$run")
    before+=("${b[0]}") before_whole+=("${b[1]}")
    echo "run $run: $BEFORE_BIN ${b[0]} events/s sustained (whole drain ${b[1]})"
  fi
done
echo "each run: service ${service[*]} events/s sustained (whole drain ${whole[*]}); do-nothing reader ${reader[*]} events/s"
ms=$(median "${service[@]}") mw=$(median "${whole[@]}") mr=$(median "${reader[@]}")
awk -v s="$ms" -v w="$mw" -v r="$mr" -v n="$RUNS" -v e="$EVENTS" -v l="$LEADS" -v p="$PARTITIONS" -v c="$(nproc)" 'BEGIN {
  printf "median of %d runs (%d events, %d leads, %d partitions, %d cores): service %.0f events/s sustained (whole drain %.0f), do-nothing reader %.0f events/s, ratio %.2f\n", n, e, l, p, c, s, w, r, s / r }'
if [ -n "${BEFORE_BIN:-}" ]; then
  echo "each run: $BEFORE_BIN ${before[*]} events/s sustained (whole drain ${before_whole[*]}); median $(median "${before[@]}") sustained, $(median "${before_whole[@]}") whole drain"
fi
