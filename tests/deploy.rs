//! The dashboard and the alerts only query what the service exports: every
//! metric named in `deploy/grafana/leadscore.json` and `deploy/alerts.yml`
//! (listed in `deploy/metrics-referenced.txt`, which `scripts/check-deploy.sh`
//! keeps equal to what those files reference) is on `/metrics` of a running
//! service, and the labelled counters the alerts match on exist at zero
//! before their first increment. (promtool's rule checks and rule tests run in
//! `scripts/check-deploy.sh`, which `scripts/test.sh` runs first.)

mod common;

use std::time::Duration;

use common::{Broker, Names, Redis, Service, event};

#[test]
fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = Names::new();
    broker.create_topics(&names.all(), 2);
    let service = Service::start(&broker, &redis, &names, &[]);

    // Before any traffic: the counters alerts compare with `increase()` exist at 0.
    let (_, fresh) = service.get("/metrics").unwrap();
    for series in [
        "leadscore_offset_commits_total{outcome=\"error\"} 0",
        "leadscore_produce_failures_total{topic=\"",
        "leadscore_rebalances_total{kind=\"lost\"} 0",
        "leadscore_shards_fenced_total 0",
        "leadscore_ready 1",
        "leadscore_redis_up 1",
    ] {
        assert!(
            fresh.lines().any(|l| l.starts_with(series)),
            "{series} missing before any traffic:\n{fresh}"
        );
    }

    broker.produce(
        &names.web,
        &[
            (
                "lead-1",
                event(
                    "w1",
                    "lead-1",
                    "2026-11-20T10:00:00Z",
                    "booking_abandoned",
                    &[],
                ),
            ),
            ("lead-1", b"not json".to_vec()),
        ],
    );
    // Engagement counters are labelled by event, channel, segment and
    // first-touch source (a product of label sets): they appear with the
    // first engagement event.
    broker.produce(
        &names.email,
        &[(
            "lead-1",
            br#"{"event_id":"e1","lead_id":"lead-1","occurred_at":"2026-11-20T10:01:00Z","type":"open","channel":"email"}"#.to_vec(),
        )],
    );
    service.wait_consumed(3, Duration::from_secs(30));
    service.wait_settled(Duration::from_secs(30));
    let (_, metrics) = service.get("/metrics").unwrap();
    let families: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let referenced = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/metrics-referenced.txt"
    ))
    .unwrap();
    let missing: Vec<&str> = referenced
        .lines()
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .filter(|n| !families.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "referenced by deploy/ but not exported: {missing:?}\nexported: {families:?}"
    );
    // And each has a sample, not only a TYPE line.
    for name in referenced.lines().filter(|n| !n.is_empty()) {
        assert!(
            metrics
                .lines()
                .any(|l| !l.starts_with('#') && l.starts_with(name)),
            "{name} has no sample"
        );
    }
}
