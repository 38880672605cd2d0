//! The leads of one shard held in memory: each lead's state is its compact
//! binary form in one allocation, owned by the cache and rewritten in place
//! (a write copies the states it takes), and the cache is bounded (by count and by
//! bytes). Beyond the limit, clean leads (already written to the store) are
//! evicted in CLOCK order — a lead used since the hand last passed gets a
//! second chance — and are reloaded from the store on their next event.
//! Dirty leads are never evicted: the write-behind must flush them first.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::event::Millis;
use crate::store::{ShardWrite, TimerWrite};

/// The key of a lead or visitor within a shard: `l:<lead id>` or `a:<anonymous id>`.
/// Shared, not copied, by the cache, the timers and the writes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeadKey(std::sync::Arc<str>);

/// What a stored key starts with when it names an identified lead.
const LEAD: &str = "l:";
/// What a stored key starts with when it names an anonymous visitor.
const VISITOR: &str = "a:";
// [`LeadKey::id`] cuts either kind off at the same length.
const _: () = assert!(LEAD.len() == VISITOR.len());

impl LeadKey {
    /// The key of a lead.
    pub fn lead(id: &str) -> LeadKey {
        LeadKey(Self::join(LEAD, id))
    }

    /// The key of an anonymous visitor (or of its alias).
    pub fn visitor(anonymous_id: &str) -> LeadKey {
        LeadKey(Self::join(VISITOR, anonymous_id))
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
        (stored.starts_with(LEAD) || stored.starts_with(VISITOR)).then(|| LeadKey(stored.into()))
    }

    /// Whether it names an identified lead.
    pub fn is_lead(&self) -> bool {
        Self::lead_id(&self.0).is_some()
    }

    /// The lead id in a key as stored, if it names an identified lead.
    pub fn lead_id(stored: &str) -> Option<&str> {
        stored.strip_prefix(LEAD)
    }

    /// The id without its kind.
    pub fn id(&self) -> &str {
        &self.0[LEAD.len()..]
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
        self.join(LEAD, id)
    }

    /// The key of an anonymous visitor (`a:<anonymous id>`).
    pub fn visitor(&mut self, anonymous_id: &str) -> &str {
        self.join(VISITOR, anonymous_id)
    }

    fn join(&mut self, kind: &str, id: &str) -> &str {
        self.0.clear();
        self.0.push_str(kind);
        self.0.push_str(id);
        &self.0
    }
}

/// Lead keys (as stored) written one after another into one buffer, to be
/// looked up together ([`LeadCache::find_all`]); an empty one stands for
/// none.
#[derive(Debug, Default)]
pub struct KeyList {
    text: String,
    ends: Vec<u32>,
}

impl KeyList {
    /// Empties the list, keeping its buffers.
    pub fn clear(&mut self) {
        self.text.clear();
        self.ends.clear();
    }

    /// Adds a lead's key (`l:<id>`), or none.
    pub fn lead(&mut self, id: Option<&str>) {
        self.push(LEAD, id);
    }

    /// Adds an anonymous visitor's key (`a:<anonymous id>`), or none.
    pub fn visitor(&mut self, anonymous_id: Option<&str>) {
        self.push(VISITOR, anonymous_id);
    }

    fn push(&mut self, kind: &str, id: Option<&str>) {
        if let Some(id) = id {
            self.text.push_str(kind);
            self.text.push_str(id);
        }
        self.ends.push(self.text.len() as u32);
    }

    /// Keys in the list (none counted).
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`th key ("" for none).
    pub fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
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

impl AsRef<str> for LeadKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// One cached lead: its key and its state in one allocation, and its timers.
pub struct Entry {
    /// Its key's text (the first `key_len` bytes), then its state in the
    /// stored binary form (`len` bytes), in one allocation sized to the
    /// allocator's size class (see [`room_for`]): a state that grows or
    /// shrinks by a few bytes is rewritten in place, and a lookup that
    /// compares the key has already brought in the state it reads next.
    data: Box<[u8]>,
    /// Its next timer, if `flags` has [`HAS_TIMER`] (see [`Entry::timer`]).
    timer_at: Millis,
    /// The timer the store holds for it, if `flags` has [`STORED_TIMER`]
    /// (see [`Entry::stored`]).
    stored_at: Millis,
    /// The state's length, after the key.
    len: u32,
    /// The key's length ([`crate::event::MAX_ID_LEN`] and its kind fit).
    key_len: u16,
    /// [`HAS_TIMER`], [`STORED_TIMER`], [`STORED_UNKNOWN`], [`DIRTY`],
    /// [`WRITING`], [`REFERENCED`].
    flags: u8,
}

/// [`Entry::flags`]: the lead has a next timer.
const HAS_TIMER: u8 = 1;
/// [`Entry::flags`]: the store holds a timer for it (`Stored::Known(Some)`).
const STORED_TIMER: u8 = 2;
/// [`Entry::flags`]: what the store holds is unknown (`Stored::Unknown`).
const STORED_UNKNOWN: u8 = 4;
/// [`Entry::flags`]: changed since it was last written.
const DIRTY: u8 = 8;
/// [`Entry::flags`]: taken by a write that has not finished (never evicted meanwhile).
const WRITING: u8 = 16;
/// [`Entry::flags`]: used since the CLOCK hand last passed it.
const REFERENCED: u8 = 32;

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids are personal data: only the key's kind and length are shown.
        f.debug_struct("Entry")
            .field(
                "key",
                &format_args!("{}…{}", &self.key()[..2], self.key_len - 2),
            )
            .field("len", &self.len)
            .field("timer", &self.timer())
            .field("stored", &self.stored())
            .field("flags", &self.flags)
            .finish()
    }
}

impl Entry {
    fn new(key: &str, blob: &[u8], timer: Option<Millis>, stored: Stored, dirty: bool) -> Entry {
        let mut e = Entry {
            data: Box::default(),
            timer_at: 0,
            stored_at: 0,
            len: 0,
            key_len: u16::try_from(key.len()).expect("keys are at most MAX_ID_LEN + 2 bytes"),
            flags: REFERENCED,
        };
        e.set_flag(DIRTY, dirty);
        e.set_timer(timer);
        e.set_stored(stored);
        e.store(key.as_bytes(), blob);
        e
    }

    fn flag(&self, bit: u8) -> bool {
        self.flags & bit != 0
    }

    fn set_flag(&mut self, bit: u8, on: bool) {
        self.flags = if on {
            self.flags | bit
        } else {
            self.flags & !bit
        };
    }

    /// Its key, as stored (`l:…` or `a:…`).
    pub fn key(&self) -> &str {
        std::str::from_utf8(self.key_bytes()).expect("keys are stored from text")
    }

    fn key_bytes(&self) -> &[u8] {
        &self.data[..usize::from(self.key_len)]
    }

    /// Its state, in the stored binary form.
    pub fn blob(&self) -> &[u8] {
        let at = usize::from(self.key_len);
        &self.data[at..at + self.len as usize]
    }

    /// Changed since it was last written.
    pub fn dirty(&self) -> bool {
        self.flag(DIRTY)
    }

    /// Bytes its allocation takes.
    fn room(&self) -> usize {
        self.data.len()
    }

    /// Replaces its state, in place when key and state still fit the
    /// allocation's size class; returns the change in bytes allocated.
    fn set_blob(&mut self, blob: &[u8]) -> isize {
        let at = usize::from(self.key_len);
        if room_for(at + blob.len()) == self.data.len() {
            self.data[at..at + blob.len()].copy_from_slice(blob);
            self.len = Self::state_len(blob);
            return 0;
        }
        let before = self.data.len();
        let key = std::mem::take(&mut self.data);
        self.store(&key[..at], blob);
        self.data.len() as isize - before as isize
    }

    /// Writes key and state into a new allocation of their size class,
    /// copied once with only the class's spare tail zeroed.
    fn store(&mut self, key: &[u8], blob: &[u8]) {
        let room = room_for(key.len() + blob.len());
        let mut data = Vec::with_capacity(room);
        data.extend_from_slice(key);
        data.extend_from_slice(blob);
        data.resize(room, 0);
        self.data = data.into_boxed_slice();
        self.len = Self::state_len(blob);
    }

    fn state_len(blob: &[u8]) -> u32 {
        u32::try_from(blob.len()).expect("a lead's state is far below 4 GiB")
    }

    /// Its next timer.
    pub fn timer(&self) -> Option<Millis> {
        self.flag(HAS_TIMER).then_some(self.timer_at)
    }

    fn set_timer(&mut self, timer: Option<Millis>) {
        self.timer_at = timer.unwrap_or(0);
        self.set_flag(HAS_TIMER, timer.is_some());
    }

    /// The timer the store holds for it (see [`TimerWrite`]).
    fn stored(&self) -> Stored {
        if self.flag(STORED_UNKNOWN) {
            Stored::Unknown
        } else {
            Stored::Known(self.flag(STORED_TIMER).then_some(self.stored_at))
        }
    }

    fn set_stored(&mut self, stored: Stored) {
        let (timer, unknown, at) = match stored {
            Stored::Unknown => (false, true, 0),
            Stored::Known(None) => (false, false, 0),
            Stored::Known(Some(t)) => (true, false, t),
        };
        self.stored_at = at;
        self.set_flag(STORED_TIMER, timer);
        self.set_flag(STORED_UNKNOWN, unknown);
    }
}

/// The allocation `len` bytes get: `len` rounded up to the small size
/// classes of the allocator (mimalloc: multiples of 8 to 64 bytes, then
/// four classes per power of two), so it costs no memory the allocator
/// would not take anyway. States change length by a byte or two as their
/// numbers grow; most changes then stay within the allocation, where an
/// exact-length one was freed and allocated again.
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

/// Bookkeeping bytes per entry beyond its key and state (slab entry, table slot).
const OVERHEAD: usize = std::mem::size_of::<Option<Entry>>() + 8;

/// Bytes a lead's next timer adds: its place in the cache's due heap.
const DUE_SLOT: usize = std::mem::size_of::<Reverse<(Millis, u32)>>();

/// The cache.
pub struct LeadCache {
    slab: Vec<Option<Entry>>,
    free: Vec<u32>,
    table: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// The next timers of the leads held, earliest first, by slot: an
    /// entry whose slot no longer has that timer is stale and dropped as it
    /// surfaces (a slot reused by a lead with the very same timer makes it
    /// that lead's, which is due then too).
    due: BinaryHeap<Reverse<(Millis, u32)>>,
    /// Leads held with a next timer.
    timers: usize,
    hand: usize,
    len: usize,
    /// Bytes of the entries (key and state allocations and bookkeeping).
    bytes: usize,
    limit: Limit,
    dirty: Vec<u32>,
}

impl std::fmt::Debug for LeadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeadCache")
            .field("len", &self.len)
            .field("bytes", &self.bytes())
            .field("timers", &self.timers)
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
            due: BinaryHeap::new(),
            timers: 0,
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

    /// Bytes held: each lead's key and state as allocated, its slot and
    /// table entry, and its place in the due heap if it has a timer.
    pub fn bytes(&self) -> usize {
        self.bytes + self.timers * DUE_SLOT
    }

    /// Leads held with a next timer.
    pub fn timers_len(&self) -> usize {
        self.timers
    }

    /// Leads changed since their last write.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// Where a key (as stored: `l:…`, `a:…`) is held.
    pub fn find_str(&self, key: &str) -> Option<u32> {
        let slab = &self.slab;
        self.table
            .find(self.hasher.hash_one(key), |&i| {
                slab[i as usize]
                    .as_ref()
                    .is_some_and(|e| e.key_bytes() == key.as_bytes())
            })
            .copied()
    }

    fn find(&self, key: impl AsRef<str>) -> Option<u32> {
        self.find_str(key.as_ref())
    }

    /// [`LeadCache::find_str`] of every key in `keys`, into `slots` (in the
    /// same order; none for an empty key). A lookup is a chain of memory
    /// reads that each wait for the one before (the table's control bytes,
    /// its slot, the slab entry, the key) and, with a working set beyond the
    /// CPU's caches, each of them misses; one lookup after the other, a
    /// round waits for them in turn. Here every key's table probe runs
    /// first, then every candidate entry's key is compared, so the reads of
    /// different keys are in flight together. A probe takes the first entry
    /// whose hash tag matches; when its key turns out to differ (another key
    /// with the same 7-bit tag), that key is looked up in full.
    pub fn find_all(&self, keys: &KeyList, slots: &mut Vec<Option<u32>>) {
        slots.clear();
        slots.extend((0..keys.len()).map(|i| {
            let key = keys.get(i);
            if key.is_empty() {
                return None;
            }
            self.table
                .find(self.hasher.hash_one(key), |_| true)
                .copied()
        }));
        self.recheck(keys, slots, 0..keys.len());
    }

    /// The key held in a slot.
    pub fn key_at(&self, slot: u32) -> Option<&str> {
        self.slab.get(slot as usize)?.as_ref().map(Entry::key)
    }

    /// The entry of a key, marking it used.
    pub fn get(&mut self, key: impl AsRef<str>) -> Option<&Entry> {
        let i = self.find(key)?;
        self.touch(i)
    }

    /// The entry in a slot, marking it used.
    pub fn touch(&mut self, slot: u32) -> Option<&Entry> {
        let e = self.slab.get_mut(slot as usize)?.as_mut()?;
        e.set_flag(REFERENCED, true);
        Some(e)
    }

    /// Whether a key is held (without marking it used).
    pub fn contains(&self, key: impl AsRef<str>) -> bool {
        self.find(key).is_some()
    }

    /// A copy of a lead's state, without marking it used.
    pub fn peek(&self, key: impl AsRef<str>) -> Option<Vec<u8>> {
        let i = self.find(key)? as usize;
        self.slab[i].as_ref().map(|e| e.blob().to_vec())
    }

    /// A lead's next timer, if it is held with one.
    pub fn timer(&self, key: impl AsRef<str>) -> Option<Millis> {
        let i = self.find(key)? as usize;
        self.slab[i].as_ref().and_then(Entry::timer)
    }

    /// Sets a lead's state and timer, marking it dirty (inserted if absent,
    /// as a lead the store holds no timer for).
    pub fn put(&mut self, key: impl AsRef<str>, blob: &[u8], timer: Option<Millis>) {
        self.put_with(key.as_ref(), blob, timer, true, Stored::Known(None));
    }

    /// Where a key is held: a slot valid until the key is removed or evicted.
    pub fn slot(&self, key: impl AsRef<str>) -> Option<u32> {
        self.find(key)
    }

    /// The state in a slot, if it holds `key`.
    pub fn blob_at(&self, slot: u32, key: impl AsRef<str>) -> Option<&[u8]> {
        self.entry_at(slot, key.as_ref()).map(Entry::blob)
    }

    /// Checks the slots found for `keys[range]` still hold their keys, and
    /// looks up in full each key whose slot holds another (a probe's tag
    /// matched another key, or the key was removed and its slot reused).
    /// It is [`LeadCache::find_all`]'s second pass; run again over the next
    /// few hundred of a round's items just before they are applied, it
    /// brings their entries back into the CPU's cache, the reads of
    /// different keys in flight together (a round of thousands of events
    /// touches more memory than stays cached between its lookup and the
    /// apply).
    pub fn recheck(
        &self,
        keys: &KeyList,
        slots: &mut [Option<u32>],
        range: std::ops::Range<usize>,
    ) {
        let end = range.end.min(slots.len()).min(keys.len());
        let start = range.start.min(end);
        for (i, slot) in (start..end).zip(&mut slots[start..end]) {
            if let Some(s) = *slot {
                let key = keys.get(i);
                if self.entry_at(s, key).is_none() {
                    *slot = self.find_str(key);
                }
            }
        }
    }

    /// `slot` if it holds `key` (a slot found earlier, checked before it is
    /// trusted: the lead may have been removed and its slot reused since),
    /// else wherever `key` is held.
    pub fn find_hinted(&self, slot: Option<u32>, key: &str) -> Option<u32> {
        match slot {
            Some(s) if self.entry_at(s, key).is_some() => Some(s),
            _ => self.find_str(key),
        }
    }

    fn entry_at(&self, slot: u32, key: &str) -> Option<&Entry> {
        self.slab
            .get(slot as usize)?
            .as_ref()
            .filter(|e| e.key_bytes() == key.as_bytes())
    }

    /// [`LeadCache::put`] with the slot the key was read from, which saves
    /// looking it up again (any slot that no longer holds it is ignored).
    pub fn put_at(
        &mut self,
        slot: Option<u32>,
        key: impl AsRef<str>,
        blob: &[u8],
        timer: Option<Millis>,
    ) {
        let key = key.as_ref();
        match slot.filter(|s| self.entry_at(*s, key).is_some()) {
            Some(i) => self.update(i, blob, timer, true),
            None => self.put_with(key, blob, timer, true, Stored::Known(None)),
        }
    }

    fn update(&mut self, i: u32, blob: &[u8], timer: Option<Millis>, dirty: bool) {
        let e = self.slab[i as usize]
            .as_mut()
            .expect("indexed entries exist");
        self.bytes = self.bytes.saturating_add_signed(e.set_blob(blob));
        e.set_flag(REFERENCED, true);
        if dirty && !e.dirty() {
            e.set_flag(DIRTY, true);
            self.dirty.push(i);
        }
        self.retime(i, timer);
    }

    /// Sets the next timer of the lead in slot `i`, keeping the due heap
    /// and the count of timers in step.
    fn retime(&mut self, i: u32, timer: Option<Millis>) {
        let e = self.slab[i as usize]
            .as_mut()
            .expect("indexed entries exist");
        let old = e.timer();
        if old == timer {
            return;
        }
        e.set_timer(timer);
        match (old, timer) {
            (None, Some(_)) => self.timers += 1,
            (Some(_), None) => self.timers -= 1,
            _ => {}
        }
        if let Some(t) = timer {
            self.due.push(Reverse((t, i)));
            self.tidy_due();
        }
    }

    /// Keeps the due heap's stale entries and spare room bounded: rebuilt
    /// with only its live entries once stale ones outnumber them (and a
    /// quarter of the slots, so that a rebuild, which reads every slot, is
    /// paid for by as many reschedules), shrunk once mostly empty.
    fn tidy_due(&mut self) {
        let stale = self.due.len().saturating_sub(self.timers);
        if stale > self.timers + 4096.max(self.slab.len() / 4) {
            // Rebuilt in its own allocation: a fresh one would grow from
            // nothing, copying and touching new pages, several times a
            // second on a busy shard.
            let mut live = std::mem::take(&mut self.due).into_vec();
            live.clear();
            live.extend(
                (self.slab.iter().enumerate())
                    .filter_map(|(i, e)| Some(Reverse((e.as_ref()?.timer()?, i as u32)))),
            );
            self.due = BinaryHeap::from(live);
        } else if self.due.capacity() > 4 * self.due.len() + 4096 {
            self.due.shrink_to(2 * self.due.len());
        }
    }

    /// Whether a due heap entry is still its slot's timer.
    fn live(&self, t: Millis, i: u32) -> bool {
        self.slab[i as usize]
            .as_ref()
            .is_some_and(|e| e.timer() == Some(t))
    }

    /// The earliest timer of a lead held, if due at or before `until`: its
    /// time and slot.
    pub fn peek_due(&mut self, until: Millis) -> Option<(Millis, u32)> {
        while let Some(&Reverse((t, i))) = self.due.peek() {
            if self.live(t, i) {
                return (t <= until).then_some((t, i));
            }
            self.due.pop();
        }
        None
    }

    /// Takes the timer [`LeadCache::peek_due`] returned: the lead in `slot`
    /// has no next timer until it is stored again.
    pub fn take_due(&mut self, t: Millis, slot: u32) {
        if self.due.peek() == Some(&Reverse((t, slot))) {
            self.due.pop();
        }
        if self.live(t, slot) {
            self.retime(slot, None);
        }
    }

    /// Inserts a lead just loaded from the store, with the timer the store
    /// holds for it (`stored`); `dirty` if it must be written again (it was
    /// remapped to these rules).
    ///
    /// A stored timer due by `due_by` that is not the lead's next timer was
    /// kept early (see [`Stored::write`]) and has nothing to fire: the lead
    /// is written again, which corrects it. Left in the store, it would
    /// bring the lead back from the store each time the lead left memory
    /// before its next change, for as long as the shard runs.
    pub fn put_loaded(
        &mut self,
        key: impl AsRef<str>,
        blob: &[u8],
        (timer, stored): (Option<Millis>, Option<Millis>),
        dirty: bool,
        due_by: Millis,
    ) {
        let stale = stored.is_some_and(|s| s <= due_by && timer != Some(s));
        let stored = if stale {
            Stored::Unknown
        } else {
            Stored::Known(stored)
        };
        self.put_with(key.as_ref(), blob, timer, dirty || stale, stored);
    }

    /// [`LeadCache::put_loaded`] of a clean lead whose stored timer is `timer`.
    pub fn put_clean(&mut self, key: impl AsRef<str>, blob: &[u8], timer: Option<Millis>) {
        self.put_with(key.as_ref(), blob, timer, false, Stored::Known(timer));
    }

    fn put_with(
        &mut self,
        key: &str,
        blob: &[u8],
        timer: Option<Millis>,
        dirty: bool,
        stored: Stored,
    ) {
        if let Some(i) = self.find_str(key) {
            self.update(i, blob, timer, dirty);
            return;
        }
        let entry = Entry::new(key, blob, None, stored, dirty);
        self.bytes += entry.room() + OVERHEAD;
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
        let hash = self.hasher.hash_one(key);
        let (slab, hasher) = (&self.slab, &self.hasher);
        self.table.insert_unique(hash, i, |&j| {
            hasher.hash_one(slab[j as usize].as_ref().expect("indexed").key())
        });
        self.len += 1;
        if dirty {
            self.dirty.push(i);
        }
        self.retime(i, timer);
    }

    /// Removes a key (a deleted lead); returns whether it was held.
    pub fn remove(&mut self, key: impl AsRef<str>) -> bool {
        let Some(i) = self.find(key.as_ref()) else {
            return false;
        };
        self.remove_at(i, key.as_ref());
        true
    }

    fn remove_at(&mut self, i: u32, key: &str) -> Option<Entry> {
        let hash = self.hasher.hash_one(key);
        if let Ok(slot) = self.table.find_entry(hash, |&j| j == i) {
            slot.remove();
        }
        let e = self.slab[i as usize].take()?;
        self.free.push(i);
        self.len -= 1;
        self.bytes -= e.room() + OVERHEAD;
        if e.timer().is_some() {
            self.timers -= 1;
        }
        Some(e)
    }

    /// Adds the dirty leads to `write` (their states copied into it), the
    /// shard's clock at `clock`, and returns the slots they were taken
    /// from. They count as clean but are kept in memory until
    /// [`LeadCache::written`] says how the write ended.
    pub fn take_dirty(&mut self, clock: Millis, write: &mut ShardWrite) -> Vec<u32> {
        let mut slots = Vec::with_capacity(self.dirty.len());
        write.leads.reserve(self.dirty.len());
        // The list keeps its capacity for the next round's changes.
        let mut dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            if let Some(e) = self.slab.get_mut(i as usize).and_then(Option::as_mut)
                && e.dirty()
            {
                e.set_flag(DIRTY, false);
                e.set_flag(WRITING, true);
                let op = e.stored().write(e.timer(), clock);
                write.push_lead(LeadKey::from_stored(e.key()), e.blob(), op);
                slots.push(i);
            }
        }
        dirty.clear();
        self.dirty = dirty;
        slots
    }

    /// A write of `leads` (taken from `slots`) finished: on failure they are
    /// dirty again.
    pub fn written(&mut self, leads: &[(LeadKey, TimerWrite)], slots: &[u32], ok: bool) {
        for (n, (key, op)) in leads.iter().enumerate() {
            let slot = slots
                .get(n)
                .copied()
                .filter(|s| self.entry_at(*s, key.as_str()).is_some())
                .or_else(|| self.find(key));
            if let Some(i) = slot
                && let Some(e) = self.slab[i as usize].as_mut()
            {
                e.set_flag(WRITING, false);
                e.set_stored(e.stored().after(*op, ok));
                if !ok && !e.dirty() {
                    e.set_flag(DIRTY, true);
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
                && !e.dirty()
            {
                e.set_flag(DIRTY, true);
                self.dirty.push(i);
            }
        }
    }

    /// Changes the limit (the instance's shards changed); the next eviction
    /// applies it.
    pub fn set_limit(&mut self, limit: Limit) {
        self.limit = limit;
    }

    /// About how many leads the limit allows: its count, or its bytes at
    /// the size of the leads held now (the count alone while none is held).
    pub fn leads_allowed(&self) -> usize {
        let per_lead = self.bytes().checked_div(self.len).map(|b| b.max(1));
        let by_bytes = per_lead.map_or(usize::MAX, |b| self.limit.bytes / b);
        self.limit.leads.min(by_bytes)
    }

    /// Whether the cache holds more than its limit.
    pub fn over_limit(&self) -> bool {
        self.len > self.limit.leads || self.bytes() > self.limit.bytes
    }

    /// Evicts clean leads in CLOCK order until within the limit (or nothing
    /// clean is left), and returns how many went. Each evicted key is handed
    /// to `evicted` with the timer the store holds for it: its timer leaves
    /// memory with it, and the shard finds it again in the store's pages. A
    /// lead whose next timer the store does not hold yet is written first,
    /// and may go at a later eviction.
    pub fn evict(&mut self, mut evicted: impl FnMut(&str, Option<Millis>)) -> usize {
        self.tidy_due();
        let mut n = 0;
        if !self.over_limit() || self.slab.is_empty() {
            return n;
        }
        // The key is copied out before its entry goes (one buffer a call).
        let mut key = String::new();
        // Two full turns: one to clear reference bits, one to evict.
        let mut budget = self.slab.len() * 2;
        while self.over_limit() && budget > 0 {
            budget -= 1;
            self.hand = (self.hand + 1) % self.slab.len();
            let Some(e) = self.slab[self.hand].as_mut() else {
                continue;
            };
            if e.dirty() || e.flag(WRITING) {
                continue;
            }
            if e.flag(REFERENCED) {
                e.set_flag(REFERENCED, false);
                continue;
            }
            let stored = match (e.stored(), e.timer()) {
                (Stored::Known(s), None) => s,
                (Stored::Known(Some(s)), Some(t)) if s <= t => Some(s),
                _ => {
                    e.set_stored(Stored::Unknown);
                    e.set_flag(DIRTY, true);
                    self.dirty.push(self.hand as u32);
                    continue;
                }
            };
            key.clear();
            key.push_str(e.key());
            if self.remove_at(self.hand as u32, &key).is_some() {
                evicted(&key, stored);
                n += 1;
            }
        }
        n
    }

    /// Every key held.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.slab.iter().flatten().map(Entry::key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looking keys up together finds exactly what looking each up alone
    /// finds: held keys, keys never held, removed keys (whose slots were
    /// reused by others), none. With 20,000 keys held and a 7-bit hash tag
    /// per table slot, many of the absent keys' probes meet another key's
    /// tag first, so the full lookup behind a mismatch is exercised too; a
    /// hint is trusted only while its slot still holds the key.
    #[test]
    fn keys_looked_up_together_are_found_as_one_by_one() {
        let mut c = LeadCache::new(Limit::NONE);
        for i in 0..20_000 {
            c.put(format!("l:{i}"), b"s", None);
        }
        for i in (0..20_000).step_by(3) {
            c.remove(format!("l:{i}"));
        }
        for i in 0..3_000 {
            c.put(format!("a:{i}"), b"v", None);
        }
        let mut keys = KeyList::default();
        for i in 0..25_000 {
            keys.lead(Some(&i.to_string()));
            keys.visitor((i % 2 == 0).then(|| i.to_string()).as_deref());
        }
        keys.lead(None);
        let mut slots = Vec::new();
        c.find_all(&keys, &mut slots);
        assert_eq!(slots.len(), keys.len());
        let (mut held, mut mismatched_tags) = (0, 0);
        for (i, slot) in slots.iter().enumerate() {
            let key = keys.get(i);
            let alone = (!key.is_empty()).then(|| c.find_str(key)).flatten();
            assert_eq!(*slot, alone, "{key:?}");
            held += usize::from(slot.is_some());
            let probe = c.table.find(c.hasher.hash_one(key), |_| true).copied();
            mismatched_tags += usize::from(probe.is_some() && probe != alone);
            assert_eq!(c.find_hinted(*slot, key), alone);
            assert_eq!(c.find_hinted(Some(0), key), alone);
        }
        assert_eq!(held, 20_000 - 6_667 + 1_500);
        assert!(mismatched_tags > 100, "{mismatched_tags}");
        assert_eq!(keys.get(keys.len() - 1), "");

        // Leads removed after the lookup, their slots reused by others: a
        // recheck finds each key again where its slot no longer holds it.
        for i in (1..20_000).step_by(3) {
            c.remove(format!("l:{i}"));
        }
        for i in 0..5_000 {
            c.put(format!("a:new-{i}"), b"n", None);
        }
        let before = slots.clone();
        c.recheck(&keys, &mut slots, 0..keys.len() + 10);
        let mut forgotten = 0;
        for (i, (was, now)) in before.iter().zip(&slots).enumerate() {
            let key = keys.get(i);
            let alone = (!key.is_empty()).then(|| c.find_str(key)).flatten();
            assert_eq!(*now, alone, "{key:?}");
            forgotten += usize::from(was.is_some() && now.is_none());
            assert_eq!(c.find_hinted(*now, key), alone);
        }
        assert_eq!(forgotten, 6_667);
    }

    /// An entry's two instants and their flags: every timer and stored
    /// state reads back as set, each independently of the other and of the
    /// key and state beside them, extremes included, in an entry of 40 bytes
    /// (72 with `Option`s, a shared key and a boxed state).
    #[test]
    fn an_entry_keeps_every_timer_and_stored_timer_compactly() {
        assert!(std::mem::size_of::<Option<Entry>>() <= 40);
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
                let mut e = Entry::new("l:a", b"xy", t, st, true);
                assert_eq!((e.timer(), e.stored()), (t, st));
                assert_eq!((e.key(), e.blob(), e.dirty()), ("l:a", &b"xy"[..], true));
                for t2 in timers {
                    e.set_timer(t2);
                    assert_eq!((e.timer(), e.stored()), (t2, st));
                }
                for st2 in stored {
                    e.set_stored(st2);
                    assert_eq!((e.timer(), e.stored()), (timers[4], st2));
                }
                e.set_flag(DIRTY, false);
                assert_eq!((e.key(), e.blob(), e.dirty()), ("l:a", &b"xy"[..], false));
                assert_eq!(e.stored(), stored[4]);
            }
        }
    }

    /// A key and its state are held in one allocation of the allocator's
    /// size class: a state that changes length within the class is
    /// rewritten in place (the allocation it had), one that leaves it gets
    /// the new class, and the cache counts the bytes allocated, not the
    /// state's length.
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
        // `l:a` (3 bytes) then the state.
        let fixed = OVERHEAD;
        c.put(&a, &[7; 66], None);
        assert_eq!(c.bytes(), 80 + fixed);
        let at = c.get(&a).map(|e| e.data.as_ptr()).unwrap();
        for len in [67, 77, 62, 70] {
            let slot = c.slot(&a);
            c.put_at(slot, &a, &vec![len as u8; len], None);
            let e = c.get(&a).unwrap();
            assert_eq!(e.blob(), &vec![len as u8; len][..]);
            assert_eq!(e.data.as_ptr(), at, "3 + {len} bytes fit the 80-byte class");
            assert_eq!(e.key(), "l:a");
            assert_eq!(c.bytes(), 80 + fixed);
        }
        c.put(&a, &[1; 81], None);
        assert_eq!(c.get(&a).unwrap().blob(), &[1; 81][..]);
        assert_eq!(c.get(&a).unwrap().key(), "l:a");
        assert_eq!(c.bytes(), 96 + fixed);
        // A timer adds its place in the due heap.
        c.put(&a, &[1; 81], Some(5));
        assert_eq!(c.bytes(), 96 + fixed + DUE_SLOT);
        c.put(&a, &[1; 81], None);
        c.put(&a, &[2; 3], None);
        assert_eq!(c.bytes(), 8 + fixed);
        assert_eq!(c.get(&a).unwrap().blob(), &[2; 3][..]);
        c.remove(&a);
        assert_eq!(c.bytes(), 0);
    }

    /// The timers of the leads held come due earliest first, each once:
    /// one rescheduled, cleared, taken or removed with its lead is not due
    /// at its old time, a slot reused by another lead is due at that lead's
    /// time, and stale entries do not pile up.
    #[test]
    fn the_timers_of_the_leads_held_come_due_in_order_and_once() {
        let mut c = LeadCache::new(Limit::NONE);
        let due = |c: &mut LeadCache, until| {
            let mut out = Vec::new();
            while let Some((t, slot)) = c.peek_due(until) {
                out.push((t, c.key_at(slot).unwrap().to_owned()));
                c.take_due(t, slot);
            }
            out
        };
        c.put("l:a", b"s", Some(30));
        c.put("l:b", b"s", Some(10));
        c.put("l:c", b"s", Some(20));
        c.put("l:d", b"s", Some(40));
        c.put("l:b", b"s", Some(50)); // rescheduled
        c.put("l:c", b"s", None); // cleared
        c.put("l:d", b"s", Some(35));
        c.put("l:d", b"s", Some(40)); // back to its first time: one firing
        assert_eq!(c.timers_len(), 3);
        assert_eq!(due(&mut c, 29), vec![]);
        assert_eq!(
            due(&mut c, 45),
            vec![(30, "l:a".to_owned()), (40, "l:d".to_owned())]
        );
        assert_eq!(
            c.timers_len(),
            1,
            "taken timers are gone until stored again"
        );
        assert_eq!(c.timer("l:a"), None);
        // b leaves; its slot goes to e, with b's very time and a later one.
        assert!(c.remove("l:b"));
        c.put("l:e", b"s", Some(50));
        c.put("l:f", b"s", Some(60));
        assert_eq!(
            due(&mut c, i64::MAX),
            vec![(50, "l:e".to_owned()), (60, "l:f".to_owned())]
        );
        assert_eq!(c.timers_len(), 0);
        // Rescheduling one lead over and over keeps the heap bounded.
        for t in 0..100_000 {
            c.put("l:a", b"s", Some(t));
        }
        assert!(c.due.len() <= 2 + 4096 + 1, "{}", c.due.len());
        assert_eq!(due(&mut c, i64::MAX), vec![(99_999, "l:a".to_owned())]);
        // Once the timers have fired, the heap gives its room back.
        for i in 0..50_000 {
            c.put(format!("l:{i}"), b"s", Some(i));
        }
        assert_eq!(due(&mut c, i64::MAX).len(), 50_000);
        c.evict(|_, _| {});
        assert!(c.due.capacity() <= 4096, "{}", c.due.capacity());
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
        assert!(c.remove(&a));
        assert!(!c.remove(&a));
        assert!(c.is_empty() && c.bytes() == 0 && c.timers_len() == 0);
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

    /// What `evict` hands over, collected.
    fn evicted(c: &mut LeadCache) -> Vec<(String, Option<Millis>)> {
        let mut out = Vec::new();
        let n = c.evict(|k, t| out.push((k.to_owned(), t)));
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn a_lead_whose_timer_the_store_lacks_is_written_before_it_is_evicted() {
        let mut c = LeadCache::new(Limit {
            leads: 0,
            bytes: usize::MAX,
        });
        let a = LeadKey::lead("a");
        c.put_loaded(&a, b"s", (Some(50), None), false, 0);
        assert!(
            evicted(&mut c).is_empty(),
            "not evicted: the store has no timer for it"
        );
        let mut w = ShardWrite::default();
        let slots = c.take_dirty(0, &mut w);
        assert_eq!(w.leads[0].timer, TimerWrite::Set(50));
        c.written(&[(a.clone(), w.leads[0].timer)], &slots, true);
        assert_eq!(evicted(&mut c), vec![("l:a".to_owned(), Some(50))]);
        assert_eq!((c.timers_len(), c.bytes()), (0, 0));
    }

    #[test]
    fn evicts_clean_leads_in_clock_order_and_never_dirty_ones() {
        let mut c = LeadCache::new(Limit {
            leads: 3,
            bytes: usize::MAX,
        });
        for i in 0..3 {
            c.put_clean(LeadKey::lead(&i.to_string()), b"s", None);
        }
        c.put(LeadKey::lead("dirty"), b"s", Some(9));
        let _ = c.get(LeadKey::lead("1"));
        assert_eq!(c.evict(|_, _| {}), 1);
        assert!(c.contains(LeadKey::lead("dirty")));
        assert_eq!(c.len(), 3);
        // All dirty: nothing can go.
        let mut d = LeadCache::new(Limit {
            leads: 1,
            bytes: usize::MAX,
        });
        d.put(LeadKey::lead("x"), b"s", None);
        d.put(LeadKey::lead("y"), b"s", None);
        assert!(evicted(&mut d).is_empty());
        assert!(d.over_limit());
    }

    #[test]
    fn stays_within_the_limit_whatever_streams_through() {
        let mut c = LeadCache::new(Limit {
            leads: 100,
            bytes: 64 * 1024,
        });
        for i in 0..10_000 {
            c.put_clean(LeadKey::lead(&format!("lead-{i}")), &[0u8; 40], None);
            c.evict(|_, _| {});
            assert!(c.len() <= 100 && c.bytes() <= 64 * 1024);
        }
    }
}
