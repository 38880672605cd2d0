//! Per-lead state: what the engine keeps for one lead, anonymous visitor or
//! alias. Its stored binary form is in [`super::codec`].
//!
//! Every score-bearing part is a function of the *set* of events applied, not
//! of their order: engagement is held in exact integer [`Cells`] per rule,
//! profile fit keeps per attribute the update latest by event time, caps admit
//! the earliest matches of a window by event time, and the de-duplication
//! memory and the explain log keep the latest event ids by event time. Segment
//! tiers, lifecycle status and the transition history follow the order events
//! are applied in, which the shard's event-time merge makes canonical.

pub use super::explain_log::{Contribution, ExplainLog};

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
    pub(super) fn code(self) -> (u8, Millis) {
        match self {
            Status::Nurture => (0, 0),
            Status::Reengage => (1, 0),
            Status::NotReady { until } => (2, until),
            Status::Opportunity => (3, 0),
            Status::Customer => (4, 0),
            Status::Suppressed => (5, 0),
        }
    }

    pub(super) fn from_code(code: u8, until: Millis) -> Option<Status> {
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
    pub log: ExplainLog,
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
            log: ExplainLog::default(),
            history: Vec::new(),
        }
    }

    /// Resets to a fresh state of `kind`, keeping allocated capacity.
    pub fn reset(&mut self, kind: Kind) {
        // Field by field: replacing the whole state and moving the buffers
        // back cost several times more, and this runs for every lead read.
        let LeadState {
            kind: k,
            as_of,
            last_event_at,
            windows,
            rules,
            fit,
            tier,
            tier_since,
            status,
            armed,
            last_handoff_at,
            last_engaged_at,
            recycled_at,
            channels,
            deliveries,
            resting_until,
            first_touch,
            linked,
            recent,
            log,
            history,
        } = self;
        *k = kind;
        *as_of = NEVER;
        *last_event_at = NEVER;
        windows.clear();
        rules.clear();
        fit.clear();
        *tier = 0;
        *tier_since = NEVER;
        *status = Status::Nurture;
        *armed = true;
        *last_handoff_at = None;
        *last_engaged_at = None;
        *recycled_at = None;
        channels.clear();
        deliveries.clear();
        *resting_until = None;
        *first_touch = None;
        linked.clear();
        recent.clear();
        log.clear();
        history.clear();
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
