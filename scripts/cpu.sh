#!/usr/bin/env bash
# Where the machine's CPU goes while the service drains a backlog: starts a
# tansu broker and a Redis (bench-env.sh), prefills EVENTS events for LEADS
# leads, lets the service drain them (fresh group, empty Redis) and prints
# the CPU seconds each thread used during the drain, by thread name, for the
# service, the broker and Redis, with the drain's rate. Names: leadscore-worke
# (workers), leadscore-write (Redis writers), rdk:* (librdkafka),
# tokio-rt-worker (tansu's runtime and leadscore's HTTP), redis-server.
#   EVENTS=2000000 LEADS=100000 scripts/cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-env.sh

"$BIN" loadgen --mode prefill --brokers "127.0.0.1:$KPORT" --events "$EVENTS" --leads "$LEADS" --partitions "$PARTITIONS"
# CPU ticks (user + system) of every thread of these processes.
snapshot() { for p in "$@"; do for t in /proc/"$p"/task/*; do printf '%s %s %s\n' "$p/${t##*/}" "$(tr ' ' _ <"$t/comm")" "$(awk '{ print $14 + $15 }' "$t/stat")"; done; done; }
broker=$(pgrep -f "tansu broker --listener-url tcp://127.0.0.1:$KPORT")
redis=$(pgrep -f "redis-server 127.0.0.1:$RPORT")
LEADSCORE__KAFKA__GROUP_ID="cpu-$RANDOM" "$BIN" run >"$WORK/service.log" 2>&1 &
svc=$!
pids+=("$svc")
sleep 1
snapshot "$svc" "$broker" "$redis" >"$WORK/before"
"$BIN" loadgen --mode drain --events "$EVENTS" --metrics-url "http://127.0.0.1:$HPORT/metrics"
snapshot "$svc" "$broker" "$redis" >"$WORK/after"
ticks=$(getconf CLK_TCK)
awk -v hz="$ticks" 'NR == FNR { before[$1] = $3; next } { used[$2] += $3 - before[$1] }
  END { for (n in used) if (used[n] > 0) printf "%8.2f s  %s\n", used[n] / hz, n }' "$WORK/before" "$WORK/after" | sort -rn
