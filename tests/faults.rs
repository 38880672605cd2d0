//! Delivery guarantees under injected faults, against the real broker and
//! Redis. Each test compares the final Redis state and the set of distinct
//! output event ids with an uninterrupted run over the same input.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{Broker, Names, Redis, Service, http_get, json};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::Message;
use rdkafka::producer::{BaseRecord, Producer};

const PARTITIONS: i32 = 4;

/// These tests each run a broker, Redis and several services on a 2-core
/// machine; run them one at a time so their timing means something.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// (partition, key, payload). Web events only: one topic keeps each lead's
/// order fixed, which is what makes two runs comparable bit for bit.
type Workload = Vec<(i32, String, Vec<u8>)>;

fn workload(events: usize, leads: usize, seed: u64) -> Workload {
    let mut rng = SmallRng::seed_from_u64(seed);
    let start = 1_790_000_000_000_i64; // 2026-09-21
    let mut out: Workload = Vec::with_capacity(events);
    for i in 0..events {
        let lead = rng.random_range(0..leads);
        let key = format!("lead-{lead}");
        let at = leadscore::event::format_rfc3339(start + i as i64 * 30_000);
        let (kind, attrs): (&str, serde_json::Value) = match rng.random_range(0..100) {
            0..40 => ("page_view", serde_json::json!({"url": "/menu"})),
            40..60 => ("page_view", serde_json::json!({"url": "/pricing"})),
            60..70 => ("page_view", serde_json::json!({"url": "/careers"})),
            70..80 => ("booking_started", serde_json::json!({})),
            80..88 => ("booking_abandoned", serde_json::json!({})),
            88..95 => ("chat_message", serde_json::json!({"intent": "booking"})),
            _ => ("form_submit", serde_json::json!({})),
        };
        // Two in a hundred events are re-produced copies of an earlier one.
        if i > 10 && rng.random_range(0..100) < 2 {
            let back = rng.random_range(1..10);
            let copy = out[i - back].clone();
            out.push(copy);
            continue;
        }
        let payload = serde_json::json!({
            "event_id": format!("e-{seed}-{i}"), "lead_id": key, "occurred_at": at, "type": kind, "attributes": attrs
        });
        out.push((
            (lead % PARTITIONS as usize) as i32,
            key,
            payload.to_string().into_bytes(),
        ));
    }
    out
}

fn produce(broker: &Broker, topic: &str, items: &[(i32, String, Vec<u8>)]) {
    let p = broker.producer();
    for (partition, key, payload) in items {
        let mut record = BaseRecord::to(topic)
            .partition(*partition)
            .key(key.as_str())
            .payload(&payload[..]);
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    p.poll(Duration::from_millis(1));
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

fn setup(broker: &Broker) -> Names {
    let names = Names::new();
    broker.create_topics(&names.all(), PARTITIONS);
    names
}

fn committed_total(broker: &Broker, names: &Names) -> i64 {
    broker
        .committed(&names.group, &names.web, PARTITIONS)
        .iter()
        .filter(|c| **c > 0)
        .sum()
}

/// Waits until at least `total` input messages are committed.
fn wait_committed(
    broker: &Broker,
    names: &Names,
    total: usize,
    timeout: Duration,
    service: &Service,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let done = committed_total(broker, names);
        if done >= total as i64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed {done} of {total} ({:?}); metrics:\n{}\nlog:\n{}",
            broker.committed(&names.group, &names.web, PARTITIONS),
            service
                .get("/metrics")
                .map(|m| m.1)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("leadscore_") && !l.contains("bucket"))
                .collect::<Vec<_>>()
                .join("\n"),
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Distinct output event ids on both output topics.
fn output_ids(broker: &Broker, names: &Names) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for topic in [&names.changes, &names.handoffs] {
        for m in broker.read(topic, PARTITIONS, usize::MAX, Duration::from_secs(4)) {
            assert!(m.payload().is_some());
            ids.insert(json(&m)["event_id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

/// The uninterrupted run: final lead states and distinct output ids.
fn reference(items: &Workload) -> (BTreeMap<String, Vec<u8>>, BTreeSet<String>) {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    produce(&broker, &names.web, items);
    let service = Service::start(&broker, &redis, &names, &[]);
    wait_committed(
        &broker,
        &names,
        items.len(),
        Duration::from_secs(300),
        &service,
    );
    assert!(service.terminate().success());
    (redis.leads(&names.prefix), output_ids(&broker, &names))
}

/// Lets `service` commit the whole workload, stops it cleanly, and compares
/// the result with the uninterrupted run.
fn finish_and_compare(
    broker: &Broker,
    redis: &Redis,
    names: &Names,
    total: usize,
    timeout: Duration,
    service: Service,
    want: &(BTreeMap<String, Vec<u8>>, BTreeSet<String>),
) {
    wait_committed(broker, names, total, timeout, &service);
    assert!(service.terminate().success(), "exit 0 on SIGTERM");
    assert_same(
        (redis.leads(&names.prefix), output_ids(broker, names)),
        want,
    );
}

fn assert_same(
    got: (BTreeMap<String, Vec<u8>>, BTreeSet<String>),
    want: &(BTreeMap<String, Vec<u8>>, BTreeSet<String>),
) {
    assert_eq!(got.0.len(), want.0.len(), "number of leads in Redis");
    let differing: Vec<&String> = want
        .0
        .iter()
        .filter(|(k, v)| got.0.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        differing.is_empty(),
        "{} leads differ from the uninterrupted run, e.g. {:?}",
        differing.len(),
        &differing[..differing.len().min(5)]
    );
    assert_eq!(got.1.len(), want.1.len(), "distinct output events");
    assert!(got.1 == want.1, "output event ids differ");
}

#[test]
fn sigkill_at_random_points_loses_nothing_and_counts_nothing_twice() {
    let _serial = serial();
    let items = workload(100_000, 10_000, 11);
    let want = reference(&items);
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    let mut rng = SmallRng::seed_from_u64(5);
    std::thread::scope(|scope| {
        // The stream keeps arriving while the service is killed and restarted.
        let feeder = scope.spawn(|| {
            for chunk in items.chunks(10_000) {
                produce(&broker, &names.web, chunk);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        for _ in 0..4 {
            let service = Service::start(&broker, &redis, &names, &[]);
            std::thread::sleep(Duration::from_millis(rng.random_range(300..2500)));
            service.kill();
        }
        feeder.join().unwrap();
    });
    let service = Service::start(&broker, &redis, &names, &[]);
    finish_and_compare(
        &broker,
        &redis,
        &names,
        items.len(),
        Duration::from_secs(300),
        service,
        &want,
    );
}

#[test]
fn graceful_shutdown_under_load_is_bounded_and_exact() {
    let _serial = serial();
    let items = workload(30_000, 3_000, 12);
    let want = reference(&items);
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    produce(&broker, &names.web, &items);
    // Small batches put the stop, and so the resume positions, inside the
    // broker's record batches rather than at their edges.
    let small = [("LEADSCORE__KAFKA__BATCH_MAX_MESSAGES", "300")];
    let service = Service::start(&broker, &redis, &names, &small);
    wait_committed(&broker, &names, 1, Duration::from_secs(60), &service);
    let started = Instant::now();
    assert!(service.terminate().success(), "exit 0 on SIGTERM");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drained in {:?}",
        started.elapsed()
    );
    let stopped_at = committed_total(&broker, &names);
    assert!(
        stopped_at < items.len() as i64,
        "stopped mid-backlog, not after it"
    );
    let service = Service::start(&broker, &redis, &names, &small);
    finish_and_compare(
        &broker,
        &redis,
        &names,
        items.len(),
        Duration::from_secs(120),
        service,
        &want,
    );
}

#[test]
fn redis_down_for_30_seconds_pauses_commits_and_recovers_exactly() {
    let _serial = serial();
    let items = workload(30_000, 3_000, 13);
    let want = reference(&items);
    let broker = Broker::start();
    let mut redis = Redis::start_persistent();
    let names = setup(&broker);
    let (first, rest) = items.split_at(10_000);
    produce(&broker, &names.web, first);
    let service = Service::start(&broker, &redis, &names, &[]);
    wait_committed(
        &broker,
        &names,
        first.len(),
        Duration::from_secs(60),
        &service,
    );

    redis.stop();
    produce(&broker, &names.web, rest);
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let frozen = committed_total(&broker, &names);
    assert_eq!(
        service.get("/readyz").map(|r| r.0),
        Some(503),
        "not ready while Redis is down"
    );
    let (_, metrics) = service.get("/metrics").unwrap();
    assert!(metrics.contains("leadscore_redis_up 0"), "{metrics}");
    let outage_len = Duration::from_secs(
        std::env::var("LEADSCORE_TEST_OUTAGE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    );
    while outage.elapsed() < outage_len {
        assert_eq!(
            service.get("/healthz").map(|r| r.0),
            Some(200),
            "alive during the outage"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(
        committed_total(&broker, &names),
        frozen,
        "no commits while state cannot be written"
    );
    assert!(service.counter("leadscore_redis_errors_total") > 0);

    redis.restart();
    wait_committed(
        &broker,
        &names,
        items.len(),
        Duration::from_secs(120),
        &service,
    );
    assert_eq!(service.get("/readyz").map(|r| r.0), Some(200));
    assert!(service.terminate().success());
    assert_same(
        (redis.leads(&names.prefix), output_ids(&broker, &names)),
        &want,
    );
}

#[test]
fn a_broker_restart_mid_stream_loses_nothing() {
    let _serial = serial();
    let items = workload(30_000, 3_000, 14);
    let want = reference(&items);
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    let (first, rest) = items.split_at(15_000);
    produce(&broker, &names.web, first);
    let service = Service::start(&broker, &redis, &names, &[]);
    std::thread::sleep(Duration::from_millis(500));
    let broker = broker.restart();
    produce(&broker, &names.web, rest);
    finish_and_compare(
        &broker,
        &redis,
        &names,
        items.len(),
        Duration::from_secs(180),
        service,
        &want,
    );
}

#[test]
fn poison_input_is_dead_lettered_and_every_good_event_is_scored() {
    let _serial = serial();
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[("LEADSCORE__KAFKA__FORMATS__CRM", "avro")],
    );
    let good = |i: usize| {
        serde_json::json!({"event_id": format!("g{i}"), "lead_id": format!("p-{}", i % 50), "occurred_at": "2026-11-22T10:00:00Z", "type": "form_submit"})
            .to_string()
            .into_bytes()
    };
    let mut rng = SmallRng::seed_from_u64(3);
    let random_bytes: Vec<u8> = (0..300).map(|_| rng.random()).collect();
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("json", random_bytes),
        ("json", br#"{"event_id": 5, "lead_id": "x", "occurred_at": "2026-11-22T10:00:00Z", "type": "form_submit"}"#.to_vec()),
        ("contract", br#"{"event_id": "m1", "occurred_at": "2026-11-22T10:00:00Z", "type": "form_submit"}"#.to_vec()),
        ("contract", br#"{"event_id": "m2", "lead_id": "x", "type": "form_submit"}"#.to_vec()),
        ("too_large", format!(r#"{{"event_id":"big","lead_id":"x","occurred_at":"2026-11-22T10:00:00Z","type":"form_submit","attributes":{{"pad":"{}"}}}}"#, "x".repeat(70_000)).into_bytes()),
        ("contract", br#"{"event_id": "t1", "lead_id": "x", "occurred_at": "9999-01-01T00:00:00Z", "type": "form_submit"}"#.to_vec()),
        ("json", b"{\"event_id\": \"u1\", \"lead_id\": \"\xff\xfe\", \"occurred_at\": \"2026-11-22T10:00:00Z\", \"type\": \"form_submit\"}".to_vec()),
        ("contract", br#"{"event_id": "k1", "lead_id": "x", "occurred_at": "2026-11-22T10:00:00Z", "type": "teleport"}"#.to_vec()),
        ("empty", Vec::new()),
    ];
    let mut web: Vec<(i32, String, Vec<u8>)> = Vec::new();
    let mut next_good = 0;
    for (_, bytes) in &poison {
        for _ in 0..3 {
            web.push((0, "k".into(), good(next_good)));
            next_good += 1;
        }
        web.push((0, "k".into(), bytes.clone()));
    }
    produce(&broker, &names.web, &web);
    // Truncated Avro on the Avro topic.
    let schema = leadscore::decode::input_schema(leadscore::event::Source::Crm);
    let crm_json = serde_json::json!({"event_id": "c1", "lead_id": "p-1", "occurred_at": "2026-11-22T10:00:00Z", "type": "profile_updated", "attributes": {"industry": "events"}});
    let crm_text = crm_json.to_string();
    let e = leadscore::decode::Decoder::new(
        leadscore::event::Source::Crm,
        leadscore::decode::Format::Json,
    )
    .decode(Some(crm_text.as_bytes()))
    .unwrap();
    let avro = leadscore::decode::encode_avro(&schema, &e).unwrap();
    produce(
        &broker,
        &names.crm,
        &[
            (0, "p-1".into(), avro[..avro.len() / 2].to_vec()),
            (0, "p-1".into(), avro.clone()),
        ],
    );

    let bad = poison.len() + 1;
    let dead = broker.read(&names.dead, PARTITIONS, bad, Duration::from_secs(30));
    assert_eq!(dead.len(), bad, "log:\n{}", service.logs());
    let mut kinds: Vec<String> = dead
        .iter()
        .map(|m| common::header(m, "leadscore.error.kind").unwrap())
        .collect();
    kinds.sort();
    let mut expected: Vec<String> = poison
        .iter()
        .map(|(k, _)| (*k).to_owned())
        .chain(["avro".to_owned()])
        .collect();
    expected.sort();
    assert_eq!(kinds, expected);
    for m in &dead {
        assert!(!common::header(m, "leadscore.reason").unwrap().is_empty());
        assert!(
            common::header(m, "leadscore.source.offset")
                .unwrap()
                .parse::<i64>()
                .is_ok()
        );
    }
    service.wait_consumed((web.len() + 2) as u64, Duration::from_secs(30));
    assert_eq!(
        service.counter("leadscore_events_consumed_total"),
        (next_good + 1) as u64,
        "every good event scored"
    );
    let (status, body) = service.get("/v1/leads/p-1").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"fit\":15.0"), "{body}");
    assert!(http_get(&service.http, "/healthz").is_some());
    assert!(service.terminate().success());
}

#[test]
fn a_group_of_three_that_gains_and_loses_members_ends_exact() {
    let _serial = serial();
    let items = workload(30_000, 3_000, 15);
    let want = reference(&items);
    let broker = Broker::start();
    let redis = Redis::start();
    let names = setup(&broker);
    let survivors = std::thread::scope(|scope| {
        let feeder = scope.spawn(|| {
            for chunk in items.chunks(3_000) {
                produce(&broker, &names.web, chunk);
                std::thread::sleep(Duration::from_millis(400));
            }
        });
        let a = Service::start(&broker, &redis, &names, &[]);
        let b = Service::start(&broker, &redis, &names, &[]);
        let c = Service::start(&broker, &redis, &names, &[]);
        std::thread::sleep(Duration::from_millis(1500));
        b.kill(); // a crash: its partitions move once its session expires
        let d = Service::start(&broker, &redis, &names, &[]);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(c.terminate().success(), "a member leaving cleanly exits 0");
        feeder.join().unwrap();
        (a, d)
    });
    let (a, d) = survivors;
    wait_committed(&broker, &names, items.len(), Duration::from_secs(180), &a);
    let (_, metrics) = a.get("/metrics").unwrap();
    assert!(
        metrics.contains("leadscore_rebalances_total{kind=\"assign\"}"),
        "{metrics}"
    );
    assert!(a.terminate().success());
    assert!(d.terminate().success());
    assert_same(
        (redis.leads(&names.prefix), output_ids(&broker, &names)),
        &want,
    );
}
