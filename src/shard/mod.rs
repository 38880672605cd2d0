//! A shard: everything leadscore keeps for one partition number of the
//! co-partitioned input topics, owned by one worker thread.
//!
//! The parts, each owning its fields:
//! * [`merge`] — the inputs' queues and the event-time merge (watermark);
//! * [`cache`] — the leads held in memory, bounded, in their stored form;
//! * [`timers`] — when time alone will next change each lead, paged from the store;
//! * [`Shard`] — positions, the shard's clock, pending deletes and population
//!   changes, and the step that applies released events and due timers
//!   through the pure [`crate::engine`], publishing through a [`Sink`].
//!
//! Writing a shard's changes to the store is the worker's job
//! ([`Shard::prepare_write`] / [`Shard::write_done`]); nothing here does I/O
//! except through the [`Store`] and [`Sink`] handed to [`Shard::step`].

pub mod cache;
pub mod merge;
pub mod timers;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::decode::DecodeError;
use crate::engine::identity::{self, Link, Route};
use crate::engine::{Applied, Decision, Engine, Kind, LeadState, Segment};
use crate::event::{Event, EventType, Millis, PackedEvent, Source};
use crate::output::Encoder;
use crate::sink::{DeadLetter, Sink, SinkError};
use crate::store::{
    ShardId, ShardMeta, ShardWrite, Store, StoreError, TimerWrite, Written, erasure_hash,
};
use cache::{KeyBuf, KeyList, LeadCache, LeadKey, Limit};
use merge::{Merge, Released};
use timers::Timers;

/// A set of keys (fast hashing; its order is never observed).
type KeySet = std::collections::HashSet<LeadKey, foldhash::fast::RandomState>;

/// A tally of a step's counts (fast hashing; drained into the metrics).
pub type Tally<K> = hashbrown::HashMap<K, u64>;

/// A segment change's labels: (from, to, reason).
pub type ChangeLabels = (String, String, &'static str);

/// An engagement event's labels: (event, channel, segment, source).
pub type EngagementLabels = (&'static str, String, String, String);

/// Labels looked up by reference: a tally allocates its owned key only the
/// first time a batch sees it. Hashes as the owned tuple does (a `String`
/// hashes as its `str`), field by field.
#[derive(Hash)]
struct Borrowed<T>(T);

impl hashbrown::Equivalent<ChangeLabels> for Borrowed<(&str, &str, &'static str)> {
    fn equivalent(&self, k: &ChangeLabels) -> bool {
        let (from, to, reason) = self.0;
        k.0 == from && k.1 == to && k.2 == reason
    }
}

impl hashbrown::Equivalent<EngagementLabels> for Borrowed<(&'static str, &str, &str, &str)> {
    fn equivalent(&self, k: &EngagementLabels) -> bool {
        let (event, channel, segment, source) = self.0;
        k.0 == event && k.1 == channel && k.2 == segment && k.3 == source
    }
}

/// Adds one to `labels`' count, making the owned key only if it is new.
fn count<K, Q>(tally: &mut Tally<K>, labels: Q, owned: impl FnOnce(Q) -> K)
where
    K: std::hash::Hash + Eq,
    Q: std::hash::Hash + hashbrown::Equivalent<K>,
{
    match tally.get_mut(&labels) {
        Some(n) => *n += 1,
        None => {
            tally.insert(owned(labels), 1);
        }
    }
}

/// One input message as the consumer hands it over.
#[derive(Debug, Clone, Copy)]
pub struct InMessage<'a> {
    /// Index of its input (position of its topic in the shard's inputs).
    pub input: usize,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<&'a [u8]>,
    /// Payload bytes.
    pub payload: Option<&'a [u8]>,
    /// Broker timestamp (ms), if any.
    pub timestamp: Option<i64>,
}

/// Why a shard step stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The store failed (retryable: nothing was lost, the step resumes where it stopped).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The output side failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The store refused this owner: another member took the shard, or its
    /// state is gone.
    #[error("shard {shard} is no longer ours: {outcome:?}")]
    Fenced {
        /// The shard.
        shard: ShardId,
        /// What the store said.
        outcome: Written,
    },
}

impl ShardError {
    /// Whether retrying the same step may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            ShardError::Store(e) => e.retryable(),
            ShardError::Sink(e) => e.retryable(),
            ShardError::Fenced { .. } => false,
        }
    }
}

/// A queued input message, owned. An event is held inline (its text is
/// its one allocation; the queues it waits in are read in order, so the
/// round finds it without a miss of the CPU's caches of its own); a rarer
/// rejected message is boxed, so that an item stays at 72 bytes.
#[derive(Debug)]
enum Item {
    Event(PackedEvent),
    /// Rejected: dead-lettered when it reaches the head of its queue.
    Poison(Box<Poison>),
    /// A tombstone on the CRM topic: erase the lead.
    Erase(Box<str>),
}

/// A rejected message, as its dead letter will carry it.
#[derive(Debug)]
struct Poison {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    original_size: usize,
    original_hash: Option<String>,
    error: DecodeError,
}

/// Items a round applies between two checks of their lookups' slots
/// ([`LeadCache::recheck`]): few enough that the entries a check brings
/// into the CPU's cache are still there when their events are applied.
const RECHECK: usize = 256;

/// The fewest events a round takes however small the memory limit.
const MIN_ROUND: usize = 32;

/// Shard settings.
#[derive(Debug, Clone, Copy)]
pub struct ShardConfig {
    /// Disorder tolerated within one input, ms.
    pub allowed_lateness_ms: Millis,
    /// How far ahead of the wall clock the shard's clock may ever go, ms.
    pub future_tolerance_ms: Millis,
    /// Leads held in memory.
    pub cache: Limit,
    /// Timers read from the store per page.
    pub timer_page: usize,
    /// Most events (and timers) applied per lead-loading round trip.
    pub round: usize,
    /// Largest dead-lettered payload kept, bytes.
    pub dead_letter_max_bytes: usize,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            allowed_lateness_ms: 0,
            future_tolerance_ms: 5 * 60_000,
            cache: Limit::NONE,
            timer_page: 10_000,
            round: 2048,
            dead_letter_max_bytes: 64 * 1024,
        }
    }
}

/// Counts a step accumulates for the metrics (added up per batch, off the
/// per-event path).
#[derive(Debug, Default)]
pub struct StepStats {
    /// Events scored, by (input, type).
    pub consumed: Tally<(usize, EventType)>,
    /// Dead letters, by (input, error kind).
    pub dead: Tally<(usize, &'static str)>,
    /// Duplicates skipped, by input.
    pub duplicates: Tally<usize>,
    /// Events applied after the merge had moved past them, by input.
    pub late: Tally<usize>,
    /// Events applied in merge order but with a time before the shard's
    /// clock, by input: the clock had followed the wall clock while every
    /// input was idle (a backfill, an upstream outage's buffer).
    pub behind_clock: Tally<usize>,
    /// Events with no message key, or with a lead id they are not keyed
    /// by, by input (counted as read: a message read again after a restart
    /// counts again).
    pub mis_keyed: Tally<usize>,
    /// Redelivered offsets skipped.
    pub skipped: u64,
    /// Segment changes published: (from, to, reason).
    pub changes: Tally<ChangeLabels>,
    /// Hand-offs published.
    pub handoffs: u64,
    /// Engagement events: (event, channel, segment, source).
    pub engagement: Tally<EngagementLabels>,
    /// Cache hits and misses.
    pub hits: u64,
    /// Leads loaded from (or looked for in) the store.
    pub misses: u64,
    /// Leads evicted from memory.
    pub evicted: u64,
    /// Leads expired by retention.
    pub expired: u64,
    /// Leads erased on request.
    pub erased: u64,
    /// Events dropped because their lead (or visitor) was erased after
    /// their time: a producer's retry, or an event that arrived late.
    pub after_erasure: u64,
    /// Broker timestamps of a sample of applied messages (for latency).
    pub latency_samples: Vec<i64>,
}

/// The world a step works in.
pub struct Ctx<'a> {
    /// The engine.
    pub engine: &'a Engine,
    /// Durable state.
    pub store: &'a dyn Store,
    /// Outputs.
    pub sink: &'a mut dyn Sink,
    /// Output encoding.
    pub encoder: &'a Encoder,
    /// Counters.
    pub stats: &'a mut StepStats,
}

/// What a pending write carries that must be restored if it fails.
#[derive(Debug, Default)]
pub struct Pending {
    /// The leads written and what the write did to their stored timers.
    leads: Vec<(LeadKey, TimerWrite)>,
    slots: Vec<u32>,
    deletes: Vec<LeadKey>,
    erasures: Vec<(u64, Option<Millis>)>,
}

/// One shard.
pub struct Shard {
    id: ShardId,
    epoch: u64,
    /// Writes the stored record has taken (see [`ShardWrite::seq`]).
    seq: u64,
    topics: Arc<[Arc<str>]>,
    sources: Arc<[Source]>,
    config: ShardConfig,
    merge: Merge<Item>,
    ready: VecDeque<Released<Item>>,
    /// Next offset to apply, per input (None: whatever the consumer starts at).
    positions: Vec<Option<i64>>,
    /// Next offset expected from the consumer, per input.
    pushed: Vec<Option<i64>>,
    /// Largest event time applied, per input.
    seen: Vec<Millis>,
    clock: Millis,
    /// Event time of the last event applied (none yet after a start or a
    /// partition move: what is still to come may be older than the clock):
    /// while events still come, timers fire no further than this (see
    /// [`Shard::timer_horizon`]).
    last_at: Millis,
    cache: Arc<Mutex<LeadCache>>,
    timers: Timers,
    deletes: KeySet,
    /// Keys deleted here whose deletion the store has not acknowledged yet
    /// (pending in `deletes` or in a write in flight): the store still holds
    /// their old state, which must not be loaded back.
    unwritten_deletes: KeySet,
    /// Erasure markers: per erased key's hash, the erasure's time.
    erased: HashMap<u64, Millis>,
    /// Markers set or forgotten since the last write.
    erasures: HashMap<u64, Option<Millis>>,
    population: HashMap<String, i64>,
    population_dirty: bool,
    decisions: Vec<Decision>,
    state: LeadState,
    other: LeadState,
    buf: Vec<u8>,
    /// The output being encoded (its buffers reused).
    record: crate::output::Record,
    /// Keys this round looked for in the store and did not find.
    absent: KeySet,
    /// Keys a round wants from the store (scratch).
    wanted: KeySet,
    /// The attribute list events are applied with, kept for its allocation.
    attributes: crate::event::SpareAttributes,
    /// Keys written out for lookups (scratch).
    keys: KeyBuf,
    /// The ready items' keys as the round's lookup saw them: for the item
    /// `i` places from the front, its lead's at `2 i` and its visitor's at
    /// `2 i + 1` (empty for none).
    lookups: KeyList,
    /// Where the round's lookup found each of [`Shard::lookups`]: a hint,
    /// checked before it is used, that spares the apply a second lookup.
    hints: Vec<Option<u32>>,
    /// The key of the lead an event is applied to (scratch).
    current: String,
    /// The key of the lead a timer fires for (scratch).
    firing: String,
    /// A finished write's buffers, for the next one.
    spare: Spare,
}

/// The buffers of a write, kept between writes.
#[derive(Debug, Default)]
struct Spare {
    leads: Vec<crate::store::LeadWrite>,
    states: Vec<u8>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .field("epoch", &self.epoch)
            .field("queued", &self.merge.queued())
            .finish_non_exhaustive()
    }
}

/// A time before every event.
const NEVER: Millis = i64::MIN;

impl Shard {
    /// A shard taken with `meta`, reading `topics` (of `sources`, in merge order).
    pub fn new(
        id: ShardId,
        meta: &ShardMeta,
        topics: Arc<[Arc<str>]>,
        sources: Arc<[Source]>,
        config: ShardConfig,
    ) -> Shard {
        let mut merge = Merge::new(topics.len(), config.allowed_lateness_ms);
        let released = meta.released.unwrap_or(NEVER);
        let mut seen = vec![NEVER; topics.len()];
        let mut positions = vec![None; topics.len()];
        for (i, t) in topics.iter().enumerate() {
            let s = meta.seen.get(&**t).copied().unwrap_or(NEVER);
            seen[i] = s;
            merge.restore(i, s, released);
            positions[i] = meta.positions.get(&**t).copied();
        }
        Shard {
            id,
            epoch: meta.epoch,
            seq: meta.seq,
            topics,
            sources,
            config,
            merge,
            ready: VecDeque::new(),
            pushed: positions.clone(),
            positions,
            seen,
            clock: meta.clock.unwrap_or(NEVER),
            last_at: NEVER,
            cache: Arc::new(Mutex::new(LeadCache::new(config.cache))),
            timers: Timers::default(),
            deletes: KeySet::default(),
            erased: meta.erased.clone(),
            erasures: HashMap::new(),
            unwritten_deletes: KeySet::default(),
            population: meta.population.clone(),
            population_dirty: false,
            decisions: Vec::new(),
            state: LeadState::new(Kind::Lead),
            other: LeadState::new(Kind::Lead),
            buf: Vec::new(),
            record: crate::output::Record::default(),
            absent: KeySet::default(),
            wanted: KeySet::default(),
            attributes: Vec::new(),
            keys: KeyBuf::default(),
            lookups: KeyList::default(),
            hints: Vec::new(),
            current: String::new(),
            firing: String::new(),
            spare: Spare::default(),
        }
    }

    /// The shard's id (partition number).
    pub fn id(&self) -> ShardId {
        self.id
    }

    /// The owner epoch it was taken with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The leads in memory, shared with the HTTP surface.
    pub fn cache(&self) -> &Arc<Mutex<LeadCache>> {
        &self.cache
    }

    /// The stored position of an input (the offset to resume from).
    pub fn position(&self, input: usize) -> Option<i64> {
        self.positions.get(input).copied().flatten()
    }

    /// The positions to commit: (topic, next offset), for inputs with one.
    pub fn positions(&self) -> Vec<(Arc<str>, i64)> {
        self.topics
            .iter()
            .zip(&self.positions)
            .filter_map(|(t, p)| p.map(|p| (Arc::clone(t), p)))
            .collect()
    }

    /// The shard's event-time clock.
    pub fn clock(&self) -> Millis {
        self.clock
    }

    /// The merge's watermark: the earliest event time an input may still deliver.
    pub fn watermark(&self) -> Millis {
        self.merge.watermark()
    }

    /// Messages waiting behind the watermark (or for their leads).
    pub fn buffered(&self) -> usize {
        self.merge.queued() + self.ready.len()
    }

    /// Messages queued for one input.
    pub fn queued_in(&self, input: usize) -> usize {
        self.merge.queued_in(input)
    }

    /// Timers in memory: those of the leads held (in this shard's cache,
    /// locked by the caller) and of the store's window.
    pub fn timers_pending(&self, cache: &LeadCache) -> usize {
        self.timers.len() + cache.timers_len()
    }

    /// A lead's timer in memory, and how far the store's timers are paged in.
    #[cfg(test)]
    fn timer_in_memory(
        &self,
        cache: &LeadCache,
        key: &LeadKey,
    ) -> (Option<Millis>, Option<Millis>) {
        (
            cache.timer(key).or(self.timers.get(key)),
            self.timers.window(),
        )
    }

    /// Leads per segment in this shard (all of them, not only those in memory).
    pub fn population(&self) -> &HashMap<String, i64> {
        &self.population
    }

    /// Marks an input idle (caught up and quiet) or active.
    pub fn set_idle(&mut self, input: usize, idle: bool) {
        self.merge.set_idle(input, idle);
    }

    /// Whether an input is idle.
    pub fn is_idle(&self, input: usize) -> bool {
        self.merge.is_idle(input)
    }

    /// Whether every input is idle.
    pub fn all_idle(&self) -> bool {
        self.merge.all_idle()
    }

    /// Takes one message of input `msg.input`, decoded by the caller.
    /// Offsets already applied or already queued are skipped (redeliveries).
    pub fn push(
        &mut self,
        msg: &InMessage<'_>,
        decoded: Result<Event<'_>, DecodeError>,
        stats: &mut StepStats,
    ) {
        let i = msg.input;
        if self.pushed[i].is_some_and(|next| msg.offset < next) {
            stats.skipped += 1;
            return;
        }
        self.pushed[i] = Some(msg.offset + 1);
        if stats.latency_samples.len() < 64
            && msg.offset % 16 == 0
            && let Some(ts) = msg.timestamp.filter(|t| *t > 0)
        {
            stats.latency_samples.push(ts);
        }
        if let Ok(e) = &decoded
            && !keyed_by_its_lead(msg.key, e)
        {
            *stats.mis_keyed.entry(i).or_default() += 1;
        }
        let (at, item) = match decoded {
            Ok(e) => (Some(e.occurred_at), Item::Event(PackedEvent::new(&e))),
            Err(DecodeError::Empty)
                if msg.payload.is_none()
                    && self.sources[i] == Source::Crm
                    && msg.key.is_some_and(|k| !k.is_empty()) =>
            {
                // A tombstone has no event time of its own: its broker timestamp orders it.
                let lead = String::from_utf8_lossy(msg.key.unwrap_or_default()).into();
                (msg.timestamp.filter(|t| *t > 0), Item::Erase(lead))
            }
            Err(error) => {
                let payload = msg.payload;
                let size = payload.map_or(0, <[u8]>::len);
                let cut = size > self.config.dead_letter_max_bytes;
                (
                    None,
                    Item::Poison(Box::new(Poison {
                        key: msg
                            .key
                            .map(|k| k[..k.len().min(self.config.dead_letter_max_bytes)].to_vec()),
                        payload: payload
                            .map(|p| p[..p.len().min(self.config.dead_letter_max_bytes)].to_vec()),
                        original_size: size,
                        original_hash: cut.then(|| {
                            format!(
                                "{:016x}",
                                xxhash_rust::xxh3::xxh3_64(payload.unwrap_or_default())
                            )
                        }),
                        error,
                    })),
                )
            }
        };
        self.merge.push(i, msg.offset, at, item);
    }

    /// Applies what the merge releases and the timers that fall due, up to
    /// `budget` items. On an error nothing is lost: released items not yet
    /// applied stay ready and the next step resumes with them.
    pub fn step(&mut self, ctx: &mut Ctx<'_>, budget: usize) -> Result<usize, ShardError> {
        let mut done = 0;
        while done < budget {
            self.page_timers(ctx)?;
            let round = self.round();
            while self.ready.len() < round {
                match self.merge.pop() {
                    Some(r) => self.ready.push_back(r),
                    None => break,
                }
            }
            let until = self.timers_until();
            let due_any = self.timers.peek_due(until).is_some()
                || self.cache.lock().peek_due(until).is_some();
            if self.ready.is_empty() && !due_any {
                break;
            }
            self.load_round(ctx)?;
            let applied = self.apply_round(ctx)?;
            done += applied.max(1);
            if applied == 0 && self.ready.is_empty() {
                break;
            }
            // Over the memory limit after a round: evict now, and if
            // changed leads still keep the shard over it, stop until they
            // are written (the worker writes at once for a shard over its
            // limit), rather than take in a whole budget's leads more.
            if self.cache.lock().over_limit() {
                self.evict(ctx.stats);
                if self.cache.lock().over_limit() {
                    break;
                }
            }
        }
        self.evict(ctx.stats);
        Ok(done)
    }

    /// Most events a round takes: [`ShardConfig::round`], or as many as the
    /// shard may hold leads if that is fewer (at least [`MIN_ROUND`]). A
    /// round's leads are all in memory while it runs, and the ones it
    /// changed until they are written, so a round larger than the cache
    /// would carry the shard far past its limit. Timers keep the full
    /// round: a round of them per write would make a small cache fire a
    /// backlog of paged timers one write at a time.
    fn round(&self) -> usize {
        let allowed = self.cache.lock().leads_allowed();
        self.config.round.min(allowed.max(MIN_ROUND))
    }

    /// When every input is idle, moves the shard's clock with the wall clock
    /// (less the allowed lateness) so that quiet leads still decay, and fires
    /// what falls due.
    pub fn idle_tick(
        &mut self,
        ctx: &mut Ctx<'_>,
        wall: Millis,
        budget: usize,
    ) -> Result<usize, ShardError> {
        if !self.merge.all_idle() || !self.ready.is_empty() {
            return Ok(0);
        }
        let target = wall.saturating_sub(self.config.allowed_lateness_ms);
        if target > self.clock {
            if target.saturating_sub(self.clock) > 60_000 {
                tracing::debug!(
                    shard = self.id,
                    from = self.clock,
                    to = target,
                    "All inputs idle: the shard's clock follows the wall clock."
                );
            }
            self.clock = target;
        }
        self.step(ctx, budget)
    }

    fn page_timers(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ShardError> {
        let horizon = self.timers_until();
        let mut limit = self.config.timer_page.max(1);
        while let Some(after) = self.timers.needs_page(horizon) {
            let page = ctx.store.timers(self.id, after, limit)?;
            let cache = self.cache.lock();
            if !self
                .timers
                .add_page(after, limit, page, |k| cache.contains(k))
            {
                limit = limit.saturating_mul(2);
            }
        }
        Ok(())
    }

    /// Loads, in as few round trips as identity allows, every lead the ready
    /// items and the timers due before them need.
    fn load_round(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ShardError> {
        self.absent.clear();
        let until = self.timers_until();
        let mut wanted = std::mem::take(&mut self.wanted);
        wanted.clear();
        {
            let cache = self.cache.lock();
            for (_, key) in self.timers.due(until, self.config.round) {
                if cache.find_str(key.as_str()).is_none() && !wanted.contains(key.as_str()) {
                    wanted.insert(key.clone());
                }
            }
            // The ready items' keys, looked up together; a shared key is
            // made only for one the cache does not hold.
            let lookups = &mut self.lookups;
            lookups.clear();
            for r in &self.ready {
                let (lead, visitor) = match &r.item {
                    Item::Event(e) => (e.lead_id(), e.anonymous_id()),
                    Item::Erase(id) => (Some(&**id), None),
                    Item::Poison(_) => (None, None),
                };
                lookups.lead(lead);
                lookups.visitor(visitor);
            }
            cache.find_all(lookups, &mut self.hints);
            for (i, slot) in self.hints.iter().enumerate() {
                let k = lookups.get(i);
                if slot.is_none() && !k.is_empty() && !wanted.contains(k) {
                    wanted.insert(LeadKey::from_stored(k));
                }
            }
        }
        let keys: Vec<LeadKey> = wanted.drain().collect();
        self.wanted = wanted;
        self.load(ctx, &keys)?;
        // Visitors that turned out to be aliases need their lead too.
        let mut second = KeySet::default();
        {
            let mut cache = self.cache.lock();
            let keys = &mut self.keys;
            for r in &self.ready {
                if let Item::Event(e) = &r.item
                    && e.lead_id().is_none()
                    && let Some(anon) = e.anonymous_id()
                    && let Some(slot) = cache.find_str(keys.visitor(anon))
                    && let Some(entry) = cache.touch(slot)
                    && let Some(lead) = LeadState::alias_target(entry.blob())
                {
                    let k = keys.lead(lead);
                    if cache.find_str(k).is_none() && !second.contains(k) {
                        second.insert(LeadKey::from_stored(k));
                    }
                }
            }
        }
        let second: Vec<LeadKey> = second.into_iter().collect();
        self.load(ctx, &second)
    }

    fn load(&mut self, ctx: &mut Ctx<'_>, keys: &[LeadKey]) -> Result<(), ShardError> {
        if keys.is_empty() {
            return Ok(());
        }
        // A key deleted here (expired, erased) whose deletion is not written
        // yet is gone, whatever the store still holds: loaded back, a lead
        // that expired was expired again, and its segment counted out twice
        // (a user probe: negative populations with a small cache and retention).
        let mut refs: Vec<&LeadKey> = Vec::with_capacity(keys.len());
        for key in keys {
            if self.unwritten_deletes.contains(key) {
                self.absent.insert(key.clone());
            } else {
                refs.push(key);
            }
        }
        if refs.is_empty() {
            return Ok(());
        }
        ctx.stats.misses += refs.len() as u64;
        let loaded = match ctx.store.load(self.id, self.epoch, &refs)? {
            Ok(v) => v,
            Err(outcome) => {
                return Err(ShardError::Fenced {
                    shard: self.id,
                    outcome,
                });
            }
        };
        // A state under a layout this member has not seen was written by a
        // member running other rules (a rolling rules change): that member
        // stored its layout at start, so read the layouts again before
        // decoding rather than reading the state as unknown.
        if loaded
            .iter()
            .flatten()
            .any(|l| LeadState::stored_layout(&l.state).is_ok_and(|h| !ctx.engine.knows_layout(h)))
        {
            ctx.engine.learn_layouts(ctx.store.layouts()?);
        }
        let due_by = self.timers_until();
        let mut cache = self.cache.lock();
        for (key, found) in refs.into_iter().zip(loaded) {
            let Some(found) = found else {
                self.absent.insert(key.clone());
                continue;
            };
            // A state written under other rules is remapped as it decodes and
            // counts as changed, so the next write stores it under these rules.
            match ctx.engine.decode_into(&found.state, &mut self.state) {
                Ok(remapped) => {
                    let timer = ctx.engine.next_transition(&self.state);
                    let blob = if remapped {
                        ctx.engine.encode(&self.state, &mut self.buf);
                        &self.buf[..]
                    } else {
                        &found.state[..]
                    };
                    cache.put_loaded(key, blob, (timer, found.timer), remapped, due_by);
                    self.timers.forget(key.as_str());
                }
                Err(error) => {
                    tracing::warn!(%error, shard = self.id, "Stored lead state unreadable; the lead starts afresh.");
                    self.absent.insert(key.clone());
                }
            }
        }
        Ok(())
    }

    fn apply_round(&mut self, ctx: &mut Ctx<'_>) -> Result<usize, ShardError> {
        // The clock never passes the wall clock plus the future tolerance
        // (read once per round: a round takes milliseconds).
        let ceiling = crate::event::wall_clock_ms().saturating_add(self.config.future_tolerance_ms);
        let mut applied = 0;
        let mut fired = 0;
        // Items taken from the front since the round's lookup (see [`Shard::hints`]).
        let mut taken = 0;
        // Items before this one had their slots checked again (RECHECK).
        let mut rechecked = 0;
        while let Some(r) = self.ready.front() {
            // Timers due before the event fire first, at their own instants
            // (only those: an event behind the clock must not find the
            // timers its batch set after it already fired); stop the round
            // if one needs a lead this round did not load.
            if let Some(at) = r.at
                && !self.fire_due(ctx, at, &mut fired)?
            {
                return Ok(applied + fired);
            }
            let r = self.ready.front().expect("peeked above");
            let (input, offset, at, late) = (r.input, r.offset, r.at, r.late);
            match &r.item {
                Item::Poison(poison) => {
                    let Poison {
                        key,
                        payload,
                        original_size,
                        original_hash,
                        error,
                    } = &**poison;
                    ctx.sink.dead_letter(&DeadLetter {
                        topic: &self.topics[input],
                        partition: self.id,
                        offset,
                        key: key.as_deref(),
                        payload: payload.as_deref(),
                        original_size: *original_size,
                        original_hash: original_hash.as_deref(),
                        error,
                    })?;
                    *ctx.stats.dead.entry((input, error.kind())).or_default() += 1;
                }
                Item::Erase(lead) => {
                    let lead = lead.clone();
                    self.erase(ctx, &lead, at.unwrap_or(self.clock));
                }
                Item::Event(_) => {
                    let behind = !late && at.is_some_and(|t| t < self.clock);
                    if let Some(t) = at.map(|t| t.min(ceiling)) {
                        self.clock = self.clock.max(t);
                        self.last_at = t;
                    }
                    let r = self.ready.pop_front().expect("peeked above");
                    let Item::Event(event) = r.item else {
                        unreachable!("matched above")
                    };
                    if taken >= rechecked {
                        rechecked = taken + RECHECK;
                        let range = 2 * taken..2 * rechecked;
                        (self.cache.lock()).recheck(&self.lookups, &mut self.hints, range);
                    }
                    let hint = |i: usize| self.hints.get(i).copied().flatten();
                    let hints = (hint(2 * taken), hint(2 * taken + 1));
                    taken += 1;
                    let e = event.event_in(std::mem::take(&mut self.attributes));
                    let applied_event = self.apply_event(ctx, input, &e, hints);
                    self.attributes = e.into_spare();
                    match applied_event {
                        // Late counts what the late event changed: once, and
                        // not for a duplicate, which changed nothing.
                        Ok(counted) => {
                            if late && counted {
                                *ctx.stats.late.entry(input).or_default() += 1;
                            }
                            if behind && counted {
                                *ctx.stats.behind_clock.entry(input).or_default() += 1;
                            }
                        }
                        Err(e) => {
                            // Not applied: put it back in front, untouched.
                            self.ready.push_front(Released {
                                input,
                                offset,
                                at,
                                late,
                                item: Item::Event(event),
                            });
                            return Err(e);
                        }
                    }
                    self.positions[input] = Some(offset + 1);
                    if let Some(t) = at {
                        self.seen[input] = self.seen[input].max(t);
                    }
                    applied += 1;
                    continue;
                }
            }
            self.ready.pop_front();
            taken += 1;
            self.positions[input] = Some(offset + 1);
            applied += 1;
        }
        // Nothing left to apply: timers due by the horizon.
        self.fire_due(ctx, self.timer_horizon(), &mut fired)?;
        Ok(applied + fired)
    }

    /// How far timers may fire once the events released so far are applied.
    /// When every input is idle, the clock (which then follows the wall
    /// clock, so quiet leads decay). While events still come, no further
    /// than the last event applied: a batch behind the clock (a backfill
    /// after a quiet spell, a late event) then has its leads' timers fire
    /// between its events in event-time order, as the same batch would
    /// have had them before the quiet spell, not all at once after its
    /// first event. In order, the last event is the clock, so live traffic
    /// fires timers exactly as far as before.
    fn timer_horizon(&self) -> Millis {
        if self.merge.all_idle() {
            self.clock
        } else {
            self.clock.min(self.last_at)
        }
    }

    /// The latest due time a round may fire a timer at: before the last
    /// ready event, or the horizon after it.
    fn timers_until(&self) -> Millis {
        self.ready
            .iter()
            .filter_map(|r| r.at)
            .max()
            .unwrap_or(NEVER)
            .max(self.timer_horizon())
    }

    /// Fires the timers due by `until`, earliest first, each at its own
    /// instant, counting them in `fired`. Returns false if it stopped before
    /// the last: one needs a lead this round did not load, or the round's
    /// share of timers is used up.
    fn fire_due(
        &mut self,
        ctx: &mut Ctx<'_>,
        until: Millis,
        fired: &mut usize,
    ) -> Result<bool, ShardError> {
        loop {
            let held = self.cache.lock().peek_due(until);
            let paged = self.timers.peek_due(until).map(|(t, _)| t);
            // The earlier of the two, a lead held first at the same instant.
            let held = held.filter(|(due, _)| paged.is_none_or(|t| *due <= t));
            match (held, paged) {
                (None, None) => return Ok(true),
                (Some((due, slot)), _) => {
                    if *fired >= self.config.round {
                        return Ok(false);
                    }
                    let mut key = std::mem::take(&mut self.firing);
                    {
                        let mut cache = self.cache.lock();
                        key.clear();
                        key.push_str(
                            cache
                                .key_at(slot)
                                .expect("a live timer's slot holds its lead"),
                        );
                        cache.take_due(due, slot);
                    }
                    self.clock = self.clock.max(due);
                    let done = self.fire(ctx, (&key, Some(slot)), due);
                    self.firing = key;
                    done?;
                    *fired += 1;
                }
                (None, Some(due)) => {
                    let (_, key) = self.timers.peek_due(due).expect("peeked above");
                    // A timer from the store's pages whose lead is held now
                    // (the cache's timer is authoritative), or was not in
                    // the store when the round loaded and was not created
                    // since: stale. Otherwise its lead was not loaded.
                    if !self.cache.lock().contains(key) && !self.absent.contains(key) {
                        return Ok(false);
                    }
                    self.timers.pop_due(due);
                }
            }
        }
    }

    /// Decodes a cached lead (its key as stored text, and where the round's
    /// lookup found it) into `into`. Every key a round needs was loaded (or
    /// found absent from the store) before it ran, so a key absent from the
    /// cache is a new lead.
    fn read(
        cache: &Mutex<LeadCache>,
        engine: &Engine,
        (key, hint): (&str, Option<u32>),
        kind: Kind,
        into: &mut LeadState,
    ) -> Option<u32> {
        let mut cache = cache.lock();
        let found = cache.find_hinted(hint, key).filter(|slot| {
            cache
                .touch(*slot)
                .is_some_and(|e| engine.decode_into(e.blob(), into).is_ok())
        });
        if found.is_none() {
            into.reset(kind);
        }
        found
    }

    /// Stores a lead's state back (`slot`: where it was read from, if it was).
    fn store_state(&mut self, engine: &Engine, key: &str, which: Which, slot: Option<u32>) {
        let state = match which {
            Which::Main => &self.state,
            Which::Other => &self.other,
        };
        let timer = engine.next_transition(state);
        engine.encode(state, &mut self.buf);
        self.cache.lock().put_at(slot, key, &self.buf, timer);
        if slot.is_none() {
            // Held now: the cache has its timer.
            self.timers.forget(key);
        }
    }

    fn delete(&mut self, key: &str) {
        self.cache.lock().remove(key);
        self.timers.forget(key);
        let key = LeadKey::from_stored(key);
        self.unwritten_deletes.insert(key.clone());
        self.deletes.insert(key);
    }

    fn count_segment(&mut self, rules: &crate::engine::Rules, segment: Segment, delta: i64) {
        add_population(&mut self.population, segment.name(rules), delta);
        self.population_dirty = true;
    }

    /// Applies one released event; false if it was a duplicate (skipped).
    /// `hints`: where the round's lookup found its lead and its visitor.
    fn apply_event(
        &mut self,
        ctx: &mut Ctx<'_>,
        input: usize,
        e: &Event<'_>,
        hints: (Option<u32>, Option<u32>),
    ) -> Result<bool, ShardError> {
        let engine = ctx.engine;
        let rules = engine.rules().clone();
        if e.kind == EventType::ErasureRequested {
            if let Some(id) = e.lead_id.as_deref() {
                self.erase(ctx, id, e.occurred_at);
            }
            *ctx.stats.consumed.entry((input, e.kind)).or_default() += 1;
            return Ok(true);
        }
        if !self.erased.is_empty() && self.erased_after(e) {
            ctx.stats.after_erasure += 1;
            return Ok(false);
        }
        // Identity: the visitor's stored state decides where the event goes.
        let visitor_slot = match e.anonymous_id.as_deref() {
            Some(anon) => Self::read(
                &self.cache,
                engine,
                (self.keys.visitor(anon), hints.1),
                Kind::Visitor,
                &mut self.other,
            ),
            None => None,
        };
        let has_visitor = visitor_slot.is_some();
        let route = identity::route(e, has_visitor.then_some(&self.other));
        let (kind, publish) = match &route {
            Route::Lead { .. } | Route::Aliased { .. } => (Kind::Lead, true),
            Route::Visitor { .. } => (Kind::Visitor, false),
        };
        let stored = match &route {
            Route::Lead { id, .. } => (self.keys.lead(id), hints.0),
            Route::Visitor { anon } => (self.keys.visitor(anon), hints.1),
            Route::Aliased { lead, .. } => (self.keys.lead(lead), None),
        };
        let mut state = std::mem::replace(&mut self.state, LeadState::new(Kind::Lead));
        let slot = Self::read(&self.cache, engine, stored, kind, &mut state);
        let stored = stored.0;
        if slot.is_some() {
            ctx.stats.hits += 1;
        }
        if engine.is_duplicate(&state, e) {
            self.state = state;
            *ctx.stats.duplicates.entry(input).or_default() += 1;
            return Ok(false);
        }
        // Whether the lead is counted in a segment yet: before a visitor's
        // history is merged into it, which makes a new lead look old.
        let was_new = state.is_new();
        // The key outlives `stored` (the lookup buffer is written again below).
        let mut key = std::mem::take(&mut self.current);
        key.clear();
        key.push_str(stored);
        // Link the anonymous id: merge a visitor's history once, then alias it.
        if let Route::Lead {
            id,
            link: Some((anon, link)),
        } = &route
        {
            let touch =
                |alias: &LeadState| alias.last_event_at < e.occurred_at.saturating_sub(3_600_000);
            let write_alias = match link {
                Link::Merge => {
                    engine.merge_visitor(&mut state, &self.other, anon);
                    true
                }
                Link::Create | Link::Repoint => true,
                Link::Already => touch(&self.other),
            };
            if write_alias {
                let mut alias = LeadState::new(Kind::Alias((*id).to_owned()));
                alias.as_of = e.occurred_at;
                alias.last_event_at = e.occurred_at;
                if !state.linked.iter().any(|a| a == anon) && state.linked.len() < 32 {
                    state.linked.push((*anon).to_owned());
                }
                self.other = alias;
                let vkey = LeadKey::visitor(anon);
                self.store_state(engine, vkey.as_str(), Which::Other, visitor_slot);
            }
        }
        if let (Route::Aliased { .. }, Some(anon)) = (&route, e.anonymous_id.as_deref())
            && self.other.last_event_at < e.occurred_at.saturating_sub(3_600_000)
        {
            self.other.last_event_at = e.occurred_at;
            self.other.as_of = self.other.as_of.max(e.occurred_at);
            let vkey = LeadKey::visitor(anon);
            self.store_state(engine, vkey.as_str(), Which::Other, visitor_slot);
        }
        let before = Segment::of(&state);
        self.decisions.clear();
        let applied = engine.apply(&mut state, e, &mut self.decisions);
        *ctx.stats.consumed.entry((input, e.kind)).or_default() += 1;
        if let Applied::Applied { segment_before, .. } = applied
            && publish
        {
            record_engagement(ctx, &rules, &state, e, segment_before);
        }
        let expired = self
            .decisions
            .iter()
            .any(|d| matches!(d, Decision::Expire { .. }));
        if publish {
            if expired && !was_new {
                self.count_segment(&rules, before, -1);
            }
            if (was_new || expired) && !state.is_new() {
                // A new lead starts in the lowest tier; the changes published
                // below move it on.
                self.count_segment(&rules, Segment::Tier(0), 1);
            }
        }
        self.state = state;
        self.store_state(engine, &key, Which::Main, slot);
        let published = match LeadKey::lead_id(&key) {
            Some(id) if publish => self.publish(ctx, id),
            _ => Ok(()),
        };
        self.current = key;
        published.map(|()| true)
    }

    /// Fires one lead's due timer (its key, and the slot it is held in).
    fn fire(
        &mut self,
        ctx: &mut Ctx<'_>,
        (key, hint): (&str, Option<u32>),
        due: Millis,
    ) -> Result<(), ShardError> {
        let engine = ctx.engine;
        let rules = engine.rules().clone();
        let lead = LeadKey::lead_id(key);
        let kind = if lead.is_some() {
            Kind::Lead
        } else {
            Kind::Visitor
        };
        let Some(slot) = Self::read(&self.cache, engine, (key, hint), kind, &mut self.state) else {
            return Ok(());
        };
        let mut state = std::mem::replace(&mut self.state, LeadState::new(Kind::Lead));
        let before = Segment::of(&state);
        self.decisions.clear();
        engine.advance(&mut state, due, &mut self.decisions);
        let expired = state.is_new();
        self.state = state;
        if expired {
            ctx.stats.expired += 1;
            if lead.is_some() {
                self.count_segment(&rules, before, -1);
            }
            self.delete(key);
            return Ok(());
        }
        self.store_state(engine, key, Which::Main, Some(slot));
        if let Some(id) = lead {
            self.publish(ctx, id)?;
        }
        Ok(())
    }

    /// Whether the event's lead or visitor was erased at or after its time.
    /// Runs for every event once the shard holds a marker: the keys are
    /// written into the lookup buffer, not allocated.
    fn erased_after(&mut self, e: &Event<'_>) -> bool {
        let lead = e
            .lead_id
            .as_deref()
            .map(|id| erasure_hash(self.keys.lead(id)));
        let visitor = e
            .anonymous_id
            .as_deref()
            .map(|anon| erasure_hash(self.keys.visitor(anon)));
        [lead, visitor].into_iter().flatten().any(|hash| {
            self.erased
                .get(&hash)
                .is_some_and(|at| e.occurred_at <= *at)
        })
    }

    /// Marks `key` erased at `at`: its events dated at or before then are
    /// dropped from now on.
    fn mark_erased(&mut self, key: &LeadKey, at: Millis) {
        let hash = erasure_hash(key.as_str());
        let at = self.erased.get(&hash).map_or(at, |t| (*t).max(at));
        self.erased.insert(hash, at);
        self.erasures.insert(hash, Some(at));
    }

    /// Forgets the markers older than the retention (silent leads are
    /// forgotten then too): swept at each erasure.
    fn forget_old_erasures(&mut self, retention: Option<Millis>) {
        let Some(retention) = retention else {
            return;
        };
        let clock = self.clock;
        let old: Vec<u64> = self
            .erased
            .iter()
            .filter(|(_, at)| at.saturating_add(retention) < clock)
            .map(|(h, _)| *h)
            .collect();
        for hash in old {
            self.erased.remove(&hash);
            self.erasures.insert(hash, None);
        }
    }

    /// Removes a lead and the anonymous ids linked to it, everywhere this
    /// shard keeps them, and remembers the erasure (see [`Shard::erased_after`]).
    fn erase(&mut self, ctx: &mut Ctx<'_>, lead: &str, at: Millis) {
        self.forget_old_erasures(ctx.engine.config().retention_ms);
        let engine = ctx.engine;
        let rules = engine.rules().clone();
        let key = LeadKey::lead(lead);
        if Self::read(
            &self.cache,
            engine,
            (key.as_str(), None),
            Kind::Lead,
            &mut self.state,
        )
        .is_some()
        {
            let segment = Segment::of(&self.state);
            self.count_segment(&rules, segment, -1);
            let linked = std::mem::take(&mut self.state.linked);
            for anon in &linked {
                let visitor = LeadKey::visitor(anon);
                self.delete(visitor.as_str());
                self.mark_erased(&visitor, at);
            }
            // Only where the lead was held: its own events come here (an
            // erasure reaches every partition, and most hold nothing of it).
            self.mark_erased(&key, at);
            // A state erased, not a request.
            ctx.stats.erased += 1;
        }
        self.delete(key.as_str());
    }

    fn publish(&mut self, ctx: &mut Ctx<'_>, lead: &str) -> Result<(), ShardError> {
        let rules = ctx.engine.rules().clone();
        for d in &self.decisions {
            match d {
                Decision::Change(c) => {
                    let (from, to) = (c.from.name(&rules), c.to.name(&rules));
                    count(
                        &mut ctx.stats.changes,
                        Borrowed((from, to, c.reason.as_str())),
                        |Borrowed((from, to, reason))| (from.to_owned(), to.to_owned(), reason),
                    );
                    if c.from != c.to {
                        add_population(&mut self.population, from, -1);
                        add_population(&mut self.population, to, 1);
                        self.population_dirty = true;
                    }
                }
                Decision::Handoff(_) => ctx.stats.handoffs += 1,
                Decision::Expire { .. } => continue,
            }
            ctx.encoder
                .encode_into(ctx.engine, lead, d, &mut self.record);
            ctx.sink.send(&self.record)?;
        }
        Ok(())
    }

    fn evict(&mut self, stats: &mut StepStats) {
        let timers = &mut self.timers;
        let n = self
            .cache
            .lock()
            .evict(|key, stored| timers.evicted(key, stored));
        stats.evicted += n as u64;
    }

    /// Whether anything awaits a write.
    pub fn has_changes(&self) -> bool {
        self.cache.lock().dirty_len() > 0 || !self.deletes.is_empty() || self.population_dirty
    }

    /// Takes everything changed since the last write, with the positions,
    /// clock and merge progress it covers.
    pub fn prepare_write(&mut self) -> (ShardWrite, Pending) {
        let mut write = ShardWrite {
            shard: self.id,
            epoch: self.epoch,
            seq: self.seq,
            leads: std::mem::take(&mut self.spare.leads),
            states: std::mem::take(&mut self.spare.states),
            ..ShardWrite::default()
        };
        let slots = self.cache.lock().take_dirty(self.clock, &mut write);
        let mut deletes = std::mem::take(&mut self.deletes);
        for lead in &write.leads {
            // Made again since its deletion: this write stores it.
            deletes.remove(&lead.key);
            self.unwritten_deletes.remove(&lead.key);
        }
        let deletes: Vec<LeadKey> = deletes.into_iter().collect();
        let written = write
            .leads
            .iter()
            .map(|l| (l.key.clone(), l.timer))
            .collect();
        write.deletes = deletes.clone();
        write.positions = self
            .topics
            .iter()
            .zip(&self.positions)
            .filter_map(|(t, p)| p.map(|p| (t.to_string(), p)))
            .collect();
        write.seen = self
            .topics
            .iter()
            .zip(&self.seen)
            .filter(|(_, s)| **s != NEVER)
            .map(|(t, s)| (t.to_string(), *s))
            .collect();
        write.clock = (self.clock != NEVER).then_some(self.clock);
        write.released = (self.merge.released() != NEVER).then(|| self.merge.released());
        write.population = self
            .population
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        self.population_dirty = false;
        let erasures: Vec<(u64, Option<Millis>)> = self.erasures.drain().collect();
        write.erasures = erasures.clone();
        (
            write,
            Pending {
                leads: written,
                slots,
                deletes,
                erasures,
            },
        )
    }

    /// Takes back a finished write's buffers for the next one.
    pub fn recycle(&mut self, mut write: ShardWrite) {
        write.leads.clear();
        write.states.clear();
        self.spare = Spare {
            leads: write.leads,
            states: write.states,
        };
    }

    /// Accounts for a finished write: on failure, what it carried is pending again.
    pub fn write_done(&mut self, pending: Pending, ok: bool) {
        if ok {
            self.seq += 1;
        }
        let mut cache = self.cache.lock();
        cache.written(&pending.leads, &pending.slots, ok);
        if ok {
            for d in &pending.deletes {
                // Unless deleted again since (then pending again).
                if !self.deletes.contains(d) {
                    self.unwritten_deletes.remove(d);
                }
            }
        } else {
            for d in pending.deletes {
                if !cache.contains(&d) {
                    self.deletes.insert(d);
                }
            }
            // Written again with the next write, unless changed since.
            for (hash, at) in pending.erasures {
                self.erasures.entry(hash).or_insert(at);
            }
            self.population_dirty = true;
        }
    }

    /// Drops everything held (the shard was given up or fenced); returns
    /// how many messages it held unapplied.
    pub fn clear(&mut self) -> usize {
        let ready = self.ready.len();
        self.ready.clear();
        ready + self.merge.clear()
    }
}

#[derive(Clone, Copy)]
enum Which {
    Main,
    Other,
}

/// Whether a message is keyed so that its lead's events stay in one
/// partition: an event with a lead id by that id (its plain UTF-8 bytes).
/// A lead's event keyed otherwise (an email, a session id, its cookie)
/// can land in another partition than the lead's other events, and an
/// event with no key wherever the partitioner puts it; either way the lead
/// gets a state in each partition. A visitor's event (no lead id) may have
/// any key: its anonymous id, or a tracker's stable user key that keeps it
/// beside its future lead; which one cannot be told from the event.
fn keyed_by_its_lead(key: Option<&[u8]>, e: &Event<'_>) -> bool {
    match (key, e.lead_id.as_deref()) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(key), Some(lead)) => lead.as_bytes() == key,
    }
}

/// Adds `delta` to a segment's population (allocating its name only once).
fn add_population(population: &mut HashMap<String, i64>, segment: &str, delta: i64) {
    match population.get_mut(segment) {
        Some(n) => *n += delta,
        None => {
            population.insert(segment.to_owned(), delta);
        }
    }
}

/// Counts an engagement event by the lead's segment at that moment, its
/// channel and its first-touch source.
fn record_engagement(
    ctx: &mut Ctx<'_>,
    rules: &crate::engine::Rules,
    s: &LeadState,
    e: &Event<'_>,
    segment: Segment,
) {
    let event = match e.kind {
        EventType::Delivered => "delivered",
        EventType::Open => "open",
        EventType::Click if e.source == Source::Email => "click",
        EventType::Reply => "reply",
        EventType::Unsubscribe => "unsubscribe",
        EventType::BookingStarted => "booking_started",
        EventType::BookingCompleted => "booking_completed",
        EventType::Purchase => "purchase",
        EventType::Conversion => "conversion",
        _ => return,
    };
    let channel = match e.source {
        Source::Email => e
            .channel
            .as_deref()
            .unwrap_or_else(|| rules.channels[0].as_str()),
        Source::Web => "web",
        Source::Adpixel => "ads",
        Source::Crm => "crm",
    };
    let source = rules.source_label(s.first_touch.as_ref().map(|f| f.source.as_str()));
    count(
        &mut ctx.stats.engagement,
        Borrowed((event, channel, segment.name(rules), source)),
        |Borrowed((event, channel, segment, source))| {
            (
                event,
                channel.to_owned(),
                segment.to_owned(),
                source.to_owned(),
            )
        },
    );
}
