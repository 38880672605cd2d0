//! A lead's stored binary form: the value kept in the shard's cache (one
//! allocation per lead) and in Redis.
//!
//! The form is versioned and names nothing: rule, group, fit and channel
//! positions refer to the rules layout recorded in its header (see
//! [`super::layout`]), so a stored lead can be remapped when the rules change.
//! The core is compact: small numbers as varints, times relative to the
//! lead's clock (or, in version 5, the times of events relative to its last
//! event). Three versions are read and written:
//!
//! * **5** (written by default): version 4 with the transition history
//!   packed (one byte per segment code where they fit, and times as
//!   fixed-width steps: the last entry's from the lead's clock, every
//!   other's to the entry after it; about 7 bytes an entry instead of 13),
//!   and the times of events (each rule's last match and capped matches,
//!   fit, channels, deliveries, first touch, the de-duplication memory)
//!   relative to the lead's last event, which they lie close to, rather than
//!   to its clock, which decay timers move on days past it: a lead that has
//!   moved through its segments stays small;
//! * **4**: a rule's two engagement cells behind one
//!   byte that gives both lengths (read with two loads, not a loop per
//!   byte; as short as varints), and the three bounded lists (de-duplication memory, explain log,
//!   transition history) as fixed-width entries with absolute times, so that
//!   the explain log is copied as one block (see [`super::ExplainLog`]) instead of
//!   being rebuilt entry by entry whenever a lead is read or written;
//! * **3** (every release before it): everything as varints, every time
//!   relative to the lead's clock.
//!
//! `state.format_version = 3` or `4` keeps writing an older version while a
//! rolling upgrade still has members of a release that reads only up to it.

use super::Contribution;
use super::exact::Cells;
use super::state::{
    CapState, ChannelState, FirstTouch, FitSlot, Kind, LeadState, NEVER, RuleState, Status,
    Transition,
};
use crate::event::Millis;

/// Why stored bytes could not be read. Never fatal: the lead starts afresh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Written by an unknown format version (an older leadscore's layout).
    #[error("unknown state format version {0}")]
    Version(u8),
    /// Truncated or inconsistent bytes.
    #[error("corrupt state bytes")]
    Corrupt,
}

/// The version this release writes unless told otherwise.
pub const FORMAT_VERSION: u8 = 5;

/// The previous version (fixed-width transition history), still read, and
/// written on request during a rolling upgrade from a release that reads
/// only versions 3 and 4.
pub const FORMAT_V4: u8 = 4;

/// The version every release before format 4 wrote: still read, and
/// written on request during a rolling upgrade from such a release.
pub const FORMAT_V3: u8 = 3;

/// Whether this release reads (and can write) a format version.
pub fn supported(version: u8) -> bool {
    matches!(version, FORMAT_V3 | FORMAT_V4 | FORMAT_VERSION)
}

// Presence bits of the optional fields.
const HAS_HANDOFF: u16 = 1;
const HAS_ENGAGED: u16 = 1 << 1;
const HAS_RECYCLED: u16 = 1 << 2;
const HAS_RESTING: u16 = 1 << 3;
const HAS_FIRST_TOUCH: u16 = 1 << 4;
const ARMED: u16 = 1 << 5;
const HAS_LOG: u16 = 1 << 6;
const HAS_HISTORY: u16 = 1 << 7;
const HAS_LINKED: u16 = 1 << 8;
const HAS_CHANNELS: u16 = 1 << 9;
const HAS_FIT: u16 = 1 << 10;
const HAS_DELIVERIES: u16 = 1 << 11;

/// Bytes of one history entry (version 4): from, to, reason, time.
const HISTORY_BYTES: usize = 2 + 2 + 1 + 8;

/// Version 5's history header: segment codes take two bytes each, not one.
const WIDE_CODES: u8 = 1 << 4;

impl LeadState {
    /// Encodes to the binary form of this release ([`FORMAT_VERSION`]) under
    /// rules layout `layout`.
    pub fn encode(&self, layout: u32, out: &mut Vec<u8>) {
        self.encode_as(FORMAT_VERSION, layout, out);
    }

    /// Encodes to format `version` (3, 4 or 5; anything else writes 5).
    pub fn encode_as(&self, version: u8, layout: u32, out: &mut Vec<u8>) {
        let version = if supported(version) {
            version
        } else {
            FORMAT_VERSION
        };
        let v4 = version >= FORMAT_V4;
        out.clear();
        let mut w = Writer(out);
        w.u8(version);
        w.u32(layout);
        match &self.kind {
            Kind::Lead => w.u8(0),
            Kind::Visitor => w.u8(1),
            Kind::Alias(to) => {
                w.u8(2);
                w.str(to);
            }
        }
        let base = self.as_of;
        w.ivar(base);
        if base == NEVER {
            return;
        }
        let mut flags = 0u16;
        for (bit, on) in [
            (HAS_HANDOFF, self.last_handoff_at.is_some()),
            (HAS_ENGAGED, self.last_engaged_at.is_some()),
            (HAS_RECYCLED, self.recycled_at.is_some()),
            (HAS_RESTING, self.resting_until.is_some()),
            (HAS_FIRST_TOUCH, self.first_touch.is_some()),
            (ARMED, self.armed),
            (HAS_LOG, !self.log.is_empty()),
            (HAS_HISTORY, !self.history.is_empty()),
            (HAS_LINKED, !self.linked.is_empty()),
            (HAS_CHANNELS, !self.channels.is_empty()),
            (HAS_FIT, !self.fit.is_empty()),
            (HAS_DELIVERIES, !self.deliveries.is_empty()),
        ] {
            if on {
                flags |= bit;
            }
        }
        w.uvar(u64::from(flags));
        w.time(base, self.last_event_at);
        // Times of events (version 5): relative to the last event's, which
        // they lie close to, rather than to the lead's clock, which decay
        // timers move on days past it.
        let event = if version == FORMAT_VERSION {
            self.last_event_at
        } else {
            base
        };
        w.time(base, self.tier_since);
        w.u8(self.tier);
        let (code, until) = self.status.code();
        w.u8(code);
        if code == 2 {
            w.time(base, until);
        }
        for v in [
            self.last_handoff_at,
            self.last_engaged_at,
            self.recycled_at,
            self.resting_until,
        ]
        .into_iter()
        .flatten()
        {
            w.time(base, v);
        }
        w.uvar(self.windows.len() as u64);
        for (g, cell) in &self.windows {
            w.u8(*g);
            w.ivar(*cell);
        }
        w.uvar(self.rules.len() as u64);
        for r in &self.rules {
            w.uvar(u64::from(r.rule));
            w.uvar(u64::from(r.count));
            w.time(event, r.last_at);
            if v4 {
                w.cells(r.cells);
            } else {
                w.ivar(r.cells.current);
                w.ivar(r.cells.previous);
            }
            match &r.cap {
                None => w.u8(0),
                Some(cap) => {
                    w.u8(1 + cap.admitted.len().min(254) as u8);
                    w.ivar(cap.window);
                    for t in cap.admitted.iter().take(254) {
                        w.time(event, *t);
                    }
                }
            }
        }
        if flags & HAS_FIT != 0 {
            w.uvar(self.fit.len() as u64);
            for f in &self.fit {
                w.u8(f.slot);
                w.uvar(f.rule.map_or(0, |r| u64::from(r) + 1));
                w.time(event, f.at);
                w.u32(f.tie);
            }
        }
        if flags & HAS_CHANNELS != 0 {
            w.uvar(self.channels.len() as u64);
            for c in &self.channels {
                w.u8(c.channel);
                w.u8(u8::from(c.opted_out) | (u8::from(c.last_delivered_at.is_some()) << 1));
                w.u8(c.streak);
                if let Some(t) = c.last_delivered_at {
                    w.time(event, t);
                }
            }
        }
        if flags & HAS_DELIVERIES != 0 {
            w.uvar(self.deliveries.len() as u64);
            for t in &self.deliveries {
                w.time(event, *t);
            }
        }
        if let Some(ft) = &self.first_touch {
            w.time(event, ft.at);
            w.u32(ft.tie);
            w.str(&ft.source);
            w.str(ft.campaign.as_deref().unwrap_or(""));
        }
        if flags & HAS_LINKED != 0 {
            w.uvar(self.linked.len() as u64);
            for a in &self.linked {
                w.str(a);
            }
        }
        w.uvar(self.recent.len() as u64);
        if v4 {
            w.recent(event, &self.recent);
        } else {
            for (t, f) in &self.recent {
                w.time(base, *t);
                w.u64(*f);
            }
        }
        if flags & HAS_LOG != 0 {
            w.uvar(self.log.len() as u64);
            if v4 {
                let bytes = self.log.as_bytes();
                w.uvar(bytes.len() as u64);
                w.0.extend_from_slice(bytes);
            } else {
                for c in self.log.iter() {
                    w.uvar(u64::from(c.rule));
                    w.str(c.event_id);
                    w.time(base, c.at);
                    w.f64(c.points);
                    w.u8(u8::from(c.capped));
                }
            }
        }
        if flags & HAS_HISTORY != 0 {
            w.uvar(self.history.len() as u64);
            if version == FORMAT_VERSION {
                w.history(base, &self.history);
            } else {
                for h in &self.history {
                    if v4 {
                        w.0.extend_from_slice(&h.from.to_le_bytes());
                        w.0.extend_from_slice(&h.to.to_le_bytes());
                        w.u8(h.reason);
                        w.u64(h.at as u64);
                    } else {
                        w.uvar(u64::from(h.from));
                        w.uvar(u64::from(h.to));
                        w.u8(h.reason);
                        w.time(base, h.at);
                    }
                }
            }
        }
    }

    /// The rules layout a stored state was written under.
    pub fn stored_layout(bytes: &[u8]) -> Result<u32, StateError> {
        let mut r = Reader { bytes, pos: 0 };
        match r.u8()? {
            v if supported(v) => r.u32(),
            v => Err(StateError::Version(v)),
        }
    }

    /// The lead a stored alias points to, read from the header alone (no
    /// state is unpacked); `None` for a lead, a visitor or bytes that do not decode.
    pub fn alias_target(bytes: &[u8]) -> Option<&str> {
        let mut r = Reader { bytes, pos: 0 };
        if !supported(r.u8().ok()?) {
            return None;
        }
        r.u32().ok()?;
        if r.u8().ok()? != 2 {
            return None;
        }
        let n = r.len(1).ok()?;
        std::str::from_utf8(r.take(n).ok()?).ok()
    }

    /// Decodes the binary form (any version read) into `self`, reusing its
    /// allocations. Returns the layout it was written under.
    pub fn decode_into(&mut self, bytes: &[u8]) -> Result<u32, StateError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8()?;
        if !supported(version) {
            return Err(StateError::Version(version));
        }
        let v4 = version >= FORMAT_V4;
        let layout = r.u32()?;
        let kind = match r.u8()? {
            0 => Kind::Lead,
            1 => Kind::Visitor,
            2 => Kind::Alias(r.string()?),
            _ => return Err(StateError::Corrupt),
        };
        // The first touch's strings and the capped rules' lists are read into
        // the previous lead's buffers rather than newly allocated ones.
        let spare = self.first_touch.take();
        let mut rules = std::mem::take(&mut self.rules);
        self.reset(kind);
        let base = r.ivar()?;
        self.as_of = base;
        if base == NEVER {
            self.rules = rules;
            self.rules.clear();
            return r.finish(layout);
        }
        let flags = u16::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
        self.last_event_at = r.time(base)?;
        let event = if version == FORMAT_VERSION {
            self.last_event_at
        } else {
            base
        };
        self.tier_since = r.time(base)?;
        self.tier = r.u8()?;
        let code = r.u8()?;
        let until = if code == 2 { r.time(base)? } else { 0 };
        self.status = Status::from_code(code, until).ok_or(StateError::Corrupt)?;
        self.armed = flags & ARMED != 0;
        let opt = |bit: u16, r: &mut Reader<'_>| -> Result<Option<Millis>, StateError> {
            if flags & bit != 0 {
                r.time(base).map(Some)
            } else {
                Ok(None)
            }
        };
        self.last_handoff_at = opt(HAS_HANDOFF, &mut r)?;
        self.last_engaged_at = opt(HAS_ENGAGED, &mut r)?;
        self.recycled_at = opt(HAS_RECYCLED, &mut r)?;
        self.resting_until = opt(HAS_RESTING, &mut r)?;
        let n = r.len(8)?;
        for _ in 0..n {
            let g = r.u8()?;
            let cell = r.ivar()?;
            self.windows.push((g, cell));
        }
        let n = r.len(6)?;
        for i in 0..n {
            let rule = u16::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
            let count = u32::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
            let last_at = r.time(event)?;
            let cells = if v4 {
                r.cells()?
            } else {
                Cells {
                    current: r.ivar()?,
                    previous: r.ivar()?,
                }
            };
            let old_cap = rules.get_mut(i).and_then(|s| s.cap.take());
            let cap = match r.u8()? {
                0 => None,
                m => {
                    let window = r.ivar()?;
                    let mut admitted = old_cap.map(|c| c.admitted).unwrap_or_default();
                    admitted.clear();
                    admitted.reserve(usize::from(m - 1));
                    for _ in 1..m {
                        admitted.push(r.time(event)?);
                    }
                    Some(CapState { window, admitted })
                }
            };
            let state = RuleState {
                rule,
                count,
                last_at,
                cells,
                cap,
            };
            match rules.get_mut(i) {
                Some(slot) => *slot = state,
                None => rules.push(state),
            }
        }
        rules.truncate(n);
        self.rules = rules;
        if flags & HAS_FIT != 0 {
            let n = r.len(7)?;
            for _ in 0..n {
                let slot = r.u8()?;
                let rule = match r.uvar()? {
                    0 => None,
                    v => Some(u16::try_from(v - 1).map_err(|_| StateError::Corrupt)?),
                };
                let at = r.time(event)?;
                let tie = r.u32()?;
                self.fit.push(FitSlot {
                    slot,
                    rule,
                    at,
                    tie,
                });
            }
        }
        if flags & HAS_CHANNELS != 0 {
            let n = r.len(3)?;
            for _ in 0..n {
                let channel = r.u8()?;
                let bits = r.u8()?;
                let streak = r.u8()?;
                let last_delivered_at = if bits & 2 != 0 {
                    Some(r.time(event)?)
                } else {
                    None
                };
                self.channels.push(ChannelState {
                    channel,
                    opted_out: bits & 1 != 0,
                    streak,
                    last_delivered_at,
                });
            }
        }
        if flags & HAS_DELIVERIES != 0 {
            let n = r.len(1)?;
            for _ in 0..n {
                let t = r.time(event)?;
                self.deliveries.push(t);
            }
        }
        if flags & HAS_FIRST_TOUCH != 0 {
            let at = r.time(event)?;
            let tie = r.u32()?;
            let (mut source, mut campaign) = spare
                .map(|f| (f.source, f.campaign.unwrap_or_default()))
                .unwrap_or_default();
            r.string_into(&mut source)?;
            r.string_into(&mut campaign)?;
            self.first_touch = Some(FirstTouch {
                at,
                tie,
                source,
                campaign: (!campaign.is_empty()).then_some(campaign),
            });
        }
        if flags & HAS_LINKED != 0 {
            let n = r.len(1)?;
            for _ in 0..n {
                let a = r.string()?;
                self.linked.push(a);
            }
        }
        if v4 {
            r.recent(event, &mut self.recent)?;
        } else {
            let n = r.len(9)?;
            for _ in 0..n {
                let t = r.time(base)?;
                let f = r.u64()?;
                self.recent.push((t, f));
            }
        }
        if flags & HAS_LOG != 0 {
            if v4 {
                let n = r.len(1)?;
                let size = r.len(1)?;
                let block = r.take(size)?;
                self.log
                    .set_bytes(n, block)
                    .map_err(|_| StateError::Corrupt)?;
            } else {
                let n = r.len(12)?;
                for _ in 0..n {
                    let rule = u16::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
                    let event_id = r.string()?;
                    let entry = Contribution {
                        rule,
                        event_id,
                        at: r.time(base)?,
                        points: r.f64()?,
                        capped: r.u8()? != 0,
                    };
                    self.log.push(&entry);
                }
            }
        }
        if flags & HAS_HISTORY != 0 {
            if version == FORMAT_VERSION {
                r.history(base, &mut self.history)?;
            } else if v4 {
                let n = r.len(HISTORY_BYTES)?;
                let block = r.take(n * HISTORY_BYTES)?;
                for e in block.chunks_exact(HISTORY_BYTES) {
                    self.history.push(Transition {
                        from: u16::from_le_bytes([e[0], e[1]]),
                        to: u16::from_le_bytes([e[2], e[3]]),
                        reason: e[4],
                        at: le_i64(&e[5..]),
                    });
                }
            } else {
                let n = r.len(4)?;
                for _ in 0..n {
                    let from = u16::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
                    let to = u16::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
                    let reason = r.u8()?;
                    let at = r.time(base)?;
                    self.history.push(Transition {
                        from,
                        to,
                        reason,
                        at,
                    });
                }
            }
        }
        r.finish(layout)
    }
}

/// First of the segment codes above the tiers (`Segment::Reengage`).
const SPECIAL_CODES: u16 = 1000;

/// A segment code in one byte (version 5's history): a tier below 250 as
/// itself, the six segments above the tiers (codes 1000-1005) as 250-255;
/// `None` for any other code, which is then written in two bytes.
fn code_byte(code: u16) -> Option<u8> {
    match code {
        0..250 => Some(code as u8),
        SPECIAL_CODES..=1005 => Some((code - SPECIAL_CODES + 250) as u8),
        _ => None,
    }
}

/// The segment code of a byte written by [`code_byte`].
fn byte_code(b: u8) -> u16 {
    match b {
        0..250 => u16::from(b),
        _ => u16::from(b - 250) + SPECIAL_CODES,
    }
}

/// Bytes of `u` without its high zero bytes (0 for 0).
fn byte_len(u: u64) -> usize {
    8 - u.leading_zeros() as usize / 8
}

/// `v` with its sign in the low bit, so that small magnitudes are small.
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`].
fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

/// The low `n` bytes of `u` (`n` at most 8).
fn low_bytes(u: u64, n: usize) -> u64 {
    if n == 0 {
        0
    } else {
        u & (u64::MAX >> (64 - 8 * n))
    }
}

/// An `i64` from 8 little-endian bytes.
fn le_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    i64::from_le_bytes(a)
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }
    fn uvar(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn ivar(&mut self, v: i64) {
        self.uvar(zigzag(v));
    }
    /// A time relative to `base` (the lead's clock, or in version 5 its last
    /// event for the times of events).
    fn time(&mut self, base: Millis, t: Millis) {
        self.ivar(t.wrapping_sub(base));
    }
    /// The de-duplication memory (versions 4 and 5, after its count): one
    /// byte giving the width of every entry's time (relative to `base`: the
    /// lead's clock in version 4, its last event in version 5; zigzag,
    /// without high zero bytes), then per entry that many
    /// bytes and the 8-byte fingerprint: a fixed stride, read without a loop
    /// per byte, and about as short as varints.
    fn recent(&mut self, base: Millis, recent: &[(Millis, u64)]) {
        if recent.is_empty() {
            return;
        }
        let relative = |t: Millis| zigzag(t.wrapping_sub(base));
        let widest = recent.iter().map(|(t, _)| relative(*t)).max().unwrap_or(0);
        let width = byte_len(widest).max(1);
        self.0.push(width as u8);
        for (t, f) in recent {
            self.word(relative(*t), width);
            self.0.extend_from_slice(&f.to_le_bytes());
        }
    }
    /// The transition history (version 5, after its count): a header byte
    /// giving the width of every entry's time step (low half) and whether
    /// segment codes take two bytes ([`WIDE_CODES`]; one when every code
    /// fits, see [`code_byte`]); then per entry its from and to codes, its
    /// reason and its time step (zigzag, without high zero bytes): the last
    /// entry's from the lead's clock (where the latest decay left it: often
    /// 0), every other's to the entry after it (a decay step). A fixed
    /// stride, and no full time written.
    fn history(&mut self, base: Millis, history: &[Transition]) {
        if history.is_empty() {
            return;
        }
        let step = |i: usize| {
            let next = history.get(i + 1).map_or(base, |h| h.at);
            zigzag(history[i].at.wrapping_sub(next))
        };
        let width = byte_len((0..history.len()).map(step).max().unwrap_or(0)).max(1);
        let narrow = history
            .iter()
            .all(|h| code_byte(h.from).is_some() && code_byte(h.to).is_some());
        self.u8(width as u8 | if narrow { 0 } else { WIDE_CODES });
        for (i, h) in history.iter().enumerate() {
            match (narrow, code_byte(h.from), code_byte(h.to)) {
                (true, Some(from), Some(to)) => self.0.extend_from_slice(&[from, to]),
                _ => {
                    self.0.extend_from_slice(&h.from.to_le_bytes());
                    self.0.extend_from_slice(&h.to.to_le_bytes());
                }
            }
            self.u8(h.reason);
            self.word(step(i), width);
        }
    }
    /// Two cells: a byte with the length of each (zigzag, little-endian,
    /// without the high zero bytes) in its two halves, then their bytes.
    fn cells(&mut self, c: Cells) {
        let (a, b) = (zigzag(c.current), zigzag(c.previous));
        let (la, lb) = (byte_len(a), byte_len(b));
        self.0.push((la | (lb << 4)) as u8);
        self.word(a, la);
        self.word(b, lb);
    }
    /// The low `n` bytes of `u`, little-endian (written as 8, then cut:
    /// a fixed-size copy, not a call per length).
    fn word(&mut self, u: u64, n: usize) {
        self.0.extend_from_slice(&u.to_le_bytes());
        self.0.truncate(self.0.len() - (8 - n));
    }
    fn str(&mut self, s: &str) {
        let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.uvar(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self.pos.checked_add(n).ok_or(StateError::Corrupt)?;
        let slice = self.bytes.get(self.pos..end).ok_or(StateError::Corrupt)?;
        self.pos = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(le_i64(self.take(8)?) as u64)
    }
    fn f64(&mut self) -> Result<f64, StateError> {
        Ok(f64::from_bits(self.u64()?))
    }
    fn uvar(&mut self) -> Result<u64, StateError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(StateError::Corrupt)
    }
    fn ivar(&mut self) -> Result<i64, StateError> {
        Ok(unzigzag(self.uvar()?))
    }
    fn time(&mut self, base: Millis) -> Result<Millis, StateError> {
        Ok(base.wrapping_add(self.ivar()?))
    }
    /// The de-duplication memory as [`Writer::recent`] writes it, `n` entries.
    fn recent(&mut self, base: Millis, into: &mut Vec<(Millis, u64)>) -> Result<(), StateError> {
        let n = self.len(9)?;
        if n == 0 {
            return Ok(());
        }
        let width = usize::from(self.u8()?);
        if !(1..=8).contains(&width) {
            return Err(StateError::Corrupt);
        }
        let stride = width + 8;
        let block = self.take(n.checked_mul(stride).ok_or(StateError::Corrupt)?)?;
        // An entry is at least 9 bytes: its first 8, masked, are its time.
        into.reserve(n);
        for e in block.chunks_exact(stride) {
            let d = unzigzag(low_bytes(le_i64(e) as u64, width));
            into.push((base.wrapping_add(d), le_i64(&e[width..]) as u64));
        }
        Ok(())
    }
    /// The transition history as [`Writer::history`] writes it.
    fn history(&mut self, base: Millis, into: &mut Vec<Transition>) -> Result<(), StateError> {
        let n = self.len(4)?;
        if n == 0 {
            return Ok(());
        }
        let header = self.u8()?;
        let width = usize::from(header & 0xf);
        if !(1..=8).contains(&width) || header & !(0xf | WIDE_CODES) != 0 {
            return Err(StateError::Corrupt);
        }
        let wide = header & WIDE_CODES != 0;
        let codes = if wide { 4 } else { 2 };
        let stride = codes + 1 + width;
        let block = self.take(n.checked_mul(stride).ok_or(StateError::Corrupt)?)?;
        into.reserve(n);
        let first = into.len();
        for e in block.chunks_exact(stride) {
            let (from, to) = if wide {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                )
            } else {
                (byte_code(e[0]), byte_code(e[1]))
            };
            let mut step = [0u8; 8];
            step[..width].copy_from_slice(&e[codes + 1..]);
            into.push(Transition {
                from,
                to,
                reason: e[codes],
                // The step for now; the time once the one after is known.
                at: unzigzag(u64::from_le_bytes(step)),
            });
        }
        let mut next = base;
        for h in into[first..].iter_mut().rev() {
            h.at = next.wrapping_add(h.at);
            next = h.at;
        }
        Ok(())
    }
    /// Two cells as [`Writer::cells`] writes them.
    fn cells(&mut self) -> Result<Cells, StateError> {
        let lens = self.u8()?;
        let (la, lb) = (usize::from(lens & 0xf), usize::from(lens >> 4));
        if la > 8 || lb > 8 {
            return Err(StateError::Corrupt);
        }
        let mut word = |n: usize| -> Result<i64, StateError> {
            // One 8-byte load, masked, where 8 bytes remain; else a copy.
            let u = match self.bytes.get(self.pos..self.pos + 8) {
                Some(w) => {
                    self.pos += n;
                    low_bytes(le_i64(w) as u64, n)
                }
                None => {
                    let mut b = [0u8; 8];
                    b[..n].copy_from_slice(self.take(n)?);
                    u64::from_le_bytes(b)
                }
            };
            Ok(unzigzag(u))
        };
        Ok(Cells {
            current: word(la)?,
            previous: word(lb)?,
        })
    }
    /// A count of items each at least `min_bytes` long: bounded by what is left.
    fn len(&mut self, min_bytes: usize) -> Result<usize, StateError> {
        let n = usize::try_from(self.uvar()?).map_err(|_| StateError::Corrupt)?;
        if n.saturating_mul(min_bytes) > self.bytes.len() - self.pos {
            return Err(StateError::Corrupt);
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, StateError> {
        let mut s = String::new();
        self.string_into(&mut s)?;
        Ok(s)
    }
    /// Reads a string into `into`, replacing what it held.
    fn string_into(&mut self, into: &mut String) -> Result<(), StateError> {
        let n = self.len(1)?;
        let b = self.take(n)?;
        into.clear();
        into.push_str(std::str::from_utf8(b).map_err(|_| StateError::Corrupt)?);
        Ok(())
    }
    fn finish(&self, layout: u32) -> Result<u32, StateError> {
        if self.pos == self.bytes.len() {
            Ok(layout)
        } else {
            Err(StateError::Corrupt)
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> LeadState {
        let mut s = LeadState::new(Kind::Lead);
        s.as_of = 1_764_000_000_000;
        s.last_event_at = s.as_of - 5;
        s.tier = 2;
        s.tier_since = s.as_of - 1000;
        s.status = Status::NotReady {
            until: s.as_of + 77,
        };
        s.windows = vec![(0, 7300), (1, 7301)];
        s.rules.push(RuleState {
            rule: 3,
            count: 2,
            last_at: s.as_of - 9,
            cells: Cells {
                current: 1 << 40,
                previous: -5,
            },
            cap: Some(CapState {
                window: 20_400,
                admitted: vec![s.as_of - 9, s.as_of - 2],
            }),
        });
        s.fit.push(FitSlot {
            slot: 1,
            rule: Some(4),
            at: s.as_of - 3,
            tie: 99,
        });
        s.channels.push(ChannelState {
            channel: 1,
            opted_out: true,
            streak: 3,
            last_delivered_at: Some(s.as_of - 60),
        });
        s.deliveries = vec![s.as_of - 60, s.as_of - 10];
        s.resting_until = Some(s.as_of + 86_400_000);
        s.last_engaged_at = Some(42);
        s.first_touch = Some(FirstTouch {
            at: s.as_of - 100,
            tie: 7,
            source: "google".into(),
            campaign: Some("spring".into()),
        });
        s.linked.push("cookie-1".into());
        s.log.push(&Contribution {
            rule: 3,
            event_id: "ev-1".into(),
            at: s.as_of - 9,
            points: 2.5,
            capped: true,
        });
        s.history.push(Transition {
            from: 0,
            to: 1,
            reason: 0,
            at: s.as_of - 8,
        });
        for f in 0..20 {
            s.remember(s.as_of - 100 + f as i64, f, 16);
        }
        s
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Stored states are read back by later releases (and by members still
    /// on an older one during a rolling upgrade): the bytes of a state must
    /// not change unless its format version does. Version 3 is what every
    /// release before version 4 wrote, version 4 what every release before
    /// version 5 wrote: this one reads both, and writes each byte for byte
    /// when `state.format_version` asks for it.
    #[test]
    fn the_stored_bytes_are_pinned() {
        let mut buf = Vec::new();
        sample().encode(7, &mut buf);
        assert_eq!(hex(&buf), PINNED_V5);
        sample().encode_as(FORMAT_V4, 7, &mut buf);
        assert_eq!(hex(&buf), PINNED_V4);
        sample().encode_as(FORMAT_V3, 7, &mut buf);
        assert_eq!(hex(&buf), PINNED_V3);
        for pinned in [PINNED_V3, PINNED_V4, PINNED_V5] {
            let mut back = LeadState::new(Kind::Visitor);
            assert_eq!(back.decode_into(&unhex(pinned)), Ok(7));
            assert_eq!(back, sample());
        }
    }

    const PINNED_V5: &str = concat!(
        "05070000000080a0bfe9d666fa1f09cf0f02029a01ab9fbfe9d66680f0b25202",
        "008872018a7201030207160000000000020903e0be0207060101050463000000",
        "010103036d026d09bd010700000006676f6f676c6506737072696e670108636f",
        "6f6b69652d311001b50400000000000000b30500000000000000b10600000000",
        "000000af0700000000000000ad0800000000000000ab0900000000000000a90a",
        "00000000000000a70b00000000000000a50c00000000000000a30d0000000000",
        "0000a10e000000000000009f0f000000000000009d10000000000000009b1100",
        "0000000000009912000000000000009713000000000000000119f7e797b69a01",
        "00000000000000000440030001040065762d3101010001000f",
    );

    /// A history of every kind of transition (tiers, the segments above
    /// them, a tier too high for one byte, times out of order and far
    /// apart) reads back from every version; version 5 is the shortest.
    #[test]
    fn every_history_reads_back_in_every_version() {
        let at = |i: i64| 1_764_000_000_000 + i;
        let histories: Vec<Vec<(u16, u16, Millis)>> = vec![
            vec![(0, 1, at(0))],
            vec![
                (1, 2, at(-86_400_000)),
                (2, 1000, at(-3_600_000)),
                (1000, 1005, at(-1)),
            ],
            vec![(3, 2, at(5)), (2, 1, at(-5)), (1, 0, at(i64::MAX / 4))],
            vec![(249, 250, at(0)), (250, 1004, at(1))],
            vec![(0, 1, i64::MIN), (1, 0, i64::MAX)],
        ];
        for entries in histories {
            let mut s = sample();
            s.history = entries
                .iter()
                .enumerate()
                .map(|(i, &(from, to, at))| Transition {
                    from,
                    to,
                    reason: i as u8,
                    at,
                })
                .collect();
            let mut sizes = Vec::new();
            for version in [FORMAT_V3, FORMAT_V4, FORMAT_VERSION] {
                let mut buf = Vec::new();
                s.encode_as(version, 7, &mut buf);
                let mut back = LeadState::new(Kind::Visitor);
                assert_eq!(back.decode_into(&buf), Ok(7), "version {version}");
                assert_eq!(back, s, "version {version}");
                assert!(back.decode_into(&buf[..buf.len() - 1]).is_err());
                sizes.push(buf.len());
            }
            assert!(sizes[2] < sizes[1], "{entries:?}: {sizes:?}");
        }
    }

    /// A lead that has moved through its segments over days, as decay
    /// timers move it: eight transitions take 13 bytes each in version 4,
    /// at most 8 each in version 5.
    #[test]
    fn a_full_history_is_about_half_as_long() {
        let mut s = sample();
        s.history = (0..8)
            .map(|i| Transition {
                from: i,
                to: if i == 7 { 1000 } else { i + 1 },
                reason: 1,
                at: s.as_of - 9 * 86_400_000 + i64::from(i) * 86_400_000 + i64::from(i) * 7,
            })
            .collect();
        let (mut v4, mut v5) = (Vec::new(), Vec::new());
        s.encode_as(FORMAT_V4, 7, &mut v4);
        s.encode(7, &mut v5);
        assert!(v4.len() - v5.len() >= 8 * 5, "{} -> {}", v4.len(), v5.len());
    }

    const PINNED_V4: &str = concat!(
        "04070000000080a0bfe9d666fa1f09cf0f02029a01ab9fbfe9d66680f0b25202",
        "008872018a7201030211160000000000020903e0be0211030101050563000000",
        "0101030377027713c7010700000006676f6f676c6506737072696e670108636f",
        "6f6b69652d311001bf0400000000000000bd0500000000000000bb0600000000",
        "000000b90700000000000000b70800000000000000b50900000000000000b30a",
        "00000000000000b10b00000000000000af0c00000000000000ad0d0000000000",
        "0000ab0e00000000000000a90f00000000000000a71000000000000000a51100",
        "000000000000a31200000000000000a113000000000000000119f7e797b69a01",
        "00000000000000000440030001040065762d31010000010000f8e797b69a0100",
        "00",
    );

    const PINNED_V3: &str = concat!(
        "03070000000080a0bfe9d666fa1f09cf0f02029a01ab9fbfe9d66680f0b25202",
        "008872018a72010302118080808080400903e0be021103010105056300000001",
        "01030377027713c7010700000006676f6f676c6506737072696e670108636f6f",
        "6b69652d3110bf010400000000000000bd010500000000000000bb0106000000",
        "00000000b9010700000000000000b7010800000000000000b501090000000000",
        "0000b3010a00000000000000b1010b00000000000000af010c00000000000000",
        "ad010d00000000000000ab010e00000000000000a9010f00000000000000a701",
        "1000000000000000a5011100000000000000a3011200000000000000a1011300",
        "00000000000001030465762d3111000000000000044001010001000f",
    );

    #[test]
    fn round_trips_and_rejects_garbage() {
        let s = sample();
        let mut buf = Vec::new();
        s.encode(7, &mut buf);
        let mut back = LeadState::new(Kind::Visitor);
        assert_eq!(back.decode_into(&buf), Ok(7));
        assert_eq!(back, s);
        assert!(back.decode_into(&buf[..buf.len() - 1]).is_err());
        assert_eq!(
            back.decode_into(b"\x02garbage"),
            Err(StateError::Version(2))
        );
        let mut alias = LeadState::new(Kind::Alias("lead-9".into()));
        alias.as_of = 5;
        alias.encode(1, &mut buf);
        back.decode_into(&buf).unwrap();
        assert_eq!(back.kind, Kind::Alias("lead-9".into()));
        let mut bytes = Vec::new();
        alias.encode(1, &mut bytes);
        assert_eq!(LeadState::alias_target(&bytes), Some("lead-9"));
        let mut lead = Vec::new();
        LeadState::new(Kind::Visitor).encode(1, &mut lead);
        assert_eq!(LeadState::alias_target(&lead), None);
        // Cut inside the target's name.
        assert_eq!(LeadState::alias_target(&bytes[..9]), None);
    }

    #[test]
    fn decoding_over_another_lead_reuses_buffers_and_leaves_nothing_of_it() {
        // One state decoded into a holder of a longer log and another first
        // touch, then one with fewer of both, then one with none.
        let mut longer = sample();
        let first = longer.log.iter().next().unwrap().to_owned();
        for i in 2..6 {
            longer.log.push(&Contribution {
                event_id: format!("ev-{i}-with-a-longer-id"),
                ..first.clone()
            });
        }
        let mut shorter = sample();
        shorter.first_touch.as_mut().unwrap().campaign = None;
        let mut bare = sample();
        bare.log.clear();
        bare.first_touch = None;
        let mut held = LeadState::new(Kind::Lead);
        for s in [&longer, &sample(), &shorter, &bare, &longer] {
            let mut buf = Vec::new();
            s.encode(1, &mut buf);
            held.decode_into(&buf).unwrap();
            assert_eq!(&held, s);
        }
    }

    #[test]
    fn a_reset_state_is_a_new_one() {
        for kind in [Kind::Lead, Kind::Visitor, Kind::Alias("crm-1".into())] {
            let mut s = sample();
            s.reset(kind.clone());
            assert_eq!(s, LeadState::new(kind));
        }
    }

    #[test]
    fn remembers_the_latest_by_event_time() {
        let mut s = LeadState::new(Kind::Lead);
        for f in (0..40u64).rev() {
            s.remember(f as i64, f, 16);
        }
        assert_eq!(s.recent.len(), 16);
        assert!(s.seen(39) && s.seen(24) && !s.seen(23));
        assert!(s.older_than_memory(3, 3, 16));
    }

    proptest! {
        /// Every integer reads back as written, and a varint cut short, or
        /// longer than ten bytes, is refused.
        #[test]
        fn varints_round_trip_and_refuse_truncation(v in any::<u64>(), i in any::<i64>()) {
            let mut bytes = Vec::new();
            let mut w = Writer(&mut bytes);
            w.uvar(v);
            w.ivar(i);
            let mut r = Reader { bytes: &bytes, pos: 0 };
            prop_assert_eq!(r.uvar(), Ok(v));
            prop_assert_eq!(r.ivar(), Ok(i));
            prop_assert_eq!(r.pos, bytes.len());
            let mut one = Vec::new();
            Writer(&mut one).uvar(v);
            let mut cut = Reader { bytes: &one[..one.len() - 1], pos: 0 };
            prop_assert_eq!(cut.uvar(), Err(StateError::Corrupt));
            let long = [0xffu8; 11];
            prop_assert_eq!(Reader { bytes: &long, pos: 0 }.uvar(), Err(StateError::Corrupt));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut s = LeadState::new(Kind::Lead);
            let _ = s.decode_into(&bytes);
            for version in [FORMAT_V3, FORMAT_V4, FORMAT_VERSION] {
                let mut with_header = vec![version, 0, 0, 0, 0];
                with_header.extend_from_slice(&bytes);
                let _ = s.decode_into(&with_header);
            }
        }

        #[test]
        fn any_history_round_trips_in_every_version(
            entries in proptest::collection::vec((any::<u16>(), any::<u16>(), any::<u8>(), any::<i64>()), 1..12),
            version in FORMAT_V3..=FORMAT_VERSION,
        ) {
            let mut s = sample();
            s.history = entries
                .into_iter()
                .map(|(from, to, reason, at)| Transition { from, to, reason, at })
                .collect();
            let mut buf = Vec::new();
            s.encode_as(version, 7, &mut buf);
            let mut back = LeadState::new(Kind::Lead);
            prop_assert_eq!(back.decode_into(&buf), Ok(7));
            prop_assert_eq!(back, s);
        }

        #[test]
        fn flipped_bytes_never_panic(i in 0usize..400, b in any::<u8>(), version in FORMAT_V3..=FORMAT_VERSION) {
            let mut buf = Vec::new();
            sample().encode_as(version, 7, &mut buf);
            let at = i % buf.len();
            buf[at] = b;
            let mut s = LeadState::new(Kind::Lead);
            let _ = s.decode_into(&buf);
        }
    }
}
