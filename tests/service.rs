//! End-to-end tests of `leadscore run` against a real Kafka-protocol broker
//! (tansu) and a real Redis, with random topic, group and key names.

mod common;

use std::time::{Duration, Instant};

use common::{Broker, Msg, Names, Recent, Redis, Service, event, header, json};
use leadscore::decode::{Contract, Decoder, Format, encode_avro, input_schema};
use leadscore::engine::Rules;
use leadscore::event::Source;
use rdkafka::Message;

const PARTITIONS: i32 = 2;
const WAIT: Duration = Duration::from_secs(30);

fn setup() -> (Broker, Redis, Names) {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = Names::new();
    broker.create_topics(&names.all(), PARTITIONS);
    (broker, redis, names)
}

#[test]
fn events_in_give_segment_changes_and_a_handoff_out() {
    let (broker, redis, names) = setup();
    let service = Service::start(&broker, &redis, &names, &[]);
    let lead = "crm-00042";
    let t = Recent::new();
    broker.produce(
        &names.crm,
        &[(
            lead,
            event(
                "p1",
                lead,
                &t.at(0),
                "profile_updated",
                &[("industry", "restaurants"), ("budget", "5000")],
            ),
        )],
    );
    broker.produce(
        &names.web,
        &[
            (
                lead,
                event(
                    "w1",
                    lead,
                    &t.at(1),
                    "page_view",
                    &[("url", "https://x.example/menu")],
                ),
            ),
            (
                lead,
                event(
                    "w2",
                    lead,
                    &t.at(2),
                    "page_view",
                    &[("url", "https://x.example/pricing")],
                ),
            ),
            (lead, event("w3", lead, &t.at(3), "booking_started", &[])),
            (lead, event("w4", lead, &t.at(4), "booking_abandoned", &[])),
        ],
    );
    let changes = broker.read(&names.changes, PARTITIONS, 2, WAIT);
    let seq: Vec<(String, String, String)> = changes
        .iter()
        .map(|m| {
            let v = json(m);
            (
                v["previous_segment"].as_str().unwrap().into(),
                v["segment"].as_str().unwrap().into(),
                v["trigger_event_id"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        seq,
        // The profile alone is worth 25 (warm); the booking start makes it hot.
        vec![
            ("cold".into(), "warm".into(), "p1".into()),
            ("warm".into(), "hot".into(), "w3".into())
        ],
        "log:\n{}",
        service.logs()
    );
    for m in &changes {
        assert_eq!(m.key(), Some(lead.as_bytes()), "keyed by lead id");
        let v = json(m);
        assert_eq!(v["rules_version"], Rules::default_rules().version.as_str());
        assert_eq!(v["event_id"].as_str().unwrap().len(), 36);
    }
    let handoffs = broker.read(&names.handoffs, PARTITIONS, 1, WAIT);
    assert_eq!(handoffs.len(), 1, "log:\n{}", service.logs());
    let h = json(&handoffs[0]);
    assert_eq!(h["lead_id"], lead);
    assert_eq!(h["crossing_signal"], "booking_abandoned");
    assert_eq!(h["trigger_event_id"], "w4");
    assert_eq!(h["fit_grade"], "B");
    assert_eq!(
        h["missing_profile"],
        serde_json::json!(["company_size", "job_title", "country"])
    );
    assert_eq!(h["top_signals"][0]["rule"], "booking_abandoned");

    // HTTP: the lead, an unknown lead, a bad request, metrics.
    let (status, body) = service.get(&format!("/v1/leads/{lead}")).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["segment"], "hot");
    assert_eq!(v["fit"], 25.0);
    assert!(v["score"].as_f64().unwrap() > 0.0);
    assert_eq!(v["last_event_at"], t.at(4));
    assert_eq!(service.get("/v1/leads/nobody").unwrap().0, 404);
    assert_eq!(
        service
            .get(&format!("/v1/leads/{}", "x".repeat(300)))
            .unwrap()
            .0,
        400
    );
    assert_eq!(service.get("/nowhere").unwrap().0, 404);
    let (_, metrics) = service.get("/metrics").unwrap();
    for needle in [
        &format!(
            "leadscore_events_consumed_total{{topic=\"{}\",type=\"page_view\"}} 2",
            names.web
        ),
        "leadscore_segment_changes_total{from=\"warm\",reason=\"event\",to=\"hot\"} 1",
        "leadscore_handoffs_total 1",
        "leadscore_redis_flush_seconds_bucket",
        "leadscore_processing_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    assert_eq!(service.get("/healthz").unwrap().0, 200);
    assert!(service.terminate().success());
}

#[test]
fn a_malformed_message_is_dead_lettered_and_the_offset_moves_past_it() {
    let (broker, redis, names) = setup();
    let service = Service::start(&broker, &redis, &names, &[]);
    let bad: &[u8] = b"{\"event_id\": \"x\", \"lead_id\": 7";
    let lead = "lead-dl";
    // Both to partition 0 of the web topic, in order.
    let p = broker.producer();
    use rdkafka::producer::{BaseRecord, Producer};
    p.send(
        BaseRecord::to(&names.web)
            .partition(0)
            .key(lead)
            .payload(bad),
    )
    .unwrap();
    let good = event("g1", lead, "2026-11-22T10:00:00Z", "form_submit", &[]);
    p.send(
        BaseRecord::to(&names.web)
            .partition(0)
            .key(lead)
            .payload(&good),
    )
    .unwrap();
    p.flush(WAIT).unwrap();

    let dead = broker.read(&names.dead, PARTITIONS, 1, WAIT);
    assert_eq!(dead.len(), 1, "log:\n{}", service.logs());
    let d = &dead[0];
    assert_eq!(d.payload(), Some(bad), "original bytes");
    assert_eq!(d.key(), Some(lead.as_bytes()));
    assert_eq!(
        header(d, "leadscore.source.topic").as_deref(),
        Some(names.web.as_str())
    );
    assert_eq!(
        header(d, "leadscore.source.partition").as_deref(),
        Some("0")
    );
    assert_eq!(header(d, "leadscore.source.offset").as_deref(), Some("0"));
    assert_eq!(header(d, "leadscore.error.kind").as_deref(), Some("json"));
    assert!(
        header(d, "leadscore.reason")
            .unwrap()
            .contains("invalid JSON")
    );

    service.wait_consumed(2, WAIT);
    // The good event after it was scored, and the committed offset moved past both.
    let (status, body) = service.get(&format!("/v1/leads/{lead}")).unwrap();
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + WAIT;
    while broker.committed(&names.group, &names.web, PARTITIONS)[0] != 2 {
        assert!(
            Instant::now() < deadline,
            "offset not committed past the bad message"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(service.terminate().success());
}

/// A producer that sets no key, or keys a lead's events by another field,
/// may split leads over partitions: such events still score and are
/// counted per topic, through the real broker's keys.
#[test]
fn events_without_their_lead_as_key_score_and_are_counted_by_topic() {
    let (broker, redis, names) = setup();
    let service = Service::start(&broker, &redis, &names, &[]);
    let p = broker.producer();
    use rdkafka::producer::{BaseRecord, Producer};
    let at = "2026-11-22T10:00:00Z";
    let keyed = event("k1", "lead-k", at, "page_view", &[]);
    let keyless = event("k2", "lead-k", at, "page_view", &[]);
    let by_email = event("k3", "lead-k", at, "form_submit", &[]);
    p.send(
        BaseRecord::to(&names.web)
            .partition(0)
            .key("lead-k")
            .payload(&keyed),
    )
    .unwrap();
    p.send(
        BaseRecord::<(), _>::to(&names.web)
            .partition(0)
            .payload(&keyless),
    )
    .unwrap();
    p.send(
        BaseRecord::to(&names.web)
            .partition(0)
            .key("lead-k@example.com")
            .payload(&by_email),
    )
    .unwrap();
    p.flush(WAIT).unwrap();
    service.wait_consumed(3, WAIT);
    let (_, body) = service.get("/metrics").unwrap();
    let mis_keyed = |topic: &str| {
        let series = format!("leadscore_events_mis_keyed_total{{topic=\"{topic}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    assert_eq!(mis_keyed(&names.web), Some(2), "{body}");
    assert_eq!(mis_keyed(&names.email), Some(0), "{body}");
    assert_eq!(service.counter("leadscore_events_consumed_total"), 3);
    assert!(service.terminate().success());
}

/// A member that calls Redis for nothing still notices an outage: a second
/// member of a group over one partition owns no shard, writes nothing, and
/// its `leadscore_redis_up` goes to 0 and `/readyz` to 503 within seconds
/// of Redis stopping; both come back, with a log line, when Redis answers
/// again. Before 2026-12-08 only a load or a write could notice, so such a
/// member reported Redis up through the whole outage (a user probe).
#[test]
fn a_member_with_nothing_to_write_reports_a_redis_outage_and_its_end() {
    let broker = Broker::start();
    let names = Names::new();
    broker.create_topics(&names.all(), 1);
    // Its data survives the restart (without it the owner stops: state lost).
    let mut redis = Redis::start_persistent();
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ok() {
            assert!(Instant::now() < deadline, "{what} within 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let metric = |service: &Service, line: &str| {
        service
            .get("/metrics")
            .is_some_and(|(_, body)| body.lines().any(|l| l == line))
    };
    let owner = Service::start(&broker, &redis, &names, &[]);
    wait_for("the owner's shard", &|| {
        metric(&owner, "leadscore_shards_owned 1")
    });
    let idle = Service::start(&broker, &redis, &names, &[]);
    wait_for("the second member ready", &|| {
        idle.get("/readyz").map(|r| r.0) == Some(200)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(metric(&idle, "leadscore_shards_owned 0"));
    assert!(metric(&owner, "leadscore_shards_owned 1"));
    assert!(metric(&idle, "leadscore_redis_up 1"));
    redis.stop();
    wait_for("redis_up 0 on the member with no shard", &|| {
        metric(&idle, "leadscore_redis_up 0")
    });
    let (status, why) = idle.get("/readyz").unwrap();
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("Redis"), "{why}");
    assert_eq!(idle.get("/healthz").map(|r| r.0), Some(200));
    redis.restart();
    wait_for("redis_up 1", &|| metric(&idle, "leadscore_redis_up 1"));
    wait_for("ready again", &|| {
        idle.get("/readyz").map(|r| r.0) == Some(200)
    });
    let logs = idle.logs();
    assert!(logs.contains("Redis does not answer a ping."), "{logs}");
    assert!(logs.contains("Redis answers again."), "{logs}");
    assert!(idle.terminate().success());
    assert!(owner.terminate().success());
}

/// `enable.partition.eof=true`, passed through by a user, makes librdkafka
/// report each time an input reaches its partition's end. Those reports are
/// not consumer errors: the events are scored and nothing is logged as one
/// (before 2026-12-08 every report was a warning, several per second).
#[test]
fn a_users_partition_eof_setting_scores_and_logs_no_consumer_error() {
    let (broker, redis, names) = setup();
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[("LEADSCORE__KAFKA__CONSUMER__ENABLE_PARTITION_EOF", "true")],
    );
    let p = broker.producer();
    use rdkafka::producer::{BaseRecord, Producer};
    for (i, at) in ["2026-11-22T10:00:00Z", "2026-11-22T10:00:05Z"]
        .iter()
        .enumerate()
    {
        let payload = event(&format!("eof{i}"), "lead-eof", at, "page_view", &[]);
        p.send(
            BaseRecord::to(&names.web)
                .partition(0)
                .key("lead-eof")
                .payload(&payload),
        )
        .unwrap();
        p.flush(WAIT).unwrap();
        service.wait_consumed(i as u64 + 1, WAIT);
    }
    // Every input of every shard has reached its end many times by now.
    std::thread::sleep(Duration::from_secs(2));
    let logs = service.logs();
    assert!(!logs.contains("Consumer error"), "{logs}");
    assert_eq!(service.counter("leadscore_events_consumed_total"), 2);
    assert!(service.terminate().success());
}

/// A producer that sets the record timestamp to the event's own date
/// (CreateTime) cannot get an event dated a month ahead past the check:
/// through the real broker it is dead-lettered against the wall clock, and a
/// present-day event of the same partition on another topic, applied after
/// it, is neither late nor behind the shard's clock (the partition's time did
/// not move a month ahead).
#[test]
fn an_event_a_month_ahead_with_a_matching_create_time_is_dead_lettered_and_moves_no_clock() {
    let (broker, redis, names) = setup();
    let service = Service::start(&broker, &redis, &names, &[]);
    let p = broker.producer();
    use leadscore::event::{format_rfc3339, wall_clock_ms};
    use rdkafka::producer::{BaseRecord, Producer};
    let month = 30 * 86_400_000;
    let ahead = wall_clock_ms() + month;
    let future = event("f1", "lead-f", &format_rfc3339(ahead), "page_view", &[]);
    p.send(
        BaseRecord::to(&names.web)
            .partition(0)
            .key("lead-f")
            .timestamp(ahead)
            .payload(&future),
    )
    .unwrap();
    p.flush(WAIT).unwrap();
    // Applied (here: dead-lettered) before the next event is produced.
    service.wait_consumed(1, WAIT);
    let now = format_rfc3339(wall_clock_ms());
    let open = event("f2", "lead-f", &now, "open", &[]);
    p.send(
        BaseRecord::to(&names.email)
            .partition(0)
            .key("lead-f")
            .payload(&open),
    )
    .unwrap();
    p.flush(WAIT).unwrap();
    service.wait_consumed(2, WAIT);

    let dead = broker.read(&names.dead, PARTITIONS, 1, WAIT);
    assert_eq!(dead.len(), 1, "log:\n{}", service.logs());
    assert_eq!(
        header(&dead[0], "leadscore.error.kind").as_deref(),
        Some("contract")
    );
    let reason = header(&dead[0], "leadscore.reason").unwrap_or_default();
    assert!(reason.contains("after the wall clock"), "{reason}");
    assert_eq!(service.counter("leadscore_events_consumed_total"), 1);
    assert_eq!(service.counter("leadscore_late_events_total"), 0);
    assert_eq!(service.counter("leadscore_events_behind_clock_total"), 0);
    let (status, body) = service.get("/v1/leads/lead-f").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(service.terminate().success());
}

/// What a web tracker sends with a page view: more attributes than an event
/// waiting in a shard keeps beside it inline.
const TRACKER: &[(&str, &str)] = &[
    ("url", "/pricing"),
    ("referrer", "https://www.google.com/"),
    ("title", "Pricing"),
    ("utm_source", "google"),
    ("utm_medium", "cpc"),
    ("utm_campaign", "spring"),
    ("utm_content", "ad-7"),
    (
        "user_agent",
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    ),
];

/// Web, ad-pixel, email and CRM: the input index of each (as [`Names::input`]).
const WEB: usize = 0;
const ADPIXEL: usize = 1;
const EMAIL: usize = 2;
const CRM: usize = 3;

/// A deterministic stream for seven leads across the four input topics,
/// dated in the last hours (so that no decay timer falls due while a stopped
/// service's shards are idle and their clocks follow the wall clock); every
/// other pricing page view carries the whole [`TRACKER`] set. Web events
/// are the most frequent, ad-pixel and CRM events the sparsest.
///
/// Two leads also browse with a cookie, as a web tracker sends them: their
/// page views carry only `anonymous_id` (keyed by the cookie), before and
/// after their booking starts, which carry both ids. Lead-3's cookie goes to
/// its lead's partition, so the visitor is merged into the lead when it
/// identifies and later page views follow the alias; lead-5's goes to the
/// other partition, where it stays a separate visitor (README, known
/// limitations). Anonymous and identified events share the web batches.
fn stream(from: usize, to: usize) -> Vec<Msg> {
    let start = leadscore::event::wall_clock_ms() / 60_000 * 60_000 - 3 * 3_600_000;
    (from..to)
        .map(|i| {
            let n = i % 7;
            let lead = format!("lead-{n}");
            let at = leadscore::event::format_rfc3339(start + i as i64 * 60_000);
            let id = format!("ev-{i}");
            let (input, payload) = match i % 5 {
                0 if i % 10 == 5 => (
                    CRM,
                    event(
                        &id,
                        &lead,
                        &at,
                        "profile_updated",
                        &[("industry", "catering"), ("company_size", "120")],
                    ),
                ),
                0 => (EMAIL, event(&id, &lead, &at, "open", &[])),
                1 => (
                    WEB,
                    event(
                        &id,
                        &lead,
                        &at,
                        "page_view",
                        if i % 2 == 0 { TRACKER } else { &TRACKER[..1] },
                    ),
                ),
                2 => (
                    EMAIL,
                    event(&id, &lead, &at, "click", &[("link_url", "/x")]),
                ),
                3 if i % 10 == 8 => (ADPIXEL, event(&id, &lead, &at, "click", &[("ad_id", "a1")])),
                3 => (
                    WEB,
                    event(&id, &lead, &at, "page_view", &[("url", "/careers")]),
                ),
                _ => (WEB, event(&id, &lead, &at, "booking_started", &[])),
            };
            let partition = (n as i32) % PARTITIONS;
            let cookie = format!("cookie-{n}");
            match (n, input) {
                (3 | 5, WEB) => {
                    let mut e: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    e["anonymous_id"] = cookie.clone().into();
                    if e["type"] == "booking_started" {
                        return (input, partition, lead, e.to_string().into_bytes());
                    }
                    e.as_object_mut().unwrap().remove("lead_id");
                    let partition = if n == 3 {
                        partition
                    } else {
                        (partition + 1) % PARTITIONS
                    };
                    (input, partition, cookie, e.to_string().into_bytes())
                }
                _ => (input, partition, lead, payload),
            }
        })
        .collect()
}

#[test]
fn a_restarted_service_continues_from_redis_with_identical_scores() {
    let broker = Broker::start();
    let redis = Redis::start();
    let items = stream(0, 120);
    // Uninterrupted, on topics of its own.
    let reference = Names::new();
    broker.create_topics(&reference.all(), PARTITIONS);
    broker.produce_msgs(&reference, &items);
    let service = Service::start(&broker, &redis, &reference, &[]);
    service.wait_consumed(items.len() as u64, WAIT);
    // Four topics, cookies keyed by the cookie beside identified events in
    // one batch, one cookie in another partition: all keyed as the contract
    // asks, so nothing counts as mis-keyed.
    assert_eq!(service.counter("leadscore_events_mis_keyed_total"), 0);
    assert!(service.terminate().success(), "SIGTERM exits 0");
    // Stopped and started again halfway, each half arriving while it was down.
    // (Events produced to a running service after an input went idle may be
    // merged in arrival order: see the README on idle inputs.)
    let names = Names::new();
    broker.create_topics(&names.all(), PARTITIONS);
    let (first, second) = items.split_at(40);
    broker.produce_msgs(&names, first);
    let service = Service::start(&broker, &redis, &names, &[]);
    service.wait_consumed(first.len() as u64, WAIT);
    // A clean stop logs no error (rdkafka's second close of the consumer
    // the service closed itself is not one).
    let log = service.stop_cleanly("a stop after the first half");
    // Written to a file, not a terminal: plain text, no colour codes.
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );
    broker.produce_msgs(&names, second);
    let service = Service::start(&broker, &redis, &names, &[]);
    service.wait_consumed(second.len() as u64, WAIT);
    // Lead-6's first event is a page view with the whole tracker set: its
    // source and campaign, the fourth and sixth of eight attributes, are
    // read from an event that waited with its string ends boxed.
    let (status, body) = service
        .get("/v1/leads/lead-6")
        .expect("the lead API answers");
    assert_eq!(status, 200, "{body}");
    let lead: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(lead["first_touch_source"], "google", "{body}");
    assert_eq!(lead["first_touch_campaign"], "spring", "{body}");
    assert!(service.terminate().success());

    let want = redis.leads(&reference.prefix);
    let got = redis.leads(&names.prefix);
    // Seven leads; lead-3's cookie merged into its lead (an alias); lead-5's
    // cookie an alias on its lead's partition (its booking starts named
    // both ids) and a separate visitor on the other, where its page views went.
    let keys: Vec<&String> = want.keys().collect();
    assert_eq!(want.len(), 10, "{keys:?}");
    assert_eq!(common::visitors_and_aliases(&want), (1, 2), "{keys:?}");
    common::assert_same_leads(&got, &want, "a restart changes no state");
    // Lead-3, made by merging its cookie's visitor, is counted in its segment.
    common::assert_populations_match(&redis, &reference.prefix);
    common::assert_populations_match(&redis, &names.prefix);
}

#[test]
fn committed_offsets_never_run_ahead_of_redis() {
    let (broker, redis, names) = setup();
    let service = Service::start(&broker, &redis, &names, &[]);
    let items = stream(0, 600);
    let producer_broker = &broker;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for chunk in items.chunks(50) {
                producer_broker.produce_msgs(&names, chunk);
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut samples = 0;
        loop {
            // Kafka first, then Redis: Redis only ever moves forward, so a
            // commit ahead of it would show here.
            let committed = broker.committed(&names.group, &names.web, PARTITIONS);
            let positions = redis.positions(&names.prefix);
            for (p, c) in committed.iter().enumerate() {
                if *c >= 0 {
                    let stored = positions
                        .get(&format!("{}/{p}", names.web))
                        .copied()
                        .unwrap_or(-1);
                    assert!(
                        *c <= stored,
                        "partition {p}: committed {c} ahead of Redis {stored}"
                    );
                }
            }
            samples += 1;
            let done: i64 = committed.iter().filter(|c| **c > 0).sum();
            let web_total = items.iter().filter(|(i, ..)| *i == WEB).count() as i64;
            if done == web_total {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not all committed in time ({done}/{web_total}); log:\n{}",
                service.logs()
            );
        }
        assert!(samples > 1);
    });
    // Every commit's outcome is counted: everything was committed while the
    // service ran, so `ok` moved (it stayed 0 before 2026-12-07: the
    // outcome of an asynchronous commit never came back), and none failed.
    let ok = |s: &Service| {
        let (_, body) = s.get("/metrics").expect("metrics");
        leadscore::metrics::sum_samples(&body, "leadscore_offset_commits_total{outcome=\"ok\"}")
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while ok(&service) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok(&service) > 0, "no commit counted");
    assert_eq!(
        service.counter("leadscore_offset_commits_total"),
        ok(&service),
        "failed commits counted"
    );
    assert!(service.terminate().success());
}

#[test]
fn avro_input_and_output_work() {
    let (broker, redis, names) = setup();
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[
            ("LEADSCORE__KAFKA__FORMATS__WEB", "avro"),
            ("LEADSCORE__KAFKA__FORMATS__OUTPUTS", "avro"),
        ],
    );
    let schema = input_schema(Source::Web);
    let json_event = event(
        "a1",
        "lead-avro",
        "2026-11-22T10:00:00Z",
        "booking_abandoned",
        &[],
    );
    let e = Decoder::new(Source::Web, Format::Json, Contract::default())
        .decode(Some(&json_event), None)
        .unwrap();
    broker.produce(
        &names.web,
        &[("lead-avro", encode_avro(&schema, &e).unwrap())],
    );
    let changes = broker.read(&names.changes, PARTITIONS, 1, WAIT);
    assert_eq!(changes.len(), 1, "log:\n{}", service.logs());
    let (change_schema, _) = leadscore::output::output_schemas();
    let value =
        apache_avro::from_avro_datum(&change_schema, &mut changes[0].payload().unwrap(), None)
            .unwrap();
    let apache_avro::types::Value::Record(fields) = value else {
        panic!("a record")
    };
    let get = |n: &str| {
        fields
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(
        get("segment"),
        apache_avro::types::Value::String("warm".into())
    );
    assert_eq!(
        get("lead_id"),
        apache_avro::types::Value::String("lead-avro".into())
    );
    assert!(service.terminate().success());
}

#[test]
fn input_topics_that_are_not_co_partitioned_stop_the_service_with_a_clear_error() {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = Names::new();
    broker.create_topics(
        &[
            &names.web,
            &names.adpixel,
            &names.crm,
            &names.changes,
            &names.handoffs,
            &names.dead,
        ],
        2,
    );
    broker.create_topics(&[&names.email], 3);
    let (status, log) = Service::run_to_exit(&broker, &redis, &names, &[], WAIT);
    assert!(!status.success());
    assert!(log.contains("same partition count"), "{log}");
    assert!(log.contains(&format!("{}=3", names.email)), "{log}");

    let names = Names::new();
    broker.create_topics(
        &[
            &names.web,
            &names.adpixel,
            &names.email,
            &names.changes,
            &names.handoffs,
        ],
        2,
    );
    let (status, log) = Service::run_to_exit(&broker, &redis, &names, &[], WAIT);
    assert!(!status.success());
    assert!(
        log.contains(&format!("{}, {} do not exist", names.crm, names.dead)),
        "{log}"
    );
}

/// A broker that cannot be reached: the service says so in a few lines and
/// stops (exit 1), rather than logging each reconnect attempt of each client
/// at ERROR (hundreds of lines in ten seconds before).
#[test]
fn an_unreachable_broker_stops_the_service_with_a_short_clear_log() {
    let (broker, redis, names) = setup();
    let nowhere = format!("127.0.0.1:{}", common::free_port());
    let settings = [
        ("LEADSCORE__KAFKA__BROKERS", nowhere.as_str()),
        ("LEADSCORE__LOG__LEVEL", "info"),
    ];
    // A SIGTERM while it waits for the brokers is answered at once, not
    // after the wait.
    let mut service = Service::spawn_unready(&broker, &redis, &names, &settings);
    std::thread::sleep(Duration::from_secs(1));
    // Not ready while it waits, and not for Redis, whose start-up check has
    // passed (it said "Redis does not answer", with leadscore_redis_up 0).
    let (code, body) = service.get("/readyz").expect("/readyz answers");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("the consumer is not running"), "{body}");
    assert!(!body.contains("Redis"), "{body}");
    assert_eq!(service.counter("leadscore_redis_up"), 1);
    service.signal("TERM");
    let (status, took) = wait_exit(&mut service, Duration::from_secs(20));
    let log = service.logs();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(took < Duration::from_secs(3), "{took:?}\n{log}");
    assert!(log.contains("Stopped before consuming"), "{log}");

    let (status, log) =
        Service::run_to_exit(&broker, &redis, &names, &settings, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("check kafka.brokers"), "{log}");
    let lines = log.lines().count();
    assert!(lines <= 15, "{lines} lines:\n{log}");
    // Connection trouble librdkafka retries is a warning; the errors are
    // the service's own stop.
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 2, "{log}");
    assert!(
        errors.iter().all(|l| l.contains("ERROR leadscore")),
        "{errors:#?}"
    );
}

/// Waits for the service to exit by itself: its exit status and how long it took.
fn wait_exit(service: &mut Service, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = service.exited() {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "still running after {limit:?}; log:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Redis stops answering (SIGSTOP) while the service holds changes it has
/// not written. A SIGTERM then gives the drain up by its deadline, not a
/// Redis timeout past it, and exits 1 saying so (nothing is lost: offsets
/// never pass what Redis holds); a second SIGTERM during the drain exits at
/// once with 143.
#[test]
fn a_stop_while_redis_hangs_ends_by_the_drain_deadline_and_a_second_signal_exits_at_once() {
    let (broker, redis, names) = setup();
    let settings = [
        // Changes stay unwritten until the stop.
        ("LEADSCORE__REDIS__FLUSH_INTERVAL_MS", "60000"),
        ("LEADSCORE__REDIS__FLUSH_MAX_DIRTY", "1000000"),
        ("LEADSCORE__REDIS__TIMEOUT_MS", "2000"),
        ("LEADSCORE__SHUTDOWN__DRAIN_TIMEOUT_MS", "3000"),
        // Both shards on one worker: the drain's deadline holds for all the
        // shards a worker has, not for each of them in turn.
        ("LEADSCORE__PROCESSING__WORKERS", "1"),
    ];
    let items = stream(0, 40);
    broker.produce_msgs(&names, &items);

    // Two signals (SIGINT, as Ctrl-C sends): the second does not wait for the drain.
    let mut service = Service::start(&broker, &redis, &names, &settings);
    service.wait_consumed(items.len() as u64, WAIT);
    redis.signal("STOP");
    service.signal("INT");
    std::thread::sleep(Duration::from_millis(500));
    service.signal("INT");
    let (status, took) = wait_exit(&mut service, Duration::from_secs(20));
    redis.signal("CONT");
    let log = service.logs();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(took < Duration::from_secs(2), "{took:?}\n{log}");
    assert!(log.contains("A second signal"), "{log}");

    // One signal: the drain gives up by its deadline (3 s; each write
    // attempt fails after Redis's 2 s timeout, so a retry would end past it;
    // a write per shard in turn ended at 4 s, after the deadline).
    let mut service = Service::start(&broker, &redis, &names, &settings);
    service.wait_consumed(items.len() as u64, WAIT);
    redis.signal("STOP");
    service.signal("TERM");
    let (status, took) = wait_exit(&mut service, Duration::from_secs(30));
    redis.signal("CONT");
    let log = service.logs();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("nothing is lost"), "{log}");
    assert!(!log.contains("stopped cleanly"), "{log}");
    // The drain (one 2 s attempt) and the close.
    assert!(took < Duration::from_secs(4), "{took:?}\n{log}");
}
