//! `ReviewService.StreamPending`: the live list a reviewer works from.
//!
//! Each stream is one task that owns a bounded buffer towards its client. It first sends
//! what the reviewer may review now (a snapshot, or the log since the sequence it resumes
//! after), then follows the ledger's feed of committed batches. Only this task ever waits
//! for its client: a client that leaves its buffer full for the stall timeout
//! (`limits.reviewer_stall_timeout`, 3 s by default) is told to
//! resync and the stream is closed; a task that falls behind the feed itself (the feed's
//! ring is bounded) is closed the same way. No other reviewer, agent or the ledger ever
//! waits for a slow reviewer, and two slots of the buffer are always kept free so the
//! resync notice and the status that ends the stream can be delivered.
//!
//! How a stream ends says what to do: after `resync_required` with ABORTED (reconnect
//! with `after_sequence = 0`), when the server stops with UNAVAILABLE (reconnect and
//! resume), never with OK while the client is still reading.
//!
//! Resuming: every message carries a log sequence number. A client that has seen
//! `snapshot_complete` (or any later message) reconnects with the sequence of the last
//! message it received and gets exactly what it missed, then `caught_up`; one cut off
//! during the snapshot reconnects with 0.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Core, convert};
use crate::domain::Principal;
use crate::ledger::CommittedBatch;
use crate::proto;
use crate::proto::stream_pending_response::Event as StreamEvent;
use crate::workflow::{ActionEvent, ActionRecord, ActionStatus, SERVER_ACTOR, Verdict};

pub type PendingStream =
    Pin<Box<dyn Stream<Item = Result<proto::StreamPendingResponse, Status>> + Send + 'static>>;

/// Messages buffered towards one client. Two slots are always kept free: the resync
/// notice and the status that ends the stream.
const STREAM_BUFFER: usize = 256;

/// Slots [`ReviewerStream::send`] waits for: the message's and the two kept free.
const SLOTS_PER_SEND: usize = 3;

/// How far back a resume may reach; further back, a fresh snapshot is cheaper and exact.
const MAX_RESUME_EVENTS: u64 = 100_000;

pub(super) fn open(
    core: Arc<Core>,
    reviewer: Principal,
    after: u64,
) -> Result<PendingStream, Status> {
    // Subscribe before reading the state: every batch not in the state read below is then
    // certainly delivered by the feed.
    let feed = core.ledger.subscribe();
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let _counted = OpenStream::count(&core.reviewer_streams);
        let reviewer_id = reviewer.id.clone();
        let mut stream = ReviewerStream { core, reviewer, tx };
        if let Err(ended) = stream.run(feed, after).await {
            tracing::debug!(reviewer = %reviewer_id, reason = ended, "reviewer stream ended");
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Counts a reviewer stream as open for as long as it lives.
struct OpenStream(Arc<std::sync::atomic::AtomicUsize>);

impl OpenStream {
    fn count(streams: &Arc<std::sync::atomic::AtomicUsize>) -> OpenStream {
        streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OpenStream(streams.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

struct ReviewerStream {
    core: Arc<Core>,
    reviewer: Principal,
    tx: mpsc::Sender<Result<proto::StreamPendingResponse, Status>>,
}

/// Why a stream task stopped (for the debug log).
type Ended = &'static str;

impl ReviewerStream {
    async fn run(
        &mut self,
        mut feed: broadcast::Receiver<Arc<CommittedBatch>>,
        after: u64,
    ) -> Result<(), Ended> {
        let caught_up_to = if after == 0 {
            self.send_snapshot().await?
        } else {
            self.send_since(after).await?
        };
        loop {
            let batch = tokio::select! {
                received = feed.recv() => received,
                () = self.tx.closed() => return Err("client went away"),
                () = self.core.stopped() => return Err(self.server_stopping()),
            };
            match batch {
                Ok(batch) => {
                    for committed in &batch.events {
                        if committed.sequence <= caught_up_to {
                            continue;
                        }
                        let Some(record) = batch.record(&committed.action_id) else {
                            continue;
                        };
                        if let Some(message) =
                            self.message(committed.sequence, &committed.event, record)
                        {
                            self.send(message).await?;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.resync("the stream fell behind the server's feed")?;
                }
                Err(broadcast::error::RecvError::Closed) => return Err(self.server_stopping()),
            }
        }
    }

    /// Everything now pending that this reviewer may review; returns the state's sequence.
    async fn send_snapshot(&mut self) -> Result<u64, Ended> {
        let (sequence, mut pending) = {
            let actions = self.core.ledger.actions();
            let pending: Vec<ActionRecord> = actions
                .pending()
                .filter(|r| may_review(&self.reviewer, r))
                .cloned()
                .collect();
            (actions.applied_sequence(), pending)
        };
        pending.sort_by_key(|r| r.last_sequence);
        let count = u32::try_from(pending.len()).unwrap_or(u32::MAX);
        for record in &pending {
            self.send(proto::StreamPendingResponse {
                sequence: record.last_sequence,
                event: Some(StreamEvent::Pending(convert::action_record(record))),
            })
            .await?;
        }
        self.send(proto::StreamPendingResponse {
            sequence,
            event: Some(StreamEvent::SnapshotComplete(proto::SnapshotComplete {
                pending_count: count,
            })),
        })
        .await?;
        Ok(sequence)
    }

    /// What happened after `after`, read back from the log, then `caught_up`; returns the
    /// state's sequence.
    async fn send_since(&mut self, after: u64) -> Result<u64, Ended> {
        let head = self.core.ledger.actions().applied_sequence();
        if after > head || head - after > MAX_RESUME_EVENTS {
            self.resync(if after > head {
                "the sequence to resume after is beyond the log's end"
            } else {
                "the sequence to resume after is too far back"
            })?;
            return Err("resync requested");
        }
        let log = self.core.ledger.log().clone();
        let stored = tokio::task::spawn_blocking(move || {
            log.iter_from(after + 1)
                .take_while(|e| e.as_ref().map_or(true, |e| e.sequence <= head))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|_| "log read interrupted")?;
        let Ok(stored) = stored else {
            self.resync("the log could not be read back; take a fresh snapshot")?;
            return Err("log read failed");
        };
        for event in stored {
            let (Some(action_id), Ok(Some(decoded))) = (
                event.action_id,
                ActionEvent::from_stored(&event.kind, &event.payload),
            ) else {
                continue;
            };
            let record = match self.core.ledger.action(&action_id).await {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(_) => {
                    self.resync("an action could not be read back; take a fresh snapshot")?;
                    return Err("action read failed");
                }
            };
            if let Some(message) = self.message(event.sequence, &decoded, &record) {
                self.send(message).await?;
            }
        }
        self.send(proto::StreamPendingResponse {
            sequence: head,
            event: Some(StreamEvent::CaughtUp(proto::CaughtUp {})),
        })
        .await?;
        Ok(head)
    }

    /// The message a reviewer gets for one committed event, if it concerns them.
    fn message(
        &self,
        sequence: u64,
        event: &ActionEvent,
        record: &ActionRecord,
    ) -> Option<proto::StreamPendingResponse> {
        if !may_review(&self.reviewer, record) {
            return None;
        }
        let action_id = record.id.to_string();
        let event = match event {
            ActionEvent::Evaluated(evaluated) if evaluated.status == ActionStatus::Pending => {
                StreamEvent::Pending(convert::action_record(record))
            }
            ActionEvent::Voted(_) => {
                let vote = record.votes.iter().find(|v| v.sequence == sequence)?;
                StreamEvent::VoteAdded(proto::VoteAdded {
                    action_id,
                    vote: Some(convert::vote(vote)),
                    approvals_remaining: record.approvals_remaining(),
                })
            }
            ActionEvent::Approved(_)
            | ActionEvent::Rejected(_)
            | ActionEvent::Expired(_)
            | ActionEvent::Cancelled(_) => StreamEvent::Resolved(resolution(record, event)),
            _ => return None,
        };
        Some(proto::StreamPendingResponse {
            sequence,
            event: Some(event),
        })
    }

    /// Sends when the buffer has room for this message and the two kept free, waiting at
    /// most the stall timeout for the client to make it. A group commit can carry hundreds
    /// of new pending actions at once, so a full buffer alone is no sign of a stalled
    /// client; not reading for that long is.
    async fn send(&self, message: proto::StreamPendingResponse) -> Result<(), Ended> {
        let stall_timeout = self.core.reviewer_stall_timeout;
        match tokio::time::timeout(stall_timeout, self.tx.reserve_many(SLOTS_PER_SEND)).await {
            Ok(Ok(mut permits)) => {
                // The other permits are released unused: the slots kept free.
                if let Some(permit) = permits.next() {
                    permit.send(Ok(message));
                }
                Ok(())
            }
            Ok(Err(_)) => Err("client went away"),
            Err(_) => self.resync(&format!(
                "the client did not read its stream for {}",
                humantime::format_duration(stall_timeout)
            )),
        }
    }

    /// Tells the client to reconnect with a fresh snapshot, and ends the stream with
    /// ABORTED saying the same, for clients that act on the status rather than the message.
    /// Both fit: two slots are always free.
    fn resync(&self, reason: &str) -> Result<(), Ended> {
        let reason = format!("{reason}; reconnect with after_sequence = 0");
        let message = proto::StreamPendingResponse {
            sequence: 0,
            event: Some(StreamEvent::ResyncRequired(proto::ResyncRequired {
                reason: reason.clone(),
            })),
        };
        let _ = self.tx.try_send(Ok(message));
        let _ = self.tx.try_send(Err(Status::aborted(format!(
            "the reviewer stream was closed: {reason}"
        ))));
        Err("resync requested")
    }

    /// Ends the stream with UNAVAILABLE: the client reconnects (to this server restarted,
    /// or another) and resumes after the last sequence it received.
    fn server_stopping(&self) -> Ended {
        let _ = self.tx.try_send(Err(Status::unavailable(
            "the server is stopping; reconnect and resume with after_sequence = the last sequence received",
        )));
        "server stopping"
    }
}

/// Who resolved an action, when and why, from its resolving event.
fn resolution(record: &ActionRecord, event: &ActionEvent) -> proto::ActionResolved {
    let (status, decided_by, reason) = match event {
        ActionEvent::Approved(approved) => (
            ActionStatus::Approved,
            approved.approved_by.clone(),
            String::new(),
        ),
        ActionEvent::Rejected(rejected) => (
            ActionStatus::Rejected,
            vec![rejected.rejected_by.clone()],
            record
                .votes
                .iter()
                .rev()
                .find(|v| v.verdict == Verdict::Reject && v.reviewer.id == rejected.rejected_by)
                .map(|v| v.reason.clone())
                .unwrap_or_default(),
        ),
        ActionEvent::Expired(expired) => (
            ActionStatus::Expired,
            vec![SERVER_ACTOR.to_string()],
            format!(
                "no decision before {}",
                expired
                    .expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        ),
        ActionEvent::Cancelled(cancelled) => (
            ActionStatus::Cancelled,
            vec![cancelled.cancelled_by.clone()],
            cancelled.reason.clone(),
        ),
        _ => (record.status, Vec::new(), String::new()),
    };
    proto::ActionResolved {
        action_id: record.id.to_string(),
        status: convert::status(status) as i32,
        decided_at: record.decided_at.map(convert::timestamp),
        decided_by,
        reason,
    }
}

/// A reviewer sees an action that needed review when one of its groups may review it (or
/// any human may), and never its own or one taken on its behalf.
pub(super) fn may_review(reviewer: &Principal, record: &ActionRecord) -> bool {
    let needed_review = record.expires_at.is_some();
    let own = record.requester.id.eq_ignore_ascii_case(&reviewer.id)
        || record
            .request
            .task
            .on_behalf_of
            .eq_ignore_ascii_case(&reviewer.id);
    let groups = record.reviewer_groups();
    let in_group = groups.is_empty() || groups.iter().any(|g| reviewer.in_group(g));
    needed_review && !own && in_group
}
