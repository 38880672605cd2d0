//! The processor: batches of input messages in, engine decisions out, state
//! written behind to the store, offsets released only once durable.
//!
//! It knows nothing of rdkafka: messages arrive as [`InMessage`] and outputs
//! leave through a [`Sink`], so the whole path is tested with in-memory
//! doubles and driven for real by `crate::kafka`.
//!
//! Ownership: a lead belongs to the *shard* equal to its partition number
//! (input topics are co-partitioned by lead id). Each shard has an
//! event-time clock (the largest `occurred_at` it has seen) and the decay
//! timers of its leads; timers fire when the clock passes them, so decay
//! transitions are a deterministic function of the input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tracing::{debug, warn};

use crate::decode::{DecodeError, Decoder};
use crate::engine::schedule::Schedule;
use crate::engine::{Applied, Decision, Engine, LeadState, Segment};
use crate::event::{Event, EventType, Millis};
use crate::metrics::Metrics;
use crate::output::{Encoder, Record};
use crate::store::{LeadWrite, Store, StoreError, WriteBatch};

/// One input message, borrowed from the consumer.
#[derive(Debug, Clone, Copy)]
pub struct InMessage<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<&'a [u8]>,
    /// Payload bytes.
    pub payload: Option<&'a [u8]>,
    /// Broker timestamp (ms), if any.
    pub timestamp: Option<i64>,
}

/// Why the output side failed. Retryable: the batch or flush is tried again.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The producer could not take or deliver a record.
    #[error("produce failed: {0}")]
    Produce(String),
    /// Acknowledgements did not arrive in time.
    #[error("timed out waiting for {0} output acknowledgements")]
    Timeout(usize),
}

/// Where outputs go.
pub trait Sink: Send {
    /// Queues an output record.
    fn send(&mut self, record: &Record) -> Result<(), SinkError>;
    /// Queues a dead letter: the original key and payload with the reason.
    fn dead_letter(&mut self, msg: &InMessage<'_>, error: &DecodeError) -> Result<(), SinkError>;
    /// A barrier behind every record queued so far: waiting on it returns
    /// once they are all acknowledged (it may be waited on in another thread).
    fn barrier(&mut self) -> Barrier;
}

type WaitFn = Box<dyn FnOnce(Duration) -> Result<(), SinkError> + Send>;

/// Waits for the acknowledgement of the records queued before it was taken.
pub struct Barrier(Option<WaitFn>);

impl Barrier {
    /// A barrier with nothing to wait for.
    pub fn ready() -> Self {
        Barrier(None)
    }

    /// A barrier that waits with `f`.
    pub fn new(f: impl FnOnce(Duration) -> Result<(), SinkError> + Send + 'static) -> Self {
        Barrier(Some(Box::new(f)))
    }

    /// Waits at most `timeout`.
    pub fn wait(self, timeout: Duration) -> Result<(), SinkError> {
        match self.0 {
            Some(f) => f(timeout),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Barrier")
    }
}

/// Errors of the processor. All are retryable: nothing was committed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The output side failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The background writer thread is gone.
    #[error("the state writer thread stopped")]
    Writer,
}

/// A lead held in memory.
#[derive(Debug, Clone)]
pub struct Lead {
    /// Its state.
    pub state: LeadState,
    /// Its shard (partition number).
    pub shard: i32,
}

/// The in-memory lead map shared with the HTTP server.
pub type LeadMap = DashMap<Arc<str>, Lead, Hasher>;

/// The hasher of the per-event maps and sets: fast, and seeded per process.
type Hasher = foldhash::fast::RandomState;

type FastSet<T> = HashSet<T, Hasher>;

/// (topic, partition, next offset) per input partition of a batch.
type NextOffsets<'b> = Vec<(&'b str, i32, i64)>;

#[derive(Debug, Default)]
struct Shard {
    clock: Option<Millis>,
    schedule: Schedule,
    /// Input partitions of this shard currently assigned.
    partitions: HashSet<String>,
}

/// Processor tuning.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// Flush at least this often.
    pub flush_interval: Duration,
    /// Flush as soon as this many leads are dirty.
    pub flush_max_dirty: usize,
    /// Longest wait for output acknowledgements.
    pub ack_timeout: Duration,
}

/// Offsets made durable by a flush: (topic, partition, next offset).
pub type Durable = Vec<(String, i32, i64)>;

/// The processor. One per consumer; not shared across threads except under a lock.
pub struct Processor {
    engine: Engine,
    leads: Arc<LeadMap>,
    store: Arc<dyn Store>,
    sink: Box<dyn Sink>,
    decoders: HashMap<String, Decoder>,
    encoder: Encoder,
    metrics: Metrics,
    config: ProcessorConfig,
    shards: BTreeMap<i32, Shard>,
    positions: BTreeMap<(String, i32), i64>,
    /// Partitions given up and not assigned again: messages from them that
    /// were polled before the revoke belong to their next owner.
    released: Vec<(String, i32)>,
    dirty: FastSet<Arc<str>>,
    last_flush: Instant,
    deleted: Vec<(Arc<str>, i32)>,
    /// Deleted keys whose deletion is not durable yet: never reload them.
    tombstones: FastSet<Arc<str>>,
    writer: Option<Writer>,
    decisions: Vec<Decision>,
    state_buf: Vec<u8>,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("leads", &self.leads.len())
            .field("dirty", &self.dirty.len())
            .finish_non_exhaustive()
    }
}

impl Processor {
    /// A processor over the given parts. `decoders` maps input topic → decoder.
    pub fn new(
        engine: Engine,
        leads: Arc<LeadMap>,
        store: Arc<dyn Store>,
        sink: Box<dyn Sink>,
        decoders: HashMap<String, Decoder>,
        encoder: Encoder,
        metrics: Metrics,
        config: ProcessorConfig,
    ) -> Self {
        Processor {
            engine,
            leads,
            store,
            sink,
            decoders,
            encoder,
            metrics,
            config,
            shards: BTreeMap::new(),
            positions: BTreeMap::new(),
            released: Vec::new(),
            dirty: FastSet::default(),
            last_flush: Instant::now(),
            deleted: Vec::new(),
            tombstones: FastSet::default(),
            writer: None,
            decisions: Vec::new(),
            state_buf: Vec::new(),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The next offset to process, per input partition processed so far.
    pub fn positions(&self) -> Durable {
        self.positions
            .iter()
            .map(|((t, p), o)| (t.clone(), *p, *o))
            .collect()
    }

    /// Leads changed since the last flush.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// Takes ownership of input partitions: restores their stored positions
    /// and their shards' clocks and timers. Returns the offset to resume from
    /// per partition where the store has one.
    pub fn assign(&mut self, partitions: &[(String, i32)]) -> Result<Vec<Option<i64>>, StoreError> {
        let positions = self.store.positions(partitions)?;
        for ((topic, partition), pos) in partitions.iter().zip(&positions) {
            self.released
                .retain(|(t, p)| !(p == partition && t == topic));
            let is_new = !self.shards.contains_key(partition);
            let shard = self.shards.entry(*partition).or_default();
            shard.partitions.insert(topic.clone());
            if is_new {
                shard.clock = self.store.clock(*partition)?;
                for (lead, at) in self.store.timers(*partition)? {
                    shard.schedule.set(&Arc::from(lead), Some(at));
                }
            }
            if let Some(p) = pos {
                self.positions.insert((topic.clone(), *partition), *p);
            }
        }
        self.metrics
            .timers_pending
            .set(self.timers_pending() as i64);
        Ok(positions)
    }

    /// Gives up input partitions after a successful flush: drops the state of
    /// shards with no partition left.
    pub fn release(&mut self, partitions: &[(String, i32)]) {
        for (topic, partition) in partitions {
            self.positions.remove(&(topic.clone(), *partition));
            self.released.push((topic.clone(), *partition));
            let gone = match self.shards.get_mut(partition) {
                Some(shard) => {
                    shard.partitions.remove(topic);
                    shard.partitions.is_empty()
                }
                None => false,
            };
            if gone {
                self.shards.remove(partition);
                let rules = self.engine.rules().clone();
                self.leads.retain(|_, lead| {
                    let keep = lead.shard != *partition;
                    if !keep {
                        self.metrics
                            .segment_population
                            .with_label_values(&[Segment::of(&lead.state).name(&rules)])
                            .dec();
                    }
                    keep
                });
                self.dirty.retain(|id| self.leads.contains_key(id));
            }
        }
        self.metrics.leads_in_memory.set(self.leads.len() as i64);
        self.metrics
            .timers_pending
            .set(self.timers_pending() as i64);
    }

    fn timers_pending(&self) -> usize {
        self.shards.values().map(|s| s.schedule.len()).sum()
    }

    /// Processes one batch in order. On error nothing has changed and the
    /// same batch may be retried.
    ///
    /// Messages this processor must not apply are skipped: those below a
    /// partition's position (already applied: redelivered after a restart or
    /// a re-assignment) and those from partitions it has released (polled
    /// before the revoke; the next owner reads them from the flushed position).
    pub fn process(&mut self, batch: &[InMessage<'_>]) -> Result<(), PipelineError> {
        let (keep, next_offsets) = self.admit(batch);
        match keep {
            None => self.process_owned(batch, next_offsets),
            Some(keep) => {
                let owned: Vec<InMessage<'_>> = batch
                    .iter()
                    .zip(&keep)
                    .filter_map(|(m, k)| k.then_some(*m))
                    .collect();
                self.metrics
                    .messages_skipped
                    .inc_by((batch.len() - owned.len()) as u64);
                let mut below = batch
                    .iter()
                    .zip(&keep)
                    .filter(|(m, k)| !**k && !self.is_released(m.topic, m.partition));
                match below.next() {
                    Some((first, _)) => warn!(
                        topic = first.topic,
                        partition = first.partition,
                        offset = first.offset,
                        count = below.count() + 1,
                        "Skipping redelivered messages below their partition's stored position (already applied). \
                         If this input topic was deleted and recreated, leadscore's Redis keys for it must be cleared too."
                    ),
                    None => debug!(
                        skipped = batch.len() - owned.len(),
                        "Skipping messages polled before their partitions were revoked."
                    ),
                }
                self.process_owned(&owned, next_offsets)
            }
        }
    }

    /// Which messages of `batch` this processor applies (`None`: all of
    /// them), and the position each input partition reaches once they are.
    fn admit<'b>(&self, batch: &[InMessage<'b>]) -> (Option<Vec<bool>>, NextOffsets<'b>) {
        // (topic, partition, next offset to apply, released)
        let mut cursors: Vec<(&str, i32, Option<i64>, bool)> = Vec::new();
        let mut keep: Option<Vec<bool>> = None;
        for (i, m) in batch.iter().enumerate() {
            let at = match cursors
                .iter()
                .position(|(t, p, _, _)| *p == m.partition && *t == m.topic)
            {
                Some(at) => at,
                None => {
                    let next = self
                        .positions
                        .get(&(m.topic.to_owned(), m.partition))
                        .copied();
                    let released = self.is_released(m.topic, m.partition);
                    cursors.push((m.topic, m.partition, next, released));
                    cursors.len() - 1
                }
            };
            let cursor = &mut cursors[at];
            let ok = !cursor.3 && cursor.2.is_none_or(|next| m.offset >= next);
            if ok {
                cursor.2 = Some(m.offset + 1);
            }
            match (&mut keep, ok) {
                (Some(keep), ok) => keep.push(ok),
                (None, false) => {
                    let mut k = vec![true; i];
                    k.push(false);
                    keep = Some(k);
                }
                (None, true) => {}
            }
        }
        let next_offsets = cursors
            .into_iter()
            .filter_map(|(t, p, next, _)| next.map(|n| (t, p, n)))
            .collect();
        (keep, next_offsets)
    }

    fn is_released(&self, topic: &str, partition: i32) -> bool {
        self.released
            .iter()
            .any(|(t, p)| *p == partition && t == topic)
    }

    fn process_owned(
        &mut self,
        batch: &[InMessage<'_>],
        next_offsets: NextOffsets<'_>,
    ) -> Result<(), PipelineError> {
        let started = Instant::now();
        let decoded: Vec<Result<Event<'_>, DecodeError>> = batch
            .iter()
            .map(|m| match self.decoders.get(m.topic) {
                Some(d) => d.decode(m.payload),
                None => Err(DecodeError::Json(format!(
                    "no decoder for topic {}",
                    m.topic
                ))),
            })
            .collect();
        self.load_missing(batch, &decoded)?;

        let mut consumed: HashMap<(&str, EventType), u64, Hasher> = HashMap::default();
        let now_ms = crate::event::wall_clock_ms();
        for (m, event) in batch.iter().zip(decoded) {
            let event = match event {
                Ok(e) => e,
                Err(error) => {
                    self.metrics
                        .decode_failures
                        .with_label_values(&[m.topic, error.kind()])
                        .inc();
                    self.metrics
                        .dead_lettered
                        .with_label_values(&[m.topic])
                        .inc();
                    debug!(topic = m.topic, partition = m.partition, offset = m.offset, %error, "Dead-lettering message.");
                    self.sink.dead_letter(m, &error)?;
                    continue;
                }
            };
            *consumed.entry((m.topic, event.kind)).or_default() += 1;
            self.fire_timers(m.partition, event.occurred_at)?;
            let key = subject_key(&event);
            let anonymous = self.take_anonymous(&event, &key);
            let mut entry = self.leads.get_mut(&*key).expect("loaded by load_missing");
            let subject = Arc::clone(entry.key());
            let lead = entry.value_mut();
            lead.shard = m.partition;
            self.decisions.clear();
            let applied = self.engine.apply_merging(
                &mut lead.state,
                &event,
                anonymous.as_ref().map(|(_, a)| &a.state),
                &mut self.decisions,
            );
            let next = self.engine.next_transition(&lead.state);
            drop(entry);
            if applied == Applied::Duplicate {
                if let Some((id, anon)) = anonymous {
                    self.leads.insert(id, anon);
                }
                self.metrics
                    .duplicates_skipped
                    .with_label_values(&[m.topic])
                    .inc();
                continue;
            }
            if let Some((id, anon)) = anonymous {
                // Merged once: the visitor's own state is gone.
                if let Some(shard) = self.shards.get_mut(&anon.shard) {
                    shard.schedule.set(&id, None);
                }
                self.dirty.remove(&id);
                self.tombstones.insert(Arc::clone(&id));
                self.deleted.push((id, anon.shard));
            }
            // Timers only move earlier here: one that fires early finds
            // nothing due and re-arms itself, which keeps the hot path
            // from re-sorting the schedule on every event.
            self.shards
                .entry(m.partition)
                .or_default()
                .schedule
                .set_earlier(&subject, next);
            self.publish(&subject)?;
            self.dirty.insert(subject);
            // One sample in 16 keeps the histogram honest and off the hot path.
            if m.offset % 16 == 0
                && let Some(ts) = m.timestamp.filter(|t| *t > 0)
            {
                self.metrics
                    .processing_latency_seconds
                    .observe((now_ms - ts).max(0) as f64 / 1000.0);
            }
        }
        for (topic, partition, next) in next_offsets {
            match self.positions.get_mut(&(topic.to_owned(), partition)) {
                Some(o) => *o = next,
                None => {
                    self.positions.insert((topic.to_owned(), partition), next);
                }
            }
        }
        for ((topic, kind), n) in consumed {
            self.metrics
                .events_consumed
                .with_label_values(&[topic, kind.as_str()])
                .inc_by(n);
        }
        self.metrics.dirty_leads.set(self.dirty.len() as i64);
        self.metrics.leads_in_memory.set(self.leads.len() as i64);
        self.metrics
            .timers_pending
            .set(self.timers_pending() as i64);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Advances a shard's clock to `t` and fires every timer due by then.
    fn fire_timers(&mut self, shard_id: i32, t: Millis) -> Result<(), PipelineError> {
        let shard = self.shards.entry(shard_id).or_default();
        let clock = shard.clock.map_or(t, |c| c.max(t));
        shard.clock = Some(clock);
        while let Some((at, lead_id)) = self
            .shards
            .get_mut(&shard_id)
            .and_then(|s| s.schedule.pop_due(clock))
        {
            let Some(mut entry) = self.leads.get_mut(&lead_id) else {
                // Loaded by load_missing for every timer due in this batch; a
                // missing lead here was never stored (nothing to decay).
                continue;
            };
            self.decisions.clear();
            self.engine
                .advance(&mut entry.state, at, &mut self.decisions);
            let next = self.engine.next_transition(&entry.state);
            drop(entry);
            if let Some(shard) = self.shards.get_mut(&shard_id) {
                shard.schedule.set(&lead_id, next);
            }
            self.publish(&lead_id)?;
            self.dirty.insert(lead_id);
        }
        Ok(())
    }

    /// Removes the anonymous visitor an identifying event names, for merging.
    fn take_anonymous(&mut self, event: &Event<'_>, key: &str) -> Option<(Arc<str>, Lead)> {
        let anon = stitched_key(event)?;
        if anon == key {
            return None;
        }
        let lead = self.leads.get(key)?;
        if self.engine.is_duplicate(&lead.state, event) {
            return None;
        }
        drop(lead);
        self.leads.remove(anon.as_str())
    }

    /// Encodes and sends `self.decisions` for a lead. Anonymous visitors are
    /// scored silently: nobody can be mailed or handed to sales by cookie.
    fn publish(&mut self, lead: &str) -> Result<(), SinkError> {
        if lead.starts_with(ANONYMOUS_PREFIX) {
            return Ok(());
        }
        let rules = self.engine.rules().clone();
        for d in &self.decisions {
            let record = self.encoder.encode(&rules, lead, d);
            match d {
                Decision::Change(c) => {
                    let (from, to) = (c.from.name(&rules), c.to.name(&rules));
                    self.metrics
                        .segment_changes
                        .with_label_values(&[from, to, c.reason.as_str()])
                        .inc();
                    self.metrics
                        .segment_population
                        .with_label_values(&[from])
                        .dec();
                    self.metrics
                        .segment_population
                        .with_label_values(&[to])
                        .inc();
                }
                Decision::Handoff(_) => self.metrics.handoffs.inc(),
            }
            self.sink.send(&record)?;
        }
        Ok(())
    }

    /// Loads, in one round trip, every lead this batch touches that is not in
    /// memory, including leads whose timers fall due within the batch.
    fn load_missing(
        &mut self,
        batch: &[InMessage<'_>],
        decoded: &[Result<Event<'_>, DecodeError>],
    ) -> Result<(), StoreError> {
        let mut wanted: Vec<(Arc<str>, i32, bool)> = Vec::new();
        let mut seen: FastSet<String> = FastSet::default();
        let mut batch_clock: BTreeMap<i32, Millis> = BTreeMap::new();
        for (m, e) in batch.iter().zip(decoded) {
            if let Ok(e) = e {
                let subject = subject_key(e);
                let c = batch_clock.entry(m.partition).or_insert(e.occurred_at);
                *c = (*c).max(e.occurred_at);
                if !self.leads.contains_key(&*subject) && seen.insert(subject.to_string()) {
                    if self.tombstones.contains(&*subject) {
                        // Merged away and not yet deleted in the store: start afresh.
                        let state = self.engine.new_state();
                        let lead = Lead {
                            state,
                            shard: m.partition,
                        };
                        self.leads.insert(Arc::from(&*subject), lead);
                    } else {
                        wanted.push((Arc::from(&*subject), m.partition, true));
                    }
                }
                if let Some(anon) = stitched_key(e)
                    && !self.leads.contains_key(anon.as_str())
                    && !self.tombstones.contains(anon.as_str())
                    && seen.insert(anon.clone())
                {
                    // Only if stored: a visitor never seen has nothing to merge.
                    wanted.push((Arc::from(anon), m.partition, false));
                }
            }
        }
        for (shard_id, until) in batch_clock {
            if let Some(shard) = self.shards.get(&shard_id) {
                let due = shard.schedule.due_ids(until);
                for id in due {
                    if !self.leads.contains_key(&id) && seen.insert(id.to_string()) {
                        wanted.push((id, shard_id, true));
                    }
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = wanted.iter().map(|(id, _, _)| &**id).collect();
        let loaded = self.store.load(&ids)?;
        let rules = self.engine.rules().clone();
        for ((id, shard, required), bytes) in wanted.into_iter().zip(loaded) {
            if !required && bytes.is_none() {
                continue;
            }
            let state = match bytes {
                Some(b) => match self.engine.decode(&b) {
                    Ok(s) => s,
                    Err(error) => {
                        warn!(%error, shard, "Stored lead state unreadable; starting the lead afresh.");
                        self.engine.new_state()
                    }
                },
                None => self.engine.new_state(),
            };
            self.metrics
                .segment_population
                .with_label_values(&[Segment::of(&state).name(&rules)])
                .inc();
            self.leads.insert(id, Lead { state, shard });
        }
        Ok(())
    }

    /// Whether a flush is due (interval passed or too many dirty leads) and
    /// none is in flight.
    pub fn flush_due(&self) -> bool {
        !self.writer.as_ref().is_some_and(|w| w.in_flight)
            && (self.dirty.len() >= self.config.flush_max_dirty
                || (self.last_flush.elapsed() >= self.config.flush_interval
                    && (!self.dirty.is_empty()
                        || !self.deleted.is_empty()
                        || !self.positions.is_empty())))
    }

    /// Writes in a background thread from now on, through `store` (its own connection).
    pub fn with_writer(mut self, store: Arc<dyn Store>) -> Self {
        let (jobs, jobs_rx) = crossbeam_channel::bounded::<(Barrier, WriteBatch)>(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let ack_timeout = self.config.ack_timeout;
        std::thread::Builder::new()
            .name("leadscore-writer".into())
            .spawn(move || {
                for (barrier, batch) in jobs_rx {
                    let started = Instant::now();
                    let result = write(&*store, barrier, &batch, ack_timeout);
                    if done_tx.send((batch, result, started)).is_err() {
                        break;
                    }
                }
            })
            .expect("writer thread starts");
        self.writer = Some(Writer {
            jobs,
            done,
            in_flight: false,
        });
        self
    }

    /// Waits for output acks and takes everything changed so far into a write batch.
    fn prepare(&mut self) -> (Barrier, WriteBatch) {
        let barrier = self.sink.barrier();
        let mut batch = WriteBatch::default();
        batch.leads.reserve(self.dirty.len());
        for id in self.dirty.drain() {
            let Some(lead) = self.leads.get(&id) else {
                continue;
            };
            self.engine.encode(&lead.state, &mut self.state_buf);
            let timer = self
                .shards
                .get(&lead.shard)
                .and_then(|s| s.schedule.get(&id));
            batch.leads.push(LeadWrite {
                state: self.state_buf.clone(),
                shard: lead.shard,
                timer,
                id,
            });
        }
        batch.deletes = std::mem::take(&mut self.deleted);
        batch.positions = self.positions();
        batch.clocks = self
            .shards
            .iter()
            .filter_map(|(id, s)| s.clock.map(|c| (*id, c)))
            .collect();
        self.last_flush = Instant::now();
        self.metrics.dirty_leads.set(0);
        (barrier, batch)
    }

    /// Accounts for a finished write: on failure the leads are dirty again.
    fn complete(
        &mut self,
        batch: WriteBatch,
        result: Result<(), PipelineError>,
        started: Instant,
    ) -> Result<Durable, PipelineError> {
        match result {
            Ok(()) => {
                for (id, _) in &batch.deletes {
                    self.tombstones.remove(id);
                }
                self.metrics.redis_up.set(1);
                self.metrics.flush_leads.observe(batch.leads.len() as f64);
                self.metrics
                    .flush_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(batch.positions)
            }
            Err(e) => {
                if matches!(e, PipelineError::Store(_)) {
                    self.metrics
                        .redis_errors
                        .with_label_values(&["write"])
                        .inc();
                    self.metrics.redis_up.set(0);
                }
                for lead in batch.leads {
                    if self.leads.contains_key(&lead.id) {
                        self.dirty.insert(lead.id);
                    }
                }
                self.deleted.extend(batch.deletes);
                self.metrics.dirty_leads.set(self.dirty.len() as i64);
                Err(e)
            }
        }
    }

    /// Starts a background write of everything processed so far (after the
    /// output acks). Without a writer thread this writes synchronously.
    pub fn start_flush(&mut self) -> Result<Option<Durable>, PipelineError> {
        if self.writer.is_none() {
            return self.flush().map(Some);
        }
        let job = self.prepare();
        let writer = self.writer.as_mut().expect("checked above");
        writer.in_flight = true;
        if writer.jobs.send(job).is_err() {
            writer.in_flight = false;
            return Err(PipelineError::Writer);
        }
        Ok(None)
    }

    /// The result of the background write, once it has finished.
    pub fn poll_flush(&mut self) -> Option<Result<Durable, PipelineError>> {
        let writer = self.writer.as_mut()?;
        if !writer.in_flight {
            return None;
        }
        let (batch, result, started) = writer.done.try_recv().ok()?;
        writer.in_flight = false;
        Some(self.complete(batch, result, started))
    }

    /// Makes everything processed so far durable, synchronously: waits for a
    /// background write in flight, then for output acks, then writes changed
    /// leads, timers, clocks and positions in one transaction. Returns the
    /// positions that may now be committed.
    pub fn flush(&mut self) -> Result<Durable, PipelineError> {
        if let Some(writer) = self.writer.as_mut()
            && writer.in_flight
        {
            writer.in_flight = false;
            match writer.done.recv() {
                // Its positions are covered by the write below.
                Ok((batch, result, started)) => {
                    let _ = self.complete(batch, result, started);
                }
                Err(_) => return Err(PipelineError::Writer),
            }
        }
        let started = Instant::now();
        let (barrier, batch) = self.prepare();
        let result = write(&*self.store, barrier, &batch, self.config.ack_timeout);
        self.complete(batch, result, started)
    }

    /// Records that a flush was attempted now (so a failing store is retried
    /// at the flush interval, not in a busy loop).
    pub fn defer_flush(&mut self) {
        self.last_flush = Instant::now();
    }
}

/// The background Redis writer.
struct Writer {
    jobs: crossbeam_channel::Sender<(Barrier, WriteBatch)>,
    done: crossbeam_channel::Receiver<(WriteBatch, Result<(), PipelineError>, Instant)>,
    in_flight: bool,
}

/// Outputs first, then state: a batch is written only once every output
/// produced before it was taken is acknowledged.
fn write(
    store: &dyn Store,
    barrier: Barrier,
    batch: &WriteBatch,
    ack_timeout: Duration,
) -> Result<(), PipelineError> {
    barrier.wait(ack_timeout)?;
    store.write(batch)?;
    Ok(())
}

/// Prefix of the keys anonymous visitors are kept under.
pub const ANONYMOUS_PREFIX: &str = "anon:";

/// The key an event's state is kept under: the lead id, else `anon:` and the anonymous id.
pub fn subject_key<'e>(e: &'e Event<'_>) -> std::borrow::Cow<'e, str> {
    match (&e.lead_id, &e.anonymous_id) {
        (Some(lead), _) => std::borrow::Cow::Borrowed(lead),
        (None, Some(anon)) => std::borrow::Cow::Owned(format!("{ANONYMOUS_PREFIX}{anon}")),
        (None, None) => std::borrow::Cow::Borrowed(""),
    }
}

/// The key of the anonymous visitor an identified event names, if any.
fn stitched_key(e: &Event<'_>) -> Option<String> {
    match (&e.lead_id, &e.anonymous_id) {
        (Some(_), Some(anon)) => Some(format!("{ANONYMOUS_PREFIX}{anon}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
