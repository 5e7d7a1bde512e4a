//! The event log exported as OpenTelemetry spans, received by a real OTLP/gRPC receiver
//! (the collector service of `opentelemetry-proto`) inside the test.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Caller, channel_to, check, string};
use countersign::config::ServerConfig;
use countersign::proto::action_gate_client::ActionGateClient;
use countersign::proto::review_service_client::ReviewServiceClient;
use countersign::proto::{self, ActionStatus, Verdict};
use countersign::server::RunningServer;
use countersign::telemetry::export::ExportSettings;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tempfile::TempDir;
use tokio::sync::oneshot;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/gRPC trace receiver: keeps every span it is sent, with its resource's
/// `service.name`.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

struct RunningReceiver {
    receiver: Receiver,
    stop: Option<oneshot::Sender<()>>,
}

impl RunningReceiver {
    /// Starts a receiver on `addr` (port 0 for any).
    async fn start(addr: SocketAddr) -> (RunningReceiver, SocketAddr) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .unwrap();
        });
        (
            RunningReceiver {
                receiver,
                stop: Some(stop),
            },
            addr,
        )
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.receiver.spans.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the spans received so far; returns them.
    async fn wait_for(&self, what: &str, done: impl Fn(&[(String, Span)]) -> bool) -> Vec<Span> {
        for _ in 0..1500 {
            let spans = self.spans();
            if done(&spans) {
                return spans.into_iter().map(|(_, s)| s).collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}; received {:#?}", self.spans());
    }
}

impl Drop for RunningReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn text(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn string_attribute(span: &Span, key: &str) -> String {
    attribute(span, key)
        .and_then(text)
        .unwrap_or_else(|| panic!("{key} missing from {span:#?}"))
}

fn strings_attribute(span: &Span, key: &str) -> Vec<String> {
    match attribute(span, key) {
        Some(AnyValue::ArrayValue(array)) => array
            .values
            .iter()
            .filter_map(|v| text(v.value.as_ref()?))
            .collect(),
        other => panic!("{key} is not a string array: {other:?}"),
    }
}

fn int_attribute(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(AnyValue::IntValue(i)) => *i,
        other => panic!("{key} is not an integer: {other:?}"),
    }
}

/// The action spans received, by action id.
fn action_spans(spans: &[(String, Span)]) -> HashMap<String, Span> {
    spans
        .iter()
        .filter(|(_, s)| s.name == "countersign.action")
        .map(|(_, s)| (string_attribute(s, "countersign.action.id"), s.clone()))
        .collect()
}

fn config(data: &TempDir, otlp: SocketAddr) -> ServerConfig {
    let mut config = ServerConfig::new(data.path().join("log"), common::shipped_policies());
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.otlp = Some(ExportSettings {
        endpoint: format!("http://{otlp}"),
        service_name: "countersign-under-test".into(),
        metrics_interval: Duration::from_millis(200),
    });
    config
}

async fn start(data: &TempDir, otlp: SocketAddr) -> RunningServer {
    common::start_server(config(data, otlp)).await
}

type Gate = ActionGateClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Caller>,
>;

async fn gate(server: &RunningServer) -> Gate {
    ActionGateClient::with_interceptor(
        channel_to(server.local_addr()).await,
        Caller::agent("iam-bot"),
    )
}

/// A port nothing listens on (bound, then released).
async fn unused_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// `n` actions allowed at once; their ids.
async fn allowed_actions(gate: &mut Gate, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let checked = gate
            .check_action(check("storage.object.read", "dev", &[]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(checked.status(), ActionStatus::Allowed);
        ids.push(checked.action_id);
    }
    ids
}

#[tokio::test]
async fn the_action_span_is_a_child_of_the_callers_span_and_tells_the_actions_history() {
    let (collector, otlp) = RunningReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let data = tempfile::tempdir().unwrap();
    let server = start(&data, otlp).await;

    let mut request = tonic::Request::new(check(
        "iam.role.grant",
        "production",
        &[
            ("role", string("admin")),
            ("member", string("dave@example.com")),
        ],
    ));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let checked = gate(&server)
        .await
        .check_action(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(checked.status(), ActionStatus::Pending);
    assert_eq!(
        checked.trace_id, TRACE_ID,
        "the response names the caller's trace"
    );
    let id = checked.action_id.clone();

    // While it waits for reviewers, the agent's trace already shows the request.
    let spans = collector
        .wait_for("the check span", |s| {
            s.iter().any(|(_, s)| s.name == "countersign.check")
        })
        .await;
    let check_span = spans
        .iter()
        .find(|s| s.name == "countersign.check")
        .unwrap();
    assert_eq!(hex::encode(&check_span.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&check_span.parent_span_id), CALLER_SPAN);
    assert_eq!(
        string_attribute(check_span, "countersign.status"),
        "pending"
    );

    for reviewer in ["bob", "carol"] {
        let mut review = ReviewServiceClient::with_interceptor(
            channel_to(server.local_addr()).await,
            Caller::human(reviewer, "security"),
        );
        review
            .submit_review(proto::SubmitReviewRequest {
                action_id: id.clone(),
                verdict: Verdict::Approve as i32,
                reason: format!("{reviewer} checked the ticket"),
                action_digest: checked.action_digest.clone(),
            })
            .await
            .unwrap();
    }
    gate(&server)
        .await
        .report_outcome(proto::ReportOutcomeRequest {
            action_id: id.clone(),
            outcome: proto::Outcome::Executed as i32,
            details: "granted".into(),
        })
        .await
        .unwrap();

    let spans = collector
        .wait_for("the action and outcome spans", |s| {
            s.iter().any(|(_, s)| s.name == "countersign.outcome")
        })
        .await;
    let action = spans
        .iter()
        .find(|s| s.name == "countersign.action")
        .expect("an action span");
    assert_eq!(hex::encode(&action.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&action.parent_span_id), CALLER_SPAN);
    assert!(action.end_time_unix_nano >= action.start_time_unix_nano);
    assert_eq!(string_attribute(action, "countersign.action.id"), id);
    assert_eq!(
        string_attribute(action, "countersign.action.type"),
        "iam.role.grant"
    );
    assert_eq!(
        string_attribute(action, "countersign.action.resource"),
        "projects/acme"
    );
    assert_eq!(
        string_attribute(action, "countersign.action.environment"),
        "production"
    );
    assert_eq!(string_attribute(action, "countersign.status"), "approved");
    assert_eq!(string_attribute(action, "countersign.risk"), "critical");
    assert_eq!(
        string_attribute(action, "countersign.requester.id"),
        "iam-bot"
    );
    assert_eq!(
        string_attribute(action, "countersign.requester.kind"),
        "agent"
    );
    assert_eq!(string_attribute(action, "enduser.id"), "iam-bot");
    assert_eq!(
        string_attribute(action, "countersign.on_behalf_of"),
        "alice"
    );
    assert_eq!(
        string_attribute(action, "countersign.policy.version"),
        checked.policy_version
    );
    assert_eq!(
        string_attribute(action, "countersign.action.digest"),
        checked.action_digest
    );
    assert_eq!(
        strings_attribute(action, "countersign.policy.matched_rules"),
        ["iam-admin-grant", "iam-privilege-change"]
    );
    assert_eq!(
        strings_attribute(action, "countersign.reviewers"),
        ["bob", "carol"]
    );
    assert_eq!(
        strings_attribute(action, "countersign.review.reasons"),
        ["bob checked the ticket", "carol checked the ticket"]
    );
    assert_eq!(int_attribute(action, "countersign.log.first_sequence"), 1);
    assert!(int_attribute(action, "countersign.log.last_sequence") > 2);
    let events: Vec<&str> = action.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        events,
        [
            "policy.evaluated",
            "review.voted",
            "review.voted",
            "action.approved"
        ]
    );

    let outcome = spans
        .iter()
        .find(|s| s.name == "countersign.outcome")
        .unwrap();
    assert_eq!(outcome.trace_id, action.trace_id);
    assert_eq!(outcome.parent_span_id, action.span_id);
    assert_eq!(string_attribute(outcome, "countersign.outcome"), "executed");
    assert_eq!(outcome.events[0].name, "outcome.reported");

    let services: Vec<String> = collector.spans().into_iter().map(|(s, _)| s).collect();
    assert!(
        services.iter().all(|s| s == "countersign-under-test"),
        "{services:?}"
    );
    common::stop_server(server).await;
}

#[tokio::test]
async fn without_a_traceparent_an_action_starts_its_own_trace_named_in_the_response() {
    let (collector, otlp) = RunningReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let data = tempfile::tempdir().unwrap();
    let server = start(&data, otlp).await;
    let ids = allowed_actions(&mut gate(&server).await, 1).await;
    let checked = gate(&server)
        .await
        .check_action(check("storage.object.read", "dev", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(checked.trace_id.len(), 32);
    let spans = collector
        .wait_for("two action spans", |s| action_spans(s).len() == 2)
        .await;
    let action = spans
        .iter()
        .find(|s| string_attribute(s, "countersign.action.id") == checked.action_id)
        .unwrap();
    assert_eq!(hex::encode(&action.trace_id), checked.trace_id);
    assert!(action.parent_span_id.is_empty(), "a root span");
    assert_eq!(string_attribute(action, "countersign.status"), "allowed");
    assert!(ids.iter().all(|id| id != &checked.action_id));
    common::stop_server(server).await;
}

#[tokio::test]
async fn a_burst_while_the_collector_is_down_arrives_once_it_is_up() {
    let otlp = unused_port().await;
    let data = tempfile::tempdir().unwrap();
    let server = start(&data, otlp).await;
    let ids = allowed_actions(&mut gate(&server).await, 40).await;
    // The exporter has been failing meanwhile; the API kept serving.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (collector, _) = RunningReceiver::start(otlp).await;
    let spans = collector
        .wait_for("every action's span", |s| {
            let received = action_spans(s);
            ids.iter().all(|id| received.contains_key(id))
        })
        .await;
    // Each action once, as decided: the failed attempts left nothing half-sent behind.
    let action_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "countersign.action")
        .collect();
    assert_eq!(action_spans.len(), ids.len(), "one span per action");
    for span in action_spans {
        assert_eq!(string_attribute(span, "countersign.status"), "allowed");
    }
    common::stop_server(server).await;
}

#[tokio::test]
async fn after_a_restart_no_action_is_left_unexported() {
    let otlp = unused_port().await;
    let data = tempfile::tempdir().unwrap();
    // Recorded while no collector listens, then the server stops.
    let server = start(&data, otlp).await;
    let before = allowed_actions(&mut gate(&server).await, 10).await;
    common::stop_server(server).await;

    let (collector, _) = RunningReceiver::start(otlp).await;
    let server = start(&data, otlp).await;
    let after = allowed_actions(&mut gate(&server).await, 5).await;
    collector
        .wait_for("the actions from before and after the restart", |s| {
            let received = action_spans(s);
            before
                .iter()
                .chain(&after)
                .all(|id| received.contains_key(id))
        })
        .await;

    // Once accepted, the cursor moved: a second restart sends nothing again.
    common::stop_server(server).await;
    let exported = collector.spans().len();
    let server = start(&data, otlp).await;
    allowed_actions(&mut gate(&server).await, 1).await;
    let spans = collector
        .wait_for("the new action's span", |s| action_spans(s).len() == 16)
        .await;
    assert_eq!(spans.len(), exported + 1, "nothing was exported twice");
    common::stop_server(server).await;
}

/// Prometheus metric lines, minus comments.
fn samples(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

#[tokio::test]
async fn prometheus_metrics_and_status_show_decisions_pending_work_and_export_lag() {
    // The collector is down, so every event is export lag.
    let otlp = unused_port().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = config(&data, otlp);
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = common::start_server(config).await;
    let metrics = server.metrics_addr().expect("metrics are served");

    let mut gate = gate(&server).await;
    allowed_actions(&mut gate, 3).await;
    let pending = gate
        .check_action(check(
            "iam.role.grant",
            "production",
            &[
                ("role", string("admin")),
                ("member", string("dave@example.com")),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.status(), ActionStatus::Pending);

    let (status_line, text) = common::http_get(metrics, "/metrics").await;
    assert!(status_line.contains("200"), "{status_line}");
    let lines = samples(&text);
    for expected in [
        r#"countersign_decisions_total{status="allowed",risk="low"} 3"#,
        r#"countersign_decisions_total{status="pending",risk="critical"} 1"#,
        "countersign_pending_actions 1",
        "countersign_action_records_in_memory 4",
        "countersign_await_waiters 0",
        "countersign_reviewer_streams 0",
        // Two events per action, none accepted by a collector.
        "countersign_export_lag_events 8",
    ] {
        assert!(lines.contains(&expected), "{expected} missing from\n{text}");
    }
    let flushes = lines
        .iter()
        .find(|l| l.starts_with("countersign_store_flush_seconds_count "))
        .expect("flush latency histogram");
    let count: u64 = flushes.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((1..=4).contains(&count), "{flushes}");

    let (_, status) = common::http_get(metrics, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["serving"], true);
    assert_eq!(status["log"]["head_sequence"], 8);
    assert_eq!(status["pending_actions"], 1);
    assert_eq!(status["actions"]["known"], 4);
    assert_eq!(status["actions"]["records_in_memory"], 4);
    assert_eq!(status["policy_version"], pending.policy_version.as_str());
    assert_eq!(status["span_export"]["exported_through"], 0);
    assert_eq!(status["span_export"]["lag_events"], 8);
    assert!(status["span_export"]["lag_seconds"].as_f64().unwrap() >= 0.0);

    let (not_found, _) = common::http_get(metrics, "/other").await;
    assert!(not_found.contains("404"), "{not_found}");
    common::stop_server(server).await;
}

#[tokio::test]
async fn metrics_are_never_served_beyond_loopback() {
    let data = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(data.path().join("log"), common::shipped_policies());
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.metrics_listen = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
    let refused = common::try_start_server(config)
        .await
        .err()
        .expect("refused");
    assert!(
        refused
            .to_string()
            .starts_with("refusing to serve metrics on 0.0.0.0:0"),
        "{refused}"
    );
}

mod otlp_metrics {
    use super::*;
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;

    #[derive(Clone, Default)]
    struct MetricsReceiver {
        requests: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    }

    #[tonic::async_trait]
    impl MetricsService for MetricsReceiver {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            self.requests.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// The value of the `countersign.decisions` data point with `status`, in the latest
    /// request that has one.
    fn decisions(requests: &[ExportMetricsServiceRequest], status: &str) -> Option<i64> {
        requests.iter().rev().find_map(|request| {
            request
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .filter(|m| m.name == "countersign.decisions")
                .find_map(|m| match &m.data {
                    Some(Data::Sum(sum)) => sum.data_points.iter().find_map(|p| {
                        let matches = p.attributes.iter().any(|kv| {
                            kv.key == "status"
                                && kv.value.as_ref().and_then(|v| v.value.as_ref()).and_then(text)
                                    == Some(status.to_string())
                        });
                        match (matches, &p.value) {
                            (
                                true,
                                Some(
                                    opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(n),
                                ),
                            ) => Some(*n),
                            _ => None,
                        }
                    }),
                    _ => None,
                })
        })
    }

    #[tokio::test]
    async fn metrics_are_pushed_over_otlp_to_the_configured_endpoint() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let otlp = listener.local_addr().unwrap();
        let receiver = MetricsReceiver::default();
        let service = MetricsServiceServer::new(receiver.clone());
        // Spans go to the same endpoint; this receiver answers only metrics, which is fine:
        // span export just keeps retrying.
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let data = tempfile::tempdir().unwrap();
        let server = start(&data, otlp).await;
        allowed_actions(&mut gate(&server).await, 2).await;
        for _ in 0..500 {
            if decisions(&receiver.requests.lock().unwrap(), "allowed") == Some(2) {
                common::stop_server(server).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "countersign.decisions{{status=allowed}} = 2 never arrived: {:?}",
            decisions(&receiver.requests.lock().unwrap(), "allowed")
        );
    }
}

#[tokio::test]
async fn the_binary_traces_each_rpc_as_a_child_of_the_callers_span() {
    let (collector, otlp) = RunningReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let data = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("COUNTERSIGN_DATA_DIR", data.path())
        .env("COUNTERSIGN_POLICIES", common::shipped_policies())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_SERVICE_NAME", "countersign-binary")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let process = common::spawn_serve(command).await;

    let mut request = tonic::Request::new(check("storage.object.read", "dev", &[]));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let mut gate = ActionGateClient::with_interceptor(
        channel_to(process.address).await,
        Caller::agent("iam-bot"),
    );
    let checked = gate.check_action(request).await.unwrap().into_inner();
    assert_eq!(checked.status(), ActionStatus::Allowed);

    let spans = collector
        .wait_for("the RPC span and the action span", |s| {
            s.iter()
                .any(|(_, s)| s.name == "countersign.v1.ActionGate/CheckAction")
                && s.iter().any(|(_, s)| s.name == "countersign.action")
        })
        .await;
    let rpc = spans
        .iter()
        .find(|s| s.name == "countersign.v1.ActionGate/CheckAction")
        .unwrap();
    assert_eq!(hex::encode(&rpc.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&rpc.parent_span_id), CALLER_SPAN);
    assert_eq!(string_attribute(rpc, "rpc.system"), "grpc");
    assert_eq!(string_attribute(rpc, "rpc.method"), "CheckAction");
    // The log line the handler wrote inside the RPC travels with it as a span event.
    assert!(
        rpc.events.iter().any(|e| e.name == "action checked"),
        "{:#?}",
        rpc.events
    );
    let action = spans
        .iter()
        .find(|s| s.name == "countersign.action")
        .unwrap();
    assert_eq!(action.trace_id, rpc.trace_id);
    let services: Vec<String> = collector.spans().into_iter().map(|(s, _)| s).collect();
    assert!(
        services.iter().all(|s| s == "countersign-binary"),
        "{services:?}"
    );
}
