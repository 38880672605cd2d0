//! Durable state behind the in-memory map: a small trait with a Redis
//! implementation (write-behind, one MULTI/EXEC per flush) and an in-memory
//! one for the demo and unit tests.
//!
//! Redis layout (all under `key_prefix`):
//! * `lead:{id}` — the lead's binary state (see `engine::state`);
//! * `timers:{shard}` — sorted set of lead ids by next decay/lifecycle instant;
//! * `positions` — hash `{topic}/{partition}` → next offset to read, written in
//!   the same transaction as the leads it covers;
//! * `clocks` — hash `{shard}` → event-time clock of that shard.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::event::Millis;

/// Why a store call failed. Every variant is retryable: keep the offsets, back off, retry.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused or dropped the call.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One lead to write.
#[derive(Debug, Clone)]
pub struct LeadWrite {
    /// Lead id.
    pub id: Arc<str>,
    /// Encoded state.
    pub state: Vec<u8>,
    /// The shard (partition number) it belongs to.
    pub shard: i32,
    /// Its next timer, if any.
    pub timer: Option<Millis>,
}

/// Everything one flush writes, atomically.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    /// Changed leads.
    pub leads: Vec<LeadWrite>,
    /// Leads (anonymous visitors merged into a lead) to delete, with their shard.
    pub deletes: Vec<(Arc<str>, i32)>,
    /// Next offset per (topic, partition).
    pub positions: Vec<(String, i32, i64)>,
    /// Event-time clock per shard.
    pub clocks: Vec<(i32, Millis)>,
}

/// Durable lead state.
pub trait Store: Send + Sync {
    /// Loads the states of `ids` (None where absent).
    fn load(&self, ids: &[&str]) -> Result<Vec<Option<Vec<u8>>>, StoreError>;
    /// Writes a batch atomically.
    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError>;
    /// Next offsets stored for these partitions.
    fn positions(&self, partitions: &[(String, i32)]) -> Result<Vec<Option<i64>>, StoreError>;
    /// Clock of a shard.
    fn clock(&self, shard: i32) -> Result<Option<Millis>, StoreError>;
    /// All timers of a shard.
    fn timers(&self, shard: i32) -> Result<Vec<(String, Millis)>, StoreError>;
    /// Checks the store answers.
    fn ping(&self) -> Result<(), StoreError>;
}

/// In-memory store (lost on exit).
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    leads: HashMap<String, Vec<u8>>,
    timers: HashMap<i32, HashMap<String, Millis>>,
    positions: HashMap<(String, i32), i64>,
    clocks: HashMap<i32, Millis>,
}

impl Store for MemoryStore {
    fn load(&self, ids: &[&str]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let inner = self.inner.lock();
        Ok(ids.iter().map(|id| inner.leads.get(*id).cloned()).collect())
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        for l in &batch.leads {
            inner.leads.insert(l.id.to_string(), l.state.clone());
            let timers = inner.timers.entry(l.shard).or_default();
            match l.timer {
                Some(t) => timers.insert(l.id.to_string(), t),
                None => timers.remove(&*l.id),
            };
        }
        for (id, shard) in &batch.deletes {
            inner.leads.remove(&**id);
            if let Some(t) = inner.timers.get_mut(shard) {
                t.remove(&**id);
            }
        }
        for (topic, partition, offset) in &batch.positions {
            inner.positions.insert((topic.clone(), *partition), *offset);
        }
        for (shard, clock) in &batch.clocks {
            inner.clocks.insert(*shard, *clock);
        }
        Ok(())
    }

    fn positions(&self, partitions: &[(String, i32)]) -> Result<Vec<Option<i64>>, StoreError> {
        let inner = self.inner.lock();
        Ok(partitions
            .iter()
            .map(|p| inner.positions.get(p).copied())
            .collect())
    }

    fn clock(&self, shard: i32) -> Result<Option<Millis>, StoreError> {
        Ok(self.inner.lock().clocks.get(&shard).copied())
    }

    fn timers(&self, shard: i32) -> Result<Vec<(String, Millis)>, StoreError> {
        let inner = self.inner.lock();
        Ok(inner
            .timers
            .get(&shard)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default())
    }

    fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Redis store over one synchronous connection, re-opened after errors.
pub struct RedisStore {
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    prefix: String,
    timeout: Duration,
    pipeline_batch: usize,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on `url`; connects lazily.
    pub fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
        pipeline_batch: usize,
    ) -> Result<Self, StoreError> {
        Ok(RedisStore {
            client: redis::Client::open(url)?,
            conn: Mutex::new(None),
            prefix: prefix.to_owned(),
            timeout,
            pipeline_batch: pipeline_batch.max(1),
        })
    }

    fn lead_key(&self, id: &str) -> String {
        format!("{}lead:{id}", self.prefix)
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock();
        if guard.is_none() {
            let conn = self.client.get_connection_with_timeout(self.timeout)?;
            conn.set_read_timeout(Some(self.timeout))?;
            conn.set_write_timeout(Some(self.timeout))?;
            *guard = Some(conn);
        }
        let conn = guard.as_mut().expect("connected above");
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                // Drop the connection: its protocol state is unknown after an error.
                *guard = None;
                Err(e.into())
            }
        }
    }
}

impl Store for RedisStore {
    fn load(&self, ids: &[&str]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(self.pipeline_batch) {
            let keys: Vec<String> = chunk.iter().map(|id| self.lead_key(id)).collect();
            let values: Vec<Option<Vec<u8>>> =
                self.with_conn(|c| redis::cmd("MGET").arg(&keys).query(c))?;
            out.extend(values);
        }
        Ok(out)
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for l in &batch.leads {
            pipe.cmd("SET")
                .arg(self.lead_key(&l.id))
                .arg(&l.state[..])
                .ignore();
            let zkey = format!("{}timers:{}", self.prefix, l.shard);
            match l.timer {
                Some(t) => pipe.cmd("ZADD").arg(zkey).arg(t).arg(&*l.id).ignore(),
                None => pipe.cmd("ZREM").arg(zkey).arg(&*l.id).ignore(),
            };
        }
        for (id, shard) in &batch.deletes {
            pipe.cmd("DEL").arg(self.lead_key(id)).ignore();
            pipe.cmd("ZREM")
                .arg(format!("{}timers:{shard}", self.prefix))
                .arg(&**id)
                .ignore();
        }
        if !batch.positions.is_empty() {
            let cmd = pipe.cmd("HSET").arg(format!("{}positions", self.prefix));
            for (topic, partition, offset) in &batch.positions {
                cmd.arg(format!("{topic}/{partition}")).arg(*offset);
            }
            cmd.ignore();
        }
        if !batch.clocks.is_empty() {
            let cmd = pipe.cmd("HSET").arg(format!("{}clocks", self.prefix));
            for (shard, clock) in &batch.clocks {
                cmd.arg(*shard).arg(*clock);
            }
            cmd.ignore();
        }
        self.with_conn(|c| pipe.query::<()>(c))
    }

    fn positions(&self, partitions: &[(String, i32)]) -> Result<Vec<Option<i64>>, StoreError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let fields: Vec<String> = partitions.iter().map(|(t, p)| format!("{t}/{p}")).collect();
        self.with_conn(|c| {
            redis::cmd("HMGET")
                .arg(format!("{}positions", self.prefix))
                .arg(&fields)
                .query(c)
        })
    }

    fn clock(&self, shard: i32) -> Result<Option<Millis>, StoreError> {
        self.with_conn(|c| {
            redis::cmd("HGET")
                .arg(format!("{}clocks", self.prefix))
                .arg(shard)
                .query(c)
        })
    }

    fn timers(&self, shard: i32) -> Result<Vec<(String, Millis)>, StoreError> {
        self.with_conn(|c| {
            redis::cmd("ZRANGE")
                .arg(format!("{}timers:{shard}", self.prefix))
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(c)
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|c| redis::cmd("PING").query::<String>(c).map(|_| ()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_round_trip() {
        let s = MemoryStore::default();
        let batch = WriteBatch {
            leads: vec![LeadWrite {
                id: "a".into(),
                state: vec![1, 2],
                shard: 3,
                timer: Some(99),
            }],
            deletes: vec![],
            positions: vec![("t".into(), 3, 42)],
            clocks: vec![(3, 1000)],
        };
        s.write(&batch).unwrap();
        assert_eq!(s.load(&["a", "b"]).unwrap(), vec![Some(vec![1, 2]), None]);
        assert_eq!(s.positions(&[("t".into(), 3)]).unwrap(), vec![Some(42)]);
        assert_eq!(s.clock(3).unwrap(), Some(1000));
        assert_eq!(s.timers(3).unwrap(), vec![("a".to_owned(), 99)]);
    }
}
