//! Identity: which key an event's state lives under, and when an anonymous
//! visitor's history merges into a lead. Decided once per event, from the
//! event and the visitor's stored state alone.
//!
//! * An event with a `lead_id` applies to that lead. If it also carries an
//!   `anonymous_id`, that visitor is *linked*: a visitor with history is
//!   merged into the lead once (its contributions keep their own times), and
//!   the anonymous id becomes an alias of the lead.
//! * An event with only an `anonymous_id` applies to the lead the id is an
//!   alias of, if any (a visitor who identified and keeps browsing with only
//!   the cookie), else to the visitor, silently: nobody is mailed or handed
//!   to sales by cookie.
//! * A cookie later identified as another lead (a shared device) is re-pointed
//!   to the newest lead; the history merged earlier stays with the first.

use super::state::{Kind, LeadState};
use crate::event::Event;

/// What linking an anonymous id to a lead does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The visitor has history: merge it into the lead, then alias it.
    Merge,
    /// No visitor yet: create the alias.
    Create,
    /// The id is an alias of another lead: point it at this one.
    Repoint,
    /// The id is already an alias of this lead.
    Already,
}

/// Where an event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'e> {
    /// Apply to lead `id`; `link` says what happens to the anonymous id it carries.
    Lead {
        /// The lead id.
        id: &'e str,
        /// The anonymous id carried, and what linking it does.
        link: Option<(&'e str, Link)>,
    },
    /// Apply to the anonymous visitor `anon`, silently.
    Visitor {
        /// The anonymous id.
        anon: &'e str,
    },
    /// Apply to `lead`, which the anonymous id `anon` is an alias of.
    Aliased {
        /// The anonymous id.
        anon: &'e str,
        /// The lead it routes to.
        lead: String,
    },
}

/// The anonymous id whose stored state [`route`] needs, if any.
pub fn visitor_id<'e>(e: &'e Event<'_>) -> Option<&'e str> {
    e.anonymous_id.as_deref()
}

/// Routes an event, given the stored state of its anonymous id (if it has one).
pub fn route<'e>(e: &'e Event<'_>, visitor: Option<&LeadState>) -> Route<'e> {
    match (e.lead_id.as_deref(), e.anonymous_id.as_deref()) {
        (Some(id), anon) => Route::Lead {
            id,
            link: anon.map(|a| {
                let link = match visitor.map(|v| &v.kind) {
                    Some(Kind::Alias(to)) if to == id => Link::Already,
                    Some(Kind::Alias(_)) => Link::Repoint,
                    Some(_) if visitor.is_some_and(|v| !v.is_new()) => Link::Merge,
                    _ => Link::Create,
                };
                (a, link)
            }),
        },
        (None, Some(anon)) => match visitor.map(|v| &v.kind) {
            Some(Kind::Alias(lead)) => Route::Aliased {
                anon,
                lead: lead.clone(),
            },
            _ => Route::Visitor { anon },
        },
        // Validation guarantees one of the ids; an event without either
        // belongs to nobody (the empty key is never published).
        (None, None) => Route::Visitor { anon: "" },
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::event::{EventType, Source};

    fn ev(lead: Option<&str>, anon: Option<&str>) -> Event<'static> {
        Event {
            event_id: Cow::Borrowed("e"),
            lead_id: lead.map(|s| Cow::Owned(s.to_owned())),
            anonymous_id: anon.map(|s| Cow::Owned(s.to_owned())),
            occurred_at: 1,
            source: Source::Web,
            kind: EventType::PageView,
            channel: None,
            attributes: Vec::new(),
        }
    }

    #[test]
    fn routes_by_identity() {
        let mut visitor = LeadState::new(Kind::Visitor);
        visitor.as_of = 5;
        let alias = LeadState::new(Kind::Alias("L".into()));
        let e = ev(Some("L"), Some("c"));
        assert_eq!(
            route(&e, Some(&visitor)),
            Route::Lead {
                id: "L",
                link: Some(("c", Link::Merge))
            }
        );
        assert_eq!(
            route(&e, None),
            Route::Lead {
                id: "L",
                link: Some(("c", Link::Create))
            }
        );
        assert_eq!(
            route(&e, Some(&alias)),
            Route::Lead {
                id: "L",
                link: Some(("c", Link::Already))
            }
        );
        let e2 = ev(Some("M"), Some("c"));
        assert_eq!(
            route(&e2, Some(&alias)),
            Route::Lead {
                id: "M",
                link: Some(("c", Link::Repoint))
            }
        );
        let anon = ev(None, Some("c"));
        assert_eq!(
            route(&anon, Some(&alias)),
            Route::Aliased {
                anon: "c",
                lead: "L".into()
            }
        );
        assert_eq!(route(&anon, Some(&visitor)), Route::Visitor { anon: "c" });
        assert_eq!(route(&anon, None), Route::Visitor { anon: "c" });
    }
}
