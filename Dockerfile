# syntax=docker/dockerfile:1
#
# leadscore image: build with the Rust toolchain, run on debian:bookworm-slim.
#   docker build -t leadscore:latest .
#   docker run --rm leadscore:latest demo                     # self-contained, no Kafka/Redis needed
#   docker run --rm -p 8080:8080 \
#       -e LEADSCORE__KAFKA__BROKERS=broker:9092 -e LEADSCORE__REDIS__URL=redis://redis:6379/0 \
#       leadscore:latest                                      # run with the baked-in example config
#   docker run --rm leadscore:latest check-config --config /etc/leadscore/leadscore.toml
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

############################ build ############################
FROM rust:1.95-bookworm AS builder

# rdkafka builds the bundled librdkafka with its configure script and links
# OpenSSL (feature "ssl") and zlib from the system; zstd is vendored.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        build-essential pkg-config libssl-dev zlib1g-dev perl python3 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The whole context (see .dockerignore): sources, benches (named in
# Cargo.toml), and schemas/ + config/ (embedded with include_str!).
COPY . .

# The crate registry is cached between builds; target/ is not, so every
# build compiles from scratch and can never reuse stale artifacts.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git/db,sharing=locked \
    cargo build --release --locked \
 && install -D -m 0755 target/release/leadscore /out/leadscore

############################ runtime ############################
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/*

# Fixed numeric ids so Kubernetes runAsNonRoot can verify the user.
RUN groupadd --system --gid 10001 leadscore \
 && useradd --system --uid 10001 --gid leadscore --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin leadscore

COPY --from=builder /out/leadscore /usr/local/bin/leadscore
# config/ (default rules, example config), and the example as the default
# config file; mount your own over /etc/leadscore/leadscore.toml.
COPY config/ /etc/leadscore/
COPY config/leadscore.example.toml /etc/leadscore/leadscore.toml

USER 10001:10001
EXPOSE 8080
# No HEALTHCHECK: the slim image has no curl/wget. Probe /healthz and
# /readyz on port 8080 from outside (Kubernetes probes, Prometheus).
# leadscore handles SIGTERM itself (drain, flush, commit, close): about 42 s
# at worst with the defaults; allow it 60 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["leadscore"]
CMD ["run", "--config", "/etc/leadscore/leadscore.toml"]
