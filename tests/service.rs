//! End-to-end tests of `leadscore run` against a real Kafka-protocol broker
//! (tansu) and a real Redis, with random topic, group and key names.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Broker, Names, Redis, Service, event, header, json};
use leadscore::decode::{Decoder, Format, encode_avro, input_schema};
use leadscore::engine::{Engine, Rules};
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
    broker.produce(
        &names.crm,
        &[(
            lead,
            event(
                "p1",
                lead,
                "2026-11-22T09:00:00Z",
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
                    "2026-11-22T10:00:00Z",
                    "page_view",
                    &[("url", "https://x.example/menu")],
                ),
            ),
            (
                lead,
                event(
                    "w2",
                    lead,
                    "2026-11-22T10:01:00Z",
                    "page_view",
                    &[("url", "https://x.example/pricing")],
                ),
            ),
            (
                lead,
                event("w3", lead, "2026-11-22T10:02:00Z", "booking_started", &[]),
            ),
            (
                lead,
                event("w4", lead, "2026-11-22T10:03:00Z", "booking_abandoned", &[]),
            ),
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
    assert_eq!(handoffs.len(), 1);
    let h = json(&handoffs[0]);
    assert_eq!(h["lead_id"], lead);
    assert_eq!(h["crossing_signal"], "booking_abandoned");
    assert_eq!(h["trigger_event_id"], "w4");
    assert_eq!(h["fit_grade"], "B");
    assert_eq!(h["top_signals"][0]["rule"], "booking_abandoned");

    // HTTP: the lead, an unknown lead, a bad request, metrics.
    let (status, body) = service.get(&format!("/v1/leads/{lead}")).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["segment"], "hot");
    assert_eq!(v["fit"], 25.0);
    assert!(v["score"].as_f64().unwrap() > 0.0);
    assert_eq!(v["last_event_at"], "2026-11-22T10:03:00.000Z");
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

/// A deterministic stream for a few leads across the web and email topics.
fn stream(from: usize, to: usize) -> Vec<(Source, String, Vec<u8>)> {
    (from..to)
        .map(|i| {
            let lead = format!("lead-{}", i % 7);
            let minute = i % 60;
            let hour = 8 + i / 60;
            let at = format!("2026-11-22T{hour:02}:{minute:02}:00Z");
            let id = format!("ev-{i}");
            match i % 5 {
                0 => (
                    Source::Email,
                    lead.clone(),
                    event(&id, &lead, &at, "open", &[]),
                ),
                1 => (
                    Source::Web,
                    lead.clone(),
                    event(&id, &lead, &at, "page_view", &[("url", "/pricing")]),
                ),
                2 => (
                    Source::Email,
                    lead.clone(),
                    event(&id, &lead, &at, "click", &[("link_url", "/x")]),
                ),
                3 => (
                    Source::Web,
                    lead.clone(),
                    event(&id, &lead, &at, "page_view", &[("url", "/careers")]),
                ),
                _ => (
                    Source::Web,
                    lead.clone(),
                    event(&id, &lead, &at, "booking_started", &[]),
                ),
            }
        })
        .collect()
}

fn produce_stream(broker: &Broker, names: &Names, items: &[(Source, String, Vec<u8>)]) {
    for (source, topic) in [(Source::Web, &names.web), (Source::Email, &names.email)] {
        let batch: Vec<(&str, Vec<u8>)> = items
            .iter()
            .filter(|(s, _, _)| *s == source)
            .map(|(_, k, p)| (k.as_str(), p.clone()))
            .collect();
        broker.produce(topic, &batch);
    }
}

/// The states the pure engine computes for the same events, per lead, in
/// the order the service sees them (per topic-partition order is what Kafka
/// guarantees; leads are keyed, so per lead the order is the produce order
/// within each topic — the stream interleaves topics per lead in time order).
fn reference(items: &[(Source, String, Vec<u8>)]) -> std::collections::BTreeMap<String, Vec<u8>> {
    let engine = Engine::new(Arc::new(Rules::default_rules()), 16);
    let mut states = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for (source, lead, payload) in items {
        let e = Decoder::new(*source, Format::Json)
            .decode(Some(payload))
            .unwrap();
        let s = states
            .entry(lead.clone())
            .or_insert_with(|| engine.new_state());
        engine.apply(s, &e, &mut out);
    }
    states
        .into_iter()
        .map(|(k, s)| {
            let mut buf = Vec::new();
            engine.encode(&s, &mut buf);
            (k, buf)
        })
        .collect()
}

#[test]
fn a_restarted_service_continues_from_redis_with_identical_scores() {
    let (broker, redis, names) = setup();
    // Only the web topic carries events here, so per-lead order is fixed.
    let items: Vec<_> = stream(0, 120)
        .into_iter()
        .filter(|(s, _, _)| *s == Source::Web)
        .collect();
    let (first, second) = items.split_at(40);
    let service = Service::start(&broker, &redis, &names, &[]);
    produce_stream(&broker, &names, first);
    service.wait_consumed(first.len() as u64, WAIT);
    assert!(service.terminate().success(), "SIGTERM exits 0");

    let service = Service::start(&broker, &redis, &names, &[]);
    produce_stream(&broker, &names, second);
    service.wait_consumed(second.len() as u64, WAIT);
    assert!(service.terminate().success());

    let expected = reference(&items);
    let mut conn = redis.conn();
    for (lead, bytes) in expected {
        let stored: Vec<u8> = redis::cmd("GET")
            .arg(format!("{}lead:{lead}", names.prefix))
            .query(&mut conn)
            .unwrap();
        assert_eq!(
            stored, bytes,
            "state of {lead} differs from a single uninterrupted pass"
        );
    }
}

#[test]
fn committed_offsets_never_run_ahead_of_redis() {
    let (broker, redis, names) = setup();
    let service = Service::start(&broker, &redis, &names, &[]);
    let items = stream(0, 600);
    let producer_broker = &broker;
    let mut conn = redis.conn();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for chunk in items.chunks(50) {
                produce_stream(producer_broker, &names, chunk);
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut samples = 0;
        loop {
            // Kafka first, then Redis: Redis only ever moves forward, so a
            // commit ahead of it would show here.
            let committed = broker.committed(&names.group, &names.web, PARTITIONS);
            let positions: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
                .arg(format!("{}positions", names.prefix))
                .query(&mut conn)
                .unwrap();
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
            let web_total = items.iter().filter(|(s, _, _)| *s == Source::Web).count() as i64;
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
    let e = Decoder::new(Source::Web, Format::Json)
        .decode(Some(&json_event))
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
    broker.create_topics(&[&names.web, &names.adpixel, &names.crm], 2);
    broker.create_topics(&[&names.email], 3);
    let (status, log) = Service::run_to_exit(&broker, &redis, &names, &[], WAIT);
    assert!(!status.success());
    assert!(log.contains("same partition count"), "{log}");
    assert!(log.contains(&format!("{}=3", names.email)), "{log}");

    let names = Names::new();
    broker.create_topics(&[&names.web, &names.adpixel, &names.email], 2);
    let (status, log) = Service::run_to_exit(&broker, &redis, &names, &[], WAIT);
    assert!(!status.success());
    assert!(
        log.contains(&format!("{} do not exist", names.crm)),
        "{log}"
    );
}
