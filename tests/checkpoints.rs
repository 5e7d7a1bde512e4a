//! Checkpoints of the action state: start-up reads only the events after the newest one and
//! answers exactly as a replay of the whole log does, and a checkpoint the chain does not
//! vouch for, or a log changed before it, is never trusted.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    Caller, TestServer, Watchdog, change_actor_of_event, check, everything_readable, server_status,
    shipped_policies, string,
};
use countersign::config::ServerConfig;
use countersign::ledger::ReplayReport;
use countersign::proto::{self, ActionStatus, Outcome, Verdict};
use tonic::Code;

fn with_status(config: &mut ServerConfig) {
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
}

fn whole_log(config: &mut ServerConfig) {
    with_status(config);
    config.checkpoint_every = 0;
}

/// What the running server's start-up found.
fn start_up(server: &TestServer) -> ReplayReport {
    let running = server.running.as_ref().expect("the server runs");
    running.replay_report().clone()
}

fn vote(action_id: &str, reason: &str) -> proto::SubmitReviewRequest {
    proto::SubmitReviewRequest {
        action_id: action_id.into(),
        verdict: Verdict::Approve as i32,
        reason: reason.into(),
        action_digest: String::new(),
    }
}

/// A server process killed without warning after a periodic checkpoint: the next start
/// restores that checkpoint and replays the events after it (votes and an approval of
/// actions pending at the checkpoint, an outcome of an action settled before it, new
/// actions), and answers every read exactly as a replay of the whole log does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_start_up_replays_only_the_events_after_the_last_checkpoint() {
    let _watchdog = Watchdog::new("crash and checkpoint test");
    let mut server = TestServer::start_with(shipped_policies(), with_status).await;
    server.stop().await;
    let config = server.data.path().join("countersign.toml");
    std::fs::write(&config, "[event_log]\ncheckpoint_every_events = 1000\n").unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(server.data.path().join("log"))
        .arg("--policies")
        .arg(shipped_policies());
    let process = common::spawn_serve(command).await;
    let channel = common::channel_to(process.address).await;
    let gate = |who: &'static str| {
        proto::action_gate_client::ActionGateClient::with_interceptor(
            channel.clone(),
            Caller::agent(who),
        )
    };
    let review = |who: &'static str| {
        proto::review_service_client::ReviewServiceClient::with_interceptor(
            channel.clone(),
            Caller::human(who, "security"),
        )
    };

    // Before the checkpoint: two IAM grants waiting for review, a keyed read.
    let grant = |member: &str| {
        check(
            "iam.role.grant",
            "production",
            &[("role", string("admin")), ("member", string(member))],
        )
    };
    let approved = gate("iam-bot").check_action(grant("dave")).await.unwrap();
    let approved = approved.into_inner();
    let waiting = gate("iam-bot").check_action(grant("frank")).await.unwrap();
    let waiting = waiting.into_inner();
    assert_eq!(waiting.status(), ActionStatus::Pending);
    let mut keyed = check("storage.object.read", "production", &[]);
    keyed.idempotency_key = "read-before".into();
    let read = gate("reader-bot")
        .check_action(keyed.clone())
        .await
        .unwrap();
    let read = read.into_inner();
    let mut ids = vec![
        approved.action_id.clone(),
        waiting.action_id.clone(),
        read.action_id.clone(),
    ];
    // Enough events for a checkpoint (two an action).
    let mut reader = gate("reader-bot");
    for n in 0..500 {
        let request = check(
            "storage.object.read",
            "staging",
            &[("n", common::number(n.into()))],
        );
        reader.check_action(request).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let covers = loop {
        let checkpoints: Vec<u64> = common::read_events_at(process.address, 1000, "")
            .await
            .into_iter()
            .filter(|event| event.kind == "log.checkpointed")
            .map(|event| event.sequence)
            .collect();
        if let Some(&event) = checkpoints.first() {
            break event;
        }
        assert!(Instant::now() < deadline, "no checkpoint after 1000 events");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // After it: the first grant approved, one vote on the second, an outcome of the keyed
    // read and its retry, new actions of every kind.
    for reviewer in ["bob", "erin"] {
        review(reviewer)
            .submit_review(vote(&approved.action_id, reviewer))
            .await
            .expect("vote");
    }
    review("bob")
        .submit_review(vote(&waiting.action_id, "one of two"))
        .await
        .expect("vote");
    reader
        .report_outcome(proto::ReportOutcomeRequest {
            action_id: read.action_id.clone(),
            outcome: Outcome::Executed as i32,
            details: "read 3 objects".into(),
        })
        .await
        .expect("outcome");
    let retried = reader
        .check_action(keyed.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.action_id, read.action_id);
    for request in [
        check("storage.object.read", "production", &[]),
        check("db.drop", "production", &[]),
        grant("grace"),
    ] {
        ids.push(
            gate("late-bot")
                .check_action(request)
                .await
                .unwrap()
                .into_inner()
                .action_id,
        );
    }
    // Everything above was answered, so it is durable. Killed: no checkpoint at a clean stop.
    let mut process = process;
    process.child.kill().expect("kill");
    process.child.wait().expect("wait");

    server.restart().await;
    let replay = start_up(&server);
    let from = replay
        .from_checkpoint
        .expect("started from the periodic checkpoint");
    assert!(from >= 1000 && from < covers, "{replay:?}");
    assert_eq!(replay.events_replayed, replay.events - from, "{replay:?}");
    assert!(replay.events_replayed > 10, "{replay:?}");
    assert_eq!(replay.checkpoint_problem, None);
    let from_checkpoint = everything_readable(&server, &ids).await;
    assert_eq!(server_status(&server).await["actions"]["known"], 506);

    server.tweak = whole_log;
    server.restart().await;
    let replay = start_up(&server);
    assert_eq!(replay.from_checkpoint, None);
    assert_eq!(everything_readable(&server, &ids).await, from_checkpoint);

    // And the restored server decides on what it restored: the retry is still idempotent,
    // and the second vote approves the grant that was pending at the checkpoint.
    server.tweak = with_status;
    server.restart().await;
    assert!(start_up(&server).from_checkpoint.is_some());
    let mut reader = server.gate(&Caller::agent("reader-bot")).await;
    let again = reader.check_action(keyed).await.unwrap().into_inner();
    assert_eq!(again.action_id, read.action_id);
    let decided = server
        .review(&Caller::human("erin", "security"))
        .await
        .submit_review(vote(&waiting.action_id, "second of two"))
        .await
        .expect("vote")
        .into_inner();
    assert_eq!(decided.action.unwrap().status(), ActionStatus::Approved);
    server.stop().await;
}

/// Allowed actions and one pending, then a clean stop: the stop saves a checkpoint.
async fn a_stopped_server_with_a_checkpoint() -> (TestServer, Vec<String>) {
    let mut server = TestServer::start_with(shipped_policies(), with_status).await;
    let mut gate = server.gate(&Caller::agent("ops-bot")).await;
    let mut ids = Vec::new();
    for request in [
        check("storage.object.read", "production", &[]),
        check("storage.object.read", "staging", &[]),
        check("db.drop", "production", &[]),
        check("iam.role.grant", "production", &[("role", string("owner"))]),
    ] {
        ids.push(
            gate.check_action(request)
                .await
                .unwrap()
                .into_inner()
                .action_id,
        );
    }
    server.stop().await;
    (server, ids)
}

/// Checkpoint bytes changed on disk, or the record of the newest checkpoint pointed at an
/// event that does not vouch for it: start-up says why, replays the whole log instead, and
/// serves the same state, deciding as usual.
#[tokio::test]
async fn a_checkpoint_the_chain_does_not_vouch_for_is_replaced_by_the_whole_log() {
    let _watchdog = Watchdog::new("untrusted checkpoint test");
    let (mut server, ids) = a_stopped_server_with_a_checkpoint().await;
    server.restart().await;
    assert_eq!(start_up(&server).from_checkpoint, Some(8));
    let expected = everything_readable(&server, &ids).await;
    server.stop().await;

    type Edit = fn(&std::path::Path);
    let edits: [(&str, Edit, &str); 2] = [
        (
            "a byte of the checkpoint changed",
            |log| {
                let file = log.join("checkpoints/00000000000000000008.checkpoint");
                let mut bytes = std::fs::read(&file).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 0x01;
                std::fs::write(&file, bytes).unwrap();
            },
            "digest",
        ),
        (
            "the newest checkpoint named as vouched for by an action's event",
            |log| {
                let db = sled::open(log).unwrap();
                let mut pointer = [0u8; 16];
                pointer[..8].copy_from_slice(&2u64.to_be_bytes());
                pointer[8..].copy_from_slice(&1u64.to_be_bytes());
                db.open_tree("meta")
                    .unwrap()
                    .insert("checkpoint", &pointer[..])
                    .unwrap();
                db.flush().unwrap();
            },
            "not the checkpoint's",
        ),
    ];
    for (what, edit, said) in edits {
        edit(&server.data.path().join("log"));
        server.restart().await;
        let replay = start_up(&server);
        assert_eq!(replay.from_checkpoint, None, "{what}");
        let problem = replay.checkpoint_problem.unwrap_or_default();
        assert!(problem.contains(said), "{what}: {problem}");
        assert_eq!(
            replay.integrity_problem, None,
            "{what}: the log itself is intact"
        );
        assert_eq!(everything_readable(&server, &ids).await, expected, "{what}");
        let status = server_status(&server).await;
        assert_eq!(status["log"]["verification"]["state"], "passed", "{what}");
        assert_eq!(status["write_refusal"], serde_json::Value::Null, "{what}");
        server.stop().await;
    }
    server.restart().await;
    let mut gate = server.gate(&Caller::agent("ops-bot")).await;
    let more = gate
        .check_action(check("storage.object.read", "dev", &[]))
        .await;
    assert!(more.is_ok(), "{more:?}");
    server.stop().await;
}

/// An event before the checkpoint, of an action start-up does not read, changed on disk:
/// the server starts from the checkpoint, the verification after start-up finds the
/// change, and from then on the server decides nothing and says why. With
/// `verify_before_serving` it refuses from the start.
#[tokio::test]
async fn a_log_changed_before_the_checkpoint_is_found_after_start_up() {
    let _watchdog = Watchdog::new("changed log test");
    let (mut server, ids) = a_stopped_server_with_a_checkpoint().await;
    // Event 1: the request of the first (allowed) action.
    change_actor_of_event(&server.data.path().join("log"), 1);

    server.restart().await;
    let replay = start_up(&server);
    assert_eq!(replay.from_checkpoint, Some(8));
    assert_eq!(replay.integrity_problem, None, "not read before serving");
    common::wait_until_gate_not_serving(&server).await;
    let status = server_status(&server).await;
    assert_eq!(status["log"]["verification"]["state"], "failed");
    let problem = status["log"]["verification"]["problem"]
        .as_str()
        .unwrap_or_default();
    assert!(problem.contains("event 1"), "{problem}");
    let mut gate = server.gate(&Caller::agent("ops-bot")).await;
    let refused = gate
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("verification"), "{refused:?}");
    // The changed action is never served as if it were evidence.
    let read = server
        .review(&Caller::human("carol", "security"))
        .await
        .get_action(proto::GetActionRequest {
            action_id: ids[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(read.code(), Code::FailedPrecondition, "{read:?}");

    server.tweak = |config| {
        with_status(config);
        config.verify_before_serving = true;
    };
    server.restart().await;
    let replay = start_up(&server);
    assert_eq!(replay.from_checkpoint, None);
    assert!(replay.integrity_problem.is_some());
    let mut gate = server.gate(&Caller::agent("ops-bot")).await;
    let refused = gate
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "at once");
    server.stop().await;
}

/// The request of an action still pending at the checkpoint, changed on disk (its stored
/// hash recomputed, so only the chain shows it): start-up rebuilds the action from the
/// copy the checkpoint holds, so reviewers are never shown the changed request, and the
/// verification after start-up still finds the change.
#[tokio::test]
async fn a_pending_action_is_restored_from_the_checkpoint_not_from_the_log() {
    let _watchdog = Watchdog::new("pending action test");
    let (mut server, ids) = a_stopped_server_with_a_checkpoint().await;
    let pending = ids[3].clone();
    // Event 7: the pending IAM grant's request, for the role "owner".
    common::rewrite_event_and_rehash(
        &server.data.path().join("log"),
        7,
        b"\"owner\"",
        b"\"viewr\"",
    );

    server.restart().await;
    let replay = start_up(&server);
    assert_eq!(replay.from_checkpoint, Some(8));
    let record = server
        .review(&Caller::human("carol", "security"))
        .await
        .get_action(proto::GetActionRequest { action_id: pending })
        .await
        .expect("the pending action is in memory")
        .into_inner()
        .action
        .unwrap();
    assert_eq!(record.status(), ActionStatus::Pending);
    let role = &record.action.unwrap().parameters.unwrap().fields["role"];
    assert_eq!(role, &string("owner"), "the request as it was made");
    common::wait_until_gate_not_serving(&server).await;
    let status = server_status(&server).await;
    let problem = status["log"]["verification"]["problem"]
        .as_str()
        .unwrap_or_default();
    assert!(
        problem.contains("event 8"),
        "the next event no longer links: {problem}"
    );
    server.stop().await;
}

/// A start from a checkpoint verifies the rest of the chain right after, and says so.
#[tokio::test]
async fn the_chain_before_the_checkpoint_is_verified_after_start_up() {
    let _watchdog = Watchdog::new("verification after start-up test");
    let (mut server, _) = a_stopped_server_with_a_checkpoint().await;
    server.restart().await;
    assert_eq!(start_up(&server).from_checkpoint, Some(8));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = server_status(&server).await;
        let state = status["log"]["verification"]["state"].clone();
        if state == "passed" {
            assert_eq!(status["log"]["verification"]["events"], 9);
            break;
        }
        assert_eq!(state, "running", "{status}");
        assert!(Instant::now() < deadline, "still verifying after 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Restarting without traffic adds no checkpoint event.
    server.restart().await;
    let replay = start_up(&server);
    assert_eq!((replay.events, replay.from_checkpoint), (9, Some(8)));
    server.stop().await;
}
