//! Decay timers: for each lead, the instant of its next time-driven
//! transition, ordered by time so that due leads are found without scanning.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::event::Millis;

/// Timers for a set of leads (one per partition in the pipeline).
#[derive(Debug, Default)]
pub struct Schedule {
    by_time: BTreeSet<(Millis, Arc<str>)>,
    by_lead: HashMap<Arc<str>, Millis>,
}

impl Schedule {
    /// Sets (or clears, with `None`) the lead's timer.
    pub fn set(&mut self, lead: &Arc<str>, at: Option<Millis>) {
        match (self.by_lead.get(lead).copied(), at) {
            (Some(old), Some(new)) if old == new => {}
            (old, new) => {
                if let Some(old) = old {
                    self.by_time.remove(&(old, Arc::clone(lead)));
                    self.by_lead.remove(lead);
                }
                if let Some(new) = new {
                    self.by_time.insert((new, Arc::clone(lead)));
                    self.by_lead.insert(Arc::clone(lead), new);
                }
            }
        }
    }

    /// Sets the lead's timer to `at` only if that is earlier than the one set
    /// (or none is set). Callers whose timers may fire early use this.
    pub fn set_earlier(&mut self, lead: &Arc<str>, at: Option<Millis>) {
        if let Some(new) = at
            && self.by_lead.get(lead).is_none_or(|old| new < *old)
        {
            self.set(lead, Some(new));
        }
    }

    /// Removes and returns the earliest timer due at or before `now`.
    pub fn pop_due(&mut self, now: Millis) -> Option<(Millis, Arc<str>)> {
        let first = self.by_time.first()?;
        if first.0 > now {
            return None;
        }
        let (at, lead) = self.by_time.pop_first()?;
        self.by_lead.remove(&lead);
        Some((at, lead))
    }

    /// The leads whose timers are due at or before `until`, earliest first.
    pub fn due_ids(&self, until: Millis) -> Vec<Arc<str>> {
        self.by_time
            .iter()
            .take_while(|(t, _)| *t <= until)
            .map(|(_, id)| Arc::clone(id))
            .collect()
    }

    /// The lead's timer, if set.
    pub fn get(&self, lead: &str) -> Option<Millis> {
        self.by_lead.get(lead).copied()
    }

    /// Number of scheduled leads.
    pub fn len(&self) -> usize {
        self.by_lead.len()
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.by_lead.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_time_order_and_reschedules() {
        let mut s = Schedule::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        s.set(&a, Some(30));
        s.set(&b, Some(10));
        s.set(&a, Some(5));
        assert_eq!(s.len(), 2);
        assert_eq!(s.pop_due(4), None);
        assert_eq!(s.pop_due(100), Some((5, a.clone())));
        s.set(&b, None);
        assert!(s.is_empty());
        s.set_earlier(&b, Some(50));
        s.set_earlier(&b, Some(70));
        assert_eq!(s.get("b"), Some(50));
        s.set_earlier(&b, Some(20));
        assert_eq!(s.get("b"), Some(20));
        assert_eq!(s.pop_due(100), Some((20, b.clone())));
        assert_eq!(s.pop_due(100), None);
    }
}
