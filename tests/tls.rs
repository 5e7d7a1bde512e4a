//! TLS and mTLS through the real server: client certificates mapped to principals, the
//! handshake refusing strangers, bearer credentials over TLS, secure-by-default listening,
//! the reviewer CLI over https:// and `trial-certs`.
//!
//! Every CA, certificate and key is generated inside the tests with rcgen; nothing is a
//! committed fixture.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, check, string};
use countersign::auth::{IdentityEntry, MtlsConfig, TokenConfig, TokenEntry, token_hash};
use countersign::config::{AuthSettings, ServerConfig, TlsSettings};
use countersign::domain::PrincipalKind;
use countersign::proto::action_gate_client::ActionGateClient;
use countersign::proto::audit_service_client::AuditServiceClient;
use countersign::proto::review_service_client::ReviewServiceClient;
use countersign::proto::{self, ActionStatus, Verdict};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use tempfile::TempDir;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const TRUST_DOMAIN: &str = "spiffe://example.org";
const DEPLOYER_SAN: &str = "spiffe://example.org/agent/deployer";
const ALICE_SAN: &str = "alice.reviewers.example.org";
const AUDITOR_SAN: &str = "spiffe://example.org/human/auditor";
/// A static token for the agent `pipeline`.
const PIPELINE_TOKEN: &str = "Zx9Lw2Qe5Rt8Yu1Io4Pa7Sd0Fg3Hj6Kl9Zx2Cv5Bn8M=";
/// A static token for the human bob in `security`.
const BOB_TOKEN: &str = "q3Vb8mZ1xR7tK2wN5pL0sD4fG6hJ9cA1eY8uI3oT5nM=";
/// No CLI run may take longer; a hang fails instead of blocking CI.
const DEADLINE: Duration = Duration::from_secs(30);

// === A certificate authority for one test ===

/// A CA that issues server and client certificates.
struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
struct Pem {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Pem {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// For `localhost`, 127.0.0.1 and ::1.
    fn server(&self) -> Pem {
        self.issue(
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client_uri(&self, uri: &str) -> Pem {
        self.issue(
            vec![SanType::URI(uri.try_into().unwrap())],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn client_dns(&self, name: &str) -> Pem {
        self.issue(
            vec![SanType::DnsName(name.try_into().unwrap())],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// The CA and the server's certificate on disk, where the config points.
struct Pki {
    dir: TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new("countersign test CA"),
        };
        let server = pki.ca.server();
        pki.write("ca.pem", &pki.ca.cert_pem);
        pki.write("server.pem", &server.cert);
        pki.write("server-key.pem", &server.key);
        pki
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tls(&self) -> TlsSettings {
        TlsSettings {
            cert: self.path("server.pem"),
            key: self.path("server-key.pem"),
        }
    }

    /// Client certificates only: the deployer agent (SPIFFE ID), alice the security
    /// reviewer (DNS SAN), an auditor.
    fn mtls_only(&self) -> AuthSettings {
        self.auth(true, false)
    }

    /// Client certificates and static tokens (pipeline, an agent; bob, a reviewer).
    fn mtls_and_tokens(&self) -> AuthSettings {
        self.auth(true, true)
    }

    fn auth(&self, mtls: bool, tokens: bool) -> AuthSettings {
        let identity = |san: &str, principal: &str, kind, groups: &[&str]| IdentityEntry {
            san: san.into(),
            principal: principal.into(),
            kind,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        let token = |token: &str, principal: &str, kind, groups: &[&str]| TokenEntry {
            name: None,
            sha256: token_hash(token),
            principal: principal.into(),
            kind,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        AuthSettings::Credentials {
            jwt: None,
            tokens: tokens.then(|| TokenConfig {
                tokens: vec![
                    token(PIPELINE_TOKEN, "pipeline", PrincipalKind::Agent, &[]),
                    token(BOB_TOKEN, "bob", PrincipalKind::Human, &["security"]),
                ],
            }),
            mtls: mtls.then(|| MtlsConfig {
                // Relative: resolved against base_dir, like a path in the config file.
                client_ca: "ca.pem".into(),
                identities: vec![
                    identity(
                        DEPLOYER_SAN,
                        "deployer",
                        PrincipalKind::Agent,
                        &["deployers"],
                    ),
                    identity(ALICE_SAN, "alice", PrincipalKind::Human, &["security"]),
                    identity(AUDITOR_SAN, "auditor", PrincipalKind::Human, &["auditors"]),
                ],
            }),
            base_dir: self.dir.path().to_path_buf(),
        }
    }

    async fn server(&self, auth: AuthSettings) -> TestServer {
        TestServer::try_start_secured(auth, Some(self.tls()))
            .await
            .expect("server starts")
    }

    /// A client trusting this CA, presenting `identity` if any.
    fn client(&self, identity: Option<Pem>) -> Client {
        Client {
            ca: self.ca.cert_pem.clone(),
            identity,
            sends: Sends::default(),
        }
    }

    fn deployer(&self) -> Client {
        self.client(Some(self.ca.client_uri(DEPLOYER_SAN)))
    }

    fn alice(&self) -> Client {
        self.client(Some(self.ca.client_dns(ALICE_SAN)))
    }

    fn auditor(&self) -> Client {
        self.client(Some(self.ca.client_uri(AUDITOR_SAN)))
    }
}

// === Clients ===

/// Metadata a client sends on every call.
#[derive(Clone, Default)]
struct Sends(Vec<(&'static str, String)>);

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

/// How a test client connects: the CA it trusts, its certificate, its metadata.
#[derive(Clone)]
struct Client {
    ca: String,
    identity: Option<Pem>,
    sends: Sends,
}

impl Client {
    fn sending(mut self, key: &'static str, value: &str) -> Client {
        self.sends.0.push((key, value.to_string()));
        self
    }

    fn bearer(self, token: &str) -> Client {
        self.sending("authorization", &format!("Bearer {token}"))
    }

    /// A TLS connection to `address`, or why there is none.
    async fn channel(&self, address: SocketAddr) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some(pem) = &self.identity {
            tls = tls.identity(Identity::from_pem(&pem.cert, &pem.key));
        }
        Endpoint::from_shared(format!("https://{address}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls config")
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))
    }

    async fn gate(
        &self,
        address: SocketAddr,
    ) -> Result<ActionGateClient<InterceptedService<Channel, Sends>>, String> {
        Ok(ActionGateClient::with_interceptor(
            self.channel(address).await?,
            self.sends.clone(),
        ))
    }

    async fn review(
        &self,
        address: SocketAddr,
    ) -> ReviewServiceClient<InterceptedService<Channel, Sends>> {
        ReviewServiceClient::with_interceptor(
            self.channel(address).await.expect("connects"),
            self.sends.clone(),
        )
    }

    /// CheckAction of `request`: the answer, or the connection's or the call's error.
    async fn check(
        &self,
        address: SocketAddr,
        request: proto::CheckActionRequest,
    ) -> Result<proto::CheckActionResponse, CallError> {
        let mut gate = self.gate(address).await.map_err(CallError::Connect)?;
        match tokio::time::timeout(Duration::from_secs(10), gate.check_action(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CallError::Status(status)),
            Err(_) => panic!("CheckAction hung"),
        }
    }

    async fn record(&self, address: SocketAddr, id: &str) -> proto::ActionRecord {
        self.review(address)
            .await
            .get_action(proto::GetActionRequest {
                action_id: id.to_string(),
            })
            .await
            .expect("get action")
            .into_inner()
            .action
            .expect("record")
    }
}

#[derive(Debug)]
enum CallError {
    Connect(String),
    Status(tonic::Status),
}

impl CallError {
    fn status(self) -> tonic::Status {
        match self {
            CallError::Status(status) => status,
            CallError::Connect(e) => panic!("expected a status, the connection failed: {e}"),
        }
    }
}

/// The call failed below gRPC: countersign itself never answered. When the client got to
/// read the server's TLS alert (it may see only the closed connection instead), it is
/// `alert`.
fn assert_handshake_refused(err: &CallError, alert: &str) {
    let text = format!("{err:?}");
    if let CallError::Status(status) = err {
        assert!(
            matches!(
                status.code(),
                Code::Unknown | Code::Unavailable | Code::Cancelled
            ),
            "{text}"
        );
        assert!(std::error::Error::source(status).is_some(), "{text}");
    }
    if text.contains("fatal alert") {
        assert!(text.contains(alert), "{text}");
    }
}

/// A production IAM admin grant: pending, two `security` approvals; on behalf of nobody.
fn admin_grant() -> proto::CheckActionRequest {
    let mut request = check(
        "iam.role.grant",
        "production",
        &[("role", string("admin")), ("member", string("dave"))],
    );
    if let Some(task) = request.task.as_mut() {
        task.on_behalf_of.clear();
    }
    request
}

/// A production IAM viewer grant: pending, one `security` approval.
fn viewer_grant() -> proto::CheckActionRequest {
    let mut request = admin_grant();
    if let Some(params) = request.action.as_mut().and_then(|a| a.parameters.as_mut()) {
        params.fields.insert("role".into(), string("viewer"));
    }
    request
}

/// Every event in the log, read by the auditor over mTLS.
async fn events(pki: &Pki, server: &TestServer) -> Vec<proto::Event> {
    let channel = pki
        .auditor()
        .channel(server.addr())
        .await
        .expect("connects");
    let mut audit = AuditServiceClient::new(channel);
    let mut stream = audit
        .read_events(proto::ReadEventsRequest {
            after_sequence: 0,
            action_id: String::new(),
            follow: false,
        })
        .await
        .expect("read events")
        .into_inner();
    let mut events = Vec::new();
    while let Some(message) = stream.message().await.expect("event stream") {
        events.extend(message.event);
    }
    events
}

/// Nothing at all: neither an action nor an `access.denied` (a failed handshake never
/// reaches the guard that records refusals).
async fn nothing_recorded(pki: &Pki, server: &TestServer) {
    let kinds: Vec<String> = events(pki, server)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.is_empty(), "recorded: {kinds:?}");
}

// === Client certificates ===

#[tokio::test]
async fn an_mtls_agent_checks_an_action_recorded_under_its_mapped_principal() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_only()).await;
    let deployer = pki.deployer();

    let checked = deployer
        .check(server.addr(), admin_grant())
        .await
        .expect("check succeeds");
    assert_eq!(checked.status(), ActionStatus::Pending);

    let record = deployer.record(server.addr(), &checked.action_id).await;
    let requester = record.requester.expect("requester");
    assert_eq!(requester.id, "deployer");
    assert_eq!(requester.kind(), proto::PrincipalKind::Agent);
    assert_eq!(requester.groups, ["deployers"]);
    assert_eq!(requester.authenticated_by, format!("mtls:{DEPLOYER_SAN}"));

    let events = events(&pki, &server).await;
    let requested = events
        .iter()
        .find(|e| e.kind == "action.requested")
        .expect("action.requested");
    assert_eq!(requested.actor, "deployer");
    assert!(
        requested
            .payload_json
            .contains(&format!("\"mtls:{DEPLOYER_SAN}\"")),
        "{}",
        requested.payload_json
    );
}

#[tokio::test]
async fn a_dns_san_maps_a_human_reviewer_whose_vote_is_recorded_as_hers() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_only()).await;
    let checked = pki
        .deployer()
        .check(server.addr(), viewer_grant())
        .await
        .expect("check succeeds");
    assert_eq!(checked.approvals_required, 1);

    let alice = pki.alice();
    alice
        .review(server.addr())
        .await
        .submit_review(proto::SubmitReviewRequest {
            action_id: checked.action_id.clone(),
            verdict: Verdict::Approve as i32,
            reason: "checked the ticket".into(),
            action_digest: checked.action_digest.clone(),
        })
        .await
        .expect("alice may approve");
    let record = alice.record(server.addr(), &checked.action_id).await;
    assert_eq!(record.status(), ActionStatus::Approved);
    assert_eq!(record.votes[0].reviewer_id, "alice");
    let voted = events(&pki, &server)
        .await
        .into_iter()
        .find(|e| e.kind == "review.voted")
        .expect("review.voted");
    assert!(
        voted
            .payload_json
            .contains(&format!("\"mtls:{ALICE_SAN}\"")),
        "{}",
        voted.payload_json
    );
}

#[tokio::test]
async fn a_client_certificate_from_an_unknown_ca_fails_the_handshake_and_records_nothing() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_only()).await;
    // Same SAN as the real deployer, signed by a CA the server never heard of.
    let impostor = pki.client(Some(Ca::new("someone else").client_uri(DEPLOYER_SAN)));

    let err = impostor
        .check(server.addr(), admin_grant())
        .await
        .expect_err("the handshake fails");
    // Seen by the client after its side of the handshake (TLS 1.3 lets it finish first).
    assert_handshake_refused(&err, "UnknownCA");
    nothing_recorded(&pki, &server).await;
}

#[tokio::test]
async fn with_only_mtls_a_client_without_a_certificate_gets_nothing() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_only()).await;
    let anonymous = pki.client(None);

    let err = anonymous
        .check(server.addr(), admin_grant())
        .await
        .expect_err("a certificate is required");
    assert_handshake_refused(&err, "CertificateRequired");
    // Nor with a bearer token: the handshake comes first.
    let err = anonymous
        .bearer(PIPELINE_TOKEN)
        .check(server.addr(), admin_grant())
        .await;
    assert!(err.is_err(), "{err:?}");
    nothing_recorded(&pki, &server).await;
}

#[tokio::test]
async fn an_unmapped_san_is_unauthenticated_naming_the_san() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_only()).await;
    let stranger = pki.client(Some(
        pki.ca.client_uri(&format!("{TRUST_DOMAIN}/agent/stranger")),
    ));

    let status = stranger
        .check(server.addr(), admin_grant())
        .await
        .expect_err("refused")
        .status();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.message(),
        "invalid credentials: no principal is mapped to the client certificate's SANs: \
         URI:spiffe://example.org/agent/stranger"
    );
    // No action; the refusal is audited, naming the SAN (a task of its own records it).
    let denied = loop_until_denied(&pki, &server).await;
    assert!(
        denied.iter().all(|e| e.kind == "access.denied"),
        "{denied:?}"
    );
    assert!(
        denied[0]
            .payload_json
            .contains("URI:spiffe://example.org/agent/stranger"),
        "{}",
        denied[0].payload_json
    );
}

/// Every event, once at least one `access.denied` is among them.
async fn loop_until_denied(pki: &Pki, server: &TestServer) -> Vec<proto::Event> {
    for _ in 0..250 {
        let events = events(pki, server).await;
        if events.iter().any(|e| e.kind == "access.denied") {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no access.denied was recorded");
}

#[tokio::test]
async fn a_forged_identity_header_next_to_a_client_certificate_changes_nothing() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_only()).await;
    let forging = pki
        .deployer()
        .sending("x-countersign-principal", "alice")
        .sending("x-countersign-kind", "human")
        .sending("x-countersign-groups", "security,auditors,admins");

    let checked = forging
        .check(server.addr(), viewer_grant())
        .await
        .expect("check succeeds");
    let requester = forging
        .record(server.addr(), &checked.action_id)
        .await
        .requester
        .expect("requester");
    assert_eq!(requester.id, "deployer");
    assert_eq!(requester.kind(), proto::PrincipalKind::Agent);
    assert_eq!(requester.groups, ["deployers"]);

    // Still the agent: it cannot review, whatever the headers claim.
    let status = forging
        .review(server.addr())
        .await
        .submit_review(proto::SubmitReviewRequest {
            action_id: checked.action_id,
            verdict: Verdict::Approve as i32,
            reason: "me".into(),
            action_digest: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

// === Bearer credentials over TLS ===

#[tokio::test]
async fn with_tokens_too_a_token_over_tls_works_without_a_client_certificate() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_and_tokens()).await;
    let no_certificate = pki.client(None);

    let with_token = no_certificate.clone().bearer(PIPELINE_TOKEN);
    let checked = with_token
        .check(server.addr(), admin_grant())
        .await
        .expect("a token over TLS works");
    let requester = with_token
        .record(server.addr(), &checked.action_id)
        .await
        .requester
        .expect("requester");
    assert_eq!(requester.id, "pipeline");
    assert_eq!(requester.authenticated_by, "token:pipeline");

    // Neither a certificate nor a token: unauthenticated, told what to send.
    let status = no_certificate
        .check(server.addr(), admin_grant())
        .await
        .expect_err("refused")
        .status();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status
            .message()
            .contains("present a client certificate, or send"),
        "{status:?}"
    );

    // The certificate still authenticates alone...
    let checked = pki
        .deployer()
        .check(server.addr(), admin_grant())
        .await
        .expect("mTLS works alongside tokens");
    let requester = pki
        .deployer()
        .record(server.addr(), &checked.action_id)
        .await
        .requester
        .expect("requester");
    assert_eq!(requester.id, "deployer");

    // ...but a token on the same connection names the caller.
    let both = pki.deployer().bearer(PIPELINE_TOKEN);
    let checked = both
        .check(server.addr(), admin_grant())
        .await
        .expect("check succeeds");
    let requester = both
        .record(server.addr(), &checked.action_id)
        .await
        .requester
        .expect("requester");
    assert_eq!(requester.id, "pipeline");
    assert_eq!(requester.authenticated_by, "token:pipeline");
}

#[tokio::test]
async fn with_optional_client_certificates_one_from_an_unknown_ca_still_fails_the_handshake() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_and_tokens()).await;
    let impostor = pki
        .client(Some(Ca::new("someone else").client_uri(DEPLOYER_SAN)))
        .bearer(PIPELINE_TOKEN);
    let err = impostor
        .check(server.addr(), admin_grant())
        .await
        .expect_err("the handshake fails");
    assert_handshake_refused(&err, "UnknownCA");
    nothing_recorded(&pki, &server).await;
}

#[tokio::test]
async fn a_plaintext_client_gets_nothing_from_the_tls_server() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_and_tokens()).await;
    let channel = Endpoint::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await;
    if let Ok(channel) = channel {
        let mut gate = ActionGateClient::with_interceptor(
            channel,
            Sends(vec![("authorization", format!("Bearer {PIPELINE_TOKEN}"))]),
        );
        let result =
            tokio::time::timeout(Duration::from_secs(10), gate.check_action(admin_grant()))
                .await
                .expect("answers or fails, never hangs");
        assert!(result.is_err(), "plaintext got through: {result:?}");
    }
    nothing_recorded(&pki, &server).await;
}

// === Secure by default ===

#[tokio::test]
async fn with_tls_and_authentication_the_server_listens_on_every_interface() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(data.path().join("log"), common::shipped_policies());
    config.listen = "0.0.0.0:0".parse().unwrap();
    config.auth = pki.mtls_only();
    config.tls = Some(pki.tls());
    let running = common::try_start_server(config)
        .await
        .expect("TLS + authentication may listen beyond loopback");
    let address = SocketAddr::from(([127, 0, 0, 1], running.local_addr().port()));
    let checked = pki
        .deployer()
        .check(address, admin_grant())
        .await
        .expect("check over TLS");
    assert_eq!(checked.status(), ActionStatus::Pending);
    common::stop_server(running).await;
}

#[tokio::test]
async fn beyond_loopback_start_refuses_in_one_line_naming_what_is_missing() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cases = [
        (
            pki.mtls_and_tokens(),
            None,
            "refusing to listen on 0.0.0.0:0: without TLS, credentials would cross the network in the clear; configure [tls] (cert and key), or listen on a loopback address (127.0.0.1 or [::1])",
        ),
        (
            AuthSettings::Development,
            Some(pki.tls()),
            "refusing to listen on 0.0.0.0:0: development identity mode trusts whatever callers say, so it stays on a loopback address (127.0.0.1 or [::1]) even with TLS; configure [auth] to listen elsewhere",
        ),
        (
            AuthSettings::Development,
            None,
            "refusing to listen on 0.0.0.0:0: development identity mode trusts whatever callers say and there is no TLS; configure [auth] and [tls], or listen on a loopback address (127.0.0.1 or [::1])",
        ),
    ];
    for (auth, tls, expected) in cases {
        let mut config = ServerConfig::new(data.path().join("log"), common::shipped_policies());
        config.listen = "0.0.0.0:0".parse().unwrap();
        config.auth = auth;
        config.tls = tls;
        let err = common::try_start_server(config)
            .await
            .err()
            .expect("refused");
        assert_eq!(err.to_string(), expected);
    }
    // Refused before the data directory was touched.
    assert!(!data.path().join("log").exists());
}

#[tokio::test]
async fn development_identity_may_use_tls_on_loopback() {
    let pki = Pki::new();
    let server = TestServer::try_start_secured(AuthSettings::Development, Some(pki.tls()))
        .await
        .expect("loopback with TLS is fine");
    let agent = pki
        .client(None)
        .sending("x-countersign-principal", "deploy-bot");
    let checked = agent
        .check(server.addr(), admin_grant())
        .await
        .expect("check over TLS");
    let requester = agent
        .record(server.addr(), &checked.action_id)
        .await
        .requester
        .expect("requester");
    assert_eq!(requester.id, "deploy-bot");
    assert_eq!(requester.authenticated_by, "development-header");
}

#[test]
fn serve_with_development_identity_and_tls_on_all_interfaces_exits_2_in_one_line() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let output = countersign()
        .args(["serve", "--listen", "0.0.0.0:0", "--tls-cert"])
        .arg(pki.path("server.pem"))
        .arg("--tls-key")
        .arg(pki.path("server-key.pem"))
        .arg("--data-dir")
        .arg(data.path())
        .arg("--policies")
        .arg(common::shipped_policies())
        .output()
        .expect("binary runs");
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "countersign: refusing to listen on 0.0.0.0:0: development identity mode trusts whatever callers say, so it stays on a loopback address (127.0.0.1 or [::1]) even with TLS; configure [auth] to listen elsewhere\n"
    );
}

#[test]
fn serve_with_an_unusable_tls_key_exits_2_in_one_line_naming_the_file() {
    let pki = Pki::new();
    let other = Ca::new("other").server();
    pki.write("wrong-key.pem", &other.key);
    pki.write("not-a-key.pem", "hello\n");
    for (key, expected) in [
        ("missing-key.pem", "cannot read tls.key "),
        ("not-a-key.pem", "no private key in the file"),
        (
            "wrong-key.pem",
            "is not the key of the certificate in tls.cert",
        ),
    ] {
        let config = pki.write(
            "countersign.toml",
            &format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\npolicies = {policies:?}\n\n[tls]\ncert = \"server.pem\"\nkey = \"{key}\"\n",
                policies = common::shipped_policies().display().to_string()
            ),
        );
        let output = countersign()
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .expect("binary runs");
        assert_eq!(output.status.code(), Some(2), "{key}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{key}: {stderr}");
        assert!(stderr.contains(key), "names the file: {stderr}");
        assert!(!stderr.contains("BEGIN"), "{stderr}");
        assert!(
            !pki.path("data").exists(),
            "refused before the log was opened"
        );
    }
}

// === The reviewer CLI over TLS ===

/// The `countersign` binary, isolated from the caller's environment.
fn countersign() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_countersign"));
    for variable in [
        "RUST_LOG",
        "COUNTERSIGN_SERVER",
        "COUNTERSIGN_PRINCIPAL",
        "COUNTERSIGN_GROUPS",
        "COUNTERSIGN_TOKEN",
        "COUNTERSIGN_TOKEN_FILE",
        "COUNTERSIGN_CA_CERT",
        "COUNTERSIGN_CLIENT_CERT",
        "COUNTERSIGN_CLIENT_KEY",
        "COUNTERSIGN_TLS_CERT",
        "COUNTERSIGN_TLS_KEY",
        "COUNTERSIGN_CONFIG",
        "COUNTERSIGN_LISTEN",
    ] {
        command.env_remove(variable);
    }
    command.stdin(Stdio::null());
    command
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the command off the test's runtime (which serves), killed after `DEADLINE`.
async fn run(mut command: Command) -> Run {
    tokio::task::spawn_blocking(move || {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("countersign starts");
        let started = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if started.elapsed() > DEADLINE {
                let _ = child.kill();
                panic!("countersign did not finish within {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let output = child.wait_with_output().expect("output");
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .expect("runner")
}

/// `countersign review <args> --server https://… --ca-cert …`.
fn review_cli(pki: &Pki, address: SocketAddr, args: &[&str]) -> Command {
    let mut command = countersign();
    command
        .arg("review")
        .args(args)
        .arg("--server")
        .arg(format!("https://{address}"))
        .arg("--ca-cert")
        .arg(pki.path("ca.pem"));
    command
}

#[tokio::test]
async fn the_reviewer_cli_lists_and_approves_over_mtls() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_only()).await;
    let checked = pki
        .deployer()
        .check(server.addr(), viewer_grant())
        .await
        .expect("check succeeds");
    let alice = pki.ca.client_dns(ALICE_SAN);
    let cert = pki.write("alice.pem", &alice.cert);
    let key = pki.write("alice-key.pem", &alice.key);
    let as_alice = |args: &[&str]| {
        let mut command = review_cli(&pki, server.addr(), args);
        command
            .arg("--client-cert")
            .arg(&cert)
            .arg("--client-key")
            .arg(&key)
            // Not sent: the certificate names the caller.
            .env("COUNTERSIGN_PRINCIPAL", "mallory");
        command
    };

    let listed = run(as_alice(&["list", "--status", "pending", "--json"])).await;
    assert_eq!(listed.code, Some(0), "{listed}");
    assert!(listed.stdout.contains(&checked.action_id), "{listed}");

    let approved = run(as_alice(&[
        "approve",
        &checked.action_id,
        "--reason",
        "viewer access for the audit",
    ]))
    .await;
    assert_eq!(approved.code, Some(0), "{approved}");
    assert!(approved.stdout.starts_with("APPROVED"), "{approved}");
    let record = pki.alice().record(server.addr(), &checked.action_id).await;
    assert_eq!(record.status(), ActionStatus::Approved);
    assert_eq!(record.votes[0].reviewer_id, "alice");

    // Without the client certificate the handshake fails: exit 2, saying where.
    let refused = run(review_cli(&pki, server.addr(), &["list", "--as", "alice"])).await;
    assert_eq!(refused.code, Some(2), "{refused}");
    assert!(refused.stderr.starts_with("countersign: "), "{refused}");
}

#[tokio::test]
async fn the_reviewer_cli_authenticates_with_a_token_file_or_the_environment() {
    let pki = Pki::new();
    let server = pki.server(pki.mtls_and_tokens()).await;
    let checked = pki
        .deployer()
        .check(server.addr(), viewer_grant())
        .await
        .expect("check succeeds");
    let token_file = pki.write("bob.token", &format!("{BOB_TOKEN}\n"));

    let mut from_file = review_cli(&pki, server.addr(), &["show", &checked.action_id, "--json"]);
    from_file
        .arg("--token-file")
        .arg(&token_file)
        .env("COUNTERSIGN_PRINCIPAL", "mallory");
    let shown = run(from_file).await;
    assert_eq!(shown.code, Some(0), "{shown}");
    assert!(shown.stdout.contains(&checked.action_id), "{shown}");
    assert!(!shown.stdout.contains(BOB_TOKEN) && !shown.stderr.contains(BOB_TOKEN));

    let mut from_env = review_cli(
        &pki,
        server.addr(),
        &["approve", &checked.action_id, "--reason", "looks right"],
    );
    from_env.env("COUNTERSIGN_TOKEN", BOB_TOKEN);
    let approved = run(from_env).await;
    assert_eq!(approved.code, Some(0), "{approved}");
    let record = pki.alice().record(server.addr(), &checked.action_id).await;
    assert_eq!(record.votes[0].reviewer_id, "bob");

    // A wrong token: the server refuses (exit 2, unauthenticated), and it is not echoed.
    let wrong = "Wr0ngT0kenWr0ngT0kenWr0ngT0kenWr0ngT0ken00=";
    let mut bad = review_cli(&pki, server.addr(), &["list"]);
    bad.env("COUNTERSIGN_TOKEN", wrong);
    let refused = run(bad).await;
    assert_eq!(refused.code, Some(2), "{refused}");
    assert!(refused.stderr.contains("unauthenticated"), "{refused}");
    assert!(!refused.stderr.contains(wrong), "{refused}");
}

#[tokio::test]
async fn reviewer_cli_usage_errors_exit_2_before_connecting() {
    let pki = Pki::new();
    // Nothing listens here: every error below comes before a connection.
    let address = SocketAddr::from(([127, 0, 0, 1], 9));
    let mut no_key = review_cli(&pki, address, &["list"]);
    no_key.arg("--client-cert").arg(pki.path("server.pem"));
    let run_no_key = run(no_key).await;
    assert_eq!(run_no_key.code, Some(2), "{run_no_key}");
    assert_eq!(
        run_no_key.stderr,
        "countersign: --client-cert needs --client-key: the private key of that certificate\n"
    );

    let mut no_ca = countersign();
    no_ca.args([
        "review",
        "list",
        "--as",
        "bob",
        "--server",
        "https://127.0.0.1:9",
    ]);
    let run_no_ca = run(no_ca).await;
    assert_eq!(run_no_ca.code, Some(2), "{run_no_ca}");
    assert!(
        run_no_ca.stderr.contains("give --ca-cert FILE"),
        "{run_no_ca}"
    );
}

// === trial-certs ===

#[tokio::test]
async fn trial_certs_make_a_server_and_clients_that_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let output = countersign()
        .args(["trial-certs", "--dir"])
        .arg(&certs)
        .output()
        .expect("binary runs");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let snippet = String::from_utf8(output.stdout).unwrap();
    assert!(snippet.contains("FOR TRIALS ONLY"), "{snippet}");

    // The printed snippet is the whole security config of the server.
    let config = dir.path().join("countersign.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\npolicies = {:?}\n\n{snippet}",
            common::shipped_policies().display().to_string()
        ),
    )
    .unwrap();
    let mut serve = countersign();
    serve
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&config);
    let process = common::spawn_serve(serve).await;
    assert!(
        process
            .startup_logs
            .contains("\"client_certificates\":\"required\""),
        "{}",
        process.startup_logs
    );

    let read = |name: &str| std::fs::read_to_string(certs.join(name)).unwrap();
    let deployer = Client {
        ca: read("ca.pem"),
        identity: Some(Pem {
            cert: read("deployer.pem"),
            key: read("deployer-key.pem"),
        }),
        sends: Sends::default(),
    };
    let checked = deployer
        .check(process.address, viewer_grant())
        .await
        .expect("the trial agent checks an action");
    let requester = deployer
        .record(process.address, &checked.action_id)
        .await
        .requester
        .expect("requester");
    assert_eq!(requester.id, "deployer");
    assert_eq!(
        requester.authenticated_by,
        "mtls:spiffe://example.org/agent/deployer"
    );

    // The trial reviewer approves with the CLI, exactly as the snippet's comment says.
    let mut approve = countersign();
    approve
        .args(["review", "approve", &checked.action_id, "--reason", "trial"])
        .arg("--server")
        .arg(format!("https://{}", process.address))
        .arg("--ca-cert")
        .arg(certs.join("ca.pem"))
        .arg("--client-cert")
        .arg(certs.join("alice.pem"))
        .arg("--client-key")
        .arg(certs.join("alice-key.pem"));
    let approved = run(approve).await;
    assert_eq!(approved.code, Some(0), "{approved}");
    assert!(approved.stdout.starts_with("APPROVED"), "{approved}");

    // Running it again never overwrites the CA.
    let again = countersign()
        .args(["trial-certs", "--dir"])
        .arg(&certs)
        .output()
        .expect("binary runs");
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"),
        "{again:?}"
    );
    assert_eq!(read("ca.pem"), deployer.ca);
}
