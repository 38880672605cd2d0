# Sourced by bench.sh, cpu.sh, erase.sh, memory.sh, latency.sh, restart.sh and scale.sh: installs what is missing, builds the
# release binary, starts a tansu broker and a Redis on spare loopback ports
# (stopped on exit) and points the service at them. Sets BIN, KPORT, RPORT,
# HPORT, WORK, EVENTS, LEADS, RUNS, RATE, PARTITIONS; defines median and port.
# BIN=<path> runs another build of leadscore (e.g. an earlier commit's) instead.
EVENTS=${EVENTS:-2000000} LEADS=${LEADS:-200000} RUNS=${RUNS:-5} RATE=${RATE:-20000} PARTITIONS=${PARTITIONS:-4}
TANSU="${TANSU_BIN:-$HOME/.cargo/bin/tansu}"
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
"$TANSU" --version >/dev/null 2>&1 || cargo install tansu@0.6.0 --locked --features dynostore,libsql
cargo build --release --locked -q
BIN=${BIN:-target/release/leadscore}

median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
KPORT=$(port) RPORT=$(port) HPORT=$(port)
WORK=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
# memory:// is fine here (every consumer reads from the start); anything that
# resumes from a committed position needs sqlite:// (DEVELOPERS.md).
STORAGE=${STORAGE:-memory://tansu/}
(cd "$WORK" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$KPORT" --advertised-listener-url "tcp://127.0.0.1:$KPORT" --storage-engine "$STORAGE" >"$WORK/broker.log" 2>&1) &
pids+=($!)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
pids+=($!)
# Wait until both accept connections (tansu may take a few seconds to start).
listening() { python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$1" 2>/dev/null; }
for _ in $(seq 300); do listening "$KPORT" && listening "$RPORT" && break; sleep 0.1; done
listening "$KPORT" || { cat "$WORK/broker.log"; echo "the broker did not start" >&2; exit 1; }

export LEADSCORE__KAFKA__BROKERS="127.0.0.1:$KPORT"
export LEADSCORE__REDIS__URL="redis://127.0.0.1:$RPORT/0"
export LEADSCORE__HTTP__LISTEN="127.0.0.1:$HPORT"
export LEADSCORE__KAFKA__CONSUMER__FETCH_WAIT_MAX_MS=5
export LEADSCORE__LOG__LEVEL=warn

