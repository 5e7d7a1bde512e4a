//! Refused calls as audit events, without letting a flood of them flood the log.
//!
//! Every UNAUTHENTICATED and PERMISSION_DENIED from the edge is reported here, and every
//! call refused for its caller's rate budget (RESOURCE_EXHAUSTED, `rate_limit`). The first
//! refusal of a kind (same status, RPC and subject: the principal, or the peer address
//! when nobody authenticated) is recorded at once as an `access.denied` event; further ones
//! within [`WINDOW`] are only counted, and recorded as one summary event when the window
//! closes. At most [`MAX_SUBJECTS`] kinds are tracked; beyond that, refusals are counted
//! under one catch-all subject. So the log grows by at most about two events per tracked
//! kind per window, however fast a client retries with a bad token, and memory stays
//! bounded.
//!
//! [`DenialAggregator`] is the pure part (time passed in); [`start_recorder`] runs it
//! against the ledger. Events carry the reason the caller was given, which never quotes a
//! credential (see `credentials`), and never the credential itself.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::domain::Principal;
use crate::ledger::Ledger;
use crate::store::NewEvent;

/// The event kind of a recorded refusal.
pub const ACCESS_DENIED: &str = "access.denied";

/// How long further refusals of one kind are only counted after the first is recorded.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Kinds of refusal tracked at once; more are counted under [`OVERFLOW_SUBJECT`].
pub const MAX_SUBJECTS: usize = 256;

/// The subject of refusals counted together once [`MAX_SUBJECTS`] is reached.
pub const OVERFLOW_SUBJECT: &str = "*";

/// Refusals waiting for the recorder. When full, refusals are counted but not described.
const QUEUE_CAPACITY: usize = 1024;

/// How often closed windows are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Longest RPC path kept: a refused path may be anything a client sent.
const MAX_RPC_BYTES: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeniedAs {
    Unauthenticated,
    PermissionDenied,
    /// Over the caller's rate budget (`auth::rate_limit`).
    ResourceExhausted,
}

/// One refused call, as the edge saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub status: DeniedAs,
    /// The gRPC path, e.g. `/countersign.v1.AuditService/ReadEvents`.
    pub rpc: String,
    pub peer: Option<IpAddr>,
    /// Set for PERMISSION_DENIED and RESOURCE_EXHAUSTED: who was refused.
    pub principal: Option<Principal>,
    /// What the caller was told.
    pub reason: String,
    pub at: DateTime<Utc>,
}

impl Denial {
    fn subject(&self) -> String {
        match (&self.principal, self.peer) {
            (Some(principal), _) => principal.id.clone(),
            (None, Some(peer)) => peer.to_string(),
            (None, None) => "unknown".to_string(),
        }
    }
}

/// The payload of an `access.denied` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessDenied {
    pub status: DeniedAs,
    pub rpc: String,
    /// The peer address of the first refusal counted here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<Principal>,
    /// `principal.id`, a peer address, or [`OVERFLOW_SUBJECT`].
    pub subject: String,
    pub reason: String,
    /// How many refusals this event stands for.
    pub count: u64,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    /// `false`: one refusal, recorded as it happened. `true`: the refusals of this kind
    /// after the first one in a window, counted and recorded when the window closed.
    pub aggregated: bool,
}

impl AccessDenied {
    fn single(denial: &Denial, subject: String) -> AccessDenied {
        AccessDenied {
            status: denial.status,
            rpc: denial.rpc.clone(),
            peer: denial.peer.map(|p| p.to_string()),
            principal: denial.principal.clone(),
            subject,
            reason: denial.reason.clone(),
            count: 1,
            first_at: denial.at,
            last_at: denial.at,
            aggregated: false,
        }
    }

    /// The log event; the actor is the refused principal, or `unauthenticated`.
    pub fn to_event(&self) -> Result<NewEvent, serde_json::Error> {
        Ok(NewEvent {
            kind: ACCESS_DENIED.to_string(),
            time: self.last_at,
            actor: self
                .principal
                .as_ref()
                .map_or_else(|| "unauthenticated".to_string(), |p| p.id.clone()),
            action_id: None,
            payload: serde_json::to_value(self)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    status: DeniedAs,
    rpc: String,
    subject: String,
}

/// The refusals of one kind since the first of the current window.
#[derive(Debug)]
struct Window {
    opened: DateTime<Utc>,
    /// Counted after the first (which was recorded at once), not yet recorded.
    summary: Option<AccessDenied>,
}

/// Decides which refusals become events; see the module documentation.
#[derive(Debug)]
pub struct DenialAggregator {
    window: chrono::Duration,
    max_subjects: usize,
    open: HashMap<Key, Window>,
}

impl Default for DenialAggregator {
    fn default() -> Self {
        DenialAggregator::new(WINDOW, MAX_SUBJECTS)
    }
}

impl DenialAggregator {
    pub fn new(window: Duration, max_subjects: usize) -> DenialAggregator {
        DenialAggregator {
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            max_subjects,
            open: HashMap::new(),
        }
    }

    /// Counts one refusal; returns the event to record now, if this is the first of its
    /// kind in the window.
    pub fn observe(&mut self, mut denial: Denial) -> Option<AccessDenied> {
        truncate(&mut denial.rpc, MAX_RPC_BYTES);
        let mut key = Key {
            status: denial.status,
            rpc: denial.rpc.clone(),
            subject: denial.subject(),
        };
        if !self.open.contains_key(&key) && self.open.len() >= self.max_subjects {
            key = Key {
                status: denial.status,
                rpc: OVERFLOW_SUBJECT.to_string(),
                subject: OVERFLOW_SUBJECT.to_string(),
            };
        }
        match self.open.get_mut(&key) {
            Some(window) => {
                match &mut window.summary {
                    Some(summary) => {
                        summary.count += 1;
                        summary.last_at = summary.last_at.max(denial.at);
                    }
                    None => {
                        let mut summary = AccessDenied::single(&denial, key.subject.clone());
                        summary.aggregated = true;
                        if key.subject == OVERFLOW_SUBJECT {
                            summary.rpc = OVERFLOW_SUBJECT.to_string();
                        }
                        window.summary = Some(summary);
                    }
                }
                None
            }
            None => {
                let mut first = AccessDenied::single(&denial, key.subject.clone());
                if key.subject == OVERFLOW_SUBJECT {
                    first.rpc = OVERFLOW_SUBJECT.to_string();
                }
                self.open.insert(
                    key,
                    Window {
                        opened: denial.at,
                        summary: None,
                    },
                );
                Some(first)
            }
        }
    }

    /// Closes the windows that ended by `now`; returns their summaries (only those that
    /// counted anything after their first refusal).
    pub fn close_due(&mut self, now: DateTime<Utc>) -> Vec<AccessDenied> {
        let window = self.window;
        let mut due = Vec::new();
        self.open.retain(|_, open| {
            if now.signed_duration_since(open.opened) < window {
                return true;
            }
            due.extend(open.summary.take());
            false
        });
        sort(due)
    }

    /// Closes every window (shutdown): nothing counted is lost.
    pub fn close_all(&mut self) -> Vec<AccessDenied> {
        sort(
            self.open
                .drain()
                .filter_map(|(_, open)| open.summary)
                .collect(),
        )
    }
}

fn sort(mut events: Vec<AccessDenied>) -> Vec<AccessDenied> {
    events.sort_by(|a, b| (a.first_at, &a.subject).cmp(&(b.first_at, &b.subject)));
    events
}

fn truncate(text: &mut String, max_bytes: usize) {
    if text.len() > max_bytes {
        let mut end = max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Hands refusals to the recorder without ever blocking or failing the call being refused.
#[derive(Debug, Clone)]
pub struct DenialReporter {
    queue: mpsc::Sender<Denial>,
    /// Refusals that found the queue full, by status; recorded as counts by the recorder.
    uncounted: Arc<Uncounted>,
}

#[derive(Debug, Default)]
struct Uncounted {
    unauthenticated: AtomicU64,
    permission_denied: AtomicU64,
    resource_exhausted: AtomicU64,
}

impl Uncounted {
    fn of(&self, status: DeniedAs) -> &AtomicU64 {
        match status {
            DeniedAs::Unauthenticated => &self.unauthenticated,
            DeniedAs::PermissionDenied => &self.permission_denied,
            DeniedAs::ResourceExhausted => &self.resource_exhausted,
        }
    }
}

impl DenialReporter {
    /// A reporter and the queue it feeds; [`start_recorder`] drains that queue into the log.
    pub fn new() -> (DenialReporter, mpsc::Receiver<Denial>) {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let reporter = DenialReporter {
            queue,
            uncounted: Arc::new(Uncounted::default()),
        };
        (reporter, receiver)
    }

    pub fn report(&self, denial: Denial) {
        let status = denial.status;
        if self.queue.try_send(denial).is_err() {
            self.uncounted.of(status).fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts the task that records refusals in `ledger`. It ends, recording every pending
/// summary first, when the last [`DenialReporter`] is dropped; it holds the ledger until
/// then, so a graceful stop waits for it.
pub fn start_recorder(ledger: Arc<Ledger>) -> (DenialReporter, JoinHandle<()>) {
    let (reporter, receiver) = DenialReporter::new();
    let task = tokio::spawn(record(receiver, reporter.uncounted.clone(), ledger));
    (reporter, task)
}

async fn record(
    mut receiver: mpsc::Receiver<Denial>,
    uncounted: Arc<Uncounted>,
    ledger: Arc<Ledger>,
) {
    let mut aggregator = DenialAggregator::default();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut received = Vec::with_capacity(64);
    loop {
        tokio::select! {
            count = receiver.recv_many(&mut received, 64) => {
                if count == 0 {
                    let mut last = aggregator.close_all();
                    last.extend(lost(&uncounted, Utc::now()));
                    write(&ledger, last).await;
                    return;
                }
                let now_recorded: Vec<AccessDenied> = received
                    .drain(..)
                    .filter_map(|denial| aggregator.observe(denial))
                    .collect();
                write(&ledger, now_recorded).await;
            }
            _ = sweep.tick() => {
                let now = Utc::now();
                let mut due = aggregator.close_due(now);
                due.extend(lost(&uncounted, now));
                write(&ledger, due).await;
            }
        }
    }
}

/// Summaries of the refusals that arrived faster than they could be queued.
fn lost(uncounted: &Uncounted, now: DateTime<Utc>) -> Vec<AccessDenied> {
    [
        DeniedAs::Unauthenticated,
        DeniedAs::PermissionDenied,
        DeniedAs::ResourceExhausted,
    ]
    .into_iter()
    .filter_map(|status| {
        let count = uncounted.of(status).swap(0, Ordering::Relaxed);
        (count > 0).then(|| AccessDenied {
            status,
            rpc: OVERFLOW_SUBJECT.to_string(),
            peer: None,
            principal: None,
            subject: OVERFLOW_SUBJECT.to_string(),
            reason:
                "refused faster than the refusals could be described; only their number is known"
                    .into(),
            count,
            first_at: now,
            last_at: now,
            aggregated: true,
        })
    })
    .collect()
}

async fn write(ledger: &Ledger, denials: Vec<AccessDenied>) {
    if denials.is_empty() {
        return;
    }
    let mut events = Vec::with_capacity(denials.len());
    for denial in &denials {
        tracing::warn!(
            status = ?denial.status,
            rpc = %denial.rpc,
            subject = %denial.subject,
            count = denial.count,
            aggregated = denial.aggregated,
            reason = %denial.reason,
            "call refused"
        );
        match denial.to_event() {
            Ok(event) => events.push(event),
            Err(e) => tracing::error!(error = %e, "access denial does not encode"),
        }
    }
    if let Err(e) = ledger.record(events).await {
        tracing::error!(error = %e, "access denials could not be recorded in the event log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::PrincipalKind;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn unauthenticated(peer: &str, seconds: i64) -> Denial {
        Denial {
            status: DeniedAs::Unauthenticated,
            rpc: "/countersign.v1.ActionGate/CheckAction".into(),
            peer: Some(peer.parse().unwrap()),
            principal: None,
            reason: "invalid credentials: bad signature".into(),
            at: at(seconds),
        }
    }

    fn refused(id: &str, seconds: i64) -> Denial {
        Denial {
            status: DeniedAs::PermissionDenied,
            rpc: "/countersign.v1.AuditService/ReadEvents".into(),
            peer: Some("10.0.0.9".parse().unwrap()),
            principal: Some(Principal {
                id: id.into(),
                kind: PrincipalKind::Human,
                groups: vec![],
                authenticated_by: "test".into(),
            }),
            reason: "may not read the audit log".into(),
            at: at(seconds),
        }
    }

    #[test]
    fn the_first_refusal_is_recorded_at_once_and_repeats_are_summed_when_the_window_closes() {
        let mut aggregator = DenialAggregator::new(Duration::from_secs(60), 16);
        let first = aggregator.observe(unauthenticated("10.0.0.1", 0)).unwrap();
        assert_eq!((first.count, first.aggregated), (1, false));
        assert_eq!(first.subject, "10.0.0.1");
        for second in 1..1000 {
            assert_eq!(
                aggregator.observe(unauthenticated("10.0.0.1", second % 59)),
                None
            );
        }
        assert!(aggregator.close_due(at(59)).is_empty());
        let summary = aggregator.close_due(at(60));
        assert_eq!(summary.len(), 1);
        assert_eq!((summary[0].count, summary[0].aggregated), (999, true));
        assert_eq!(summary[0].last_at, at(58));
        // A new window starts with a new immediate event.
        assert!(
            aggregator
                .observe(unauthenticated("10.0.0.1", 61))
                .is_some()
        );
    }

    #[test]
    fn a_lone_refusal_leaves_no_summary() {
        let mut aggregator = DenialAggregator::new(Duration::from_secs(60), 16);
        assert!(aggregator.observe(refused("bob", 0)).is_some());
        assert!(aggregator.close_due(at(120)).is_empty());
        assert!(aggregator.close_all().is_empty());
    }

    #[test]
    fn kinds_are_told_apart_by_status_rpc_and_subject() {
        let mut aggregator = DenialAggregator::new(Duration::from_secs(60), 16);
        assert!(aggregator.observe(refused("bob", 0)).is_some());
        assert!(aggregator.observe(refused("carol", 0)).is_some());
        assert!(aggregator.observe(unauthenticated("10.0.0.1", 0)).is_some());
        assert!(aggregator.observe(unauthenticated("10.0.0.2", 0)).is_some());
        let mut other_rpc = refused("bob", 1);
        other_rpc.rpc = "/countersign.v1.AuditService/VerifyLog".into();
        assert!(aggregator.observe(other_rpc).is_some());
        assert!(aggregator.observe(refused("bob", 2)).is_none());
    }

    #[test]
    fn past_the_subject_limit_refusals_share_one_catch_all_and_nothing_is_lost() {
        let mut aggregator = DenialAggregator::new(Duration::from_secs(60), 4);
        let mut recorded = 0;
        for i in 0..1000 {
            if aggregator
                .observe(unauthenticated(&format!("10.0.{}.{}", i / 256, i % 256), 0))
                .is_some()
            {
                recorded += 1;
            }
        }
        // Four tracked subjects and the catch-all's first refusal.
        assert_eq!(recorded, 5);
        let summaries = aggregator.close_all();
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].subject, OVERFLOW_SUBJECT);
        assert_eq!(summaries[0].count, 1000 - 5);
        assert_eq!(recorded as u64 + summaries[0].count, 1000);
    }

    #[test]
    fn shutdown_records_every_pending_summary() {
        let mut aggregator = DenialAggregator::default();
        aggregator.observe(refused("bob", 0));
        aggregator.observe(refused("bob", 1));
        aggregator.observe(refused("bob", 2));
        let last = aggregator.close_all();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].count, 2);
    }

    #[test]
    fn long_rpc_paths_are_cut_and_events_name_the_refused_principal() {
        let mut aggregator = DenialAggregator::default();
        let mut denial = refused("bob", 0);
        denial.rpc = "/countersign.v1.ActionGate/".to_string() + &"é".repeat(500);
        let event = aggregator.observe(denial).unwrap();
        assert!(event.rpc.len() <= MAX_RPC_BYTES);
        let stored = event.to_event().unwrap();
        assert_eq!(stored.kind, ACCESS_DENIED);
        assert_eq!(stored.actor, "bob");
        assert_eq!(stored.payload["status"], "permission_denied");
        let anonymous = AccessDenied::single(&unauthenticated("10.0.0.1", 0), "10.0.0.1".into());
        assert_eq!(anonymous.to_event().unwrap().actor, "unauthenticated");
    }
}
