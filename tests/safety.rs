//! Safe to run in production: rules changes over stored state, lost Redis
//! state, eviction policies, retention and erasure, the HTTP surface's
//! limits, and transport security — against the real broker and Redis.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Broker, Names, Redis, Service, event, json};
use leadscore::event::{format_rfc3339, wall_clock_ms};
use rdkafka::Message;

const WAIT: Duration = Duration::from_secs(30);

fn setup(partitions: i32) -> (Broker, Redis, Names) {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = Names::new();
    broker.create_topics(&names.all(), partitions);
    (broker, redis, names)
}

fn ago(ms: i64) -> String {
    format_rfc3339(wall_clock_ms() - ms)
}

fn wait_for(what: &str, timeout: Duration, service: &Service, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; log:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_rules_change_cannot_crash_a_restart_and_stored_leads_are_remapped() {
    let (broker, redis, names) = setup(2);
    broker.produce(
        &names.crm,
        &[(
            "r1",
            event(
                "p",
                "r1",
                &ago(60_000),
                "profile_updated",
                &[("industry", "catering"), ("budget", "5000")],
            ),
        )],
    );
    broker.produce(
        &names.web,
        &[
            (
                "r1",
                event(
                    "w1",
                    "r1",
                    &ago(50_000),
                    "page_view",
                    &[("url", "/pricing")],
                ),
            ),
            (
                "r1",
                event("w2", "r1", &ago(40_000), "booking_abandoned", &[]),
            ),
            (
                "r1",
                event("w3", "r1", &ago(30_000), "booking_started", &[]),
            ),
        ],
    );
    broker.produce(
        &names.email,
        &[(
            "r1",
            event("m1", "r1", &ago(20_000), "click", &[("link_url", "/x")]),
        )],
    );
    let service = Service::start(&broker, &redis, &names, &[]);
    service.wait_consumed(5, WAIT);
    service.wait_settled(WAIT);
    let (_, body) = service.get("/v1/leads/r1").unwrap();
    assert!(body.contains("\"segment\":\"hot\""), "{body}");
    assert!(service.terminate().success());

    // Rename a rule, remove a segment, change a decay half-life, drop a fit rule.
    let changed = leadscore::engine::rules::DEFAULT_RULES
        .replace("version = \"default-2026.11.2\"", "version = \"changed-1\"")
        .replace("name = \"booking_abandoned\"", "name = \"booking_dropped\"")
        .replace("[[segments]]\nname = \"hot\"\nenter = 60.0\nmargin = 10.0             # leaves hot below 50\nmin_dwell = \"1h\"\n", "")
        .replace("email = \"3d\"", "email = \"5d\"")
        .replace("[[fit.rules]]\nname = \"budget_ok\"\nattribute = \"budget\"\ngte = 1000.0\npoints = 10.0\n", "");
    assert!(!changed.contains("name = \"hot\""));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, &changed).unwrap();
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[("LEADSCORE__SCORING__RULES_FILE", path.to_str().unwrap())],
    );
    broker.produce(
        &names.web,
        &[(
            "r1",
            event("w4", "r1", &ago(10_000), "page_view", &[("url", "/menu")]),
        )],
    );
    service.wait_consumed(1, WAIT);
    service.wait_settled(WAIT);
    let (status, body) = service.get("/v1/leads/r1").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rules_version"], "changed-1");
    assert_eq!(
        v["fit"], 15.0,
        "industry kept; the removed budget rule no longer counts"
    );
    assert!(
        ["cold", "warm"].contains(&v["segment"].as_str().unwrap()),
        "{body}"
    );
    assert!(
        v["top_signals"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["rule"] != "booking_abandoned"),
        "a renamed rule is a new rule: {body}"
    );
    // Stored under the new rules now.
    let rules = leadscore::engine::Rules::from_toml(&changed).unwrap();
    let layout = leadscore::engine::layout::Layout::of(&rules).hash();
    let stored = redis.lead(&names.prefix, "r1").unwrap();
    assert_eq!(
        leadscore::engine::LeadState::stored_layout(&stored),
        Ok(layout)
    );
    assert!(service.terminate().success());
}

#[test]
fn flushall_mid_run_stops_the_service_and_a_restart_refuses_to_reset_scores() {
    let (broker, redis, names) = setup(2);
    let mut service = Service::start(&broker, &redis, &names, &[]);
    broker.produce(
        &names.web,
        &[("f1", event("a", "f1", &ago(5_000), "form_submit", &[]))],
    );
    service.wait_consumed(1, WAIT);
    wait_for("a commit", WAIT, &service, || {
        broker
            .committed(&names.group, &names.web, 2)
            .iter()
            .any(|c| *c > 0)
    });
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
    broker.produce(
        &names.web,
        &[("f1", event("b", "f1", &ago(4_000), "form_submit", &[]))],
    );
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = service.exited() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still running after FLUSHALL; log:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "stops with an error");
    let log = service.logs();
    assert!(
        log.contains("gone from Redis") || log.contains("state lost"),
        "{log}"
    );
    // A restart over the empty Redis refuses instead of rescoring from zero,
    // and keeps refusing: a refused take must not make the shard look owned.
    for attempt in 1..=2 {
        let (status, log) = Service::run_to_exit(&broker, &redis, &names, &[], WAIT);
        assert!(!status.success(), "restart {attempt}");
        assert!(
            log.contains("state lost: Redis has no state for shard"),
            "restart {attempt}: {log}"
        );
    }
}

#[test]
fn a_redis_that_may_evict_state_is_refused_unless_allowed() {
    let broker = Broker::start();
    let redis = Redis::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let names = Names::new();
    broker.create_topics(&names.all(), 1);
    let (status, log) = Service::run_to_exit(&broker, &redis, &names, &[], WAIT);
    assert!(!status.success());
    assert!(
        log.contains("maxmemory-policy is \\\"allkeys-lru\\\"")
            || log.contains("maxmemory-policy is \"allkeys-lru\""),
        "{log}"
    );
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[("LEADSCORE__REDIS__ALLOW_EVICTION", "true")],
    );
    // Accepted, and the risk is in the log.
    let log = service.stop_cleanly("a start with eviction allowed");
    assert!(
        log.contains("accepted with redis.allow_eviction = true") && log.contains("allkeys-lru"),
        "{log}"
    );

    // On a cluster each primary holds shards of its own: one that may
    // evict is refused, by its address, whichever node the URL names (only
    // the node the client happened to ask was checked before 2026-12-07).
    let cluster = Redis::start_cluster(false);
    let evicting = cluster.primaries()[1];
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query(&mut cluster.node_conn(evicting))
        .unwrap();
    let (status, log) = Service::run_to_exit(&broker, &cluster, &names, &[], WAIT);
    assert!(!status.success());
    assert!(log.contains("allkeys-lru"), "{log}");
    assert!(log.contains(&format!(":{evicting}")), "{log}");
}

/// Rules with half-lives of seconds (and no dwell), for decay in real time.
fn fast_rules(dir: &std::path::Path) -> std::path::PathBuf {
    let text = leadscore::engine::rules::DEFAULT_RULES
        .replace("half_life = \"7d\"", "half_life = \"2s\"")
        .replace("email = \"3d\"", "email = \"2s\"")
        .replace("min_dwell = \"1h\"", "");
    let path = dir.join("fast-rules.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn quiet_leads_and_visitors_expire_but_opt_outs_are_kept() {
    let (broker, redis, names) = setup(1);
    let dir = tempfile::tempdir().unwrap();
    let rules = fast_rules(dir.path());
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[
            ("LEADSCORE__SCORING__RULES_FILE", rules.to_str().unwrap()),
            ("LEADSCORE__STATE__RETENTION", "3s"),
            ("LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS", "300"),
        ],
    );
    let visitor = serde_json::json!({"event_id": "v1", "anonymous_id": "cookie-x", "occurred_at": ago(0), "type": "page_view", "attributes": {"url": "/menu"}});
    broker.produce(
        &names.web,
        &[
            (
                "gone",
                event("g1", "gone", &ago(0), "page_view", &[("url", "/menu")]),
            ),
            ("cookie-x", visitor.to_string().into_bytes()),
        ],
    );
    broker.produce(
        &names.email,
        &[("kept", event("k1", "kept", &ago(0), "unsubscribe", &[]))],
    );
    service.wait_consumed(3, WAIT);
    wait_for(
        "the quiet lead and visitor to expire",
        WAIT,
        &service,
        || {
            let keys: Vec<String> = redis.leads(&names.prefix).into_keys().collect();
            !keys
                .iter()
                .any(|k| k.ends_with(":l:gone") || k.ends_with(":a:cookie-x"))
                && keys.iter().any(|k| k.ends_with(":l:kept"))
        },
    );
    assert!(service.counter("leadscore_leads_expired_total") >= 2);
    assert_eq!(service.get("/v1/leads/gone").unwrap().0, 404);
    assert_eq!(
        service.get("/v1/leads/kept").unwrap().0,
        200,
        "an opt-out is remembered"
    );
    assert!(service.terminate().success());
}

#[test]
fn an_erased_lead_is_gone_everywhere_and_stays_gone_across_restarts() {
    let (broker, redis, names) = setup(2);
    let service = Service::start(&broker, &redis, &names, &[]);
    let anon = serde_json::json!({"event_id": "v1", "anonymous_id": "c1", "occurred_at": ago(50_000), "type": "page_view", "attributes": {"url": "/pricing"}});
    let identify = serde_json::json!({"event_id": "i1", "lead_id": "L1", "anonymous_id": "c1", "occurred_at": ago(40_000), "type": "identify"});
    // The visitor's events and the lead's share a partition (same key).
    broker.produce(
        &names.web,
        &[
            ("L1", anon.to_string().into_bytes()),
            ("L1", identify.to_string().into_bytes()),
            (
                "L1",
                event("w1", "L1", &ago(30_000), "booking_abandoned", &[]),
            ),
            (
                "L2",
                event("w2", "L2", &ago(30_000), "booking_started", &[]),
            ),
        ],
    );
    service.wait_consumed(4, WAIT);
    service.wait_settled(WAIT);
    let keys: Vec<String> = redis.leads(&names.prefix).into_keys().collect();
    assert!(
        keys.iter().any(|k| k.ends_with(":l:L1")) && keys.iter().any(|k| k.ends_with(":a:c1")),
        "{keys:?}"
    );

    let (status, body) = service.request("DELETE", "/v1/leads/L1", &[]).unwrap();
    assert_eq!(status, 202, "{body}");
    // A tombstone on the CRM topic erases too.
    let shard_of_l2 = keys.iter().find(|k| k.ends_with(":l:L2")).unwrap()[2..]
        .split('}')
        .next()
        .unwrap()
        .parse::<i32>()
        .unwrap();
    {
        use rdkafka::producer::{BaseRecord, Producer};
        let p = broker.producer();
        p.send(
            BaseRecord::<str, [u8]>::to(&names.crm)
                .partition(shard_of_l2)
                .key("L2"),
        )
        .unwrap();
        p.flush(WAIT).unwrap();
    }
    wait_for("both leads erased", WAIT, &service, || {
        let keys: Vec<String> = redis.leads(&names.prefix).into_keys().collect();
        !keys
            .iter()
            .any(|k| k.ends_with(":l:L1") || k.ends_with(":a:c1") || k.ends_with(":l:L2"))
    });
    let mut conn = redis.conn();
    for shard in 0..2 {
        let timers: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{}{{p{shard}}}:timers", names.prefix))
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .unwrap();
        assert!(
            !timers
                .iter()
                .any(|t| t.contains("L1") || t.contains("c1") || t.contains("L2")),
            "{timers:?}"
        );
    }
    assert_eq!(service.get("/v1/leads/L1").unwrap().0, 404);
    assert!(service.counter("leadscore_leads_erased_total") >= 2);
    assert!(service.terminate().success());
    let service = Service::start(&broker, &redis, &names, &[]);
    service.wait_settled(WAIT);
    assert_eq!(
        service.get("/v1/leads/L1").unwrap().0,
        404,
        "stays gone after a restart"
    );
    assert_eq!(service.get("/v1/leads/L2").unwrap().0, 404);

    // A producer's retry of an event from before the erasure, a late email
    // webhook about L1 and the cookie's own late page view do not bring the
    // person back (before 2026-12-07 the retry restored L1, warm again).
    let consumed = service.counter("leadscore_events_consumed_total");
    broker.produce(
        &names.web,
        &[
            (
                "L1",
                event("w1", "L1", &ago(30_000), "booking_abandoned", &[]),
            ),
            ("L1", anon.to_string().into_bytes()),
        ],
    );
    let open = serde_json::json!({"event_id": "m1", "lead_id": "L1", "occurred_at": ago(20_000), "type": "open", "channel": "email"});
    broker.produce(&names.email, &[("L1", open.to_string().into_bytes())]);
    wait_for("the late events dropped", WAIT, &service, || {
        service.counter("leadscore_events_after_erasure_total") >= 3
    });
    service.wait_settled(WAIT);
    assert_eq!(service.get("/v1/leads/L1").unwrap().0, 404);
    let keys: Vec<String> = redis.leads(&names.prefix).into_keys().collect();
    assert!(
        !keys
            .iter()
            .any(|k| k.ends_with(":l:L1") || k.ends_with(":a:c1")),
        "{keys:?}"
    );
    assert_eq!(service.counter("leadscore_events_consumed_total"), consumed);
    assert!(service.terminate().success());
}

/// A lead whose events reached two partitions (a producer that keyed some
/// of them by an email) has a state in each, and `DELETE` erases both, even
/// when the member that answers holds only one of them in memory: after a
/// restart, a new event reached one partition. Before, the request went
/// only to the shards found in this member's memory (or, when none was, in
/// Redis), so the other state survived (stop 44's user probe, on a single
/// instance and in a group of two).
#[test]
fn a_delete_erases_the_lead_in_every_partition_that_holds_it() {
    let (broker, redis, names) = setup(2);
    let first = Service::start(&broker, &redis, &names, &[]);
    let msgs = |items: &[(i32, &str, Vec<u8>)]| -> Vec<common::Msg> {
        items
            .iter()
            .map(|(p, k, b)| (0, *p, (*k).to_owned(), b.clone()))
            .collect()
    };
    broker.produce_msgs(
        &names,
        &msgs(&[
            (
                0,
                "S",
                event("s1", "S", &ago(30_000), "booking_abandoned", &[]),
            ),
            (
                1,
                "s@example.com",
                event("s2", "S", &ago(29_000), "page_view", &[("url", "/pricing")]),
            ),
        ]),
    );
    first.wait_consumed(2, WAIT);
    first.wait_settled(WAIT);
    let held = || -> Vec<String> {
        redis
            .leads(&names.prefix)
            .into_keys()
            .filter(|k| k.ends_with(":l:S"))
            .collect()
    };
    assert_eq!(held(), ["{p0}:l:S", "{p1}:l:S"]);
    assert!(first.terminate().success());

    let service = Service::start(&broker, &redis, &names, &[]);
    broker.produce_msgs(
        &names,
        &msgs(&[(
            0,
            "S",
            event("s3", "S", &ago(1_000), "page_view", &[("url", "/menu")]),
        )]),
    );
    service.wait_consumed(1, WAIT);
    let (status, body) = service.request("DELETE", "/v1/leads/S", &[]).unwrap();
    assert_eq!(status, 202, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["partitions"], serde_json::json!([0, 1]), "{body}");
    wait_for("both states erased", WAIT, &service, || held().is_empty());
    service.wait_settled(WAIT);
    assert!(held().is_empty(), "{:?}", held());
    assert_eq!(service.get("/v1/leads/S").unwrap().0, 404);
    assert_eq!(service.counter("leadscore_leads_erased_total"), 2);
    assert!(service.terminate().success());
}

/// The erasure markers travel with the partition: a member that takes the
/// lead's partition over from the one that erased it (a rebalance, not a
/// restart of the same process) drops a producer's retry and a late event
/// about the erased lead too.
#[test]
fn an_erasure_holds_on_the_member_that_takes_the_partition_over() {
    let (broker, redis, names) = setup(2);
    let first = Service::start(&broker, &redis, &names, &[]);
    let retry = event("w1", "L1", &ago(30_000), "booking_abandoned", &[]);
    broker.produce(&names.web, &[("L1", retry.clone())]);
    first.wait_consumed(1, WAIT);
    first.wait_settled(WAIT);
    assert!(redis.lead(&names.prefix, "L1").is_some());
    let (status, body) = first.request("DELETE", "/v1/leads/L1", &[]).unwrap();
    assert_eq!(status, 202, "{body}");
    wait_for("L1 erased", WAIT, &first, || {
        redis.lead(&names.prefix, "L1").is_none()
    });
    first.wait_settled(WAIT);

    // A second member joins and the first leaves: the second owns both
    // partitions, the erased lead's among them.
    let second = Service::start(&broker, &redis, &names, &[]);
    assert!(first.terminate().success());
    wait_for(
        "the second member owns both partitions",
        WAIT,
        &second,
        || second.counter("leadscore_shards_owned") == 2,
    );
    let open = serde_json::json!({"event_id": "m1", "lead_id": "L1", "occurred_at": ago(20_000), "type": "open", "channel": "email"});
    broker.produce(&names.web, &[("L1", retry)]);
    broker.produce(&names.email, &[("L1", open.to_string().into_bytes())]);
    wait_for(
        "the retry and the late event dropped",
        WAIT,
        &second,
        || second.counter("leadscore_events_after_erasure_total") >= 2,
    );
    second.wait_settled(WAIT);
    assert_eq!(second.get("/v1/leads/L1").unwrap().0, 404);
    assert!(redis.lead(&names.prefix, "L1").is_none());
    assert_eq!(second.counter("leadscore_events_consumed_total"), 0);
    assert!(second.terminate().success());
}

/// A Redis the service cannot keep its state in is refused at start, with
/// the reason, instead of passing the start-up check and then retrying to
/// take shards: a user without Lua scripting, a cluster node in single
/// mode (it answered MOVED to most keys), a single server in cluster mode.
#[test]
fn a_redis_that_cannot_hold_the_state_is_refused_at_start_with_the_reason() {
    let (broker, redis, names) = setup(1);
    let fail = |redis: &Redis, extra: &[(&str, &str)]| {
        let (status, log) =
            Service::run_to_exit(&broker, redis, &names, extra, Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{log}");
        log
    };
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("noscript")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-@scripting")
        .query(&mut redis.conn())
        .unwrap();
    let url = format!("redis://noscript:pw@127.0.0.1:{}/0", redis.port);
    let log = fail(&redis, &[("LEADSCORE__REDIS__URL", &url)]);
    assert!(
        log.contains("cannot run Lua scripts") && log.contains("+@scripting"),
        "{log}"
    );

    let log = fail(&redis, &[("LEADSCORE__REDIS__MODE", "cluster")]);
    assert!(log.contains("no Redis Cluster answers"), "{log}");

    let cluster = Redis::start_cluster(false);
    let node = format!("redis://127.0.0.1:{}/0", cluster.port);
    let log = fail(
        &cluster,
        &[
            ("LEADSCORE__REDIS__MODE", "single"),
            ("LEADSCORE__REDIS__URL", &node),
        ],
    );
    assert!(log.contains("set redis.mode = \\\"cluster\\\""), "{log}");
    // The same cluster in cluster mode passes the checks.
    let service = Service::start(&broker, &cluster, &names, &[]);
    assert!(service.terminate().success());
}

#[test]
fn idle_sockets_are_closed_readyz_still_answers_and_v1_needs_the_token() {
    let (broker, redis, names) = setup(1);
    let token = "s3cret-token-0123456789";
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[
            ("LEADSCORE__HTTP__AUTH_TOKEN", token),
            ("LEADSCORE__HTTP__HEADER_READ_TIMEOUT_MS", "2000"),
        ],
    );
    // 2,000 connections that never send a request.
    let idle: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect(&service.http).unwrap())
        .collect();
    let started = Instant::now();
    assert_eq!(service.get("/readyz").map(|r| r.0), Some(200));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "readyz took {:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_secs(3));
    let closed = idle
        .iter()
        .take(50)
        .filter(|s| {
            let mut s = *s;
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 16];
            matches!(s.read(&mut buf), Ok(0) | Err(_))
        })
        .count();
    assert_eq!(
        closed, 50,
        "idle connections are closed by the header-read timeout"
    );
    drop(idle);
    let (status, why) = service.get("/v1/leads/nobody").unwrap();
    assert_eq!(status, 401, "no token");
    assert!(why.contains("a bearer token is required"), "{why}");
    let (status, why) = service
        .request(
            "GET",
            "/v1/leads/nobody",
            &[("Authorization", "Bearer wrong")],
        )
        .unwrap();
    assert_eq!(status, 401, "a wrong token");
    assert!(why.contains("not valid"), "{why}");
    // The scheme's name in any case.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} {token}");
        assert_eq!(
            service
                .request("GET", "/v1/leads/nobody", &[("Authorization", &auth)])
                .unwrap()
                .0,
            404,
            "{scheme}"
        );
    }
    assert_eq!(service.get("/metrics").unwrap().0, 200, "metrics stay open");
    assert_eq!(service.get("/healthz").unwrap().0, 200);
    assert!(service.terminate().success());
}

/// A CA and a server certificate for 127.0.0.1, made with openssl.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl on PATH");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=leadscore-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[test]
fn redis_over_tls_with_an_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let tls_port = common::free_port().to_string();
    let p = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
    let (crt, key, ca) = (p("server.crt"), p("server.key"), p("ca.crt"));
    // The plain port stays open for the test's own inspection only.
    let redis = Redis::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &crt,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
        "--user",
        "leadscore",
        "on",
        ">tls-secret-pw",
        "~*",
        "&*",
        "+@all",
    ]);
    let broker = Broker::start();
    let names = Names::new();
    broker.create_topics(&names.all(), 1);
    let url = format!("rediss://leadscore:tls-secret-pw@127.0.0.1:{tls_port}/0");
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[
            ("LEADSCORE__REDIS__URL", &url),
            ("LEADSCORE__REDIS__TLS_CA_FILE", &ca),
        ],
    );
    broker.produce(
        &names.web,
        &[("t1", event("t", "t1", &ago(1_000), "form_submit", &[]))],
    );
    service.wait_consumed(1, WAIT);
    service.wait_settled(WAIT);
    assert!(
        redis.lead(&names.prefix, "t1").is_some(),
        "state written over TLS"
    );
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        clients.lines().any(|l| l.contains("user=leadscore")),
        "{clients}"
    );
    assert!(service.terminate().success());
    // Without the CA the server's certificate is not trusted: the service does not start.
    let (status, log) = Service::run_to_exit(
        &broker,
        &redis,
        &names,
        &[("LEADSCORE__REDIS__URL", &url)],
        WAIT,
    );
    assert!(!status.success(), "{log}");
}

#[test]
fn kafka_sasl_scram_works_end_to_end_and_a_client_without_it_is_refused() {
    let names = Names::new();
    let broker = Broker::start_sasl(&names.all(), 1, "leadscore", "scram-secret-1");
    let redis = Redis::start();
    let service = Service::start(&broker, &redis, &names, &[]);
    broker.produce(
        &names.web,
        &[(
            "s1",
            event("s", "s1", &ago(1_000), "booking_abandoned", &[]),
        )],
    );
    let changes = broker.read(&names.changes, 1, 1, WAIT);
    assert_eq!(changes.len(), 1, "log:\n{}", service.logs());
    assert_eq!(json(&changes[0])["lead_id"], "s1");
    assert_eq!(changes[0].key(), Some(b"s1".as_ref()));
    // The same broker refuses a client that does not authenticate.
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let plain: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.brokers)
        .set("group.id", "intruder")
        .create()
        .unwrap();
    let meta = plain.fetch_metadata(Some(&names.web), Duration::from_secs(5));
    let refused = match &meta {
        Err(_) => true,
        Ok(m) => m
            .topics()
            .iter()
            .all(|t| t.error().is_some() || t.partitions().is_empty()),
    };
    assert!(
        refused,
        "a client without SASL read metadata: {:?}",
        meta.map(|m| m.topics().len())
    );
    assert!(service.terminate().success());
}
