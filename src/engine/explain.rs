//! Why a lead has its score: every remembered contribution with its points
//! then and now, what came before the remembered window, caps in force, the
//! fit breakdown and the segment history. The parts add up to the score.

use super::{Engine, LeadState, Reason, Scores, Segment};
use crate::event::Millis;

/// One counted event.
#[derive(Debug, Clone, PartialEq)]
pub struct Contributed {
    /// Rule name.
    pub rule: String,
    /// Input event id.
    pub event_id: String,
    /// When it counted.
    pub at: Millis,
    /// Points then (after any cap).
    pub points_then: f64,
    /// The same points decayed to the explanation instant.
    pub points_now: f64,
    /// Whether a cap cut it.
    pub capped: bool,
}

/// A cap in force at the explanation instant.
#[derive(Debug, Clone, PartialEq)]
pub struct CapInForce {
    /// Rule name.
    pub rule: String,
    /// Window start.
    pub window_start: Millis,
    /// Window end (exclusive).
    pub window_end: Millis,
    /// Matches that count in the window (the earliest by event time).
    pub matches: u32,
    /// Absolute points counted in the window.
    pub points: f64,
    /// The rule's limit on matches.
    pub max_matches: Option<u32>,
    /// The rule's limit on points.
    pub max_points: Option<f64>,
}

/// A full explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The instant explained.
    pub at: Millis,
    /// Scores at that instant.
    pub scores: Scores,
    /// Visible segment.
    pub segment: Segment,
    /// Remembered contributions, oldest first.
    pub contributions: Vec<Contributed>,
    /// Per rule, what its older contributions are worth now.
    pub earlier: Vec<(String, f64)>,
    /// Engagement not attributable to a rule: the floor at zero after
    /// negative points, and floating-point rounding.
    pub adjustment: f64,
    /// Caps in force.
    pub caps: Vec<CapInForce>,
    /// Fit points by rule.
    pub fit: Vec<(String, f64)>,
    /// Recent segment transitions: from, to, reason, instant.
    pub history: Vec<(Segment, Segment, Reason, Millis)>,
}

impl Engine {
    /// Explains a lead's scores at `at` (not before its clock).
    pub fn explain(&self, s: &LeadState, at: Millis) -> Explanation {
        let at = at.max(s.as_of);
        let rules = self.rules();
        let decay = |rule: u16, from: Millis| {
            let group = rules.rules.get(rule as usize).map_or(0, |r| r.group);
            let h = rules.half_lives.get(group).copied().unwrap_or(1) as f64;
            libm::exp2(-((at - from).max(0) as f64) / h)
        };
        let name = |rule: u16| {
            rules
                .rules
                .get(rule as usize)
                .map_or_else(|| format!("rule #{rule}"), |r| r.name.clone())
        };
        let contributions: Vec<Contributed> = s
            .log
            .iter()
            .map(|c| Contributed {
                rule: name(c.rule),
                event_id: c.event_id.to_owned(),
                at: c.at,
                points_then: c.points,
                points_now: c.points * decay(c.rule, c.at),
                capped: c.capped,
            })
            .collect();
        let mut earlier = Vec::new();
        let mut attributed = 0.0;
        for r in &s.rules {
            let Some(rule) = rules.rules.get(r.rule as usize) else {
                continue;
            };
            let Some(w) = s.window(rule.group as u8) else {
                continue;
            };
            let h = rules.half_lives.get(rule.group).copied().unwrap_or(1);
            let now = r.cells.value_at(w, h, at);
            let logged: f64 = s
                .log
                .iter()
                .filter(|c| c.rule == r.rule)
                .fold(0.0, |acc, c| acc + c.points * decay(c.rule, c.at));
            let rest = now - logged;
            // What the exact cells and the float sum of the log disagree
            // by (the cells round each event to 2^-24 of its level) is
            // rounding, not an earlier contribution: it goes to the
            // adjustment (it showed as -1.3e-9 points of a positive rule).
            if rest.abs() > 1e-6 * now.abs().max(1.0) {
                earlier.push((rule.name.clone(), rest));
                attributed += now;
            } else {
                attributed += logged;
            }
        }
        let scores = self.scores_at(s, at);
        let caps = s
            .rules
            .iter()
            .filter_map(|r| {
                let rule = rules.rules.get(r.rule as usize)?;
                let cap = rule.cap?;
                let state = r.cap.as_ref()?;
                (state.window == at.div_euclid(cap.window_ms)).then(|| CapInForce {
                    rule: rule.name.clone(),
                    window_start: state.window * cap.window_ms,
                    window_end: (state.window + 1) * cap.window_ms,
                    matches: state.admitted.len() as u32,
                    points: super::allowances(rule.points, &cap, state.admitted.len())
                        .map(f64::abs)
                        .sum(),
                    max_matches: cap.max_matches,
                    max_points: cap.max_points,
                })
            })
            .collect();
        Explanation {
            at,
            segment: Segment::of(s),
            contributions,
            earlier,
            adjustment: scores.engagement - attributed,
            caps,
            fit: self.fit_breakdown(s),
            history: s
                .history
                .iter()
                .map(|h| {
                    (
                        Segment::from_code(h.from),
                        Segment::from_code(h.to),
                        Reason::from_code(h.reason),
                        h.at,
                    )
                })
                .collect(),
            scores,
        }
    }
}
