//! The review loop under load: agents wait in AwaitDecision on their pending actions while
//! reviewers, each following StreamPending, approve them. Measures the time from sending
//! the approving SubmitReview to the waiter's answer, which includes making the vote durable
//! (one group commit) and waking the waiter.
//!
//! Phases: open the reviewer streams (and wait for their snapshots), create the pending
//! actions, start one AwaitDecision per action and let them settle, then approve at the
//! asked rate. Each action is approved by exactly one reviewer (chosen by its id), whose
//! stream delivered it; every action of a run carries the run's tag as its resource, so
//! other pending actions on the server are left alone.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::identity::{self, Identity};
use super::load::{check_request, on_behalf_of};
use super::report::{self, LatencySummary, ReviewLoopReport};
use super::{BenchError, TargetArgs};
use crate::proto;
use crate::proto::action_gate_client::ActionGateClient;
use crate::proto::review_service_client::ReviewServiceClient;
use crate::proto::stream_pending_response::Event;

/// The waiting agents (development identities `bench-waiter-N`, one per creating task, so
/// each stays within the per-principal budget of `[limits.rate]`).
const AGENT: &str = "bench-waiter";
/// The reviewers' group: the shipped `sensitive-deploy` rule asks `sre`.
const REVIEWER_GROUP: &str = "sre";
/// Streams of many pending actions are large.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// HTTP/2 streams per connection the server allows by default (`limits.max_concurrent_streams`
/// is 1024); waiters are spread so that no connection needs more than this.
const WAITERS_PER_CONNECTION: u32 = 500;
/// The client's deadline on a waiter's AwaitDecision (which asks the server to wait 60 s).
const AWAIT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// CheckActions creating the pending actions at once.
const CREATE_CONCURRENCY: u32 = 64;

/// `countersign bench review-loop`.
#[derive(Args, Debug, Clone)]
pub struct ReviewLoopArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// A bearer token for the reviewers (a human in an `sre` group), with `--token-file`
    /// for the agent; without it, development identities `bench-reviewer-N`.
    #[arg(long, value_name = "FILE")]
    pub reviewer_token_file: Option<PathBuf>,
    /// Agents waiting at once, one pending action each.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub waiters: u32,
    /// Reviewer streams open at once; each approves its share of the actions.
    #[arg(long, value_name = "R", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub reviewers: u32,
    /// Approvals per second, all reviewers together; 0 sends them as fast as the reviewers
    /// can (then the wake-up time also holds the queueing of the votes).
    #[arg(long, value_name = "RATE", default_value_t = 100.0)]
    pub approvals_per_second: f64,
    /// Pause between the last waiter's call and the first approval, so that every waiter
    /// is registered on the server.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Also report this server process's resident memory once everyone is waiting.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Worker threads of the client's runtime.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub client_threads: usize,
}

type Gate = ActionGateClient<InterceptedService<Channel, Identity>>;
type Review = ReviewServiceClient<InterceptedService<Channel, Identity>>;

/// A pending action as a reviewer's stream delivered it.
struct Delivered {
    action_id: String,
    digest: String,
}

/// Counters and histograms shared by every task of a run.
struct Shared {
    tag: String,
    reviewers: u32,
    errors: Mutex<BTreeMap<String, u64>>,
    /// When the approving review of each action was sent.
    sent: Mutex<std::collections::HashMap<String, Instant>>,
    wake: Mutex<Histogram<u64>>,
    approve: Mutex<Histogram<u64>>,
    streamed: AtomicU64,
    approvals: AtomicU64,
    woken: AtomicU64,
}

impl Shared {
    fn error(&self, what: &str) {
        *self.errors.lock().entry(what.to_string()).or_default() += 1;
    }

    fn status(&self, status: &Status) {
        self.error(report::code_name(status.code()));
    }

    /// The reviewer that approves an action: spread by the id's bytes.
    fn owner(&self, action_id: &str) -> u32 {
        let hash = action_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        (hash % u64::from(self.reviewers)) as u32
    }
}

pub fn run(args: &ReviewLoopArgs) -> Result<(), BenchError> {
    let runtime = super::runtime(args.client_threads)?;
    let report = runtime.block_on(drive(args))?;
    super::print(args.target.json, &report, &report.text())
}

/// Runs the whole loop and returns its report.
pub async fn drive(args: &ReviewLoopArgs) -> Result<ReviewLoopReport, BenchError> {
    let agents = (0..CREATE_CONCURRENCY.min(args.waiters))
        .map(|t| {
            Identity::or_token(args.target.token_file.as_deref(), || {
                Identity::agent(&format!("{AGENT}-{t}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let reviewer = |r: u32| {
        Identity::or_token(args.reviewer_token_file.as_deref(), || {
            Identity::human(&format!("bench-reviewer-{r}"), REVIEWER_GROUP)
        })
    };
    let connections = args
        .target
        .connections
        .max(args.waiters.div_ceil(WAITERS_PER_CONNECTION));
    // The channels' per-call deadline must outlast a waiter's AwaitDecision, or a long run
    // of approvals would have the client cancel the waiters still waiting.
    let target = TargetArgs {
        timeout: args.target.timeout.max(AWAIT_CALL_TIMEOUT),
        ..args.target.clone()
    };
    let channels = identity::connect(&target, connections).await?;
    let shared = Arc::new(Shared {
        tag: format!("bench-review-loop-{}", uuid::Uuid::now_v7().simple()),
        reviewers: args.reviewers,
        errors: Mutex::new(BTreeMap::new()),
        sent: Mutex::new(std::collections::HashMap::new()),
        wake: Mutex::new(report::histogram()),
        approve: Mutex::new(report::histogram()),
        streamed: AtomicU64::new(0),
        approvals: AtomicU64::new(0),
        woken: AtomicU64::new(0),
    });

    // 1. Reviewer streams, each feeding its approver; wait for every snapshot so no
    //    pending action of this run can be missed.
    let mut streams = JoinSet::new();
    let mut approver_queues = Vec::new();
    let (ready_tx, mut ready) = mpsc::channel::<()>(args.reviewers as usize);
    for r in 0..args.reviewers {
        let (tx, rx) = mpsc::unbounded_channel();
        approver_queues.push(rx);
        let client = Review::new(InterceptedService::new(
            channels[r as usize % channels.len()].clone(),
            reviewer(r)?,
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        streams.spawn(follow(client, r, shared.clone(), tx, ready_tx.clone()));
    }
    drop(ready_tx);
    for _ in 0..args.reviewers {
        if ready.recv().await.is_none() {
            return Err(BenchError::Failed(
                "a reviewer stream ended before its snapshot (see the errors)".to_string(),
            ));
        }
    }

    // 2. The pending actions.
    let created_by = create(args, &channels, &agents, &shared).await?;
    let created = created_by.len() as u64;

    // 3. One waiter per action, calling as the agent that created it.
    let registered = Arc::new(AtomicU32::new(0));
    let mut waiters = JoinSet::new();
    for (i, (id, agent)) in created_by.iter().enumerate() {
        let client = Gate::new(InterceptedService::new(
            channels[i % channels.len()].clone(),
            agents[*agent].clone(),
        ));
        waiters.spawn(wait(client, id.clone(), shared.clone(), registered.clone()));
    }
    let ids: Vec<String> = created_by.into_iter().map(|(id, _)| id).collect();
    while registered.load(Ordering::Acquire) < ids.len() as u32 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(args.settle).await;
    let rss = args.server_pid.and_then(report::process_rss_kib);

    // 4. Approvals, paced: reviewer r sends its k-th approval at (k * R + r) / rate.
    let mut counts = vec![0u32; args.reviewers as usize];
    for id in &ids {
        counts[shared.owner(id) as usize] += 1;
    }
    let interval = (args.approvals_per_second > 0.0)
        .then(|| Duration::from_secs_f64(1.0 / args.approvals_per_second));
    let (go_tx, go) = watch::channel(None::<Instant>);
    let mut approvers = JoinSet::new();
    for (r, queue) in approver_queues.into_iter().enumerate() {
        let client = Review::new(InterceptedService::new(
            channels[r % channels.len()].clone(),
            reviewer(r as u32)?,
        ));
        approvers.spawn(approve(
            client,
            r as u32,
            counts[r],
            queue,
            go.clone(),
            interval,
            shared.clone(),
        ));
    }
    go_tx.send_replace(Some(Instant::now()));
    while let Some(done) = approvers.join_next().await {
        done.map_err(|e| BenchError::Failed(format!("an approver failed: {e}")))?;
    }

    // 5. Every approved waiter wakes; give stragglers the call timeout, then stop.
    let finished = tokio::time::timeout(args.target.timeout, async {
        while waiters.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        shared.error("waiter_not_woken");
        waiters.abort_all();
    }
    streams.abort_all();

    let errors = shared.errors.lock().clone();
    let wake = LatencySummary::of(&shared.wake.lock());
    let approve_latency = LatencySummary::of(&shared.approve.lock());
    Ok(ReviewLoopReport {
        server: args.target.server.clone(),
        connections,
        waiters: args.waiters,
        reviewers: args.reviewers,
        created,
        approvals: shared.approvals.load(Ordering::Acquire),
        woken: shared.woken.load(Ordering::Acquire),
        streamed: shared.streamed.load(Ordering::Acquire),
        wake_latency: wake,
        approve_latency,
        errors,
        approvals_per_second: args.approvals_per_second.max(0.0),
        server_rss_kib: rss.map(|(now, _)| now),
        server_peak_rss_kib: rss.map(|(_, peak)| peak),
    })
}

/// Creates the run's pending actions (a production deploy: one `sre` approval), task `t`
/// as `agents[t]`; returns each action with the index of the agent that created it.
async fn create(
    args: &ReviewLoopArgs,
    channels: &[Channel],
    agents: &[Identity],
    shared: &Arc<Shared>,
) -> Result<Vec<(String, usize)>, BenchError> {
    let next = Arc::new(AtomicU32::new(0));
    let ids = Arc::new(Mutex::new(Vec::with_capacity(args.waiters as usize)));
    let mut tasks = JoinSet::new();
    for t in 0..CREATE_CONCURRENCY.min(args.waiters) {
        let mut client = Gate::new(InterceptedService::new(
            channels[t as usize % channels.len()].clone(),
            agents[t as usize % agents.len()].clone(),
        ));
        let agent = t as usize % agents.len();
        let (next, ids, shared, total) = (next.clone(), ids.clone(), shared.clone(), args.waiters);
        let with_token = args.target.token_file.is_some();
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::AcqRel) < total {
                let request = check_request(
                    "deploy.apply",
                    "production",
                    &shared.tag,
                    on_behalf_of(with_token),
                );
                match client.check_action(request).await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        if answer.status() == proto::ActionStatus::Pending {
                            ids.lock().push((answer.action_id, agent));
                        } else {
                            shared.error("created_not_pending");
                        }
                    }
                    Err(status) => shared.status(&status),
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| BenchError::Failed(format!("creating actions failed: {e}")))?;
    }
    let ids = std::mem::take(&mut *ids.lock());
    if ids.is_empty() {
        return Err(BenchError::Failed(
            "no pending action could be created (see the errors; the shipped policies send a production deploy.apply to sre)".to_string(),
        ));
    }
    Ok(ids)
}

/// Follows one reviewer's StreamPending, forwarding this run's pending actions that this
/// reviewer approves. Reconnects after a resync notice or a dropped stream, resuming where
/// it can; duplicates are dropped.
async fn follow(
    mut client: Review,
    r: u32,
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Delivered>,
    ready: mpsc::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut forwarded = HashSet::new();
    let (mut after, mut snapshot_done) = (0u64, false);
    loop {
        let request = proto::StreamPendingRequest {
            after_sequence: if snapshot_done { after } else { 0 },
        };
        let mut stream = match client.stream_pending(request).await {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                shared.status(&status);
                return;
            }
        };
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(status) => {
                    shared.status(&status);
                    break;
                }
            };
            after = after.max(message.sequence);
            match message.event {
                Some(Event::SnapshotComplete(_)) => {
                    snapshot_done = true;
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(()).await;
                    }
                }
                Some(Event::ResyncRequired(_)) => {
                    shared.error("stream_resync");
                    break;
                }
                Some(Event::Pending(record)) => {
                    let ours = record
                        .action
                        .as_ref()
                        .is_some_and(|a| a.resource == shared.tag);
                    if !ours {
                        continue;
                    }
                    shared.streamed.fetch_add(1, Ordering::Relaxed);
                    if shared.owner(&record.action_id) == r
                        && forwarded.insert(record.action_id.clone())
                    {
                        let _ = queue.send(Delivered {
                            action_id: record.action_id,
                            digest: record.action_digest,
                        });
                    }
                }
                _ => {}
            }
        }
    }
}

/// Waits for one action to become final; records the time since its approval was sent.
async fn wait(mut client: Gate, id: String, shared: Arc<Shared>, registered: Arc<AtomicU32>) {
    let mut first = true;
    loop {
        let request = proto::AwaitDecisionRequest {
            action_id: id.clone(),
            wait: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        };
        let mut request = tonic::Request::new(request);
        // No deadline of ours: the server answers after `wait` (capped by its max_await).
        request.set_timeout(AWAIT_CALL_TIMEOUT);
        let call = client.await_decision(request);
        if first {
            first = false;
            registered.fetch_add(1, Ordering::AcqRel);
        }
        match call.await {
            Ok(answer) if answer.get_ref().is_final => {
                let woken = Instant::now();
                let sent = shared.sent.lock().get(&id).copied();
                match sent {
                    Some(sent) => {
                        let us = u64::try_from(woken.saturating_duration_since(sent).as_micros())
                            .unwrap_or(u64::MAX);
                        shared.wake.lock().saturating_record(us.max(1));
                        shared.woken.fetch_add(1, Ordering::Relaxed);
                    }
                    None => shared.error("final_before_approval"),
                }
                return;
            }
            Ok(_) => {}
            Err(status) => {
                shared.status(&status);
                return;
            }
        }
    }
}

/// Approves `count` actions as they arrive from the stream, paced.
async fn approve(
    mut client: Review,
    r: u32,
    count: u32,
    mut queue: mpsc::UnboundedReceiver<Delivered>,
    mut go: watch::Receiver<Option<Instant>>,
    interval: Option<Duration>,
    shared: Arc<Shared>,
) {
    let Ok(start) = go.wait_for(Option::is_some).await.map(|s| *s) else {
        return;
    };
    let Some(start) = start else { return };
    for k in 0..count {
        let Some(delivered) = queue.recv().await else {
            shared.error("stream_ended_before_approval");
            return;
        };
        if let Some(interval) = interval {
            let slot =
                interval.saturating_mul(k.saturating_mul(shared.reviewers).saturating_add(r));
            tokio::time::sleep_until((start + slot).into()).await;
        }
        let request = proto::SubmitReviewRequest {
            action_id: delivered.action_id.clone(),
            verdict: proto::Verdict::Approve as i32,
            reason: "countersign bench review-loop".to_string(),
            action_digest: delivered.digest,
        };
        let sent = Instant::now();
        shared.sent.lock().insert(delivered.action_id, sent);
        match client.submit_review(request).await {
            Ok(_) => {
                let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                shared.approve.lock().saturating_record(us.max(1));
                shared.approvals.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => shared.status(&status),
        }
    }
}
