//! The load generator's modes that the benchmark scripts rely on
//! (`scripts/restart.sh`, `scripts/latency.sh`), against a real Redis.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Broker, Names, Redis, Service};
use leadscore::engine::{Engine, EngineConfig, Rules};

fn loadgen(args: &[&str], redis: &Redis) -> (bool, String, String) {
    loadgen_with(args, redis, &[])
}

fn loadgen_with(args: &[&str], redis: &Redis, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_leadscore"))
        .arg("loadgen")
        .args(args)
        .envs(env.iter().copied())
        .env("LEADSCORE__REDIS__URL", &redis.url)
        .env("LEADSCORE__HTTP__LISTEN", "127.0.0.1:0")
        .env("LEADSCORE__LOG__LEVEL", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn prefill_state_writes_states_timers_and_positions() {
    let redis = Redis::start();
    let (ok, stdout, stderr) = loadgen(
        &[
            "--mode",
            "prefill-state",
            "--leads",
            "2000",
            "--partitions",
            "4",
        ],
        &redis,
    );
    assert!(ok, "{stdout}{stderr}");
    let states = redis.leads("leadscore:");
    assert_eq!(states.len(), 2000, "one state per lead or visitor");
    assert!(
        states.keys().any(|k| k.contains(":a:")) && states.keys().any(|k| k.contains(":l:")),
        "identified leads and anonymous visitors"
    );
    // Every state reads under the default rules (the layout was recorded).
    let engine = Engine::new(Arc::new(Rules::default_rules()), EngineConfig::default());
    for (key, blob) in &states {
        let state = engine.decode(blob).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(!state.is_new(), "{key} holds its first event");
    }
    let mut conn = redis.conn();
    let mut timers = 0;
    for shard in 0..4 {
        let n: usize = redis::cmd("ZCARD")
            .arg(format!("leadscore:{{p{shard}}}:timers"))
            .query(&mut conn)
            .unwrap();
        assert!(n > 0, "shard {shard} has decay timers");
        timers += n;
    }
    assert!(timers <= 2000);
    // Every input starts at 0 on every shard, so a service started on empty
    // topics resumes there (not "state lost": positions are stored).
    let positions = redis.positions("leadscore:");
    assert_eq!(positions.len(), 16, "{positions:?}");
    assert!(positions.values().all(|p| *p == 0), "{positions:?}");
}

/// What `scripts/restart.sh` relies on: a service started over prefilled
/// state (and empty topics) is ready, and scores a lead's next event on top
/// of the prefilled state rather than from nothing.
#[test]
fn a_service_started_over_prefilled_state_scores_on_top_of_it() {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = Names::new();
    broker.create_topics(&names.all(), 4);
    let env = [
        ("LEADSCORE__REDIS__KEY_PREFIX", names.prefix.as_str()),
        ("LEADSCORE__KAFKA__TOPICS__WEB", names.web.as_str()),
        ("LEADSCORE__KAFKA__TOPICS__ADPIXEL", names.adpixel.as_str()),
        ("LEADSCORE__KAFKA__TOPICS__EMAIL", names.email.as_str()),
        ("LEADSCORE__KAFKA__TOPICS__CRM", names.crm.as_str()),
    ];
    let args = [
        "--mode",
        "prefill-state",
        "--leads",
        "400",
        "--partitions",
        "4",
    ];
    let (ok, stdout, stderr) = loadgen_with(&args, &redis, &env);
    assert!(ok, "{stdout}{stderr}");
    // An identified lead of shard 0 whose prefilled event counted for a rule.
    let engine = Engine::new(Arc::new(Rules::default_rules()), EngineConfig::default());
    let counted = |blob: &[u8]| -> u32 {
        engine
            .decode(blob)
            .unwrap()
            .rules
            .iter()
            .map(|r| r.count)
            .sum()
    };
    let (key, before) = redis
        .leads(&names.prefix)
        .into_iter()
        .find(|(k, v)| k.starts_with("{p0}:l:") && counted(v) > 0)
        .expect("a counted lead on shard 0");
    let id = key.trim_start_matches("{p0}:l:").to_owned();
    let service = Service::start(&broker, &redis, &names, &[]);
    let event = serde_json::json!({
        "event_id": "after-restart",
        "lead_id": id,
        "occurred_at": leadscore::event::format_rfc3339(leadscore::event::wall_clock_ms()),
        "type": "form_submit",
    });
    broker.produce_msgs(
        &names,
        &[(0, 0, id.clone(), event.to_string().into_bytes())],
    );
    service.wait_consumed(1, Duration::from_secs(60));
    service.wait_settled(Duration::from_secs(60));
    let after = redis
        .lead(&names.prefix, &id)
        .expect("the lead is still stored");
    assert_eq!(
        counted(&after),
        counted(&before) + 1,
        "the new event is counted on top of the prefilled one"
    );
    assert!(service.terminate().success());
}

#[test]
fn the_latency_mode_measures_the_service_on_the_in_process_broker() {
    let redis = Redis::start();
    let (ok, stdout, stderr) = loadgen(
        &[
            "--mode",
            "latency",
            "--broker",
            "mock",
            "--rate",
            "2000",
            "--warmup",
            "2s",
            "--duration",
            "3s",
            "--leads",
            "2000",
            "--partitions",
            "2",
        ],
        &redis,
    );
    assert!(ok, "{stdout}{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("latency:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("p99.9"), "{line}");
    assert!(!line.contains(" 0 segment changes"), "{line}");
    // The service kept its state in that Redis.
    assert!(!redis.leads("leadscore:").is_empty());
}
