//! What the positions in a stored state mean, and how a state written under
//! one rules file is carried over to another.
//!
//! A stored lead refers to rules, decay groups, fit attributes and rules,
//! segment tiers and channels by position. Each rules file has a [`Layout`]
//! (those names, plus the half-lives and caps that give stored numbers their
//! meaning), kept in Redis by its hash. When the rules change, a lead written
//! under an older layout is remapped by name, deterministically:
//!
//! * a rule that still exists keeps its contributions; if its decay half-life
//!   changed, what it is worth at the lead's clock is carried over as one
//!   contribution at that instant; a removed or renamed rule's points are
//!   dropped (a renamed rule is a new rule);
//! * a cap whose window or limits changed starts afresh;
//! * a fit attribute keeps its value's rule if that fit rule still exists on
//!   the same attribute, else it becomes unknown until the next profile update;
//! * a segment tier is found by name; a removed tier is recomputed from the
//!   score at the lead's clock;
//! * channels are found by name (an opt-out of a removed channel is dropped).

use serde::{Deserialize, Serialize};

use super::exact::{Cells, Term};
use super::state::LeadState;
use super::{Engine, Segment};

/// The names and shapes stored positions refer to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    /// Engagement rule names, by index.
    pub rules: Vec<String>,
    /// Decay group of each rule.
    pub rule_groups: Vec<u8>,
    /// Half-life of each decay group, in ms.
    pub half_lives_ms: Vec<i64>,
    /// Cap of each rule, as text (`window/max_matches/max_points`), empty if none.
    pub caps: Vec<String>,
    /// Fit attributes, by slot.
    pub fit_attributes: Vec<String>,
    /// Fit rule names, by index.
    pub fit_rules: Vec<String>,
    /// The attribute slot of each fit rule.
    pub fit_rule_slots: Vec<u8>,
    /// Segment tier names, lowest first.
    pub tiers: Vec<String>,
    /// Channel names, by index.
    pub channels: Vec<String>,
}

impl Layout {
    /// The layout of compiled rules.
    pub fn of(rules: &super::Rules) -> Layout {
        Layout {
            rules: rules.rules.iter().map(|r| r.name.clone()).collect(),
            rule_groups: rules.rules.iter().map(|r| r.group as u8).collect(),
            half_lives_ms: rules.half_lives.clone(),
            caps: rules
                .rules
                .iter()
                .map(|r| {
                    r.cap.map_or_else(String::new, |c| {
                        format!("{}/{:?}/{:?}", c.window_ms, c.max_matches, c.max_points)
                    })
                })
                .collect(),
            fit_attributes: rules.fit_attributes.clone(),
            fit_rules: rules.fit_rules.iter().map(|r| r.name.clone()).collect(),
            fit_rule_slots: rules.fit_rules.iter().map(|r| r.slot).collect(),
            tiers: rules.tiers.iter().map(|t| t.name.clone()).collect(),
            channels: rules.channels.clone(),
        }
    }

    /// A stable 32-bit hash of the layout (stored in every state's header).
    pub fn hash(&self) -> u32 {
        let text = serde_json::to_string(self).unwrap_or_default();
        xxhash_rust::xxh3::xxh3_64(text.as_bytes()) as u32
    }
}

/// Remaps a state written under layout `from` (unknown: `None`) to the
/// engine's layout.
pub fn remap(engine: &Engine, from: Option<&Layout>, s: &mut LeadState) {
    let to = engine.layout();
    let Some(from) = from else {
        // Positions of an unknown layout mean nothing: keep what does not
        // depend on them, and rescore the tier from nothing.
        s.rules.clear();
        s.windows.clear();
        s.fit.clear();
        s.log.clear();
        s.history.clear();
        s.tier = 0;
        s.tier_since = s.as_of;
        return;
    };
    let at = s.as_of;
    // Rules: by name; carried over exactly when the half-life is unchanged.
    let mut rules = std::mem::take(&mut s.rules);
    let old_windows = std::mem::take(&mut s.windows);
    let mut moved = Vec::with_capacity(rules.len());
    for mut r in rules.drain(..) {
        let old = usize::from(r.rule);
        let Some(name) = from.rules.get(old) else {
            continue;
        };
        let Some(new) = to.rules.iter().position(|n| n == name) else {
            continue;
        };
        let old_group = from.rule_groups.get(old).copied().unwrap_or(0);
        let new_group = to.rule_groups[new];
        let old_h = from
            .half_lives_ms
            .get(usize::from(old_group))
            .copied()
            .unwrap_or(1);
        let new_h = to.half_lives_ms[usize::from(new_group)];
        let Some(old_w) = old_windows
            .iter()
            .find(|(g, _)| *g == old_group)
            .map(|(_, w)| *w)
        else {
            continue;
        };
        let (cells, window) = if old_h == new_h {
            (r.cells, old_w)
        } else {
            let worth = r.cells.value_at(old_w, old_h, at);
            let term = Term::new(worth, at, new_h);
            let mut c = Cells::default();
            c.add(term.cell, term);
            (c, term.cell)
        };
        if from.caps.get(old) != to.caps.get(new) {
            r.cap = None;
        }
        r.rule = new as u16;
        r.cells = cells;
        moved.push((r, new_group, window));
    }
    // Each new group's window is the newest among its rules; shift the rest.
    for (_, g, w) in &moved {
        match s.windows.iter_mut().find(|(x, _)| x == g) {
            Some(e) => e.1 = e.1.max(*w),
            None => s.windows.push((*g, *w)),
        }
    }
    s.windows.sort_unstable();
    for (mut r, g, w) in moved {
        let target = s
            .windows
            .iter()
            .find(|(x, _)| *x == g)
            .map_or(w, |(_, t)| *t);
        r.cells.shift(w, target);
        s.rules.push(r);
    }
    s.rules.sort_by_key(|r| r.rule);
    let rule_of = |old: u16| {
        from.rules
            .get(usize::from(old))
            .and_then(|n| to.rules.iter().position(|m| m == n))
            .map(|i| i as u16)
    };
    s.log.remap_rules(rule_of);
    // Fit: by attribute, keeping the value's rule if it still exists on it.
    s.fit.retain_mut(|f| {
        let Some(attr) = from.fit_attributes.get(usize::from(f.slot)) else {
            return false;
        };
        let Some(slot) = to.fit_attributes.iter().position(|a| a == attr) else {
            return false;
        };
        f.slot = slot as u8;
        match f.rule {
            None => true,
            Some(old) => {
                let new = from
                    .fit_rules
                    .get(usize::from(old))
                    .and_then(|n| to.fit_rules.iter().position(|m| m == n))
                    .filter(|i| usize::from(to.fit_rule_slots[*i]) == slot);
                f.rule = new.map(|i| i as u16);
                new.is_some()
            }
        }
    });
    s.fit.sort_by_key(|f| f.slot);
    // Channels: by name.
    s.channels.retain_mut(|c| {
        let Some(name) = from.channels.get(usize::from(c.channel)) else {
            return false;
        };
        match to.channels.iter().position(|n| n == name) {
            Some(i) => {
                c.channel = i as u8;
                true
            }
            None => false,
        }
    });
    s.channels.sort_by_key(|c| c.channel);
    // Tiers: by name, else rescored at the lead's clock.
    let tier_of = |old: u8| {
        from.tiers
            .get(usize::from(old))
            .and_then(|n| to.tiers.iter().position(|m| m == n))
            .map(|i| i as u8)
    };
    match tier_of(s.tier) {
        Some(t) => s.tier = t,
        None => {
            let total = engine.scores_at(s, at).total;
            s.tier = engine
                .rules()
                .tiers
                .iter()
                .rposition(|t| total >= t.enter)
                .unwrap_or_default() as u8;
            s.tier_since = at;
        }
    }
    let tier_code = |code: u16| match Segment::from_code(code) {
        Segment::Tier(t) => tier_of(t).map(|n| Segment::Tier(n).code()),
        _ => Some(code),
    };
    s.history
        .retain_mut(|h| match (tier_code(h.from), tier_code(h.to)) {
            (Some(f), Some(t)) => {
                h.from = f;
                h.to = t;
                true
            }
            _ => false,
        });
}
