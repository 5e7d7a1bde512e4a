//! A log that lost its end, or contradicts what it once was, is never served as if whole:
//! events cut from a stopped server's log (as sled's recovery cuts at a damaged record),
//! with only the head witness or a checkpoint left to show it, refuse writes, fail
//! VerifyLog and show in /status and health, until an operator accepts the loss, which
//! the log then records; numbers of lost events are never given to new ones.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use common::{Caller, TestServer, Watchdog, check, server_status, shipped_policies, string};
use countersign::config::ServerConfig;
use countersign::proto::{self, ActionStatus, Verdict};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn with_status(config: &mut ServerConfig) {
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
}

/// No checkpoints: only the head witness can show a loss.
fn whole_log(config: &mut ServerConfig) {
    with_status(config);
    config.checkpoint_every = 0;
}

fn approve(action_id: &str) -> proto::SubmitReviewRequest {
    proto::SubmitReviewRequest {
        action_id: action_id.into(),
        verdict: Verdict::Approve as i32,
        reason: "looks right".into(),
        action_digest: String::new(),
    }
}

/// An allowed read (events 1-2), then an IAM grant that goes to review (3-4) and is
/// approved by bob (5) and carol (6, with the approval 7). Returns the grant's id.
async fn allowed_then_approved(server: &TestServer) -> String {
    let mut gate = server.gate(&Caller::agent("ops-bot")).await;
    gate.check_action(check("storage.object.read", "production", &[]))
        .await
        .unwrap();
    let grant = gate
        .check_action(check(
            "iam.role.grant",
            "production",
            &[("role", string("owner"))],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grant.status(), ActionStatus::Pending);
    server
        .review(&Caller::human("bob", "security"))
        .await
        .submit_review(approve(&grant.action_id))
        .await
        .unwrap();
    let decided = server
        .review(&Caller::human("carol", "security"))
        .await
        .submit_review(approve(&grant.action_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decided.action.unwrap().status(), ActionStatus::Approved);
    grant.action_id
}

/// Removes the events after `keep` from a stopped server's log and sets its head record
/// back to event `keep`, through sled itself: what sled's recovery leaves after cutting
/// its log at a damaged record. Returns the head before.
fn cut_tail(log: &Path, keep: u64) -> u64 {
    let db = sled::open(log).expect("open stopped server's log");
    let events = db.open_tree("events").unwrap();
    let meta = db.open_tree("meta").unwrap();
    let (last, _) = events.last().unwrap().expect("events");
    let head = u64::from_be_bytes(last.as_ref().try_into().unwrap());
    for sequence in keep + 1..=head {
        events.remove(sequence.to_be_bytes()).unwrap();
    }
    let kept = events.get(keep.to_be_bytes()).unwrap().expect("kept event");
    let mut record = keep.to_be_bytes().to_vec();
    record.extend_from_slice(&kept[..32]);
    meta.insert("head", record).unwrap();
    db.flush().unwrap();
    head
}

fn accept_loss(log: &Path, through: u64, reason: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_countersign"))
        .args(["log", "accept-loss", "--data-dir"])
        .arg(log)
        .args(["--through", &through.to_string(), "--reason", reason])
        .output()
        .expect("countersign runs")
}

async fn verify(server: &TestServer) -> proto::VerifyLogResponse {
    server
        .audit(&Caller::human("auditor", "auditors"))
        .await
        .verify_log(proto::VerifyLogRequest {})
        .await
        .expect("VerifyLog answers")
        .into_inner()
}

/// Everything that should say the log is damaged does, naming `missing`.
async fn refuses_and_says(server: &TestServer, missing: &str) {
    let refused = server
        .gate(&Caller::agent("ops-bot"))
        .await
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(missing), "{}", refused.message());

    let report = verify(server).await;
    assert!(!report.ok, "VerifyLog passed a damaged log");
    assert!(report.problem.contains(missing), "{}", report.problem);

    let status = server_status(server).await;
    assert_eq!(status["serving"], false, "{status}");
    let refusal = status["write_refusal"].as_str().unwrap_or_default();
    assert!(refusal.contains(missing), "{status}");
    assert_eq!(status["log"]["verification"]["state"], "failed", "{status}");

    assert_eq!(
        common::action_gate_health(server.channel().await).await,
        ServingStatus::NotServing
    );
}

#[tokio::test]
async fn a_log_cut_behind_its_head_witness_refuses_writes_until_the_loss_is_accepted() {
    let _watchdog = Watchdog::new("cut log test");
    let mut server = TestServer::start_with(shipped_policies(), whole_log).await;
    let grant = allowed_then_approved(&server).await;
    server.stop().await;
    let log = server.data.path().join("log");
    // carol's vote and the approval are lost: 7 events, 5 kept.
    let head = cut_tail(&log, 5);
    assert_eq!(head, 7);

    server.restart().await;
    let missing = "the log ends at 5 but the head witness records event 7";
    refuses_and_says(&server, missing).await;
    assert_eq!(verify(&server).await.first_bad_sequence, 6);
    // The approved grant reads as pending again, and cannot be voted on a second time.
    let mut reviewer = server.review(&Caller::human("carol", "security")).await;
    let vote = reviewer.submit_review(approve(&grant)).await.unwrap_err();
    assert_eq!(vote.code(), Code::FailedPrecondition, "{vote:?}");
    server.stop().await;

    // An operator accepts it; short of what the evidence shows is refused.
    let short = accept_loss(&log, 6, "ticket OPS-1");
    assert_eq!(short.status.code(), Some(2));
    let said = String::from_utf8_lossy(&short.stderr);
    assert!(said.contains("at least 7"), "{said}");
    let accepted = accept_loss(&log, 7, "ticket OPS-1: no backup holds events 6-7");
    assert!(accepted.status.success(), "{accepted:?}");

    server.restart().await;
    assert!(verify(&server).await.ok);
    let events = common::read_events(&server, "").await;
    let kinds: Vec<(u64, &str)> = events
        .iter()
        .map(|e| (e.sequence, e.kind.as_str()))
        .collect();
    assert_eq!(
        kinds[5..7],
        [(6, "log.loss_accepted"), (7, "log.sequence_lost")],
        "the acceptance takes the first lost number, and marks the rest"
    );
    let acceptance = format!("{:?}", events[5]);
    assert!(acceptance.contains("OPS-1"), "{acceptance}");
    assert!(
        acceptance.contains("head witness records event 7"),
        "{acceptance}"
    );
    // New events come after every lost number.
    let new = server
        .gate(&Caller::agent("ops-bot"))
        .await
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .expect("writes again")
        .into_inner();
    let new_events = common::read_events(&server, &new.action_id).await;
    assert!(new_events.iter().all(|e| e.sequence > 7), "{new_events:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_checkpoint_beyond_the_end_of_the_log_refuses_writes() {
    let _watchdog = Watchdog::new("checkpoint beyond the log test");
    let mut server = TestServer::start_with(shipped_policies(), with_status).await;
    allowed_then_approved(&server).await;
    // The clean stop saves a checkpoint of events 1-7, vouched for by event 8.
    server.stop().await;
    let log = server.data.path().join("log");
    // Only the checkpoint can show this loss.
    let _ = std::fs::remove_file(log.join("head.witness"));
    cut_tail(&log, 5);

    server.restart().await;
    refuses_and_says(&server, "checkpoint 7 exists").await;
    server.stop().await;
}

/// Replaces `from` by `to` in event `sequence` and re-chains every event after it (each
/// one's `prev_hash` and hash), and the head record: what someone who knows the format
/// would do to rewrite a vote without breaking the chain.
fn rewrite_and_rechain(log: &Path, sequence: u64, from: &[u8], to: &[u8]) {
    use sha2::Digest as _;
    let db = sled::open(log).expect("open stopped server's log");
    let events = db.open_tree("events").unwrap();
    let meta = db.open_tree("meta").unwrap();
    let (last, _) = events.last().unwrap().unwrap();
    let head = u64::from_be_bytes(last.as_ref().try_into().unwrap());
    let mut prev = events.get((sequence - 1).to_be_bytes()).unwrap().unwrap()[..32].to_vec();
    for at in sequence..=head {
        let stored = events.get(at.to_be_bytes()).unwrap().unwrap().to_vec();
        let mut body = stored[32..].to_vec();
        if at == sequence {
            let i = body
                .windows(from.len())
                .position(|w| w == from)
                .expect("bytes to replace");
            body.splice(i..i + from.len(), to.iter().copied());
        } else {
            // Only the link: a hash quoted elsewhere in the body (the checkpoint event's
            // `covers_hash`) is left as it was.
            let old = format!("\"prev_hash\":\"{}\"", hex::encode(body_prev(&events, at)));
            let new = format!("\"prev_hash\":\"{}\"", hex::encode(&prev));
            let text = String::from_utf8(body).unwrap().replace(&old, &new);
            body = text.into_bytes();
        }
        let hash = sha2::Sha256::new()
            .chain_update(&prev)
            .chain_update(&body)
            .finalize()
            .to_vec();
        let mut value = hash.clone();
        value.extend_from_slice(&body);
        events.insert(at.to_be_bytes(), value).unwrap();
        prev = hash;
    }
    let mut record = head.to_be_bytes().to_vec();
    record.extend_from_slice(&prev);
    meta.insert("head", record).unwrap();
    db.flush().unwrap();
}

/// The hash event `at` was chained to when it was written: its predecessor's original
/// hash, as its body's `prev_hash` still says.
fn body_prev(events: &sled::Tree, at: u64) -> Vec<u8> {
    let stored = events.get(at.to_be_bytes()).unwrap().unwrap();
    let body: serde_json::Value = serde_json::from_slice(&stored[32..]).unwrap();
    hex::decode(body["prev_hash"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_vote_rewritten_and_the_rest_rechained_is_caught_by_the_checkpoint() {
    let _watchdog = Watchdog::new("rechained log test");
    let mut server = TestServer::start_with(shipped_policies(), with_status).await;
    allowed_then_approved(&server).await;
    server.stop().await;
    let log = server.data.path().join("log");
    let _ = std::fs::remove_file(log.join("head.witness"));
    // Event 5: bob's vote, before the checkpoint's events end.
    rewrite_and_rechain(&log, 5, b"looks right", b"looks wrong");

    server.restart().await;
    refuses_and_says(&server, "rewritten").await;
    server.stop().await;
}
