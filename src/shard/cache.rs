//! The leads of one shard held in memory: each lead's state is its compact
//! binary form in one allocation, owned by the cache and rewritten in place
//! (a write copies the states it takes), and the cache is bounded (by count and by
//! bytes). Beyond the limit, clean leads (already written to the store) are
//! evicted in CLOCK order — a lead used since the hand last passed gets a
//! second chance — and are reloaded from the store on their next event.
//! Dirty leads are never evicted: the write-behind must flush them first.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::event::Millis;
use crate::store::{ShardWrite, TimerWrite};

/// The key of a lead or visitor within a shard: `l:<lead id>` or `a:<anonymous id>`.
/// Shared, not copied, by the cache, the timers and the writes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeadKey(std::sync::Arc<str>);

impl LeadKey {
    /// The key of a lead.
    pub fn lead(id: &str) -> LeadKey {
        LeadKey(Self::join("l:", id))
    }

    /// The key of an anonymous visitor (or of its alias).
    pub fn visitor(anonymous_id: &str) -> LeadKey {
        LeadKey(Self::join("a:", anonymous_id))
    }

    /// `kind` and `id` in one allocation (a `String` turned into an `Arc<str>`
    /// would be a second one): the key is written into a buffer kept per
    /// thread, then copied once into its shared allocation.
    fn join(kind: &str, id: &str) -> std::sync::Arc<str> {
        thread_local! {
            static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        BUF.with_borrow_mut(|b| {
            b.clear();
            b.push_str(kind);
            b.push_str(id);
            std::sync::Arc::from(b.as_str())
        })
    }

    /// A key as stored (`l:…` or `a:…`), if well formed.
    pub fn parse(stored: &str) -> Option<LeadKey> {
        (stored.starts_with("l:") || stored.starts_with("a:")).then(|| LeadKey(stored.into()))
    }

    /// Whether it names an identified lead.
    pub fn is_lead(&self) -> bool {
        self.0.starts_with("l:")
    }

    /// The id without its kind.
    pub fn id(&self) -> &str {
        &self.0[2..]
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A lead key written into a reused buffer, for looking a lead up without
/// allocating its shared [`LeadKey`] (which is made only for a lead that is
/// not held yet).
#[derive(Debug, Default)]
pub struct KeyBuf(String);

impl KeyBuf {
    /// The key of a lead, as stored (`l:<id>`).
    pub fn lead(&mut self, id: &str) -> &str {
        self.join("l:", id)
    }

    /// The key of an anonymous visitor (`a:<anonymous id>`).
    pub fn visitor(&mut self, anonymous_id: &str) -> &str {
        self.join("a:", anonymous_id)
    }

    fn join(&mut self, kind: &str, id: &str) -> &str {
        self.0.clear();
        self.0.push_str(kind);
        self.0.push_str(id);
        &self.0
    }
}

/// A key hashes and compares as its stored text, so sets of keys can be
/// asked about a [`KeyBuf`]'s text.
impl std::borrow::Borrow<str> for LeadKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl LeadKey {
    /// The shared key of a key as written by [`KeyBuf`].
    pub fn from_stored(stored: &str) -> LeadKey {
        LeadKey(stored.into())
    }
}

impl std::fmt::Debug for LeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids are personal data: debug output shows only their kind and length.
        write!(f, "LeadKey({}…{})", &self.0[..2], self.0.len() - 2)
    }
}

/// One cached lead.
#[derive(Debug)]
pub struct Entry {
    /// Its key.
    pub key: LeadKey,
    /// Its state, in the stored binary form: the first `len` bytes of an
    /// allocation sized to the allocator's size class (see [`room_for`]),
    /// so a state that grows or shrinks by a few bytes is rewritten in place.
    data: Box<[u8]>,
    /// Its next timer, if `times` has [`HAS_TIMER`] (see [`Entry::timer`]).
    /// The two instants and their presence bits take 17 bytes where
    /// `Option<Millis>` and [`Stored`] would take 32: held once per lead.
    timer_at: Millis,
    /// The timer the store holds for it, if `times` has [`STORED_TIMER`]
    /// (see [`Entry::stored`]).
    stored_at: Millis,
    times: u8,
    /// The state's length in `data` (the entry's padding had room for it).
    len: u32,
    /// Changed since it was last written.
    pub dirty: bool,
    /// Taken by a write that has not finished (never evicted meanwhile).
    writing: bool,
    referenced: bool,
}

/// [`Entry::times`]: the lead has a next timer.
const HAS_TIMER: u8 = 1;
/// [`Entry::times`]: the store holds a timer for it (`Stored::Known(Some)`).
const STORED_TIMER: u8 = 2;
/// [`Entry::times`]: what the store holds is unknown (`Stored::Unknown`).
const STORED_UNKNOWN: u8 = 4;

impl Entry {
    fn new(key: LeadKey, blob: &[u8], timer: Option<Millis>, stored: Stored, dirty: bool) -> Entry {
        let mut e = Entry {
            key,
            data: Box::default(),
            timer_at: 0,
            stored_at: 0,
            times: 0,
            len: 0,
            dirty,
            writing: false,
            referenced: true,
        };
        e.set_timer(timer);
        e.set_stored(stored);
        e.set_blob(blob);
        e
    }

    /// Its state, in the stored binary form.
    pub fn blob(&self) -> &[u8] {
        &self.data[..self.len as usize]
    }

    /// Bytes its state's allocation takes.
    fn room(&self) -> usize {
        self.data.len()
    }

    /// Replaces its state, in place when it fits the allocation's size
    /// class; returns the change in bytes allocated.
    fn set_blob(&mut self, blob: &[u8]) -> isize {
        let before = self.data.len();
        let room = room_for(blob.len());
        if before == room {
            self.data[..blob.len()].copy_from_slice(blob);
        } else {
            // Copied once, with only the class's spare tail zeroed.
            let mut data = Vec::with_capacity(room);
            data.extend_from_slice(blob);
            data.resize(room, 0);
            self.data = data.into_boxed_slice();
        }
        self.len = u32::try_from(blob.len()).expect("a lead's state is far below 4 GiB");
        self.data.len() as isize - before as isize
    }

    /// Its next timer.
    pub fn timer(&self) -> Option<Millis> {
        (self.times & HAS_TIMER != 0).then_some(self.timer_at)
    }

    fn set_timer(&mut self, timer: Option<Millis>) {
        self.timer_at = timer.unwrap_or(0);
        self.times = (self.times & !HAS_TIMER) | if timer.is_some() { HAS_TIMER } else { 0 };
    }

    /// The timer the store holds for it (see [`TimerWrite`]).
    fn stored(&self) -> Stored {
        if self.times & STORED_UNKNOWN != 0 {
            Stored::Unknown
        } else {
            Stored::Known((self.times & STORED_TIMER != 0).then_some(self.stored_at))
        }
    }

    fn set_stored(&mut self, stored: Stored) {
        let (bits, at) = match stored {
            Stored::Unknown => (STORED_UNKNOWN, 0),
            Stored::Known(None) => (0, 0),
            Stored::Known(Some(t)) => (STORED_TIMER, t),
        };
        self.stored_at = at;
        self.times = (self.times & HAS_TIMER) | bits;
    }
}

/// The allocation a state of `len` bytes gets: `len` rounded up to the
/// small size classes of the allocator (mimalloc: multiples of 8 to 64
/// bytes, then four classes per power of two), so it costs no memory the
/// allocator would not take anyway. States change length by a byte or two
/// as their numbers grow; most changes then stay within the allocation,
/// where an exact-length one was freed and allocated again.
fn room_for(len: usize) -> usize {
    let step = (len.next_power_of_two() / 8).max(8);
    len.div_ceil(step) * step
}

/// What the store holds as a lead's timer, as far as this member knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// This instant (or none).
    Known(Option<Millis>),
    /// Unknown: a write of it failed, so the next one stores the exact timer.
    Unknown,
}

impl Stored {
    /// What a write of a lead whose next timer is `timer` does to the
    /// stored one, when the shard's clock is at `clock`. The stored timer is
    /// kept when it still lies ahead and no later than the lead's next
    /// transition: it fires no later than needed, and a lead it fires early
    /// has nothing due (see [`TimerWrite`]).
    fn write(self, timer: Option<Millis>, clock: Millis) -> TimerWrite {
        match (self, timer) {
            (Stored::Known(s), t) if s == t => TimerWrite::Keep,
            (Stored::Known(Some(s)), t) if s > clock && t.is_none_or(|t| t >= s) => {
                TimerWrite::Keep
            }
            (_, Some(t)) => TimerWrite::Set(t),
            (_, None) => TimerWrite::Clear,
        }
    }

    /// After a write that did `op`, and ended `ok` or not.
    fn after(self, op: TimerWrite, ok: bool) -> Stored {
        match (ok, op) {
            (false, _) => Stored::Unknown,
            (true, TimerWrite::Set(t)) => Stored::Known(Some(t)),
            (true, TimerWrite::Clear) => Stored::Known(None),
            (true, TimerWrite::Keep) => self,
        }
    }
}

/// How much the cache may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Most leads.
    pub leads: usize,
    /// Most bytes (states, keys and bookkeeping).
    pub bytes: usize,
}

impl Limit {
    /// No limit.
    pub const NONE: Limit = Limit {
        leads: usize::MAX,
        bytes: usize::MAX,
    };
}

/// Bookkeeping bytes per entry beyond its state and key (slab entry, table slot).
const OVERHEAD: usize = std::mem::size_of::<Option<Entry>>() + 8;

/// Bytes a key's shared allocation takes: its text after the two counts of
/// an `Arc`, in the allocator's size class.
fn key_bytes(key: &LeadKey) -> usize {
    room_for(2 * std::mem::size_of::<usize>() + key.0.len())
}

/// The cache.
pub struct LeadCache {
    slab: Vec<Option<Entry>>,
    free: Vec<u32>,
    table: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    hand: usize,
    len: usize,
    bytes: usize,
    limit: Limit,
    dirty: Vec<u32>,
}

impl std::fmt::Debug for LeadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeadCache")
            .field("len", &self.len)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl LeadCache {
    /// An empty cache bounded by `limit`.
    pub fn new(limit: Limit) -> Self {
        LeadCache {
            slab: Vec::new(),
            free: Vec::new(),
            table: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            hand: 0,
            len: 0,
            bytes: 0,
            limit,
            dirty: Vec::new(),
        }
    }

    /// Leads held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held (states, keys, bookkeeping).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Leads changed since their last write.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    fn hash(&self, key: &LeadKey) -> u64 {
        self.hasher.hash_one(key.as_str())
    }

    fn find(&self, key: &LeadKey) -> Option<u32> {
        self.find_str(key.as_str())
    }

    /// Where a key given as its stored text (`l:…`, `a:…`) is held. A
    /// [`LeadKey`] hashes as its text, so this finds what `find` finds.
    pub fn find_str(&self, key: &str) -> Option<u32> {
        let slab = &self.slab;
        self.table
            .find(self.hasher.hash_one(key), |&i| {
                slab[i as usize]
                    .as_ref()
                    .is_some_and(|e| e.key.as_str() == key)
            })
            .copied()
    }

    /// The key held in a slot (shared, not copied).
    pub fn key_at(&self, slot: u32) -> Option<&LeadKey> {
        self.slab.get(slot as usize)?.as_ref().map(|e| &e.key)
    }

    /// The entry of a key, marking it used.
    pub fn get(&mut self, key: &LeadKey) -> Option<&Entry> {
        let i = self.find(key)? as usize;
        let e = self.slab[i].as_mut()?;
        e.referenced = true;
        Some(e)
    }

    /// The entry in a slot, marking it used.
    pub fn touch(&mut self, slot: u32) -> Option<&Entry> {
        let e = self.slab.get_mut(slot as usize)?.as_mut()?;
        e.referenced = true;
        Some(e)
    }

    /// Whether a key is held (without marking it used).
    pub fn contains(&self, key: &LeadKey) -> bool {
        self.find(key).is_some()
    }

    /// A copy of a lead's state, without marking it used.
    pub fn peek(&self, key: &LeadKey) -> Option<Vec<u8>> {
        let i = self.find(key)? as usize;
        self.slab[i].as_ref().map(|e| e.blob().to_vec())
    }

    /// Sets a lead's state and timer, marking it dirty (inserted if absent,
    /// as a lead the store holds no timer for).
    pub fn put(&mut self, key: &LeadKey, blob: &[u8], timer: Option<Millis>) {
        self.put_with(key, blob, timer, true, None);
    }

    /// Where a key is held: a slot valid until the key is removed or evicted.
    pub fn slot(&self, key: &LeadKey) -> Option<u32> {
        self.find(key)
    }

    /// The state in a slot, if it holds `key`.
    pub fn blob_at(&self, slot: u32, key: &LeadKey) -> Option<&[u8]> {
        self.entry_at(slot, key).map(Entry::blob)
    }

    fn entry_at(&self, slot: u32, key: &LeadKey) -> Option<&Entry> {
        self.slab
            .get(slot as usize)?
            .as_ref()
            .filter(|e| std::sync::Arc::ptr_eq(&e.key.0, &key.0) || e.key == *key)
    }

    /// [`LeadCache::put`] with the slot the key was read from, which saves
    /// looking it up again (any slot that no longer holds it is ignored).
    pub fn put_at(&mut self, slot: Option<u32>, key: &LeadKey, blob: &[u8], timer: Option<Millis>) {
        match slot.filter(|s| self.entry_at(*s, key).is_some()) {
            Some(i) => self.update(i, blob, timer, true),
            None => self.put_with(key, blob, timer, true, None),
        }
    }

    fn update(&mut self, i: u32, blob: &[u8], timer: Option<Millis>, dirty: bool) {
        let e = self.slab[i as usize]
            .as_mut()
            .expect("indexed entries exist");
        self.bytes = self.bytes.saturating_add_signed(e.set_blob(blob));
        e.set_timer(timer);
        e.referenced = true;
        if dirty && !e.dirty {
            e.dirty = true;
            self.dirty.push(i);
        }
    }

    /// Inserts a lead just loaded from the store, with the timer the store
    /// holds for it (`stored`); `dirty` if it must be written again (it was
    /// remapped to these rules).
    pub fn put_loaded(
        &mut self,
        key: &LeadKey,
        blob: &[u8],
        timer: Option<Millis>,
        stored: Option<Millis>,
        dirty: bool,
    ) {
        self.put_with(key, blob, timer, dirty, stored);
    }

    /// [`LeadCache::put_loaded`] of a clean lead whose stored timer is `timer`.
    pub fn put_clean(&mut self, key: &LeadKey, blob: &[u8], timer: Option<Millis>) {
        self.put_with(key, blob, timer, false, timer);
    }

    fn put_with(
        &mut self,
        key: &LeadKey,
        blob: &[u8],
        timer: Option<Millis>,
        dirty: bool,
        stored: Option<Millis>,
    ) {
        match self.find(key) {
            Some(i) => self.update(i, blob, timer, dirty),
            None => {
                let entry = Entry::new(key.clone(), blob, timer, Stored::Known(stored), dirty);
                self.bytes += entry.room() + key_bytes(key) + OVERHEAD;
                let i = match self.free.pop() {
                    Some(i) => {
                        self.slab[i as usize] = Some(entry);
                        i
                    }
                    None => {
                        self.slab.push(Some(entry));
                        (self.slab.len() - 1) as u32
                    }
                };
                let hash = self.hash(key);
                let (slab, hasher) = (&self.slab, &self.hasher);
                self.table.insert_unique(hash, i, |&j| {
                    hasher.hash_one(slab[j as usize].as_ref().expect("indexed").key.as_str())
                });
                self.len += 1;
                if dirty {
                    self.dirty.push(i);
                }
            }
        }
    }

    /// Removes a key (a deleted lead); returns its entry.
    pub fn remove(&mut self, key: &LeadKey) -> Option<Entry> {
        let i = self.find(key)?;
        let hash = self.hash(key);
        if let Ok(slot) = self.table.find_entry(hash, |&j| j == i) {
            slot.remove();
        }
        let e = self.slab[i as usize].take()?;
        self.free.push(i);
        self.len -= 1;
        self.bytes -= e.room() + key_bytes(&e.key) + OVERHEAD;
        Some(e)
    }

    /// Adds the dirty leads to `write` (their states copied into it), the
    /// shard's clock at `clock`, and returns the slots they were taken
    /// from. They count as clean but are kept in memory until
    /// [`LeadCache::written`] says how the write ended.
    pub fn take_dirty(&mut self, clock: Millis, write: &mut ShardWrite) -> Vec<u32> {
        let mut slots = Vec::with_capacity(self.dirty.len());
        write.leads.reserve(self.dirty.len());
        for i in std::mem::take(&mut self.dirty) {
            if let Some(e) = self.slab.get_mut(i as usize).and_then(Option::as_mut)
                && e.dirty
            {
                e.dirty = false;
                e.writing = true;
                write.push_lead(e.key.clone(), e.blob(), e.stored().write(e.timer(), clock));
                slots.push(i);
            }
        }
        slots
    }

    /// A write of `leads` (taken from `slots`) finished: on failure they are
    /// dirty again.
    pub fn written(&mut self, leads: &[(LeadKey, TimerWrite)], slots: &[u32], ok: bool) {
        for (n, (key, op)) in leads.iter().enumerate() {
            let slot = slots
                .get(n)
                .copied()
                .filter(|s| self.entry_at(*s, key).is_some())
                .or_else(|| self.find(key));
            if let Some(i) = slot
                && let Some(e) = self.slab[i as usize].as_mut()
            {
                e.writing = false;
                e.set_stored(e.stored().after(*op, ok));
                if !ok && !e.dirty {
                    e.dirty = true;
                    self.dirty.push(i);
                }
            }
        }
    }

    /// Marks leads dirty again (a write failed), if still held.
    pub fn mark_dirty(&mut self, keys: impl IntoIterator<Item = LeadKey>) {
        for key in keys {
            if let Some(i) = self.find(&key)
                && let Some(e) = self.slab[i as usize].as_mut()
                && !e.dirty
            {
                e.dirty = true;
                self.dirty.push(i);
            }
        }
    }

    /// Changes the limit (the instance's shards changed); the next eviction
    /// applies it.
    pub fn set_limit(&mut self, limit: Limit) {
        self.limit = limit;
    }

    /// Whether the cache holds more than its limit.
    pub fn over_limit(&self) -> bool {
        self.len > self.limit.leads || self.bytes > self.limit.bytes
    }

    /// Evicts clean leads in CLOCK order until within the limit (or nothing
    /// clean is left). Returns the evicted keys with the timers the store
    /// holds for them: their timers leave memory with them, and the shard
    /// finds them again in the store's pages. A lead whose next timer the
    /// store does not hold yet is written first, and may go at a later
    /// eviction.
    pub fn evict(&mut self) -> Vec<(LeadKey, Option<Millis>)> {
        let mut out = Vec::new();
        if !self.over_limit() || self.slab.is_empty() {
            return out;
        }
        // Two full turns: one to clear reference bits, one to evict.
        let mut budget = self.slab.len() * 2;
        while self.over_limit() && budget > 0 {
            budget -= 1;
            self.hand = (self.hand + 1) % self.slab.len();
            let Some(e) = self.slab[self.hand].as_mut() else {
                continue;
            };
            if e.dirty || e.writing {
                continue;
            }
            if e.referenced {
                e.referenced = false;
                continue;
            }
            let stored = match (e.stored(), e.timer()) {
                (Stored::Known(s), None) => s,
                (Stored::Known(Some(s)), Some(t)) if s <= t => Some(s),
                _ => {
                    e.set_stored(Stored::Unknown);
                    e.dirty = true;
                    self.dirty.push(self.hand as u32);
                    continue;
                }
            };
            let key = e.key.clone();
            if let Some(e) = self.remove(&key) {
                out.push((e.key, stored));
            }
        }
        out
    }

    /// Every key held (for dropping a shard's timers).
    pub fn keys(&self) -> impl Iterator<Item = &LeadKey> {
        self.slab.iter().flatten().map(|e| &e.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry's two instants and their presence bits: every timer and
    /// stored state reads back as set, each independently of the other,
    /// extremes included, in an entry of 56 bytes (72 with `Option`s).
    #[test]
    fn an_entry_keeps_every_timer_and_stored_timer_compactly() {
        assert!(std::mem::size_of::<Option<Entry>>() <= 56);
        let timers = [None, Some(0), Some(-5), Some(i64::MIN), Some(i64::MAX)];
        let stored = [
            Stored::Unknown,
            Stored::Known(None),
            Stored::Known(Some(0)),
            Stored::Known(Some(i64::MIN)),
            Stored::Known(Some(77)),
        ];
        for t in timers {
            for st in stored {
                let mut e = Entry::new(LeadKey::lead("a"), &[], t, st, false);
                assert_eq!((e.timer(), e.stored()), (t, st));
                for t2 in timers {
                    e.set_timer(t2);
                    assert_eq!((e.timer(), e.stored()), (t2, st));
                }
                for st2 in stored {
                    e.set_stored(st2);
                    assert_eq!((e.timer(), e.stored()), (timers[4], st2));
                }
            }
        }
    }

    /// A state is held in its allocator size class: one that changes length
    /// within the class is rewritten in place (the allocation it had), one
    /// that leaves it gets the new class, and the cache counts the bytes
    /// allocated, not the state's length.
    #[test]
    fn a_state_that_changes_length_within_its_size_class_stays_in_place() {
        assert_eq!(
            [0, 1, 8, 9, 63, 64, 65, 80, 81, 128, 129, 200, 257].map(room_for),
            [0, 8, 8, 16, 64, 64, 80, 80, 96, 128, 160, 224, 320]
        );
        for len in 0..2_000 {
            let room = room_for(len);
            assert!(
                room >= len && room - len < (len / 4).max(8),
                "{len} -> {room}"
            );
        }
        let mut c = LeadCache::new(Limit::NONE);
        let a = LeadKey::lead("a");
        // `l:a` after an `Arc`'s two counts: 19 bytes, in the 24-byte class.
        let fixed = 24 + OVERHEAD;
        c.put(&a, &[7; 66], None);
        assert_eq!(c.bytes(), 80 + fixed);
        let at = c.get(&a).map(|e| e.data.as_ptr()).unwrap();
        for len in [67, 80, 65, 70] {
            let slot = c.slot(&a);
            c.put_at(slot, &a, &vec![len as u8; len], None);
            let e = c.get(&a).unwrap();
            assert_eq!(e.blob(), &vec![len as u8; len][..]);
            assert_eq!(e.data.as_ptr(), at, "{len} bytes fit the 80-byte class");
            assert_eq!(c.bytes(), 80 + fixed);
        }
        c.put(&a, &[1; 81], None);
        assert_eq!(c.get(&a).unwrap().blob(), &[1; 81][..]);
        assert_eq!(c.bytes(), 96 + fixed);
        c.put(&a, &[2; 3], None);
        assert_eq!(c.bytes(), 8 + fixed);
        assert_eq!(c.get(&a).unwrap().blob(), &[2; 3][..]);
        c.remove(&a);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn holds_gets_and_removes() {
        let mut c = LeadCache::new(Limit::NONE);
        let a = LeadKey::lead("a");
        c.put(&a, b"xyz", Some(5));
        assert_eq!(
            c.get(&a).map(|e| (e.blob(), e.timer())),
            Some((&b"xyz"[..], Some(5)))
        );
        assert_eq!(c.dirty_len(), 1);
        let taken = |c: &mut LeadCache| {
            let mut w = ShardWrite::default();
            c.take_dirty(0, &mut w);
            w
        };
        let w = taken(&mut c);
        assert_eq!(w.leads.len(), 1);
        assert_eq!(w.state(&w.leads[0]), b"xyz");
        assert_eq!(taken(&mut c).leads.len(), 0);
        c.mark_dirty([a.clone()]);
        assert_eq!(taken(&mut c).leads.len(), 1);
        assert!(c.remove(&a).is_some());
        assert!(c.is_empty() && c.bytes() == 0);
        assert!(LeadKey::visitor("c").as_str() == "a:c" && !LeadKey::visitor("c").is_lead());
    }

    #[test]
    fn a_write_keeps_a_stored_timer_that_is_ahead_and_no_later_than_the_next() {
        use TimerWrite::*;
        let clock = 100;
        for (stored, timer, want) in [
            (Stored::Known(Some(500)), Some(500), Keep),
            (Stored::Known(Some(500)), Some(900), Keep),
            (Stored::Known(Some(500)), None, Keep),
            (Stored::Known(Some(500)), Some(400), Set(400)),
            (Stored::Known(Some(90)), Some(900), Set(900)),
            (Stored::Known(Some(90)), None, Clear),
            (Stored::Known(None), None, Keep),
            (Stored::Known(None), Some(900), Set(900)),
            (Stored::Unknown, Some(900), Set(900)),
            (Stored::Unknown, None, Clear),
        ] {
            assert_eq!(stored.write(timer, clock), want, "{stored:?} {timer:?}");
        }
        assert_eq!(
            Stored::Known(Some(5)).after(Set(7), true),
            Stored::Known(Some(7))
        );
        assert_eq!(
            Stored::Known(Some(5)).after(Keep, true),
            Stored::Known(Some(5))
        );
        assert_eq!(Stored::Known(Some(5)).after(Set(7), false), Stored::Unknown);
    }

    #[test]
    fn a_lead_whose_timer_the_store_lacks_is_written_before_it_is_evicted() {
        let mut c = LeadCache::new(Limit {
            leads: 0,
            bytes: usize::MAX,
        });
        let a = LeadKey::lead("a");
        c.put_loaded(&a, b"s", Some(50), None, false);
        assert!(
            c.evict().is_empty(),
            "not evicted: the store has no timer for it"
        );
        let mut w = ShardWrite::default();
        let slots = c.take_dirty(0, &mut w);
        assert_eq!(w.leads[0].timer, TimerWrite::Set(50));
        c.written(&[(a.clone(), w.leads[0].timer)], &slots, true);
        assert_eq!(c.evict(), vec![(a, Some(50))]);
    }

    #[test]
    fn evicts_clean_leads_in_clock_order_and_never_dirty_ones() {
        let mut c = LeadCache::new(Limit {
            leads: 3,
            bytes: usize::MAX,
        });
        for i in 0..3 {
            c.put_clean(&LeadKey::lead(&i.to_string()), b"s", None);
        }
        c.put(&LeadKey::lead("dirty"), b"s", Some(9));
        let _ = c.get(&LeadKey::lead("1"));
        let evicted = c.evict();
        assert_eq!(evicted.len(), 1);
        assert!(c.contains(&LeadKey::lead("dirty")));
        assert_eq!(c.len(), 3);
        // All dirty: nothing can go.
        let mut d = LeadCache::new(Limit {
            leads: 1,
            bytes: usize::MAX,
        });
        d.put(&LeadKey::lead("x"), b"s", None);
        d.put(&LeadKey::lead("y"), b"s", None);
        assert!(d.evict().is_empty());
        assert!(d.over_limit());
    }

    #[test]
    fn stays_within_the_limit_whatever_streams_through() {
        let mut c = LeadCache::new(Limit {
            leads: 100,
            bytes: 64 * 1024,
        });
        for i in 0..10_000 {
            c.put_clean(&LeadKey::lead(&format!("lead-{i}")), &[0u8; 40], None);
            c.evict();
            assert!(c.len() <= 100 && c.bytes() <= 64 * 1024);
        }
    }
}
