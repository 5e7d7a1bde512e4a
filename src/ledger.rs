//! The ledger: the one writer of the event log and of the action state.
//!
//! Every state change goes through a single thread that owns the write side of both the
//! [`EventLog`] and the in-memory [`Actions`]. That thread takes commands from a bounded
//! queue, decides each one against the state as it will be after the commands before it
//! (so two retries with one idempotency key in the same batch still resolve to one
//! action), appends the whole batch with one flush (group commit), and only then makes the
//! new state visible and answers the callers. So:
//!
//! - a caller hears back only once its events are durable;
//! - readers never see an event the log does not hold;
//! - the in-memory state is a pure fold of the log, rebuilt the same way at start-up.
//!
//! A dedicated OS thread (not a tokio task) does the blocking `flush`, which also keeps
//! sled's `flush_async` out of the picture (sled issue 1308).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::store::{EventLog, NewEvent, StoreError, StoredEvent, VerifyReport};
use crate::workflow::record::EventContext;
use crate::workflow::{ActionEvent, ActionRecord, ActionRequested, Actions, PolicyEvaluated};

/// How many commands one group commit takes at most. Bounds the latency a batch adds to
/// its first command and the memory of one append.
const MAX_BATCH: usize = 512;

/// Commands waiting for the writer. When full, callers wait (backpressure) instead of the
/// queue growing without bound.
const QUEUE_CAPACITY: usize = 8192;

/// The actor id the server records for events it causes itself.
pub const SERVER_ACTOR: &str = "countersign";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "the event log cannot be written ({0}); nothing was recorded and the action is not allowed"
    )]
    WriteFailed(String),
    #[error(
        "an earlier write to the event log could not be made durable ({0}); countersign refuses new actions until the cause is fixed and it is restarted"
    )]
    Poisoned(String),
    #[error(
        "the event log failed verification ({0}); countersign refuses new actions until an operator investigates (see AuditService.VerifyLog)"
    )]
    IntegrityFailure(String),
    #[error("idempotency key already used by this caller for a different action ({existing})")]
    IdempotencyConflict { existing: Uuid },
    #[error("countersign is shutting down")]
    Stopped,
    #[error("the event log cannot be opened: {0}")]
    Open(#[from] StoreError),
}

/// A fully evaluated CheckAction, ready to be recorded.
#[derive(Debug)]
pub struct NewCheck {
    pub action_id: Uuid,
    pub time: DateTime<Utc>,
    pub requested: ActionRequested,
    pub evaluated: PolicyEvaluated,
}

#[derive(Debug)]
pub enum CheckRecorded {
    /// The check was appended to the log.
    New(ActionRecord),
    /// The caller retried with the same idempotency key and the same action; nothing was
    /// appended.
    Existing(ActionRecord),
}

enum Command {
    RecordCheck {
        check: Box<NewCheck>,
        reply: oneshot::Sender<Result<CheckRecorded, LedgerError>>,
    },
}

/// What start-up found in the log.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    pub events: u64,
    pub actions: usize,
    pub verification: VerifyReport,
    /// Set when the log cannot be trusted; the ledger then refuses writes.
    pub integrity_problem: Option<String>,
}

pub struct Ledger {
    log: Arc<EventLog>,
    state: Arc<RwLock<Actions>>,
    commands: mpsc::Sender<Command>,
    health: Arc<Health>,
    /// Joined on drop so the last batch is flushed before the process exits.
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Why the ledger refuses writes, if it does. Shared with the writer thread.
struct Health {
    refusing: AtomicBool,
    refusal: Mutex<Option<Refusal>>,
    /// Tells the server (health service) the moment writes start being refused.
    refusing_watch: watch::Sender<bool>,
}

#[derive(Clone)]
enum Refusal {
    /// The log failed verification at start-up.
    Integrity(String),
    /// A batch may have been written but could not be made durable.
    NotDurable(String),
}

impl Health {
    fn refuse_writes(&self) -> Option<LedgerError> {
        if !self.refusing.load(Ordering::Acquire) {
            return None;
        }
        Some(match self.refusal.lock().clone() {
            Some(Refusal::Integrity(problem)) => LedgerError::IntegrityFailure(problem),
            Some(Refusal::NotDurable(problem)) => LedgerError::Poisoned(problem),
            None => LedgerError::Poisoned("unknown".into()),
        })
    }

    fn new() -> Health {
        Health {
            refusing: AtomicBool::new(false),
            refusal: Mutex::new(None),
            refusing_watch: watch::Sender::new(false),
        }
    }

    fn refuse(&self, why: Refusal) {
        *self.refusal.lock() = Some(why);
        self.refusing.store(true, Ordering::Release);
        self.refusing_watch.send_replace(true);
    }
}

impl Ledger {
    /// Opens the log in `data_dir`, verifies its chain and rebuilds the action state.
    ///
    /// A log that fails verification still opens, so auditors can read and verify it, but
    /// the ledger then refuses every write: state folded from tampered events cannot be
    /// trusted to decide anything.
    pub fn open(data_dir: &Path) -> Result<(Ledger, ReplayReport), LedgerError> {
        let log = Arc::new(EventLog::open(data_dir)?);
        Self::with_log(log)
    }

    fn with_log(log: Arc<EventLog>) -> Result<(Ledger, ReplayReport), LedgerError> {
        let verification = log.verify();
        let mut integrity_problem = verification.problem.clone().filter(|_| !verification.ok);

        let mut actions = Actions::default();
        let mut events = 0u64;
        for stored in log.iter_from(1) {
            events += 1;
            let folded = stored
                .map_err(|e| e.to_string())
                .and_then(|stored| fold(&mut actions, &stored).map_err(|e| e.to_string()));
            if let Err(problem) = folded {
                integrity_problem.get_or_insert(problem);
            }
        }

        let health = Arc::new(Health::new());
        if let Some(problem) = &integrity_problem {
            health.refuse(Refusal::Integrity(problem.clone()));
        }
        let report = ReplayReport {
            events,
            actions: actions.len(),
            verification,
            integrity_problem,
        };

        let state = Arc::new(RwLock::new(actions));
        let (commands, queue) = mpsc::channel(QUEUE_CAPACITY);
        let writer = Writer {
            log: log.clone(),
            state: state.clone(),
            health: health.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("countersign-ledger".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| LedgerError::WriteFailed(format!("cannot start the writer: {e}")))?;

        Ok((
            Ledger {
                log,
                state,
                commands,
                health,
                writer: Mutex::new(Some(handle)),
            },
            report,
        ))
    }

    /// Records a check durably, or returns the action an idempotent retry refers to.
    pub async fn record_check(&self, check: NewCheck) -> Result<CheckRecorded, LedgerError> {
        if let Some(refusal) = self.health.refuse_writes() {
            return Err(refusal);
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::RecordCheck {
                check: Box::new(check),
                reply,
            })
            .await
            .map_err(|_| LedgerError::Stopped)?;
        answer.await.map_err(|_| LedgerError::Stopped)?
    }

    /// Read access to the current state. Hold the guard briefly: the writer waits for it.
    pub fn actions(&self) -> RwLockReadGuard<'_, Actions> {
        self.state.read()
    }

    pub fn log(&self) -> &Arc<EventLog> {
        &self.log
    }

    /// Why writes are refused, if they are.
    pub fn write_refusal(&self) -> Option<LedgerError> {
        self.health.refuse_writes()
    }

    /// Becomes `true` when the ledger starts refusing writes (and stays so).
    pub fn watch_refusal(&self) -> watch::Receiver<bool> {
        self.health.refusing_watch.subscribe()
    }

    /// Stops taking commands, lets the writer finish what is queued, and flushes.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Closing the queue ends the writer's loop after the queued commands.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.commands, closed));
        let writer = self.writer.lock().take();
        if writer.is_some_and(|handle| handle.join().is_err()) {
            tracing::error!("the ledger writer thread panicked");
        }
        if let Err(e) = self.log.flush() {
            tracing::error!(error = %e, "final flush of the event log failed");
        }
    }
}

/// Folds one stored event into the state (start-up replay and live commits alike).
fn fold(actions: &mut Actions, stored: &StoredEvent) -> Result<(), String> {
    let Some(event) =
        ActionEvent::from_stored(&stored.kind, &stored.payload).map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    let action_id = stored.action_id.ok_or_else(|| {
        format!(
            "event {}: {} has no action id",
            stored.sequence, stored.kind
        )
    })?;
    let at = EventContext {
        sequence: stored.sequence,
        time: stored.time,
        action_id,
    };
    actions.apply(at, &event).map_err(|e| e.to_string())
}

/// The writer thread's side of the ledger.
struct Writer {
    log: Arc<EventLog>,
    state: Arc<RwLock<Actions>>,
    health: Arc<Health>,
}

/// A command decided within a batch, waiting for the batch's append.
struct Planned {
    reply: oneshot::Sender<Result<CheckRecorded, LedgerError>>,
    /// The action whose record answers the command.
    action_id: Uuid,
    /// False for an idempotent retry: nothing to append, answer with the existing record.
    appended: bool,
}

impl Writer {
    fn run(self, mut queue: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = queue.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
    }

    /// Decides one check within a batch: either an idempotent retry of an existing action
    /// (nothing to append) or two new events, folded into `scratch` at the sequence numbers
    /// they will get. Returns the action that answers the caller and whether it is new.
    fn plan_check(
        &self,
        check: NewCheck,
        scratch: &mut Actions,
        next_sequence: &mut u64,
        to_append: &mut Vec<NewEvent>,
    ) -> Result<(Uuid, bool), LedgerError> {
        let requester = &check.requested.requester.id;
        let key = &check.requested.request.idempotency_key;
        {
            let shared = self.state.read();
            if !key.is_empty() {
                let existing = scratch
                    .by_idempotency_key(requester, key)
                    .or_else(|| shared.by_idempotency_key(requester, key));
                if let Some(existing) = existing {
                    return if existing.action_digest == check.requested.action_digest {
                        Ok((existing.id, false))
                    } else {
                        Err(LedgerError::IdempotencyConflict {
                            existing: existing.id,
                        })
                    };
                }
            }
            if scratch.get(&check.action_id).is_some() || shared.get(&check.action_id).is_some() {
                return Err(LedgerError::WriteFailed(format!(
                    "action id {} is already taken",
                    check.action_id
                )));
            }
        }

        let events = [
            (
                requester.clone(),
                ActionEvent::Requested(Box::new(check.requested)),
            ),
            (
                SERVER_ACTOR.to_string(),
                ActionEvent::Evaluated(check.evaluated),
            ),
        ];
        let mut encoded = Vec::with_capacity(events.len());
        for (actor, event) in &events {
            let payload = event
                .to_payload()
                .map_err(|e| LedgerError::WriteFailed(format!("event does not encode: {e}")))?;
            encoded.push(NewEvent {
                kind: event.kind().to_string(),
                time: check.time,
                actor: actor.clone(),
                action_id: Some(check.action_id),
                payload,
            });
        }
        for (_, event) in &events {
            let at = EventContext {
                sequence: *next_sequence,
                time: check.time,
                action_id: check.action_id,
            };
            *next_sequence += 1;
            // Cannot fail: the id was checked to be new above.
            if let Err(e) = scratch.apply(at, event) {
                tracing::error!(error = %e, "inconsistent fold of a new action");
            }
        }
        to_append.extend(encoded);
        Ok((check.action_id, true))
    }

    /// Decides, appends and publishes one batch.
    fn commit(&self, batch: &mut Vec<Command>) {
        if self.health.refuse_writes().is_some() {
            for Command::RecordCheck { reply, .. } in batch.drain(..) {
                let refusal = self.health.refuse_writes().unwrap_or(LedgerError::Stopped);
                let _ = reply.send(Err(refusal));
            }
            return;
        }

        // The batch is folded into `scratch` as it is decided, with the sequence numbers
        // the append will assign (this thread is the only writer, so they are exact).
        let mut scratch = Actions::default();
        let mut next_sequence = self.log.last_sequence() + 1;
        let mut to_append: Vec<NewEvent> = Vec::new();
        let mut planned: Vec<Planned> = Vec::with_capacity(batch.len());

        for Command::RecordCheck { check, reply } in batch.drain(..) {
            match self.plan_check(*check, &mut scratch, &mut next_sequence, &mut to_append) {
                Ok((action_id, appended)) => planned.push(Planned {
                    reply,
                    action_id,
                    appended,
                }),
                Err(refused) => {
                    let _ = reply.send(Err(refused));
                }
            }
        }

        let appended = if to_append.is_empty() {
            Ok(Vec::new())
        } else {
            self.log.append(to_append)
        };
        match appended {
            Ok(stored) => {
                debug_assert!(
                    stored
                        .first()
                        .is_none_or(|e| e.sequence + stored.len() as u64 == next_sequence)
                );
                let mut state = self.state.write();
                let answers: Vec<(Planned, Option<ActionRecord>)> = planned
                    .into_iter()
                    .map(|p| {
                        let record = scratch
                            .get(&p.action_id)
                            .or_else(|| state.get(&p.action_id))
                            .cloned();
                        (p, record)
                    })
                    .collect();
                state.merge(scratch);
                drop(state);
                for (p, record) in answers {
                    let answer = match record {
                        Some(record) if p.appended => Ok(CheckRecorded::New(record)),
                        Some(record) => Ok(CheckRecorded::Existing(record)),
                        None => Err(LedgerError::WriteFailed(
                            "the recorded action vanished from the state".into(),
                        )),
                    };
                    let _ = p.reply.send(answer);
                }
            }
            Err(error) => {
                let message = error.to_string();
                // Only an event that could not be encoded leaves the log untouched; any
                // other failure may have written part of a batch, or left it not durable.
                if !matches!(error, StoreError::Encode { .. }) {
                    tracing::error!(error = %message, "event log flush failed; refusing all further writes");
                    self.health.refuse(Refusal::NotDurable(message.clone()));
                } else {
                    tracing::error!(error = %message, "event log append failed; nothing was written");
                }
                for p in planned {
                    let answer = if p.appended {
                        Err(LedgerError::WriteFailed(message.clone()))
                    } else {
                        self.state
                            .read()
                            .get(&p.action_id)
                            .cloned()
                            .map(CheckRecorded::Existing)
                            .ok_or_else(|| LedgerError::WriteFailed(message.clone()))
                    };
                    let _ = p.reply.send(answer);
                }
            }
        }
    }
}
