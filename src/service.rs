//! Wiring: builds the store, engine, producer, consumer, workers and HTTP
//! server from [`Settings`](crate::settings::Settings), runs them under one
//! cancellation token, and shuts down in order: the consumer leaves the group
//! (its revocation drains and commits), the workers stop, the producer
//! flushes, the HTTP server closes. A part that fails cancels the rest and
//! the run returns its error.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::decode::{Contract, Decoder, Format};
use crate::engine::{Engine, EngineConfig};
use crate::event::Source;
use crate::http::{self, AppState};
use crate::kafka::consumer::{self, GroupContext};
use crate::kafka::runtime::{Health, Runtime};
use crate::kafka::worker::Worker;
use crate::kafka::{consumer_config, producer_config, sink};
use crate::metrics::Metrics;
use crate::output::Encoder;
use crate::registry::Registry;
use crate::settings::{Backend, Loaded, Settings};
use crate::shard::ShardConfig;
use crate::shard::cache::Limit;
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;

/// Handles to a running service, for callers that watch it (the demo, tests).
#[derive(Clone, Debug)]
pub struct Running {
    /// Metrics.
    pub metrics: Metrics,
    /// Health.
    pub health: Arc<Health>,
    /// The bound HTTP address.
    pub http_addr: std::net::SocketAddr,
}

/// Makes stores: one per user, each with its own connection.
// Made once per process: the larger variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Stores {
    /// Redis (connections are opened lazily).
    Redis(RedisStore),
    /// In memory (shared).
    Memory(Arc<MemoryStore>),
}

impl Stores {
    /// The stores the settings name.
    pub fn from_settings(s: &Settings) -> anyhow::Result<Stores> {
        Ok(match s.state.backend {
            Backend::Memory => Stores::Memory(Arc::new(MemoryStore::default())),
            Backend::Redis => {
                Stores::Redis(RedisStore::connect(&s.redis).with_context(|| store_name(s))?)
            }
        })
    }

    /// A store with a connection of its own.
    pub fn make(&self) -> Arc<dyn Store> {
        match self {
            Stores::Redis(r) => Arc::new(r.sibling()),
            Stores::Memory(m) => Arc::clone(m) as Arc<dyn Store>,
        }
    }
}

/// The state store as errors name it: Redis with its address (the password
/// masked), or the in-memory store.
fn store_name(s: &Settings) -> String {
    match s.state.backend {
        Backend::Memory => "in memory".into(),
        Backend::Redis => {
            let urls: Vec<String> = s
                .redis
                .url
                .split(',')
                .map(crate::settings::mask_url)
                .collect();
            format!("Redis at {}", urls.join(","))
        }
    }
}

/// The engine settings from the service settings.
pub fn engine_config(s: &Settings) -> EngineConfig {
    EngineConfig {
        dedup_window: s.state.dedup_window,
        explain_window: s.state.explain_window,
        history_window: 8,
        retention_ms: (!s.state.retention.is_zero())
            .then_some(s.state.retention.as_millis() as i64),
        expire_below: s.state.expire_below,
        format_version: s.state.format_version,
    }
}

/// The input topics in merge order, with their families.
pub fn inputs(s: &Settings) -> (Arc<[Arc<str>]>, Arc<[Source]>) {
    let inputs = s.kafka.topics.inputs();
    (
        inputs.iter().map(|(_, t)| Arc::<str>::from(*t)).collect(),
        inputs.iter().map(|(s, _)| *s).collect(),
    )
}

/// The decoders of the input topics, in merge order.
pub fn decoders(s: &Settings, engine: &Engine, registry: Option<&Arc<Registry>>) -> Vec<Decoder> {
    let contract = Contract {
        channels: engine.rules().channels.clone().into(),
        future_tolerance_ms: s.event_time.future_tolerance_ms as i64,
    };
    s.kafka
        .topics
        .inputs()
        .iter()
        .map(|(source, _)| {
            Decoder::new(*source, s.kafka.formats.of(*source), contract.clone())
                .with_registry(registry.cloned())
        })
        .collect()
}

/// Whether any topic uses the Schema Registry wire format.
pub fn uses_registry(s: &Settings) -> bool {
    Source::ALL
        .iter()
        .map(|src| s.kafka.formats.of(*src))
        .chain([s.kafka.formats.outputs])
        .any(|f| f == Format::AvroRegistry)
}

/// The output encoder; with `avro-registry` outputs, leadscore's output
/// schemas are registered (or found) under `<topic>-value` first, retrying
/// while the registry cannot be reached, for at most `patience`.
pub fn encoder(
    s: &Settings,
    registry: Option<&Registry>,
    patience: Duration,
) -> anyhow::Result<Encoder> {
    let encoder = Encoder::new(s.kafka.formats.outputs);
    let (Format::AvroRegistry, Some(registry)) = (s.kafka.formats.outputs, registry) else {
        return Ok(encoder);
    };
    let deadline = std::time::Instant::now() + patience;
    let mut policy = crate::writer::Policy::default();
    let mut register = |topic: &str, schema: &str| loop {
        match registry.register(&format!("{topic}-value"), schema) {
            Ok(id) => return Ok(id),
            Err(e) if e.retryable() && std::time::Instant::now() < deadline => {
                warn!(error = %e, topic, "Cannot register the output schema yet; retrying.");
                std::thread::sleep(policy.backoff());
            }
            Err(e) => return Err(anyhow::anyhow!("schema registry: {e}")),
        }
    };
    let change_id = register(
        &s.kafka.topics.segment_changes,
        crate::output::CHANGE_SCHEMA,
    )?;
    let handoff_id = register(&s.kafka.topics.handoffs, crate::output::HANDOFF_SCHEMA)?;
    info!(change_id, handoff_id, "Output schemas registered.");
    Ok(encoder.with_registry_ids(change_id, handoff_id))
}

/// The shard settings.
pub fn shard_config(s: &Settings) -> ShardConfig {
    ShardConfig {
        allowed_lateness_ms: s.event_time.allowed_lateness_ms as i64,
        future_tolerance_ms: s.event_time.future_tolerance_ms as i64,
        cache: Limit {
            leads: s.state.max_leads_in_memory,
            bytes: s.state.max_memory_mb.saturating_mul(1 << 20),
        },
        timer_page: s.redis.timer_page,
        round: 2048,
        dead_letter_max_bytes: s.kafka.dead_letter_max_bytes,
    }
}

/// Checks the store is safe to use and registers these rules' layout;
/// returns the engine knowing every earlier layout.
pub fn prepare_store(s: &Settings, store: &dyn Store, engine: Engine) -> anyhow::Result<Engine> {
    let health = store
        .check()
        .with_context(|| format!("checking the state store, {}", store_name(s)))?;
    for w in &health.warn {
        warn!(warning = %w, "State store.");
    }
    if !health.refuse.is_empty() && !s.redis.allow_eviction {
        anyhow::bail!(
            "refusing to keep state in this store:\n  - {}",
            health.refuse.join("\n  - ")
        );
    }
    // Accepted by setting, still worth a line in every start's log.
    for r in &health.refuse {
        warn!(risk = %r, "State store accepted with redis.allow_eviction = true.");
    }
    store
        .register_layout(engine.layout())
        .context("registering the rules layout")?;
    let known = store.layouts().context("reading earlier rules layouts")?;
    Ok(engine.with_known_layouts(known))
}

/// Pings the store every `every` while the service runs, so that
/// `leadscore_redis_up` and `/readyz` tell the truth while nothing else
/// calls Redis (an idle service reported Redis up through an outage). A
/// failed ping marks the store down; only the ping that follows one puts
/// it back up: a store that answers pings but refuses writes (out of
/// memory) stays down until a write goes through.
async fn watch_store(
    rt: Arc<Runtime>,
    store: Arc<dyn crate::store::Store>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut failed = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let s = Arc::clone(&store);
        let answer = tokio::task::spawn_blocking(move || s.ping()).await;
        match answer {
            Ok(Ok(())) if failed => {
                failed = false;
                rt.set_store_up();
            }
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if !failed {
                    warn!(error = %e, "Redis does not answer a ping.");
                }
                failed = true;
                rt.set_store_down(&e);
            }
            Err(_) => return,
        }
    }
}

/// Runs the service until `cancel` fires (or a part fails). `on_start` is
/// called once the HTTP server is bound and the consumer is starting.
pub async fn run(
    loaded: Loaded,
    cancel: CancellationToken,
    on_start: impl FnOnce(Running),
) -> anyhow::Result<()> {
    let s = Arc::new(loaded.settings);
    let metrics = Metrics::new();
    let health = Arc::new(Health::new());
    let stores = Stores::from_settings(&s)?;
    let setup_store = stores.make();
    let engine = {
        let s2 = Arc::clone(&s);
        let rules = Arc::clone(&loaded.rules);
        let store = Arc::clone(&setup_store);
        tokio::task::spawn_blocking(move || {
            prepare_store(&s2, &*store, Engine::new(rules, engine_config(&s2)))
        })
        .await??
    };
    let engine = Arc::new(engine);
    let (inputs, sources) = inputs(&s);
    let outputs: Vec<String> = s
        .kafka
        .topics
        .outputs()
        .iter()
        .map(|t| (*t).to_owned())
        .collect();
    metrics.init(
        engine.rules(),
        &inputs.iter().map(|t| &**t).collect::<Vec<_>>(),
        &outputs.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let workers = match s.processing.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let rt = Arc::new(Runtime::new(
        Arc::clone(&engine),
        metrics.clone(),
        Arc::clone(&health),
        Arc::clone(&inputs),
        sources,
        s.kafka.batch_max_messages,
        Duration::from_millis(s.event_time.idle_timeout_ms),
        Duration::from_millis(s.redis.flush_interval_ms),
        s.redis.flush_max_dirty,
        Duration::from_millis(s.shutdown.drain_timeout_ms / 2),
        shard_config(&s),
        cancel.clone(),
    ));
    // The start-up check above has just had its answers from the store.
    rt.set_store_up();
    let (producer, sinks) = sink::sinks(
        &producer_config(&s.kafka),
        &s.kafka.topics,
        &metrics,
        workers,
    )
    .context("creating the producer")?;
    let drain_timeout = Duration::from_millis(s.shutdown.drain_timeout_ms);
    let context = GroupContext::new(
        Arc::clone(&rt),
        stores.make(),
        drain_timeout,
        s.kafka.session_timeout(),
    );
    let consumer: Arc<BaseConsumer<GroupContext>> = Arc::new(
        consumer_config(&s.kafka)
            .create_with_context(context)
            .context("creating the consumer")?,
    );
    let registry = if uses_registry(&s) {
        Some(Arc::new(
            Registry::new(&s.schema_registry).context("schema_registry")?,
        ))
    } else {
        None
    };
    let encoder = {
        let (s2, reg) = (Arc::clone(&s), registry.clone());
        tokio::task::spawn_blocking(move || encoder(&s2, reg.as_deref(), Duration::from_secs(30)))
            .await??
    };
    let mut handles = Vec::with_capacity(workers);
    for (id, sink) in sinks.into_iter().enumerate() {
        handles.push(
            Worker::spawn(
                id,
                Arc::clone(&rt),
                decoders(&s, &engine, registry.as_ref()),
                encoder.clone(),
                stores.make(),
                stores.make(),
                sink,
                Arc::clone(&consumer),
            )
            .context("starting a worker")?,
        );
    }
    let controls: Vec<_> = handles
        .iter()
        .map(|h| (h.control.clone(), Arc::clone(&h.wake)))
        .collect();
    consumer.context().attach(&consumer, controls.clone());

    let listener = tokio::net::TcpListener::bind(&s.http.listen)
        .await
        .with_context(|| format!("http.listen: cannot bind {}", s.http.listen))?;
    let http_addr = listener.local_addr()?;
    info!(%http_addr, workers, "HTTP server listening (/metrics, /healthz, /readyz, /v1/leads/{{id}}).");
    if s.http.auth_token.is_none() && !http_addr.ip().is_loopback() {
        warn!(
            %http_addr,
            "The lead API (/v1, erasure included) needs no token: set http.auth_token, or keep the port off every network but a trusted one."
        );
    }
    let app = AppState::new(Arc::clone(&rt), &stores, &s, registry.clone())?;
    let http_task = tokio::spawn(http::serve(listener, app, s.http.clone(), cancel.clone()));
    tokio::spawn(watch_store(
        Arc::clone(&rt),
        setup_store,
        Duration::from_secs(5),
        cancel.clone(),
    ));
    on_start(Running {
        metrics,
        health,
        http_addr,
    });

    let consumer_rt = Arc::clone(&rt);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("leadscore-consumer".into())
        .spawn(move || {
            let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
            let result = consumer::run(&consumer, &consumer_rt, &refs, &controls, drain_timeout);
            if let Err(e) = &result {
                consumer_rt.fail(e.to_string());
            }
            drop(controls);
            drop(consumer);
            let _ = done_tx.send(());
            result
        })?;
    done_rx.await.ok();
    cancel.cancel();
    let result = thread
        .join()
        .map_err(|_| anyhow::anyhow!("consumer thread panicked"))?;
    for h in handles {
        let _ = h.control.send(crate::kafka::worker::Control::Stop);
        h.wake.notify();
        if h.thread.join().is_err() {
            error!("A worker thread panicked.");
        }
    }
    if rt.fatal().is_none() {
        sink::flush(&producer, Duration::from_secs(5));
    }
    match tokio::time::timeout(Duration::from_secs(5), http_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => error!(error = %e, "HTTP server failed."),
        Ok(Err(e)) => error!(error = %e, "HTTP server task failed."),
        Err(_) => error!("HTTP server did not stop in time."),
    }
    result.map_err(Into::into)
}

/// Cancels `cancel` on SIGINT or SIGTERM; on a second one, hands its exit
/// status (130 or 143) to `second` (the binary exits with it at once).
pub fn cancel_on_signals(cancel: CancellationToken, second: impl FnOnce(i32) + Send + 'static) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            // One stream per signal, listening from here on: a second
            // signal that comes before the second wait starts is not lost.
            let (mut int, mut term) = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => (int, term),
                (Err(e), _) | (_, Err(e)) => {
                    error!(error = %e, "Cannot listen for SIGINT and SIGTERM.");
                    return;
                }
            };
            tokio::select! {
                _ = int.recv() => info!("SIGINT received; shutting down."),
                _ = term.recv() => info!("SIGTERM received; shutting down."),
            }
            cancel.cancel();
            // A second signal: the operator will not wait for the drain.
            // Exiting at once loses nothing (offsets never pass what Redis
            // holds); the next start re-reads what was not written.
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            warn!(
                "A second signal: exiting at once without finishing the drain; the next start resumes from the positions in Redis."
            );
            second(code);
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
        }
    });
}
