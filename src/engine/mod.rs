//! The scoring engine: pure functions from (lead state, event or instant) to
//! (new state, decisions). No I/O, no clock: time is event time passed in.
//!
//! * [`Engine::apply`] applies one event to one lead.
//! * [`Engine::advance`] moves a lead to a later instant, emitting the
//!   segment changes that time causes (decay, the end of a not-ready period or
//!   of a rest, expiry).
//! * [`Engine::next_transition`] says when that will next happen, so the
//!   caller schedules it instead of scanning all leads.
//! * [`identity`] decides which key an event's state lives under and when an
//!   anonymous visitor merges into a lead.
//!
//! Scores are exact and commutative ([`exact`]): a lead's engagement is the
//! sum of every counted event's points decayed from its own `occurred_at`,
//! the same bits whatever order the events arrived in. Transitions (segment
//! changes, hand-offs) depend on the order events are applied in; the shard
//! applies them in event-time order behind a watermark.

pub mod codec;
pub mod exact;
pub mod explain;
pub mod explain_log;
pub mod identity;
pub mod layout;
pub mod rules;
pub mod state;

use std::collections::HashMap;
use std::sync::Arc;

pub use explain_log::{Contribution, ExplainLog};
pub use rules::{Grade, Rules};

use explain_log::Counted;
pub use state::{Kind, LeadState, Status};

use exact::{Cells, Term};
use layout::Layout;
use rules::UnknownFit;
use state::{CapState, ChannelState, FirstTouch, FitSlot, RuleState, Transition};

use crate::event::{Event, EventType, Millis};

/// A lead's visible segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A nurture tier by score (index into the rules' segments).
    Tier(u8),
    /// Too many messages on a channel without engagement.
    Reengage,
    /// Said "not now".
    NotReady,
    /// Reached the frequency cap: no messages until it lifts.
    Resting,
    /// Open opportunity.
    Opportunity,
    /// Customer.
    Customer,
    /// No nurture on any channel.
    Suppressed,
}

impl Segment {
    /// Names of the built-in segments, which tiers may not use.
    pub const RESERVED: [&'static str; 6] = [
        "reengage",
        "not_ready",
        "opportunity",
        "customer",
        "suppressed",
        "resting",
    ];

    /// Whether a configured tier name collides with a built-in segment.
    pub fn is_reserved(name: &str) -> bool {
        Self::RESERVED.contains(&name)
    }

    /// The segment's name under `rules`.
    pub fn name(self, rules: &Rules) -> &str {
        match self {
            Segment::Tier(i) => rules.tiers.get(i as usize).map_or("unknown", |t| &t.name),
            Segment::Reengage => Self::RESERVED[0],
            Segment::NotReady => Self::RESERVED[1],
            Segment::Opportunity => Self::RESERVED[2],
            Segment::Customer => Self::RESERVED[3],
            Segment::Suppressed => Self::RESERVED[4],
            Segment::Resting => Self::RESERVED[5],
        }
    }

    /// Every segment name under `rules`: tiers first.
    pub fn all_names(rules: &Rules) -> Vec<&str> {
        rules
            .tiers
            .iter()
            .map(|t| t.name.as_str())
            .chain(Self::RESERVED)
            .collect()
    }

    /// A stable numeric code (for the stored segment history).
    pub fn code(self) -> u16 {
        match self {
            Segment::Tier(i) => u16::from(i),
            Segment::Reengage => 1000,
            Segment::NotReady => 1001,
            Segment::Opportunity => 1002,
            Segment::Customer => 1003,
            Segment::Suppressed => 1004,
            Segment::Resting => 1005,
        }
    }

    /// The segment of a code written by [`Segment::code`].
    pub fn from_code(code: u16) -> Segment {
        match code {
            1000 => Segment::Reengage,
            1001 => Segment::NotReady,
            1002 => Segment::Opportunity,
            1003 => Segment::Customer,
            1004 => Segment::Suppressed,
            1005 => Segment::Resting,
            i => Segment::Tier(i.min(255) as u8),
        }
    }

    /// The visible segment of a state. Exits first, then not-ready, resting,
    /// re-engagement, and the score tier.
    pub fn of(state: &LeadState) -> Segment {
        match state.status {
            Status::Customer => return Segment::Customer,
            Status::Opportunity => return Segment::Opportunity,
            Status::Suppressed => return Segment::Suppressed,
            _ => {}
        }
        if all_opted_out(state) {
            return Segment::Suppressed;
        }
        match state.status {
            Status::NotReady { .. } => Segment::NotReady,
            _ if state.resting_until.is_some() => Segment::Resting,
            Status::Reengage => Segment::Reengage,
            _ => Segment::Tier(state.tier),
        }
    }
}

/// Whether every channel the lead was reached on is opted out.
pub fn all_opted_out(s: &LeadState) -> bool {
    !s.channels.is_empty() && s.channels.iter().all(|c| c.opted_out)
}

/// Why a segment changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An engagement or profile event.
    Event,
    /// Time passed (decay, dwell or a not-ready period ending).
    Decay,
    /// A lifecycle event (CRM stage, a behaviour that exits, a complaint).
    Lifecycle,
    /// The frequency cap was reached, or lifted.
    FrequencyCap,
    /// A channel was opted out (unsubscribe, hard bounce).
    OptOut,
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 5] = [
        Reason::Event,
        Reason::Decay,
        Reason::Lifecycle,
        Reason::FrequencyCap,
        Reason::OptOut,
    ];

    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Event => "event",
            Reason::Decay => "decay",
            Reason::Lifecycle => "lifecycle",
            Reason::FrequencyCap => "frequency_cap",
            Reason::OptOut => "opt_out",
        }
    }

    /// Stored code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The reason of a stored code.
    pub fn from_code(code: u8) -> Reason {
        Reason::ALL
            .get(usize::from(code))
            .copied()
            .unwrap_or(Reason::Event)
    }
}

/// Scores at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Weighted total.
    pub total: f64,
    /// Decayed engagement.
    pub engagement: f64,
    /// Fit.
    pub fit: f64,
    /// Fit grade; `None` while no profile attribute is known.
    pub grade: Option<Grade>,
}

/// A segment transition (or a channel opt-out within one segment).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentChange {
    /// Segment before.
    pub from: Segment,
    /// Segment after.
    pub to: Segment,
    /// Scores at the transition.
    pub scores: Scores,
    /// Why.
    pub reason: Reason,
    /// The input event that caused it (none when time caused it).
    pub trigger: Option<String>,
    /// Event time of the transition.
    pub at: Millis,
    /// Indices of the channels the lead has opted out of.
    pub opted_out: Vec<u8>,
}

/// One contributing signal of a hand-off.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// Rule name.
    pub rule: String,
    /// Decayed points at the hand-off.
    pub points: f64,
    /// Event time of the rule's last match.
    pub last_at: Millis,
    /// How many events matched it.
    pub count: u32,
}

/// A hand-to-sales decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    /// Scores at the hand-off.
    pub scores: Scores,
    /// Visible segment at the hand-off.
    pub segment: Segment,
    /// Top contributing signals, largest first.
    pub top_signals: Vec<Signal>,
    /// The rule of the event that crossed the line, if it matched one.
    pub crossing_rule: Option<String>,
    /// The event that crossed the line.
    pub trigger: String,
    /// Fit points by fit rule.
    pub fit_breakdown: Vec<(String, f64)>,
    /// Profile attributes the fit rules use that are not known yet.
    pub missing_profile: Vec<String>,
    /// First-touch source and campaign.
    pub first_touch: Option<(String, Option<String>)>,
    /// Event time.
    pub at: Millis,
}

/// What the engine decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Publish a segment change.
    Change(SegmentChange),
    /// Publish a hand-off.
    Handoff(Box<Handoff>),
    /// The lead expired (retention): its state was reset; delete it unless an
    /// event applied afterwards re-created it.
    Expire {
        /// When.
        at: Millis,
    },
}

/// The outcome of applying one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event changed the state.
    Applied {
        /// The matched engagement rule, if any.
        rule: Option<u16>,
        /// The lead's segment when the event arrived.
        segment_before: Segment,
    },
    /// The event id was seen: nothing changed.
    Duplicate,
    /// The event is older than the lead's last CRM recycle: it counts nothing.
    BeforeRecycle,
}

/// Engine settings that are not scoring rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Recent event ids remembered per lead for de-duplication (0–255).
    pub dedup_window: usize,
    /// Counted events kept per lead for explanations (0–255).
    pub explain_window: usize,
    /// Segment transitions kept per lead for explanations.
    pub history_window: usize,
    /// Leads, visitors and aliases with no event for this long (and, for
    /// leads, decayed to nothing) are deleted. `None`: never.
    pub retention_ms: Option<Millis>,
    /// "Decayed to nothing": engagement below this.
    pub expire_below: f64,
    /// Binary format states are written in ([`codec::FORMAT_VERSION`], or
    /// [`codec::FORMAT_V4`] or [`codec::FORMAT_V3`] during a rolling upgrade
    /// from a release that reads only up to that).
    pub format_version: u8,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            dedup_window: 16,
            explain_window: 16,
            history_window: 8,
            retention_ms: None,
            expire_below: 1.0,
            format_version: codec::FORMAT_VERSION,
        }
    }
}

/// The engine: compiled rules, the layout stored states refer to, and its settings.
#[derive(Debug, Clone)]
pub struct Engine {
    rules: Arc<Rules>,
    layout: Arc<Layout>,
    layout_hash: u32,
    /// Layouts stored states may be written under, shared by every clone:
    /// members with other rules may add one while this one runs (a rolling
    /// rules change), and [`Engine::learn_layouts`] adds it here.
    known_layouts: Arc<parking_lot::RwLock<HashMap<u32, Layout>>>,
    config: EngineConfig,
}

/// Fingerprint of an event id (stable across versions: xxh3-64).
pub fn fingerprint(event_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(event_id.as_bytes())
}

const MAX_ATTRIBUTION_LEN: usize = 64;

/// A sum of decaying exponentials plus a constant, read at instants ≥ `t0`.
struct Curve {
    t0: f64,
    terms: [(f64, f64); rules::MAX_GROUPS],
    n: usize,
    constant: f64,
}

impl Curve {
    fn value(&self, t: f64) -> f64 {
        let dt = (t - self.t0).max(0.0);
        self.terms[..self.n]
            .iter()
            .fold(self.constant, |acc, (v, h)| acc + v * libm::exp2(-dt / h))
    }

    fn value_and_slope(&self, t: f64) -> (f64, f64) {
        let dt = (t - self.t0).max(0.0);
        let mut value = self.constant;
        let mut slope = 0.0;
        for (v, h) in &self.terms[..self.n] {
            let term = v * libm::exp2(-dt / h);
            value += term;
            slope -= term * std::f64::consts::LN_2 / h;
        }
        (value, slope)
    }

    fn slowest(&self) -> f64 {
        self.terms[..self.n]
            .iter()
            .fold(1.0, |acc, (_, h)| acc.max(*h))
    }

    /// The first integer instant `t ≥ from` at which the curve is below
    /// `threshold`, if ever. The curve never rises, so Newton's method on
    /// it, started left of the root, converges from below without
    /// overshooting; the result is then pinned to the millisecond.
    ///
    /// Every reading at or above the threshold also says that the whole
    /// milliseconds up to it are (the curve never rises, and neither does
    /// its floating-point reading), so the pinning starts after the last
    /// one: usually a single reading, the millisecond after it, settles it.
    fn first_below(&self, from: Millis, threshold: f64) -> Option<Millis> {
        let at = |t: Millis| self.value(t as f64);
        let v0 = at(from);
        if v0 < threshold {
            return Some(from);
        }
        if self.constant >= threshold || self.n == 0 {
            return None;
        }
        let excess0 = v0 - self.constant;
        let need = threshold - self.constant;
        let span =
            (self.slowest() * libm::log2(excess0 / need.max(f64::MIN_POSITIVE))).ceil() + 2.0;
        if !span.is_finite() || span > 1e15 {
            return None;
        }
        // Each term alone reaches `need` no later than the whole sum does
        // (all terms are positive), so the latest single-term root is a
        // start left of the root: exact for one term, close for several.
        let start = self.terms[..self.n]
            .iter()
            .map(|(v, h)| h * libm::log2(v / need))
            .fold(0.0_f64, f64::max);
        let mut t = (self.t0 + start).clamp(from as f64, from as f64 + span);
        // The last whole millisecond known to be at or above the threshold.
        let mut above = from;
        for _ in 0..100 {
            let (v, slope) = self.value_and_slope(t);
            let excess = v - threshold;
            if excess <= 0.0 || slope >= 0.0 {
                break;
            }
            above = above.max(t.floor() as Millis);
            let step = -excess / slope;
            if !step.is_finite() || t + step > from as f64 + span * 4.0 {
                break;
            }
            t += step;
            if step < 0.25 {
                break;
            }
        }
        let mut t = (t.floor() as Millis).max(above);
        if t > above {
            if at(t) < threshold {
                while t > above + 1 && at(t - 1) < threshold {
                    t -= 1;
                }
                return Some(t);
            }
            above = t;
        }
        for _ in 0..64 {
            t = above + 1;
            if at(t) < threshold {
                return Some(t);
            }
            above = t;
        }
        self.bisect_below(above, threshold, span)
    }

    /// The first integer instant after `lo` (which is at or above
    /// `threshold`) at which the curve is below it.
    fn bisect_below(&self, mut lo: Millis, threshold: f64, span: f64) -> Option<Millis> {
        let at = |t: Millis| self.value(t as f64);
        let step = span as Millis + 1;
        let mut hi = lo.saturating_add(step);
        while at(hi) >= threshold {
            hi = hi.saturating_add(step);
            if hi == Millis::MAX {
                return None;
            }
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if at(mid) < threshold {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    TierDown,
    NotReadyEnds,
    RestingEnds,
    Expire,
}

impl Engine {
    /// An engine over `rules` with `config`.
    pub fn new(rules: Arc<Rules>, config: EngineConfig) -> Self {
        let layout = Layout::of(&rules);
        let layout_hash = layout.hash();
        let mut known = HashMap::new();
        known.insert(layout_hash, layout.clone());
        Engine {
            rules,
            layout: Arc::new(layout),
            layout_hash,
            known_layouts: Arc::new(parking_lot::RwLock::new(known)),
            config: EngineConfig {
                dedup_window: config.dedup_window.min(255),
                explain_window: config.explain_window.min(255),
                history_window: config.history_window.min(255),
                ..config
            },
        }
    }

    /// Adds layouts earlier rules files wrote states under, so those states
    /// can be remapped by name (see [`layout`]).
    pub fn with_known_layouts(self, layouts: impl IntoIterator<Item = Layout>) -> Self {
        self.learn_layouts(layouts);
        self
    }

    /// Adds layouts found after start (written by members running other rules).
    pub fn learn_layouts(&self, layouts: impl IntoIterator<Item = Layout>) {
        let mut known = self.known_layouts.write();
        for l in layouts {
            known.insert(l.hash(), l);
        }
    }

    /// Whether states written under layout `hash` can be read by name.
    pub fn knows_layout(&self, hash: u32) -> bool {
        hash == self.layout_hash || self.known_layouts.read().contains_key(&hash)
    }

    /// The compiled rules.
    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The names stored states of these rules refer to.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A fresh state.
    pub fn new_state(&self, kind: Kind) -> LeadState {
        LeadState::new(kind)
    }

    /// Encodes a state for storage, in the configured format version.
    pub fn encode(&self, state: &LeadState, out: &mut Vec<u8>) {
        state.encode_as(self.config.format_version, self.layout_hash, out);
    }

    /// Decodes a stored state into `into`, remapping it by name if it was
    /// written under other rules. Returns whether it was remapped.
    pub fn decode_into(
        &self,
        bytes: &[u8],
        into: &mut LeadState,
    ) -> Result<bool, codec::StateError> {
        let stored = into.decode_into(bytes)?;
        if stored == self.layout_hash {
            return Ok(false);
        }
        let known = self.known_layouts.read();
        layout::remap(self, known.get(&stored), into);
        Ok(true)
    }

    /// Decodes a stored state.
    pub fn decode(&self, bytes: &[u8]) -> Result<LeadState, codec::StateError> {
        let mut s = LeadState::new(Kind::Lead);
        self.decode_into(bytes, &mut s)?;
        Ok(s)
    }

    fn half_life(&self, group: usize) -> i64 {
        self.rules.half_lives.get(group).copied().unwrap_or(1)
    }

    /// Per decay group with contributions: (group, newest cell, summed cells).
    fn group_sums<'a>(
        &'a self,
        s: &'a LeadState,
    ) -> impl Iterator<Item = (usize, i64, Cells)> + 'a {
        let rules = &self.rules.rules;
        s.windows.iter().map(move |(g, w)| {
            let cells = s
                .rules
                .iter()
                .filter(|r| {
                    rules
                        .get(r.rule as usize)
                        .is_some_and(|x| x.group == usize::from(*g))
                })
                .fold(Cells::default(), |acc, r| acc.plus(r.cells));
            (usize::from(*g), *w, cells)
        })
    }

    /// Engagement at `t`: per decay group, its exact sum decayed to `t`,
    /// floored at zero (negative points cannot make a group negative).
    pub fn engagement_at(&self, s: &LeadState, t: Millis) -> f64 {
        self.group_sums(s).fold(0.0, |acc, (g, w, cells)| {
            acc + cells.value_at(w, self.half_life(g), t).max(0.0)
        })
    }

    /// Fit score (0 while unknown).
    pub fn fit(&self, s: &LeadState) -> f64 {
        s.fit
            .iter()
            .filter_map(|f| f.rule)
            .filter_map(|r| self.rules.fit_rules.get(r as usize))
            .fold(0.0, |acc, r| acc + r.points)
    }

    /// Fit grade, `None` while no profile attribute the fit rules use is known.
    pub fn grade(&self, s: &LeadState) -> Option<Grade> {
        (!s.fit.is_empty()).then(|| self.rules.grade(self.fit(s)))
    }

    /// All scores at `t`.
    pub fn scores_at(&self, s: &LeadState, t: Millis) -> Scores {
        let engagement = self.engagement_at(s, t);
        let fit = self.fit(s);
        let w = &self.rules.weights;
        Scores {
            total: w.engagement_weight * engagement + w.fit_weight * fit,
            engagement,
            fit,
            grade: self.grade(s),
        }
    }

    fn total_at(&self, s: &LeadState, t: Millis) -> f64 {
        let w = &self.rules.weights;
        w.engagement_weight * self.engagement_at(s, t) + w.fit_weight * self.fit(s)
    }

    /// The total (or, with `engagement_only`, the engagement) as a curve from `t0`.
    fn curve(&self, s: &LeadState, t0: Millis, engagement_only: bool) -> Curve {
        let w = &self.rules.weights;
        let (we, wf) = if engagement_only {
            (1.0, 0.0)
        } else {
            (w.engagement_weight, w.fit_weight)
        };
        let mut c = Curve {
            t0: t0 as f64,
            terms: [(0.0, 1.0); rules::MAX_GROUPS],
            n: 0,
            constant: wf * self.fit(s),
        };
        for (g, win, cells) in self.group_sums(s) {
            let h = self.half_life(g);
            let v = cells.value_at(win, h, t0);
            if v > 0.0 && we > 0.0 && c.n < rules::MAX_GROUPS {
                c.terms[c.n] = (we * v, h as f64);
                c.n += 1;
            }
        }
        c
    }

    fn first_below(&self, s: &LeadState, from: Millis, threshold: f64) -> Option<Millis> {
        self.curve(s, from, false).first_below(from, threshold)
    }

    /// When the lead expires under the retention settings, if it can.
    fn expiry_at(&self, s: &LeadState) -> Option<Millis> {
        let retention = self.config.retention_ms?;
        let quiet = s.last_event_at.saturating_add(retention);
        match s.kind {
            Kind::Visitor | Kind::Alias(_) => Some(quiet),
            Kind::Lead => {
                // Exits and opt-outs are remembered for good: forgetting them
                // would nurture or hand off someone who left.
                let nurture = matches!(
                    s.status,
                    Status::Nurture | Status::Reengage | Status::NotReady { .. }
                );
                if !nurture || s.channels.iter().any(|c| c.opted_out) {
                    return None;
                }
                let engagement = self
                    .curve(s, quiet, true)
                    .first_below(quiet, self.config.expire_below)?;
                let cold = match self.rules.tiers.get(1) {
                    Some(first) => self.first_below(s, quiet, first.exit)?,
                    None => quiet,
                };
                Some(engagement.max(cold))
            }
        }
    }

    /// The next instant at which time alone changes the lead: a tier drop by
    /// decay (respecting dwell), the end of a not-ready period or of a rest,
    /// or expiry.
    pub fn next_transition(&self, s: &LeadState) -> Option<Millis> {
        self.next_internal(s).map(|(t, _)| t)
    }

    fn next_internal(&self, s: &LeadState) -> Option<(Millis, Step)> {
        if s.is_new() {
            return None;
        }
        let mut best: Option<(Millis, Step)> = None;
        let mut consider = |t: Option<Millis>, step: Step| {
            if let Some(t) = t
                && best.is_none_or(|(b, _)| t < b)
            {
                best = Some((t, step));
            }
        };
        if s.kind == Kind::Lead {
            if s.tier > 0
                && let Some(tier) = self.rules.tiers.get(s.tier as usize)
            {
                let dwell_end = s.tier_since.saturating_add(tier.min_dwell_ms);
                consider(
                    self.first_below(s, s.as_of.max(dwell_end), tier.exit),
                    Step::TierDown,
                );
            }
            if let Status::NotReady { until } = s.status {
                consider(Some(until), Step::NotReadyEnds);
            }
            consider(s.resting_until, Step::RestingEnds);
        }
        consider(self.expiry_at(s), Step::Expire);
        best
    }

    /// A cheap test of whether [`Engine::advance`] to `t` has anything to do.
    fn anything_due(&self, s: &LeadState, t: Millis) -> bool {
        if s.is_new() {
            return false;
        }
        if let Some(r) = self.config.retention_ms
            && s.last_event_at.saturating_add(r) <= t
        {
            return true;
        }
        if s.kind != Kind::Lead {
            return false;
        }
        if let Status::NotReady { until } = s.status
            && until <= t
        {
            return true;
        }
        if s.resting_until.is_some_and(|r| r <= t) {
            return true;
        }
        match self.rules.tiers.get(s.tier as usize) {
            Some(tier) if s.tier > 0 => {
                s.tier_since.saturating_add(tier.min_dwell_ms) <= t
                    && self.total_at(s, t) < tier.exit
            }
            _ => false,
        }
    }

    /// Moves a lead to instant `t`, applying every time-driven transition due
    /// at or before `t` at its own instant, and emitting the visible ones.
    pub fn advance(&self, s: &mut LeadState, t: Millis, out: &mut Vec<Decision>) {
        while self.anything_due(s, t)
            && let Some((at, step)) = self.next_internal(s)
        {
            if at > t {
                break;
            }
            if step == Step::Expire {
                let kind = if matches!(s.kind, Kind::Alias(_)) {
                    Kind::Visitor
                } else {
                    s.kind.clone()
                };
                s.reset(kind);
                out.push(Decision::Expire { at });
                return;
            }
            let before = Segment::of(s);
            let reason = match step {
                Step::TierDown => {
                    let total = self.total_at(s, at);
                    s.tier = self.tier_after_drop(s.tier, total);
                    s.tier_since = at;
                    Reason::Decay
                }
                Step::NotReadyEnds => {
                    s.status = Status::Nurture;
                    Reason::Lifecycle
                }
                Step::RestingEnds => {
                    s.resting_until = None;
                    Reason::FrequencyCap
                }
                Step::Expire => unreachable!("handled above"),
            };
            s.as_of = s.as_of.max(at);
            let after = Segment::of(s);
            if before != after {
                self.record(s, before, after, reason, at);
                out.push(Decision::Change(SegmentChange {
                    from: before,
                    to: after,
                    scores: self.scores_at(s, at),
                    reason,
                    trigger: None,
                    at,
                    opted_out: opted_out(s),
                }));
            }
        }
    }

    fn tier_after_drop(&self, mut tier: u8, total: f64) -> u8 {
        while tier > 0
            && self
                .rules
                .tiers
                .get(tier as usize)
                .is_none_or(|t| total < t.exit)
        {
            tier -= 1;
        }
        tier
    }

    /// The tier for `total` starting from `tier`, with hysteresis and dwell.
    fn tier_for(&self, s: &LeadState, total: f64, at: Millis) -> u8 {
        let tiers = &self.rules.tiers;
        let up = tiers
            .iter()
            .rposition(|t| total >= t.enter)
            .unwrap_or_default() as u8;
        if up > s.tier {
            return up;
        }
        let dwell = tiers.get(s.tier as usize).map_or(0, |t| t.min_dwell_ms);
        if at < s.tier_since.saturating_add(dwell) {
            return s.tier;
        }
        self.tier_after_drop(s.tier, total)
    }

    /// Whether the lead already saw this event id.
    pub fn is_duplicate(&self, s: &LeadState, e: &Event<'_>) -> bool {
        s.seen(fingerprint(&e.event_id))
    }

    /// Applies one event to a lead (or visitor), pushing the decisions it causes.
    /// A late event (older than the lead's clock) counts at its own time; the
    /// transitions it causes are decided at the lead's clock.
    pub fn apply(&self, s: &mut LeadState, e: &Event<'_>, out: &mut Vec<Decision>) -> Applied {
        let fp = fingerprint(&e.event_id);
        if s.seen(fp) {
            return Applied::Duplicate;
        }
        let t = e.occurred_at;
        let te = if s.is_new() { t } else { t.max(s.as_of) };
        self.advance(s, te, out);
        if s.is_new() {
            s.as_of = te;
            s.tier_since = te;
            s.last_event_at = t;
        }
        if s.recycled_at.is_some_and(|r| t < r) {
            s.remember(t, fp, self.config.dedup_window);
            return Applied::BeforeRecycle;
        }
        let rules = &*self.rules;
        let before = Segment::of(s);
        let before_opted = opted_mask(s);
        let before_resting = s.resting_until.is_some();
        if !s.armed && self.total_at(s, te) < rules.handoff.rearm_below - rules::SCORE_TOLERANCE {
            s.armed = true;
        }

        let channel = self.channel_of(e);
        let mut lifecycle = false;
        let mut engaged = false;
        match e.kind {
            EventType::ProfileUpdated => self.update_fit(s, e, t, fp),
            EventType::LifecycleChanged => {
                lifecycle = true;
                self.lifecycle(s, e.attribute("stage").unwrap_or_default(), t, te);
            }
            EventType::Unsubscribe => self.channel_mut(s, channel).opted_out = true,
            EventType::Bounce if e.attribute("kind") == Some("hard") => {
                self.channel_mut(s, channel).opted_out = true;
            }
            EventType::SpamComplaint => {
                lifecycle = true;
                self.channel_mut(s, channel).opted_out = true;
                s.status = Status::Suppressed;
            }
            EventType::Delivered | EventType::Sent if e.source == crate::event::Source::Email => {
                let c = self.channel_mut(s, channel);
                if e.kind == EventType::Delivered {
                    c.last_delivered_at = Some(c.last_delivered_at.map_or(t, |d| d.max(t)));
                    c.streak = c.streak.saturating_add(1);
                    self.count_delivery(s, t, te);
                }
            }
            _ => {}
        }
        let machine_open = e.kind == EventType::Open
            && (e.attribute("machine_open") == Some("true")
                || s.channels
                    .iter()
                    .find(|c| c.channel == channel)
                    .and_then(|c| c.last_delivered_at)
                    .is_some_and(|d| (t - d).abs() <= rules.machine_open_ms));
        let mut matched = None;
        if !machine_open && let Some(rule) = rules.match_rule(e) {
            matched = Some(rule);
            if self.count_points(s, rule, t, fp, &e.event_id) > 0.0 {
                engaged = true;
            }
            if let Some(stage) = rules.rules[rule as usize].then {
                lifecycle = true;
                self.lifecycle(s, stage.as_str(), t, te);
            }
        }
        if e.source == crate::event::Source::Email
            && matches!(
                e.kind,
                EventType::Open | EventType::Click | EventType::Reply
            )
            && !machine_open
        {
            self.channel_mut(s, channel).streak = 0;
        }
        if engaged {
            s.last_engaged_at = Some(s.last_engaged_at.map_or(t, |l| l.max(t)));
            if s.status == Status::Reengage {
                s.status = Status::Nurture;
            }
        }
        let reengage_after = rules.email.reengage_after;
        if reengage_after > 0
            && s.status == Status::Nurture
            && s.channels
                .iter()
                .any(|c| !c.opted_out && c.streak >= reengage_after)
        {
            s.status = Status::Reengage;
        }
        self.attribute_first_touch(s, e, t, fp);

        let scores = self.scores_at(s, te);
        let tier = self.tier_for(s, scores.total, te);
        if tier != s.tier {
            s.tier = tier;
            s.tier_since = te;
        }
        let after = Segment::of(s);
        let now_opted = opted_mask(s);
        if before != after || before_opted != now_opted {
            let reason = if lifecycle {
                Reason::Lifecycle
            } else if before_opted != now_opted {
                Reason::OptOut
            } else if before_resting != s.resting_until.is_some() {
                Reason::FrequencyCap
            } else {
                Reason::Event
            };
            self.record(s, before, after, reason, te);
            out.push(Decision::Change(SegmentChange {
                from: before,
                to: after,
                scores,
                reason,
                trigger: Some(e.event_id.to_string()),
                at: te,
                opted_out: opted_out(s),
            }));
        }
        if s.kind == Kind::Lead && self.qualifies(s, &scores, te) {
            s.armed = false;
            s.last_handoff_at = Some(te);
            out.push(Decision::Handoff(Box::new(Handoff {
                scores,
                segment: after,
                top_signals: self.top_signals(s, te),
                crossing_rule: matched.map(|r| rules.rules[r as usize].name.clone()),
                trigger: e.event_id.to_string(),
                fit_breakdown: self.fit_breakdown(s),
                missing_profile: self.missing_profile(s),
                first_touch: s
                    .first_touch
                    .as_ref()
                    .map(|f| (f.source.clone(), f.campaign.clone())),
                at: te,
            })));
        }
        s.last_event_at = s.last_event_at.max(t);
        s.as_of = te;
        s.remember(t, fp, self.config.dedup_window);
        Applied::Applied {
            rule: matched,
            segment_before: before,
        }
    }

    fn record(&self, s: &mut LeadState, from: Segment, to: Segment, reason: Reason, at: Millis) {
        if self.config.history_window == 0 {
            return;
        }
        if s.history.len() >= self.config.history_window {
            s.history.remove(0);
        }
        state::reserve_bounded(&mut s.history, self.config.history_window);
        s.history.push(Transition {
            from: from.code(),
            to: to.code(),
            reason: reason.code(),
            at,
        });
    }

    /// The channel index of a messaging event (the default channel otherwise).
    fn channel_of(&self, e: &Event<'_>) -> u8 {
        e.channel
            .as_deref()
            .and_then(|c| self.rules.channel_index(c))
            .unwrap_or(0)
    }

    fn channel_mut<'s>(&self, s: &'s mut LeadState, channel: u8) -> &'s mut ChannelState {
        let i = match s.channels.binary_search_by_key(&channel, |c| c.channel) {
            Ok(i) => i,
            Err(i) => {
                s.channels.insert(
                    i,
                    ChannelState {
                        channel,
                        opted_out: false,
                        streak: 0,
                        last_delivered_at: None,
                    },
                );
                i
            }
        };
        &mut s.channels[i]
    }

    /// Counts a delivery toward the frequency cap and puts the lead to rest
    /// while the cap's window holds as many deliveries as the cap allows.
    fn count_delivery(&self, s: &mut LeadState, t: Millis, te: Millis) {
        let Some((max, window)) = self.rules.frequency_cap else {
            return;
        };
        let max = usize::from(max);
        let i = s.deliveries.partition_point(|d| *d <= t);
        s.deliveries.insert(i, t);
        if s.deliveries.len() > max {
            s.deliveries.remove(0);
        }
        s.resting_until = None;
        if s.deliveries.len() == max {
            let until = s.deliveries[0].saturating_add(window);
            if until > te {
                s.resting_until = Some(until);
            }
        }
    }

    fn attribute_first_touch(&self, s: &mut LeadState, e: &Event<'_>, t: Millis, fp: u64) {
        let a = &self.rules.attribution;
        let Some(source) = a.source_attributes.iter().find_map(|k| e.attribute(k)) else {
            return;
        };
        let tie = fp as u32;
        if s.first_touch
            .as_ref()
            .is_some_and(|f| (f.at, f.tie) <= (t, tie))
        {
            return;
        }
        let campaign = a
            .campaign_attributes
            .iter()
            .find_map(|k| e.attribute(k))
            .map(|c| truncate(c, MAX_ATTRIBUTION_LEN));
        s.first_touch = Some(FirstTouch {
            at: t,
            tie,
            source: truncate(source, MAX_ATTRIBUTION_LEN),
            campaign,
        });
    }

    fn qualifies(&self, s: &LeadState, scores: &Scores, t: Millis) -> bool {
        let h = &self.rules.handoff;
        let grade_ok = match (h.min_grade, scores.grade) {
            (None, _) => true,
            (Some(min), Some(g)) => g <= min,
            (Some(_), None) => h.unknown_fit == UnknownFit::Allow,
        };
        s.armed
            && s.status.in_nurture()
            && !all_opted_out(s)
            && scores.total >= h.min_score - rules::SCORE_TOLERANCE
            && grade_ok
            && self
                .rules
                .handoff_within_ms
                .is_none_or(|w| s.last_engaged_at.is_some_and(|e| t - e <= w))
            && s.last_handoff_at
                .is_none_or(|last| t - last >= self.rules.handoff_cooldown_ms)
    }

    /// Makes group `g`'s window cover `cell`, shifting its rules' cells forward
    /// if `cell` is newer. Returns the window.
    fn cover(&self, s: &mut LeadState, g: usize, cell: i64) -> i64 {
        let rules = &self.rules.rules;
        let g8 = g as u8;
        match s.windows.binary_search_by_key(&g8, |(x, _)| *x) {
            Ok(i) => {
                let w = s.windows[i].1;
                if cell > w {
                    for r in &mut s.rules {
                        if rules.get(r.rule as usize).is_some_and(|x| x.group == g) {
                            r.cells.shift(w, cell);
                        }
                    }
                    s.windows[i].1 = cell;
                    cell
                } else {
                    w
                }
            }
            Err(i) => {
                s.windows.insert(i, (g8, cell));
                cell
            }
        }
    }

    fn rule_mut<'s>(&self, s: &'s mut LeadState, rule: u16, t: Millis) -> &'s mut RuleState {
        let i = match s.rules.binary_search_by_key(&rule, |r| r.rule) {
            Ok(i) => i,
            Err(i) => {
                s.rules.insert(
                    i,
                    RuleState {
                        rule,
                        count: 0,
                        last_at: t,
                        cells: Cells::default(),
                        cap: None,
                    },
                );
                i
            }
        };
        &mut s.rules[i]
    }

    /// Counts one match of `rule` at event time `t`. Returns the points it
    /// counts for (after the cap).
    fn count_points(
        &self,
        s: &mut LeadState,
        rule: u16,
        t: Millis,
        fp: u64,
        event_id: &str,
    ) -> f64 {
        let r = &self.rules.rules[rule as usize];
        let h = self.half_life(r.group);
        let window = self.cover(s, r.group, exact::cell_of(t, h));
        let explain = self.config.explain_window;
        let rs = self.rule_mut(s, rule, t);
        rs.count = rs.count.saturating_add(1);
        rs.last_at = rs.last_at.max(t);
        let points = match r.cap {
            None => {
                rs.cells.add(window, Term::new(r.points, t, h));
                r.points
            }
            Some(cap) => {
                let w = t.div_euclid(cap.window_ms);
                if rs.cap.as_ref().is_some_and(|c| c.window > w) {
                    // A window this rule has moved past: taken as full.
                    0.0
                } else {
                    if rs.cap.as_ref().is_none_or(|c| c.window < w) {
                        rs.cap = Some(CapState {
                            window: w,
                            admitted: Vec::new(),
                        });
                    }
                    let c = rs.cap.as_mut().expect("set above");
                    // Exact update: take the old allowances out, put the new ones in.
                    credit(&mut rs.cells, window, h, r.points, &cap, &c.admitted, true);
                    let i = c.admitted.partition_point(|x| *x <= t);
                    c.admitted.insert(i, t);
                    let keep = credit(&mut rs.cells, window, h, r.points, &cap, &c.admitted, false);
                    let counted = allowances(r.points, &cap, c.admitted.len())
                        .nth(i)
                        .unwrap_or(0.0);
                    c.admitted.truncate(keep);
                    counted
                }
            }
        };
        if explain > 0 {
            let capped = points != r.points;
            let counted = Counted {
                rule,
                event_id,
                at: t,
                points,
                capped,
                fp,
            };
            s.log.remember(&counted, explain);
        }
        points
    }

    fn update_fit(&self, s: &mut LeadState, e: &Event<'_>, t: Millis, fp: u64) {
        let rules = &*self.rules;
        let tie = fp as u32;
        for (slot, attribute) in rules.fit_attributes.iter().enumerate() {
            let Some(value) = e.attribute(attribute) else {
                continue;
            };
            let rule = rules
                .fit_rules
                .iter()
                .position(|r| r.slot as usize == slot && r.predicate.matches(value))
                .map(|r| r as u16);
            let new = FitSlot {
                slot: slot as u8,
                rule,
                at: t,
                tie,
            };
            match s.fit.binary_search_by_key(&new.slot, |f| f.slot) {
                Ok(i) => {
                    if (s.fit[i].at, s.fit[i].tie) < (t, tie) {
                        s.fit[i] = new;
                    }
                }
                Err(i) => s.fit.insert(i, new),
            }
        }
    }

    fn lifecycle(&self, s: &mut LeadState, stage: &str, t: Millis, te: Millis) {
        match stage {
            "customer" => s.status = Status::Customer,
            "opportunity_open" => s.status = Status::Opportunity,
            "opportunity_lost" if s.status == Status::Opportunity => s.status = Status::Nurture,
            "disqualified" => s.status = Status::Suppressed,
            "not_ready" => {
                s.status = Status::NotReady {
                    until: te.saturating_add(self.rules.not_ready_ms),
                }
            }
            "recycled" => {
                s.status = Status::Nurture;
                s.rules.clear();
                s.windows.clear();
                s.log.clear();
                s.armed = true;
                s.channels.iter_mut().for_each(|c| c.streak = 0);
                s.tier = 0;
                s.tier_since = te;
                s.recycled_at = Some(s.recycled_at.map_or(t, |r| r.max(t)));
            }
            _ => {}
        }
    }

    /// Merges an anonymous visitor's history into a lead: contributions keep
    /// their original times, exactly (integer sums), whatever the order.
    pub fn merge_visitor(&self, into: &mut LeadState, visitor: &LeadState, anonymous_id: &str) {
        if into.is_new() && !visitor.is_new() {
            into.as_of = visitor.as_of;
            into.tier_since = visitor.as_of;
            into.last_event_at = visitor.last_event_at;
        }
        if !into.linked.iter().any(|a| a == anonymous_id) && into.linked.len() < 32 {
            into.linked.push(anonymous_id.to_owned());
        }
        if visitor.is_new() {
            return;
        }
        let rules = &self.rules.rules;
        // Align every group's window on the newer of the two.
        for (g, w) in &visitor.windows {
            self.cover(into, usize::from(*g), *w);
        }
        for vr in &visitor.rules {
            let Some(rule) = rules.get(vr.rule as usize) else {
                continue;
            };
            let g = rule.group as u8;
            let vw = visitor.window(g).unwrap_or(i64::MIN);
            let lw = into.window(g).unwrap_or(vw);
            let mut cells = vr.cells;
            cells.shift(vw, lw);
            let lr = self.rule_mut(into, vr.rule, vr.last_at);
            lr.cells = lr.cells.plus(cells);
            lr.count = lr.count.saturating_add(vr.count);
            lr.last_at = lr.last_at.max(vr.last_at);
            if let (Some(cap), Some(vc)) = (rule.cap, &vr.cap) {
                self.merge_cap(lr, rule.points, cap, vc, lw, self.half_life(rule.group));
            }
        }
        for f in &visitor.fit {
            match into.fit.binary_search_by_key(&f.slot, |x| x.slot) {
                Ok(i) if (into.fit[i].at, into.fit[i].tie) < (f.at, f.tie) => into.fit[i] = *f,
                Ok(_) => {}
                Err(i) => into.fit.insert(i, *f),
            }
        }
        for c in &visitor.channels {
            let mine = self.channel_mut(into, c.channel);
            mine.opted_out |= c.opted_out;
            mine.streak = mine.streak.max(c.streak);
            mine.last_delivered_at = mine.last_delivered_at.max(c.last_delivered_at);
        }
        if let Some(vf) = &visitor.first_touch
            && into
                .first_touch
                .as_ref()
                .is_none_or(|f| (vf.at, vf.tie) < (f.at, f.tie))
        {
            into.first_touch = Some(vf.clone());
        }
        for (t, f) in &visitor.recent {
            into.remember(*t, *f, self.config.dedup_window);
        }
        for c in visitor.log.iter() {
            let counted = Counted {
                rule: c.rule,
                event_id: c.event_id,
                at: c.at,
                points: c.points,
                capped: c.capped,
                fp: fingerprint(c.event_id),
            };
            into.log.remember(&counted, self.config.explain_window);
        }
        into.last_engaged_at = into.last_engaged_at.max(visitor.last_engaged_at);
        into.last_event_at = into.last_event_at.max(visitor.last_event_at);
    }

    /// Merges a visitor's cap bookkeeping for one rule into the lead's: in the
    /// same window the earliest matches by time count, exactly.
    fn merge_cap(
        &self,
        lr: &mut RuleState,
        points: f64,
        cap: rules::Cap,
        vc: &CapState,
        window: i64,
        h: i64,
    ) {
        match &mut lr.cap {
            None => lr.cap = Some(vc.clone()),
            Some(mine) if mine.window < vc.window => *mine = vc.clone(),
            Some(mine) if mine.window == vc.window => {
                credit(&mut lr.cells, window, h, points, &cap, &mine.admitted, true);
                credit(&mut lr.cells, window, h, points, &cap, &vc.admitted, true);
                let mut all: Vec<Millis> =
                    mine.admitted.iter().chain(&vc.admitted).copied().collect();
                all.sort_unstable();
                let keep = credit(&mut lr.cells, window, h, points, &cap, &all, false);
                all.truncate(keep);
                mine.admitted = all;
            }
            Some(_) => {}
        }
    }

    /// The top contributing rules at `t`, largest decayed points first.
    pub fn top_signals(&self, s: &LeadState, t: Millis) -> Vec<Signal> {
        let mut signals: Vec<Signal> = s
            .rules
            .iter()
            .filter(|r| !r.cells.is_zero())
            .filter_map(|r| {
                let rule = self.rules.rules.get(r.rule as usize)?;
                let w = s.window(rule.group as u8)?;
                Some(Signal {
                    rule: rule.name.clone(),
                    points: r.cells.value_at(w, self.half_life(rule.group), t),
                    last_at: r.last_at,
                    count: r.count,
                })
            })
            .collect();
        signals.sort_by(|a, b| {
            b.points
                .total_cmp(&a.points)
                .then_with(|| a.rule.cmp(&b.rule))
        });
        signals.truncate(self.rules.handoff.top_signals);
        signals
    }

    /// Fit points by the fit rule that set them.
    pub fn fit_breakdown(&self, s: &LeadState) -> Vec<(String, f64)> {
        s.fit
            .iter()
            .filter_map(|f| f.rule)
            .filter_map(|r| self.rules.fit_rules.get(r as usize))
            .filter(|r| r.points != 0.0)
            .map(|r| (r.name.clone(), r.points))
            .collect()
    }

    /// Profile attributes the fit rules use that the lead has no value for.
    pub fn missing_profile(&self, s: &LeadState) -> Vec<String> {
        self.rules
            .fit_attributes
            .iter()
            .enumerate()
            .filter(|(i, _)| !s.fit.iter().any(|f| usize::from(f.slot) == *i))
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// Names of the channels the lead opted out of.
    pub fn opted_out_names(&self, channels: &[u8]) -> Vec<String> {
        channels
            .iter()
            .filter_map(|c| self.rules.channels.get(usize::from(*c)).cloned())
            .collect()
    }
}

/// The set of channels a lead opted out of, as a bit per channel index:
/// compared on every event, without allocating.
fn opted_mask(s: &LeadState) -> [u64; 4] {
    let mut mask = [0; 4];
    for c in s.channels.iter().filter(|c| c.opted_out) {
        mask[usize::from(c.channel >> 6)] |= 1 << (c.channel & 63);
    }
    mask
}

/// Indices of the channels a lead opted out of.
fn opted_out(s: &LeadState) -> Vec<u8> {
    s.channels
        .iter()
        .filter(|c| c.opted_out)
        .map(|c| c.channel)
        .collect()
}

/// The points each of `n` admitted matches (earliest first) counts for under a cap.
fn allowances(points: f64, cap: &rules::Cap, n: usize) -> impl Iterator<Item = f64> + use<> {
    let cap = *cap;
    (0..n).scan(0.0_f64, move |used, i| {
        if cap.max_matches.is_some_and(|m| i as u64 >= u64::from(m)) {
            return Some(0.0);
        }
        Some(match cap.max_points {
            Some(max) => {
                let room = (max - *used).max(0.0);
                let a = points.abs().min(room);
                *used += a;
                a * points.signum()
            }
            None => points,
        })
    })
}

/// Adds to `cells` what each admitted match (earliest first) counts for
/// under the cap, or with `negate` takes it out. Returns how many matches
/// lead the list with a non-zero allowance: allowances only fall along the
/// list, so the matches after them never count again and are not kept.
fn credit(
    cells: &mut Cells,
    window: i64,
    h: i64,
    points: f64,
    cap: &rules::Cap,
    admitted: &[Millis],
    negate: bool,
) -> usize {
    let mut keep = 0;
    for (j, (at, p)) in admitted
        .iter()
        .zip(allowances(points, cap, admitted.len()))
        .enumerate()
    {
        if p != 0.0 {
            let term = Term::new(p, *at, h);
            cells.add(window, if negate { term.negated() } else { term });
            if keep == j {
                keep += 1;
            }
        }
    }
    keep
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests;
