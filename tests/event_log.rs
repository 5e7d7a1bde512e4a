//! The hash-chained event log, through the real server: every decision is recorded,
//! tampering shows, restarts keep everything.

mod common;

use common::{Caller, TestServer, check, string};
use countersign::proto::{self, ActionStatus};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

async fn verify(server: &TestServer) -> proto::VerifyLogResponse {
    let mut audit = server.audit(&Caller::human("auditor", "auditors")).await;
    audit
        .verify_log(proto::VerifyLogRequest {})
        .await
        .expect("verify succeeds")
        .into_inner()
}

async fn get(server: &TestServer, id: &str) -> proto::ActionRecord {
    let mut review = server.review(&Caller::human("auditor", "auditors")).await;
    review
        .get_action(proto::GetActionRequest {
            action_id: id.to_string(),
        })
        .await
        .expect("action exists")
        .into_inner()
        .action
        .expect("record")
}

/// Three decisions of each kind: allowed, pending, denied.
async fn decide_three(server: &TestServer) -> Vec<proto::CheckActionResponse> {
    let mut gate = server.gate(&Caller::agent("ops-bot")).await;
    let mut out = Vec::new();
    for request in [
        check("storage.object.read", "production", &[]),
        check("iam.role.grant", "production", &[("role", string("owner"))]),
        check("db.drop", "production", &[]),
    ] {
        out.push(
            gate.check_action(request)
                .await
                .expect("check")
                .into_inner(),
        );
    }
    out
}

#[tokio::test]
async fn every_decision_is_in_the_log_and_the_chain_verifies() {
    let server = TestServer::start().await;
    let empty = verify(&server).await;
    assert!(empty.ok);
    assert_eq!(empty.events_checked, 0);

    let decisions = decide_three(&server).await;
    let statuses: Vec<_> = decisions.iter().map(|d| d.status()).collect();
    assert_eq!(
        statuses,
        [
            ActionStatus::Allowed,
            ActionStatus::Pending,
            ActionStatus::Denied
        ]
    );

    let report = verify(&server).await;
    assert!(report.ok, "{}", report.problem);
    assert_eq!(
        report.events_checked, 6,
        "a request and an evaluation per action"
    );
    assert_eq!(report.head_sequence, 6);
    assert_eq!(report.head_hash.len(), 64);
    for decision in &decisions {
        let record = get(&server, &decision.action_id).await;
        assert_eq!(record.status, decision.status);
        assert_eq!(record.last_sequence, decision.sequence);
        assert_eq!(record.first_sequence + 1, record.last_sequence);
        assert_eq!(record.policy_version, decision.policy_version);
        assert_eq!(
            record.requester.as_ref().unwrap().authenticated_by,
            "development-header"
        );
    }
}

#[tokio::test]
async fn concurrent_checks_are_group_committed_into_one_unbroken_chain() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for connection in 0..4 {
        let gate = server.gate(&Caller::agent("burst-bot")).await;
        for i in 0..50 {
            let mut gate = gate.clone();
            let request = check(
                "storage.object.read",
                "production",
                &[("n", common::number(f64::from(connection * 100 + i)))],
            );
            tasks.push(tokio::spawn(
                async move { gate.check_action(request).await },
            ));
        }
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let response = task
            .await
            .expect("task")
            .expect("check succeeds")
            .into_inner();
        ids.insert(response.action_id);
    }
    assert_eq!(ids.len(), 200);

    let report = verify(&server).await;
    assert!(report.ok, "{}", report.problem);
    assert_eq!(report.events_checked, 400);
}

#[tokio::test]
async fn a_restart_keeps_the_log_its_chain_and_the_actions() {
    let mut server = TestServer::start().await;
    let decisions = decide_three(&server).await;
    let mut before = Vec::new();
    for decision in &decisions {
        before.push(get(&server, &decision.action_id).await);
    }
    let head_before = verify(&server).await;

    server.restart().await;

    // A clean stop saved the state at event 6, and appended the event that vouches for it.
    let replay = server.running.as_ref().unwrap().replay_report();
    assert_eq!(replay.events, 7);
    assert_eq!(replay.from_checkpoint, Some(6));
    assert_eq!(replay.events_replayed, 1);
    assert_eq!(replay.actions, 3);
    let head_after = verify(&server).await;
    assert!(head_after.ok, "{}", head_after.problem);
    assert_eq!(head_after.head_sequence, 7);
    let seventh = read_event(&server, 7).await;
    assert_eq!(seventh.kind, "log.checkpointed");
    assert_eq!(
        seventh.prev_hash, head_before.head_hash,
        "the chain goes on"
    );
    for (decision, old) in decisions.iter().zip(&before) {
        assert_eq!(&get(&server, &decision.action_id).await, old);
    }

    // The chain goes on from where it was.
    let mut gate = server.gate(&Caller::agent("ops-bot")).await;
    let next = gate
        .check_action(check("storage.object.list", "dev", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.sequence, 9);
    let report = verify(&server).await;
    assert!(report.ok, "{}", report.problem);
    assert_eq!(report.events_checked, 9);
}

/// One event as an auditor reads it.
async fn read_event(server: &TestServer, sequence: u64) -> proto::Event {
    let mut audit = server.audit(&Caller::human("auditor", "auditors")).await;
    let mut events = audit
        .read_events(proto::ReadEventsRequest {
            after_sequence: sequence - 1,
            ..Default::default()
        })
        .await
        .expect("read events")
        .into_inner();
    let response = common::next_message(&mut events).await;
    response.event.expect("an event")
}

#[tokio::test]
async fn changing_one_byte_of_a_stored_event_fails_verification_at_that_event() {
    let mut server = TestServer::start().await;
    let decisions = decide_three(&server).await;
    server.stop().await;

    common::change_actor_of_event(&server.data.path().join("log"), 3);
    server.restart().await;
    // Event 3 lies before the checkpoint the clean stop saved: whether start-up reads it
    // (it belongs to the pending action) or the verification after start-up finds it,
    // the server stops deciding.
    common::wait_until_gate_not_serving(&server).await;

    let report = verify(&server).await;
    assert!(!report.ok);
    assert_eq!(report.first_bad_sequence, 3);
    assert!(!report.problem.is_empty());

    // A log that does not verify decides nothing new, and says why.
    let mut gate = server.gate(&Caller::agent("ops-bot")).await;
    let status = gate
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("verification"),
        "{}",
        status.message()
    );
    assert_eq!(
        common::action_gate_health(server.channel().await).await,
        ServingStatus::NotServing
    );
    // The evidence stays readable.
    assert_eq!(
        get(&server, &decisions[0].action_id).await.status,
        decisions[0].status
    );
}
