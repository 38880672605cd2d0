//! The scoring engine: pure functions from (lead state, event or instant) to
//! (new state, decisions). No I/O, no clock: time is event time passed in.
//!
//! * [`Engine::apply`] applies one event to one lead.
//! * [`Engine::advance`] moves a lead to a later instant, emitting the
//!   segment changes that decay (or a lifecycle timer) causes in between.
//! * [`Engine::next_transition`] says when that will next happen, so the
//!   caller can schedule it instead of scanning all leads.
//!
//! Decay is exact: a value `v` stored at `as_of` is worth
//! `v · 2^(-(t - as_of)/half_life)` at `t`. Stored values change only when an
//! event is applied, so replays give identical bits whatever the batching.

pub mod explain;
pub mod rules;
pub mod schedule;
pub mod state;

use std::sync::Arc;

pub use rules::{Grade, Rules};
pub use state::{LeadState, RuleStat, Status};

use crate::event::{Event, EventType, Millis};

/// A lead's visible segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A nurture tier by score (index into the rules' segments).
    Tier(u8),
    /// Too many emails without engagement.
    Reengage,
    /// Said "not now".
    NotReady,
    /// Open opportunity.
    Opportunity,
    /// Customer.
    Customer,
    /// No nurture.
    Suppressed,
}

impl Segment {
    const RESERVED: [&'static str; 5] = [
        "reengage",
        "not_ready",
        "opportunity",
        "customer",
        "suppressed",
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
        }
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
            i => Segment::Tier(i.min(255) as u8),
        }
    }

    /// The visible segment of a state.
    pub fn of(state: &LeadState) -> Segment {
        match state.status {
            Status::Nurture => Segment::Tier(state.tier),
            Status::Reengage => Segment::Reengage,
            Status::NotReady { .. } => Segment::NotReady,
            Status::Opportunity => Segment::Opportunity,
            Status::Customer => Segment::Customer,
            Status::Suppressed => Segment::Suppressed,
        }
    }
}

/// Why a segment changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// An engagement or profile event.
    Event,
    /// Time passed (decay, dwell or a lifecycle period ending).
    Decay,
    /// A lifecycle or exit event (CRM stage, unsubscribe, bounce, complaint).
    Lifecycle,
}

impl Reason {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Event => "event",
            Reason::Decay => "decay",
            Reason::Lifecycle => "lifecycle",
        }
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
    /// Fit grade.
    pub grade: Grade,
}

/// A segment transition.
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
    /// The input event that caused it (none for decay).
    pub trigger: Option<String>,
    /// Event time of the transition.
    pub at: Millis,
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
}

/// The outcome of applying one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event changed the state.
    Applied {
        /// The matched engagement rule, if any.
        rule: Option<u16>,
    },
    /// The event id was seen recently: nothing changed.
    Duplicate,
}

/// The engine: compiled rules plus the de-duplication memory size.
#[derive(Debug, Clone)]
pub struct Engine {
    rules: Arc<Rules>,
    layout: u32,
    dedup_window: usize,
    explain_window: usize,
}

/// Counted events each lead keeps for explanations, unless configured.
pub const DEFAULT_EXPLAIN_WINDOW: usize = 16;

/// Segment transitions each lead keeps for explanations.
pub const HISTORY_WINDOW: usize = 8;

/// Fingerprint of an event id (stable across versions: xxh3-64).
pub fn fingerprint(event_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(event_id.as_bytes())
}

impl Engine {
    /// An engine remembering the last `dedup_window` event ids per lead.
    pub fn new(rules: Arc<Rules>, dedup_window: usize) -> Self {
        let layout = layout_hash(&rules);
        Engine {
            rules,
            layout,
            dedup_window: dedup_window.min(255),
            explain_window: DEFAULT_EXPLAIN_WINDOW,
        }
    }

    /// Keeps the last `n` counted events per lead for explanations (0–255).
    pub fn with_explain_window(mut self, n: usize) -> Self {
        self.explain_window = n.min(255);
        self
    }

    /// The compiled rules.
    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// A fresh state for a lead never seen.
    pub fn new_state(&self) -> LeadState {
        LeadState::new(self.rules.half_lives.len())
    }

    /// Encodes a state for storage.
    pub fn encode(&self, state: &LeadState, out: &mut Vec<u8>) {
        state.encode(self.layout, out);
    }

    /// Decodes a stored state.
    pub fn decode(&self, bytes: &[u8]) -> Result<LeadState, state::StateError> {
        LeadState::decode(bytes, self.layout, self.rules.half_lives.len())
    }

    /// Engagement at `t` (≥ `as_of`), summed in group order.
    pub fn engagement_at(&self, s: &LeadState, t: Millis) -> f64 {
        if s.is_new() {
            return 0.0;
        }
        let dt = (t - s.as_of).max(0) as f64;
        s.groups
            .iter()
            .zip(&self.rules.half_lives)
            .fold(0.0, |acc, (v, h)| acc + v * (-dt / h).exp2())
    }

    /// Fit score.
    pub fn fit(&self, s: &LeadState) -> f64 {
        // Folding from +0.0: an empty f64 sum is -0.0.
        s.fit.iter().fold(0.0, |acc, (_, p)| acc + p)
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
            grade: self.rules.grade(fit),
        }
    }

    fn total_at(&self, s: &LeadState, t: Millis) -> f64 {
        let w = &self.rules.weights;
        w.engagement_weight * self.engagement_at(s, t) + w.fit_weight * self.fit(s)
    }

    /// The first instant `t ≥ from` at which the total is below `threshold`,
    /// if it ever will be. Exact to the millisecond: the total is
    /// non-increasing between events, so bisection finds the first such ms.
    fn first_below(&self, s: &LeadState, from: Millis, threshold: f64) -> Option<Millis> {
        if self.total_at(s, from) < threshold {
            return Some(from);
        }
        let w = &self.rules.weights;
        let floor = w.fit_weight * self.fit(s);
        if floor >= threshold || w.engagement_weight == 0.0 {
            return None;
        }
        // Upper bound: every group decays at least as fast as the slowest one.
        let need = (threshold - floor) / w.engagement_weight;
        let e0 = self.engagement_at(s, from);
        let slowest = self
            .rules
            .half_lives
            .iter()
            .copied()
            .fold(0.0_f64, f64::max);
        let span = (slowest * (e0 / need).log2()).ceil() + 2.0;
        if !span.is_finite() || span > 1e15 {
            return None;
        }
        // Newton's method on the convex, decreasing engagement curve: started
        // left of the root it never overshoots, so it converges from below.
        let mut t = from as f64;
        for _ in 0..100 {
            let (e, slope) = self.engagement_and_slope(s, t);
            let excess = e - need;
            if excess <= 0.0 || slope >= 0.0 {
                break;
            }
            let step = -excess / slope;
            if !step.is_finite() || t + step > from as f64 + span * 4.0 {
                break;
            }
            t += step;
            if step < 0.25 {
                break;
            }
        }
        // Exact to the millisecond: the first integer instant below the threshold.
        let mut at = (t.floor() as Millis).max(from);
        while at > from && self.total_at(s, at - 1) < threshold {
            at -= 1;
        }
        let mut steps = 0;
        while self.total_at(s, at) >= threshold {
            at += 1;
            steps += 1;
            if steps > 64 {
                return self.bisect_below(s, at, threshold, span);
            }
        }
        Some(at)
    }

    /// Engagement at fractional instant `t` and its time derivative.
    fn engagement_and_slope(&self, s: &LeadState, t: f64) -> (f64, f64) {
        let dt = (t - s.as_of as f64).max(0.0);
        let mut e = 0.0;
        let mut slope = 0.0;
        for (v, h) in s.groups.iter().zip(&self.rules.half_lives) {
            let term = v * (-dt / h).exp2();
            e += term;
            slope -= term * std::f64::consts::LN_2 / h;
        }
        (e, slope)
    }

    /// Bisection fallback for [`Engine::first_below`]: `lo` is above the threshold.
    fn bisect_below(
        &self,
        s: &LeadState,
        mut lo: Millis,
        threshold: f64,
        span: f64,
    ) -> Option<Millis> {
        let mut hi = lo.saturating_add(span as Millis);
        while self.total_at(s, hi) >= threshold {
            hi = hi.saturating_add(span as Millis + 1);
            if hi == Millis::MAX {
                return None;
            }
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.total_at(s, mid) < threshold {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    /// The next time-driven transition after the state's last change: a tier
    /// drop by decay (respecting dwell), or the end of a not-ready period.
    /// Returns the instant and whether it is visible (worth scheduling).
    pub fn next_transition(&self, s: &LeadState) -> Option<Millis> {
        self.next_internal(s).map(|(t, _)| t)
    }

    fn next_internal(&self, s: &LeadState) -> Option<(Millis, Step)> {
        if s.is_new() {
            return None;
        }
        let mut best: Option<(Millis, Step)> = None;
        if s.tier > 0
            && let Some(tier) = self.rules.tiers.get(s.tier as usize)
        {
            let dwell_end = s.tier_since.saturating_add(tier.min_dwell_ms);
            let from = s.as_of.max(dwell_end);
            if let Some(t) = self.first_below(s, from, tier.exit) {
                best = Some((t, Step::TierDown));
            }
        }
        if let Status::NotReady { until } = s.status
            && best.is_none_or(|(t, _)| until < t)
        {
            best = Some((until, Step::NotReadyEnds));
        }
        best
    }

    /// Moves a lead to instant `t`, applying every time-driven transition due
    /// at or before `t`, at its own instant, and emitting the visible ones.
    pub fn advance(&self, s: &mut LeadState, t: Millis, out: &mut Vec<Decision>) {
        while self.anything_due(s, t)
            && let Some((at, step)) = self.next_internal(s)
        {
            if at > t {
                break;
            }
            let before = Segment::of(s);
            match step {
                Step::TierDown => {
                    let total = self.total_at(s, at);
                    s.tier = self.tier_after_drop(s.tier, total);
                    s.tier_since = at;
                }
                Step::NotReadyEnds => s.status = Status::Nurture,
            }
            let after = Segment::of(s);
            if before != after {
                let reason = match step {
                    Step::TierDown => Reason::Decay,
                    Step::NotReadyEnds => Reason::Lifecycle,
                };
                record_transition(s, before, after, reason, at);
                out.push(Decision::Change(SegmentChange {
                    from: before,
                    to: after,
                    scores: self.scores_at(s, at),
                    reason,
                    trigger: None,
                    at,
                }));
            }
        }
    }

    /// A cheap test of whether [`Engine::advance`] to `t` has anything to do:
    /// the total only falls between events, so a drop by `t` shows at `t`.
    fn anything_due(&self, s: &LeadState, t: Millis) -> bool {
        if s.is_new() {
            return false;
        }
        if let Status::NotReady { until } = s.status
            && until <= t
        {
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

    fn tier_after_drop(&self, mut tier: u8, total: f64) -> u8 {
        while tier > 0 && total < self.rules.tiers[tier as usize].exit {
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
        let dwell_end = s
            .tier_since
            .saturating_add(tiers[s.tier as usize].min_dwell_ms);
        if at < dwell_end {
            return s.tier;
        }
        self.tier_after_drop(s.tier, total)
    }

    /// Rebases every stored value to `t` (called only when an event is applied).
    fn rebase(&self, s: &mut LeadState, t: Millis) {
        if s.is_new() {
            s.as_of = t;
            s.tier_since = t;
            return;
        }
        let dt = (t - s.as_of) as f64;
        if dt > 0.0 {
            let mut factors = [1.0_f64; rules::MAX_GROUPS];
            for (f, h) in factors.iter_mut().zip(&self.rules.half_lives) {
                *f = (-dt / h).exp2();
            }
            for (g, f) in s.groups.iter_mut().zip(&factors) {
                *g *= f;
            }
            for stat in &mut s.stats {
                let group = self.rules.rules[stat.rule as usize].group;
                stat.value *= factors[group];
            }
        }
        s.as_of = t;
    }

    /// Applies one event to a lead, pushing the decisions it causes.
    pub fn apply(&self, s: &mut LeadState, e: &Event<'_>, out: &mut Vec<Decision>) -> Applied {
        self.apply_merging(s, e, None, out)
    }

    /// Whether [`Engine::apply`] would skip this event as already seen.
    pub fn is_duplicate(&self, s: &LeadState, e: &Event<'_>) -> bool {
        s.seen(fingerprint(&e.event_id))
    }

    /// Applies one event that identifies the lead, first merging the history
    /// of the anonymous visitor it names (`anonymous`), with its original
    /// timestamps, into the lead.
    pub fn apply_merging(
        &self,
        s: &mut LeadState,
        e: &Event<'_>,
        anonymous: Option<&LeadState>,
        out: &mut Vec<Decision>,
    ) -> Applied {
        let fp = fingerprint(&e.event_id);
        if s.seen(fp) {
            return Applied::Duplicate;
        }
        // Event time never runs backwards for one lead: a late event counts at the lead's clock.
        let mut t = if s.is_new() {
            e.occurred_at
        } else {
            e.occurred_at.max(s.as_of)
        };
        if let Some(a) = anonymous.filter(|a| !a.is_new()) {
            t = t.max(a.as_of);
        }
        self.advance(s, t, out);
        if let Some(a) = anonymous.filter(|a| !a.is_new()) {
            self.merge(s, a, t);
        }
        let rules = &*self.rules;
        let before = Segment::of(s);
        let before_total = self.total_at(s, t);
        if !s.armed && before_total < rules.handoff.rearm_below {
            s.armed = true;
        }
        self.rebase(s, t);

        let mut lifecycle = false;
        let mut engaged = false;
        let mut matched = None;
        match e.kind {
            EventType::ProfileUpdated => self.update_fit(s, e),
            EventType::LifecycleChanged => {
                lifecycle = true;
                self.lifecycle(s, e.attribute("stage").unwrap_or_default(), t);
            }
            EventType::Unsubscribe | EventType::SpamComplaint => {
                lifecycle = true;
                s.status = Status::Suppressed;
            }
            EventType::Bounce if e.attribute("kind") == Some("hard") => {
                lifecycle = true;
                s.status = Status::Suppressed;
            }
            EventType::Delivered => {
                s.last_delivered_at = Some(t);
                s.unengaged_streak = s.unengaged_streak.saturating_add(1);
            }
            _ => {}
        }
        let machine_open = e.kind == EventType::Open
            && (e.attribute("machine_open") == Some("true")
                || s.last_delivered_at
                    .is_some_and(|d| t - d <= rules.machine_open_ms));
        if !machine_open && let Some(rule) = rules.match_rule(e) {
            matched = Some(rule);
            let points = self.count_points(s, rule, t, &e.event_id);
            if points > 0.0 {
                engaged = true;
            }
        }
        if matches!(
            e.kind,
            EventType::Open | EventType::Click | EventType::Reply
        ) && !machine_open
        {
            s.unengaged_streak = 0;
        }
        if engaged {
            s.last_engaged_at = Some(t);
            if s.status == Status::Reengage {
                s.status = Status::Nurture;
            }
        }
        let reengage_after = rules.email.reengage_after;
        if reengage_after > 0 && s.unengaged_streak >= reengage_after && s.status == Status::Nurture
        {
            s.status = Status::Reengage;
        }

        let scores = self.scores_at(s, t);
        let new_tier = self.tier_for(s, scores.total, t);
        if new_tier != s.tier {
            s.tier = new_tier;
            s.tier_since = t;
        }
        let after = Segment::of(s);
        if before != after {
            let reason = if lifecycle {
                Reason::Lifecycle
            } else {
                Reason::Event
            };
            record_transition(s, before, after, reason, t);
            out.push(Decision::Change(SegmentChange {
                from: before,
                to: after,
                scores,
                reason,
                trigger: Some(e.event_id.to_string()),
                at: t,
            }));
        }
        if self.qualifies(s, &scores, t) {
            s.armed = false;
            s.last_handoff_at = Some(t);
            out.push(Decision::Handoff(Box::new(Handoff {
                scores,
                segment: after,
                top_signals: self.top_signals(s, t),
                crossing_rule: matched.map(|r| rules.rules[r as usize].name.clone()),
                trigger: e.event_id.to_string(),
                fit_breakdown: self.fit_breakdown(s),
                at: t,
            })));
        }
        s.last_event_at = t;
        s.remember(fp, self.dedup_window);
        Applied::Applied { rule: matched }
    }

    /// Merges an anonymous visitor's history into a lead at instant `t`
    /// (not before either's last change). Contributions keep their original
    /// timestamps: both sides are decayed to `t` and added.
    pub fn merge(&self, into: &mut LeadState, from: &LeadState, t: Millis) {
        if from.is_new() {
            return;
        }
        let mut from = from.clone();
        self.rebase(&mut from, t);
        if into.is_new() {
            into.as_of = t;
            into.tier_since = t;
        } else {
            self.rebase(into, t);
        }
        for (g, v) in into.groups.iter_mut().zip(&from.groups) {
            *g += v;
        }
        for st in from.stats {
            match into.stats.iter_mut().find(|x| x.rule == st.rule) {
                Some(x) => {
                    x.value += st.value;
                    x.count += st.count;
                    x.last_at = x.last_at.max(st.last_at);
                    if x.cap_window == st.cap_window {
                        x.cap_matches += st.cap_matches;
                        x.cap_points += st.cap_points;
                    } else if st.cap_window > x.cap_window {
                        (x.cap_window, x.cap_matches, x.cap_points) =
                            (st.cap_window, st.cap_matches, st.cap_points);
                    }
                }
                None => into.stats.push(st),
            }
        }
        for (slot, p) in from.fit {
            if !into.fit.iter().any(|(k, _)| *k == slot) {
                into.fit.push((slot, p));
            }
        }
        into.fit.sort_by_key(|(k, _)| *k);
        for f in from.recent {
            if !into.seen(f) {
                into.remember(f, self.dedup_window);
            }
        }
        into.log.extend(from.log);
        into.log.sort_by_key(|c| c.at);
        let excess = into.log.len().saturating_sub(self.explain_window);
        into.log.drain(..excess);
        into.last_engaged_at = into.last_engaged_at.max(from.last_engaged_at);
        into.last_event_at = into.last_event_at.max(from.last_event_at);
    }

    fn qualifies(&self, s: &LeadState, scores: &Scores, t: Millis) -> bool {
        let h = &self.rules.handoff;
        s.armed
            && s.status.in_nurture()
            && scores.total >= h.min_score
            && h.min_grade.is_none_or(|g| scores.grade <= g)
            && self
                .rules
                .handoff_within_ms
                .is_none_or(|w| s.last_engaged_at.is_some_and(|e| t - e <= w))
            && s.last_handoff_at
                .is_none_or(|last| t - last >= self.rules.handoff_cooldown_ms)
    }

    /// Adds a rule's points, applying its cap; returns the points counted.
    fn count_points(&self, s: &mut LeadState, rule: u16, t: Millis, event_id: &str) -> f64 {
        let r = &self.rules.rules[rule as usize];
        let idx = match s.stats.iter().position(|st| st.rule == rule) {
            Some(i) => i,
            None => {
                s.stats.push(RuleStat {
                    rule,
                    count: 0,
                    value: 0.0,
                    last_at: t,
                    cap_window: i64::MIN,
                    cap_matches: 0,
                    cap_points: 0.0,
                });
                s.stats.len() - 1
            }
        };
        let stat = &mut s.stats[idx];
        let mut points = r.points;
        if let Some(cap) = r.cap {
            let window = t.div_euclid(cap.window_ms);
            if window != stat.cap_window {
                stat.cap_window = window;
                stat.cap_matches = 0;
                stat.cap_points = 0.0;
            }
            if cap.max_matches.is_some_and(|m| stat.cap_matches >= m) {
                points = 0.0;
            }
            if let Some(max) = cap.max_points {
                let room = (max - stat.cap_points).max(0.0);
                points = points.signum() * points.abs().min(room);
            }
            stat.cap_matches += 1;
            stat.cap_points += points.abs();
        }
        stat.count += 1;
        stat.last_at = t;
        stat.value += points;
        if self.explain_window > 0 {
            let capped = points != r.points;
            if s.log.len() >= self.explain_window {
                // Full: the oldest entry's slot (and its id's buffer) is reused.
                s.log.rotate_left(1);
                let last = s.log.last_mut().expect("window is non-empty");
                last.event_id.clear();
                last.event_id.push_str(event_id);
                (last.rule, last.at, last.points, last.capped) = (rule, t, points, capped);
            } else {
                s.log.push(state::Contribution {
                    rule,
                    event_id: event_id.to_owned(),
                    at: t,
                    points,
                    capped,
                });
            }
        }
        let g = &mut s.groups[r.group];
        *g = (*g + points).max(0.0);
        points
    }

    fn update_fit(&self, s: &mut LeadState, e: &Event<'_>) {
        let rules = &*self.rules;
        for (slot, attribute) in rules.fit_attributes.iter().enumerate() {
            let Some(value) = e.attribute(attribute) else {
                continue;
            };
            let points = rules
                .fit_rules
                .iter()
                .find(|r| r.slot as usize == slot && r.predicate.matches(value))
                .map_or(0.0, |r| r.points);
            let slot = slot as u8;
            match s.fit.iter_mut().find(|(k, _)| *k == slot) {
                Some(entry) => entry.1 = points,
                None => {
                    s.fit.push((slot, points));
                    s.fit.sort_by_key(|(k, _)| *k);
                }
            }
        }
    }

    fn lifecycle(&self, s: &mut LeadState, stage: &str, t: Millis) {
        match stage {
            "customer" => s.status = Status::Customer,
            "opportunity_open" => s.status = Status::Opportunity,
            "opportunity_lost" if s.status == Status::Opportunity => s.status = Status::Nurture,
            "disqualified" => s.status = Status::Suppressed,
            "not_ready" => {
                s.status = Status::NotReady {
                    until: t.saturating_add(self.rules.not_ready_ms),
                }
            }
            "recycled" => {
                s.status = Status::Nurture;
                s.groups.iter_mut().for_each(|g| *g = 0.0);
                s.stats.clear();
                s.log.clear();
                s.armed = true;
                s.unengaged_streak = 0;
                s.tier = 0;
                s.tier_since = t;
            }
            _ => {}
        }
    }

    /// The top contributing rules at `t`, largest decayed points first.
    pub fn top_signals(&self, s: &LeadState, t: Millis) -> Vec<Signal> {
        let dt = (t - s.as_of).max(0) as f64;
        let mut signals: Vec<Signal> = s
            .stats
            .iter()
            .filter(|st| st.value != 0.0)
            .map(|st| {
                let rule = &self.rules.rules[st.rule as usize];
                Signal {
                    rule: rule.name.clone(),
                    points: st.value * (-dt / self.rules.half_lives[rule.group]).exp2(),
                    last_at: st.last_at,
                    count: st.count,
                }
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
            .filter(|(_, p)| *p != 0.0)
            .map(|(slot, p)| {
                let name = self
                    .rules
                    .fit_rules
                    .iter()
                    .find(|r| r.slot == *slot && r.points == *p)
                    .map_or_else(
                        || self.rules.fit_attributes[*slot as usize].clone(),
                        |r| r.name.clone(),
                    );
                (name, *p)
            })
            .collect()
    }
}

fn record_transition(s: &mut LeadState, from: Segment, to: Segment, reason: Reason, at: Millis) {
    if s.history.len() >= HISTORY_WINDOW {
        s.history.remove(0);
    }
    s.history.push(state::Transition {
        from: from.code(),
        to: to.code(),
        reason: reason as u8,
        at,
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    TierDown,
    NotReadyEnds,
}

/// A hash of the parts of the rules that stored state indexes into (rule,
/// group and fit-attribute order), so state written under other rules is
/// recognised on load.
fn layout_hash(rules: &Rules) -> u32 {
    let mut text = String::new();
    for g in &rules.group_names {
        text.push_str(g);
        text.push('\x1f');
    }
    text.push('\x1e');
    for r in &rules.rules {
        text.push_str(&r.name);
        text.push('\x1f');
    }
    text.push('\x1e');
    for a in &rules.fit_attributes {
        text.push_str(a);
        text.push('\x1f');
    }
    xxhash_rust::xxh3::xxh3_64(text.as_bytes()) as u32
}

#[cfg(test)]
mod tests;
