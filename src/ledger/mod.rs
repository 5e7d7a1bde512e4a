//! The ledger: the one writer of the event log and of the action state.
//!
//! Every state change goes through a single thread ([`writer`]) that owns the write side of
//! both the [`EventLog`] and the in-memory [`Actions`]. That thread takes commands from a
//! bounded queue, decides each one against the state as it will be after the commands before
//! it (so two retries with one idempotency key, or two votes, in the same batch still resolve
//! correctly), appends the whole batch with one flush (group commit), and only then makes the
//! new state visible, wakes waiters, feeds reviewer streams and answers the callers. So:
//!
//! - a caller hears back only once its events are durable;
//! - readers never see an event the log does not hold;
//! - the in-memory state is a pure fold of the log, rebuilt the same way at start-up.
//!
//! A dedicated OS thread (not a tokio task) does the blocking `flush`, which also keeps
//! sled's `flush_async` out of the picture (sled issue 1308).
//!
//! Readers that hand the log on to something outside (the span exporter, notification
//! channels) are [`follower`]s: they follow the visible head from a durable cursor of
//! their own, and the ledger knows nothing of what they feed.

mod checkpoint;
mod expiry;
pub mod follower;
pub mod loss;
mod waiters;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use uuid::Uuid;

use crate::domain::RiskLevel;
use crate::store::{EventLog, NewEvent, RawEvent, StoreError, StoredEvent, VerifyReport};
use crate::workflow::record::{EventContext, ListFilter, Listed, Lookup};
use crate::workflow::{
    ActionCommand, ActionEvent, ActionRecord, ActionRequested, ActionStatus, Actions,
    DecisionTimes, EventSummary, PolicyEvaluated, Refusal,
};
use checkpoint::Checkpointer;
pub use checkpoint::{CHECKPOINTED, DEFAULT_CHECKPOINT_EVERY};
use waiters::Waiters;

/// How many commands one group commit takes at most. Bounds the latency a batch adds to
/// its first command and the memory of one append.
const MAX_BATCH: usize = 512;

/// Commands waiting for the writer. When full, callers wait (backpressure) instead of the
/// queue growing without bound.
const QUEUE_CAPACITY: usize = 8192;

/// Committed batches buffered for subscribers (reviewer streams). A subscriber that falls
/// further behind than this is told to resync instead of holding memory for it. The feed
/// carries only actions that went to review, so even a burst of hundreds of pending actions
/// fits; the ring keeps at most this many small batches (a few MB).
const FEED_CAPACITY: usize = 4096;

pub use crate::workflow::SERVER_ACTOR;

/// Settled records kept in full in memory unless configured otherwise: enough for the
/// span exporter, notification channels and reviewers to read recent actions without
/// touching the disk, about 26 MB.
pub const DEFAULT_SETTLED_IN_MEMORY: usize = 10_000;

/// How the ledger decides, and how much it keeps in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerOptions {
    pub times: DecisionTimes,
    /// Settled records kept in full; older ones are read back from the log when asked
    /// for. Pending records always stay in memory.
    pub settled_in_memory: usize,
    /// Save a checkpoint of the state every this many events (and at a clean stop), and
    /// start from the newest one; 0: never, start-up replays the whole log.
    pub checkpoint_every: u64,
    /// Verify the whole chain before serving. Otherwise start-up from a checkpoint checks
    /// the checkpoint and the events after it, serves, and verifies the whole chain on a
    /// thread of its own, refusing writes if it fails.
    pub verify_before_serving: bool,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            times: DecisionTimes::default(),
            settled_in_memory: DEFAULT_SETTLED_IN_MEMORY,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            verify_before_serving: false,
        }
    }
}

/// What the ledger reports as it commits, for metrics. Called on the writer thread after
/// a batch is durable and visible: implementations must be quick and must not block.
pub trait LedgerObserver: Send + Sync + 'static {
    /// An action got a status: at evaluation (allowed, denied, pending) or a final one
    /// after review (approved, rejected, expired, cancelled, with how long it waited).
    fn decided(&self, status: ActionStatus, risk: RiskLevel, waited: Option<Duration>);
    /// One group commit was flushed.
    fn flushed(&self, took: Duration, events: usize);
    /// An audit-only refusal (`review.refused`, `outcome.refused`) was decided: recorded
    /// at once (`recorded`), or only counted into its window's summary.
    fn refused(&self, _kind: &'static str, _recorded: bool) {}
}

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
    #[error(
        "this request cannot be recorded exactly as given ({0}); nothing was recorded and the action is not allowed"
    )]
    Unrecordable(String),
    #[error("idempotency key already used by this caller for a different action ({existing})")]
    IdempotencyConflict { existing: Uuid },
    #[error("no action with id {0}")]
    NotFound(Uuid),
    #[error("the event log cannot be read ({0}); try again, and tell an operator if it persists")]
    ReadFailed(String),
    #[error(
        "countersign started from a checkpoint and is still verifying the events before it, \
         which this needs; try again in a few seconds"
    )]
    Verifying,
    #[error("{0}")]
    Refused(Refusal),
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

/// One committed event, as subscribers see it.
#[derive(Debug)]
pub struct CommittedEvent {
    pub sequence: u64,
    pub action_id: Uuid,
    pub event: ActionEvent,
}

/// One group commit, published to subscribers after it is durable and visible. Carries
/// only the events of actions that went to review (see the writer).
#[derive(Debug)]
pub struct CommittedBatch {
    pub events: Vec<CommittedEvent>,
    /// The records the batch touched, as they are after it.
    pub records: std::collections::HashMap<Uuid, Arc<ActionRecord>>,
}

impl CommittedBatch {
    pub fn record(&self, id: &Uuid) -> Option<&Arc<ActionRecord>> {
        self.records.get(id)
    }
}

enum Command {
    Check {
        check: Box<NewCheck>,
        reply: oneshot::Sender<Result<CheckRecorded, LedgerError>>,
    },
    Act {
        action_id: Uuid,
        command: ActionCommand,
        time: DateTime<Utc>,
        reply: oneshot::Sender<Result<ActionRecord, LedgerError>>,
    },
    /// Events about no action (access denials, policy reloads): appended as given.
    Record {
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Result<u64, LedgerError>>,
    },
    /// Record the summaries of repeated refusals whose window has closed.
    Sweep,
}

/// What start-up found in the log.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    /// Events in the log.
    pub events: u64,
    /// Of those, the ones read to rebuild the state: those after the checkpoint it started
    /// from, or all of them.
    pub events_replayed: u64,
    /// The last event the checkpoint start-up used includes, if it used one.
    pub from_checkpoint: Option<u64>,
    /// Why a checkpoint there was could not be used (start-up then replayed the whole log).
    pub checkpoint_problem: Option<String>,
    pub actions: usize,
    /// Of those, the ones whose full record is in memory (pending and recently settled).
    pub records_in_memory: usize,
    /// What was verified before serving: the whole chain, or the events after the
    /// checkpoint (see [`Ledger::chain_check`] for the rest).
    pub verification: VerifyReport,
    /// Set when the log cannot be trusted; the ledger then refuses writes.
    pub integrity_problem: Option<String>,
    /// Where start-up time went, for the operator: opening the store, then verifying the
    /// chain and rebuilding the state from it (one pass over the log).
    pub open_took: std::time::Duration,
    pub replay_took: std::time::Duration,
}

pub struct Ledger {
    log: Arc<EventLog>,
    state: Arc<RwLock<Actions>>,
    commands: mpsc::Sender<Command>,
    health: Arc<Health>,
    feed: broadcast::Sender<Arc<CommittedBatch>>,
    waiters: Arc<Waiters>,
    /// Wakes the expiry timer when a new pending action may expire sooner, and on shutdown.
    expiry_wakeup: Arc<Notify>,
    /// The sequence of the last event made visible; followers of the log wait on it.
    applied: watch::Receiver<u64>,
    /// Joined on drop so the last batch is flushed before the process exits.
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Set once, by whoever keeps metrics; read by the writer.
    observer: Arc<std::sync::OnceLock<Arc<dyn LedgerObserver>>>,
    /// Saves checkpoints; asked for a last one on drop.
    checkpointer: Mutex<Option<Checkpointer>>,
    /// The whole chain's verification, when it runs after start-up.
    chain: Arc<ChainGate>,
    verifier: Mutex<Option<JoinHandle<()>>>,
    stop_verifying: Arc<AtomicBool>,
}

/// Where the verification of the whole chain stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ChainCheck {
    /// Started from a checkpoint: the events before it are being verified.
    Running,
    Passed {
        events: u64,
    },
    Failed {
        problem: String,
    },
}

/// The verification of the whole chain, and what waits for it. Started from a checkpoint,
/// the ledger decides on the checkpoint (which the chain vouches for) and the events after
/// it (verified before serving); anything else read from before the checkpoint, a settled
/// action's record, waits until the whole chain has verified.
struct ChainGate {
    check: Mutex<ChainCheck>,
    done: parking_lot::Condvar,
}

/// How long a read of a record from before the checkpoint waits for the verification
/// before answering UNAVAILABLE (a million events verify in about 1.5 s here).
const CHAIN_WAIT: Duration = Duration::from_secs(30);

impl ChainGate {
    fn new(check: ChainCheck) -> ChainGate {
        ChainGate {
            check: Mutex::new(check),
            done: parking_lot::Condvar::new(),
        }
    }

    fn get(&self) -> ChainCheck {
        self.check.lock().clone()
    }

    fn set(&self, check: ChainCheck) {
        *self.check.lock() = check;
        self.done.notify_all();
    }

    /// `Ok` once the verification of the whole chain has finished, waiting up to `limit`
    /// for it. Also when it failed: writes are refused then, but the evidence stays
    /// readable for the people investigating, each event's own hash checked as it is read.
    fn finished(&self, limit: Duration) -> Result<(), LedgerError> {
        let deadline = std::time::Instant::now() + limit;
        let mut check = self.check.lock();
        while *check == ChainCheck::Running {
            if self.done.wait_until(&mut check, deadline).timed_out() {
                return Err(LedgerError::Verifying);
            }
        }
        Ok(())
    }
}

/// Why the ledger refuses writes, if it does. Shared with the writer thread.
struct Health {
    refusing: AtomicBool,
    refusal: Mutex<Option<WriteRefusal>>,
    /// Tells the server (health service) the moment writes start being refused.
    refusing_watch: watch::Sender<bool>,
}

#[derive(Clone)]
enum WriteRefusal {
    /// The log failed verification at start-up.
    Integrity(String),
    /// A batch may have been written but could not be made durable.
    NotDurable(String),
}

impl Health {
    fn new() -> Health {
        Health {
            refusing: AtomicBool::new(false),
            refusal: Mutex::new(None),
            refusing_watch: watch::Sender::new(false),
        }
    }

    fn refuse_writes(&self) -> Option<LedgerError> {
        if !self.refusing.load(Ordering::Acquire) {
            return None;
        }
        Some(match self.refusal.lock().clone() {
            Some(WriteRefusal::Integrity(problem)) => LedgerError::IntegrityFailure(problem),
            Some(WriteRefusal::NotDurable(problem)) => LedgerError::Poisoned(problem),
            None => LedgerError::Poisoned("unknown".into()),
        })
    }

    /// Refuses writes from now on if `error` shows the log was changed behind the ledger.
    fn noticed(&self, error: &LedgerError) {
        if let LedgerError::IntegrityFailure(problem) = error {
            tracing::error!(%problem, "the event log no longer verifies; refusing all further writes");
            self.refuse(WriteRefusal::Integrity(problem.clone()));
        }
    }

    fn refuse(&self, why: WriteRefusal) {
        *self.refusal.lock() = Some(why);
        self.refusing.store(true, Ordering::Release);
        self.refusing_watch.send_replace(true);
    }
}

impl Ledger {
    /// Opens the log in `data_dir`, verifies its chain and rebuilds the action state: from
    /// the newest checkpoint and the events after it when there is a usable one, else from
    /// the whole log.
    ///
    /// A log that fails verification still opens, so auditors can read and verify it, but
    /// the ledger then refuses every write: state folded from tampered events cannot be
    /// trusted to decide anything. Started from a checkpoint (and unless
    /// `verify_before_serving`), the events before it are verified once the ledger is open,
    /// with the same consequence.
    pub fn open(
        data_dir: &Path,
        options: LedgerOptions,
    ) -> Result<(Ledger, ReplayReport), LedgerError> {
        let LedgerOptions {
            times,
            settled_in_memory,
            checkpoint_every,
            verify_before_serving,
        } = options;
        let started = std::time::Instant::now();
        let log = Arc::new(EventLog::open(data_dir)?);
        let open_took = started.elapsed();

        // Only a start from a checkpoint needs this: a whole-log replay verifies as it reads.
        let from_checkpoint_record = log.current_checkpoint().ok().flatten();
        let from_a_checkpoint = checkpoint_every > 0 && from_checkpoint_record.is_some();
        let upfront = (verify_before_serving && from_a_checkpoint)
            .then(|| log.verify())
            .transpose()?;
        let mut checkpoint_problem = None;
        // The log contradicts its checkpoint: events were lost or rewritten (see checkpoint.rs).
        let mut contradiction = None;
        let restored = match &upfront {
            Some(report) if !report.ok => None,
            _ if checkpoint_every == 0 => None,
            _ => checkpoint::load(&log, settled_in_memory).unwrap_or_else(|e| {
                if let checkpoint::CheckpointError::Contradicted { .. } = e {
                    contradiction = Some(e.to_string());
                }
                checkpoint_problem = Some(e.to_string());
                None
            }),
        };
        let from_checkpoint = restored.as_ref().map(|r| (r.covers, r.event));
        let mut replayed = restored.map(|r| fast_replay(&log, Some(r), settled_in_memory));
        if let Some(attempt) = &replayed
            && (attempt.checked.is_none() || attempt.fold_problem.is_some())
        {
            // The checkpoint, the events after it, or those of a pending action before it:
            // replaying the whole log says which.
            checkpoint_problem = Some(format!(
                "starting from it failed ({})",
                attempt
                    .fold_problem
                    .as_deref()
                    .unwrap_or("the events after it do not verify from it")
            ));
            replayed = None;
        }
        let from_checkpoint = from_checkpoint.filter(|_| replayed.is_some());
        if let Some(problem) = &checkpoint_problem {
            tracing::warn!(%problem, "the newest checkpoint cannot be used; replaying the whole event log");
        }
        let FastReplay {
            mut actions,
            checked,
            fold_problem,
        } = replayed.unwrap_or_else(|| fast_replay(&log, None, settled_in_memory));

        let (verification, integrity_problem) = match checked {
            Some(verification) => (verification, fold_problem),
            None => {
                // The slow path: verify and walk event by event, which locates the problem.
                actions = Actions::with_hot_limit(settled_in_memory);
                let verification = match upfront.clone() {
                    Some(verification) => verification,
                    None => log.verify()?,
                };
                let mut integrity_problem =
                    verification.problem.clone().filter(|_| !verification.ok);
                for stored in log.iter_from(1) {
                    let folded = stored
                        .map_err(|e| e.to_string())
                        .and_then(|stored| fold(&mut actions, &stored).map_err(|e| e.to_string()));
                    if let Err(problem) = folded {
                        integrity_problem.get_or_insert(problem);
                    }
                    actions.cool();
                }
                (verification, integrity_problem)
            }
        };
        // The log itself may verify, a valid but shorter or rewritten chain: the checkpoint's
        // contradiction is the evidence, and the auditor's report says so too.
        let (mut verification, mut integrity_problem) = (verification, integrity_problem);
        if let Some(problem) = contradiction.filter(|_| integrity_problem.is_none()) {
            let first_bad = match from_checkpoint_record {
                Some(record) if record.event > log.last_sequence() => log.last_sequence() + 1,
                Some(record) => record.covers,
                None => log.last_sequence() + 1,
            };
            log.record_contradiction(first_bad, &problem);
            verification = log.verify()?;
            integrity_problem = Some(problem);
        }

        let health = Arc::new(Health::new());
        if let Some(problem) = &integrity_problem {
            health.refuse(WriteRefusal::Integrity(problem.clone()));
        }
        let chain_check = match (&integrity_problem, from_checkpoint, &upfront) {
            (Some(problem), _, _) => ChainCheck::Failed {
                problem: problem.clone(),
            },
            (None, Some(_), None) => ChainCheck::Running,
            (None, _, _) => ChainCheck::Passed {
                events: verification.head_sequence,
            },
        };
        let report = ReplayReport {
            events: log.last_sequence(),
            events_replayed: verification.events_checked,
            from_checkpoint: from_checkpoint.map(|(covers, _)| covers),
            checkpoint_problem,
            actions: actions.len(),
            records_in_memory: actions.hot_count(),
            verification,
            integrity_problem,
            open_took,
            replay_took: started.elapsed() - open_took,
        };

        let chain = Arc::new(ChainGate::new(chain_check));
        let state = Arc::new(RwLock::new(actions));
        let (commands, queue) = mpsc::channel(QUEUE_CAPACITY);
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let waiters = Arc::new(Waiters::default());
        let expiry_wakeup = Arc::new(Notify::new());
        let (applied_tx, applied) = watch::channel(state.read().applied_sequence());
        let observer = Arc::new(std::sync::OnceLock::new());
        let checkpointer = (checkpoint_every > 0)
            .then(|| {
                let shared = checkpoint::Shared {
                    log: log.clone(),
                    state: state.clone(),
                    health: health.clone(),
                    chain: chain.clone(),
                    commands: commands.downgrade(),
                };
                Checkpointer::start(shared, checkpoint_every, from_checkpoint.unwrap_or((0, 0)))
            })
            .transpose()
            .map_err(|e| LedgerError::WriteFailed(format!("cannot start the checkpointer: {e}")))?;
        let writer = writer::Writer {
            observer: observer.clone(),
            applied: applied_tx,
            log: log.clone(),
            state: state.clone(),
            health: health.clone(),
            feed: feed.clone(),
            waiters: waiters.clone(),
            expiry_wakeup: expiry_wakeup.clone(),
            times,
            checkpoints: checkpointer.as_ref().map(Checkpointer::trigger),
            chain: chain.clone(),
            refusals: crate::workflow::RefusalAggregator::default(),
            unrecorded: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("countersign-ledger".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| LedgerError::WriteFailed(format!("cannot start the writer: {e}")))?;

        let stop_verifying = Arc::new(AtomicBool::new(false));
        let verifier = (chain.get() == ChainCheck::Running)
            .then(|| {
                let (log, health) = (log.clone(), health.clone());
                let (chain, stop) = (chain.clone(), stop_verifying.clone());
                std::thread::Builder::new()
                    .name("event-log-verify".into())
                    .spawn(move || verify_after_start(&log, &health, &chain, &stop))
            })
            .transpose()
            .map_err(|e| LedgerError::WriteFailed(format!("cannot start the verifier: {e}")))?;

        Ok((
            Ledger {
                log,
                state,
                commands,
                health,
                feed,
                waiters,
                expiry_wakeup,
                applied,
                writer: Mutex::new(Some(handle)),
                observer,
                checkpointer: Mutex::new(checkpointer),
                chain,
                verifier: Mutex::new(verifier),
                stop_verifying,
            },
            report,
        ))
    }

    /// Where the verification of the whole chain stands: it runs after start-up when the
    /// state came from a checkpoint.
    pub fn chain_check(&self) -> ChainCheck {
        self.chain.get()
    }

    /// Reports commits to `observer` from now on. Only the first observer set counts.
    pub fn set_observer(&self, observer: Arc<dyn LedgerObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Starts the timer that expires pending actions at their `expires_at`, including those
    /// whose time passed while the server was down, and the one that has the summaries of
    /// repeated refusals recorded once their window closed. Call from within a tokio
    /// runtime. Both end when the ledger is dropped.
    pub fn start_expiry_timer(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(expiry::sweep_refusals(self.commands.downgrade()));
        tokio::spawn(expiry::run(
            self.state.clone(),
            self.commands.downgrade(),
            self.expiry_wakeup.clone(),
        ))
    }

    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LedgerError>>) -> Command,
    ) -> Result<T, LedgerError> {
        if let Some(refusal) = self.health.refuse_writes() {
            return Err(refusal);
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| LedgerError::Stopped)?;
        answer.await.map_err(|_| LedgerError::Stopped)?
    }

    /// Records a check durably, or returns the action an idempotent retry refers to.
    pub async fn record_check(&self, check: NewCheck) -> Result<CheckRecorded, LedgerError> {
        self.submit(|reply| Command::Check {
            check: Box::new(check),
            reply,
        })
        .await
    }

    /// Applies a command to an existing action; answers with the record after it.
    pub async fn act(
        &self,
        action_id: Uuid,
        command: ActionCommand,
        time: DateTime<Utc>,
    ) -> Result<ActionRecord, LedgerError> {
        self.submit(|reply| Command::Act {
            action_id,
            command,
            time,
            reply,
        })
        .await
    }

    /// Appends events that concern no action, such as access denials and policy reloads,
    /// durably and in order; answers with the sequence of the last one. They are
    /// `action_id`-less: an event naming an action must go through [`Ledger::act`].
    pub async fn record(&self, events: Vec<NewEvent>) -> Result<u64, LedgerError> {
        if events.iter().any(|e| e.action_id.is_some()) {
            return Err(LedgerError::WriteFailed(
                "events about an action are recorded through the workflow".into(),
            ));
        }
        self.submit(|reply| Command::Record { events, reply }).await
    }

    /// Waits until the action is final or `wait` elapses, then returns its record. No
    /// thread or polling per waiter: a waiter is one watch receiver, woken by the writer.
    pub async fn await_final(&self, id: Uuid, wait: Duration) -> Result<ActionRecord, LedgerError> {
        enum Found {
            Pending(watch::Receiver<ActionStatus>),
            Settled(Box<ActionRecord>),
            /// Cold records are settled; read back once the state's lock is released.
            Cold(Vec<u64>),
        }
        let found = {
            // Subscribing under the read lock: the writer publishes a new status only after
            // taking the write lock, so no change can slip between the read and the wait.
            let state = self.state.read();
            match state.lookup(&id).ok_or(LedgerError::NotFound(id))? {
                Lookup::Hot(record) if !record.status.is_final() => {
                    Found::Pending(self.waiters.subscribe(id, record.status))
                }
                Lookup::Hot(record) => Found::Settled(Box::new(record.clone())),
                Lookup::Cold(sequences) => Found::Cold(sequences.to_vec()),
            }
        };
        let mut status = match found {
            Found::Pending(status) => status,
            Found::Settled(record) => return Ok(*record),
            Found::Cold(sequences) => return self.cold_reader().load(id, sequences).await,
        };
        let _ = tokio::time::timeout(wait, status.wait_for(|s| s.is_final())).await;
        self.action(&id).await?.ok_or(LedgerError::NotFound(id))
    }

    /// The action's record as it is now: from memory, or rebuilt from the log for a
    /// settled action no longer held there (a few point reads, off the async runtime).
    pub async fn action(&self, id: &Uuid) -> Result<Option<ActionRecord>, LedgerError> {
        let sequences = match self.state.read().lookup(id) {
            None => return Ok(None),
            Some(Lookup::Hot(record)) => return Ok(Some(record.clone())),
            Some(Lookup::Cold(sequences)) => sequences.to_vec(),
        };
        self.cold_reader().load(*id, sequences).await.map(Some)
    }

    /// The action a requester's idempotency key names, if any.
    pub async fn by_idempotency_key(
        &self,
        requester_id: &str,
        key: &str,
    ) -> Result<Option<ActionRecord>, LedgerError> {
        let id = self.state.read().by_idempotency_key(requester_id, key);
        match id {
            Some(id) => self.action(&id).await,
            None => Ok(None),
        }
    }

    /// One page of ListActions: up to `limit` matching actions, newest first, strictly
    /// older than `before`; and whether more match. Filtering and reading back actions no
    /// longer in memory both happen off the async runtime.
    pub async fn list_actions(
        &self,
        filter: ListFilter,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<(Vec<ActionRecord>, bool), LedgerError> {
        let state = self.state.clone();
        let reader = self.cold_reader();
        off_runtime(move || {
            let (listed, more) = state.read().list(&filter, before, limit);
            let records = listed
                .into_iter()
                .map(|listed| match listed {
                    Listed::Hot(record) => Ok(*record),
                    Listed::Cold { id, sequences } => reader.load_blocking(id, &sequences),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((records, more))
        })
        .await
    }

    fn cold_reader(&self) -> ColdReader {
        ColdReader {
            log: self.log.clone(),
            chain: self.chain.clone(),
            health: self.health.clone(),
        }
    }

    /// Committed batches from now on. Together with [`Actions::applied_sequence`] read
    /// after subscribing, a subscriber can tell which batches its snapshot already holds.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<CommittedBatch>> {
        self.feed.subscribe()
    }

    /// The sequence of the last visible event, changing as batches commit.
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Read access to the current state. Hold the guard briefly: the writer waits for it.
    pub fn actions(&self) -> RwLockReadGuard<'_, Actions> {
        self.state.read()
    }

    pub fn log(&self) -> &Arc<EventLog> {
        &self.log
    }

    /// How many AwaitDecision calls are waiting right now.
    pub fn waiter_count(&self) -> usize {
        self.waiters.count()
    }

    /// Why writes are refused, if they are.
    pub fn write_refusal(&self) -> Option<LedgerError> {
        self.health.refuse_writes()
    }

    /// Becomes `true` when the ledger starts refusing writes (and stays so).
    pub fn watch_refusal(&self) -> watch::Receiver<bool> {
        self.health.refusing_watch.subscribe()
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // A last checkpoint at the head, while the writer still takes commands.
        if let Some(mut checkpointer) = self.checkpointer.lock().take() {
            checkpointer.finish();
        }
        self.stop_verifying.store(true, Ordering::Release);
        if let Some(verifier) = self.verifier.lock().take()
            && verifier.join().is_err()
        {
            tracing::error!("the event log verifier thread panicked");
        }
        // Closing the queue ends the writer's loop after the queued commands. This sender
        // must be the last one: the join below blocks the thread dropping the ledger, often
        // a runtime thread, so the expiry timer (a weak sender, stopped when woken) never
        // holds a strong one across an await.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.commands, closed));
        self.expiry_wakeup.notify_one();
        let writer = self.writer.lock().take();
        if writer.is_some_and(|handle| handle.join().is_err()) {
            tracing::error!("the ledger writer thread panicked");
        }
        if let Err(e) = self.log.flush() {
            tracing::error!(error = %e, "final flush of the event log failed");
        }
    }
}

/// Reads settled actions' records back from the log. Such a read blocks: on the disk, and
/// after a start from a checkpoint on the chain's verification (up to [`CHAIN_WAIT`]); with
/// two runtime workers, two such reads on them would stall every RPC. So the public reads
/// are `async` and run it through [`off_runtime`].
struct ColdReader {
    log: Arc<EventLog>,
    chain: Arc<ChainGate>,
    health: Arc<Health>,
}

impl ColdReader {
    async fn load(self, id: Uuid, sequences: Vec<u64>) -> Result<ActionRecord, LedgerError> {
        off_runtime(move || self.load_blocking(id, &sequences)).await
    }

    /// [`load_record`], once the whole chain has been verified (waiting for it after a start
    /// from a checkpoint); a log found damaged makes the ledger refuse writes, as at start-up.
    fn load_blocking(&self, id: Uuid, sequences: &[u64]) -> Result<ActionRecord, LedgerError> {
        self.chain.finished(CHAIN_WAIT)?;
        load_record(&self.log, id, sequences).inspect_err(|e| self.health.noticed(e))
    }
}

/// Runs blocking reads on tokio's blocking pool.
async fn off_runtime<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, LedgerError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| LedgerError::ReadFailed(format!("the read was cut short: {e}")))?
}

/// Rebuilds an action's record from its events in the log: a settled action no longer in
/// memory, or at start-up one still pending. Each event's own hash is checked; the chain as
/// a whole was verified at start-up.
fn load_record(log: &EventLog, id: Uuid, sequences: &[u64]) -> Result<ActionRecord, LedgerError> {
    rebuild_from(&|sequence| log.get(sequence), id, sequences)
}

/// Where [`rebuild_from`] reads events: the log, or a checkpoint's copies.
type Fetch<'a> = dyn Fn(u64) -> Result<Option<StoredEvent>, StoreError> + Sync + 'a;

/// Rebuilds an action's record from its events as `fetch` returns them.
fn rebuild_from(
    fetch: &Fetch<'_>,
    id: Uuid,
    sequences: &[u64],
) -> Result<ActionRecord, LedgerError> {
    let mut events = Vec::with_capacity(sequences.len());
    for &sequence in sequences {
        let stored = match fetch(sequence) {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                return Err(LedgerError::IntegrityFailure(format!(
                    "event {sequence} of action {id} is not in the log"
                )));
            }
            Err(StoreError::Read(e)) => {
                return Err(LedgerError::ReadFailed(format!(
                    "event {sequence} of action {id}: {e}"
                )));
            }
            Err(e) => return Err(LedgerError::IntegrityFailure(e.to_string())),
        };
        let event = match ActionEvent::from_stored(&stored.kind, &stored.payload) {
            Ok(Some(event)) if stored.action_id == Some(id) => event,
            Ok(_) => {
                return Err(LedgerError::IntegrityFailure(format!(
                    "event {sequence} is listed for action {id} but is not one of its events"
                )));
            }
            Err(e) => {
                return Err(LedgerError::IntegrityFailure(format!(
                    "event {sequence}: {e}"
                )));
            }
        };
        let at = EventContext {
            sequence,
            time: stored.time,
            action_id: id,
        };
        events.push((at, event));
    }
    Actions::rebuild(id, events)
        .map_err(|e| LedgerError::IntegrityFailure(format!("action {id} does not rebuild: {e}")))
}

/// The state rebuilt in one checked read of the log (from a checkpoint, or from event 1).
struct FastReplay {
    actions: Actions,
    /// `None` when the events read did not verify: the caller walks the log instead.
    checked: Option<VerifyReport>,
    /// The first event that did not fold.
    fold_problem: Option<String>,
}

/// Checks and decodes the events after `start` (or all of them) in one read on several
/// threads, straight into typed events, and folds them onto its state; then rebuilds the
/// actions still pending from their events.
///
/// Only the newest events are decoded whole: older ones are likely to belong to settled
/// actions that will not stay in memory, so only what their entries keep is read (a
/// fraction of the work, and no record built and dropped).
fn fast_replay(
    log: &EventLog,
    start: Option<checkpoint::Restored>,
    settled_in_memory: usize,
) -> FastReplay {
    let (mut actions, after, pending_events) = match start {
        Some(restored) => (
            restored.actions,
            Some((restored.covers, restored.covers_hash)),
            restored.pending_events,
        ),
        None => (
            Actions::with_hot_limit(settled_in_memory),
            None,
            HashMap::new(),
        ),
    };
    let mut fold_problem = None;
    let whole_from = log
        .last_sequence()
        .saturating_sub(settled_in_memory.saturating_mul(WHOLE_EVENTS_PER_HELD) as u64);
    let decode = |raw: RawEvent<'_>| decode_for_replay(raw, whole_from);
    let mut fold = |_, decoded: Result<Decoded, String>| {
        let folded = decoded.and_then(|decoded| fold_decoded(&mut actions, decoded));
        if let Err(problem) = folded {
            fold_problem.get_or_insert(problem);
        }
        actions.cool();
    };
    let checked = match after {
        Some((covers, hash)) => log.verify_and_replay_after(covers, hash, decode, &mut fold),
        None => log.verify_and_replay(decode, &mut fold),
    };
    // Events the checkpoint covers come from the checkpoint, never from the log: that part
    // of the log is verified only after start-up.
    let covers = after.map_or(0, |(covers, _)| covers);
    let fetch = |sequence: u64| match sequence <= covers {
        true => pending_events
            .get(&sequence)
            .map(|bytes| EventLog::decode_stored(sequence, bytes))
            .transpose(),
        false => log.get(sequence),
    };
    if checked.is_some() && fold_problem.is_none() {
        for loaded in load_records(&fetch, actions.cold_pending()) {
            match loaded {
                Ok((record, sequences)) => actions.insert_loaded(record, sequences),
                Err(problem) => {
                    fold_problem.get_or_insert(problem.to_string());
                }
            }
        }
    }
    FastReplay {
        actions,
        checked,
        fold_problem,
    }
}

/// Verifies the whole chain after a start from a checkpoint; a chain that fails makes the
/// ledger refuse writes, as if it had failed before serving.
///
/// A read that fails (an I/O error) is no finding: it is logged and the verification tried
/// again every [`VERIFY_RETRY`] until it can read the log, reads of older records waiting
/// meanwhile as while it runs.
fn verify_after_start(log: &EventLog, health: &Health, chain: &ChainGate, stop: &AtomicBool) {
    let started = std::time::Instant::now();
    let report = loop {
        match log.verify_unless(stop) {
            None => return,
            Some(Ok(report)) => break report,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the event log could not be read to verify it; trying again");
                let until = std::time::Instant::now() + VERIFY_RETRY;
                while std::time::Instant::now() < until {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    };
    let took_ms = started.elapsed().as_millis() as u64;
    match report.problem.filter(|_| !report.ok) {
        None => {
            tracing::info!(
                events = report.events_checked,
                took_ms,
                "the whole event log verified"
            );
            chain.set(ChainCheck::Passed {
                events: report.events_checked,
            });
        }
        Some(problem) => {
            tracing::error!(
                %problem,
                first_bad_sequence = ?report.first_bad_sequence,
                "EVENT LOG FAILED VERIFICATION after start-up: countersign refuses new actions until an operator investigates"
            );
            health.refuse(WriteRefusal::Integrity(problem.clone()));
            chain.set(ChainCheck::Failed { problem });
        }
    }
}

/// How long the verification after start-up waits before trying again to read the log.
const VERIFY_RETRY: Duration = Duration::from_secs(1);

/// Events decoded whole at start-up per settled record kept in memory: an action has two
/// to four events, so the newest `settled_in_memory` settled actions are all among them.
const WHOLE_EVENTS_PER_HELD: usize = 4;

/// Rebuilds cold actions on as many threads as there are cores (start-up: the actions
/// still pending, which must be in memory).
fn load_records(
    fetch: &Fetch<'_>,
    cold: Vec<(Uuid, Vec<u64>)>,
) -> Vec<Result<(ActionRecord, Vec<u64>), LedgerError>> {
    let load = |(id, sequences): (Uuid, Vec<u64>)| {
        rebuild_from(fetch, id, &sequences).map(|record| (record, sequences))
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || cold.len() < 64 {
        return cold.into_iter().map(load).collect();
    }
    let per_thread = cold.len().div_ceil(threads);
    let mut parts: Vec<Vec<(Uuid, Vec<u64>)>> = Vec::new();
    let mut cold = cold.into_iter().peekable();
    while cold.peek().is_some() {
        parts.push(cold.by_ref().take(per_thread).collect());
    }
    std::thread::scope(|scope| {
        let load = &load;
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || part.into_iter().map(load).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    vec![Err(LedgerError::ReadFailed(
                        "a thread rebuilding pending actions failed".into(),
                    ))]
                })
            })
            .collect()
    })
}

/// How much of an event replay decoded.
enum Replayed {
    Whole(ActionEvent),
    Summary(EventSummary),
}

/// An event decoded for replay: where it goes, and what it is (`None`: a kind the workflow
/// does not fold, such as an access denial).
struct Decoded {
    sequence: u64,
    time: DateTime<Utc>,
    action_id: Option<Uuid>,
    kind: String,
    event: Option<Replayed>,
}

/// Runs on the replay's decoding threads: events from `whole_from` on are decoded whole,
/// older ones only as far as an action's entry needs.
fn decode_for_replay(raw: RawEvent<'_>, whole_from: u64) -> Result<Decoded, String> {
    let event = if raw.sequence >= whole_from {
        ActionEvent::from_json(&raw.kind, raw.payload.get()).map(|e| e.map(Replayed::Whole))
    } else {
        EventSummary::from_json(&raw.kind, raw.payload.get()).map(|e| e.map(Replayed::Summary))
    }
    .map_err(|e| e.to_string())?;
    Ok(Decoded {
        sequence: raw.sequence,
        time: raw.time,
        action_id: raw.action_id,
        // Only needed to explain a missing action id.
        kind: if event.is_some() && raw.action_id.is_none() {
            raw.kind.into_owned()
        } else {
            String::new()
        },
        event,
    })
}

/// Folds one decoded event into the state; the same rules as [`fold`].
fn fold_decoded(actions: &mut Actions, decoded: Decoded) -> Result<(), String> {
    let Some(event) = decoded.event else {
        actions.pass_over(decoded.sequence);
        return Ok(());
    };
    let action_id = decoded.action_id.ok_or_else(|| {
        format!(
            "event {}: {} has no action id",
            decoded.sequence, decoded.kind
        )
    })?;
    let at = EventContext {
        sequence: decoded.sequence,
        time: decoded.time,
        action_id,
    };
    match event {
        Replayed::Whole(event) => actions.apply_owned(at, event),
        Replayed::Summary(summary) => actions.apply_summary(at, summary),
    }
    .map_err(|e| e.to_string())
}

/// Folds one stored event into the state (start-up replay).
fn fold(actions: &mut Actions, stored: &StoredEvent) -> Result<(), String> {
    let Some(event) =
        ActionEvent::from_stored(&stored.kind, &stored.payload).map_err(|e| e.to_string())?
    else {
        actions.pass_over(stored.sequence);
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
