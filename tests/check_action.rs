//! CheckAction through the real server, with the shipped policies.

mod common;

use common::{Caller, TestServer, check, number, string};
use countersign::proto::{self, ActionStatus, RiskLevel};
use tonic::Code;

#[tokio::test]
async fn a_low_risk_read_is_allowed() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("reader-bot")).await;

    let response = gate
        .check_action(check("storage.object.read", "production", &[]))
        .await
        .expect("check succeeds")
        .into_inner();

    assert_eq!(response.status(), ActionStatus::Allowed);
    assert_eq!(response.risk(), RiskLevel::Low);
    assert!(
        response
            .matched_rules
            .iter()
            .any(|r| r.name == "read-only-actions")
    );
    assert!(
        response.valid_until.is_some(),
        "an allowed action says until when"
    );
    assert!(response.expires_at.is_none());
    assert_eq!(response.approvals_required, 0);
    let id = uuid::Uuid::parse_str(&response.action_id).expect("action id is a UUID");
    assert_eq!(id.get_version_num(), 7);
    assert!(response.policy_version.starts_with("sha256:"));
    assert_eq!(response.action_digest.len(), 64);
}

#[tokio::test]
async fn an_iam_admin_grant_in_production_waits_for_two_security_reviewers() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("iam-bot")).await;

    let response = gate
        .check_action(check(
            "iam.role.grant",
            "production",
            &[
                ("role", string("admin")),
                ("member", string("bob@example.com")),
            ],
        ))
        .await
        .expect("check succeeds")
        .into_inner();

    assert_eq!(response.status(), ActionStatus::Pending);
    assert!(matches!(
        response.risk(),
        RiskLevel::High | RiskLevel::Critical
    ));
    let rule = response
        .matched_rules
        .iter()
        .find(|r| r.name == "iam-admin-grant")
        .expect("the admin grant rule is named");
    assert!(!rule.message.is_empty());
    assert_eq!(response.approvals_required, 2);
    assert!(response.reviewer_groups.contains(&"security".to_string()));
    let expires = response.expires_at.expect("a pending action expires");
    let in_secs = expires.seconds - chrono::Utc::now().timestamp();
    assert!(
        (29 * 60..=30 * 60).contains(&in_secs),
        "expires in {in_secs}s, policy says 30m"
    );
}

#[tokio::test]
async fn a_production_database_drop_is_denied() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("db-bot")).await;

    let response = gate
        .check_action(check(
            "db.drop",
            "production",
            &[("database", string("orders"))],
        ))
        .await
        .expect("check succeeds")
        .into_inner();

    assert_eq!(response.status(), ActionStatus::Denied);
    assert_eq!(response.risk(), RiskLevel::Critical);
    assert!(
        response
            .matched_rules
            .iter()
            .any(|r| r.name == "production-database-drop")
    );
    assert!(response.valid_until.is_none());
}

#[tokio::test]
async fn an_unknown_action_type_falls_to_the_fail_closed_default() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("odd-bot")).await;

    let response = gate
        .check_action(check("quantum.entangle", "production", &[]))
        .await
        .expect("check succeeds")
        .into_inner();

    assert_eq!(response.status(), ActionStatus::Pending);
    assert!(response.defaulted);
    assert!(response.matched_rules.is_empty());
}

#[tokio::test]
async fn whole_numbers_in_parameters_compare_as_integers_in_policies() {
    let dir = tempfile::tempdir().unwrap();
    common::write_policy(
        dir.path(),
        "scale.yaml",
        r#"
rules:
  - name: small-scale-up
    expression: action.type == "compute.group.scale" && action.parameters.replicas <= 3
    message: Small scale-ups are routine.
    risk: low
    effect: allow
"#,
    );
    let server = TestServer::start_with_policies(dir.path().to_path_buf()).await;
    let mut gate = server.gate(&Caller::agent("scaler")).await;

    let small = gate
        .check_action(check(
            "compute.group.scale",
            "production",
            &[("replicas", number(3.0))],
        ))
        .await
        .unwrap()
        .into_inner();
    let large = gate
        .check_action(check(
            "compute.group.scale",
            "production",
            &[("replicas", number(30.0))],
        ))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(small.status(), ActionStatus::Allowed);
    assert_eq!(
        large.status(),
        ActionStatus::Pending,
        "nothing matched: default applies"
    );
}

#[tokio::test]
async fn a_rule_that_errors_at_run_time_fails_closed_and_records_the_error() {
    let dir = tempfile::tempdir().unwrap();
    common::write_policy(
        dir.path(),
        "rules.yaml",
        r#"
rules:
  - name: allow-everything-in-dev
    expression: action.environment == "dev"
    message: Development is free.
    risk: low
    effect: allow
  - name: ticketed-changes-are-fine
    description: Reads a parameter that callers may omit, without has().
    expression: action.parameters.ticket.startsWith("CHG-")
    message: Changes with a ticket are allowed.
    risk: low
    effect: allow
default:
  effect: deny
  risk: low
"#,
    );
    let server = TestServer::start_with_policies(dir.path().to_path_buf()).await;
    let mut gate = server.gate(&Caller::agent("dev-bot")).await;

    let response = gate
        .check_action(check("deploy.apply", "dev", &[]))
        .await
        .expect("check succeeds")
        .into_inner();

    assert_eq!(
        response.status(),
        ActionStatus::Pending,
        "an allow rule matched, but an erroring rule makes it at least require approval"
    );
    let error = response
        .rule_errors
        .iter()
        .find(|e| e.rule == "ticketed-changes-are-fine")
        .expect("the failing rule is reported");
    assert!(
        error.message.to_lowercase().contains("ticket"),
        "{}",
        error.message
    );

    let mut review = server.review(&Caller::human("auditor", "")).await;
    let record = review
        .get_action(proto::GetActionRequest {
            action_id: response.action_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(
        record.rule_errors.len(),
        1,
        "the error is recorded with the decision"
    );
}

#[tokio::test]
async fn a_call_without_a_principal_is_unauthenticated() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::anonymous()).await;

    let status = gate
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("x-countersign-principal"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_missing_action_type_is_an_invalid_argument_naming_the_field() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("sloppy-bot")).await;

    let status = gate.check_action(check("", "dev", &[])).await.unwrap_err();

    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("action.type"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn hostile_parameters_are_refused_with_the_offending_field() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("hostile-bot")).await;

    // Nested deeper than allowed.
    let mut deep = string("bottom");
    for _ in 0..40 {
        deep = prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue { values: vec![deep] },
            )),
        };
    }
    let status = gate
        .check_action(check("data.export", "dev", &[("deep", deep)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("action.parameters.deep"),
        "{}",
        status.message()
    );

    // Not a number JSON can hold.
    let status = gate
        .check_action(check(
            "data.export",
            "dev",
            &[("rows", number(f64::INFINITY))],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("action.parameters.rows"),
        "{}",
        status.message()
    );

    // Larger than the parameters limit, but under the message limit.
    let status = gate
        .check_action(check(
            "data.export",
            "dev",
            &[("blob", string(&"x".repeat(100 * 1024)))],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("action.parameters"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_refused_before_it_is_parsed() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("huge-bot")).await;

    let status = gate
        .check_action(check(
            "data.export",
            "dev",
            &[("blob", string(&"x".repeat(1024 * 1024)))],
        ))
        .await
        .unwrap_err();

    // The gRPC status-code guide's code for a message over the limit.
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limits.max_message_bytes"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_returns_the_same_action() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("retry-bot")).await;
    let mut request = check("iam.role.grant", "production", &[("role", string("admin"))]);
    request.idempotency_key = "job-42".into();

    let first = gate
        .check_action(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = gate
        .check_action(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.action_id, second.action_id);
    assert_eq!(
        first.sequence, second.sequence,
        "no second event was recorded"
    );

    // Another caller may use the same key for its own action.
    let mut other = server.gate(&Caller::agent("other-bot")).await;
    let theirs = other
        .check_action(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_ne!(theirs.action_id, first.action_id);

    // The same key for a different action is a conflict.
    let mut changed = request.clone();
    if let Some(a) = changed.action.as_mut() {
        a.resource = "projects/other".into();
    }
    let status = gate.check_action(changed).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(
        status.message().contains(&first.action_id),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn concurrent_retries_with_one_key_make_one_action() {
    let server = TestServer::start().await;
    let gate = server.gate(&Caller::agent("racing-bot")).await;
    let mut request = check("secret.rotate", "production", &[]);
    request.idempotency_key = "rotate-once".into();

    let attempts = (0..32).map(|_| {
        let mut gate = gate.clone();
        let request = request.clone();
        tokio::spawn(async move {
            gate.check_action(request)
                .await
                .map(|r| r.into_inner().action_id)
        })
    });
    let ids: std::collections::HashSet<String> = futures_util::future::join_all(attempts)
        .await
        .into_iter()
        .map(|joined| joined.expect("task").expect("check succeeds"))
        .collect();

    assert_eq!(ids.len(), 1, "all attempts resolve to one action: {ids:?}");
}

#[tokio::test]
async fn an_agent_cannot_read_another_agents_action() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("owner-bot")).await;
    let created = gate
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap()
        .into_inner();

    let mut own = server.review(&Caller::agent("owner-bot")).await;
    let mut snoop = server.review(&Caller::agent("snoop-bot")).await;
    let request = proto::GetActionRequest {
        action_id: created.action_id.clone(),
    };
    let record = own
        .get_action(request.clone())
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(record.action_digest, created.action_digest);
    assert_eq!(record.requester.unwrap().id, "owner-bot");
    let status = snoop.get_action(request).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let status = own
        .get_action(proto::GetActionRequest {
            action_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = own
        .get_action(proto::GetActionRequest {
            action_id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Doubles that serde_json's default reader parses back as a neighbouring value: one such
/// request used to fail every other caller's check in the same group commit.
const POISON_DOUBLES: [f64; 4] = [
    489_301.000_000_476_84,
    228_762.221_270_452_66,
    0.300_000_000_000_000_04,
    123_456.789_012_345_68,
];

#[tokio::test]
async fn a_caller_sending_awkward_doubles_never_fails_another_callers_check() {
    let server = TestServer::start().await;
    let mut poisoner = server.gate(&Caller::agent("float-bot")).await;
    let poison = tokio::spawn(async move {
        let mut answers = Vec::new();
        for round in 0..40 {
            let value = POISON_DOUBLES[round % POISON_DOUBLES.len()];
            let answer = poisoner
                .check_action(check(
                    "storage.object.read",
                    "production",
                    &[("ratio", number(value))],
                ))
                .await;
            answers.push((value, answer));
        }
        answers
    });
    let mut others = Vec::new();
    for agent in [
        "agent-0", "agent-1", "agent-2", "agent-3", "agent-4", "agent-5",
    ] {
        let mut gate = server.gate(&Caller::agent(agent)).await;
        others.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..40 {
                codes.push(
                    gate.check_action(check("storage.object.read", "production", &[]))
                        .await
                        .map(|r| r.into_inner().status())
                        .map_err(|e| (e.code(), e.message().to_owned())),
                );
            }
            codes
        }));
    }
    for other in others {
        for answer in other.await.expect("agent task") {
            assert_eq!(answer, Ok(ActionStatus::Allowed));
        }
    }

    // The awkward doubles themselves are recorded exactly as sent.
    let mut review = server.review(&Caller::human("auditor", "auditors")).await;
    for (value, answer) in poison.await.expect("poisoner task") {
        let response = answer.expect("a finite double is accepted").into_inner();
        let record = review
            .get_action(proto::GetActionRequest {
                action_id: response.action_id,
            })
            .await
            .expect("get action")
            .into_inner()
            .action
            .expect("record");
        let stored = record
            .action
            .and_then(|a| a.parameters)
            .and_then(|p| p.fields.get("ratio").cloned())
            .and_then(|v| v.kind);
        match stored {
            Some(prost_types::value::Kind::NumberValue(n)) => {
                assert_eq!(n.to_bits(), value.to_bits(), "{value} came back as {n}")
            }
            other => panic!("ratio came back as {other:?}"),
        }
    }
}
