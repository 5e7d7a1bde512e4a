//! Settled actions beyond `limits.settled_in_memory` leave memory and are read back from the
//! log: every read and every command on them answers exactly as a server holding all
//! records in memory does.

mod common;

use std::net::SocketAddr;

use common::{
    Caller, TestServer, Watchdog, check, everything_readable, server_status, shipped_policies,
    string,
};
use countersign::config::ServerConfig;
use countersign::proto::{self, ActionStatus, Outcome, Verdict};
use tonic::Code;

/// One settled record in memory, and `/status` to see it.
fn keep_one_settled(config: &mut ServerConfig) {
    config.settled_in_memory = 1;
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
}

#[tokio::test]
async fn settled_actions_read_back_from_the_log_are_what_memory_held() {
    let _watchdog = Watchdog::new("settled records test");
    let mut server = TestServer::start_with(shipped_policies(), keep_one_settled).await;
    let mut reader = server.gate(&Caller::agent("reader-bot")).await;
    let mut keyed = check("storage.object.read", "production", &[]);
    keyed.idempotency_key = "read-1".into();
    let first = reader
        .check_action(keyed.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.status(), ActionStatus::Allowed);

    // An approved IAM grant: its votes and approval are rebuilt too.
    let mut iam = server.gate(&Caller::agent("iam-bot")).await;
    let grant = iam
        .check_action(check(
            "iam.role.grant",
            "production",
            &[("role", string("admin")), ("member", string("dave"))],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grant.status(), ActionStatus::Pending);
    for reviewer in ["bob", "erin"] {
        server
            .review(&Caller::human(reviewer, "security"))
            .await
            .submit_review(proto::SubmitReviewRequest {
                action_id: grant.action_id.clone(),
                verdict: Verdict::Approve as i32,
                reason: format!("{reviewer} checked the ticket"),
                action_digest: String::new(),
            })
            .await
            .expect("vote");
    }
    // One that stays pending: it must be in memory after every start.
    let waiting = iam
        .check_action(check(
            "iam.role.grant",
            "production",
            &[("role", string("admin")), ("member", string("frank"))],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waiting.status(), ActionStatus::Pending);
    let mut ids = vec![
        first.action_id.clone(),
        grant.action_id.clone(),
        waiting.action_id.clone(),
    ];
    for _ in 0..3 {
        let allowed = reader
            .check_action(check("storage.object.read", "production", &[]))
            .await
            .unwrap()
            .into_inner();
        ids.push(allowed.action_id);
    }
    let status_now = server_status(&server).await;
    assert_eq!(status_now["actions"]["known"], 6);
    assert_eq!(
        status_now["actions"]["records_in_memory"], 2,
        "one settled, one pending"
    );

    // Commands on a settled action no longer in memory: the writer reads it back.
    let retried = reader
        .check_action(keyed.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.action_id, first.action_id, "an idempotent retry");
    assert_eq!(retried.status(), ActionStatus::Allowed);
    let mut conflicting = check("storage.object.read", "staging", &[]);
    conflicting.idempotency_key = "read-1".into();
    let refused = reader.check_action(conflicting).await.unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert!(refused.message().contains(&first.action_id), "{refused:?}");
    // Push the first action out again before each command.
    for _ in 0..2 {
        reader
            .check_action(check("storage.object.read", "production", &[]))
            .await
            .unwrap();
    }
    let report = |outcome: Outcome| proto::ReportOutcomeRequest {
        action_id: first.action_id.clone(),
        outcome: outcome as i32,
        details: "read 3 objects".into(),
    };
    let reported = reader
        .report_outcome(report(Outcome::Executed))
        .await
        .expect("an outcome on a record read back from the log")
        .into_inner();
    assert_eq!(
        reported.action.unwrap().outcome.unwrap().outcome(),
        Outcome::Executed
    );
    reader
        .check_action(check("storage.object.read", "production", &[]))
        .await
        .unwrap();
    let again = reader.report_outcome(report(Outcome::Failed)).await;
    assert_eq!(
        again.unwrap_err().code(),
        Code::FailedPrecondition,
        "decided against the rebuilt record, which has the outcome"
    );
    let awaited = iam
        .await_decision(proto::AwaitDecisionRequest {
            action_id: grant.action_id.clone(),
            wait: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(awaited.is_final);
    assert_eq!(awaited.action.unwrap().votes.len(), 2);
    let status_now = server_status(&server).await;
    assert_eq!(status_now["actions"]["known"], 9);
    assert_eq!(status_now["actions"]["records_in_memory"], 2);

    let from_the_log = everything_readable(&server, &ids).await;
    // A fresh start with every record in memory, folded from the whole log (a start from
    // the checkpoint the stop saves would hold only the pending record).
    server.tweak = |config| {
        config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.checkpoint_every = 0;
    };
    server.restart().await;
    assert_eq!(
        server_status(&server).await["actions"]["records_in_memory"],
        9
    );
    assert_eq!(everything_readable(&server, &ids).await, from_the_log);

    // A start that keeps one settled record decodes most events only in part, and
    // rebuilds the pending action from the log: the same answers, and it can be reviewed.
    server.tweak = |config| {
        keep_one_settled(config);
        config.checkpoint_every = 0;
    };
    server.restart().await;
    assert_eq!(
        server_status(&server).await["actions"]["records_in_memory"],
        2
    );
    assert_eq!(everything_readable(&server, &ids).await, from_the_log);
    let voted = server
        .review(&Caller::human("bob", "security"))
        .await
        .submit_review(proto::SubmitReviewRequest {
            action_id: waiting.action_id.clone(),
            verdict: Verdict::Approve as i32,
            reason: "first of two".into(),
            action_digest: waiting.action_digest.clone(),
        })
        .await
        .expect("a vote on the pending action rebuilt at start")
        .into_inner();
    let action = voted.action.unwrap();
    assert_eq!(action.status(), ActionStatus::Pending);
    assert_eq!(action.votes.len(), 1);
    server.stop().await;
}
