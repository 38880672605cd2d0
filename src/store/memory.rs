//! The in-memory store: the same semantics as Redis (epochs, fencing,
//! forward-only positions), lost on exit. For the demo, `replay` and tests.

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;

use super::{
    Health, Loaded, ShardId, ShardMeta, ShardWrite, Store, StoreError, TimerWrite, Written,
};
use crate::engine::layout::Layout;
use crate::event::Millis;
use crate::shard::cache::LeadKey;

#[derive(Debug, Default, Clone)]
struct ShardData {
    meta: Option<ShardMeta>,
    leads: HashMap<LeadKey, Vec<u8>>,
    timers: BTreeMap<(Millis, LeadKey), ()>,
    timer_of: HashMap<LeadKey, Millis>,
}

/// In-memory store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    shards: Mutex<HashMap<ShardId, ShardData>>,
    layouts: Mutex<Vec<Layout>>,
    down: std::sync::atomic::AtomicBool,
}

impl MemoryStore {
    /// Makes every call fail (tests of outages) or succeed again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn up(&self) -> Result<(), StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::Reply("memory store is down (test)".into()))
        } else {
            Ok(())
        }
    }

    /// Forgets everything (as a `FLUSHALL` would).
    pub fn flush_all(&self) {
        self.shards.lock().clear();
    }

    /// Every stored lead of a shard, by key (tests compare runs with it).
    pub fn leads(&self, shard: ShardId) -> BTreeMap<String, Vec<u8>> {
        self.shards
            .lock()
            .get(&shard)
            .map(|d| {
                d.leads
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every stored timer of a shard.
    pub fn timers_of(&self, shard: ShardId) -> BTreeMap<String, Millis> {
        self.shards
            .lock()
            .get(&shard)
            .map(|d| {
                d.timer_of
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), *v))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The stored metadata of a shard.
    pub fn meta(&self, shard: ShardId) -> Option<ShardMeta> {
        self.shards.lock().get(&shard).and_then(|d| d.meta.clone())
    }
}

fn fence(meta: Option<&ShardMeta>, epoch: u64) -> Option<Written> {
    match meta {
        None => Some(Written::Lost),
        Some(m) if m.epoch != epoch => Some(Written::Fenced(m.epoch)),
        Some(_) => None,
    }
}

impl Store for MemoryStore {
    fn take_shard(&self, shard: ShardId) -> Result<ShardMeta, StoreError> {
        self.up()?;
        let mut shards = self.shards.lock();
        let data = shards.entry(shard).or_default();
        let mut meta = data.meta.clone().unwrap_or_default();
        meta.epoch += 1;
        meta.fresh = meta.positions.is_empty();
        data.meta = Some(meta.clone());
        Ok(meta)
    }

    fn load(
        &self,
        shard: ShardId,
        epoch: u64,
        keys: &[&LeadKey],
    ) -> Result<Result<Vec<Option<Loaded>>, Written>, StoreError> {
        self.up()?;
        let shards = self.shards.lock();
        let data = shards.get(&shard);
        if let Some(w) = fence(data.and_then(|d| d.meta.as_ref()), epoch) {
            return Ok(Err(w));
        }
        Ok(Ok(keys
            .iter()
            .map(|k| {
                let d = data?;
                Some(Loaded {
                    state: d.leads.get(*k)?.clone(),
                    timer: d.timer_of.get(*k).copied(),
                })
            })
            .collect()))
    }

    fn timers(
        &self,
        shard: ShardId,
        after: Millis,
        limit: usize,
    ) -> Result<Vec<(LeadKey, Millis)>, StoreError> {
        self.up()?;
        let shards = self.shards.lock();
        Ok(shards
            .get(&shard)
            .map(|d| {
                d.timers
                    .keys()
                    .filter(|(t, _)| *t > after)
                    .take(limit)
                    .map(|(t, k)| (k.clone(), *t))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn write(&self, writes: &[ShardWrite]) -> Result<Vec<Written>, StoreError> {
        self.up()?;
        let mut shards = self.shards.lock();
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            let data = shards.entry(w.shard).or_default();
            if let Some(refused) = fence(data.meta.as_ref(), w.epoch) {
                out.push(refused);
                continue;
            }
            let meta = data.meta.as_mut().expect("fenced above");
            if !super::takes_write(meta.seq, w.seq) {
                out.push(Written::Diverged(meta.seq));
                continue;
            }
            if let Some((topic, _)) = w
                .positions
                .iter()
                .find(|(t, p)| meta.positions.get(t).is_some_and(|cur| cur > p))
            {
                out.push(Written::Backwards(topic.clone()));
                continue;
            }
            meta.seq = w.seq + 1;
            for (topic, p) in &w.positions {
                meta.positions.insert(topic.clone(), *p);
            }
            for (topic, t) in &w.seen {
                meta.seen.insert(topic.clone(), *t);
            }
            if w.clock.is_some() {
                meta.clock = w.clock;
            }
            if w.released.is_some() {
                meta.released = w.released;
            }
            for (segment, n) in &w.population {
                meta.population.insert(segment.clone(), *n);
            }
            for (hash, at) in &w.erasures {
                match at {
                    Some(t) => meta.erased.insert(*hash, *t),
                    None => meta.erased.remove(hash),
                };
            }
            for lead in &w.leads {
                let key = &lead.key;
                data.leads.insert(key.clone(), w.state(lead).to_vec());
                if lead.timer == TimerWrite::Keep {
                    continue;
                }
                if let Some(old) = data.timer_of.remove(key) {
                    data.timers.remove(&(old, key.clone()));
                }
                if let TimerWrite::Set(t) = lead.timer {
                    data.timer_of.insert(key.clone(), t);
                    data.timers.insert((t, key.clone()), ());
                }
            }
            for key in &w.deletes {
                data.leads.remove(key);
                if let Some(old) = data.timer_of.remove(key) {
                    data.timers.remove(&(old, key.clone()));
                }
            }
            out.push(Written::Ok);
        }
        Ok(out)
    }

    fn find(
        &self,
        key: &LeadKey,
        shards: &[ShardId],
    ) -> Result<Vec<(ShardId, Vec<u8>)>, StoreError> {
        self.up()?;
        let all = self.shards.lock();
        Ok(shards
            .iter()
            .filter_map(|s| {
                all.get(s)
                    .and_then(|d| d.leads.get(key))
                    .map(|v| (*s, v.clone()))
            })
            .collect())
    }

    fn layouts(&self) -> Result<Vec<Layout>, StoreError> {
        self.up()?;
        Ok(self.layouts.lock().clone())
    }

    fn register_layout(&self, layout: &Layout) -> Result<(), StoreError> {
        self.up()?;
        let mut l = self.layouts.lock();
        if !l.contains(layout) {
            l.push(layout.clone());
        }
        Ok(())
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.up()
    }

    fn check(&self) -> Result<Health, StoreError> {
        self.up()?;
        Ok(Health {
            refuse: Vec::new(),
            warn: vec!["state.backend = memory: state is lost when the process exits".into()],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_fence_and_positions_only_move_forward() {
        let s = MemoryStore::default();
        let a = s.take_shard(3).unwrap();
        assert!(a.fresh);
        // Taking it again without writing: still no state.
        let a = s.take_shard(3).unwrap();
        assert!(a.fresh && a.epoch == 2);
        let write = |epoch, pos| {
            let mut w = ShardWrite {
                shard: 3,
                epoch,
                positions: vec![("t".into(), pos)],
                ..ShardWrite::default()
            };
            w.push_lead(LeadKey::lead("x"), &[1u8], TimerWrite::Set(9));
            w
        };
        assert_eq!(s.write(&[write(a.epoch, 10)]).unwrap(), vec![Written::Ok]);
        let b = s.take_shard(3).unwrap();
        assert!(!b.fresh && b.epoch == a.epoch + 1);
        assert_eq!(b.positions["t"], 10);
        assert_eq!(
            s.write(&[write(a.epoch, 20)]).unwrap(),
            vec![Written::Fenced(b.epoch)]
        );
        assert_eq!(
            s.write(&[write(b.epoch, 5)]).unwrap(),
            vec![Written::Backwards("t".into())]
        );
        assert_eq!(
            s.timers(3, Millis::MIN, 10).unwrap(),
            vec![(LeadKey::lead("x"), 9)]
        );
        s.flush_all();
        assert_eq!(s.write(&[write(b.epoch, 30)]).unwrap(), vec![Written::Lost]);
        assert_eq!(
            s.load(3, b.epoch, &[&LeadKey::lead("x")]).unwrap(),
            Err(Written::Lost)
        );
    }

    #[test]
    fn a_record_behind_the_owners_writes_is_refused_as_diverged() {
        let s = MemoryStore::default();
        let m = s.take_shard(1).unwrap();
        assert_eq!(m.seq, 0);
        let write = |seq, pos| ShardWrite {
            shard: 1,
            epoch: m.epoch,
            seq,
            positions: vec![("t".into(), pos)],
            ..ShardWrite::default()
        };
        assert_eq!(s.write(&[write(0, 10)]).unwrap(), vec![Written::Ok]);
        assert_eq!(s.write(&[write(1, 20)]).unwrap(), vec![Written::Ok]);
        // The same write again (its answer was lost): applied again, harmless.
        assert_eq!(s.write(&[write(1, 20)]).unwrap(), vec![Written::Ok]);
        // The store lost the last write (a failover): the record is at 1
        // while the owner wrote twice.
        s.shards
            .lock()
            .get_mut(&1)
            .unwrap()
            .meta
            .as_mut()
            .unwrap()
            .seq = 1;
        assert_eq!(
            s.write(&[write(2, 30)]).unwrap(),
            vec![Written::Diverged(1)]
        );
        // A new owner starts from what is stored.
        let n = s.take_shard(1).unwrap();
        assert_eq!(n.seq, 1);
    }
}
