//! The `countersign` binary as an operator runs it.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn countersign() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_countersign"));
    command.env_remove("RUST_LOG");
    command
}

/// Runs `serve` expecting it to refuse, and returns its stderr.
fn refused(args: &[&str]) -> String {
    let output = countersign()
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("binary runs");
    assert_eq!(output.status.code(), Some(2), "serve must refuse");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn an_invalid_policy_file_is_refused_at_start_with_file_rule_and_problem() {
    let policies = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    common::write_policy(
        policies.path(),
        "broken.yaml",
        r#"
rules:
  - name: typo-in-variable
    expression: acton.type == "db.drop"
    message: Misspelled.
    risk: high
    effect: deny
"#,
    );

    let stderr = refused(&[
        "--policies",
        policies.path().to_str().unwrap(),
        "--data-dir",
        data.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);

    assert!(stderr.contains("broken.yaml"), "{stderr}");
    assert!(stderr.contains("typo-in-variable"), "{stderr}");
    assert!(stderr.contains("acton"), "{stderr}");
}

#[test]
fn a_policy_file_with_an_unknown_field_is_refused() {
    let policies = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    common::write_policy(
        policies.path(),
        "fields.yaml",
        "rules:\n  - name: r\n    expression: 'true'\n    risk: low\n    effect: allow\n    efect: deny\n",
    );

    let stderr = refused(&[
        "--policies",
        policies.path().to_str().unwrap(),
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);

    assert!(stderr.contains("fields.yaml"), "{stderr}");
    assert!(stderr.contains("efect"), "{stderr}");
}

#[test]
fn listening_beyond_loopback_without_authentication_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let stderr = refused(&[
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--policies",
        common::shipped_policies().to_str().unwrap(),
    ]);
    assert!(stderr.contains("loopback"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

#[tokio::test]
async fn the_binary_serves_health_and_stops_cleanly_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut command = countersign();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("COUNTERSIGN_DATA_DIR", data.path())
        .env("COUNTERSIGN_POLICIES", common::shipped_policies());
    let mut process = common::spawn_serve(command).await;
    assert!(
        process.startup_logs.contains("DEVELOPMENT IDENTITY MODE"),
        "{}",
        process.startup_logs
    );

    let mut health = HealthClient::new(common::channel_to(process.address).await);
    for service in [
        "",
        "countersign.v1.ActionGate",
        "countersign.v1.AuditService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service}");
    }

    let pid = process.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let exit = tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            if let Some(status) = process.child.try_wait().expect("wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(0),
        "graceful exit on SIGTERM"
    );
}

fn token_hash(stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = countersign()
        .arg("token-hash")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("writes the token");
    child.wait_with_output().expect("token-hash ends")
}

#[test]
fn token_hash_prints_the_sha256_the_config_wants() {
    let token = "k8Jq2m5Zp0Xw7Rt4Yb1Nc6Vd3Lf9Gh2Sa5Qe8Wu0Io=";
    let output = token_hash(&format!("  {token}\n"));
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        countersign::auth::token_hash(token)
    );
}

#[test]
fn token_hash_refuses_empty_and_short_tokens_without_echoing_them() {
    let long = format!("{}\n", "x".repeat(9 * 1024));
    for stdin in ["", "\n", "short-secret-1234\n", long.as_str()] {
        let output = token_hash(stdin);
        assert_eq!(output.status.code(), Some(2), "{stdin:?}");
        assert!(output.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("countersign: "), "{stderr}");
        assert!(!stderr.contains("short-secret"), "{stderr}");
    }
}
