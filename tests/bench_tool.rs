//! `countersign bench` against the real server: the reports have the right shape and
//! counts. Timings are never asserted; the runs are kept short.

mod common;

use std::path::Path;
use std::process::Command;

use common::TestServer;
use countersign::auth::{TokenConfig, TokenEntry, token_hash};
use countersign::bench::{LoadReport, RefusalFloodReport, ReviewLoopReport};
use countersign::config::AuthSettings;
use countersign::domain::PrincipalKind;

const PIPELINE_TOKEN: &str = "bench-pipeline-token-0123456789abcdef0123456789";

/// Runs `countersign bench ARGS --json` and parses its one line of JSON.
async fn bench_json<T: serde::de::DeserializeOwned + Send + 'static>(args: Vec<String>) -> T {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_countersign"))
            .arg("bench")
            .args(&args)
            .arg("--json")
            .output()
            .expect("countersign runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "bench failed: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    })
    .await
    .expect("bench thread")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn server_url(server: &TestServer) -> String {
    format!("http://{}", server.addr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_reports_baseline_and_every_path_of_the_mix() {
    let server = TestServer::start().await;
    let url = server_url(&server);
    let report: LoadReport = bench_json(args(&[
        "--server",
        &url,
        "--connections",
        "2",
        "--in-flight",
        "6",
        "--duration",
        "700ms",
        "--warmup",
        "100ms",
        "--mix",
        "allow=1,deny=1,pending=1",
        "--baseline",
    ]))
    .await;

    let baseline = report.baseline.as_ref().expect("a baseline run");
    assert_eq!(baseline.rpc, "grpc.health.v1.Health/Check");
    assert!(baseline.requests > 0);
    assert_eq!(baseline.ok, baseline.requests);
    assert!(baseline.errors.is_empty(), "{:?}", baseline.errors);

    let check = &report.check_action;
    assert_eq!(check.rpc, "countersign.v1.ActionGate/CheckAction");
    assert!(check.requests > 0);
    assert_eq!(check.ok, check.requests, "errors: {:?}", check.errors);
    assert_eq!(check.latency.count, check.requests);
    assert_eq!(check.unexpected_status, 0, "{:?}", check.statuses);
    for status in [
        "ACTION_STATUS_ALLOWED",
        "ACTION_STATUS_DENIED",
        "ACTION_STATUS_PENDING",
    ] {
        assert!(
            check.statuses.get(status).is_some_and(|n| *n > 0),
            "{:?}",
            check.statuses
        );
    }
    assert_eq!(check.statuses.values().sum::<u64>(), check.ok);
    let paths: Vec<&str> = check.latency_by_path.keys().map(String::as_str).collect();
    assert_eq!(paths, ["allow", "deny", "pending"]);
    assert!(report.ratio_to_baseline.is_some_and(|r| r > 0.0));
    assert_eq!((report.connections, report.in_flight), (2, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_baseline_there_is_no_ratio() {
    let server = TestServer::start().await;
    let url = server_url(&server);
    let report: LoadReport = bench_json(args(&[
        "--server",
        &url,
        "--connections",
        "1",
        "--in-flight",
        "2",
        "--duration",
        "300ms",
        "--warmup",
        "0s",
        "--mix",
        "allow=1",
    ]))
    .await;
    assert!(report.baseline.is_none() && report.ratio_to_baseline.is_none());
    let check = &report.check_action;
    assert_eq!(check.ok, check.requests);
    assert_eq!(
        check.statuses.keys().collect::<Vec<_>>(),
        ["ACTION_STATUS_ALLOWED"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_review_loop_approves_and_wakes_every_waiter() {
    let server = TestServer::start().await;
    let url = server_url(&server);
    let report: ReviewLoopReport = bench_json(args(&[
        "review-loop",
        "--server",
        &url,
        "--waiters",
        "30",
        "--reviewers",
        "3",
        "--approvals-per-second",
        "0",
        "--settle",
        "200ms",
    ]))
    .await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        (report.created, report.approvals, report.woken),
        (30, 30, 30)
    );
    // Every reviewer's stream delivered every pending action of the run.
    assert_eq!(report.streamed, 30 * 3);
    assert_eq!(report.wake_latency.count, 30);
    assert_eq!(report.approve_latency.count, 30);
    assert!(report.server_rss_kib.is_none());

    // The actions really are approved, by the reviewers of the run.
    let records = common::read_events(&server, "").await;
    let approved = records
        .iter()
        .filter(|e| e.kind == "action.approved")
        .count();
    assert_eq!(approved, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_review_loop_reports_the_server_memory_when_given_its_pid() {
    // The server runs in this test's process, so its memory is ours.
    let server = TestServer::start().await;
    let url = server_url(&server);
    let pid = std::process::id().to_string();
    let report: ReviewLoopReport = bench_json(args(&[
        "review-loop",
        "--server",
        &url,
        "--waiters",
        "5",
        "--reviewers",
        "1",
        "--settle",
        "50ms",
        "--approvals-per-second",
        "1000",
        "--server-pid",
        &pid,
    ]))
    .await;
    assert_eq!(report.woken, 5);
    let (rss, peak) = (
        report.server_rss_kib.unwrap(),
        report.server_peak_rss_kib.unwrap(),
    );
    assert!(rss > 0 && peak >= rss, "{rss} {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_authenticates_the_load_on_a_server_with_auth() {
    let tokens = TokenConfig {
        tokens: vec![TokenEntry {
            name: Some("bench".into()),
            sha256: token_hash(PIPELINE_TOKEN),
            principal: "pipeline".into(),
            kind: PrincipalKind::Agent,
            groups: vec![],
        }],
    };
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::try_start_with_auth(AuthSettings::Credentials {
        jwt: None,
        tokens: Some(tokens),
        mtls: None,
        base_dir: dir.path().to_path_buf(),
    })
    .await
    .unwrap();
    let url = server_url(&server);
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{PIPELINE_TOKEN}\n")).unwrap();
    let token = token.to_str().unwrap().to_string();
    let common = [
        "--server",
        &url,
        "--in-flight",
        "2",
        "--duration",
        "300ms",
        "--warmup",
        "0s",
        "--mix",
        "deny=1",
    ];

    let mut with_token = args(&common);
    with_token.extend(args(&["--token-file", &token]));
    let report: LoadReport = bench_json(with_token).await;
    let check = &report.check_action;
    assert!(
        check.requests > 0 && check.ok == check.requests,
        "{:?}",
        check.errors
    );

    // Development headers are ignored there: every call is refused, and counted by code.
    let report: LoadReport = bench_json(args(&common)).await;
    let check = &report.check_action;
    assert_eq!(check.ok, 0);
    assert_eq!(check.errors.get("UNAUTHENTICATED"), Some(&check.requests));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_log_writes_a_log_the_server_starts_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("log");
    let data = data.to_str().unwrap();
    let policies = common::shipped_policies();
    let policies = policies.to_str().unwrap();
    let filled: serde_json::Value = bench_json(args(&[
        "fill-log",
        "--data-dir",
        data,
        "--events",
        "400",
        "--policies",
        policies,
        "--in-flight",
        "16",
    ]))
    .await;
    assert_eq!(filled["events_appended"], 400);
    assert_eq!(filled["head_sequence"], 400);

    let started: serde_json::Value = bench_json(args(&[
        "startup",
        "--data-dir",
        data,
        "--policies",
        policies,
        "--repeat",
        "2",
    ]))
    .await;
    // fill-log stops like a server: with a checkpoint at its head, and the event for it.
    assert_eq!(started["events"], 401);
    assert_eq!(started["actions"], 200);
    assert_eq!(
        started["seconds_to_serving"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(started["from_checkpoint"], serde_json::json!([400, 400]));
    assert_eq!(started["events_replayed"], serde_json::json!([1, 1]));

    let whole: serde_json::Value = bench_json(args(&[
        "startup",
        "--data-dir",
        data,
        "--policies",
        policies,
        "--no-checkpoint",
    ]))
    .await;
    assert_eq!(whole["from_checkpoint"], serde_json::json!([null]));
    assert_eq!(whole["events_replayed"], serde_json::json!([401]));
    assert_eq!(whole["actions"], 200);
    assert!(Path::new(data).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refusal_flood_reports_the_answers_and_what_the_log_grew_by() {
    let server = TestServer::start().await;
    let url = server_url(&server);
    let report: RefusalFloodReport = bench_json(args(&[
        "refusal-flood",
        "--server",
        &url,
        "--refusals",
        "60",
        "--in-flight",
        "4",
    ]))
    .await;
    assert_eq!(report.refusals_sent, 60);
    assert_eq!(
        report.answers.get("PermissionDenied"),
        Some(&60),
        "{:?}",
        report.answers
    );
    // The first refusal at once; the other 59 wait in their window for a summary.
    assert_eq!(report.events_by_kind.get("review.refused"), Some(&1));
    assert_eq!(report.refusals_recorded, 1);
    assert_eq!(report.events_written, 1, "{:?}", report.events_by_kind);
    assert!(report.bytes_written > 0 && report.bytes_written < 2048);
    assert_eq!(report.head_after, report.head_before + 1);
}
