//! Durable state behind the shards: one trait, with a Redis implementation
//! (a single server or a Redis Cluster) and an in-memory one for the demo,
//! `replay` and tests.
//!
//! Everything of one shard (its leads, timers, positions, clock and owner
//! epoch) lives under one hash tag, `{p<shard>}`, so that each shard's write
//! is one atomic step, also on a Redis Cluster, and shards never share one.
//!
//! Ownership is fenced: taking a shard increments its owner epoch, and every
//! write checks that the epoch is still the writer's and that no position
//! moves backwards. A member that was paused or cut off while another took its
//! shard over therefore writes nothing when it resumes.

pub mod memory;
pub mod redis;
mod resp;

use std::collections::HashMap;

use crate::engine::layout::Layout;
use crate::event::Millis;
use crate::shard::cache::LeadKey;

/// A shard: the partition number shared by the co-partitioned input topics.
pub type ShardId = i32;

/// Why a store call failed. Every variant but [`StoreError::Config`] is retryable:
/// keep the offsets, back off, retry.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused or dropped the call, or did not answer in time. Not
    /// a `source`: the message already holds its words, and a timeout's
    /// would add the operating system's "os error 11" to every report.
    #[error("redis: {}", redis_reason(.0))]
    Redis(::redis::RedisError),
    /// Redis answered something this version cannot read.
    #[error("unexpected reply from the store: {0}")]
    Reply(String),
    /// The store's configuration makes it unsafe to use (not retryable).
    #[error("{0}")]
    Config(String),
}

/// What went wrong, in words: a call that timed out says so (the operating
/// system's words for a read that timed out are "Resource temporarily
/// unavailable").
fn redis_reason(e: &::redis::RedisError) -> String {
    if e.is_timeout() {
        "no answer within redis.timeout_ms".into()
    } else {
        e.to_string()
    }
}

impl From<::redis::RedisError> for StoreError {
    fn from(e: ::redis::RedisError) -> Self {
        StoreError::Redis(e)
    }
}

impl StoreError {
    /// Whether retrying may help.
    pub fn retryable(&self) -> bool {
        !matches!(self, StoreError::Config(_))
    }
}

/// What the store knows of a shard when it is taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardMeta {
    /// The owner epoch just taken.
    pub epoch: u64,
    /// The shard's write sequence (see [`ShardWrite::seq`]).
    pub seq: u64,
    /// Whether no position was ever stored for the shard. Offsets are
    /// committed only after positions are durable, so a fresh shard whose
    /// partition has committed offsets lost its state; this stays true on
    /// every later take until positions are written again.
    pub fresh: bool,
    /// Next offset to read, per input topic.
    pub positions: HashMap<String, i64>,
    /// Largest event time applied, per input topic.
    pub seen: HashMap<String, Millis>,
    /// The shard's event-time clock.
    pub clock: Option<Millis>,
    /// Largest event time the merge released.
    pub released: Option<Millis>,
    /// Leads per segment name.
    pub population: HashMap<String, i64>,
    /// Erasure markers: per erased key (as [`erasure_hash`] of it), the
    /// erasure's time. Events of the key dated at or before it are dropped,
    /// so a producer's retry or a late event does not bring the person back.
    pub erased: HashMap<u64, Millis>,
}

/// The hash an erasure marker is kept under: the key's own text is not
/// kept after its erasure.
pub fn erasure_hash(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

/// The shard record's field of an erasure marker.
pub fn erasure_field(hash: u64) -> String {
    format!("erased:{hash:016x}")
}

/// Everything one shard writes at once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardWrite {
    /// The shard.
    pub shard: ShardId,
    /// The writer's owner epoch: the write happens only if it is still current.
    pub epoch: u64,
    /// The shard's write sequence the stored record must be at (the number
    /// of writes this owner's record has taken); the write sets `seq + 1`.
    /// A record behind it lost writes that were acknowledged (a failover to a
    /// replica that had not received them, an append-only file cut short).
    pub seq: u64,
    /// Changed leads.
    pub leads: Vec<LeadWrite>,
    /// The changed leads' states, end to end: each [`LeadWrite`] names its
    /// bytes here (one buffer per write, reused by the next, rather than an
    /// allocation per lead).
    pub states: Vec<u8>,
    /// Deleted leads (merged visitors, expired, erased).
    pub deletes: Vec<LeadKey>,
    /// Next offset to read, per input topic.
    pub positions: Vec<(String, i64)>,
    /// Largest event time applied, per input topic.
    pub seen: Vec<(String, Millis)>,
    /// The shard's event-time clock.
    pub clock: Option<Millis>,
    /// Largest event time the merge released.
    pub released: Option<Millis>,
    /// Changes of the number of leads per segment name.
    pub population: Vec<(String, i64)>,
    /// Erasure markers set (with the erasure's time) or forgotten (`None`:
    /// older than the retention).
    pub erasures: Vec<(u64, Option<Millis>)>,
}

/// One changed lead of a shard's write.
#[derive(Debug, Clone, PartialEq)]
pub struct LeadWrite {
    /// Its key.
    pub key: LeadKey,
    /// Where its state, in the compact binary form, is in [`ShardWrite::states`].
    pub state: std::ops::Range<usize>,
    /// What happens to its timer in the store.
    pub timer: TimerWrite,
}

impl ShardWrite {
    /// A lead's state in this write.
    pub fn state(&self, lead: &LeadWrite) -> &[u8] {
        &self.states[lead.state.clone()]
    }

    /// Adds a changed lead.
    pub fn push_lead(&mut self, key: LeadKey, state: &[u8], timer: TimerWrite) {
        let start = self.states.len();
        self.states.extend_from_slice(state);
        self.leads.push(LeadWrite {
            key,
            state: start..self.states.len(),
            timer,
        });
    }
}

/// What a write does to a lead's stored timer.
///
/// The stored timers exist for leads that are not in memory: a restart, or
/// a lead evicted from the cache, finds its next timer there a page at a
/// time. A stored timer may be *earlier* than the lead's next transition:
/// it then fires a lead that has nothing due, which only reads it and puts
/// the right timer in memory. So a write leaves the stored timer alone when
/// the new one is later and the stored one has not been paged yet (the
/// usual case: points added push the next decay further out), which spares
/// Redis a sorted-set update per lead per write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerWrite {
    /// Stores this instant.
    Set(Millis),
    /// Removes the stored timer (time alone will never change the lead).
    Clear,
    /// Leaves the stored timer as it is (no later than the lead's next
    /// transition, and not yet paged).
    Keep,
}

/// A lead read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Its state in the compact binary form.
    pub state: Vec<u8>,
    /// The timer the store holds for it.
    pub timer: Option<Millis>,
}

/// Whether a record at write sequence `stored` takes a write made at `seq`:
/// it is at `seq`, or already at `seq + 1` when the same write was applied
/// but its answer lost and it is sent again (a write sets absolute values
/// only). The Redis Cluster script checks the same rule in Lua.
pub(crate) fn takes_write(stored: u64, seq: u64) -> bool {
    stored == seq || stored == seq + 1
}

/// The result of one shard's write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Written.
    Ok,
    /// Not written: another member owns the shard now (its epoch).
    Fenced(u64),
    /// Not written: a position would have moved backwards.
    Backwards(String),
    /// Not written: the shard's record is gone (the store was flushed or
    /// failed over to an empty replica).
    Lost,
    /// Not written: the record's write sequence is not the one this owner
    /// left (the stored one): the store lost acknowledged writes.
    Diverged(u64),
}

/// What a store check at start-up found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Problems that make the store unsafe (leadscore refuses to start).
    pub refuse: Vec<String>,
    /// Problems worth a warning.
    pub warn: Vec<String>,
}

/// Durable state of the shards.
pub trait Store: Send + Sync {
    /// Takes a shard: increments and returns its owner epoch with what is stored.
    fn take_shard(&self, shard: ShardId) -> Result<ShardMeta, StoreError>;
    /// Loads leads of a shard with their stored timers (`None` where
    /// absent), checking that `epoch` still owns it (else the result is
    /// `Err(Written::…)` as `Ok(Err(..))`).
    fn load(
        &self,
        shard: ShardId,
        epoch: u64,
        keys: &[&LeadKey],
    ) -> Result<Result<Vec<Option<Loaded>>, Written>, StoreError>;
    /// Up to `limit` timers of a shard due after `after` (exclusive), earliest first.
    fn timers(
        &self,
        shard: ShardId,
        after: Millis,
        limit: usize,
    ) -> Result<Vec<(LeadKey, Millis)>, StoreError>;
    /// Writes shards, each atomically and fenced by its epoch.
    fn write(&self, writes: &[ShardWrite]) -> Result<Vec<Written>, StoreError>;
    /// Reads a lead from whichever of `shards` holds it (for the HTTP surface).
    fn find(
        &self,
        key: &LeadKey,
        shards: &[ShardId],
    ) -> Result<Vec<(ShardId, Vec<u8>)>, StoreError>;
    /// The rules layouts stored states were written under.
    fn layouts(&self) -> Result<Vec<Layout>, StoreError>;
    /// Records a rules layout (before any state is written under it).
    fn register_layout(&self, layout: &Layout) -> Result<(), StoreError>;
    /// Checks the store answers.
    fn ping(&self) -> Result<(), StoreError>;
    /// Checks the store is safe to keep state in (eviction, persistence).
    fn check(&self) -> Result<Health, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_call_that_timed_out_says_so() {
        let timed_out =
            ::redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::WouldBlock));
        let e = StoreError::from(timed_out);
        assert_eq!(e.to_string(), "redis: no answer within redis.timeout_ms");
        // Nothing beneath it for an error chain to print ("os error 11").
        assert!(std::error::Error::source(&e).is_none());
        let refused =
            ::redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(
            StoreError::from(refused).to_string().contains("refused"),
            "other errors keep their words"
        );
    }
}
