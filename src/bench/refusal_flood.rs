//! What a flood of refusals costs the event log: one human approving its own pending
//! action over and over (each vote refused, PERMISSION_DENIED), counting the events and
//! bytes the log grew by.
//!
//! Phases: the human checks an action the shipped policies send to review (it is the
//! requester, so every vote of its own is a self-approval); the log's head is noted; the
//! votes are sent, `--in-flight` at a time, and their answers counted by status; then an
//! auditor reads every event after the noted head. Repeated refusals may be recorded later
//! as summaries (when their window closes), so `--summaries-wait` waits for one.
//!
//! Bytes are those of the events as ReadEvents returns them (protobuf; the two chain hashes
//! in hex), close to what the log stores (JSON body, binary hash). Run it against a server
//! nobody else is using: every event after the head counts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;
use prost::Message as _;
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::identity::{self, Identity};
use super::load::check_request;
use super::{BenchError, TargetArgs};
use crate::proto;
use crate::proto::action_gate_client::ActionGateClient;
use crate::proto::audit_service_client::AuditServiceClient;
use crate::proto::review_service_client::ReviewServiceClient;

/// The human who floods (development identity); in `security`, the shipped
/// `production-secret-change` rule's reviewer group, so only self-review refuses it.
const FLOODER: &str = "bench-flooder";
const FLOODER_GROUP: &str = "security";
/// Who reads the log afterwards.
const AUDITOR: &str = "bench-auditor";
const AUDITOR_GROUP: &str = "auditors";

/// `countersign bench refusal-flood`.
#[derive(Args, Debug)]
pub struct RefusalFloodArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Self-approvals to send.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub refusals: u32,
    /// Bytes in each vote's reason (the API allows up to 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub reason_bytes: u32,
    /// Votes in flight at once.
    #[arg(long, value_name = "M", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub in_flight: u32,
    /// After the flood, wait up to this long for a summary of the repeated refusals (the
    /// server records it when the refusal's window closes, 60 s after the first); 0: read
    /// the log at once.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub summaries_wait: Duration,
    /// Worker threads of the client's runtime.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub client_threads: usize,
}

/// What the flood cost.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct RefusalFloodReport {
    pub server: String,
    pub action_id: String,
    pub refusals_sent: u64,
    pub reason_bytes: u32,
    /// Answers by gRPC status code name.
    pub answers: BTreeMap<String, u64>,
    pub seconds: f64,
    /// The log's head before the flood and when it was read.
    pub head_before: u64,
    pub head_after: u64,
    /// Events after `head_before`, by kind.
    pub events_by_kind: BTreeMap<String, u64>,
    pub events_written: u64,
    /// Of those events, as ReadEvents returns them.
    pub bytes_written: u64,
    /// The refusals the `review.refused` events stand for (summaries count their repeats).
    pub refusals_recorded: u64,
    /// `access.denied` events' counts (rate-limited and other refused calls).
    pub denials_recorded: u64,
    /// The largest single event written.
    pub largest_event_bytes: u64,
}

impl RefusalFloodReport {
    pub fn text(&self) -> String {
        let mut text = format!(
            "refusal flood against {} (action {}): {} self-approvals, reasons of {} bytes, in {:.2} s\n",
            self.server, self.action_id, self.refusals_sent, self.reason_bytes, self.seconds
        );
        for (code, count) in &self.answers {
            text.push_str(&format!("  answered {code}: {count}\n"));
        }
        text.push_str(&format!(
            "  log: {} events, {} bytes (largest {} bytes), head {} -> {}\n",
            self.events_written,
            self.bytes_written,
            self.largest_event_bytes,
            self.head_before,
            self.head_after
        ));
        for (kind, count) in &self.events_by_kind {
            text.push_str(&format!("    {kind}: {count}\n"));
        }
        text.push_str(&format!(
            "  refusals accounted for in review.refused: {}; in access.denied: {}\n",
            self.refusals_recorded, self.denials_recorded
        ));
        text
    }
}

type Review = ReviewServiceClient<InterceptedService<Channel, Identity>>;

/// `countersign bench refusal-flood`: builds the runtime, runs, prints.
pub fn run(args: &RefusalFloodArgs) -> Result<(), BenchError> {
    let runtime = super::runtime(args.client_threads)?;
    let report = runtime.block_on(drive(args))?;
    super::print(args.target.json, &report, &report.text())
}

pub async fn drive(args: &RefusalFloodArgs) -> Result<RefusalFloodReport, BenchError> {
    if args.target.token_file.is_some() {
        return Err(BenchError::Usage(
            "refusal-flood calls as development identities (a human, then an auditor); run it against a server without [auth]".into(),
        ));
    }
    let flooder = Identity::human(FLOODER, FLOODER_GROUP)?;
    let auditor = Identity::human(AUDITOR, AUDITOR_GROUP)?;
    let channels = identity::connect(&args.target, args.target.connections).await?;
    let failed = |what: &str, status: tonic::Status| {
        BenchError::Failed(format!("{what}: {:?}: {}", status.code(), status.message()))
    };

    let mut gate = ActionGateClient::with_interceptor(channels[0].clone(), flooder.clone());
    let run = uuid::Uuid::now_v7();
    let checked = gate
        .check_action(check_request(
            "secret.rotate",
            "production",
            &format!("bench-refusal-flood-{run}"),
            "",
        ))
        .await
        .map_err(|s| failed("the pending action could not be created", s))?
        .into_inner();
    if checked.status() != proto::ActionStatus::Pending {
        return Err(BenchError::Failed(format!(
            "the action went {:?}, not to review: are the shipped policies loaded?",
            checked.status()
        )));
    }
    let action_id = checked.action_id;
    let mut audit = AuditServiceClient::with_interceptor(channels[0].clone(), auditor)
        .max_decoding_message_size(64 * 1024 * 1024);
    let own = read_after(&mut audit, 0, &action_id)
        .await
        .map_err(|s| failed("reading the action's events", s))?;
    let head_before = own.iter().map(|e| e.sequence).max().unwrap_or(0);

    let reason = "r".repeat(args.reason_bytes as usize);
    let started = Instant::now();
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut votes = JoinSet::new();
    let mut sent = 0u32;
    let mut next = 0usize;
    let mut vote = |votes: &mut JoinSet<tonic::Code>| {
        let mut client: Review = ReviewServiceClient::with_interceptor(
            channels[next % channels.len()].clone(),
            flooder.clone(),
        );
        next += 1;
        let request = proto::SubmitReviewRequest {
            action_id: action_id.clone(),
            verdict: proto::Verdict::Approve as i32,
            reason: reason.clone(),
            action_digest: String::new(),
        };
        votes.spawn(async move {
            match client.submit_review(request).await {
                Ok(_) => tonic::Code::Ok,
                Err(status) => status.code(),
            }
        });
    };
    while sent < args.refusals.min(args.in_flight) {
        vote(&mut votes);
        sent += 1;
    }
    while let Some(answered) = votes.join_next().await {
        let code = answered.map_err(|e| BenchError::Failed(format!("a vote task failed: {e}")))?;
        *answers.entry(format!("{code:?}")).or_default() += 1;
        if sent < args.refusals {
            vote(&mut votes);
            sent += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();

    // Access denials are recorded by a task of their own, a moment after the answer.
    let deadline = Instant::now() + args.summaries_wait.max(Duration::from_millis(500));
    let events = loop {
        let events = read_after(&mut audit, head_before, "")
            .await
            .map_err(|s| failed("reading the log", s))?;
        let summarized = events
            .iter()
            .any(|e| e.kind == "review.refused" && e.payload_json.contains("\"repeats\""));
        if summarized || Instant::now() >= deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut report = RefusalFloodReport {
        server: args.target.server.clone(),
        action_id,
        refusals_sent: u64::from(args.refusals),
        reason_bytes: args.reason_bytes,
        answers,
        seconds,
        head_before,
        head_after: events
            .iter()
            .map(|e| e.sequence)
            .max()
            .unwrap_or(head_before),
        events_by_kind: BTreeMap::new(),
        events_written: events.len() as u64,
        bytes_written: 0,
        refusals_recorded: 0,
        denials_recorded: 0,
        largest_event_bytes: 0,
    };
    for event in &events {
        let bytes = event.encoded_len() as u64;
        report.bytes_written += bytes;
        report.largest_event_bytes = report.largest_event_bytes.max(bytes);
        *report.events_by_kind.entry(event.kind.clone()).or_default() += 1;
        let payload: serde_json::Value =
            serde_json::from_str(&event.payload_json).unwrap_or_default();
        match event.kind.as_str() {
            "review.refused" => {
                report.refusals_recorded += payload["repeats"]["count"].as_u64().unwrap_or(1);
            }
            "access.denied" => {
                report.denials_recorded += payload["count"].as_u64().unwrap_or(1);
            }
            _ => {}
        }
    }
    Ok(report)
}

/// Every event after `after` (of one action, unless `action_id` is empty).
async fn read_after(
    audit: &mut AuditServiceClient<InterceptedService<Channel, Identity>>,
    after: u64,
    action_id: &str,
) -> Result<Vec<proto::Event>, tonic::Status> {
    let mut stream = audit
        .read_events(proto::ReadEventsRequest {
            after_sequence: after,
            action_id: action_id.to_string(),
            follow: false,
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(message) = stream.message().await? {
        events.extend(message.event);
    }
    Ok(events)
}
