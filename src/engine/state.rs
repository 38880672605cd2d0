//! Per-lead state and its compact binary form (the Redis value).
//!
//! Scores are stored as values at `as_of`; decay to any later instant is
//! computed, never written back, so the stored bits depend only on the events
//! applied, in order.

use crate::event::Millis;

/// Where a lead stands apart from its score tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// In nurture: the visible segment is the score tier.
    Nurture,
    /// Too many emails in a row without engagement.
    Reengage,
    /// Said "not now"; returns to nurture at `until`.
    NotReady {
        /// Event time at which the lead returns to nurture.
        until: Millis,
    },
    /// An open sales opportunity: out of nurture.
    Opportunity,
    /// A customer: out of nurture.
    Customer,
    /// Unsubscribed, bounced hard, complained or disqualified: no nurture events.
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

/// What one rule has contributed to one lead.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleStat {
    /// Index into the compiled rules.
    pub rule: u16,
    /// Matches that counted (including capped ones that counted zero).
    pub count: u32,
    /// Contributed points, decayed to the lead's `as_of`.
    pub value: f64,
    /// Event time of the last match.
    pub last_at: Millis,
    /// Tumbling cap window index of `cap_used`.
    pub cap_window: i64,
    /// Matches counted in the cap window.
    pub cap_matches: u32,
    /// Absolute points counted in the cap window.
    pub cap_points: f64,
}

/// One counted event, kept for explanations (a bounded log per lead).
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// Index into the compiled rules.
    pub rule: u16,
    /// The input event.
    pub event_id: String,
    /// Event time it counted at.
    pub at: Millis,
    /// Points counted then (after any cap).
    pub points: f64,
    /// Whether a cap cut the rule's points.
    pub capped: bool,
}

/// One past segment transition, kept for explanations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// Segment code before (see [`Transition::code`]).
    pub from: u16,
    /// Segment code after.
    pub to: u16,
    /// 0 event, 1 decay, 2 lifecycle.
    pub reason: u8,
    /// Event time.
    pub at: Millis,
}

/// The state of one lead (or anonymous visitor).
#[derive(Debug, Clone, PartialEq)]
pub struct LeadState {
    /// Event time the stored values are valid at.
    pub as_of: Millis,
    /// Engagement per decay group at `as_of` (each ≥ 0).
    pub groups: Vec<f64>,
    /// Per-rule contributions, in first-match order.
    pub stats: Vec<RuleStat>,
    /// Fit points per fit-attribute slot.
    pub fit: Vec<(u8, f64)>,
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
    /// Emails delivered in a row without an open or click.
    pub unengaged_streak: u8,
    /// Event time of the last email delivery.
    pub last_delivered_at: Option<Millis>,
    /// Fingerprints of the most recent event ids (a ring).
    pub recent: Vec<u64>,
    /// Next write position in `recent`.
    pub recent_next: u8,
    /// Event time of the last event applied.
    pub last_event_at: Millis,
    /// The most recent counted events, oldest first (bounded).
    pub log: Vec<Contribution>,
    /// The most recent segment transitions, oldest first (bounded).
    pub history: Vec<Transition>,
}

impl LeadState {
    /// A new lead with no history, sized for `groups` decay groups.
    pub fn new(groups: usize) -> Self {
        LeadState {
            as_of: i64::MIN,
            groups: vec![0.0; groups],
            stats: Vec::new(),
            fit: Vec::new(),
            tier: 0,
            tier_since: i64::MIN,
            status: Status::Nurture,
            armed: true,
            last_handoff_at: None,
            last_engaged_at: None,
            unengaged_streak: 0,
            last_delivered_at: None,
            recent: Vec::new(),
            recent_next: 0,
            last_event_at: i64::MIN,
            log: Vec::new(),
            history: Vec::new(),
        }
    }

    /// Whether no event was ever applied.
    pub fn is_new(&self) -> bool {
        self.as_of == i64::MIN
    }

    /// Remembers an event fingerprint, keeping at most `capacity`.
    pub fn remember(&mut self, fingerprint: u64, capacity: usize) {
        if capacity == 0 {
            return;
        }
        if self.recent.len() < capacity {
            self.recent.push(fingerprint);
            self.recent_next = (self.recent.len() % capacity) as u8;
        } else {
            let i = self.recent_next as usize % self.recent.len();
            self.recent[i] = fingerprint;
            self.recent_next = ((i + 1) % capacity) as u8;
        }
    }

    /// Whether the fingerprint is among the remembered ones.
    pub fn seen(&self, fingerprint: u64) -> bool {
        self.recent.contains(&fingerprint)
    }

    /// Encodes to the compact binary form stored in Redis.
    pub fn encode(&self, layout: u32, out: &mut Vec<u8>) {
        out.clear();
        out.push(FORMAT_VERSION);
        put_u32(out, layout);
        put_i64(out, self.as_of);
        out.push(self.groups.len() as u8);
        for g in &self.groups {
            put_f64(out, *g);
        }
        put_u16(out, self.stats.len() as u16);
        for s in &self.stats {
            put_u16(out, s.rule);
            put_u32(out, s.count);
            put_f64(out, s.value);
            put_i64(out, s.last_at);
            put_i64(out, s.cap_window);
            put_u32(out, s.cap_matches);
            put_f64(out, s.cap_points);
        }
        out.push(self.fit.len() as u8);
        for (slot, p) in &self.fit {
            out.push(*slot);
            put_f64(out, *p);
        }
        out.push(self.tier);
        put_i64(out, self.tier_since);
        let (code, until) = self.status.code();
        out.push(code);
        put_i64(out, until);
        out.push(self.armed as u8);
        put_opt(out, self.last_handoff_at);
        put_opt(out, self.last_engaged_at);
        out.push(self.unengaged_streak);
        put_opt(out, self.last_delivered_at);
        out.push(self.recent.len() as u8);
        out.push(self.recent_next);
        for f in &self.recent {
            put_u64(out, *f);
        }
        put_i64(out, self.last_event_at);
        out.push(self.log.len() as u8);
        for c in &self.log {
            put_u16(out, c.rule);
            let id = &c.event_id.as_bytes()[..c.event_id.len().min(u8::MAX as usize)];
            out.push(id.len() as u8);
            out.extend_from_slice(id);
            put_i64(out, c.at);
            put_f64(out, c.points);
            out.push(c.capped as u8);
        }
        out.push(self.history.len() as u8);
        for h in &self.history {
            put_u16(out, h.from);
            put_u16(out, h.to);
            out.push(h.reason);
            put_i64(out, h.at);
        }
    }

    /// Decodes the binary form. With a different rules `layout`, per-rule
    /// contributions and fit slots are dropped (their indices mean other rules
    /// now) and engagement is folded into the groups that exist.
    pub fn decode(bytes: &[u8], layout: u32, groups: usize) -> Result<LeadState, StateError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.u8()? != FORMAT_VERSION {
            return Err(StateError::Version);
        }
        let stored_layout = r.u32()?;
        let as_of = r.i64()?;
        let n = r.u8()? as usize;
        let mut gs = Vec::with_capacity(n);
        for _ in 0..n {
            gs.push(r.f64()?);
        }
        let n = r.u16()? as usize;
        let mut stats = Vec::with_capacity(n);
        for _ in 0..n {
            stats.push(RuleStat {
                rule: r.u16()?,
                count: r.u32()?,
                value: r.f64()?,
                last_at: r.i64()?,
                cap_window: r.i64()?,
                cap_matches: r.u32()?,
                cap_points: r.f64()?,
            });
        }
        let n = r.u8()? as usize;
        let mut fit = Vec::with_capacity(n);
        for _ in 0..n {
            fit.push((r.u8()?, r.f64()?));
        }
        let tier = r.u8()?;
        let tier_since = r.i64()?;
        let code = r.u8()?;
        let until = r.i64()?;
        let status = Status::from_code(code, until).ok_or(StateError::Corrupt)?;
        let armed = r.u8()? != 0;
        let last_handoff_at = r.opt()?;
        let last_engaged_at = r.opt()?;
        let unengaged_streak = r.u8()?;
        let last_delivered_at = r.opt()?;
        let n = r.u8()? as usize;
        let recent_next = r.u8()?;
        let mut recent = Vec::with_capacity(n);
        for _ in 0..n {
            recent.push(r.u64()?);
        }
        let last_event_at = r.i64()?;
        let n = r.u8()? as usize;
        let mut log = Vec::with_capacity(n);
        for _ in 0..n {
            let rule = r.u16()?;
            let len = r.u8()? as usize;
            let id = r.bytes(len)?;
            log.push(Contribution {
                rule,
                event_id: String::from_utf8_lossy(id).into_owned(),
                at: r.i64()?,
                points: r.f64()?,
                capped: r.u8()? != 0,
            });
        }
        let n = r.u8()? as usize;
        let mut history = Vec::with_capacity(n);
        for _ in 0..n {
            history.push(Transition {
                from: r.u16()?,
                to: r.u16()?,
                reason: r.u8()?,
                at: r.i64()?,
            });
        }
        if r.pos != bytes.len() {
            return Err(StateError::Corrupt);
        }
        let mut state = LeadState {
            as_of,
            groups: gs,
            stats,
            fit,
            tier,
            tier_since,
            status,
            armed,
            last_handoff_at,
            last_engaged_at,
            unengaged_streak,
            last_delivered_at,
            recent,
            recent_next,
            last_event_at,
            log,
            history,
        };
        if stored_layout != layout || state.groups.len() != groups {
            let total: f64 = state.groups.iter().sum();
            state.groups = vec![0.0; groups];
            if let Some(g) = state.groups.first_mut() {
                *g = total;
            }
            state.stats.clear();
            state.fit.clear();
            state.log.clear();
        }
        Ok(state)
    }
}

/// Why a stored state could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Written by an unknown format version.
    #[error("unknown state format version")]
    Version,
    /// Truncated or inconsistent bytes.
    #[error("corrupt state bytes")]
    Corrupt,
}

const FORMAT_VERSION: u8 = 2;

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_bits().to_le_bytes());
}
fn put_opt(out: &mut Vec<u8>, v: Option<Millis>) {
    put_i64(out, v.unwrap_or(i64::MIN));
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let end = self.pos + N;
        let slice = self.bytes.get(self.pos..end).ok_or(StateError::Corrupt)?;
        self.pos = end;
        Ok(slice.try_into().expect("slice has N bytes"))
    }
    fn bytes(&mut self, n: usize) -> Result<&[u8], StateError> {
        let end = self.pos + n;
        let slice = self.bytes.get(self.pos..end).ok_or(StateError::Corrupt)?;
        self.pos = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, StateError> {
        Ok(i64::from_le_bytes(self.take()?))
    }
    fn f64(&mut self) -> Result<f64, StateError> {
        Ok(f64::from_bits(self.u64()?))
    }
    fn opt(&mut self) -> Result<Option<Millis>, StateError> {
        let v = self.i64()?;
        Ok((v != i64::MIN).then_some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let mut s = LeadState::new(2);
        s.as_of = 1_700_000_000_000;
        s.groups = vec![12.5, 0.25];
        s.stats.push(RuleStat {
            rule: 3,
            count: 2,
            value: 7.0,
            last_at: 5,
            cap_window: 9,
            cap_matches: 1,
            cap_points: 2.0,
        });
        s.fit.push((1, 10.0));
        s.status = Status::NotReady { until: 77 };
        s.last_engaged_at = Some(42);
        s.log.push(Contribution {
            rule: 3,
            event_id: "ev-1".into(),
            at: 9,
            points: 2.5,
            capped: true,
        });
        s.history.push(Transition {
            from: 0,
            to: 1,
            reason: 0,
            at: 8,
        });
        for f in 0..20 {
            s.remember(f, 16);
        }
        let mut buf = Vec::new();
        s.encode(7, &mut buf);
        assert_eq!(LeadState::decode(&buf, 7, 2).unwrap(), s);
        assert!(LeadState::decode(&buf[..buf.len() - 1], 7, 2).is_err());
        assert!(LeadState::decode(b"\x09garbage", 7, 2).is_err());
        let other = LeadState::decode(&buf, 8, 1).unwrap();
        assert_eq!(other.groups, vec![12.75]);
        assert!(other.stats.is_empty());
    }

    #[test]
    fn remembers_a_bounded_window() {
        let mut s = LeadState::new(1);
        for f in 0..40 {
            s.remember(f, 16);
        }
        assert_eq!(s.recent.len(), 16);
        assert!(s.seen(39) && s.seen(24) && !s.seen(23));
    }
}
