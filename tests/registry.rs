//! Schema Registry interoperability, proven with clients nobody here wrote:
//! confluent-kafka's Python `AvroSerializer` produces the input (first with
//! leadscore's schema, then with an evolved one registered as a new version),
//! and its `AvroDeserializer` reads leadscore's outputs. The registry is
//! `tests/support/registry.py`, a Confluent-compatible REST endpoint (no
//! registry server can be installed here).

mod common;

use std::time::{Duration, Instant};

use common::{Broker, Names, Redis, SchemaRegistry, Service, header, run_python};

const PARTITIONS: i32 = 2;

fn setup() -> (Broker, Redis, Names, SchemaRegistry) {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = Names::new();
    broker.create_topics(&names.all(), PARTITIONS);
    (broker, redis, names, SchemaRegistry::start())
}

/// Produces NDJSON events with confluent-kafka's AvroSerializer: one
/// `{"partition","offset","schema_id","key"}` line per message.
fn produce_avro(
    broker: &Broker,
    registry: &SchemaRegistry,
    topic: &str,
    schema: &str,
    events: &[serde_json::Value],
    evolve: bool,
) -> Vec<serde_json::Value> {
    let input: String = events.iter().map(|e| format!("{e}\n")).collect();
    let schema = format!("schemas/{schema}.avsc");
    let mut args = vec![
        "tests/support/avro_interop.py",
        "produce",
        "--brokers",
        &broker.brokers,
        "--registry",
        &registry.url,
        "--topic",
        topic,
        "--schema",
        &schema,
        "--input",
        "-",
    ];
    if evolve {
        args.push("--evolve");
    }
    let (code, out, err) = run_python(&args, Some(input.as_bytes()));
    assert_eq!(code, 0, "avro_interop produce failed:\n{out}\n{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Reads `count` records of a topic with confluent-kafka's AvroDeserializer.
fn consume_avro(
    broker: &Broker,
    registry: &SchemaRegistry,
    topic: &str,
    count: usize,
) -> Vec<serde_json::Value> {
    let count_arg = count.to_string();
    let (code, out, err) = run_python(
        &[
            "tests/support/avro_interop.py",
            "consume",
            "--brokers",
            &broker.brokers,
            "--registry",
            &registry.url,
            "--topic",
            topic,
            "--count",
            &count_arg,
            "--timeout",
            "60",
            "--timestamps",
            "rfc3339",
            "--meta",
        ],
        None,
    );
    assert_eq!(code, 0, "avro_interop consume failed:\n{out}\n{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An RFC 3339 time `minutes` ago (recent, so no decay moves the scores
/// while the test reads them).
fn ago(minutes: i64) -> String {
    let t = time::OffsetDateTime::now_utc() - time::Duration::minutes(minutes);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn web(id: &str, lead: &str, at: &str, kind: &str, attrs: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"event_id": id, "lead_id": lead, "occurred_at": at, "type": kind, "attributes": attrs})
}

/// The registered id of a subject's latest version.
fn subject_id(registry: &SchemaRegistry, subject: &str) -> u64 {
    let (status, body) =
        registry.call("GET", &format!("/subjects/{subject}/versions/latest"), None);
    assert_eq!(status, 200, "{subject}: {body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap()
}

#[test]
fn confluent_avro_clients_interoperate_through_the_registry() {
    let (broker, redis, names, registry) = setup();
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[
            ("LEADSCORE__KAFKA__FORMATS__WEB", "avro-registry"),
            ("LEADSCORE__KAFKA__FORMATS__EMAIL", "avro-registry"),
            ("LEADSCORE__KAFKA__FORMATS__CRM", "avro-registry"),
            ("LEADSCORE__KAFKA__FORMATS__OUTPUTS", "avro-registry"),
            ("LEADSCORE__SCHEMA_REGISTRY__URL", &registry.url),
        ],
    );
    // leadscore registered its output schemas under <topic>-value at start-up.
    let changes_id = subject_id(&registry, &format!("{}-value", names.changes));
    let handoffs_id = subject_id(&registry, &format!("{}-value", names.handoffs));

    // The buffet lead of the brief, no CRM profile (unknown fit): reads the
    // menu and prices, opens and clicks the promotion email…
    let lead = "buffet-lead-1";
    let first = produce_avro(
        &broker,
        &registry,
        &names.web,
        "events.web",
        &[
            web(
                "w1",
                lead,
                &ago(10),
                "page_view",
                serde_json::json!({"url": "https://buffet.example/menu", "utm_source": "facebook"}),
            ),
            web(
                "w2",
                lead,
                &ago(9),
                "page_view",
                serde_json::json!({"url": "https://buffet.example/pricing"}),
            ),
            web(
                "w3",
                lead,
                &ago(8),
                "page_view",
                serde_json::json!({"url": "https://buffet.example/pricing"}),
            ),
        ],
        false,
    );
    let email = produce_avro(
        &broker,
        &registry,
        &names.email,
        "events.email",
        &[
            serde_json::json!({"event_id": "e1", "lead_id": lead, "occurred_at": &ago(7), "type": "open", "channel": "email", "attributes": {"campaign": "year-end"}}),
            serde_json::json!({"event_id": "e2", "lead_id": lead, "occurred_at": &ago(6), "type": "click", "channel": "email", "attributes": {"url": "https://buffet.example/pricing"}}),
        ],
        false,
    );
    // …then upstream adds a field and an event type: the next events are
    // written with a newer schema version leadscore has never seen, which its
    // reader schema resolves datum by datum. Only the event of the new type
    // is dead-lettered (before 2026-12-07 the whole schema was refused up
    // front, and with it every event its producer sent).
    let evolved = produce_avro(
        &broker,
        &registry,
        &names.web,
        "events.web",
        &[
            web(
                "w4",
                lead,
                &ago(5),
                "booking_started",
                serde_json::json!({}),
            ),
            web(
                "w5",
                lead,
                &ago(4),
                "booking_abandoned",
                serde_json::json!({}),
            ),
            web("w5b", lead, &ago(4), "scroll_depth", serde_json::json!({})),
            web(
                "w6",
                lead,
                &ago(3),
                "chat_message",
                serde_json::json!({"intent": "booking", "text": "table for six tonight?"}),
            ),
        ],
        true,
    );
    let web_v1 = first[0]["schema_id"].as_u64().unwrap();
    let web_v2 = evolved[0]["schema_id"].as_u64().unwrap();
    let email_id = email[0]["schema_id"].as_u64().unwrap();
    assert_ne!(web_v1, web_v2, "the evolved schema is a new version");

    service.wait_consumed(9, Duration::from_secs(60));
    service.wait_settled(Duration::from_secs(60));
    assert_eq!(
        service.counter("leadscore_dead_lettered_total"),
        1,
        "log:\n{}",
        service.logs()
    );
    let dead = broker.read(&names.dead, PARTITIONS, 1, Duration::from_secs(30));
    let reason = header(&dead[0], "leadscore.reason").unwrap_or_default();
    assert!(reason.contains("scroll_depth"), "{reason}");

    // A stock Confluent consumer decodes leadscore's outputs.
    let changes = consume_avro(&broker, &registry, &names.changes, 2);
    let path: Vec<(String, String)> = changes
        .iter()
        .map(|c| {
            assert_eq!(c["schema_id"].as_u64(), Some(changes_id), "{c}");
            assert_eq!(c["key"], lead);
            let v = &c["value"];
            assert_eq!(v["fit_grade"], serde_json::Value::Null, "unknown fit: {v}");
            // A timestamp, not a long: the schema was registered as shipped,
            // with its logical types (its canonical form, registered before
            // 2026-12-07, has none).
            assert!(v["occurred_at"].is_string(), "{v}");
            (
                v["previous_segment"].as_str().unwrap().to_owned(),
                v["segment"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        path,
        [
            ("cold".to_owned(), "warm".to_owned()),
            ("warm".into(), "hot".into())
        ]
    );
    let handoffs = consume_avro(&broker, &registry, &names.handoffs, 1);
    let h = &handoffs[0];
    assert!(h["value"]["occurred_at"].is_string(), "{h}");
    let (status, registered) = registry.call("GET", &format!("/schemas/ids/{changes_id}"), None);
    assert_eq!(status, 200, "{registered}");
    assert!(
        registered.contains("timestamp-millis") && registered.contains("default"),
        "{registered}"
    );
    assert_eq!(h["schema_id"].as_u64(), Some(handoffs_id));
    assert_eq!(h["value"]["lead_id"], lead);
    assert_eq!(h["value"]["first_touch_source"], "facebook");
    assert_eq!(h["value"]["trigger_event_id"], "w5", "{h}");

    // An erasure request through the HTTP API goes onto the CRM topic framed
    // like every other message there: a stock deserializer reads it, and
    // leadscore applies it (an unframed datum would be dead-lettered).
    let (status, body) = service
        .request("DELETE", &format!("/v1/leads/{lead}"), &[])
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let crm_id = subject_id(&registry, &format!("{}-value", names.crm));
    let erasures = consume_avro(&broker, &registry, &names.crm, 1);
    assert_eq!(
        erasures[0]["schema_id"].as_u64(),
        Some(crm_id),
        "{}",
        erasures[0]
    );
    assert_eq!(erasures[0]["value"]["type"], "erasure_requested");
    assert_eq!(erasures[0]["value"]["lead_id"], lead);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while redis.lead(&names.prefix, lead).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "lead not erased; log:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(service.counter("leadscore_dead_lettered_total"), 1);

    // Each input schema was fetched once and then served from the cache.
    let requests = registry.requests();
    for id in [web_v1, web_v2, email_id] {
        let fetched = requests
            .iter()
            .filter(|(m, p)| {
                m == "GET" && p.split('?').next() == Some(&format!("/schemas/ids/{id}"))
            })
            .count();
        assert_eq!(
            fetched, 1,
            "schema {id} fetched {fetched} times: {requests:?}"
        );
    }
}

/// Waits up to 20 s for `/readyz` to answer `status`.
fn wait_readyz(service: &Service, status: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while service.get("/readyz").map(|r| r.0) != Some(status) {
        assert!(
            Instant::now() < deadline,
            "{what}: /readyz not {status}; log:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The service with only the web topic in Schema Registry framing.
fn start_with_web_framed(
    broker: &Broker,
    redis: &Redis,
    names: &Names,
    registry: &SchemaRegistry,
) -> Service {
    Service::start(
        broker,
        redis,
        names,
        &[
            ("LEADSCORE__KAFKA__FORMATS__WEB", "avro-registry"),
            ("LEADSCORE__SCHEMA_REGISTRY__URL", &registry.url),
        ],
    )
}

#[test]
fn unknown_schema_ids_are_dead_lettered_and_an_unreachable_registry_holds_consumption() {
    let (broker, redis, names, registry) = setup();
    let service = start_with_web_framed(&broker, &redis, &names, &registry);
    // An id the registry never issued, and a payload with no framing at all.
    let mut unknown = vec![0u8, 0, 0, 0x10, 0x92];
    unknown.extend_from_slice(b"\x02\x06abc");
    broker.produce(
        &names.web,
        &[
            ("x", unknown),
            ("y", br#"{"event_id":"j1","lead_id":"y"}"#.to_vec()),
        ],
    );
    let dead = broker.read(&names.dead, PARTITIONS, 2, Duration::from_secs(30));
    assert_eq!(dead.len(), 2, "log:\n{}", service.logs());
    for m in &dead {
        assert_eq!(
            header(m, "leadscore.error.kind").as_deref(),
            Some("registry")
        );
    }
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| header(m, "leadscore.reason").unwrap())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("4242")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("magic byte")),
        "{reasons:?}"
    );

    // The registry answers 503 to every schema lookup: nothing is dead-lettered,
    // consumption holds and the service reports not ready…
    let (status, _) = registry.call(
        "POST",
        "/__test/faults",
        Some(r#"{"status":503,"count":-1,"path_prefix":"/schemas/ids/","method":"GET"}"#),
    );
    assert_eq!(status, 200);
    let lead = "held-lead";
    produce_avro(
        &broker,
        &registry,
        &names.web,
        "events.web",
        &[
            web(
                "h1",
                lead,
                &ago(10),
                "page_view",
                serde_json::json!({"url": "/pricing"}),
            ),
            web(
                "h2",
                lead,
                &ago(9),
                "booking_started",
                serde_json::json!({}),
            ),
            web(
                "h3",
                lead,
                &ago(8),
                "booking_abandoned",
                serde_json::json!({}),
            ),
        ],
        false,
    );
    wait_readyz(&service, 503, "not ready while the registry fails");
    let (_, why) = service.get("/readyz").unwrap();
    assert!(why.contains("the Schema Registry does not answer"), "{why}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(service.counter("leadscore_dead_lettered_total"), 2);
    assert_eq!(service.counter("leadscore_events_consumed_total"), 0);
    assert!(
        broker
            .read(&names.changes, PARTITIONS, 1, Duration::from_secs(1))
            .is_empty()
    );

    // …and carries on where it stopped once the registry is back.
    registry.call("DELETE", "/__test/faults", None);
    let changes = broker.read(&names.changes, PARTITIONS, 2, Duration::from_secs(30));
    let segments: Vec<&str> = changes
        .iter()
        .map(|m| {
            let v = common::json(m);
            assert_eq!(v["lead_id"], lead);
            match v["segment"].as_str().unwrap() {
                "warm" => "warm",
                "hot" => "hot",
                other => panic!("unexpected segment {other}"),
            }
        })
        .collect();
    assert_eq!(segments, ["warm", "hot"], "log:\n{}", service.logs());
    wait_readyz(&service, 200, "ready again");
    assert_eq!(service.counter("leadscore_dead_lettered_total"), 2);
    assert_eq!(service.counter("leadscore_events_consumed_total"), 3);
}

/// Only the registry's own "schema not found" dead-letters a message. A
/// refusal (a rotated credential), a 404 that is not the registry's (a
/// wrong base URL) and an answer without a schema (a proxy's page) hold the
/// input like an outage, and it is scored once the registry gives the
/// schema (before, each was dead-lettered and the event lost). And an id
/// not found once is asked again: the registry may learn it a moment later
/// (before, the miss was remembered until a restart).
#[test]
fn only_the_registrys_schema_not_found_dead_letters_and_not_for_good() {
    let (broker, redis, names, registry) = setup();
    let service = start_with_web_framed(&broker, &redis, &names, &registry);
    let faults = [
        r#"{"status":401,"error_code":40101,"count":-1,"replace":true,"path_prefix":"/schemas/ids/","method":"GET"}"#,
        r#"{"status":404,"error_code":404,"message":"HTTP 404 Not Found","count":-1,"replace":true,"path_prefix":"/schemas/ids/","method":"GET"}"#,
        r#"{"status":200,"error_code":200,"message":"<html>","count":-1,"replace":true,"path_prefix":"/schemas/ids/","method":"GET"}"#,
    ];
    let (status, _) = registry.call("POST", "/__test/faults", Some(faults[0]));
    assert_eq!(status, 200);
    let first = produce_avro(
        &broker,
        &registry,
        &names.web,
        "events.web",
        &[web(
            "r1",
            "refused",
            &ago(10),
            "booking_abandoned",
            serde_json::json!({}),
        )],
        false,
    );
    for fault in faults {
        // In place of the one before, with no moment without a fault.
        let (status, _) = registry.call("POST", "/__test/faults", Some(fault));
        assert_eq!(status, 200);
        wait_readyz(&service, 503, fault);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            service.counter("leadscore_dead_lettered_total"),
            0,
            "{fault}: {}",
            service.logs()
        );
        assert_eq!(
            service.counter("leadscore_events_consumed_total"),
            0,
            "{fault}"
        );
    }
    registry.call("DELETE", "/__test/faults", None);
    service.wait_consumed(1, Duration::from_secs(30));
    assert_eq!(service.counter("leadscore_dead_lettered_total"), 0);

    // The next id, before the registry has it: dead-lettered…
    let next = first[0]["schema_id"].as_u64().unwrap() as u32 + 1;
    let mut early = vec![0u8];
    early.extend_from_slice(&next.to_be_bytes());
    early.extend_from_slice(b"\x02\x06abc");
    broker.produce(&names.web, &[("early", early)]);
    let dead = broker.read(&names.dead, PARTITIONS, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    let reason = header(&dead[0], "leadscore.reason").unwrap();
    assert!(
        reason.contains(&format!("schema id {next} is not in")),
        "{reason}"
    );
    // …then registered (an evolved version takes it), once the miss is a
    // second old (until then the id is taken as unknown without asking):
    // its events score.
    std::thread::sleep(Duration::from_millis(1100));
    let later = produce_avro(
        &broker,
        &registry,
        &names.web,
        "events.web",
        &[web(
            "r2",
            "later",
            &ago(5),
            "booking_abandoned",
            serde_json::json!({}),
        )],
        true,
    );
    assert_eq!(later[0]["schema_id"].as_u64(), Some(u64::from(next)));
    service.wait_consumed(3, Duration::from_secs(30));
    assert_eq!(service.counter("leadscore_dead_lettered_total"), 1);
    assert_eq!(service.counter("leadscore_events_consumed_total"), 2);
}
