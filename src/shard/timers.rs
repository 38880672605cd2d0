//! A shard's decay timers not held with their leads: for each lead, the
//! instant time alone will next change it, ordered by time. The store holds
//! every timer; the cache holds those of the leads in memory (authoritative
//! for them, see [`super::cache::LeadCache::peek_due`]), and this holds a
//! window of the store's earliest timers of the other leads, loaded a page
//! at a time as the shard's clock reaches the end of the window. A restart
//! therefore reads one page, never every timer of a shard.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

type KeyMap<V> = HashMap<LeadKey, V, foldhash::fast::RandomState>;

use super::cache::LeadKey;
use crate::event::Millis;

/// Timers of one shard's leads not in memory: each key's timer in a map, and a min-heap by
/// (time, key) whose entries a later `set` makes stale instead of removing
/// them (cheap to reschedule; stale entries are dropped as they surface, and
/// the heap is rebuilt when they outnumber the live ones).
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Millis, LeadKey)>>,
    by_key: KeyMap<Millis>,
    /// Store timers due at or before this are in memory.
    loaded_until: Option<Millis>,
    /// The store has nothing after `loaded_until`.
    exhausted: bool,
}

impl Timers {
    /// Drops a lead's timer: the lead is now held, and the cache holds its
    /// timer (or it was deleted).
    pub fn forget(&mut self, key: &str) {
        self.by_key.remove(key);
    }

    /// Sets a lead's timer (`forget` clears it).
    pub fn set(&mut self, key: &LeadKey, at: Millis) {
        match self.by_key.get_mut(key) {
            Some(old) if *old == at => {}
            Some(old) => {
                *old = at;
                self.heap.push(Reverse((at, key.clone())));
            }
            None => {
                self.by_key.insert(key.clone(), at);
                self.heap.push(Reverse((at, key.clone())));
            }
        }
        if self.heap.len() > 2 * self.by_key.len() + 4096 {
            self.heap = self
                .by_key
                .iter()
                .map(|(k, t)| Reverse((*t, k.clone())))
                .collect();
        }
    }

    /// Drops stale entries from the top of the heap.
    fn settle(&mut self) {
        while let Some(Reverse((t, k))) = self.heap.peek() {
            if self.by_key.get(k) == Some(t) {
                return;
            }
            self.heap.pop();
        }
    }

    /// A lead left memory, and its timer with it: the store holds `stored`
    /// for it (no later than its next transition). If the window was paged
    /// past that already, it moves back to just before it, so that a later
    /// page brings it in again; memory thus holds the timers of the leads in
    /// the cache and of one window, however many leads pass through.
    pub fn evicted(&mut self, key: &str, stored: Option<Millis>) {
        self.forget(key);
        if let (Some(s), Some(w)) = (stored, self.loaded_until)
            && s <= w
        {
            self.loaded_until = Some(s.saturating_sub(1));
            self.exhausted = false;
        }
    }

    /// The time after which the next page should start, if the shard's clock
    /// has reached the end of the loaded window and the store may have more.
    pub fn needs_page(&self, clock: Millis) -> Option<Millis> {
        match self.loaded_until {
            None => Some(Millis::MIN),
            Some(w) if !self.exhausted && clock >= w => Some(w),
            Some(_) => None,
        }
    }

    /// Adds a page of store timers read after `after` (exclusive), at most
    /// `limit` of them. Leads held in memory keep their own timers
    /// (`held` says which). Returns false if the page made no progress (all
    /// at one instant: ask again with a larger limit).
    pub fn add_page(
        &mut self,
        after: Millis,
        limit: usize,
        page: Vec<(LeadKey, Millis)>,
        held: impl Fn(&LeadKey) -> bool,
    ) -> bool {
        let full = page.len() >= limit;
        let boundary = page.last().map(|(_, t)| *t);
        let until = match (full, boundary) {
            (false, _) => {
                self.exhausted = true;
                Millis::MAX
            }
            // The page may have cut through the timers of its last instant:
            // keep what is strictly before it and read that instant again.
            (true, Some(b)) if b > after.saturating_add(1) => b - 1,
            (true, _) => return false,
        };
        for (key, at) in page {
            if at <= until && !held(&key) && !self.by_key.contains_key(&key) {
                self.set(&key, at);
            }
        }
        self.loaded_until = Some(self.loaded_until.map_or(until, |w| w.max(until)));
        true
    }

    /// The earliest timer due at or before `until`.
    pub fn peek_due(&mut self, until: Millis) -> Option<(Millis, &LeadKey)> {
        self.settle();
        self.heap
            .peek()
            .filter(|Reverse((t, _))| *t <= until)
            .map(|Reverse((t, k))| (*t, k))
    }

    /// Removes and returns the earliest timer due at or before `until`.
    pub fn pop_due(&mut self, until: Millis) -> Option<(Millis, LeadKey)> {
        self.settle();
        if self.heap.peek().is_none_or(|Reverse((t, _))| *t > until) {
            return None;
        }
        let Reverse((t, key)) = self.heap.pop()?;
        self.by_key.remove(&key);
        Some((t, key))
    }

    /// Up to `n` timers due at or before `until`, earliest first.
    pub fn due(&mut self, until: Millis, n: usize) -> Vec<(Millis, LeadKey)> {
        let mut out: Vec<(Millis, LeadKey)> = Vec::new();
        while out.len() < n {
            self.settle();
            match self.heap.peek() {
                Some(Reverse((t, _))) if *t <= until => {
                    let Reverse(entry) = self.heap.pop().expect("peeked");
                    // Several stale copies of one live entry may exist.
                    if out.last() != Some(&entry) {
                        out.push(entry);
                    }
                }
                _ => break,
            }
        }
        for entry in &out {
            self.heap.push(Reverse(entry.clone()));
        }
        out
    }

    /// How far the store's timers are paged in: those due at or before this
    /// are in memory (`None`: no page read yet, so every stored one is ahead).
    pub fn window(&self) -> Option<Millis> {
        self.loaded_until
    }

    /// The timer of a lead, if in memory.
    pub fn get(&self, key: &LeadKey) -> Option<Millis> {
        self.by_key.get(key).copied()
    }

    /// Timers in memory.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether none is in memory.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> LeadKey {
        LeadKey::lead(s)
    }

    #[test]
    fn pages_in_order_and_keeps_held_leads_authoritative() {
        let mut t = Timers::default();
        assert_eq!(t.needs_page(0), Some(Millis::MIN));
        let page = vec![(k("a"), 10), (k("b"), 20), (k("c"), 30)];
        assert!(t.add_page(Millis::MIN, 3, page, |key| *key == k("b")));
        assert_eq!(
            t.len(),
            1,
            "a only: b is held in memory, c at the page's boundary is read again"
        );
        assert_eq!(t.needs_page(10), None);
        assert_eq!(t.needs_page(29), Some(29));
        assert!(t.add_page(29, 3, vec![(k("c"), 30)], |_| false));
        assert_eq!(t.needs_page(1_000), None, "exhausted");
        assert_eq!(t.pop_due(30), Some((10, k("a"))));
        assert_eq!(t.pop_due(30), Some((30, k("c"))));
        assert_eq!(t.pop_due(30), None);
    }

    #[test]
    fn a_page_at_one_instant_asks_again() {
        let mut t = Timers::default();
        let page = || vec![(k("a"), 5), (k("b"), 5)];
        assert!(
            t.add_page(Millis::MIN, 2, page(), |_| false),
            "progress: the window ends before 5"
        );
        assert_eq!(t.len(), 0);
        assert_eq!(t.needs_page(4), Some(4));
        assert!(!t.add_page(4, 2, page(), |_| false), "no progress");
        assert!(t.add_page(4, 4, page(), |_| false));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn an_evicted_timer_leaves_memory_and_the_window_moves_back_to_page_it_again() {
        let mut t = Timers::default();
        t.add_page(Millis::MIN, 10, vec![], |_| false);
        assert_eq!(
            t.needs_page(1_000),
            None,
            "exhausted store: the window is everything"
        );
        t.set(&k("a"), 100);
        t.evicted("l:a", Some(90));
        assert_eq!(
            t.get(&k("a")),
            None,
            "memory keeps no timer of an evicted lead"
        );
        assert_eq!(t.needs_page(88), None);
        assert_eq!(
            t.needs_page(89),
            Some(89),
            "the stored timer is paged again"
        );
        assert!(t.add_page(89, 10, vec![(k("a"), 90)], |_| false));
        assert_eq!(t.pop_due(95), Some((90, k("a"))));
        // Stored beyond the window: a later page brings it, nothing moves.
        let mut t = Timers::default();
        assert!(t.add_page(Millis::MIN, 1, vec![(k("x"), 50)], |_| false));
        assert_eq!(t.window(), Some(49));
        t.set(&k("b"), 500);
        t.evicted("l:b", Some(400));
        assert_eq!((t.window(), t.get(&k("b"))), (Some(49), None));
    }
}
