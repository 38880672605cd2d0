//! The scoring model through the real broker and Redis: decay without
//! traffic, identity stitching, exits, and explanations over HTTP.

mod common;

use std::time::Duration;

use common::{Broker, Names, Recent, Redis, Service, event, json};
use rdkafka::producer::{BaseRecord, Producer};

const WAIT: Duration = Duration::from_secs(30);

/// A broker with the topics (one partition each) and a Redis.
fn services() -> (Broker, Redis, Names) {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = Names::new();
    broker.create_topics(&names.all(), 1);
    (broker, redis, names)
}

fn setup() -> (Broker, Redis, Names, Service) {
    let (broker, redis, names) = services();
    let service = Service::start(&broker, &redis, &names, &[]);
    (broker, redis, names, service)
}

fn send(broker: &Broker, topic: &str, key: &str, payloads: &[Vec<u8>]) {
    let p = broker.producer();
    for payload in payloads {
        p.send(BaseRecord::to(topic).partition(0).key(key).payload(payload))
            .unwrap();
    }
    p.flush(WAIT).unwrap();
}

fn changes_of(broker: &Broker, names: &Names, lead: &str, count: usize) -> Vec<serde_json::Value> {
    broker
        .read(&names.changes, 1, usize::MAX, Duration::from_secs(3))
        .iter()
        .map(json)
        .filter(|v| v["lead_id"] == lead)
        .take(count)
        .collect()
}

/// Reads `lead`'s changes until there are `count` or `timeout` passes.
fn wait_changes(
    broker: &Broker,
    names: &Names,
    lead: &str,
    count: usize,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let c = changes_of(broker, names, lead, count);
        if c.len() >= count || std::time::Instant::now() > deadline {
            return c;
        }
    }
}

/// Each change as (from, to, reason).
fn transitions(changes: &[serde_json::Value]) -> Vec<(&str, &str, &str)> {
    changes
        .iter()
        .map(|v| {
            (
                v["previous_segment"].as_str().unwrap(),
                v["segment"].as_str().unwrap(),
                v["reason"].as_str().unwrap(),
            )
        })
        .collect()
}

/// A lead that abandons a booking and starts one a minute later, weeks
/// before today: hot (40 + 25 points), then decay takes it down.
fn weeks_old_hot_story(broker: &Broker, names: &Names) {
    send(
        broker,
        &names.web,
        "hot",
        &[
            event(
                "h1",
                "hot",
                "2026-11-01T10:00:00Z",
                "booking_abandoned",
                &[],
            ),
            event("h2", "hot", "2026-11-01T10:01:00Z", "booking_started", &[]),
        ],
    );
}

/// The changes of a lead made hot by a booking abandoned and one started,
/// then left to decay ([`weeks_old_hot_story`], or the same two events now).
const HOT_THEN_DECAY: [(&str, &str, &str); 4] = [
    ("cold", "warm", "event"),
    ("warm", "hot", "event"),
    ("hot", "warm", "decay"),
    ("warm", "cold", "decay"),
];

#[test]
fn a_quiet_hot_lead_is_downgraded_by_decay() {
    // The whole story is in the topic before the service starts, so the
    // shard's clock is moved by the events (a backlog is merged in event-time
    // order). The same story sent after the shard went idle is the next test.
    let (broker, redis, names) = services();
    weeks_old_hot_story(&broker, &names);
    // Weeks later only another lead is active: the shard's clock moves on.
    send(
        &broker,
        &names.web,
        "other",
        &[event(
            "o1",
            "other",
            "2026-11-20T00:00:00Z",
            "page_view",
            &[],
        )],
    );
    let service = Service::start(&broker, &redis, &names, &[]);
    service.wait_consumed(3, WAIT);
    let c = changes_of(&broker, &names, "hot", 4);
    assert_eq!(transitions(&c), HOT_THEN_DECAY, "log:\n{}", service.logs());
    assert!(c[2]["trigger_event_id"].is_null());
    assert!(
        c[2]["occurred_at"].as_str().unwrap() < "2026-11-20",
        "at the crossing instant, not at the clock"
    );
    assert!(service.terminate().success());
}

/// The same weeks-old story as above, sent as a backfill to a service that
/// has been running and gone quiet: the shard's clock had followed the wall
/// clock, so the backfill is behind it (or late, if the inputs were not yet
/// idle), yet it gives the same four changes at the same instants. Before
/// timers stopped firing past the last event applied, h1's decay timer
/// (due days after h1, weeks before the clock) fired before h2 was applied:
/// warm, cold, warm.
#[test]
fn a_backfill_after_a_quiet_spell_gives_the_changes_it_gives_on_time() {
    let (broker, _redis, names, mut service) = setup();
    service.wait_ready();
    // Live traffic on another input, then nothing for a while: the inputs
    // go idle (1 s) and the shard's clock follows the wall clock.
    let now = leadscore::event::format_rfc3339(leadscore::event::wall_clock_ms());
    send(
        &broker,
        &names.adpixel,
        "live",
        &[event("a1", "live", &now, "click", &[])],
    );
    service.wait_consumed(1, WAIT);
    std::thread::sleep(Duration::from_secs(4));
    weeks_old_hot_story(&broker, &names);
    service.wait_consumed(3, WAIT);
    let c = wait_changes(&broker, &names, "hot", 4, WAIT);
    assert_eq!(transitions(&c), HOT_THEN_DECAY, "log:\n{}", service.logs());
    let at = |i: usize| c[i]["occurred_at"].as_str().unwrap();
    assert_eq!(at(1), "2026-11-01T10:01:00.000Z");
    assert!(
        at(2) < "2026-11-20" && at(3) < "2026-11-20",
        "decay at the crossing instants, not at the clock: {c:?}"
    );
    // Behind the clock, or late had the inputs not yet gone idle: applied
    // after later events either way. Counted on the web input only: the
    // live click can itself fall a few milliseconds behind a clock that an
    // idle tick moved to the wall clock before it arrived.
    let web = format!("topic=\"{}\"", names.web);
    let behind = || {
        let (_, body) = service.get("/metrics").expect("metrics");
        let body = body
            .lines()
            .filter(|l| l.contains(&web))
            .collect::<Vec<_>>()
            .join("\n");
        leadscore::metrics::sum_samples(&body, "leadscore_events_behind_clock_total")
            + leadscore::metrics::sum_samples(&body, "leadscore_late_events_total")
    };
    let deadline = std::time::Instant::now() + WAIT;
    while behind() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(behind(), 2, "log:\n{}", service.logs());
    assert!(service.terminate().success());
}

#[test]
fn an_anonymous_history_counts_for_the_lead_once_identified() {
    let (broker, _redis, names, service) = setup();
    let t = Recent::new();
    let anon = |id: &str, at: &str, url: &str| {
        serde_json::json!({"event_id": id, "anonymous_id": "cookie-1", "occurred_at": at, "type": "page_view", "attributes": {"url": url}})
            .to_string()
            .into_bytes()
    };
    send(
        &broker,
        &names.web,
        "cookie-1",
        &[
            anon("a1", &t.at(0), "/pricing"),
            anon("a2", &t.at(1), "/pricing"),
        ],
    );
    let identify = serde_json::json!({"event_id": "i1", "lead_id": "crm-1", "anonymous_id": "cookie-1", "occurred_at": t.at(5), "type": "identify"});
    send(
        &broker,
        &names.web,
        "crm-1",
        &[identify.to_string().into_bytes()],
    );
    service.wait_consumed(3, WAIT);
    let c = changes_of(&broker, &names, "crm-1", 1);
    assert_eq!(c.len(), 1, "log:\n{}", service.logs());
    assert_eq!(
        (c[0]["segment"].as_str(), c[0]["trigger_event_id"].as_str()),
        (Some("warm"), Some("i1"))
    );
    assert!(
        changes_of(&broker, &names, "anon:cookie-1", 1).is_empty(),
        "visitors are scored silently"
    );
    let (status, body) = service.get("/v1/leads/crm-1/explain").unwrap();
    assert_eq!(status, 200, "{body}");
    let x: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = x["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["a1", "a2"], "original events, original times");
    assert_eq!(x["contributions"][0]["occurred_at"], t.at(0));
    assert_eq!(service.get("/v1/leads/anon:cookie-1").unwrap().0, 404);
    assert!(service.terminate().success());
}

#[test]
fn an_unsubscribed_lead_gets_no_further_nurture_events_and_explain_adds_up() {
    let (broker, _redis, names, service) = setup();
    let t = Recent::new();
    send(
        &broker,
        &names.web,
        "l",
        &[event("w1", "l", &t.at(0), "booking_started", &[])],
    );
    send(
        &broker,
        &names.email,
        "l",
        &[event("u1", "l", &t.at(1), "unsubscribe", &[])],
    );
    service.wait_consumed(2, WAIT);
    send(
        &broker,
        &names.web,
        "l",
        &[
            event("w2", "l", &t.at(2), "booking_abandoned", &[]),
            event(
                "w3",
                "l",
                &t.at(3),
                "chat_message",
                &[("intent", "booking")],
            ),
        ],
    );
    service.wait_consumed(4, WAIT);
    let c = changes_of(&broker, &names, "l", 5);
    let seq: Vec<(&str, &str)> = c
        .iter()
        .map(|v| {
            (
                v["segment"].as_str().unwrap(),
                v["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seq, vec![("warm", "event"), ("suppressed", "opt_out")]);
    assert!(
        broker
            .read(&names.handoffs, 1, 1, Duration::from_secs(2))
            .is_empty()
    );
    let (status, body) = service.get("/v1/leads/l/explain").unwrap();
    assert_eq!(status, 200, "{body}");
    let x: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sum: f64 = x["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["points_now"].as_f64().unwrap())
        .sum::<f64>()
        + x["earlier_contributions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["points_now"].as_f64().unwrap())
            .sum::<f64>()
        + x["adjustment"].as_f64().unwrap();
    assert!(
        (sum - x["engagement"].as_f64().unwrap()).abs() < 1e-6,
        "{body}"
    );
    assert_eq!(x["segment"], "suppressed");
    assert_eq!(x["segment_history"].as_array().unwrap().len(), 2);
    assert!(service.terminate().success());
}

/// Rules with half-lives of seconds (and no dwell), for tests of decay in real time.
pub fn fast_rules(dir: &std::path::Path) -> std::path::PathBuf {
    let text = leadscore::engine::rules::DEFAULT_RULES
        .replace("half_life = \"7d\"", "half_life = \"10s\"")
        .replace("email = \"3d\"", "email = \"10s\"")
        .replace("min_dwell = \"1h\"", "");
    let path = dir.join("fast-rules.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A service on [`fast_rules`] (written to `dir`), with `extra` settings.
fn start_fast(
    (broker, redis, names): (&Broker, &Redis, &Names),
    dir: &std::path::Path,
    extra: &[(&str, &str)],
) -> Service {
    let rules = fast_rules(dir);
    let rules = rules.to_str().unwrap();
    let mut env = vec![("LEADSCORE__SCORING__RULES_FILE", rules)];
    env.extend_from_slice(extra);
    Service::start(broker, redis, names, &env)
}

#[test]
fn a_hot_lead_in_a_partition_that_goes_quiet_decays_in_real_time() {
    let (broker, redis, names) = services();
    let dir = tempfile::tempdir().unwrap();
    let service = start_fast(
        (&broker, &redis, &names),
        dir.path(),
        &[("LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS", "500")],
    );
    let now = leadscore::event::wall_clock_ms();
    let at = |ms: i64| leadscore::event::format_rfc3339(now + ms);
    send(
        &broker,
        &names.web,
        "quiet",
        &[
            event("q1", "quiet", &at(0), "booking_abandoned", &[]),
            event("q2", "quiet", &at(1), "booking_started", &[]),
        ],
    );
    // Nothing else arrives, on any topic: 65 points halve every 10 s, so the
    // lead crosses hot's exit (50) after ~3.8 s and warm's (20) after ~17 s.
    let seq = wait_changes(&broker, &names, "quiet", 4, Duration::from_secs(40));
    assert_eq!(
        transitions(&seq),
        HOT_THEN_DECAY,
        "log:\n{}",
        service.logs()
    );
    let crossing =
        leadscore::event::parse_rfc3339(seq[2]["occurred_at"].as_str().unwrap()).unwrap() - now;
    assert!(
        (3_000..5_000).contains(&crossing),
        "hot -> warm at the exact crossing, {crossing} ms after the events"
    );
    assert!(service.terminate().success());
}

/// A write keeps a lead's stored decay timer when a later event only moves
/// the decay later (it fires early and finds nothing, by design). An idle
/// service whose cache holds fewer leads than such timers used to load
/// those leads, find nothing due, evict them and page the same timers
/// again, as fast as it could, until the real crossing (stop 43's user
/// probe: about 30 k loads/s with no input). A loaded lead whose stored
/// timer is due but is not its next one is now written once, which
/// corrects the timer. Half-lives of 10 s, three leads, a cache of one.
#[test]
fn an_idle_service_with_a_small_cache_does_not_keep_loading_leads_for_early_timers() {
    let (broker, redis, names) = services();
    let dir = tempfile::tempdir().unwrap();
    let service = start_fast(
        (&broker, &redis, &names),
        dir.path(),
        &[
            ("LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS", "300"),
            ("LEADSCORE__REDIS__FLUSH_INTERVAL_MS", "100"),
            ("LEADSCORE__STATE__MAX_LEADS_IN_MEMORY", "1"),
        ],
    );
    let leads = ["early-0", "early-1", "early-2"];
    let now = leadscore::event::wall_clock_ms;
    let at = leadscore::event::format_rfc3339;
    // 40 points: warm, crossing warm's exit (20) 10 s later.
    let t0 = now();
    for lead in leads {
        send(
            &broker,
            &names.web,
            lead,
            &[event(
                &format!("{lead}-a"),
                lead,
                &at(t0),
                "booking_abandoned",
                &[],
            )],
        );
    }
    let deadline = std::time::Instant::now() + WAIT;
    while leads.iter().any(|l| redis.lead(&names.prefix, l).is_none()) {
        assert!(std::time::Instant::now() < deadline, "{}", service.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // A pricing view (15 points) moves each crossing later, and the write
    // keeps the stored timer at the first crossing.
    let t1 = now();
    for lead in leads {
        let view = event(
            &format!("{lead}-b"),
            lead,
            &at(t1),
            "page_view",
            &[("url", "/pricing")],
        );
        send(&broker, &names.web, lead, &[view]);
    }
    let first = t0 + 10_000;
    let score = 40.0 * (-((t1 - t0) as f64) / 10_000.0).exp2() + 15.0;
    let second = t1 + (10_000.0 * (score / 20.0).log2()) as i64;
    // Between the two crossings (with a second's margin each side) nothing
    // is due: the leads are loaded for their early timers once, right after
    // the first crossing, and then left alone.
    let (from, to) = (first + 1_000, second - 1_000);
    assert!(
        to - from >= 2_000,
        "the second events came too late ({} ms after the first)",
        t1 - t0
    );
    std::thread::sleep(Duration::from_millis((from - now()).max(0) as u64));
    let before = service.counter("leadscore_lead_cache_misses_total");
    std::thread::sleep(Duration::from_millis((to - now()).max(0) as u64));
    let during = service.counter("leadscore_lead_cache_misses_total") - before;
    assert!(
        during <= leads.len() as u64,
        "{during} leads loaded from Redis in {} ms with nothing due",
        to - from
    );
    // And the real crossing still comes: each lead leaves warm for cold.
    for lead in leads {
        let seq = wait_changes(&broker, &names, lead, 2, Duration::from_secs(30));
        assert_eq!(
            transitions(&seq),
            [("cold", "warm", "event"), ("warm", "cold", "decay")],
            "{lead}"
        );
        let crossing =
            leadscore::event::parse_rfc3339(seq[1]["occurred_at"].as_str().unwrap()).unwrap();
        assert!(
            (crossing - second).abs() <= 1_000,
            "{lead} left warm at {crossing}, not at {second}"
        );
    }
    assert!(service.terminate().success());
}

/// The end of a stream on four inputs is released one idle time after the
/// last message, not one idle time per input. Each input's events here are
/// all earlier than the next input's (CRM, then email, ad pixel, web), so
/// an input whose queue has emptied holds the others back until it is
/// idle. Before, an input's quiet time began only when its queue emptied,
/// so the inputs went idle one after another: three idle times for four
/// inputs (a user probe measured 46 s with a 15 s idle time).
#[test]
fn the_end_of_a_stream_on_four_inputs_waits_one_idle_time_not_one_per_input() {
    let (broker, redis, names) = services();
    let idle = Duration::from_millis(3_000);
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[("LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS", "3000")],
    );
    let recent = Recent::new();
    let topics = [&names.crm, &names.email, &names.adpixel, &names.web];
    let kinds = [
        ("profile_updated", &[("industry", "catering")][..]),
        ("open", &[][..]),
        ("click", &[("ad_id", "a1")][..]),
        ("page_view", &[("url", "/pricing")][..]),
    ];
    let p = broker.producer();
    for (n, (topic, (kind, attrs))) in topics.iter().zip(kinds).enumerate() {
        for i in 0..3 {
            let id = format!("end-{n}-{i}");
            let at = recent.at(-60 + 10 * n as i64 + i);
            let payload = event(&id, "end", &at, kind, attrs);
            p.send(
                BaseRecord::to(topic.as_str())
                    .partition(0)
                    .key("end")
                    .payload(&payload),
            )
            .unwrap();
        }
    }
    p.flush(WAIT).unwrap();
    let sent = std::time::Instant::now();
    service.wait_consumed(12, Duration::from_secs(30));
    let took = sent.elapsed();
    assert!(
        took >= idle - Duration::from_millis(500),
        "the merge released the last events {took:?} after they were sent: before the other inputs were idle"
    );
    assert!(
        took < idle * 2,
        "the last events were released {took:?} after they were sent (idle time {idle:?})"
    );
    assert_eq!(service.counter("leadscore_late_events_total"), 0);
    assert!(service.terminate().success());
}

/// Engagement is counted by the lead's segment at that moment and its
/// first-touch source (configured names, others as `other`), so each rate
/// is one PromQL division.
#[test]
fn engagement_is_counted_by_segment_and_first_touch_source() {
    let (broker, _redis, names, service) = setup();
    let now = leadscore::event::wall_clock_ms() - 600_000;
    let at = |ms: i64| leadscore::event::format_rfc3339(now + ms);
    send(
        &broker,
        &names.web,
        "fb",
        &[event(
            "w1",
            "fb",
            &at(0),
            "page_view",
            &[("utm_source", "facebook")],
        )],
    );
    send(
        &broker,
        &names.web,
        "mystery",
        &[event(
            "w2",
            "mystery",
            &at(1_000),
            "page_view",
            &[("utm_source", "carrier-pigeon")],
        )],
    );
    send(
        &broker,
        &names.email,
        "fb",
        &[
            event("e1", "fb", &at(60_000), "open", &[]),
            event("e2", "fb", &at(61_000), "click", &[]),
        ],
    );
    send(
        &broker,
        &names.email,
        "mystery",
        &[event("e3", "mystery", &at(62_000), "open", &[])],
    );
    service.wait_consumed(5, WAIT);
    service.wait_settled(WAIT);
    let (_, metrics) = service.get("/metrics").unwrap();
    let count = |needles: &[&str]| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("leadscore_engagement_events_total{"))
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        count(&["event=\"open\"", "source=\"facebook\"", "segment=\"cold\""]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        count(&["event=\"click\"", "source=\"facebook\""]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        count(&["event=\"open\"", "source=\"other\""]),
        1.0,
        "{metrics}"
    );
    assert_eq!(count(&["event=\"open\""]), 2.0, "{metrics}");
}
