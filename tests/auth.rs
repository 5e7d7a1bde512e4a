//! Authentication through the real server: JWTs and static tokens from an `[auth]` config,
//! identity headers ignored, and separation of duties across credentials.
//!
//! Keys are generated and tokens signed inside the tests; nothing is a committed fixture.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{TestServer, check, string};
use countersign::auth::{JwtConfig, PublicKeyFile, TokenConfig, TokenEntry, token_hash};
use countersign::config::AuthSettings;
use countersign::domain::PrincipalKind;
use countersign::proto::action_gate_client::ActionGateClient;
use countersign::proto::audit_service_client::AuditServiceClient;
use countersign::proto::review_service_client::ReviewServiceClient;
use countersign::proto::{self, ActionStatus, Verdict};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand_core::{OsRng, RngCore as _};
use serde_json::{Value, json};
use tempfile::TempDir;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const ISS: &str = "https://idp.example.com";
const AUD: &str = "countersign";
/// A static token for the human alice (what `openssl rand -base64 32` prints).
const ALICE_TOKEN: &str = "q3Vb8mZ1xR7tK2wN5pL0sD4fG6hJ9cA1eY8uI3oT5nM=";
/// A static token for the agent `pipeline`.
const PIPELINE_TOKEN: &str = "Zx9Lw2Qe5Rt8Yu1Io4Pa7Sd0Fg3Hj6Kl9Zx2Cv5Bn8M=";

/// An Ed25519 signing key; its public half is what the server is configured with.
struct Issuer {
    private_der: Vec<u8>,
    public_pem: String,
}

impl Issuer {
    fn new() -> Issuer {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        Issuer {
            private_der: signing.to_pkcs8_der().unwrap().as_bytes().to_vec(),
            public_pem: signing
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            claims,
            &EncodingKey::from_ed_der(&self.private_der),
        )
        .unwrap()
    }
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims of a valid agent token for `sub`.
fn claims(sub: &str) -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": sub, "iat": now(), "exp": now() + 300})
}

/// Claims of a valid token for a human in `groups`.
fn human_claims(sub: &str, groups: &[&str]) -> Value {
    let mut c = claims(sub);
    c["countersign_kind"] = json!("human");
    c["groups"] = json!(groups);
    c
}

/// A server trusting `issuer` for JWTs and two static tokens (alice, the human in
/// `security`; `pipeline`, an agent). The key file lives in the returned directory.
async fn server(issuer: &Issuer) -> (TestServer, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("idp.pem"), &issuer.public_pem).unwrap();
    let mut jwt = JwtConfig::new(ISS, AUD);
    jwt.public_keys.push(PublicKeyFile {
        path: "idp.pem".into(),
        kid: None,
    });
    let tokens = TokenConfig {
        tokens: vec![
            TokenEntry {
                name: Some("alice-laptop".into()),
                sha256: token_hash(ALICE_TOKEN),
                principal: "alice".into(),
                kind: PrincipalKind::Human,
                groups: vec!["security".into()],
            },
            TokenEntry {
                name: None,
                sha256: token_hash(PIPELINE_TOKEN),
                principal: "pipeline".into(),
                kind: PrincipalKind::Agent,
                groups: vec![],
            },
        ],
    };
    let auth = AuthSettings::Credentials {
        jwt: Some(Box::new(jwt)),
        tokens: Some(tokens),
        mtls: None,
        base_dir: dir.path().to_path_buf(),
    };
    let mut server = TestServer {
        data: tempfile::tempdir().unwrap(),
        policies: common::shipped_policies(),
        running: None,
        // Agents in `orchestrators` may name the human they act for.
        tweak: |config| config.roles.on_behalf_of_asserters = vec!["orchestrators".into()],
        auth,
        tls: None,
    };
    server.restart().await;
    (server, dir)
}

/// Metadata a client sends on every call.
#[derive(Clone, Default)]
struct Sends(Vec<(&'static str, String)>);

impl Sends {
    fn bearer(credential: &str) -> Sends {
        Sends(vec![("authorization", format!("Bearer {credential}"))])
    }

    fn and(mut self, key: &'static str, value: &str) -> Sends {
        self.0.push((key, value.to_string()));
        self
    }
}

impl tonic::service::Interceptor for Sends {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        for (key, value) in &self.0 {
            let value: MetadataValue<_> = value.parse().expect("ASCII metadata");
            request.metadata_mut().insert(*key, value);
        }
        Ok(request)
    }
}

type Gate = ActionGateClient<InterceptedService<Channel, Sends>>;
type Review = ReviewServiceClient<InterceptedService<Channel, Sends>>;
type Audit = AuditServiceClient<InterceptedService<Channel, Sends>>;

async fn gate(server: &TestServer, sends: Sends) -> Gate {
    ActionGateClient::with_interceptor(server.channel().await, sends)
}

async fn review(server: &TestServer, sends: Sends) -> Review {
    ReviewServiceClient::with_interceptor(server.channel().await, sends)
}

async fn audit(server: &TestServer, sends: Sends) -> Audit {
    AuditServiceClient::with_interceptor(server.channel().await, sends)
}

/// Every event in the log, read by an auditor holding a JWT from `issuer`.
async fn all_events(server: &TestServer, issuer: &Issuer) -> Vec<proto::Event> {
    let auditor = Sends::bearer(&issuer.sign(&human_claims("erin", &["auditors"])));
    let mut stream = audit(server, auditor)
        .await
        .read_events(proto::ReadEventsRequest::default())
        .await
        .expect("auditors read the log")
        .into_inner();
    let mut events = Vec::new();
    while let Some(message) = stream.message().await.expect("event stream") {
        events.extend(message.event);
    }
    events
}

/// The `access.denied` events, once at least `at_least` are recorded (a task of their
/// own records them, a moment after the refusal).
async fn denials(server: &TestServer, issuer: &Issuer, at_least: usize) -> Vec<Value> {
    for _ in 0..500 {
        let found: Vec<Value> = all_events(server, issuer)
            .await
            .into_iter()
            .filter(|e| e.kind == "access.denied")
            .map(|e| serde_json::from_str(&e.payload_json).expect("JSON payload"))
            .collect();
        if found.len() >= at_least {
            return found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("fewer than {at_least} access denials were recorded");
}

/// A production IAM admin grant: pending, reviewed by `security`; on behalf of nobody.
/// Checks the admin grant as `sends`, then reads the recorded action back with the same
/// credential.
async fn check_and_read_back(
    server: &TestServer,
    sends: Sends,
) -> (proto::CheckActionResponse, proto::ActionRecord) {
    let checked = gate(server, sends.clone())
        .await
        .check_action(admin_grant())
        .await
        .expect("check succeeds")
        .into_inner();
    let action = review(server, sends)
        .await
        .get_action(proto::GetActionRequest {
            action_id: checked.action_id.clone(),
        })
        .await
        .expect("the caller reads its action back")
        .into_inner()
        .action
        .expect("action");
    (checked, action)
}

fn admin_grant() -> proto::CheckActionRequest {
    let mut request = check(
        "iam.role.grant",
        "production",
        &[
            ("role", string("admin")),
            ("member", string("dave@example.com")),
        ],
    );
    if let Some(task) = request.task.as_mut() {
        task.on_behalf_of.clear();
    }
    request
}

fn approve(id: &str) -> proto::SubmitReviewRequest {
    proto::SubmitReviewRequest {
        action_id: id.to_string(),
        verdict: Verdict::Approve as i32,
        reason: "looks fine".into(),
        action_digest: String::new(),
    }
}

/// CheckAction's status code with these credentials.
async fn check_code(server: &TestServer, sends: Sends) -> Code {
    match gate(server, sends).await.check_action(admin_grant()).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn no_credentials_are_unauthenticated_and_identity_headers_are_not_credentials() {
    let issuer = Issuer::new();
    let (server, _keys) = server(&issuer).await;
    assert_eq!(
        check_code(&server, Sends::default()).await,
        Code::Unauthenticated
    );
    let forged = Sends::default()
        .and("x-countersign-principal", "alice")
        .and("x-countersign-kind", "human")
        .and("x-countersign-groups", "security,admins");
    assert_eq!(check_code(&server, forged).await, Code::Unauthenticated);
}

#[tokio::test]
async fn expired_wrong_audience_wrong_signature_and_unsigned_tokens_are_unauthenticated() {
    let issuer = Issuer::new();
    let (server, _keys) = server(&issuer).await;
    let mut expired = claims("deployer");
    expired["exp"] = json!(now() - 600);
    let mut wrong_audience = claims("deployer");
    wrong_audience["aud"] = json!("someone-else");
    let forged = Issuer::new().sign(&claims("deployer"));
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("deployer").to_string())
    );
    for (what, token) in [
        ("expired", issuer.sign(&expired)),
        ("wrong audience", issuer.sign(&wrong_audience)),
        ("wrong signature", forged),
        ("alg none", unsigned),
    ] {
        let status = gate(&server, Sends::bearer(&token))
            .await
            .check_action(admin_grant())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        for part in token.split('.').filter(|p| p.len() > 3) {
            assert!(
                !status.message().contains(part),
                "{what} quoted: {status:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_valid_agent_token_checks_an_action_recorded_under_its_subject() {
    let issuer = Issuer::new();
    let (server, _keys) = server(&issuer).await;
    let token = issuer.sign(&claims("deployer"));
    let (checked, action) = check_and_read_back(&server, Sends::bearer(&token)).await;
    assert_eq!(checked.status(), ActionStatus::Pending);
    let requester = action.requester.expect("requester");
    assert_eq!(requester.id, "deployer");
    assert_eq!(requester.kind(), proto::PrincipalKind::Agent);
    assert_eq!(requester.authenticated_by, format!("jwt:{ISS}"));
}

#[tokio::test]
async fn a_forged_identity_header_next_to_a_valid_token_changes_nothing() {
    let issuer = Issuer::new();
    let (server, _keys) = server(&issuer).await;
    let token = issuer.sign(&claims("deployer"));
    let sends = Sends::bearer(&token)
        .and("x-countersign-principal", "alice")
        .and("x-countersign-kind", "human")
        .and("x-countersign-groups", "security,admins");
    let (checked, action) = check_and_read_back(&server, sends.clone()).await;
    let requester = action.requester.expect("requester");
    assert_eq!(requester.id, "deployer");
    assert_eq!(requester.kind(), proto::PrincipalKind::Agent);
    assert!(requester.groups.is_empty());
    // Still an agent: it cannot review, whatever the headers claim.
    let status = review(&server, sends)
        .await
        .submit_review(approve(&checked.action_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test]
async fn a_static_token_works_and_an_agent_token_cannot_review() {
    let issuer = Issuer::new();
    let (server, _keys) = server(&issuer).await;
    for sends in [
        Sends::bearer(PIPELINE_TOKEN),
        Sends::default().and("x-countersign-token", PIPELINE_TOKEN),
    ] {
        let (checked, action) = check_and_read_back(&server, sends.clone()).await;
        let requester = action.requester.expect("requester");
        assert_eq!(requester.id, "pipeline");
        assert_eq!(requester.authenticated_by, "token:pipeline");

        let status = review(&server, sends)
            .await
            .submit_review(approve(&checked.action_id))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("only humans review"),
            "{status:?}"
        );
    }
    let status = gate(
        &server,
        Sends::bearer("not-a-configured-token-at-all-0123456789"),
    )
    .await
    .check_action(admin_grant())
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_same_human_through_two_credentials_still_cannot_approve_their_own_action() {
    let issuer = Issuer::new();
    let (server, _keys) = server(&issuer).await;
    let alice_jwt = issuer.sign(&human_claims("alice", &["security"]));
    for (requests_with, approves_with) in [
        (Sends::bearer(&alice_jwt), Sends::bearer(ALICE_TOKEN)),
        (Sends::bearer(ALICE_TOKEN), Sends::bearer(&alice_jwt)),
    ] {
        let checked = gate(&server, requests_with)
            .await
            .check_action(admin_grant())
            .await
            .expect("check succeeds")
            .into_inner();
        assert_eq!(checked.status(), ActionStatus::Pending);
        let status = review(&server, approves_with)
            .await
            .submit_review(approve(&checked.action_id))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("requested this action"),
            "{status:?}"
        );
    }
}

#[tokio::test]
async fn an_agent_acting_for_alice_records_her_and_she_cannot_approve() {
    let issuer = Issuer::new();
    let (server, _keys) = server(&issuer).await;
    // RFC 8693 delegation: the subject is the human, `act` the agent calling.
    let mut delegated = claims("alice");
    delegated["act"] = json!({"sub": "deployer"});
    let token = issuer.sign(&delegated);
    let (checked, action) = check_and_read_back(&server, Sends::bearer(&token)).await;
    assert_eq!(
        action.on_behalf_of_source(),
        proto::OnBehalfOfSource::Credential
    );
    assert_eq!(action.requester.expect("requester").id, "deployer");
    assert_eq!(action.task.expect("task").on_behalf_of, "alice");

    let status = review(&server, Sends::bearer(ALICE_TOKEN))
        .await
        .submit_review(approve(&checked.action_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("on behalf of alice"),
        "{status:?}"
    );

    // The body may repeat the token's human, but not name another one.
    let mut naming_bob = admin_grant();
    if let Some(task) = naming_bob.task.as_mut() {
        task.on_behalf_of = "bob".into();
    }
    let status = gate(&server, Sends::bearer(&token))
        .await
        .check_action(naming_bob)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.message(),
        "the token acts for alice; the request names bob in task.on_behalf_of"
    );
}

#[tokio::test]
async fn with_credentials_a_non_loopback_address_is_refused_because_tls_is_missing() {
    let issuer = Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("idp.pem"), &issuer.public_pem).unwrap();
    let mut jwt = JwtConfig::new(ISS, AUD);
    jwt.public_keys.push(PublicKeyFile {
        path: "idp.pem".into(),
        kid: None,
    });
    let mut config =
        countersign::config::ServerConfig::new(dir.path().join("log"), common::shipped_policies());
    config.listen = "0.0.0.0:0".parse().unwrap();
    config.auth = AuthSettings::Credentials {
        jwt: Some(Box::new(jwt)),
        tokens: None,
        mtls: None,
        base_dir: dir.path().to_path_buf(),
    };
    let err = common::try_start_server(config)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("TLS"), "{err}");
}

#[test]
fn serve_with_a_jwt_config_naming_a_missing_key_file_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("countersign.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:0"
data_dir = "data"
policies = {policies:?}

[auth.jwt]
issuer = "{ISS}"
audience = "{AUD}"
public_keys = [{{ path = "keys/missing-idp.pem" }}]
"#,
            policies = common::shipped_policies().display().to_string()
        ),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_countersign"))
        .env_remove("RUST_LOG")
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("binary runs");
    assert_eq!(output.status.code(), Some(2), "serve must refuse");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("missing-idp.pem"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn a_reviewer_cannot_read_the_audit_log_and_the_refusal_is_recorded_without_the_token() {
    let issuer = Issuer::new();
    let (server, _keys) = server(&issuer).await;
    // alice reviews (she is in `security`), but she is no auditor.
    let mut alice = audit(&server, Sends::bearer(ALICE_TOKEN)).await;
    let status = alice
        .read_events(proto::ReadEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("`auditors`"), "{status:?}");
    let status = alice
        .verify_log(proto::VerifyLogRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let recorded = denials(&server, &issuer, 2).await;
    let rpcs: Vec<&str> = recorded
        .iter()
        .map(|d| d["rpc"].as_str().unwrap())
        .collect();
    assert_eq!(
        rpcs,
        [
            "/countersign.v1.AuditService/ReadEvents",
            "/countersign.v1.AuditService/VerifyLog"
        ]
    );
    for denial in &recorded {
        assert_eq!(denial["status"], "permission_denied");
        assert_eq!(denial["principal"]["id"], "alice");
        assert_eq!(
            denial["principal"]["authenticated_by"],
            "token:alice-laptop"
        );
        assert!(!denial.to_string().contains(ALICE_TOKEN), "{denial}");
    }
}

#[tokio::test]
async fn repeated_bad_credentials_are_recorded_once_and_counted_instead_of_flooding_the_log() {
    const ATTEMPTS: u64 = 300;
    let issuer = Issuer::new();
    let (mut server, _keys) = server(&issuer).await;
    let stolen_looking = "Zx9Lw2Qe5Rt8Yu1Io4Pa7Sd0Fg3Hj6Kl9Zx2Cv5Bn8X=";
    let mut client = gate(&server, Sends::bearer(stolen_looking)).await;
    for _ in 0..ATTEMPTS {
        let status = client.check_action(admin_grant()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    // The first refusal is recorded at once.
    let first = denials(&server, &issuer, 1).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["count"], 1);
    assert_eq!(first[0]["aggregated"], false);
    assert_eq!(first[0]["subject"], "127.0.0.1");

    // The rest are counted; a graceful stop records the count without waiting for the
    // window to close.
    server.restart().await;
    let recorded = denials(&server, &issuer, 2).await;
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert_eq!(recorded[1]["count"], ATTEMPTS - 1);
    assert_eq!(recorded[1]["aggregated"], true);
    assert_eq!(recorded[1]["status"], "unauthenticated");
    assert_eq!(recorded[1]["rpc"], "/countersign.v1.ActionGate/CheckAction");
    assert!(recorded[1]["principal"].is_null());
    for denial in &recorded {
        assert!(!denial.to_string().contains(stolen_looking), "{denial}");
    }
}

#[tokio::test]
async fn only_trusted_agents_may_assert_whom_they_act_for_and_it_is_recorded_as_asserted() {
    let issuer = Issuer::new();
    let (server, _keys) = server(&issuer).await;
    let mut for_alice = admin_grant();
    if let Some(task) = for_alice.task.as_mut() {
        task.on_behalf_of = "alice".into();
    }

    // `pipeline` is in no asserter group.
    let status = gate(&server, Sends::bearer(PIPELINE_TOKEN))
        .await
        .check_action(for_alice.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("roles.on_behalf_of_asserters"),
        "{status:?}"
    );

    // An orchestrator may, and the record says the human is only asserted.
    let mut orchestrator = claims("flow-runner");
    orchestrator["groups"] = json!(["orchestrators"]);
    let sends = Sends::bearer(&issuer.sign(&orchestrator));
    let checked = gate(&server, sends.clone())
        .await
        .check_action(for_alice)
        .await
        .expect("a trusted agent asserts the human")
        .into_inner();
    let action = review(&server, sends)
        .await
        .get_action(proto::GetActionRequest {
            action_id: checked.action_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(action.task.as_ref().unwrap().on_behalf_of, "alice");
    assert_eq!(
        action.on_behalf_of_source(),
        proto::OnBehalfOfSource::Asserted
    );
    // Asserted or not, alice cannot approve an action taken in her name.
    let status = review(&server, Sends::bearer(ALICE_TOKEN))
        .await
        .submit_review(approve(&checked.action_id))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("on behalf of alice"),
        "{status:?}"
    );
}

/// Each call over the budget is answered RESOURCE_EXHAUSTED and none of them costs an
/// event of its own; another principal keeps its own budget.
#[tokio::test]
async fn a_principal_over_its_write_budget_is_resource_exhausted_and_others_are_not() {
    use common::Caller;
    use tonic_types::StatusExt as _;
    let mut server = TestServer::start().await;
    let id = server
        .gate(&Caller::human("dave", "security"))
        .await
        .check_action(admin_grant())
        .await
        .expect("check")
        .into_inner()
        .action_id;
    // Dave approving his own action, 300 times at once: the default review budget is
    // bursts of 100, 20 a second.
    let dave = server.review(&Caller::human("dave", "security")).await;
    let mut votes = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let mut dave = dave.clone();
        let vote = approve(&id);
        votes.spawn(async move { dave.submit_review(vote).await.unwrap_err() });
    }
    let (mut refused, mut exhausted) = (0u64, 0u64);
    while let Some(status) = votes.join_next().await {
        let status = status.unwrap();
        match status.code() {
            Code::PermissionDenied => refused += 1,
            Code::ResourceExhausted => {
                exhausted += 1;
                let message = status.message();
                assert!(message.contains("review budget"), "{message}");
                assert!(message.contains("retry in"), "{message}");
                let retry = status.get_details_retry_info().expect("RetryInfo");
                assert!(retry.retry_delay.is_some());
            }
            other => panic!("{other:?}: {}", status.message()),
        }
    }
    assert!(exhausted >= 100, "{exhausted} of 300 over budget");
    assert_eq!(refused + exhausted, 300);

    // Carol's vote goes through: Dave's budget is Dave's.
    let carol = server
        .review(&Caller::human("carol", "security"))
        .await
        .submit_review(approve(&id))
        .await
        .expect("another principal is not limited");
    assert_eq!(carol.into_inner().action.unwrap().votes.len(), 1);

    // The calls over budget are counted, not written one by one: after the stop, at most
    // one event at once and one summary, and their counts add up.
    server.restart().await;
    let events = common::read_events(&server, "").await;
    let over_budget: Vec<Value> = events
        .iter()
        .filter(|e| e.kind == "access.denied")
        .map(|e| serde_json::from_str::<Value>(&e.payload_json).unwrap())
        .filter(|p| p["status"] == "resource_exhausted")
        .collect();
    assert!(over_budget.len() <= 2, "{over_budget:#?}");
    let counted: u64 = over_budget
        .iter()
        .map(|p| p["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, exhausted);
    assert_eq!(over_budget[0]["principal"]["id"], "dave");
    let review_refused: Vec<Value> = events
        .iter()
        .filter(|e| e.kind == "review.refused")
        .map(|e| serde_json::from_str::<Value>(&e.payload_json).unwrap())
        .collect();
    assert!(review_refused.len() <= 2, "{review_refused:#?}");
    let counted: u64 = review_refused
        .iter()
        .map(|p| p["repeats"]["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(counted, refused);
}
