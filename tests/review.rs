//! Human review through the real server: streams, votes, quorums, waiting, expiry.

mod common;

use std::time::{Duration, Instant};

use common::{
    Caller, Gate, TestServer, access_denials, check, next_message, read_events, shipped_policies,
    string,
};
use countersign::proto::stream_pending_response::Event as StreamEvent;
use countersign::proto::{self, ActionStatus, Outcome, RiskLevel, Verdict};
use tonic::Code;

/// An IAM admin grant in production: pending, two approvals from `security`, on behalf of
/// alice.
fn admin_grant(member: &str) -> proto::CheckActionRequest {
    check(
        "iam.role.grant",
        "production",
        &[("role", string("admin")), ("member", string(member))],
    )
}

/// An agent's pending IAM admin grant, with the agent's client.
async fn pending_grant(server: &TestServer, member: &str) -> (Gate, proto::CheckActionResponse) {
    let mut gate = server.gate(&Caller::agent("iam-bot")).await;
    let checked = gate
        .check_action(admin_grant(member))
        .await
        .expect("check succeeds")
        .into_inner();
    assert_eq!(checked.status(), ActionStatus::Pending);
    (gate, checked)
}

fn review(id: &str, verdict: Verdict, reason: &str) -> proto::SubmitReviewRequest {
    proto::SubmitReviewRequest {
        action_id: id.to_string(),
        verdict: verdict as i32,
        reason: reason.to_string(),
        action_digest: String::new(),
    }
}

fn await_request(id: &str, wait_secs: i64) -> proto::AwaitDecisionRequest {
    proto::AwaitDecisionRequest {
        action_id: id.to_string(),
        wait: Some(prost_types::Duration {
            seconds: wait_secs,
            nanos: 0,
        }),
    }
}

/// Policies where every `test.*` action needs one `ops` approval within one second.
fn short_ttl_policies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::write_policy(
        dir.path(),
        "short.yaml",
        r#"
rules:
  - name: quick-review
    expression: action.type.startsWith("test.")
    message: Needs an ops reviewer within a second.
    risk: high
    effect: require_approval
    groups: [ops]
    ttl: 1s
"#,
    );
    dir
}

#[tokio::test]
async fn a_pending_action_reaches_the_reviewer_stream_with_its_full_context() {
    let server = TestServer::start().await;
    let mut reviewer = server.review(&Caller::human("bob", "security")).await;
    let mut stream = reviewer
        .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = next_message(&mut stream).await;
    assert!(matches!(
        first.event,
        Some(StreamEvent::SnapshotComplete(proto::SnapshotComplete {
            pending_count: 0
        }))
    ));

    let (_, checked) = pending_grant(&server, "bob@example.com").await;

    let message = next_message(&mut stream).await;
    assert_eq!(message.sequence, checked.sequence);
    let Some(StreamEvent::Pending(pending)) = message.event else {
        panic!("expected a pending action, got {message:?}");
    };
    assert_eq!(pending.action_id, checked.action_id);
    let action = pending.action.as_ref().unwrap();
    assert_eq!(action.r#type, "iam.role.grant");
    assert_eq!(action.resource, "projects/acme");
    assert_eq!(action.environment, "production");
    assert_eq!(action.purpose, "integration test");
    let parameters = &action.parameters.as_ref().unwrap().fields;
    assert_eq!(parameters["role"], string("admin"));
    assert_eq!(pending.risk(), RiskLevel::Critical);
    assert!(
        pending
            .matched_rules
            .iter()
            .any(|r| r.name == "iam-admin-grant" && !r.message.is_empty())
    );
    assert_eq!(pending.requester.as_ref().unwrap().id, "iam-bot");
    let task = pending.task.as_ref().unwrap();
    assert_eq!(task.on_behalf_of, "alice");
    assert_eq!(task.task_id, "task-1");
    assert_eq!(task.origin, "tests");
    assert_eq!(pending.policy_version, checked.policy_version);
    assert!(pending.expires_at.is_some());
    assert!(pending.votes.is_empty());
    assert_eq!(pending.approvals_required, 2);
    assert_eq!(pending.action_digest, checked.action_digest);
}

#[tokio::test]
async fn reviewers_see_only_actions_of_their_groups_and_never_their_own() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("iam-bot")).await;
    gate.check_action(admin_grant("x@example.com"))
        .await
        .unwrap();

    let snapshot_count = |who: Caller| {
        let server = &server;
        async move {
            let mut client = server.review(&who).await;
            let mut stream = client
                .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
                .await
                .unwrap()
                .into_inner();
            loop {
                if let Some(StreamEvent::SnapshotComplete(done)) =
                    next_message(&mut stream).await.event
                {
                    return done.pending_count;
                }
            }
        }
    };
    assert_eq!(snapshot_count(Caller::human("bob", "security")).await, 1);
    assert_eq!(
        snapshot_count(Caller::human("erin", "sre")).await,
        0,
        "wrong group"
    );
    assert_eq!(
        snapshot_count(Caller::human("alice", "security")).await,
        0,
        "the action is taken on alice's behalf"
    );
    let mut agent = server.review(&Caller::agent("iam-bot")).await;
    let status = agent
        .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn self_review_and_other_forbidden_reviews_are_refused_and_recorded() {
    let server = TestServer::start().await;
    // A human requester in the reviewer group itself.
    let mut human_gate = server.gate(&Caller::human("dave", "security")).await;
    let checked = human_gate
        .check_action(admin_grant("dave@example.com"))
        .await
        .unwrap()
        .into_inner();
    let id = checked.action_id.as_str();

    let attempts = [
        (Caller::human("dave", "security"), "requested this action"),
        (Caller::human("ALICE", "security"), "on behalf of"),
        (Caller::human("erin", "sre"), "not in a reviewer group"),
        (Caller::agent("helper-bot"), "only humans review"),
    ];
    for (who, expected) in &attempts {
        let mut client = server.review(who).await;
        let status = client
            .submit_review(review(id, Verdict::Approve, "looks fine"))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{}",
            status.message()
        );
        assert!(status.message().contains(expected), "{}", status.message());
    }
    // A second vote by the same reviewer.
    let mut bob = server.review(&Caller::human("bob", "security")).await;
    bob.submit_review(review(id, Verdict::Approve, "ok"))
        .await
        .unwrap();
    let status = bob
        .submit_review(review(id, Verdict::Approve, "really ok"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("already voted"),
        "{}",
        status.message()
    );

    let events = read_events(&server, id).await;
    let refused: Vec<&proto::Event> = events
        .iter()
        .filter(|e| e.kind == "review.refused")
        .collect();
    assert_eq!(
        refused.len(),
        5,
        "every refused review is in the action's log"
    );
    assert_eq!(refused[0].actor, "dave");
    assert!(refused[0].payload_json.contains("requested this action"));
    // The agent's vote too, on the action it targeted, not as an access denial.
    assert_eq!(refused[3].actor, "helper-bot");
    assert!(refused[3].payload_json.contains("only humans review"));

    let record = bob
        .get_action(proto::GetActionRequest {
            action_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(
        record.status(),
        ActionStatus::Pending,
        "refusals change nothing"
    );
    assert_eq!(record.votes.len(), 1);
}

#[tokio::test]
async fn two_distinct_reviewers_approve_and_the_waiting_agent_wakes_with_the_approval() {
    let server = TestServer::start().await;
    let (gate, checked) = pending_grant(&server, "bob@example.com").await;
    let id = checked.action_id.clone();

    let mut waiter = gate.clone();
    let wait_id = id.clone();
    let waiting = tokio::spawn(async move {
        let answer = waiter.await_decision(await_request(&wait_id, 30)).await;
        (answer, Instant::now())
    });

    let mut bob = server.review(&Caller::human("bob", "security")).await;
    let after_first = bob
        .submit_review(review(&id, Verdict::Approve, "ticket SEC-1 checked"))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(
        after_first.status(),
        ActionStatus::Pending,
        "one of two approvals"
    );
    assert!(!waiting.is_finished());

    let mut carol = server.review(&Caller::human("carol", "security,sre")).await;
    let mut approve = review(&id, Verdict::Approve, "second pair of eyes");
    approve.action_digest = checked.action_digest.clone();
    let approving_sent_at = Instant::now();
    carol.submit_review(approve).await.unwrap();

    let (answer, woke_at) = waiting.await.unwrap();
    let answer = answer.expect("await succeeds").into_inner();
    assert!(answer.is_final);
    let record = answer.action.unwrap();
    assert_eq!(record.status(), ActionStatus::Approved);
    assert_eq!(
        record.action_digest, checked.action_digest,
        "bound to the action asked for"
    );
    assert!(record.valid_until.is_some());
    let reviewers: Vec<&str> = record
        .votes
        .iter()
        .map(|v| v.reviewer_id.as_str())
        .collect();
    assert_eq!(reviewers, ["bob", "carol"]);
    // Informational, not asserted: from sending the approving review to the waiter's wake.
    eprintln!(
        "waiter woke {:?} after the approving review was sent",
        woke_at.saturating_duration_since(approving_sent_at)
    );
}

#[tokio::test]
async fn a_vote_bound_to_another_digest_is_refused() {
    let server = TestServer::start().await;
    let (_, checked) = pending_grant(&server, "z@example.com").await;
    let mut bob = server.review(&Caller::human("bob", "security")).await;
    let mut vote = review(&checked.action_id, Verdict::Approve, "ok");
    vote.action_digest = "0".repeat(64);
    let status = bob.submit_review(vote).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn one_rejection_rejects_and_later_votes_fail() {
    let server = TestServer::start().await;
    let (mut gate, checked) = pending_grant(&server, "mallory@example.com").await;
    let id = checked.action_id.as_str();

    let mut bob = server.review(&Caller::human("bob", "security")).await;
    let rejected = bob
        .submit_review(review(id, Verdict::Reject, "mallory is not on the team"))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(rejected.status(), ActionStatus::Rejected);

    let mut carol = server.review(&Caller::human("carol", "security")).await;
    let status = carol
        .submit_review(review(id, Verdict::Approve, "ok"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    let answer = gate
        .await_decision(await_request(id, 5))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.is_final);
    assert_eq!(answer.action.unwrap().status(), ActionStatus::Rejected);
}

#[tokio::test]
async fn a_review_needs_a_reason_and_a_verdict() {
    let server = TestServer::start().await;
    let (_, checked) = pending_grant(&server, "r@example.com").await;
    let mut bob = server.review(&Caller::human("bob", "security")).await;

    let status = bob
        .submit_review(review(&checked.action_id, Verdict::Approve, "  "))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("reason"),
        "{}",
        status.message()
    );

    let mut unknown = review(&checked.action_id, Verdict::Approve, "ok");
    unknown.verdict = 9;
    let status = bob.submit_review(unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("SubmitReviewRequest.verdict is 9"),
        "{}",
        status.message()
    );
    let mut unset = review(&checked.action_id, Verdict::Approve, "ok");
    unset.verdict = Verdict::Unspecified as i32;
    let status = bob.submit_review(unset).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("verdict"),
        "{}",
        status.message()
    );

    let status = bob
        .submit_review(review(
            &uuid::Uuid::now_v7().to_string(),
            Verdict::Approve,
            "ok",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn an_unanswered_action_expires_and_fails_closed() {
    let policies = short_ttl_policies();
    let server = TestServer::start_with_policies(policies.path().to_path_buf()).await;
    let mut reviewer = server.review(&Caller::human("olga", "ops")).await;
    let mut stream = reviewer
        .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    next_message(&mut stream).await; // snapshot complete

    let mut gate = server.gate(&Caller::agent("test-bot")).await;
    let checked = gate
        .check_action(check("test.thing.do", "dev", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(checked.status(), ActionStatus::Pending);

    let answer = gate
        .await_decision(await_request(&checked.action_id, 20))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.is_final);
    assert_eq!(answer.action.unwrap().status(), ActionStatus::Expired);

    assert!(matches!(
        next_message(&mut stream).await.event,
        Some(StreamEvent::Pending(_))
    ));
    let resolved = next_message(&mut stream).await;
    let Some(StreamEvent::Resolved(resolved)) = resolved.event else {
        panic!("expected the expiry on the stream, got {resolved:?}");
    };
    assert_eq!(resolved.status(), ActionStatus::Expired);
    assert_eq!(resolved.decided_by, ["countersign"]);
    assert!(
        resolved.reason.starts_with("no decision before"),
        "{}",
        resolved.reason
    );
    assert!(resolved.decided_at.is_some());

    let status = reviewer
        .submit_review(review(&checked.action_id, Verdict::Approve, "too late"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let kinds: Vec<String> = read_events(&server, &checked.action_id)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["action.requested", "policy.evaluated", "action.expired"]
    );
}

#[tokio::test]
async fn expiry_survives_a_restart() {
    let policies = short_ttl_policies();
    let mut server = TestServer::start_with_policies(policies.path().to_path_buf()).await;
    let mut gate = server.gate(&Caller::agent("test-bot")).await;
    let checked = gate
        .check_action(check("test.thing.do", "dev", &[]))
        .await
        .unwrap()
        .into_inner();
    server.stop().await;
    // The ttl passes while the server is down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart().await;

    let mut gate = server.gate(&Caller::agent("test-bot")).await;
    let answer = gate
        .await_decision(await_request(&checked.action_id, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.action.unwrap().status(), ActionStatus::Expired);
}

#[tokio::test]
async fn the_requester_can_cancel_a_pending_action_and_nobody_else_can() {
    let server = TestServer::start().await;
    let (mut gate, checked) = pending_grant(&server, "c@example.com").await;
    let cancel = proto::CancelActionRequest {
        action_id: checked.action_id.clone(),
        reason: "task aborted".into(),
    };

    let mut other = server.gate(&Caller::agent("other-bot")).await;
    let status = other.cancel_action(cancel.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let cancelled = gate
        .cancel_action(cancel.clone())
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(cancelled.status(), ActionStatus::Cancelled);
    let status = gate.cancel_action(cancel).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    let mut bob = server.review(&Caller::human("bob", "security")).await;
    let status = bob
        .submit_review(review(&checked.action_id, Verdict::Approve, "ok"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_waiter_reconnecting_after_a_restart_gets_the_final_status() {
    let mut server = TestServer::start().await;
    let (gate, checked) = pending_grant(&server, "w@example.com").await;
    let id = checked.action_id.clone();

    // A waiter is still waiting when the server restarts: it gets the current status at
    // once (the restart does not wait for it), and calls again.
    let mut waiter = gate.clone();
    let wait_id = id.clone();
    let cut_off =
        tokio::spawn(async move { waiter.await_decision(await_request(&wait_id, 30)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let restart_began = Instant::now();
    server.restart().await;
    eprintln!("restart with a waiter took {:?}", restart_began.elapsed());
    let interrupted = cut_off.await.unwrap();
    if let Ok(answer) = interrupted {
        assert!(
            !answer.into_inner().is_final,
            "still pending when interrupted"
        );
    }

    // It reconnects and waits again; the approvals arrive after the restart.
    let mut gate = server.gate(&Caller::agent("iam-bot")).await;
    let answer = gate
        .await_decision(await_request(&id, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.is_final, "still pending after the restart");
    let wait_id = id.clone();
    let mut waiter = gate.clone();
    let waiting =
        tokio::spawn(async move { waiter.await_decision(await_request(&wait_id, 30)).await });
    for who in [
        Caller::human("bob", "security"),
        Caller::human("carol", "security"),
    ] {
        let mut reviewer = server.review(&who).await;
        reviewer
            .submit_review(review(&id, Verdict::Approve, "ok"))
            .await
            .unwrap();
    }
    let answer = waiting.await.unwrap().unwrap().into_inner();
    assert_eq!(answer.action.unwrap().status(), ActionStatus::Approved);

    // And after one more restart the final status is still there.
    server.restart().await;
    let mut gate = server.gate(&Caller::agent("iam-bot")).await;
    let answer = gate
        .await_decision(await_request(&id, 1))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.is_final);
    assert_eq!(answer.action.unwrap().status(), ActionStatus::Approved);
}

#[tokio::test]
async fn a_caller_may_wait_only_on_its_own_actions() {
    let server = TestServer::start().await;
    let (_, checked) = pending_grant(&server, "o@example.com").await;

    let mut other = server.gate(&Caller::agent("other-bot")).await;
    let status = other
        .await_decision(await_request(&checked.action_id, 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut auditor = server.gate(&Caller::human("audrey", "auditors")).await;
    let answer = auditor
        .await_decision(await_request(&checked.action_id, 0))
        .await
        .unwrap();
    assert!(!answer.into_inner().is_final);
}

#[tokio::test]
async fn await_decision_answers_before_the_clients_deadline() {
    let server = TestServer::start().await;
    let (mut gate, checked) = pending_grant(&server, "d@example.com").await;

    let mut request = tonic::Request::new(await_request(&checked.action_id, 600));
    request.set_timeout(Duration::from_millis(500));
    let answer = gate
        .await_decision(request)
        .await
        .expect("an answer, not DEADLINE_EXCEEDED");
    assert!(!answer.into_inner().is_final);
}

#[tokio::test]
async fn outcomes_are_reported_once_and_only_for_allowed_or_approved_actions() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("reader-bot")).await;
    let allowed = gate
        .check_action(check("storage.object.read", "production", &[]))
        .await
        .unwrap()
        .into_inner();
    let report = |outcome: Outcome| proto::ReportOutcomeRequest {
        action_id: allowed.action_id.clone(),
        outcome: outcome as i32,
        details: "read 3 objects".into(),
    };

    let mut other = server.gate(&Caller::agent("other-bot")).await;
    assert_eq!(
        other
            .report_outcome(report(Outcome::Executed))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let reported = gate
        .report_outcome(report(Outcome::Executed))
        .await
        .unwrap()
        .into_inner();
    let outcome = reported.action.unwrap().outcome.unwrap();
    assert_eq!(outcome.outcome(), Outcome::Executed);
    assert_eq!(outcome.details, "read 3 objects");
    assert_eq!(
        gate.report_outcome(report(Outcome::Failed))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition,
        "only once"
    );

    let pending = gate
        .check_action(admin_grant("p@example.com"))
        .await
        .unwrap()
        .into_inner();
    let status = gate
        .report_outcome(proto::ReportOutcomeRequest {
            action_id: pending.action_id,
            outcome: Outcome::Executed as i32,
            details: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_start_reported_after_valid_until_is_refused_and_recorded() {
    let server = TestServer::start_with(common::shipped_policies(), |config| {
        config.times.approval_validity = Duration::from_millis(200);
    })
    .await;
    let mut gate = server.gate(&Caller::agent("slow-bot")).await;
    let allowed = gate
        .check_action(check("storage.object.read", "production", &[]))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(400)).await;

    let status = gate
        .report_outcome(proto::ReportOutcomeRequest {
            action_id: allowed.action_id.clone(),
            outcome: Outcome::Executed as i32,
            details: "started late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("valid until"),
        "{}",
        status.message()
    );
    let events = read_events(&server, &allowed.action_id).await;
    assert!(events.iter().any(|e| e.kind == "outcome.refused"));

    // Abandoning is always allowed: nothing was started.
    let abandoned = gate
        .report_outcome(proto::ReportOutcomeRequest {
            action_id: allowed.action_id,
            outcome: Outcome::Abandoned as i32,
            details: "too late, gave up".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        abandoned.action.unwrap().outcome.unwrap().outcome(),
        Outcome::Abandoned
    );
}

#[tokio::test]
async fn a_reviewer_stream_resumes_after_the_last_sequence_without_gaps_or_duplicates() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("iam-bot")).await;
    let mut bob = server.review(&Caller::human("bob", "security")).await;
    let mut stream = bob
        .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    next_message(&mut stream).await; // snapshot complete
    let first = gate
        .check_action(admin_grant("a@example.com"))
        .await
        .unwrap()
        .into_inner();
    let seen = next_message(&mut stream).await;
    assert_eq!(seen.sequence, first.sequence);
    drop(stream);

    // While bob is away: a vote on the first, a second action, and an allowed action that
    // is none of his business.
    let mut carol = server.review(&Caller::human("carol", "security")).await;
    carol
        .submit_review(review(&first.action_id, Verdict::Approve, "ok"))
        .await
        .unwrap();
    let second = gate
        .check_action(admin_grant("b@example.com"))
        .await
        .unwrap()
        .into_inner();
    gate.check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap();

    let mut resumed = bob
        .stream_pending(proto::StreamPendingRequest {
            after_sequence: seen.sequence,
        })
        .await
        .unwrap()
        .into_inner();
    let vote = next_message(&mut resumed).await;
    let Some(StreamEvent::VoteAdded(added)) = &vote.event else {
        panic!("expected the missed vote first, got {vote:?}");
    };
    assert_eq!(added.action_id, first.action_id);
    assert_eq!(added.approvals_remaining, 1);
    assert_eq!(added.vote.as_ref().unwrap().reviewer_id, "carol");
    let next = next_message(&mut resumed).await;
    let Some(StreamEvent::Pending(pending)) = &next.event else {
        panic!("expected the missed pending action, got {next:?}");
    };
    assert_eq!(pending.action_id, second.action_id);
    assert_eq!(next.sequence, second.sequence);
    // Everything missed has been sent: the stream says so, and where it stands (the
    // allowed action after the second one is in the log, not on the stream).
    let caught_up = next_message(&mut resumed).await;
    assert!(
        matches!(caught_up.event, Some(StreamEvent::CaughtUp(_))),
        "expected caught_up after what was missed, got {caught_up:?}"
    );
    assert!(caught_up.sequence > second.sequence, "{caught_up:?}");

    // Live again: the next event is new, not a repeat.
    let third = gate
        .check_action(admin_grant("c@example.com"))
        .await
        .unwrap()
        .into_inner();
    let live = next_message(&mut resumed).await;
    assert_eq!(live.sequence, third.sequence);
}

#[tokio::test]
async fn a_stalled_reviewer_stream_does_not_slow_the_others_and_is_told_to_resync() {
    let server = TestServer::start_with(common::shipped_policies(), |config| {
        config.reviewer_stall_timeout = Duration::from_millis(500);
    })
    .await;
    let mut stalled_client = server
        .review_with_small_window(&Caller::human("sleepy", "security"))
        .await;
    let mut stalled = stalled_client
        .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    next_message(&mut stalled).await; // snapshot complete, then never read again (for now)

    let mut attentive_client = server.review(&Caller::human("bob", "security")).await;
    let mut attentive = attentive_client
        .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    next_message(&mut attentive).await;

    // The attentive reviewer reads as events arrive.
    const ACTIONS: usize = 800;
    let reader = tokio::spawn(async move {
        let mut received = 0;
        while received < ACTIONS {
            match next_message(&mut attentive).await.event {
                Some(StreamEvent::Pending(_)) => received += 1,
                Some(StreamEvent::ResyncRequired(r)) => {
                    panic!("the attentive reviewer was told to resync: {}", r.reason)
                }
                _ => {}
            }
        }
        received
    });

    // Enough pending actions to fill the stalled client's window and its server buffer.
    let gate = server.gate(&Caller::agent("iam-bot")).await;
    let mut tasks = Vec::new();
    for i in 0..ACTIONS {
        let mut gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            gate.check_action(admin_grant(&format!("user{i}@example.com")))
                .await
        }));
    }
    for task in tasks {
        assert_eq!(
            task.await
                .unwrap()
                .expect("agents are never blocked")
                .into_inner()
                .status(),
            ActionStatus::Pending
        );
    }
    assert_eq!(
        reader.await.unwrap(),
        ACTIONS,
        "the attentive reviewer saw every one"
    );

    // The stalled client keeps not reading for three times the stall timeout; then its
    // stream, once drained, ends with a resync notice.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut resync = None;
    for _ in 0..(ACTIONS + 10) {
        let message = next_message(&mut stalled).await;
        if let Some(StreamEvent::ResyncRequired(r)) = message.event {
            resync = Some(r);
            break;
        }
    }
    let resync = resync.expect("the stalled stream is told to resync");
    assert!(
        resync.reason.contains("after_sequence = 0"),
        "{}",
        resync.reason
    );
    // Then closed with a status a client can act on, not OK.
    let end = tokio::time::timeout(Duration::from_secs(10), stalled.message())
        .await
        .unwrap();
    let status = end.expect_err("a cut stream does not end with OK");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("after_sequence = 0"),
        "{status:?}"
    );
}

#[tokio::test]
async fn actions_can_be_listed_by_status_type_and_requester_page_by_page() {
    let server = TestServer::start().await;
    let mut iam = server.gate(&Caller::agent("iam-bot")).await;
    let mut reader = server.gate(&Caller::agent("reader-bot")).await;
    for i in 0..5 {
        iam.check_action(admin_grant(&format!("u{i}@example.com")))
            .await
            .unwrap();
        reader
            .check_action(check("storage.object.read", "dev", &[]))
            .await
            .unwrap();
    }
    let mut human = server.review(&Caller::human("bob", "security")).await;
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = human
            .list_actions(proto::ListActionsRequest {
                status: ActionStatus::Pending as i32,
                requester_id: String::new(),
                action_type: "iam.role.grant".into(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.actions.len() <= 2);
        ids.extend(page.actions.into_iter().map(|a| a.action_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids.len(), 5);
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(ids, sorted, "newest first, no repeats");

    // An agent lists only its own.
    let mut agent = server.review(&Caller::agent("reader-bot")).await;
    let own = agent
        .list_actions(proto::ListActionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.actions.len(), 5);
    assert!(
        own.actions
            .iter()
            .all(|a| a.requester.as_ref().unwrap().id == "reader-bot")
    );
    let status = agent
        .list_actions(proto::ListActionsRequest {
            requester_id: "iam-bot".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn the_audit_log_follows_new_events_and_is_for_auditors_only() {
    let server = TestServer::start().await;
    let mut outsider = server.audit(&Caller::human("bob", "security")).await;
    let status = outsider
        .read_events(proto::ReadEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut auditor = server.audit(&Caller::human("audrey", "auditors")).await;
    let mut follow = auditor
        .read_events(proto::ReadEventsRequest {
            after_sequence: 0,
            action_id: String::new(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut gate = server.gate(&Caller::agent("reader-bot")).await;
    let checked = gate
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap()
        .into_inner();
    // Bob's refusal is recorded too, by its own task: before or after the check.
    let mut action_events = Vec::new();
    let mut denials = Vec::new();
    while action_events.len() < 2 || denials.is_empty() {
        let event = next_message(&mut follow).await.event.unwrap();
        if event.kind == "access.denied" {
            denials.push(event);
        } else {
            action_events.push(event);
        }
    }
    assert_eq!(denials[0].actor, "bob");
    let (requested, evaluated) = (&action_events[0], &action_events[1]);
    assert_eq!(requested.kind, "action.requested");
    assert_eq!(evaluated.kind, "policy.evaluated");
    assert_eq!(evaluated.sequence, requested.sequence + 1);
    assert_eq!(evaluated.action_id, checked.action_id);
    assert_eq!(
        requested.hash, evaluated.prev_hash,
        "the chain is visible to auditors"
    );
    let payload: serde_json::Value = serde_json::from_str(&evaluated.payload_json).unwrap();
    assert_eq!(payload["status"], "allowed");
    assert_eq!(
        payload["decision"]["policy_version"],
        checked.policy_version.as_str()
    );
}

#[tokio::test]
async fn stopping_the_server_ends_open_reviewer_streams_instead_of_waiting_for_them() {
    let mut server = TestServer::start().await;
    let mut bob = server.review(&Caller::human("bob", "security")).await;
    let mut stream = bob
        .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    next_message(&mut stream).await;

    tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("stop completes while a reviewer stream is open");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends");
    assert!(!matches!(end, Ok(Some(_))), "no more messages: {end:?}");
}

#[tokio::test]
async fn ten_thousand_waiters_all_wake_on_one_approval() {
    const WAITERS: usize = 10_000;
    // HTTP/2 allows at most 1024 concurrent streams per connection (the server's limit).
    const CONNECTIONS: usize = 12;
    let server = TestServer::start().await;
    let (_, checked) = pending_grant(&server, "many@example.com").await;
    let id = checked.action_id.clone();

    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(server.gate(&Caller::agent("iam-bot")).await);
    }
    let mut waiters = tokio::task::JoinSet::new();
    for i in 0..WAITERS {
        let mut client = clients[i % CONNECTIONS].clone();
        let id = id.clone();
        waiters.spawn(async move { client.await_decision(await_request(&id, 60)).await });
    }
    // Let every waiter reach the server before the approvals land.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for who in [
        Caller::human("bob", "security"),
        Caller::human("carol", "security"),
    ] {
        server
            .review(&who)
            .await
            .submit_review(review(&id, Verdict::Approve, "ok"))
            .await
            .unwrap();
    }

    let mut approved = 0;
    while let Some(joined) = waiters.join_next().await {
        let answer = joined.unwrap().expect("waiter answered").into_inner();
        assert!(answer.is_final);
        assert_eq!(answer.action.unwrap().status(), ActionStatus::Approved);
        approved += 1;
    }
    assert_eq!(approved, WAITERS);
}

#[tokio::test]
async fn reviewers_see_who_resolved_an_action_and_why() {
    let server = TestServer::start().await;
    let mut carol = server.review(&Caller::human("carol", "security")).await;
    let mut stream = carol
        .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    next_message(&mut stream).await; // snapshot complete
    let (_, checked) = pending_grant(&server, "eve@example.com").await;
    next_message(&mut stream).await; // pending

    let mut bob = server.review(&Caller::human("bob", "security")).await;
    bob.submit_review(review(
        &checked.action_id,
        Verdict::Reject,
        "eve left the company",
    ))
    .await
    .unwrap();

    let vote = next_message(&mut stream).await;
    assert!(
        matches!(vote.event, Some(StreamEvent::VoteAdded(_))),
        "{vote:?}"
    );
    let message = next_message(&mut stream).await;
    let Some(StreamEvent::Resolved(resolved)) = message.event else {
        panic!("expected the resolution, got {message:?}");
    };
    assert_eq!(resolved.status(), ActionStatus::Rejected);
    assert_eq!(resolved.decided_by, ["bob"]);
    assert_eq!(resolved.reason, "eve left the company");
    assert!(resolved.decided_at.is_some());
}

/// A human's own pending action, which it then tries to approve itself.
async fn own_pending_grant(server: &TestServer) -> String {
    server
        .gate(&Caller::human("dave", "security"))
        .await
        .check_action(admin_grant("dave@example.com"))
        .await
        .unwrap()
        .into_inner()
        .action_id
}

fn payload(event: &proto::Event) -> serde_json::Value {
    serde_json::from_str(&event.payload_json).unwrap()
}

#[tokio::test]
async fn a_flood_of_self_approvals_writes_one_event_at_once_and_one_summary_of_the_rest() {
    // Within the default review budget (bursts of 100): the log must bound it by itself.
    const VOTES: u64 = 100;
    let mut server = TestServer::start().await;
    let id = own_pending_grant(&server).await;
    let head_before = read_events(&server, "").await.len();
    let mut dave = server.review(&Caller::human("dave", "security")).await;
    for n in 0..VOTES {
        let status = dave
            .submit_review(review(&id, Verdict::Approve, &format!("my own, try {n}")))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{}",
            status.message()
        );
    }
    let refused: Vec<proto::Event> = read_events(&server, &id)
        .await
        .into_iter()
        .filter(|e| e.kind == "review.refused")
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "only the first refusal is written at once"
    );
    assert_eq!(payload(&refused[0])["reason"], "my own, try 0");
    assert!(payload(&refused[0]).get("repeats").is_none());

    // The rest are counted, and recorded as one event when the window closes (or, as here,
    // when the server stops).
    server.restart().await;
    let refused: Vec<proto::Event> = read_events(&server, &id)
        .await
        .into_iter()
        .filter(|e| e.kind == "review.refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    let summary = payload(&refused[1]);
    assert_eq!(refused[1].actor, "dave");
    assert_eq!(summary["repeats"]["count"], VOTES - 1);
    assert_eq!(summary["reason"], "my own, try 1");
    assert!(
        summary["refusal"]
            .as_str()
            .unwrap()
            .contains("requested this action")
    );
    // Nothing else was written for them: the summary, the checkpoint of the clean stop.
    let written = read_events(&server, "").await.len() - head_before;
    assert!(written <= 4, "{written} events for {VOTES} refusals");
}

#[tokio::test]
async fn a_refused_votes_long_reason_is_stored_as_a_prefix_with_its_length_and_digest() {
    use sha2::Digest as _;
    let server = TestServer::start().await;
    let id = own_pending_grant(&server).await;
    let reason = "x".repeat(4096);
    let status = server
        .review(&Caller::human("dave", "security"))
        .await
        .submit_review(review(&id, Verdict::Approve, &reason))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let events = read_events(&server, &id).await;
    let refused = events.iter().find(|e| e.kind == "review.refused").unwrap();
    assert!(
        refused.payload_json.len() < 1024,
        "{}",
        refused.payload_json
    );
    let stored = payload(refused);
    let kept = stored["reason"].as_str().unwrap();
    assert!(kept.len() <= 256 && reason.starts_with(kept), "{kept}");
    assert_eq!(stored["reason_cut"]["bytes"], 4096);
    assert_eq!(
        stored["reason_cut"]["sha256"],
        hex::encode(sha2::Sha256::digest(reason.as_bytes()))
    );
}

#[tokio::test]
async fn votes_from_those_who_may_not_review_are_in_the_actions_history() {
    let server = TestServer::start_with(shipped_policies(), |config| {
        config.roles.reviewers = vec!["security".into(), "sre".into()];
    })
    .await;
    let (_, checked) = pending_grant(&server, "bob@example.com").await;
    let id = checked.action_id.as_str();
    for (who, expected) in [
        (Caller::agent("helper-bot"), "only humans review"),
        (Caller::human("frank", "finance"), "may not review"),
    ] {
        let status = server
            .review(&who)
            .await
            .submit_review(review(id, Verdict::Approve, "trust me"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains(expected), "{}", status.message());
    }
    let events = read_events(&server, id).await;
    let refused: Vec<(&str, serde_json::Value)> = events
        .iter()
        .filter(|e| e.kind == "review.refused")
        .map(|e| (e.actor.as_str(), payload(e)))
        .collect();
    assert_eq!(refused.len(), 2, "{events:#?}");
    assert_eq!(refused[0].0, "helper-bot");
    assert_eq!(refused[0].1["reviewer"]["kind"], "agent");
    assert!(
        refused[0].1["refusal"]
            .as_str()
            .unwrap()
            .contains("only humans review")
    );
    assert_eq!(refused[1].0, "frank");

    // A vote on no action at all has nothing to be recorded on: an access denial, and the
    // caller is not told whether the action exists.
    let status = server
        .review(&Caller::agent("helper-bot"))
        .await
        .submit_review(review(
            "0190a5f0-0000-7000-8000-000000000000",
            Verdict::Approve,
            "x",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let denials = access_denials(&server, 1).await;
    assert_eq!(denials.len(), 1, "{denials:?}");
    assert_eq!(denials[0].actor, "helper-bot");
    assert_eq!(
        payload(&denials[0])["rpc"],
        "/countersign.v1.ReviewService/SubmitReview"
    );
}
