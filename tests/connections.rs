//! gRPC connections the server closes (issue 16, defect 5): one that sends no request in
//! time, one left idle with no call or stream open; and the one it must keep: a quiet
//! reviewer stream. The flood at a lowered descriptor limit is in `descriptor_limit.rs`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Caller, check, next_message, string};
use countersign::config::ServerConfig;
use countersign::proto;
use countersign::proto::action_gate_client::ActionGateClient;
use countersign::proto::review_service_client::ReviewServiceClient;
use countersign::proto::stream_pending_response::Event as StreamEvent;
use countersign::server::RunningServer;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Far longer than anything here needs.
const DEADLINE: Duration = Duration::from_secs(30);

/// A server whose connections time out after a second.
async fn server(data: &tempfile::TempDir) -> RunningServer {
    let mut config = ServerConfig::new(data.path().join("log"), common::shipped_policies());
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.connections.first_request_timeout = Duration::from_secs(1);
    config.connections.idle_timeout = Duration::from_secs(1);
    common::start_server(config).await
}

async fn channel(server: &RunningServer) -> Channel {
    Endpoint::from_shared(format!("http://{}", server.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// One sample of the server's `/metrics`, 0 if absent.
async fn metric(server: &RunningServer, sample: &str) -> f64 {
    let (_, text) = common::http_get(server.metrics_addr().unwrap(), "/metrics").await;
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_connection_that_sends_no_request_is_closed() {
    let data = tempfile::tempdir().unwrap();
    let server = server(&data).await;
    let mut idle = TcpStream::connect(server.local_addr()).await.unwrap();

    // The server's HTTP/2 settings may arrive; then the connection ends.
    let mut buffer = [0u8; 256];
    let closed = tokio::time::timeout(DEADLINE, async {
        while let Ok(1..) = idle.read(&mut buffer).await {}
    })
    .await;
    assert!(closed.is_ok(), "still open after {DEADLINE:?}");
    assert_eq!(
        metric(
            &server,
            r#"countersign_connections_closed_total{listener="grpc",reason="first_request_timeout"}"#
        )
        .await,
        1.0
    );
    common::stop_server(server).await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_the_client_reconnects_on_its_next_call() {
    let data = tempfile::tempdir().unwrap();
    let server = server(&data).await;
    let mut health = HealthClient::new(channel(&server).await);
    health.check(HealthCheckRequest::default()).await.unwrap();

    let idle = r#"countersign_connections_closed_total{listener="grpc",reason="idle"}"#;
    let closed = tokio::time::timeout(DEADLINE, async {
        while metric(&server, idle).await < 1.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection was not closed");

    // The next call opens a new connection, as for any connection a server closed.
    let again = tokio::time::timeout(DEADLINE, async {
        loop {
            if health.check(HealthCheckRequest::default()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(again.is_ok(), "the client never got through again");
    common::stop_server(server).await;
}

#[tokio::test]
async fn a_quiet_reviewer_stream_keeps_its_connection_past_the_idle_timeout() {
    let data = tempfile::tempdir().unwrap();
    let server = server(&data).await;
    let mut bob = ReviewServiceClient::with_interceptor(
        channel(&server).await,
        Caller::human("bob", "security"),
    );
    let mut stream = bob
        .stream_pending(proto::StreamPendingRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    next_message(&mut stream).await; // snapshot complete

    // Nothing happens for three idle timeouts; the stream is open, so its connection stays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut gate =
        ActionGateClient::with_interceptor(channel(&server).await, Caller::agent("iam-bot"));
    let pending = gate
        .check_action(check(
            "iam.role.grant",
            "production",
            &[
                ("role", string("admin")),
                ("member", string("a@example.com")),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    let message = next_message(&mut stream).await;
    let Some(StreamEvent::Pending(record)) = &message.event else {
        panic!("expected the new pending action, got {message:?}");
    };
    assert_eq!(record.action_id, pending.action_id);
    common::stop_server(server).await;
}
