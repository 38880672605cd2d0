//! Settings: loading, validation and the messages a user reads.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn defaults_are_valid() {
    let loaded = Settings::load(None, env(&[])).unwrap();
    assert_eq!(loaded.settings.kafka.topics.web, "events.web");
}

#[test]
fn file_then_env_override() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[kafka]\nbrokers = \"b:1\"\ngroup_id = \"g\"\n[redis]\nflush_interval_ms = 50\n",
    )
    .unwrap();
    let loaded = Settings::load(
        Some(&path),
        env(&[
            ("LEADSCORE__KAFKA__GROUP_ID", "123"),
            ("LEADSCORE__KAFKA__CONSUMER__SECURITY_PROTOCOL", "SASL_SSL"),
            (
                "LEADSCORE__KAFKA__CONSUMER__SASL_MECHANISMS",
                "SCRAM-SHA-512",
            ),
            ("LEADSCORE__KAFKA__CONSUMER__SASL_USERNAME", "leadscore"),
            ("LEADSCORE__KAFKA__CONSUMER__SASL_PASSWORD", "hunter2"),
            ("LEADSCORE__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "30000"),
            ("LEADSCORE__REDIS__URL", "redis://:pw@host:6379/1"),
            ("OTHER", "ignored"),
        ]),
    )
    .unwrap();
    let s = &loaded.settings;
    assert_eq!(s.kafka.brokers, "b:1");
    assert_eq!(s.kafka.group_id, "123");
    assert_eq!(s.redis.flush_interval_ms, 50);
    assert_eq!(s.kafka.consumer["security.protocol"], "SASL_SSL");
    assert_eq!(s.kafka.consumer["session.timeout.ms"], "30000");
    let printed = s.to_masked_toml();
    assert!(
        !printed.contains("hunter2") && !printed.contains(":pw@"),
        "{printed}"
    );
    assert!(printed.contains("SASL_SSL"));
}

#[test]
fn every_problem_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[kafka]\nbrokerz = \"x\"\n[redis]\nflush_interval_ms = \"soon\"\n[http]\nlisten = \"nowhere\"\n[bogus]\nx = 1\n",
    )
    .unwrap();
    let err = Settings::load(
        Some(&path),
        env(&[("LEADSCORE__SHUTDOWN__DRAIN_TIMEOUT_MS", "99999999")]),
    )
    .unwrap_err();
    let text = err.to_string();
    for needle in [
        "kafka",
        "brokerz",
        "redis.flush_interval_ms",
        "http.listen",
        "bogus: unknown section",
        "shutdown.drain_timeout_ms",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

/// Limits that only a unit mistake reaches are refused with the setting
/// named (user probes started with each; the registry's 0 held every Avro
/// input).
#[test]
fn limits_only_a_unit_mistake_reaches_are_refused() {
    let err = Settings::load(
        None,
        env(&[
            ("LEADSCORE__SCHEMA_REGISTRY__TIMEOUT_MS", "0"),
            ("LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS", "172800000"),
            ("LEADSCORE__STATE__MAX_MEMORY_MB", "18446744073709551615"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("schema_registry.timeout_ms"), "{err}");
    assert!(
        err.contains("event_time.idle_timeout_ms: at most 1 day"),
        "{err}"
    );
    assert!(
        err.contains("state.max_memory_mb: must be 1..=16777216"),
        "{err}"
    );
    Settings::load(
        None,
        env(&[("LEADSCORE__EVENT_TIME__IDLE_TIMEOUT_MS", "86400000")]),
    )
    .unwrap();
}

/// The state format a rolling upgrade writes: 3, 4 and 5 are taken, any
/// other is refused with the setting named (not started with a format
/// no member reads).
#[test]
fn the_state_format_is_3_4_or_5() {
    for (v, ok) in [
        ("3", true),
        ("4", true),
        ("5", true),
        ("2", false),
        ("6", false),
    ] {
        let loaded = Settings::load(None, env(&[("LEADSCORE__STATE__FORMAT_VERSION", v)]));
        match loaded {
            Ok(l) => {
                assert!(ok, "format {v} was taken");
                assert_eq!(l.settings.state.format_version.to_string(), v);
            }
            Err(e) => {
                assert!(!ok, "format {v} was refused: {e}");
                assert!(
                    e.to_string()
                        .contains("state.format_version: must be 3, 4 or 5"),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn a_drain_must_fit_in_half_the_poll_interval() {
    let err = Settings::load(
        None,
        env(&[
            ("LEADSCORE__KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS", "8000"),
            // librdkafka wants the session within the poll interval.
            ("LEADSCORE__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("shutdown.drain_timeout_ms (20000): must be at most half the consumer max.poll.interval.ms (8000)"),
        "{err}"
    );
    Settings::load(
        None,
        env(&[
            ("LEADSCORE__KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS", "8000"),
            ("LEADSCORE__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
            ("LEADSCORE__SHUTDOWN__DRAIN_TIMEOUT_MS", "4000"),
        ]),
    )
    .unwrap();
}

#[test]
fn owned_properties_cannot_be_overridden() {
    let err = Settings::load(
        None,
        env(&[("LEADSCORE__KAFKA__CONSUMER__ENABLE_AUTO_COMMIT", "true")]),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("kafka.consumer.enable.auto.commit")
    );
}

#[test]
fn librdkafka_properties_it_would_refuse_are_reported_before_start() {
    let err = Settings::load(
        None,
        env(&[
            ("LEADSCORE__KAFKA__CONSUMER__NO_SUCH_PROP", "1"),
            ("LEADSCORE__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "abc"),
            ("LEADSCORE__KAFKA__PRODUCER__LINGER_MS", "5"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("kafka.consumer.no.such.prop: No such configuration property"),
        "{err}"
    );
    assert!(
        err.contains("kafka.consumer.session.timeout.ms: Invalid value"),
        "{err}"
    );
    assert!(!err.contains("linger"), "{err}");
}

/// Properties librdkafka takes one at a time but not together, or that
/// leadscore cannot work with, fail the check, not the first produce (a
/// user probe: `check-config` passed them, `run` then died).
#[test]
fn properties_that_fail_only_together_or_at_the_first_send_are_reported_before_start() {
    let problems = |vars: &[(&str, &str)]| match Settings::load(None, env(vars)) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let err = problems(&[("LEADSCORE__KAFKA__PRODUCER__ACKS", "0")]);
    assert!(
        err.contains("the kafka.producer properties together: ") && err.contains("acks"),
        "{err}"
    );
    let err = problems(&[("LEADSCORE__KAFKA__PRODUCER__TRANSACTIONAL_ID", "x")]);
    assert!(
        err.contains("kafka.producer.transactional.id: leadscore does not use Kafka transactions"),
        "{err}"
    );
    // A mechanism this build has no provider for.
    let err = problems(&[
        (
            "LEADSCORE__KAFKA__CONSUMER__SECURITY_PROTOCOL",
            "SASL_PLAINTEXT",
        ),
        ("LEADSCORE__KAFKA__CONSUMER__SASL_MECHANISMS", "GSSAPI"),
    ]);
    assert!(
        err.contains("the kafka.consumer properties together: ") && err.contains("GSSAPI"),
        "{err}"
    );
    assert!(!err.contains("(set by"), "no one variable set it: {err}");
    // What the clients take is still taken.
    assert_eq!(problems(&[("LEADSCORE__KAFKA__PRODUCER__ACKS", "all")]), "");
}

/// A token from a Secret made with `echo` ends with a newline that no
/// client can send: refused, not a service that answers 401 to everyone.
#[test]
fn an_auth_token_with_surrounding_whitespace_is_refused() {
    let err = Settings::load(
        None,
        env(&[("LEADSCORE__HTTP__AUTH_TOKEN", "0123456789abcdef0123\n")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("http.auth_token: starts or ends with whitespace"),
        "{err}"
    );
    assert!(
        !err.contains("0123456789abcdef"),
        "the token is not printed: {err}"
    );
    Settings::load(
        None,
        env(&[("LEADSCORE__HTTP__AUTH_TOKEN", "0123456789abcdef0123")]),
    )
    .unwrap();
}

#[test]
fn a_fraction_for_a_whole_number_and_a_duration_without_unit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[redis]\ntimeout_ms = 1.5\nflush_interval_ms = 250.0\n[state]\nretention = 3600\nexpire_below = 2\n",
    )
    .unwrap();
    let err = Settings::load(Some(&path), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("redis.timeout_ms: must be a whole number, got 1.5"),
        "{err}"
    );
    assert!(
        err.contains("state.retention: \"3600\" is not a duration: time unit needed"),
        "{err}"
    );
    // A whole number written with `.0`, and an integer for a fraction, are fine.
    assert!(!err.contains("flush_interval_ms"), "{err}");
    assert!(!err.contains("expire_below"), "{err}");

    std::fs::write(&path, "[state]\nretention = \"12h\"\n").unwrap();
    let loaded = Settings::load(Some(&path), env(&[])).unwrap();
    assert_eq!(loaded.settings.state.retention.as_secs(), 12 * 3600);
}

#[test]
fn a_value_that_is_not_an_option_names_the_options() {
    for (var, value, want) in [
        (
            "LEADSCORE__LOG__FORMAT",
            "xml",
            "log.format: \"xml\" is not one of: text, json",
        ),
        (
            "LEADSCORE__STATE__BACKEND",
            "disk",
            "state.backend: \"disk\" is not one of: redis, memory",
        ),
        (
            "LEADSCORE__REDIS__MODE",
            "sentinel",
            "redis.mode: \"sentinel\" is not one of: single, cluster",
        ),
        (
            "LEADSCORE__KAFKA__FORMATS__WEB",
            "xml",
            "kafka.formats.web: \"xml\" is not one of: json, avro, avro-registry",
        ),
    ] {
        let err = Settings::load(None, env(&[(var, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    // What check-config prints reads back as the same values.
    let mut s = Settings::default();
    s.log.format = LogFormat::Json;
    s.state.backend = Backend::Memory;
    s.redis.mode = RedisMode::Cluster;
    s.kafka.formats.web = crate::decode::Format::AvroRegistry;
    s.schema_registry.url = Some("http://registry:8081".into());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, s.to_masked_toml()).unwrap();
    let text = s.to_masked_toml();
    assert!(text.contains("retention = \"180days\""), "{text}");
    let back = Settings::load(Some(path.as_path()), env(&[]))
        .unwrap()
        .settings;
    assert_eq!(back.state.retention, s.state.retention);
    assert_eq!(back.log.format, LogFormat::Json);
    assert_eq!(back.state.backend, Backend::Memory);
    assert_eq!(back.redis.mode, RedisMode::Cluster);
    assert_eq!(back.kafka.formats.web, crate::decode::Format::AvroRegistry);
}

#[test]
fn an_unreadable_config_file_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let err = Settings::load(Some(&missing), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read the config file: No such file"),
        "{err}"
    );
    let err = Settings::load(Some(dir.path()), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read the config file: it is a directory"),
        "{err}"
    );
}

#[test]
fn a_problem_with_a_value_from_the_environment_names_the_variable() {
    let err = Settings::load(
        None,
        env(&[
            ("LEADSCORE__FOO__BAR", "1"),
            ("LEADSCORE__KAFKA__NONSENSE", "1"),
            ("LEADSCORE__REDIS__FLUSH_INTERVAL_MS", "0"),
            ("LEADSCORE__KAFKA__CONSUMER__NO_SUCH_PROP", "1"),
        ]),
    )
    .unwrap_err()
    .to_string();
    for needle in [
        "foo: unknown section",
        "(set by LEADSCORE__FOO__BAR)",
        "(set by LEADSCORE__KAFKA__NONSENSE)",
        "redis.flush_interval_ms: must be 1..=60000 (set by LEADSCORE__REDIS__FLUSH_INTERVAL_MS)",
        "(set by LEADSCORE__KAFKA__CONSUMER__NO_SUCH_PROP)",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // A problem with a value from the file names no variable.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[redis]\nflush_interval_ms = 0\n").unwrap();
    let err = Settings::load(Some(path.as_path()), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("redis.flush_interval_ms") && !err.contains("set by"),
        "{err}"
    );
}

#[test]
fn a_list_of_redis_urls_needs_cluster_mode() {
    let list = "redis://a:6379/0,redis://b:6379/0";
    let err = Settings::load(None, env(&[("LEADSCORE__REDIS__URL", list)]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("set redis.mode = \"cluster\""), "{err}");
    let cluster = Settings::load(
        None,
        env(&[
            ("LEADSCORE__REDIS__URL", list),
            ("LEADSCORE__REDIS__MODE", "cluster"),
        ]),
    );
    assert!(
        cluster.is_ok(),
        "{:?}",
        cluster.err().map(|e| e.to_string())
    );
    // A comma in a password is not a list.
    let single = Settings::load(
        None,
        env(&[("LEADSCORE__REDIS__URL", "redis://:ab,cd@redis:6379/0")]),
    );
    assert!(single.is_ok(), "{:?}", single.err().map(|e| e.to_string()));
}

#[test]
fn a_log_level_that_is_not_a_level_is_refused() {
    for bad in ["warning", "verbose", "info,debg", "leadscore"] {
        let err = Settings::load(None, env(&[("LEADSCORE__LOG__LEVEL", bad)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("log.level:") && err.contains("is not a level"),
            "{bad}: {err}"
        );
    }
    for good in [
        "warn",
        "INFO",
        "info,leadscore=debug",
        "off",
        "rdkafka=error,info",
        "3",
    ] {
        let loaded = Settings::load(None, env(&[("LEADSCORE__LOG__LEVEL", good)]));
        assert!(
            loaded.is_ok(),
            "{good}: {:?}",
            loaded.err().map(|e| e.to_string())
        );
    }
}

#[test]
fn bad_rules_file_reports_all_rule_problems() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("r.toml");
    std::fs::write(&rules, "version = \"\"\nsegments = []\n[decay]\nhalf_life = \"1d\"\n[handoff]\nmin_score = 1\nrearm_below = 2\n").unwrap();
    let err = Settings::load(
        None,
        env(&[("LEADSCORE__SCORING__RULES_FILE", rules.to_str().unwrap())]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("version") && err.contains("rearm_below"),
        "{err}"
    );
}

#[test]
fn tls_files_need_a_rediss_url() {
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let err = Settings::load(None, env(&[("LEADSCORE__REDIS__TLS_CA_FILE", ca)]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS needs rediss:// URLs"), "{err}");
    let tls = Settings::load(
        None,
        env(&[
            ("LEADSCORE__REDIS__TLS_CA_FILE", ca),
            ("LEADSCORE__REDIS__URL", "rediss://redis:6380/0"),
        ]),
    );
    assert!(tls.is_ok(), "{:?}", tls.err().map(|e| e.to_string()));
}
