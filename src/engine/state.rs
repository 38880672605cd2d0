//! Per-lead state and its compact binary form: the value kept in memory (one
//! allocation per lead) and in Redis.
//!
//! Every score-bearing part is a function of the *set* of events applied, not
//! of their order: engagement is held in exact integer [`Cells`] per rule,
//! profile fit keeps per attribute the update latest by event time, caps admit
//! the earliest matches of a window by event time, and the de-duplication
//! memory keeps the latest event ids by event time. Segment tiers, lifecycle
//! status and the transition history follow the order events are applied in,
//! which the shard's event-time merge makes canonical.
//!
//! The binary form is versioned and names nothing: rule, group, fit and channel
//! positions refer to the rules layout recorded in its header (see
//! [`super::layout`]), so a stored lead can be remapped when the rules change.

use super::exact::Cells;
use crate::event::Millis;

/// What a stored key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An identified lead.
    Lead,
    /// An anonymous visitor, scored silently until identified.
    Visitor,
    /// A visitor merged into a lead: its anonymous id now routes to that lead.
    Alias(String),
}

/// Where a lead stands apart from its score tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// In nurture: the visible segment is the score tier.
    Nurture,
    /// Too many messages in a row without engagement on a channel.
    Reengage,
    /// Said "not now"; returns to nurture at `until`.
    NotReady {
        /// Event time at which the lead returns to nurture.
        until: Millis,
    },
    /// An open sales opportunity: out of nurture.
    Opportunity,
    /// A customer (from the CRM, a completed booking or a purchase): out of nurture.
    Customer,
    /// Complained, or disqualified: no nurture on any channel.
    Suppressed,
}

impl Status {
    fn code(self) -> (u8, Millis) {
        match self {
            Status::Nurture => (0, 0),
            Status::Reengage => (1, 0),
            Status::NotReady { until } => (2, until),
            Status::Opportunity => (3, 0),
            Status::Customer => (4, 0),
            Status::Suppressed => (5, 0),
        }
    }

    fn from_code(code: u8, until: Millis) -> Option<Status> {
        Some(match code {
            0 => Status::Nurture,
            1 => Status::Reengage,
            2 => Status::NotReady { until },
            3 => Status::Opportunity,
            4 => Status::Customer,
            5 => Status::Suppressed,
            _ => return None,
        })
    }

    /// Whether hand-offs may fire in this status.
    pub fn in_nurture(self) -> bool {
        matches!(self, Status::Nurture | Status::Reengage)
    }
}

/// The admitted matches of a capped rule in its latest cap window.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CapState {
    /// Tumbling window index (event time / window length).
    pub window: i64,
    /// Event times of the matches that count, earliest first (at most the
    /// number the cap lets through).
    pub admitted: Vec<Millis>,
}

/// What one engagement rule has contributed to one lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleState {
    /// Index into the compiled rules.
    pub rule: u16,
    /// Matches seen (including capped ones that count zero).
    pub count: u32,
    /// Event time of the latest match.
    pub last_at: Millis,
    /// Exact decayed sum of the points it contributed, aligned with its
    /// decay group's window.
    pub cells: Cells,
    /// Cap bookkeeping, for capped rules.
    pub cap: Option<CapState>,
}

/// The profile value behind one fit attribute: the update latest by event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FitSlot {
    /// Index among the rules' fit attributes.
    pub slot: u8,
    /// The fit rule that matched the value (none: it matched no rule, 0 points).
    pub rule: Option<u16>,
    /// Event time of the update.
    pub at: Millis,
    /// Tie-break between updates at the same instant (from the event id).
    pub tie: u32,
}

/// One messaging channel of a lead (email, SMS, chat apps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelState {
    /// Index among the rules' channels.
    pub channel: u8,
    /// Unsubscribed, bounced hard or otherwise opted out of this channel.
    pub opted_out: bool,
    /// Messages delivered in a row without an open, click or reply.
    pub streak: u8,
    /// Event time of the last delivery.
    pub last_delivered_at: Option<Millis>,
}

/// The first-touch attribution of a lead: the earliest event carrying a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstTouch {
    /// Event time.
    pub at: Millis,
    /// Tie-break (from the event id).
    pub tie: u32,
    /// Source (e.g. `utm_source`), at most 64 bytes.
    pub source: String,
    /// Campaign, if the event carried one, at most 64 bytes.
    pub campaign: Option<String>,
}

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

/// One past segment transition, kept for explanations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Segment code before (see `Segment::code`).
    pub from: u16,
    /// Segment code after.
    pub to: u16,
    /// Reason code (see `Reason::code`).
    pub reason: u8,
    /// Event time.
    pub at: Millis,
}

/// The state of one lead, anonymous visitor or alias.
#[derive(Debug, Clone, PartialEq)]
pub struct LeadState {
    /// What the key holds.
    pub kind: Kind,
    /// The lead's clock: the latest instant its segment was evaluated at.
    pub as_of: Millis,
    /// Latest event time applied.
    pub last_event_at: Millis,
    /// Newest cell per decay group touched: (group, cell), by group.
    pub windows: Vec<(u8, i64)>,
    /// Per-rule contributions, by rule index.
    pub rules: Vec<RuleState>,
    /// Profile fit, by slot.
    pub fit: Vec<FitSlot>,
    /// Score tier index (tracked in every status).
    pub tier: u8,
    /// Event time the tier was entered.
    pub tier_since: Millis,
    /// Lifecycle status.
    pub status: Status,
    /// Whether a hand-off may fire.
    pub armed: bool,
    /// Event time of the last hand-off.
    pub last_handoff_at: Option<Millis>,
    /// Event time of the last engagement (an event worth positive points).
    pub last_engaged_at: Option<Millis>,
    /// Events before this instant no longer count (a CRM recycle).
    pub recycled_at: Option<Millis>,
    /// Messaging channels, by channel index.
    pub channels: Vec<ChannelState>,
    /// Times of the latest deliveries (at most the frequency cap), earliest first.
    pub deliveries: Vec<Millis>,
    /// Resting (frequency cap reached) until this instant.
    pub resting_until: Option<Millis>,
    /// First-touch attribution.
    pub first_touch: Option<FirstTouch>,
    /// Anonymous ids merged into this lead (so an erasure reaches them).
    pub linked: Vec<String>,
    /// De-duplication memory: the latest (event time, id fingerprint) pairs, ascending.
    pub recent: Vec<(Millis, u64)>,
    /// The latest counted events by event time, ascending (bounded).
    pub log: Vec<Contribution>,
    /// The most recent segment transitions, oldest first (bounded).
    pub history: Vec<Transition>,
}

/// A time never reached: the state of a lead nothing was applied to.
pub const NEVER: Millis = i64::MIN;

impl LeadState {
    /// A state with no history.
    pub fn new(kind: Kind) -> Self {
        LeadState {
            kind,
            as_of: NEVER,
            last_event_at: NEVER,
            windows: Vec::new(),
            rules: Vec::new(),
            fit: Vec::new(),
            tier: 0,
            tier_since: NEVER,
            status: Status::Nurture,
            armed: true,
            last_handoff_at: None,
            last_engaged_at: None,
            recycled_at: None,
            channels: Vec::new(),
            deliveries: Vec::new(),
            resting_until: None,
            first_touch: None,
            linked: Vec::new(),
            recent: Vec::new(),
            log: Vec::new(),
            history: Vec::new(),
        }
    }

    /// Resets to a fresh state of `kind`, keeping allocated capacity.
    pub fn reset(&mut self, kind: Kind) {
        fn emptied<T>(mut v: Vec<T>) -> Vec<T> {
            v.clear();
            v
        }
        let kept = std::mem::replace(self, LeadState::new(kind));
        self.windows = emptied(kept.windows);
        self.rules = emptied(kept.rules);
        self.fit = emptied(kept.fit);
        self.channels = emptied(kept.channels);
        self.deliveries = emptied(kept.deliveries);
        self.linked = emptied(kept.linked);
        self.recent = emptied(kept.recent);
        self.log = emptied(kept.log);
        self.history = emptied(kept.history);
    }

    /// Whether no event was ever applied.
    pub fn is_new(&self) -> bool {
        self.as_of == NEVER
    }

    /// The newest cell of a decay group, if it has contributions.
    pub fn window(&self, group: u8) -> Option<i64> {
        self.windows
            .iter()
            .find(|(g, _)| *g == group)
            .map(|(_, c)| *c)
    }

    /// The rule's state, if it ever matched.
    pub fn rule(&self, rule: u16) -> Option<&RuleState> {
        self.rules
            .binary_search_by_key(&rule, |r| r.rule)
            .ok()
            .map(|i| &self.rules[i])
    }

    /// Whether an event fingerprint is remembered.
    pub fn seen(&self, fingerprint: u64) -> bool {
        self.recent.iter().any(|(_, f)| *f == fingerprint)
    }

    /// Remembers an event, keeping the `capacity` latest by (time, fingerprint).
    pub fn remember(&mut self, at: Millis, fingerprint: u64, capacity: usize) {
        if capacity == 0 || self.seen(fingerprint) {
            return;
        }
        let key = (at, fingerprint);
        if self.recent.len() >= capacity {
            if key <= self.recent[0] {
                return;
            }
            self.recent.remove(0);
        }
        reserve_bounded(&mut self.recent, capacity);
        let i = self.recent.partition_point(|k| *k < key);
        self.recent.insert(i, key);
    }

    /// Whether the memory cannot tell if an event at `at` is a duplicate (it
    /// is full and the event is older than everything it remembers).
    pub fn older_than_memory(&self, at: Millis, fingerprint: u64, capacity: usize) -> bool {
        self.recent.len() >= capacity && self.recent.first().is_some_and(|k| (at, fingerprint) < *k)
    }
}

/// Gives a bounded log its whole capacity on its first entry: one
/// allocation instead of growing through 4, 8, 16, … as a new lead's first
/// events arrive (a state unpacked into a reused one keeps its buffers).
pub(crate) fn reserve_bounded<T>(log: &mut Vec<T>, capacity: usize) {
    if log.capacity() == 0 {
        log.reserve_exact(capacity);
    }
}

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

/// Version byte of the binary form.
pub const FORMAT_VERSION: u8 = 3;

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

impl LeadState {
    /// Encodes to the compact binary form under rules layout `layout`.
    /// Times are written relative to the lead's clock, numbers as varints.
    pub fn encode(&self, layout: u32, out: &mut Vec<u8>) {
        out.clear();
        let mut w = Writer(out);
        w.u8(FORMAT_VERSION);
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
            w.time(base, r.last_at);
            w.ivar(r.cells.current);
            w.ivar(r.cells.previous);
            match &r.cap {
                None => w.u8(0),
                Some(cap) => {
                    w.u8(1 + cap.admitted.len().min(254) as u8);
                    w.ivar(cap.window);
                    for t in cap.admitted.iter().take(254) {
                        w.time(base, *t);
                    }
                }
            }
        }
        if flags & HAS_FIT != 0 {
            w.uvar(self.fit.len() as u64);
            for f in &self.fit {
                w.u8(f.slot);
                w.uvar(f.rule.map_or(0, |r| u64::from(r) + 1));
                w.time(base, f.at);
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
                    w.time(base, t);
                }
            }
        }
        if flags & HAS_DELIVERIES != 0 {
            w.uvar(self.deliveries.len() as u64);
            for t in &self.deliveries {
                w.time(base, *t);
            }
        }
        if let Some(ft) = &self.first_touch {
            w.time(base, ft.at);
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
        for (t, f) in &self.recent {
            w.time(base, *t);
            w.u64(*f);
        }
        if flags & HAS_LOG != 0 {
            w.uvar(self.log.len() as u64);
            for c in &self.log {
                w.uvar(u64::from(c.rule));
                w.str(&c.event_id);
                w.time(base, c.at);
                w.f64(c.points);
                w.u8(u8::from(c.capped));
            }
        }
        if flags & HAS_HISTORY != 0 {
            w.uvar(self.history.len() as u64);
            for h in &self.history {
                w.uvar(u64::from(h.from));
                w.uvar(u64::from(h.to));
                w.u8(h.reason);
                w.time(base, h.at);
            }
        }
    }

    /// The rules layout a stored state was written under.
    pub fn stored_layout(bytes: &[u8]) -> Result<u32, StateError> {
        let mut r = Reader { bytes, pos: 0 };
        match r.u8()? {
            FORMAT_VERSION => r.u32(),
            v => Err(StateError::Version(v)),
        }
    }

    /// The lead a stored alias points to, read from the header alone (no
    /// state is unpacked); `None` for a lead, a visitor or bytes that do not decode.
    pub fn alias_target(bytes: &[u8]) -> Option<&str> {
        let mut r = Reader { bytes, pos: 0 };
        if r.u8().ok()? != FORMAT_VERSION {
            return None;
        }
        r.u32().ok()?;
        if r.u8().ok()? != 2 {
            return None;
        }
        let n = r.len(1).ok()?;
        std::str::from_utf8(r.take(n).ok()?).ok()
    }

    /// Decodes the binary form into `self` (reusing its allocations).
    /// Returns the layout it was written under.
    pub fn decode_into(&mut self, bytes: &[u8]) -> Result<u32, StateError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(StateError::Version(version));
        }
        let layout = r.u32()?;
        let kind = match r.u8()? {
            0 => Kind::Lead,
            1 => Kind::Visitor,
            2 => Kind::Alias(r.string()?),
            _ => return Err(StateError::Corrupt),
        };
        // Strings (the first touch's, the explain log's event ids) are read
        // into the previous lead's buffers rather than newly allocated ones.
        let spare = self.first_touch.take();
        let mut log = std::mem::take(&mut self.log);
        self.reset(kind);
        let base = r.ivar()?;
        self.as_of = base;
        if base == NEVER {
            return r.finish(layout);
        }
        let flags = u16::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
        self.last_event_at = r.time(base)?;
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
        for _ in 0..n {
            let rule = u16::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
            let count = u32::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
            let last_at = r.time(base)?;
            let cells = Cells {
                current: r.ivar()?,
                previous: r.ivar()?,
            };
            let cap = match r.u8()? {
                0 => None,
                m => {
                    let window = r.ivar()?;
                    let mut admitted = Vec::with_capacity(usize::from(m - 1));
                    for _ in 1..m {
                        admitted.push(r.time(base)?);
                    }
                    Some(CapState { window, admitted })
                }
            };
            self.rules.push(RuleState {
                rule,
                count,
                last_at,
                cells,
                cap,
            });
        }
        if flags & HAS_FIT != 0 {
            let n = r.len(7)?;
            for _ in 0..n {
                let slot = r.u8()?;
                let rule = match r.uvar()? {
                    0 => None,
                    v => Some(u16::try_from(v - 1).map_err(|_| StateError::Corrupt)?),
                };
                let at = r.time(base)?;
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
                    Some(r.time(base)?)
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
                let t = r.time(base)?;
                self.deliveries.push(t);
            }
        }
        if flags & HAS_FIRST_TOUCH != 0 {
            let at = r.time(base)?;
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
        let n = r.len(9)?;
        for _ in 0..n {
            let t = r.time(base)?;
            let f = r.u64()?;
            self.recent.push((t, f));
        }
        let n = if flags & HAS_LOG != 0 { r.len(12)? } else { 0 };
        log.truncate(n);
        for i in 0..n {
            let rule = u16::try_from(r.uvar()?).map_err(|_| StateError::Corrupt)?;
            let mut event_id = log
                .get_mut(i)
                .map(|c| std::mem::take(&mut c.event_id))
                .unwrap_or_default();
            r.string_into(&mut event_id)?;
            let entry = Contribution {
                rule,
                event_id,
                at: r.time(base)?,
                points: r.f64()?,
                capped: r.u8()? != 0,
            };
            match log.get_mut(i) {
                Some(slot) => *slot = entry,
                None => log.push(entry),
            }
        }
        self.log = log;
        if flags & HAS_HISTORY != 0 {
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
        r.finish(layout)
    }
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
        self.uvar(((v << 1) ^ (v >> 63)) as u64);
    }
    /// A time relative to the lead's clock.
    fn time(&mut self, base: Millis, t: Millis) {
        self.ivar(t.wrapping_sub(base));
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
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
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
        let u = self.uvar()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }
    fn time(&mut self, base: Millis) -> Result<Millis, StateError> {
        Ok(base.wrapping_add(self.ivar()?))
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
        s.log.push(Contribution {
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

    /// Stored states are read back by later releases (and by members still
    /// on an older one during a rolling upgrade): the bytes of a state must
    /// not change unless `FORMAT_VERSION` does.
    #[test]
    fn the_stored_bytes_are_pinned() {
        let mut buf = Vec::new();
        sample().encode(7, &mut buf);
        let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, PINNED_SAMPLE);
    }

    const PINNED_SAMPLE: &str = concat!(
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
        for i in 2..6 {
            longer.log.push(Contribution {
                event_id: format!("ev-{i}-with-a-longer-id"),
                ..longer.log[0].clone()
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
            let mut with_header = vec![FORMAT_VERSION, 0, 0, 0, 0];
            with_header.extend_from_slice(&bytes);
            let _ = s.decode_into(&with_header);
        }

        #[test]
        fn flipped_bytes_never_panic(i in 0usize..400, b in any::<u8>()) {
            let mut buf = Vec::new();
            sample().encode(7, &mut buf);
            let at = i % buf.len();
            buf[at] = b;
            let mut s = LeadState::new(Kind::Lead);
            let _ = s.decode_into(&buf);
        }
    }
}
