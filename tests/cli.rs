//! The command line: `check-config` names every invalid setting and masks secrets.

use std::process::Command;

fn leadscore(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_leadscore"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_effective_settings_with_secrets_masked() {
    let (code, stdout, stderr) = leadscore(
        &["check-config", "--config", "config/leadscore.example.toml"],
        &[
            ("LEADSCORE__KAFKA__CONSUMER__SASL_PASSWORD", "s3cret"),
            ("LEADSCORE__REDIS__URL", "redis://:hunter2@redis:6379/0"),
            ("LEADSCORE__REDIS__FLUSH_INTERVAL_MS", "75"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("flush_interval_ms = 75"), "{stdout}");
    assert!(
        stdout.contains("\"sasl.password\" = \"********\""),
        "{stdout}"
    );
    assert!(
        !stdout.contains("s3cret") && !stdout.contains("hunter2"),
        "{stdout}"
    );
}

#[test]
fn check_config_names_every_invalid_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[kafka]\nbrokers = \"\"\nbatch_max_messages = \"many\"\nnonsense = 1\n[redis]\nflush_interval_ms = 0\nurl = \"http://x\"\n[http]\nlisten = \"everywhere\"\n",
    )
    .unwrap();
    let (code, _, stderr) = leadscore(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    // A type error and an unknown key in one section do not hide that
    // section's other problems.
    for needle in [
        "kafka.batch_max_messages",
        "kafka.nonsense",
        "kafka.brokers",
        "redis.flush_interval_ms",
        "redis.url",
        "http.listen",
    ] {
        assert!(stderr.contains(needle), "missing {needle} in:\n{stderr}");
    }
}

#[test]
fn run_with_a_missing_config_file_fails_clearly() {
    let (code, _, stderr) = leadscore(&["run", "--config", "/nonexistent/leadscore.toml"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/leadscore.toml"), "{stderr}");
}

#[test]
fn replay_prints_outputs_and_compares_rules() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    let lines = [
        r#"{"source":"crm","event_id":"p","lead_id":"a","occurred_at":"2026-11-22T09:00:00Z","type":"profile_updated","attributes":{"industry":"events","budget":"9000"}}"#,
        r#"{"source":"web","event_id":"1","lead_id":"a","occurred_at":"2026-11-22T10:00:00Z","type":"page_view","attributes":{"url":"/pricing"}}"#,
        r#"{"source":"web","event_id":"2","lead_id":"a","occurred_at":"2026-11-22T10:01:00Z","type":"booking_abandoned"}"#,
        r#"{"source":"web","event_id":"2b","lead_id":"a","occurred_at":"2026-11-22T10:01:30Z","type":"form_submit"}"#,
        r#"{"source":"web","event_id":"3","lead_id":"b","occurred_at":"2026-11-22T10:02:00Z","type":"booking_started"}"#,
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let strict = dir.path().join("strict.toml");
    let text = std::fs::read_to_string("config/rules.default.toml")
        .unwrap()
        .replace("enter = 25.0", "enter = 30.0")
        .replace("version = \"default-2026.11.2\"", "version = \"strict-1\"");
    std::fs::write(&strict, text).unwrap();
    let (code, stdout, stderr) = leadscore(
        &[
            "replay",
            "--input",
            input.to_str().unwrap(),
            "--compare",
            strict.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let out: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let segments: Vec<_> = out.iter().filter_map(|v| v["segment"].as_str()).collect();
    assert!(segments.contains(&"hot"), "{stdout}");
    assert!(
        out.iter().any(|v| v["crossing_signal"] == "form_submit"),
        "a hand-off: {stdout}"
    );
    let report = &out.last().unwrap()["compare"];
    assert_eq!(report["other_rules_version"], "strict-1");
    assert_eq!(report["different_segment"], 1, "{report}");
    assert_eq!(report["leads_moved"][0]["lead_id"], "b");
    assert_eq!(report["leads_moved"][0]["segment"], "warm");
    assert_eq!(report["leads_moved"][0]["other_segment"], "cold");
}

/// `--input -` reads standard input, and a byte order mark before the
/// first event (an editor's "UTF-8 with BOM") is not part of it: the same
/// outputs as the file without the mark, and nothing rejected.
#[test]
fn replay_reads_standard_input_and_skips_a_byte_order_mark() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    let text = [
        r#"{"source":"web","event_id":"1","lead_id":"a","occurred_at":"2026-11-22T10:00:00Z","type":"booking_abandoned"}"#,
        r#"{"source":"web","event_id":"2","lead_id":"a","occurred_at":"2026-11-22T10:01:00Z","type":"form_submit"}"#,
    ]
    .join("\n");
    std::fs::write(&input, &text).unwrap();
    let (code, from_file, stderr) = leadscore(&["replay", "--input", input.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!from_file.is_empty());
    let mut child = Command::new(env!("CARGO_BIN_EXE_leadscore"))
        .args(["replay", "--input", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all("\u{feff}".as_bytes()).unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("rejected"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), from_file);
}

/// The load generator refuses nonsense counts, and says so when the broker
/// is not there instead of waiting without a word.
#[test]
fn loadgen_refuses_zero_leads_and_names_an_unreachable_broker() {
    let (code, _, stderr) = leadscore(&["loadgen", "--mode", "prefill", "--leads", "0"], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--leads must be at least 1"), "{stderr}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let brokers = format!("127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let (code, _, stderr) = leadscore(
        &[
            "loadgen",
            "--mode",
            "prefill",
            "--brokers",
            &brokers,
            "--events",
            "10",
        ],
        &[("LEADSCORE__LOG__LEVEL", "off")],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("cannot create topics on {brokers}")),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(40));
}

#[test]
fn replay_fails_early_and_with_the_exit_codes_of_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    std::fs::write(
        &input,
        r#"{"source":"web","event_id":"1","lead_id":"a","occurred_at":"2026-11-22T10:00:00Z","type":"page_view","attributes":{"url":"/pricing"}}"#,
    )
    .unwrap();
    let input = input.to_str().unwrap();
    // Rules to compare with that cannot be read or compiled: invalid
    // configuration (2, as a bad scoring.rules_file), nothing scored first.
    let (code, stdout, stderr) =
        leadscore(&["replay", "--input", input, "--compare", "nope.toml"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty(), "scored before failing: {stdout}");
    assert!(stderr.contains("--compare: nope.toml"), "{stderr}");
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[[segments]]\nname = 3\n").unwrap();
    let (code, stdout, stderr) = leadscore(
        &[
            "replay",
            "--input",
            input,
            "--compare",
            broken.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty(), "scored before failing: {stdout}");
    assert!(stderr.contains("broken.toml"), "{stderr}");
    // Invalid settings: 2, as for run and check-config.
    let (code, _, stderr) = leadscore(
        &["replay", "--input", input],
        &[("LEADSCORE__LOG__FORMAT", "xml")],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("log.format"), "{stderr}");
    // A file of which no line can be scored is a failure, not an empty result.
    let bad = dir.path().join("bad.ndjson");
    std::fs::write(&bad, "not json\n{\"source\":\"mail\"}\n\n").unwrap();
    let (code, _, stderr) = leadscore(&["replay", "--input", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("no line of") && stderr.contains("line 2: rejected"),
        "{stderr}"
    );
}

#[test]
fn check_config_refuses_what_would_silence_the_log_or_stop_the_client() {
    let (code, _, stderr) = leadscore(
        &["check-config"],
        &[
            // `tracing` would read it as a target and log nothing else.
            ("LEADSCORE__LOG__LEVEL", "warning"),
            // librdkafka would refuse it when the service starts.
            ("LEADSCORE__KAFKA__PRODUCER__NO_SUCH_PROP", "1"),
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("log.level: \"warning\" is not a level"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kafka.producer.no.such.prop: No such configuration property"),
        "{stderr}"
    );
}

/// `demo --listen` on an address it cannot have stops at once and says so,
/// rather than serving somewhere else without a word (it fell back to a
/// free port on 127.0.0.1, dropping an asked-for 0.0.0.0).
#[test]
fn demo_refuses_a_listen_address_it_cannot_have() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) = leadscore(&["demo", "--listen", &addr], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("--listen {addr}: cannot listen there")),
        "{stderr}"
    );
}
