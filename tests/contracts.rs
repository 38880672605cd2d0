//! The published contracts hold for what the service really sends: its
//! outputs, read back from the broker after a run over all four input topics,
//! validate against `schemas/*.schema.json` (with `scripts/check-contracts.py`,
//! jsonschema draft 2020-12 with format checks); so does `leadscore replay`'s
//! output for the sample file; the example downstream consumer handles a live
//! run's outputs and skips a redelivered one.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::{Broker, Names, Redis, Service, run_python};
use rdkafka::Message;

const PARTITIONS: i32 = 2;

/// `docs/examples/replay-scenario.ndjson` as (input index, key, payload without `source`).
fn sample_events() -> Vec<(usize, String, Vec<u8>)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/examples/replay-scenario.ndjson"
    ))
    .unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            let source = v.as_object_mut().unwrap().remove("source").unwrap();
            let input = ["web", "adpixel", "email", "crm"]
                .iter()
                .position(|s| source == *s)
                .unwrap();
            let key = v["lead_id"]
                .as_str()
                .or(v["anonymous_id"].as_str())
                .unwrap()
                .to_owned();
            (input, key, v.to_string().into_bytes())
        })
        .collect()
}

fn write_ndjson(dir: &tempfile::TempDir, name: &str, lines: &[Vec<u8>]) -> String {
    let path = dir.path().join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    for l in lines {
        f.write_all(l).unwrap();
        f.write_all(b"\n").unwrap();
    }
    path.to_str().unwrap().to_owned()
}

#[test]
fn live_outputs_match_the_json_schemas_and_the_example_consumer_handles_them() {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = Names::new();
    broker.create_topics(&names.all(), PARTITIONS);
    let service = Service::start(&broker, &redis, &names, &[]);

    // A skewed mix over the four topics, then the sample scenario (a hand-off,
    // an opt-out, a frequency cap, an anonymous visitor who identifies).
    let workload = common::skewed_workload(3_000, 300, PARTITIONS, 11);
    broker.produce_msgs(&names, &workload);
    let sample = sample_events();
    for (input, key, payload) in &sample {
        broker.produce(names.input(*input), &[(key.as_str(), payload.clone())]);
    }
    service.wait_consumed(
        (workload.len() + sample.len()) as u64,
        Duration::from_secs(120),
    );
    service.wait_settled(Duration::from_secs(60));

    let count = |topic: &str| -> usize {
        let (_, body) = service.get("/metrics").unwrap();
        body.lines()
            .filter(|l| {
                l.starts_with("leadscore_outputs_produced_total{")
                    && l.contains(&format!("topic=\"{topic}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as usize
    };
    let (n_changes, n_handoffs) = (count(&names.changes), count(&names.handoffs));
    assert!(n_changes > 100, "only {n_changes} segment changes");
    assert!(n_handoffs > 0, "no hand-offs");
    let changes = broker.read(
        &names.changes,
        PARTITIONS,
        n_changes,
        Duration::from_secs(60),
    );
    let handoffs = broker.read(
        &names.handoffs,
        PARTITIONS,
        n_handoffs,
        Duration::from_secs(60),
    );
    assert_eq!((changes.len(), handoffs.len()), (n_changes, n_handoffs));
    let payloads = |ms: &[rdkafka::message::OwnedMessage]| -> Vec<Vec<u8>> {
        ms.iter().map(|m| m.payload().unwrap().to_vec()).collect()
    };
    let segments: std::collections::BTreeSet<String> = changes
        .iter()
        .map(|m| common::json(m)["segment"].as_str().unwrap().to_owned())
        .collect();
    for expected in ["warm", "hot", "cold", "resting"] {
        assert!(
            segments.contains(expected),
            "no change to {expected}: {segments:?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let changes_file = write_ndjson(&dir, "changes.ndjson", &payloads(&changes));
    let handoffs_file = write_ndjson(&dir, "handoffs.ndjson", &payloads(&handoffs));
    let (code, out, err) = run_python(
        &[
            "scripts/check-contracts.py",
            "--changes",
            &changes_file,
            "--handoffs",
            &handoffs_file,
        ],
        None,
    );
    assert_eq!(code, 0, "check-contracts failed:\n{out}\n{err}");

    // A redelivery of one change, as a consumer may see after a producer retry.
    broker.produce(
        &names.changes,
        &[("dup", changes[0].payload().unwrap().to_vec())],
    );
    let total = n_changes + n_handoffs + 1;
    let (code, out, err) = run_python(
        &[
            "examples/downstream_consumer.py",
            "--brokers",
            &broker.brokers,
            "--group",
            &common::unique("mailer"),
            "--max-messages",
            &total.to_string(),
            "--changes-topic",
            &names.changes,
            "--handoffs-topic",
            &names.handoffs,
        ],
        None,
    );
    assert_eq!(code, 0, "downstream_consumer.py failed:\n{out}\n{err}");
    assert!(
        err.contains(&format!("handled {total} message(s)")),
        "{err}"
    );
    assert_eq!(
        err.matches("skipped").count(),
        1,
        "one duplicate skipped:\n{err}"
    );
    assert_eq!(err.matches("HAND-OFF").count(), n_handoffs, "{err}");
    assert!(!err.contains("unreadable"), "{err}");
}

#[test]
fn replay_output_and_the_documented_examples_match_the_json_schemas() {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/examples/replay-scenario.ndjson"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_leadscore"))
        .args(["replay", "--input", sample])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outputs = String::from_utf8(out.stdout).unwrap();
    let kinds: Vec<&str> = ["previous_segment", "crossing_signal"]
        .into_iter()
        .filter(|k| outputs.contains(k))
        .collect();
    assert_eq!(
        kinds.len(),
        2,
        "the sample gives changes and a hand-off:\n{outputs}"
    );
    // Without --skip-examples the script also checks every docs/examples/*.json.
    let (code, stdout, stderr) = run_python(
        &[
            "scripts/check-contracts.py",
            "--events",
            sample,
            "--outputs",
            "-",
        ],
        Some(outputs.as_bytes()),
    );
    assert_eq!(code, 0, "check-contracts failed:\n{stdout}\n{stderr}");

    // And the checker does reject what breaks the contract.
    let broken = outputs.replacen("\"reason\":\"event\"", "\"reason\":\"whim\"", 1);
    assert_ne!(broken, outputs);
    let (code, _, _) = run_python(
        &[
            "scripts/check-contracts.py",
            "--skip-examples",
            "--outputs",
            "-",
        ],
        Some(broken.as_bytes()),
    );
    assert_eq!(code, 1, "an unknown reason must fail the contract");

    // The documented outputs are what replay prints: every
    // `docs/examples/leads.*.json` and every output shown in contracts.md
    // (before 2026-12-07 they showed scores before rounding).
    let printed: std::collections::HashMap<String, serde_json::Value> = outputs
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["event_id"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut shown: Vec<(String, serde_json::Value)> = Vec::new();
    for entry in std::fs::read_dir(format!("{root}/docs/examples")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("leads.") && name.ends_with(".json") {
            let text = std::fs::read_to_string(&path).unwrap();
            shown.push((name, serde_json::from_str(&text).unwrap()));
        }
    }
    let contracts = std::fs::read_to_string(format!("{root}/docs/contracts.md")).unwrap();
    for block in contracts.split("```json\n").skip(1) {
        let text = block.split("```").next().unwrap();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(text)
            && v.get("rules_version").is_some()
        {
            shown.push(("docs/contracts.md".into(), v));
        }
    }
    assert!(shown.len() >= 10, "{} documented outputs", shown.len());
    for (whence, v) in &shown {
        let id = v["event_id"].as_str().unwrap();
        assert_eq!(
            Some(v),
            printed.get(id),
            "{whence}: {id} is not what replay prints"
        );
    }
}
