//! What the consumer thread, the workers and the HTTP surface share: settings
//! they all read, liveness and readiness, the first fatal error, the shards'
//! gauges and their lead caches (for lookups).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::engine::Engine;
use crate::event::{Millis, Source};
use crate::metrics::Metrics;
use crate::shard::ShardConfig;
use crate::shard::cache::LeadCache;
use crate::store::ShardId;

/// Liveness and readiness.
#[derive(Debug, Default)]
pub struct Health {
    /// The consumer loop is running.
    pub running: AtomicBool,
    /// The last store call succeeded.
    pub store_up: AtomicBool,
    /// Why the last store call failed (empty: none has, or the store
    /// answered since).
    pub store_error: parking_lot::Mutex<String>,
    /// A fatal error occurred: the process is stopping.
    pub failed: AtomicBool,
    /// Workers holding inputs back because the Schema Registry does not
    /// answer (0: it answers, or is not used).
    pub registry_down: AtomicUsize,
    /// Wall ms of the consumer loop's last turn.
    pub heartbeat_ms: AtomicI64,
}

impl Health {
    /// A health record of a service starting: not running, and the store
    /// not known to answer until the service's start-up check has had its
    /// answers (the registry is assumed up until a worker finds it down).
    pub fn new() -> Self {
        Health {
            ..Health::default()
        }
    }

    /// Ready to consume: running, the store and registry answer, nothing failed.
    pub fn ready(&self) -> bool {
        self.not_ready().is_empty()
    }

    /// Every reason it is not ready (none: ready). Redis's is the last
    /// store error's own words: full, a rotated password and a refused
    /// command are not "does not answer".
    pub fn not_ready(&self) -> Vec<String> {
        let store = || {
            let error = self.store_error.lock();
            match error.strip_prefix("redis: ").unwrap_or(&error) {
                "" => "Redis does not answer".to_owned(),
                why => format!("Redis is unavailable: {why}"),
            }
        };
        let mut why = Vec::new();
        if self.failed.load(Ordering::SeqCst) {
            why.push("stopping on an error".to_owned());
        }
        if !self.running.load(Ordering::SeqCst) {
            why.push("the consumer is not running (starting, or stopping)".to_owned());
        }
        if !self.store_up.load(Ordering::SeqCst) {
            why.push(store());
        }
        if self.registry_down.load(Ordering::SeqCst) > 0 {
            why.push(
                "the Schema Registry does not answer, fails or refuses (the log has its answer)"
                    .to_owned(),
            );
        }
        why
    }

    /// Alive: the loop turned within `max_silence`.
    pub fn alive(&self, max_silence: Duration) -> bool {
        let last = self.heartbeat_ms.load(Ordering::SeqCst);
        last == 0 || crate::event::wall_clock_ms() - last <= max_silence.as_millis() as i64
    }
}

/// One shard's gauges, as its worker last reported them.
#[derive(Debug, Clone, Default)]
pub struct ShardGauges {
    /// Leads in memory.
    pub leads: usize,
    /// Bytes of lead state in memory.
    pub bytes: usize,
    /// Leads changed since their last write.
    pub dirty: usize,
    /// Timers in memory.
    pub timers: usize,
    /// Messages waiting behind the watermark.
    pub buffered: usize,
    /// The merge's watermark.
    pub watermark: Millis,
    /// The shard's clock.
    pub clock: Millis,
    /// Leads per segment.
    pub population: HashMap<String, i64>,
}

/// Shared by the consumer thread, the workers and the HTTP surface.
pub struct Runtime {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Metrics.
    pub metrics: Metrics,
    /// Health.
    pub health: Arc<Health>,
    /// Input topics, in merge order.
    pub inputs: Arc<[Arc<str>]>,
    /// Their source families.
    pub sources: Arc<[Source]>,
    /// Messages read per queue per turn.
    pub batch_max: usize,
    /// Quiet time after which a caught-up input stops holding the others back.
    pub idle_timeout: Duration,
    /// Write at least this often.
    pub flush_interval: Duration,
    /// Write as soon as this many leads are dirty.
    pub flush_max_dirty: usize,
    /// Longest wait for output acknowledgements.
    pub ack_timeout: Duration,
    /// Shard settings.
    pub shard_config: ShardConfig,
    /// Gauges per shard owned.
    pub board: Mutex<HashMap<ShardId, ShardGauges>>,
    /// Lead caches per shard owned (HTTP lookups).
    pub caches: RwLock<HashMap<ShardId, Arc<Mutex<LeadCache>>>>,
    /// Messages the broker has that were not fetched yet, per (input index,
    /// partition), from librdkafka statistics.
    pub lag: Mutex<HashMap<(usize, ShardId), i64>>,
    partitions: AtomicI32,
    /// Shards dropped because another member took them in the store, and since when.
    fenced: Mutex<HashMap<ShardId, Instant>>,
    fatal: Mutex<Option<String>>,
    /// Shards given up without their last changes written (a drain that ran
    /// out of time): their next owner resumes from their last durable write.
    unwritten: AtomicUsize,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// A runtime cancelled by (and cancelling) `cancel`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Arc<Engine>,
        metrics: Metrics,
        health: Arc<Health>,
        inputs: Arc<[Arc<str>]>,
        sources: Arc<[Source]>,
        batch_max: usize,
        idle_timeout: Duration,
        flush_interval: Duration,
        flush_max_dirty: usize,
        ack_timeout: Duration,
        shard_config: ShardConfig,
        cancel: CancellationToken,
    ) -> Self {
        Runtime {
            engine,
            metrics,
            health,
            inputs,
            sources,
            batch_max,
            idle_timeout,
            flush_interval,
            flush_max_dirty,
            ack_timeout,
            shard_config,
            board: Mutex::new(HashMap::new()),
            caches: RwLock::new(HashMap::new()),
            lag: Mutex::new(HashMap::new()),
            partitions: AtomicI32::new(0),
            fenced: Mutex::new(HashMap::new()),
            fatal: Mutex::new(None),
            unwritten: AtomicUsize::new(0),
            cancel,
        }
    }

    /// Counts shards given up without their last changes written.
    pub fn gave_up_unwritten(&self, shards: usize) {
        self.unwritten.fetch_add(shards, Ordering::SeqCst);
    }

    /// Shards given up without their last changes written, so far.
    pub fn unwritten(&self) -> usize {
        self.unwritten.load(Ordering::SeqCst)
    }

    /// Records the first fatal error and stops everything.
    pub fn fail(&self, message: impl Into<String>) {
        let message = message.into();
        let mut f = self.fatal.lock();
        if f.is_none() {
            error!(error = %message, "Stopping on a fatal error.");
            *f = Some(message);
        }
        self.health.failed.store(true, Ordering::SeqCst);
        self.metrics.ready.set(0);
        self.cancel.cancel();
    }

    /// Whether the service is stopping (a signal, or a fatal error).
    pub fn stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Whether a fatal error occurred.
    pub fn failed(&self) -> bool {
        self.health.failed.load(Ordering::SeqCst)
    }

    /// The fatal error, if any.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().clone()
    }

    /// The input topics' partition count (0 until the topics were checked).
    pub fn partitions(&self) -> i32 {
        self.partitions.load(Ordering::SeqCst)
    }

    /// Records the input topics' partition count.
    pub fn set_partitions(&self, n: i32) {
        self.partitions.store(n, Ordering::SeqCst);
    }

    /// The cancellation token.
    pub fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Records that the store answers (its last error is over).
    pub fn set_store_up(&self) {
        let failed = std::mem::take(&mut *self.health.store_error.lock());
        if !failed.is_empty() {
            // Each failure was logged where it happened; their end, once.
            info!(last_error = %failed, "Redis answers again.");
        }
        self.set_store(true);
    }

    /// Records that a store call failed, and why (what `/readyz` says).
    pub fn set_store_down(&self, error: &dyn std::fmt::Display) {
        *self.health.store_error.lock() = error.to_string();
        self.set_store(false);
    }

    fn set_store(&self, up: bool) {
        self.health.store_up.store(up, Ordering::SeqCst);
        self.metrics.redis_up.set(i64::from(up));
        self.refresh_ready();
    }

    /// Recomputes the readiness and paused gauges.
    pub fn refresh_ready(&self) {
        let paused = !self.health.store_up.load(Ordering::SeqCst)
            || self.health.registry_down.load(Ordering::SeqCst) > 0;
        self.metrics.paused.set(i64::from(paused));
        self.metrics.ready.set(i64::from(self.health.ready()));
    }

    /// Records that a worker dropped a shard because another member took it
    /// in the store (its partitions may still be assigned here).
    pub fn report_fenced(&self, shard: ShardId) {
        self.fenced.lock().insert(shard, Instant::now());
    }

    /// The group assigned or revoked the shard: whatever fenced it is settled.
    pub fn forget_fenced(&self, shard: ShardId) {
        self.fenced.lock().remove(&shard);
    }

    /// The shards fenced at least `grace` ago, forgotten as they are returned.
    pub fn fenced_for(&self, grace: Duration) -> Vec<ShardId> {
        let mut fenced = self.fenced.lock();
        let due: Vec<ShardId> = fenced
            .iter()
            .filter(|(_, since)| since.elapsed() >= grace)
            .map(|(s, _)| *s)
            .collect();
        for s in &due {
            fenced.remove(s);
        }
        due
    }

    /// Makes a shard's cache visible to lookups.
    pub fn register_cache(&self, shard: ShardId, cache: Arc<Mutex<LeadCache>>) {
        let mut caches = self.caches.write();
        caches.insert(shard, cache);
        self.share_limit(&caches);
    }

    /// Hides a shard's cache (given up).
    pub fn unregister_cache(&self, shard: ShardId) {
        let mut caches = self.caches.write();
        caches.remove(&shard);
        self.share_limit(&caches);
        drop(caches);
        self.board.lock().remove(&shard);
    }

    /// `state.max_leads_in_memory` and `state.max_memory_mb` hold for the
    /// instance: each shard it owns gets an equal part.
    fn share_limit(&self, caches: &HashMap<ShardId, Arc<Mutex<LeadCache>>>) {
        let whole = self.shard_config.cache;
        let n = caches.len().max(1);
        let part = crate::shard::cache::Limit {
            leads: whole.leads.div_ceil(n),
            bytes: whole.bytes.div_ceil(n),
        };
        for cache in caches.values() {
            cache.lock().set_limit(part);
        }
    }

    /// Whether an input partition has nothing left to fetch, as far as the
    /// last statistics tell (none yet: assumed not).
    /// Asked every turn for every input with nothing new, so it allocates
    /// nothing.
    pub fn caught_up(&self, input: usize, shard: ShardId) -> bool {
        if input >= self.inputs.len() {
            return true;
        }
        self.lag
            .lock()
            .get(&(input, shard))
            .is_some_and(|lag| *lag <= 0)
    }

    /// Turns the board into gauges (called about once a second).
    pub fn publish_gauges(&self, segments: &[&str]) {
        let board = self.board.lock();
        let now = crate::event::wall_clock_ms();
        let m = &self.metrics;
        m.shards_owned.set(board.len() as i64);
        m.leads_in_memory
            .set(board.values().map(|g| g.leads as i64).sum());
        m.cache_bytes
            .set(board.values().map(|g| g.bytes as i64).sum());
        m.dirty_leads
            .set(board.values().map(|g| g.dirty as i64).sum());
        m.timers_pending
            .set(board.values().map(|g| g.timers as i64).sum());
        m.merge_buffered
            .set(board.values().map(|g| g.buffered as i64).sum());
        m.watermark_lag_seconds.reset();
        for (shard, g) in board.iter() {
            let mark = if g.watermark == Millis::MAX {
                g.clock
            } else {
                g.watermark
            };
            if mark > Millis::MIN {
                m.watermark_lag_seconds
                    .with_label_values(&[&shard.to_string()])
                    .set((now - mark).max(0) / 1000);
            }
        }
        for segment in segments {
            let n: i64 = board
                .values()
                .map(|g| g.population.get(*segment).copied().unwrap_or(0))
                .sum();
            m.segment_population.with_label_values(&[segment]).set(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_names_every_cause() {
        let h = Health::new();
        assert_eq!(
            h.not_ready(),
            [
                "the consumer is not running (starting, or stopping)",
                "Redis does not answer"
            ]
        );
        h.running.store(true, Ordering::SeqCst);
        h.store_up.store(true, Ordering::SeqCst);
        assert!(h.ready());
        h.registry_down.store(2, Ordering::SeqCst);
        assert_eq!(
            h.not_ready(),
            ["the Schema Registry does not answer, fails or refuses (the log has its answer)"]
        );
        h.registry_down.store(0, Ordering::SeqCst);
        h.store_up.store(false, Ordering::SeqCst);
        assert_eq!(h.not_ready(), ["Redis does not answer"]);
        assert!(!h.ready());
        // The store's own words once a call failed (Redis full answers).
        *h.store_error.lock() =
            "redis: OOM command not allowed when used memory > 'maxmemory'.".into();
        assert_eq!(
            h.not_ready(),
            ["Redis is unavailable: OOM command not allowed when used memory > 'maxmemory'."]
        );
    }
}
