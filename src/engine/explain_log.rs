//! The explain log: a lead's latest counted events, kept in the form they are
//! stored in, so that a lead read and written on every event copies its log
//! as one block instead of rebuilding an entry and a string per event.
//!
//! Entries are ordered by (event time, fingerprint of the event id), each
//! (event time, id) once, and bounded: the log is a function of the *set* of
//! events counted, whatever order they were applied in. An entry is
//! `at: i64 | points: f64 | rule: u16 | capped: u8 | id length: u16 | id`,
//! little-endian, times absolute (see `codec`, format 4).

use crate::event::Millis;

/// Bytes of an entry before its id.
const HEADER: usize = 8 + 8 + 2 + 1 + 2;

/// One counted event, kept for explanations.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// Index into the compiled rules.
    pub rule: u16,
    /// The input event.
    pub event_id: String,
    /// Its event time.
    pub at: Millis,
    /// Points counted for it when applied (after any cap).
    pub points: f64,
    /// Whether a cap cut the rule's points.
    pub capped: bool,
}

/// A counted event on its way into the log.
#[derive(Debug, Clone, Copy)]
pub struct Counted<'a> {
    /// Index into the compiled rules.
    pub rule: u16,
    /// The input event's id.
    pub event_id: &'a str,
    /// Its event time.
    pub at: Millis,
    /// Points counted for it (after any cap).
    pub points: f64,
    /// Whether a cap cut the rule's points.
    pub capped: bool,
    /// Fingerprint of `event_id`.
    pub fp: u64,
}

/// One entry of the log, read in place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry<'a> {
    /// Index into the compiled rules.
    pub rule: u16,
    /// The input event's id.
    pub event_id: &'a str,
    /// Its event time.
    pub at: Millis,
    /// Points counted for it when applied (after any cap).
    pub points: f64,
    /// Whether a cap cut the rule's points.
    pub capped: bool,
}

impl Entry<'_> {
    /// The entry as an owned contribution.
    pub fn to_owned(&self) -> Contribution {
        Contribution {
            rule: self.rule,
            event_id: self.event_id.to_owned(),
            at: self.at,
            points: self.points,
            capped: self.capped,
        }
    }
}

/// The bounded log of a lead's latest counted events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExplainLog {
    bytes: Vec<u8>,
    len: usize,
    /// Where the last (latest) entry starts: an event later than it goes
    /// at the end without a walk through the others.
    last: usize,
}

/// Why stored log bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl ExplainLog {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every entry (keeping the buffer).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.len = 0;
        self.last = 0;
    }

    /// The entries, oldest first. An id that is not UTF-8 (stored bytes
    /// damaged in Redis) reads as U+FFFD.
    pub fn iter(&self) -> impl Iterator<Item = Entry<'_>> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let raw = Raw::at(&self.bytes, at)?;
            at = raw.next;
            Some(Entry {
                rule: raw.rule(),
                event_id: std::str::from_utf8(raw.id).unwrap_or("\u{FFFD}"),
                at: raw.at,
                points: raw.points(),
                capped: raw.capped(),
            })
        })
    }

    /// The stored form: the entries' bytes, in order.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Replaces the log with `n` entries in their stored form, checking that
    /// they are exactly `n` whole entries (ids are checked for UTF-8 when
    /// read, not here: this runs every time a lead is read).
    pub fn set_bytes(&mut self, n: usize, bytes: &[u8]) -> Result<(), Malformed> {
        let (mut at, mut last) = (0, 0);
        for _ in 0..n {
            last = at;
            at = Raw::at(bytes, at).ok_or(Malformed)?.next;
        }
        if at != bytes.len() {
            return Err(Malformed);
        }
        self.bytes.clear();
        self.bytes.extend_from_slice(bytes);
        self.len = n;
        self.last = last;
        Ok(())
    }

    /// Appends an entry after the others, as is (for logs read in order).
    pub fn push(&mut self, c: &Contribution) {
        let at = self.bytes.len();
        insert(
            &mut self.bytes,
            at,
            c.rule,
            &c.event_id,
            c.at,
            c.points,
            c.capped,
        );
        self.len += 1;
        self.last = at;
    }

    /// Keeps the `capacity` latest counted events by (time, fingerprint of
    /// the id), each (time, id) once; an entry's fingerprint is computed only
    /// when its time ties with the new one's. An id counted again at another
    /// time (after the de-duplication memory forgot it) is another
    /// contribution, shown as such.
    pub fn remember(&mut self, c: &Counted<'_>, capacity: usize) {
        if capacity == 0 {
            return;
        }
        let before_new =
            |e: &Raw<'_>| e.at < c.at || (e.at == c.at && xxhash_rust::xxh3::xxh3_64(e.id) < c.fp);
        // The usual case (events mostly come in order): later than the
        // latest entry, so no repeat is possible and it goes at the end,
        // without a walk through the others.
        let after_all =
            self.len == 0 || Raw::at(&self.bytes, self.last).is_some_and(|last| last.at < c.at);
        let mut insert_at = self.bytes.len();
        if !after_all {
            // One pass: refuse a repeat, and find where the new entry goes.
            let id = c.event_id.as_bytes();
            let mut found = None;
            let mut off = 0;
            while let Some(e) = Raw::at(&self.bytes, off) {
                if e.at == c.at && e.id == id {
                    return;
                }
                if found.is_none() && !before_new(&e) {
                    found = Some(off);
                }
                off = e.next;
            }
            insert_at = found.unwrap_or(self.bytes.len());
        }
        if self.len >= capacity {
            // Full: the new entry takes the oldest one's place, if it is later.
            let Some(first) = Raw::at(&self.bytes, 0) else {
                return;
            };
            if !after_all && !before_new(&first) {
                return;
            }
            let end = first.next;
            self.bytes.drain(..end);
            self.len -= 1;
            insert_at -= end;
            self.last = self.last.saturating_sub(end);
        } else if self.bytes.capacity() == 0 {
            // Its whole capacity on the first entry (ids of about 36 bytes).
            self.bytes.reserve_exact(capacity * (HEADER + 36));
        }
        let at_end = insert_at == self.bytes.len();
        let before = self.bytes.len();
        insert(
            &mut self.bytes,
            insert_at,
            c.rule,
            c.event_id,
            c.at,
            c.points,
            c.capped,
        );
        self.last = if at_end || self.len == 0 {
            insert_at
        } else {
            self.last + (self.bytes.len() - before)
        };
        self.len += 1;
    }

    /// Renumbers the entries' rules (`None`: the rule is gone; its entries
    /// go too), after a rules change.
    pub fn remap_rules(&mut self, mut rule_of: impl FnMut(u16) -> Option<u16>) {
        let old = std::mem::take(self);
        let mut off = 0;
        while let Some(e) = Raw::at(&old.bytes, off) {
            off = e.next;
            if let Some(rule) = rule_of(e.rule()) {
                let end = self.bytes.len();
                self.bytes.extend_from_slice(&old.bytes[e.start..e.next]);
                self.bytes[end + 16..end + 18].copy_from_slice(&rule.to_le_bytes());
                self.len += 1;
                self.last = end;
            }
        }
    }
}

/// Writes an entry at byte `at` (an entry boundary), moving what follows.
fn insert(
    out: &mut Vec<u8>,
    at: usize,
    rule: u16,
    event_id: &str,
    time: Millis,
    points: f64,
    capped: bool,
) {
    // Ids are at most 256 bytes (the input contract); the length field holds more.
    let id = &event_id.as_bytes()[..event_id.len().min(usize::from(u16::MAX))];
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&time.to_le_bytes());
    header[8..16].copy_from_slice(&points.to_bits().to_le_bytes());
    header[16..18].copy_from_slice(&rule.to_le_bytes());
    header[18] = u8::from(capped);
    header[19..21].copy_from_slice(&(id.len() as u16).to_le_bytes());
    if at == out.len() {
        out.extend_from_slice(&header);
        out.extend_from_slice(id);
    } else {
        out.splice(at..at, header.iter().chain(id).copied());
    }
}

/// An entry read in place, its id unchecked.
struct Raw<'a> {
    start: usize,
    header: &'a [u8],
    at: Millis,
    id: &'a [u8],
    /// Where the next entry starts.
    next: usize,
}

impl<'a> Raw<'a> {
    /// The entry at byte `start`; `None` at the end, or if the bytes there
    /// are not a whole entry.
    fn at(bytes: &'a [u8], start: usize) -> Option<Raw<'a>> {
        let header = bytes.get(start..start.checked_add(HEADER)?)?;
        let n = usize::from(u16::from_le_bytes([header[19], header[20]]));
        let next = start + HEADER + n;
        let id = bytes.get(start + HEADER..next)?;
        if header[18] > 1 {
            return None;
        }
        Some(Raw {
            start,
            header,
            at: i64::from_le_bytes(header[..8].try_into().ok()?),
            id,
            next,
        })
    }

    fn points(&self) -> f64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.header[8..16]);
        f64::from_bits(u64::from_le_bytes(b))
    }

    fn rule(&self) -> u16 {
        u16::from_le_bytes([self.header[16], self.header[17]])
    }

    fn capped(&self) -> bool {
        self.header[18] == 1
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::fingerprint;
    use super::*;

    fn remember(log: &mut ExplainLog, id: &str, at: Millis, capacity: usize) {
        let counted = Counted {
            rule: 1,
            event_id: id,
            at,
            points: 2.0,
            capped: false,
            fp: fingerprint(id),
        };
        log.remember(&counted, capacity);
    }

    fn ids(log: &ExplainLog) -> Vec<(String, Millis)> {
        log.iter().map(|e| (e.event_id.to_owned(), e.at)).collect()
    }

    #[test]
    fn keeps_the_latest_by_time_each_once() {
        let mut log = ExplainLog::default();
        for (id, at) in [("a", 5), ("b", 3), ("c", 9), ("a", 5), ("d", 1), ("e", 7)] {
            remember(&mut log, id, at, 3);
        }
        assert_eq!(
            ids(&log),
            vec![("a".into(), 5), ("e".into(), 7), ("c".into(), 9)]
        );
        // Older than everything held: refused once full.
        remember(&mut log, "old", 0, 3);
        assert_eq!(log.len(), 3);
        // The same id at another time is another contribution.
        remember(&mut log, "c", 10, 3);
        assert_eq!(ids(&log)[2], ("c".into(), 10));
        remember(&mut log, "x", 4, 0);
        assert_eq!(log.len(), 3);
    }

    /// Time ties are ordered by the ids' fingerprints, whatever order the
    /// events come in; a full log recycles its oldest entry.
    #[test]
    fn ties_in_time_are_ordered_by_fingerprint_in_any_arrival_order() {
        let counted = [
            ("a", 0),
            ("b", 5),
            ("c", 5),
            ("d", 9),
            ("a", 7),
            ("e", 1),
            ("b", 5),
        ];
        let mut latest = vec![("b", 5), ("c", 5), ("a", 7), ("d", 9)];
        if fingerprint("c") < fingerprint("b") {
            latest.swap(0, 1);
        }
        let latest: Vec<(String, Millis)> =
            latest.into_iter().map(|(id, at)| (id.into(), at)).collect();
        let n = counted.len();
        for turn in 0..n {
            for reversed in [false, true] {
                let mut log = ExplainLog::default();
                for k in 0..n {
                    let i = if reversed { n - 1 - k } else { k };
                    let (id, at) = counted[(i + turn) % n];
                    remember(&mut log, id, at, 4);
                }
                assert_eq!(ids(&log), latest, "turn {turn}, reversed {reversed}");
            }
        }
    }

    #[test]
    fn stored_bytes_are_checked() {
        let mut log = ExplainLog::default();
        remember(&mut log, "ev-1", 10, 4);
        remember(&mut log, "ev-2", 20, 4);
        let bytes = log.as_bytes().to_vec();
        let mut back = ExplainLog::default();
        assert!(back.set_bytes(2, &bytes).is_ok());
        assert_eq!(back, log);
        assert!(back.set_bytes(3, &bytes).is_err());
        assert!(back.set_bytes(1, &bytes).is_err());
        assert!(back.set_bytes(2, &bytes[..bytes.len() - 1]).is_err());
        // An id damaged in storage is not refused (ids are checked when read).
        let mut bad_id = bytes.clone();
        bad_id[HEADER] = 0xff;
        assert!(back.set_bytes(2, &bad_id).is_ok());
        assert_eq!(back.iter().next().unwrap().event_id, "\u{FFFD}");
        assert_eq!(back.iter().nth(1).unwrap().event_id, "ev-2");
        let mut bad_flag = bytes;
        bad_flag[18] = 7;
        assert!(back.set_bytes(2, &bad_flag).is_err());
    }

    proptest! {
        /// Whatever order the same events come in, the log is the same.
        #[test]
        fn the_log_is_a_function_of_the_set_of_events(
            events in proptest::collection::vec((0u8..12, 0i64..20), 0..40),
            capacity in 0usize..8,
        ) {
            let mut forward = ExplainLog::default();
            for (id, at) in &events {
                remember(&mut forward, &format!("ev-{id}"), *at, capacity);
            }
            let mut backward = ExplainLog::default();
            for (id, at) in events.iter().rev() {
                remember(&mut backward, &format!("ev-{id}"), *at, capacity);
            }
            prop_assert_eq!(forward.len(), backward.len());
            prop_assert_eq!(ids(&forward), ids(&backward));
            for log in [&forward, &backward] {
                let mut round_trip = ExplainLog::default();
                round_trip.set_bytes(log.len(), log.as_bytes()).unwrap();
                prop_assert_eq!(&round_trip, log, "the latest entry's place is kept right");
            }
        }
    }
}
