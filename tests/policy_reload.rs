//! Replacing the policy set while the server runs: for admins only, recorded before it
//! takes effect, and a set that does not load leaves the running one in force.

mod common;

use common::{Caller, TestServer, check, read_events, write_policy};
use countersign::proto::{self, ActionStatus};
use tonic::Code;

const STRICT: &str = r#"
rules:
  - name: deny-everything
    description: A change freeze.
    expression: "true"
    message: frozen
    risk: high
    effect: deny
"#;

/// A policy directory holding a copy of the shipped policies.
fn copied_policies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::shipped_policies()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

async fn reload(
    server: &TestServer,
    who: &Caller,
) -> Result<proto::ReloadPoliciesResponse, tonic::Status> {
    server
        .policy(who)
        .await
        .reload_policies(proto::ReloadPoliciesRequest {})
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn only_admins_reload_and_a_reload_is_recorded_before_it_decides() {
    let policies = copied_policies();
    let server = TestServer::start_with_policies(policies.path().to_path_buf()).await;
    let agent = Caller::agent("deployer");
    let before = server
        .gate(&agent)
        .await
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.status(), ActionStatus::Allowed);

    for outsider in [
        Caller::human("alice", "security"),
        Caller::human("erin", "auditors"),
        agent.clone(),
    ] {
        let status = reload(&server, &outsider).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("`admins`"), "{status:?}");
    }

    write_policy(policies.path(), "zz-freeze.yaml", STRICT);
    let root = Caller::human("root", "admins");
    let reloaded = reload(&server, &root).await.expect("an admin reloads");
    assert_eq!(reloaded.previous_version, before.policy_version);
    assert_ne!(reloaded.policy_version, before.policy_version);

    let after = server
        .gate(&agent)
        .await
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.status(), ActionStatus::Denied);
    assert_eq!(after.policy_version, reloaded.policy_version);

    let events = read_events(&server, "").await;
    let reload_event = events
        .iter()
        .find(|e| e.kind == "policy.reloaded")
        .expect("the reload is in the log");
    assert_eq!(reload_event.actor, "root");
    let payload: serde_json::Value = serde_json::from_str(&reload_event.payload_json).unwrap();
    assert_eq!(payload["previous_version"], before.policy_version.as_str());
    assert_eq!(payload["policy_version"], reloaded.policy_version.as_str());
    let decided_after = events
        .iter()
        .find(|e| e.action_id == after.action_id && e.kind == "policy.evaluated")
        .expect("the later decision is in the log");
    assert!(
        reload_event.sequence < decided_after.sequence,
        "the reload is recorded before the first decision under it"
    );
}

#[tokio::test]
async fn a_policy_set_that_does_not_load_leaves_the_running_one_in_force() {
    let policies = copied_policies();
    let server = TestServer::start_with_policies(policies.path().to_path_buf()).await;
    let root = Caller::human("root", "admins");
    let running = server
        .policy(&root)
        .await
        .get_policy_set(proto::GetPolicySetRequest {})
        .await
        .unwrap()
        .into_inner();

    write_policy(
        policies.path(),
        "broken.yaml",
        "rules:\n  - name: x\n    expression: \"1 +\"\n    risk: low\n    effect: deny\n",
    );
    let status = reload(&server, &root).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("broken.yaml"), "{status:?}");
    assert!(
        status.message().contains(&running.policy_version),
        "names the version that stays: {status:?}"
    );

    let still = server
        .policy(&root)
        .await
        .get_policy_set(proto::GetPolicySetRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.policy_version, running.policy_version);
    let events = read_events(&server, "").await;
    let refused = events
        .iter()
        .find(|e| e.kind == "policy.reload_refused")
        .expect("the refused reload is in the log");
    assert_eq!(refused.actor, "root");
}
