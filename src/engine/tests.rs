//! Engine unit and property tests.

use std::borrow::Cow;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::event::{Event, EventType, Source};

const HOUR: Millis = 3_600_000;
const DAY: Millis = 24 * HOUR;
const T0: Millis = 1_764_000_000_000;

fn engine() -> Engine {
    Engine::new(Arc::new(Rules::default_rules()), 16)
}

fn ev(
    id: &str,
    at: Millis,
    source: Source,
    kind: EventType,
    attrs: &[(&str, &str)],
) -> Event<'static> {
    Event {
        event_id: Cow::Owned(id.to_owned()),
        lead_id: Some("lead-1".into()),
        anonymous_id: None,
        occurred_at: at,
        source,
        kind,
        attributes: attrs
            .iter()
            .map(|(k, v)| (Cow::Owned((*k).to_owned()), Cow::Owned((*v).to_owned())))
            .collect(),
    }
}

fn web(id: &str, at: Millis, kind: EventType, url: &str) -> Event<'static> {
    ev(id, at, Source::Web, kind, &[("url", url)])
}

fn changes(out: &[Decision]) -> Vec<(String, String, Reason)> {
    let rules = Rules::default_rules();
    out.iter()
        .filter_map(|d| match d {
            Decision::Change(c) => Some((
                c.from.name(&rules).to_owned(),
                c.to.name(&rules).to_owned(),
                c.reason,
            )),
            Decision::Handoff(_) => None,
        })
        .collect()
}

#[test]
fn buffet_restaurant_journey() {
    let e = engine();
    let mut s = e.new_state();
    let mut out = Vec::new();
    let profile = ev(
        "p",
        T0 - 1,
        Source::Crm,
        EventType::ProfileUpdated,
        &[("industry", "restaurants")],
    );
    e.apply(&mut s, &profile, &mut out);
    // Cold: only looked at the menu.
    e.apply(
        &mut s,
        &web("1", T0, EventType::PageView, "/menu"),
        &mut out,
    );
    assert_eq!(Segment::of(&s), Segment::Tier(0));
    // Warm: viewed the price list and the pricing page.
    e.apply(
        &mut s,
        &web("2", T0 + 1000, EventType::PageView, "/price-list"),
        &mut out,
    );
    e.apply(
        &mut s,
        &web("3", T0 + 2000, EventType::PageView, "/pricing"),
        &mut out,
    );
    assert_eq!(
        changes(&out),
        vec![("cold".into(), "warm".into(), Reason::Event)]
    );
    // Hot: started a booking and abandoned it; that crosses the hand-off line.
    out.clear();
    e.apply(
        &mut s,
        &web("4", T0 + 3000, EventType::BookingAbandoned, ""),
        &mut out,
    );
    assert_eq!(Segment::of(&s), Segment::Tier(2));
    assert_eq!(
        changes(&out),
        vec![("warm".into(), "hot".into(), Reason::Event)]
    );
    let h = out
        .iter()
        .find_map(|d| match d {
            Decision::Handoff(h) => Some(h),
            _ => None,
        })
        .expect("a hand-off");
    assert_eq!(h.crossing_rule.as_deref(), Some("booking_abandoned"));
    assert_eq!(h.top_signals[0].rule, "booking_abandoned");
    assert_eq!(h.trigger, "4");
    assert_eq!(h.fit_breakdown, vec![("industry_target".to_owned(), 15.0)]);
    // Fires once: asking in chat right after does not hand off again.
    out.clear();
    e.apply(
        &mut s,
        &ev(
            "5",
            T0 + 4000,
            Source::Web,
            EventType::ChatMessage,
            &[("intent", "booking")],
        ),
        &mut out,
    );
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn decay_downgrades_at_the_exact_crossing() {
    let e = engine();
    let mut s = e.new_state();
    let mut out = Vec::new();
    e.apply(
        &mut s,
        &web("1", T0, EventType::BookingAbandoned, ""),
        &mut out,
    );
    e.apply(
        &mut s,
        &web("2", T0 + 1, EventType::PageView, "/pricing"),
        &mut out,
    );
    e.apply(
        &mut s,
        &web("3", T0 + 2, EventType::PageView, "/pricing"),
        &mut out,
    );
    assert_eq!(
        Segment::of(&s),
        Segment::Tier(2),
        "{:?}",
        e.scores_at(&s, T0)
    );
    out.clear();
    let due = e.next_transition(&s).expect("hot decays");
    // Hot exits below 50: the total crosses exactly at `due`.
    assert!(e.scores_at(&s, due).total < 50.0);
    assert!(e.scores_at(&s, due - 1).total >= 50.0);
    e.advance(&mut s, due - 1, &mut out);
    assert!(out.is_empty());
    e.advance(&mut s, due, &mut out);
    assert_eq!(
        changes(&out),
        vec![("hot".into(), "warm".into(), Reason::Decay)]
    );
    // Advancing far ahead in one step or many gives the same changes at the same instants.
    let mut a = s.clone();
    let mut b = s.clone();
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    e.advance(&mut a, T0 + 60 * DAY, &mut oa);
    for d in 1..=60 {
        e.advance(&mut b, T0 + d * DAY, &mut ob);
    }
    assert_eq!(oa, ob);
    assert_eq!(a, b);
    assert_eq!(
        changes(&oa),
        vec![("warm".into(), "cold".into(), Reason::Decay)]
    );
}

#[test]
fn hysteresis_prevents_flapping() {
    let e = engine();
    let mut s = e.new_state();
    let mut out = Vec::new();
    // 25 points: enters warm (enter 25).
    e.apply(
        &mut s,
        &web("1", T0, EventType::BookingStarted, ""),
        &mut out,
    );
    assert_eq!(Segment::of(&s), Segment::Tier(1));
    // Decays just below 25 but above the exit (20): still warm.
    let t = T0 + 2 * DAY;
    assert!(e.scores_at(&s, t).total < 25.0 && e.scores_at(&s, t).total > 20.0);
    e.apply(
        &mut s,
        &web("2", t, EventType::PageView, "/careers"),
        &mut out,
    );
    e.apply(
        &mut s,
        &web("3", t + 1, EventType::PageView, "/about"),
        &mut out,
    );
    assert_eq!(
        changes(&out),
        vec![
            ("cold".into(), "warm".into(), Reason::Event),
            ("warm".into(), "cold".into(), Reason::Event)
        ]
    );
}

#[test]
fn caps_limit_points_per_window() {
    let e = engine();
    let mut s = e.new_state();
    let mut out = Vec::new();
    for i in 0..6 {
        let open = ev(
            &format!("o{i}"),
            T0 + i * 60_000,
            Source::Email,
            EventType::Open,
            &[],
        );
        e.apply(&mut s, &open, &mut out);
    }
    let stat = s
        .stats
        .iter()
        .find(|st| e.rules().rules[st.rule as usize].name == "email_open")
        .unwrap();
    assert_eq!(stat.count, 6);
    // Three opens a day count; values decayed a little over five minutes.
    assert!((stat.value - 9.0).abs() < 0.01, "{}", stat.value);
    // Next day the cap resets.
    let open = ev("o-next", T0 + DAY, Source::Email, EventType::Open, &[]);
    e.apply(&mut s, &open, &mut out);
    assert!(e.scores_at(&s, T0 + DAY).engagement > e.engagement_at(&s, T0 + DAY - 1) - 1e-9);
}

#[test]
fn machine_opens_count_zero_and_reengage_works() {
    let e = engine();
    let mut s = e.new_state();
    let mut out = Vec::new();
    for i in 0..3 {
        let at = T0 + i * DAY;
        e.apply(
            &mut s,
            &ev(
                &format!("d{i}"),
                at,
                Source::Email,
                EventType::Delivered,
                &[],
            ),
            &mut out,
        );
        // An open two seconds after delivery is a privacy proxy.
        e.apply(
            &mut s,
            &ev(
                &format!("m{i}"),
                at + 2000,
                Source::Email,
                EventType::Open,
                &[],
            ),
            &mut out,
        );
    }
    assert_eq!(e.engagement_at(&s, T0 + 3 * DAY), 0.0);
    assert_eq!(Segment::of(&s), Segment::Reengage);
    e.apply(
        &mut s,
        &ev("c", T0 + 4 * DAY, Source::Email, EventType::Click, &[]),
        &mut out,
    );
    assert_eq!(Segment::of(&s), Segment::Tier(0));
    assert_eq!(
        changes(&out),
        vec![
            ("cold".into(), "reengage".into(), Reason::Event),
            ("reengage".into(), "cold".into(), Reason::Event)
        ]
    );
}

#[test]
fn exits_and_lifecycle() {
    let e = engine();
    let mut s = e.new_state();
    let mut out = Vec::new();
    e.apply(
        &mut s,
        &web("1", T0, EventType::BookingStarted, ""),
        &mut out,
    );
    e.apply(
        &mut s,
        &ev("2", T0 + 1, Source::Email, EventType::Unsubscribe, &[]),
        &mut out,
    );
    assert_eq!(Segment::of(&s), Segment::Suppressed);
    out.clear();
    // No nurture events while suppressed, however hot.
    for i in 0..5 {
        e.apply(
            &mut s,
            &web(
                &format!("b{i}"),
                T0 + 10 + i,
                EventType::BookingAbandoned,
                "",
            ),
            &mut out,
        );
    }
    assert!(out.is_empty(), "{out:?}");
    // Recycled: back to nurture with engagement reset.
    e.apply(
        &mut s,
        &ev(
            "r",
            T0 + 100,
            Source::Crm,
            EventType::LifecycleChanged,
            &[("stage", "recycled")],
        ),
        &mut out,
    );
    assert_eq!(
        changes(&out),
        vec![("suppressed".into(), "cold".into(), Reason::Lifecycle)]
    );
    assert_eq!(e.engagement_at(&s, T0 + 100), 0.0);
    // Not ready: returns to nurture after the period, by itself.
    out.clear();
    e.apply(
        &mut s,
        &ev(
            "n",
            T0 + 200,
            Source::Crm,
            EventType::LifecycleChanged,
            &[("stage", "not_ready")],
        ),
        &mut out,
    );
    let back = e.next_transition(&s).unwrap();
    assert_eq!(back, T0 + 200 + 90 * DAY);
    e.advance(&mut s, back, &mut out);
    assert_eq!(
        changes(&out),
        vec![
            ("cold".into(), "not_ready".into(), Reason::Lifecycle),
            ("not_ready".into(), "cold".into(), Reason::Lifecycle)
        ]
    );
}

#[test]
fn fit_grades_from_profile() {
    let e = engine();
    let mut s = e.new_state();
    let mut out = Vec::new();
    let profile = ev(
        "p",
        T0,
        Source::Crm,
        EventType::ProfileUpdated,
        &[
            ("industry", "restaurants"),
            ("company_size", "120"),
            ("job_title", "Owner"),
            ("budget", "5000"),
        ],
    );
    e.apply(&mut s, &profile, &mut out);
    let scores = e.scores_at(&s, T0);
    assert_eq!(scores.fit, 45.0);
    assert_eq!(scores.grade, Grade::A);
    // Fit does not decay.
    assert_eq!(e.scores_at(&s, T0 + 365 * DAY).fit, 45.0);
    // A later update changes one attribute only.
    e.apply(
        &mut s,
        &ev(
            "p2",
            T0 + 1,
            Source::Crm,
            EventType::ProfileUpdated,
            &[("industry", "mining")],
        ),
        &mut out,
    );
    assert_eq!(e.fit(&s), 30.0);
    assert_eq!(e.fit_breakdown(&s).len(), 3);
}

#[test]
fn handoff_rearms_after_falling_below() {
    let e = engine();
    let mut s = e.new_state();
    let mut out = Vec::new();
    let profile = ev(
        "p",
        T0,
        Source::Crm,
        EventType::ProfileUpdated,
        &[("industry", "events")],
    );
    e.apply(&mut s, &profile, &mut out);
    let burst = |s: &mut LeadState, at: Millis, tag: &str, out: &mut Vec<Decision>| {
        e.apply(
            s,
            &web(&format!("{tag}a"), at, EventType::BookingAbandoned, ""),
            out,
        );
        e.apply(
            s,
            &ev(
                &format!("{tag}c"),
                at + 1,
                Source::Web,
                EventType::ChatMessage,
                &[("intent", "quote")],
            ),
            out,
        );
    };
    burst(&mut s, T0 + 1, "x", &mut out);
    let handoffs = |out: &[Decision]| {
        out.iter()
            .filter(|d| matches!(d, Decision::Handoff(_)))
            .count()
    };
    assert_eq!(handoffs(&out), 1);
    // Still hot a day later: no second hand-off.
    burst(&mut s, T0 + DAY, "y", &mut out);
    assert_eq!(handoffs(&out), 1);
    // A month later the score fell below the re-arm level; qualifying again hands off again.
    burst(&mut s, T0 + 40 * DAY, "z", &mut out);
    assert_eq!(handoffs(&out), 2);
}

#[test]
fn late_events_never_run_the_clock_backwards() {
    let e = engine();
    let mut s = e.new_state();
    let mut out = Vec::new();
    e.apply(
        &mut s,
        &web("1", T0 + DAY, EventType::FormSubmit, ""),
        &mut out,
    );
    e.apply(&mut s, &web("2", T0, EventType::FormSubmit, ""), &mut out);
    assert_eq!(s.as_of, T0 + DAY);
    assert_eq!(e.engagement_at(&s, T0 + DAY), 40.0);
}

fn arb_event() -> impl Strategy<Value = (u8, u32, u8)> {
    // (kind index, minutes since previous, id reuse chooser)
    (0u8..14, 0u32..(60 * 24 * 3), 0u8..10)
}

fn build(events: &[(u8, u32, u8)]) -> Vec<Event<'static>> {
    let kinds: [(Source, EventType, &[(&str, &str)]); 14] = [
        (Source::Web, EventType::PageView, &[("url", "/pricing")]),
        (Source::Web, EventType::PageView, &[("url", "/menu")]),
        (Source::Web, EventType::PageView, &[("url", "/careers")]),
        (Source::Web, EventType::BookingAbandoned, &[]),
        (
            Source::Web,
            EventType::ChatMessage,
            &[("intent", "booking")],
        ),
        (Source::Email, EventType::Delivered, &[]),
        (Source::Email, EventType::Open, &[]),
        (Source::Email, EventType::Click, &[]),
        (Source::Adpixel, EventType::Click, &[]),
        (
            Source::Crm,
            EventType::ProfileUpdated,
            &[("industry", "catering"), ("budget", "2000")],
        ),
        (
            Source::Crm,
            EventType::LifecycleChanged,
            &[("stage", "not_ready")],
        ),
        (
            Source::Crm,
            EventType::LifecycleChanged,
            &[("stage", "recycled")],
        ),
        (Source::Email, EventType::Unsubscribe, &[]),
        (Source::Web, EventType::FormSubmit, &[]),
    ];
    let mut t = T0;
    events
        .iter()
        .enumerate()
        .map(|(i, (k, gap, reuse))| {
            t += Millis::from(*gap) * 60_000;
            let (source, kind, attrs) = kinds[*k as usize];
            // One in ten events re-uses an earlier id (a re-produced duplicate).
            let id = if *reuse == 0 && i > 0 {
                format!("e{}", i - 1)
            } else {
                format!("e{i}")
            };
            ev(&id, t, source, kind, attrs)
        })
        .collect()
}

fn run(e: &Engine, events: &[Event<'static>], splits: &[usize]) -> (LeadState, Vec<Decision>) {
    let mut s = e.new_state();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for (i, event) in events.iter().enumerate() {
        if splits.contains(&i) {
            // A "restart": state goes through its stored form, and the caller's
            // clock advances to the event time first (as a partition timer would).
            e.encode(&s, &mut buf);
            s = e.decode(&buf).unwrap();
            e.advance(&mut s, event.occurred_at, &mut out);
        }
        e.apply(&mut s, event, &mut out);
    }
    (s, out)
}

proptest! {
    #[test]
    fn decay_never_raises_a_score(raw in proptest::collection::vec(arb_event(), 1..40), later in 0i64..(400 * DAY)) {
        let e = engine();
        let events = build(&raw);
        let (s, _) = run(&e, &events, &[]);
        let t = s.as_of;
        let now = e.scores_at(&s, t).total;
        prop_assert!(e.scores_at(&s, t + later).total <= now);
        prop_assert!(e.engagement_at(&s, t + later) >= 0.0);
    }

    #[test]
    fn batching_and_restarts_change_nothing(raw in proptest::collection::vec(arb_event(), 1..60), splits in proptest::collection::vec(0usize..60, 0..8)) {
        let e = engine();
        let events = build(&raw);
        let single = run(&e, &events, &[]);
        let split = run(&e, &events, &splits);
        prop_assert_eq!(single.0, split.0);
        prop_assert_eq!(single.1, split.1);
    }

    #[test]
    fn duplicates_change_nothing(raw in proptest::collection::vec(arb_event(), 1..40), dup_at in 0usize..40) {
        let e = engine();
        let events = build(&raw);
        let (mut s, out) = run(&e, &events, &[]);
        let before = (s.clone(), out.len());
        let idx = dup_at % events.len();
        // Re-deliver one of the last 16 distinct events.
        if events.len() - idx <= 16 {
            let mut more = Vec::new();
            let applied = e.apply(&mut s, &events[idx], &mut more);
            prop_assert_eq!(applied, Applied::Duplicate);
            prop_assert!(more.is_empty());
            prop_assert_eq!(before.0, s);
        }
    }

    #[test]
    fn timers_fire_exactly_where_advance_would(raw in proptest::collection::vec(arb_event(), 1..30)) {
        let e = engine();
        let events = build(&raw);
        let (s, _) = run(&e, &events, &[]);
        if let Some(due) = e.next_transition(&s) {
            let mut a = s.clone();
            let mut early = Vec::new();
            e.advance(&mut a, due - 1, &mut early);
            prop_assert!(early.is_empty());
            let mut at_due = Vec::new();
            e.advance(&mut a, due, &mut at_due);
            let fired = at_due.iter().all(|d| matches!(d, Decision::Change(c) if c.at == due));
            prop_assert!(fired);
        }
    }
}

#[test]
fn stitching_merges_anonymous_history_with_original_timestamps() {
    let e = engine();
    let mut anon = e.new_state();
    let mut lead = e.new_state();
    let mut out = Vec::new();
    let mut a1 = web("a1", T0, EventType::PageView, "/pricing");
    a1.lead_id = None;
    a1.anonymous_id = Some("cookie-1".into());
    e.apply(&mut anon, &a1, &mut out);
    e.apply(
        &mut lead,
        &web("l1", T0 + DAY, EventType::FormSubmit, ""),
        &mut out,
    );
    let mut identify = ev("id", T0 + 2 * DAY, Source::Web, EventType::Identify, &[]);
    identify.anonymous_id = Some("cookie-1".into());
    e.apply_merging(&mut lead, &identify, Some(&anon), &mut out);
    let at = T0 + 2 * DAY;
    let expected = 15.0 * (-2.0_f64 / 7.0).exp2() + 20.0 * (-1.0_f64 / 7.0).exp2();
    assert!((e.engagement_at(&lead, at) - expected).abs() < 1e-9);
    let pricing = lead
        .stats
        .iter()
        .find(|s| e.rules().rules[s.rule as usize].name == "pricing_page")
        .unwrap();
    assert_eq!(pricing.last_at, T0, "original timestamp kept");
    // The anonymous event id is now known to the lead: a redelivery counts nothing.
    let mut again = a1.clone();
    again.lead_id = Some("lead-1".into());
    assert_eq!(e.apply(&mut lead, &again, &mut out), Applied::Duplicate);
}

#[test]
fn explanations_add_up_to_the_score() {
    let e = Engine::new(Arc::new(Rules::default_rules()), 16).with_explain_window(4);
    let mut s = e.new_state();
    let mut out = Vec::new();
    for i in 0..5 {
        e.apply(
            &mut s,
            &web(
                &format!("p{i}"),
                T0 + i * HOUR,
                EventType::PageView,
                "/pricing",
            ),
            &mut out,
        );
    }
    e.apply(
        &mut s,
        &web("c", T0 + 6 * HOUR, EventType::PageView, "/careers"),
        &mut out,
    );
    e.apply(
        &mut s,
        &ev("o", T0 + 7 * HOUR, Source::Email, EventType::Open, &[]),
        &mut out,
    );
    let at = T0 + 3 * DAY;
    let x = e.explain(&s, at);
    assert_eq!(x.contributions.len(), 4, "bounded window");
    let ids: Vec<&str> = x
        .contributions
        .iter()
        .map(|c| c.event_id.as_str())
        .collect();
    assert_eq!(ids, ["p3", "p4", "c", "o"], "the newest, oldest first");
    let parts: f64 = x.contributions.iter().map(|c| c.points_now).sum::<f64>()
        + x.earlier.iter().map(|(_, p)| p).sum::<f64>()
        + x.adjustment;
    assert!(
        (parts - x.scores.engagement).abs() < 1e-9,
        "{parts} vs {}",
        x.scores.engagement
    );
    // The pricing cap (45 points a day) cut the fourth and fifth views.
    assert!(
        x.contributions
            .iter()
            .any(|c| c.rule == "pricing_page" && c.capped && c.points_then == 0.0)
    );
    assert!(x.earlier.iter().any(|(r, _)| r == "pricing_page"));
    assert_eq!(
        x.history,
        vec![(Segment::Tier(0), Segment::Tier(1), Reason::Event, T0 + HOUR)]
    );
    // Points now are points then, decayed from their own instant.
    let open = x
        .contributions
        .iter()
        .find(|c| c.rule == "email_open")
        .unwrap();
    assert!((open.points_now - 3.0 * (-(3.0 * 24.0 - 7.0) / 72.0_f64).exp2()).abs() < 1e-9);
}
