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
        "[kafka]\nbrokers = \"\"\ngroup_id = 42\n[redis]\nflush_interval_ms = 0\nurl = \"http://x\"\n[http]\nlisten = \"everywhere\"\n",
    )
    .unwrap();
    let (code, _, stderr) = leadscore(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    for needle in [
        "kafka.group_id",
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
