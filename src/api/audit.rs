//! `AuditService`: the raw evidence, for auditors.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use tonic::{Request, Response, Status};

use super::{Core, convert, status, validate};
use crate::auth;
use crate::ledger::LedgerError;
use crate::proto;
use crate::proto::audit_service_server::AuditService;

pub struct AuditApi {
    core: Arc<Core>,
}

impl AuditApi {
    pub fn new(core: Arc<Core>) -> Self {
        AuditApi { core }
    }
}

/// Events buffered towards one auditor; the reader waits for the client (the log is on
/// disk, so a slow auditor costs nobody else anything).
const EVENT_STREAM_BUFFER: usize = 256;
/// Events read from the log per blocking read.
const READ_CHUNK: usize = 512;

type EventStream =
    Pin<Box<dyn Stream<Item = Result<proto::ReadEventsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AuditService for AuditApi {
    type ReadEventsStream = EventStream;

    async fn read_events(
        &self,
        request: Request<proto::ReadEventsRequest>,
    ) -> Result<Response<Self::ReadEventsStream>, Status> {
        // Only auditors get here (see auth::roles).
        auth::principal(&request)?;
        let body = request.into_inner();
        let action_id = if body.action_id.is_empty() {
            None
        } else {
            Some(validate::action_id("action_id", &body.action_id).map_err(status::invalid)?)
        };
        let (tx, rx) = mpsc::channel(EVENT_STREAM_BUFFER);
        tokio::spawn(stream_events(
            self.core.clone(),
            tx,
            body.after_sequence,
            action_id,
            body.follow,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify_log(
        &self,
        request: Request<proto::VerifyLogRequest>,
    ) -> Result<Response<proto::VerifyLogResponse>, Status> {
        let principal = auth::principal(&request)?;
        let log = self.core.ledger.log().clone();
        // Re-hashing the whole log is long and blocking; keep it off the async workers.
        // A read that fails (a full disk, an I/O error) is UNAVAILABLE, not a finding: it
        // says nothing about the evidence, and the next call may succeed.
        let report = tokio::task::spawn_blocking(move || log.verify())
            .await
            .map_err(|e| Status::internal(format!("log verification did not finish: {e}")))?
            .map_err(|e| {
                tracing::warn!(requested_by = %principal.id, error = %e, "event log verification could not read the log");
                status::ledger(LedgerError::ReadFailed(format!(
                    "verification could not read the log, which says nothing about its integrity: {e}"
                )))
            })?;
        tracing::info!(
            requested_by = %principal.id,
            ok = report.ok,
            events_checked = report.events_checked,
            first_bad_sequence = ?report.first_bad_sequence,
            "event log verified"
        );
        Ok(Response::new(convert::verify_report(&report)))
    }
}

/// Reads the log in chunks after `after`, sends matching events, and (when following)
/// waits for the ledger to make more visible.
async fn stream_events(
    core: Arc<Core>,
    tx: mpsc::Sender<Result<proto::ReadEventsResponse, Status>>,
    after: u64,
    action_id: Option<Uuid>,
    follow: bool,
) {
    let log = core.ledger.log().clone();
    let mut applied = core.ledger.watch_applied();
    let mut next = after.saturating_add(1);
    loop {
        let head = *applied.borrow_and_update();
        while next <= head {
            let reader = log.clone();
            let from = next;
            let chunk = tokio::task::spawn_blocking(move || {
                reader
                    .iter_from(from)
                    .take_while(|e| e.as_ref().map_or(true, |e| e.sequence <= head))
                    .take(READ_CHUNK)
                    .collect::<Result<Vec<_>, _>>()
            })
            .await;
            let events = match chunk {
                Ok(Ok(events)) => events,
                Ok(Err(e)) => {
                    let _ = tx
                        .send(Err(Status::data_loss(format!(
                            "the event log cannot be read: {e}"
                        ))))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!(
                            "reading the log failed: {e}"
                        ))))
                        .await;
                    return;
                }
            };
            let Some(last) = events.last().map(|e| e.sequence) else {
                break;
            };
            for event in events {
                if action_id.is_some_and(|id| event.action_id != Some(id)) {
                    continue;
                }
                let message = proto::ReadEventsResponse {
                    event: Some(convert::event(&event)),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            next = last + 1;
        }
        if !follow {
            return;
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
            () = core.stopped() => return,
        }
    }
}
