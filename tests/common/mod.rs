//! Starts the real server on an ephemeral loopback port and builds generated clients that
//! call it as a given principal.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use countersign::config::{AuthSettings, ServerConfig, TlsSettings};
use countersign::proto;
use countersign::proto::action_gate_client::ActionGateClient;
use countersign::proto::audit_service_client::AuditServiceClient;
use countersign::proto::policy_service_client::PolicyServiceClient;
use countersign::proto::review_service_client::ReviewServiceClient;
use countersign::server::{self, RunningServer};
use tempfile::TempDir;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A generated ActionGate client calling as some [`Caller`].
pub type Gate = ActionGateClient<InterceptedService<Channel, Caller>>;

/// The shipped policy directory.
pub fn shipped_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// Aborts the test binary, saying what hung, if dropped later than [`Watchdog::LIMIT`]
/// after it was made. The test's server shares the test's runtime thread: anything that
/// blocks that thread also stops every tokio timeout, and the hang would otherwise last
/// until CI's own limit with nothing said about where.
pub struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
}

impl Watchdog {
    pub const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn new(what: &'static str) -> Watchdog {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                finished.recv_timeout(Self::LIMIT)
            {
                // Straight to stderr: the test harness's capture dies with the process.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "WATCHDOG: {what} took longer than {:?}; aborting the test binary",
                    Self::LIMIT
                );
                std::process::abort();
            }
        });
        Watchdog { done: Some(done) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Disconnecting ends the watchdog thread.
        self.done.take();
    }
}

/// Starts the server in this test's runtime, under a [`Watchdog`]; it must start.
pub async fn start_server(config: ServerConfig) -> RunningServer {
    try_start_server(config).await.expect("server starts")
}

/// Starts the server in this test's runtime, under a [`Watchdog`].
pub async fn try_start_server(config: ServerConfig) -> Result<RunningServer, server::ServeError> {
    let _watchdog = Watchdog::new("starting the server");
    server::start(config).await
}

/// Stops the server under a [`Watchdog`]; it must stop cleanly.
pub async fn stop_server(running: RunningServer) {
    let _watchdog = Watchdog::new("stopping the server");
    running.stop().await.expect("server stops cleanly");
}

/// A data directory that outlives server restarts within one test.
pub struct TestServer {
    pub data: TempDir,
    pub policies: PathBuf,
    pub running: Option<RunningServer>,
    /// Applied to the config at every (re)start.
    pub tweak: fn(&mut ServerConfig),
    /// How callers authenticate; development identity unless started with `start_with_auth`.
    pub auth: AuthSettings,
    /// The server's certificate and key; plaintext unless started with `try_start_secured`.
    pub tls: Option<TlsSettings>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with_policies(shipped_policies()).await
    }

    pub async fn start_with_policies(policies: PathBuf) -> TestServer {
        Self::start_with(policies, |_| {}).await
    }

    pub async fn start_with(policies: PathBuf, tweak: fn(&mut ServerConfig)) -> TestServer {
        let data = tempfile::tempdir().expect("temp dir");
        let mut server = TestServer {
            data,
            policies,
            running: None,
            tweak,
            auth: AuthSettings::Development,
            tls: None,
        };
        server.restart().await;
        server
    }

    /// The shipped policies behind the given authentication (e.g. JWTs and static tokens).
    /// Returns the server, or the reason it refused to start.
    pub async fn try_start_with_auth(auth: AuthSettings) -> Result<TestServer, server::ServeError> {
        Self::try_start_secured(auth, None).await
    }

    /// The shipped policies behind the given authentication and TLS.
    pub async fn try_start_secured(
        auth: AuthSettings,
        tls: Option<TlsSettings>,
    ) -> Result<TestServer, server::ServeError> {
        let mut server = TestServer {
            data: tempfile::tempdir().expect("temp dir"),
            policies: shipped_policies(),
            running: None,
            tweak: |_| {},
            auth,
            tls,
        };
        server.running = Some(try_start_server(server.config()).await?);
        Ok(server)
    }

    pub fn config(&self) -> ServerConfig {
        let mut config = ServerConfig::new(self.data.path().join("log"), &self.policies);
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.auth = self.auth.clone();
        config.tls = self.tls.clone();
        (self.tweak)(&mut config);
        config
    }

    /// Stops the server if it runs, then starts it again on the same data directory.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.running = Some(start_server(self.config()).await);
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            stop_server(running).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.as_ref().expect("server running").local_addr()
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connects")
    }

    pub async fn gate(&self, who: &Caller) -> Gate {
        ActionGateClient::with_interceptor(self.channel().await, who.clone())
    }

    /// A reviewer client whose HTTP/2 flow-control windows are small, so that not reading
    /// its stream backs up into the server quickly (a real stalled client on a slow link).
    pub async fn review_with_small_window(
        &self,
        who: &Caller,
    ) -> ReviewServiceClient<InterceptedService<Channel, Caller>> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr()))
            .expect("endpoint")
            .initial_stream_window_size(Some(16 * 1024))
            .initial_connection_window_size(Some(16 * 1024))
            .connect()
            .await
            .expect("connects");
        ReviewServiceClient::with_interceptor(channel, who.clone())
    }

    pub async fn review(
        &self,
        who: &Caller,
    ) -> ReviewServiceClient<InterceptedService<Channel, Caller>> {
        ReviewServiceClient::with_interceptor(self.channel().await, who.clone())
    }

    pub async fn policy(
        &self,
        who: &Caller,
    ) -> PolicyServiceClient<InterceptedService<Channel, Caller>> {
        PolicyServiceClient::with_interceptor(self.channel().await, who.clone())
    }

    pub async fn audit(
        &self,
        who: &Caller,
    ) -> AuditServiceClient<InterceptedService<Channel, Caller>> {
        AuditServiceClient::with_interceptor(self.channel().await, who.clone())
    }
}

/// The identity a client presents (development identity headers).
#[derive(Clone)]
pub struct Caller {
    pub id: Option<&'static str>,
    pub kind: &'static str,
    pub groups: &'static str,
}

impl Caller {
    pub fn agent(id: &'static str) -> Caller {
        Caller {
            id: Some(id),
            kind: "agent",
            groups: "",
        }
    }

    pub fn human(id: &'static str, groups: &'static str) -> Caller {
        Caller {
            id: Some(id),
            kind: "human",
            groups,
        }
    }

    pub fn anonymous() -> Caller {
        Caller {
            id: None,
            kind: "agent",
            groups: "",
        }
    }
}

impl tonic::service::Interceptor for Caller {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        let metadata = request.metadata_mut();
        if let Some(id) = self.id {
            metadata.insert("x-countersign-principal", MetadataValue::from_static(id));
        }
        metadata.insert("x-countersign-kind", MetadataValue::from_static(self.kind));
        if !self.groups.is_empty() {
            metadata.insert(
                "x-countersign-groups",
                MetadataValue::from_static(self.groups),
            );
        }
        Ok(request)
    }
}

pub fn string(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_string())),
    }
}

pub fn number(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(n)),
    }
}

pub fn check(
    action_type: &str,
    environment: &str,
    parameters: &[(&str, prost_types::Value)],
) -> proto::CheckActionRequest {
    proto::CheckActionRequest {
        action: Some(proto::Action {
            r#type: action_type.to_string(),
            resource: "projects/acme".to_string(),
            environment: environment.to_string(),
            parameters: Some(prost_types::Struct {
                fields: parameters
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            }),
            purpose: "integration test".to_string(),
        }),
        task: Some(proto::Task {
            task_id: "task-1".to_string(),
            origin: "tests".to_string(),
            on_behalf_of: "alice".to_string(),
            labels: Default::default(),
        }),
        idempotency_key: String::new(),
    }
}

pub fn write_policy(dir: &Path, file: &str, contents: &str) {
    std::fs::create_dir_all(dir).expect("policy dir");
    std::fs::write(dir.join(file), contents).expect("policy file");
}

/// A `countersign serve` child process, killed if the test ends early.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub address: SocketAddr,
    /// Log lines read until the server said it was serving.
    pub startup_logs: String,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` (which must run `countersign serve --log-format json`), waits for the
/// "countersign is serving" log line and returns the process with its address. Logs after
/// that are drained in the background so the child never blocks on a full pipe.
pub async fn spawn_serve(mut command: std::process::Command) -> ServeProcess {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let mut child = command
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("countersign starts");
    let stderr = child.stderr.take().expect("stderr");
    let found = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = String::new();
        while let Some(Ok(line)) = lines.next() {
            seen.push_str(&line);
            seen.push('\n');
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["fields"]["message"] == "countersign is serving" {
                let address = entry["fields"]["address"].as_str().map(str::to_string);
                std::thread::spawn(move || for _ in lines {});
                return Ok((address, seen));
            }
        }
        Err(seen)
    })
    .await
    .expect("reader");
    let (address, startup_logs) = match found {
        Ok(found) => found,
        Err(logs) => {
            let _ = child.kill();
            panic!("countersign never said it was serving:\n{logs}");
        }
    };
    ServeProcess {
        child,
        address: address.expect("address field").parse().expect("address"),
        startup_logs,
    }
}

pub async fn channel_to(address: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connects")
}

/// What the standard health service says of `ActionGate`.
pub async fn action_gate_health(
    channel: Channel,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "countersign.v1.ActionGate".into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

/// Waits (at most 10 s) until the server's health says ActionGate is not serving: a server
/// that started from a checkpoint finds a damaged log only once it has verified it.
pub async fn wait_until_gate_not_serving(server: &TestServer) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while action_gate_health(server.channel().await).await != ServingStatus::NotServing {
        assert!(
            std::time::Instant::now() < deadline,
            "ActionGate still serving 10 s after start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The next message of a server stream, or a test failure after 10 s: never hang a test.
pub async fn next_message<T>(stream: &mut tonic::Streaming<T>) -> T {
    match tokio::time::timeout(std::time::Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => panic!("the stream ended"),
        Ok(Err(status)) => panic!("the stream failed: {status:?}"),
        Err(_) => panic!("no message within 10 s"),
    }
}

/// Every event of the log (or of one action) as an auditor reads it.
/// The `access.denied` events in the log, once there are at least `at_least` of them.
/// Refusals are recorded by a task of their own, a moment after the refused call returns.
pub async fn access_denials(server: &TestServer, at_least: usize) -> Vec<proto::Event> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let denials: Vec<proto::Event> = read_events(server, "")
            .await
            .into_iter()
            .filter(|e| e.kind == "access.denied")
            .collect();
        if denials.len() >= at_least || tokio::time::Instant::now() > deadline {
            return denials;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub async fn read_events(server: &TestServer, action_id: &str) -> Vec<proto::Event> {
    read_events_at(server.addr(), 0, action_id).await
}

/// The events after `after_sequence` (of one action, unless `action_id` is empty) of the
/// server at `address`, as an auditor reads them.
pub async fn read_events_at(
    address: SocketAddr,
    after_sequence: u64,
    action_id: &str,
) -> Vec<proto::Event> {
    let mut audit = AuditServiceClient::with_interceptor(
        channel_to(address).await,
        Caller::human("auditor", "auditors"),
    );
    let mut stream = audit
        .read_events(proto::ReadEventsRequest {
            after_sequence,
            action_id: action_id.to_string(),
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

/// `GET path` on the metrics listener; the status line and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Everything a client can read about the actions (as a reviewer): each one by id, and every page of
/// ListActions (all, approved only, one requester's), two at a time.
pub async fn everything_readable(server: &TestServer, ids: &[String]) -> Vec<String> {
    let mut reviewer = server.review(&Caller::human("carol", "security")).await;
    let mut seen = Vec::new();
    for id in ids {
        let record = reviewer
            .get_action(proto::GetActionRequest {
                action_id: id.clone(),
            })
            .await
            .expect("GetAction")
            .into_inner();
        seen.push(format!("{record:?}"));
    }
    for (status, requester_id) in [
        (proto::ActionStatus::Unspecified, ""),
        (proto::ActionStatus::Approved, ""),
        (proto::ActionStatus::Unspecified, "reader-bot"),
    ] {
        let mut page_token = String::new();
        loop {
            let page = reviewer
                .list_actions(proto::ListActionsRequest {
                    status: status as i32,
                    requester_id: requester_id.into(),
                    action_type: String::new(),
                    page_size: 2,
                    page_token,
                })
                .await
                .expect("ListActions")
                .into_inner();
            seen.push(format!("{:?}", page.actions));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
    }
    seen
}

/// The server's `/status` document (it must serve metrics).
pub async fn server_status(server: &TestServer) -> serde_json::Value {
    let metrics = server
        .running
        .as_ref()
        .and_then(|running| running.metrics_addr())
        .expect("metrics are served");
    let (_, body) = http_get(metrics, "/status").await;
    serde_json::from_str(&body).expect("status is JSON")
}

/// Rewrites one character of the stored event's actor, keeping the JSON valid: the kind of
/// quiet edit someone with disk access would make.
pub fn change_actor_of_event(log_dir: &std::path::Path, sequence: u64) {
    let db = sled::open(log_dir).expect("open stopped server's log");
    let events = db.open_tree("events").expect("events tree");
    let key = sequence.to_be_bytes();
    let mut value = events
        .get(key)
        .expect("read")
        .expect("event exists")
        .to_vec();
    let body = &value[32..];
    let marker = b"\"actor\":\"";
    let at = body
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("actor field")
        + marker.len();
    let index = 32 + at;
    value[index] = if value[index] == b'x' { b'y' } else { b'x' };
    events.insert(key, value).expect("write");
    db.flush().expect("flush");
}

/// Replaces `from` with `to` (the same length) in a stopped server's stored event and
/// recomputes the event's own hash, as an attacker who knows the format would: only the
/// next event's link to it (the chain) shows the change.
pub fn rewrite_event_and_rehash(log_dir: &std::path::Path, sequence: u64, from: &[u8], to: &[u8]) {
    use sha2::Digest as _;
    assert_eq!(from.len(), to.len());
    let db = sled::open(log_dir).expect("open stopped server's log");
    let events = db.open_tree("events").expect("events tree");
    let stored = |sequence: u64| -> Vec<u8> {
        events
            .get(sequence.to_be_bytes())
            .expect("read")
            .expect("event exists")
            .to_vec()
    };
    let prev_hash = stored(sequence - 1)[..32].to_vec();
    let mut value = stored(sequence);
    let at = value[32..]
        .windows(from.len())
        .position(|w| w == from)
        .expect("bytes to replace")
        + 32;
    value[at..at + to.len()].copy_from_slice(to);
    let hash = sha2::Sha256::new()
        .chain_update(&prev_hash)
        .chain_update(&value[32..])
        .finalize();
    value[..32].copy_from_slice(&hash);
    events.insert(sequence.to_be_bytes(), value).expect("write");
    db.flush().expect("flush");
}
