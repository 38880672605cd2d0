//! Wiring: builds the store, engine, processor, Kafka clients and HTTP server
//! from [`Settings`], runs them under one cancellation token, and drains on
//! shutdown. A failed part cancels the rest and the run returns an error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::Mutex;
use rdkafka::consumer::BaseConsumer;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::decode::Decoder;
use crate::engine::Engine;
use crate::http::{self, AppState};
use crate::kafka::consumer::{self, Health, LeadscoreContext};
use crate::kafka::sink::KafkaSink;
use crate::kafka::{consumer_config, producer_config};
use crate::metrics::Metrics;
use crate::output::Encoder;
use crate::pipeline::{LeadMap, Processor, ProcessorConfig};
use crate::settings::{Backend, Loaded};
use crate::store::{MemoryStore, RedisStore, Store};

/// Handles to a running service, for callers that watch it (the demo, tests).
#[derive(Clone, Debug)]
pub struct Running {
    /// Leads in memory.
    pub leads: Arc<LeadMap>,
    /// Metrics.
    pub metrics: Metrics,
    /// Health.
    pub health: Arc<Health>,
    /// The bound HTTP address.
    pub http_addr: std::net::SocketAddr,
}

fn make_store(loaded: &Loaded) -> anyhow::Result<Arc<dyn Store>> {
    let r = &loaded.settings.redis;
    Ok(match loaded.settings.state.backend {
        Backend::Memory => Arc::new(MemoryStore::default()),
        Backend::Redis => Arc::new(
            RedisStore::new(
                &r.url,
                &r.key_prefix,
                Duration::from_millis(r.timeout_ms),
                r.pipeline_batch,
            )
            .context("redis.url")?,
        ),
    })
}

/// Runs the service until `cancel` fires (or a part fails). `on_start` is
/// called once the HTTP server is bound and the consumer is starting.
pub async fn run(
    loaded: Loaded,
    cancel: CancellationToken,
    on_start: impl FnOnce(Running),
) -> anyhow::Result<()> {
    let s = &loaded.settings;
    let metrics = Metrics::new();
    let leads = Arc::new(LeadMap::default());
    let health = Arc::new(Health::default());
    let engine = Engine::new(Arc::clone(&loaded.rules), s.state.dedup_window)
        .with_explain_window(s.state.explain_window);
    let store = make_store(&loaded)?;
    // The HTTP server reads through its own connection.
    let http_store = match s.state.backend {
        Backend::Memory => Arc::clone(&store),
        Backend::Redis => make_store(&loaded)?,
    };
    let decoders: HashMap<String, Decoder> = s
        .kafka
        .topics
        .inputs()
        .iter()
        .map(|(source, topic)| {
            (
                (*topic).to_owned(),
                Decoder::new(*source, s.kafka.formats.of(*source)),
            )
        })
        .collect();
    let sink = KafkaSink::new(
        &producer_config(&s.kafka),
        s.kafka.topics.clone(),
        metrics.clone(),
    )
    .context("creating the producer")?;
    let writer_store = match s.state.backend {
        Backend::Memory => Arc::clone(&store),
        Backend::Redis => make_store(&loaded)?,
    };
    let processor = Processor::new(
        engine.clone(),
        Arc::clone(&leads),
        store,
        Box::new(sink),
        decoders,
        Encoder::new(s.kafka.formats.outputs),
        metrics.clone(),
        ProcessorConfig {
            flush_interval: Duration::from_millis(s.redis.flush_interval_ms),
            flush_max_dirty: s.redis.flush_max_dirty,
            ack_timeout: Duration::from_millis(s.shutdown.drain_timeout_ms / 2),
        },
    )
    .with_writer(writer_store);
    let context = LeadscoreContext::new(
        Arc::new(Mutex::new(processor)),
        metrics.clone(),
        Arc::clone(&health),
        Duration::from_millis(s.shutdown.drain_timeout_ms),
    );
    let consumer: BaseConsumer<LeadscoreContext> = consumer_config(&s.kafka)
        .create_with_context(context)
        .context("creating the consumer")?;

    let listener = tokio::net::TcpListener::bind(&s.http.listen)
        .await
        .with_context(|| format!("http.listen: cannot bind {}", s.http.listen))?;
    let http_addr = listener.local_addr()?;
    info!(%http_addr, "HTTP server listening (/metrics, /healthz, /readyz, /v1/leads/{{id}}).");
    let app = AppState {
        leads: Arc::clone(&leads),
        engine,
        store: http_store,
        metrics: metrics.clone(),
        health: Arc::clone(&health),
    };
    let http_task = tokio::spawn(http::serve(listener, app, cancel.clone()));

    on_start(Running {
        leads,
        metrics,
        health,
        http_addr,
    });

    let topics: Vec<String> = s
        .kafka
        .topics
        .inputs()
        .iter()
        .map(|(_, t)| (*t).to_owned())
        .collect();
    let batch_max = s.kafka.batch_max_messages;
    let consumer_cancel = cancel.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("leadscore-consumer".into())
        .spawn(move || {
            let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
            let result = consumer::run(&consumer, &refs, batch_max, &consumer_cancel);
            drop(consumer);
            let _ = done_tx.send(());
            result
        })?;
    done_rx.await.ok();
    // Whatever ended the consumer ends everything else.
    cancel.cancel();
    let result = thread
        .join()
        .map_err(|_| anyhow::anyhow!("consumer thread panicked"))?;
    match tokio::time::timeout(Duration::from_secs(5), http_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => error!(error = %e, "HTTP server failed."),
        Ok(Err(e)) => error!(error = %e, "HTTP server task failed."),
        Err(_) => error!("HTTP server did not stop in time."),
    }
    result.map_err(Into::into)
}

/// Cancels `cancel` on SIGINT or SIGTERM.
pub fn cancel_on_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        error!(error = %e, "Cannot listen for SIGTERM.");
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => info!("SIGINT received; shutting down."),
                _ = term.recv() => info!("SIGTERM received; shutting down."),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        cancel.cancel();
    });
}
