//! The writer thread: decides, appends (group commit) and publishes batches of commands.
//!
//! Refusals recorded for the auditors pass through a [`RefusalAggregator`] on the way: the
//! first of a kind is appended with its command, repeats within a minute are counted and
//! appended as one summary when the window closes ([`Command::Sweep`], sent by a timer, and
//! once more when the writer stops).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use uuid::Uuid;

use super::waiters::Waiters;
use super::{
    CheckRecorded, Command, CommittedBatch, CommittedEvent, Health, LedgerError, LedgerObserver,
    MAX_BATCH, NewCheck, WriteRefusal, load_record,
};
use crate::store::{EventLog, NewEvent, StoreError};
use crate::workflow::record::{EventContext, Lookup};
use crate::workflow::refusals::Filtered;
use crate::workflow::{
    ActionCommand, ActionEvent, ActionRecord, ActionStatus, Actions, DecisionTimes, Refusal,
    RefusalAggregator, SERVER_ACTOR, Summary, decide,
};

pub(super) struct Writer {
    pub(super) log: Arc<EventLog>,
    pub(super) state: Arc<RwLock<Actions>>,
    pub(super) health: Arc<Health>,
    pub(super) feed: broadcast::Sender<Arc<CommittedBatch>>,
    pub(super) waiters: Arc<Waiters>,
    pub(super) expiry_wakeup: Arc<Notify>,
    pub(super) times: DecisionTimes,
    pub(super) applied: watch::Sender<u64>,
    pub(super) observer: Arc<std::sync::OnceLock<Arc<dyn LedgerObserver>>>,
    /// Asked for a checkpoint as batches are applied; `None`: checkpoints are off.
    pub(super) checkpoints: Option<super::checkpoint::Trigger>,
    /// Cold records are read only once the verification after start-up has finished.
    pub(super) chain: Arc<super::ChainGate>,
    /// Which audit-only refusals are appended now and which only counted.
    pub(super) refusals: RefusalAggregator,
    /// Summaries whose action could not be read back when their window closed (a cold
    /// record while the chain is still being verified): tried again at the next sweep.
    pub(super) unrecorded: Vec<Summary>,
}

/// How a decided command will be answered once its batch is (or is not) durable.
enum Reply {
    Check {
        reply: oneshot::Sender<Result<CheckRecorded, LedgerError>>,
        action_id: Uuid,
        /// False for an idempotent retry: nothing appended, answer with the existing record.
        appended: bool,
    },
    Act {
        reply: oneshot::Sender<Result<ActionRecord, LedgerError>>,
        action_id: Uuid,
        result: Result<(), Refusal>,
        appended: bool,
    },
    Record {
        reply: oneshot::Sender<Result<u64, LedgerError>>,
        /// The sequence the last of its events will have.
        last_sequence: u64,
    },
}

/// A batch being decided: the events to append and the state they will produce.
struct Batch {
    /// Records the batch touches, folded with the sequence numbers the append will assign
    /// (this thread is the only writer, so they are exact).
    scratch: Actions,
    next_sequence: u64,
    to_append: Vec<NewEvent>,
    events: Vec<CommittedEvent>,
    replies: Vec<Reply>,
    /// A new pending action may expire before the timer's next wake-up.
    new_pending: bool,
}

impl Batch {
    fn new(next_sequence: u64) -> Batch {
        Batch {
            scratch: Actions::default(),
            next_sequence,
            to_append: Vec::new(),
            events: Vec::new(),
            replies: Vec::new(),
            new_pending: false,
        }
    }

    /// Encodes and folds one command's events. All or nothing: an event that does not
    /// encode leaves the batch as it was.
    fn push_events(
        &mut self,
        action_id: Uuid,
        time: DateTime<Utc>,
        events: Vec<(String, ActionEvent)>,
    ) -> Result<(), LedgerError> {
        let mut encoded = Vec::with_capacity(events.len());
        for (actor, event) in &events {
            let payload = event
                .to_payload()
                .map_err(|e| LedgerError::WriteFailed(format!("event does not encode: {e}")))?;
            let new_event = NewEvent {
                kind: event.kind().to_string(),
                time,
                actor: actor.clone(),
                action_id: Some(action_id),
                payload,
            };
            unstorable(&new_event)?;
            encoded.push(new_event);
        }
        for (_, event) in events {
            let at = EventContext {
                sequence: self.next_sequence,
                time,
                action_id,
            };
            // Cannot fail: callers check that new ids are new and known ids are known.
            if let Err(e) = self.scratch.apply(at, &event) {
                tracing::error!(error = %e, "inconsistent fold while deciding a batch");
            }
            if let ActionEvent::Evaluated(evaluated) = &event {
                self.new_pending |= evaluated.status == ActionStatus::Pending;
            }
            self.events.push(CommittedEvent {
                sequence: self.next_sequence,
                action_id,
                event,
            });
            self.next_sequence += 1;
        }
        self.to_append.extend(encoded);
        Ok(())
    }

    /// Adds events that concern no action; returns the sequence of the last one.
    fn push_unfolded(&mut self, events: Vec<NewEvent>) -> u64 {
        for event in events {
            self.scratch.pass_over(self.next_sequence);
            self.to_append.push(event);
            self.next_sequence += 1;
        }
        self.next_sequence - 1
    }
}

impl Writer {
    pub(super) fn run(mut self, mut queue: mpsc::Receiver<Command>) {
        let mut commands = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = queue.blocking_recv() {
            commands.push(first);
            while commands.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
            self.commit(&mut commands, None);
        }
        // The queue is closed: record what is still only counted, so nothing is lost.
        let last = self.refusals.close_all();
        if !last.is_empty() || !self.unrecorded.is_empty() {
            self.commit(&mut commands, Some(last));
            if !self.unrecorded.is_empty() {
                let lost: u64 = self.unrecorded.iter().map(Summary::count).sum();
                tracing::error!(
                    refusals = lost,
                    "repeated refusals could not be recorded before stopping"
                );
            }
        }
    }

    /// Decides, appends and publishes one batch; with `closing`, the summaries of the
    /// refusal windows closed for good (shutdown).
    fn commit(&mut self, commands: &mut Vec<Command>, closing: Option<Vec<Summary>>) {
        if let Some(refusal) = self.health.refuse_writes() {
            let lost: u64 = closing.iter().flatten().map(Summary::count).sum();
            if lost > 0 {
                tracing::error!(refusals = lost, error = %refusal, "repeated refusals could not be recorded before stopping");
            }
            for command in commands.drain(..) {
                let refusal = || self.health.refuse_writes().unwrap_or(LedgerError::Stopped);
                match command {
                    Command::Check { reply, .. } => drop(reply.send(Err(refusal()))),
                    Command::Act { reply, .. } => drop(reply.send(Err(refusal()))),
                    Command::Record { reply, .. } => drop(reply.send(Err(refusal()))),
                    Command::Sweep => {}
                }
            }
            return;
        }

        let mut batch = Batch::new(self.log.last_sequence() + 1);
        let mut sweep = closing.is_some();
        let mut summaries = closing.unwrap_or_default();
        for command in commands.drain(..) {
            match command {
                Command::Check { check, reply } => match self.plan_check(*check, &mut batch) {
                    Ok((action_id, appended)) => batch.replies.push(Reply::Check {
                        reply,
                        action_id,
                        appended,
                    }),
                    Err(e) => drop(reply.send(Err(e))),
                },
                Command::Act {
                    action_id,
                    command,
                    time,
                    reply,
                } => match self.plan_act(action_id, &command, time, &mut batch) {
                    Ok((result, appended)) => batch.replies.push(Reply::Act {
                        reply,
                        action_id,
                        result,
                        appended,
                    }),
                    Err(e) => drop(reply.send(Err(e))),
                },
                Command::Record { events, reply } => {
                    if let Err(e) = events.iter().try_for_each(unstorable) {
                        drop(reply.send(Err(e)));
                        continue;
                    }
                    let last_sequence = batch.push_unfolded(events);
                    batch.replies.push(Reply::Record {
                        reply,
                        last_sequence,
                    });
                }
                Command::Sweep => sweep = true,
            }
        }
        if sweep {
            summaries.extend(self.refusals.close_due(Utc::now()));
            summaries.append(&mut self.unrecorded);
        }
        if !summaries.is_empty() {
            self.push_summaries(summaries, Utc::now(), &mut batch);
        }

        let to_append = std::mem::take(&mut batch.to_append);
        let appended = if to_append.is_empty() {
            Ok(Vec::new())
        } else {
            let count = to_append.len();
            let started = std::time::Instant::now();
            let appended = self.log.append(to_append);
            if appended.is_ok()
                && let Some(observer) = self.observer.get()
            {
                observer.flushed(started.elapsed(), count);
            }
            appended
        };
        match appended {
            Ok(stored) => {
                debug_assert!(
                    stored
                        .first()
                        .is_none_or(|e| e.sequence + stored.len() as u64 == batch.next_sequence)
                );
                self.publish(batch);
            }
            Err(error) => self.fail(batch, &error),
        }
    }

    /// Decides one check: an idempotent retry of an existing action (nothing to append) or
    /// a new action's two events. Returns the action that answers the caller and whether it
    /// is new.
    fn plan_check(&self, check: NewCheck, batch: &mut Batch) -> Result<(Uuid, bool), LedgerError> {
        let requester = &check.requested.requester.id;
        let key = &check.requested.request.idempotency_key;
        // One look at the shared state for both questions: this is CheckAction's path.
        let (existing, taken) = {
            let shared = self.state.read();
            let existing = (!key.is_empty())
                .then(|| {
                    batch
                        .scratch
                        .by_idempotency_key(requester, key)
                        .or_else(|| shared.by_idempotency_key(requester, key))
                })
                .flatten();
            let taken =
                batch.scratch.contains(&check.action_id) || shared.contains(&check.action_id);
            (existing, taken)
        };
        if let Some(existing) = existing {
            self.hold(existing, batch)?;
            let record = batch
                .scratch
                .hot(&existing)
                .ok_or(LedgerError::NotFound(existing))?;
            return if record.action_digest == check.requested.action_digest {
                Ok((existing, false))
            } else {
                Err(LedgerError::IdempotencyConflict { existing })
            };
        }
        if taken {
            return Err(LedgerError::WriteFailed(format!(
                "action id {} is already taken",
                check.action_id
            )));
        }
        let events = vec![
            (
                requester.clone(),
                ActionEvent::Requested(Box::new(check.requested)),
            ),
            (
                SERVER_ACTOR.to_string(),
                ActionEvent::Evaluated(Box::new(check.evaluated)),
            ),
        ];
        batch.push_events(check.action_id, check.time, events)?;
        Ok((check.action_id, true))
    }

    /// Decides a command on an existing action against its state after the batch so far.
    /// Refusals that repeat one already recorded in their window are only counted.
    fn plan_act(
        &mut self,
        action_id: Uuid,
        command: &ActionCommand,
        time: DateTime<Utc>,
        batch: &mut Batch,
    ) -> Result<(Result<(), Refusal>, bool), LedgerError> {
        self.hold(action_id, batch)?;
        let decided = match batch.scratch.hot(&action_id) {
            Some(record) => decide(record, command, time, &self.times),
            None => return Err(LedgerError::NotFound(action_id)),
        };
        let Filtered {
            events,
            closed_early,
            seen,
        } = self.refusals.filter(action_id, decided.events, time);
        if let Some(observer) = self.observer.get() {
            for (kind, recorded) in seen {
                observer.refused(kind, recorded);
            }
        }
        let appended = !events.is_empty();
        batch.push_events(action_id, time, events)?;
        if !closed_early.is_empty() {
            self.push_summaries(closed_early, time, batch);
        }
        Ok((decided.result, appended))
    }

    /// Adds summaries of repeated refusals to the batch, each on its action. One whose
    /// action cannot be read back now is kept for the next sweep.
    fn push_summaries(&mut self, summaries: Vec<Summary>, time: DateTime<Utc>, batch: &mut Batch) {
        for summary in summaries {
            let pushed = self.hold(summary.action_id, batch).and_then(|()| {
                let Summary {
                    action_id,
                    actor,
                    event,
                } = summary.clone();
                batch.push_events(action_id, time, vec![(actor, event)])
            });
            if let Err(e) = pushed {
                tracing::warn!(
                    action_id = %summary.action_id,
                    refusals = summary.count(),
                    error = %e,
                    "repeated refusals not recorded yet; trying again at the next sweep"
                );
                self.unrecorded.push(summary);
            }
        }
        // Bounded like the windows: beyond it, the oldest are given up, loudly.
        let excess = self
            .unrecorded
            .len()
            .saturating_sub(crate::workflow::refusals::MAX_OPEN);
        if excess > 0 {
            let lost: u64 = self.unrecorded.drain(..excess).map(|s| s.count()).sum();
            tracing::error!(refusals = lost, "repeated refusals could not be recorded");
        }
    }

    /// Puts an existing action's full record into the batch's scratch state: copied from
    /// memory, or rebuilt from the log when it is cold there (an outcome reported or a
    /// retry long after the decision).
    fn hold(&self, action_id: Uuid, batch: &mut Batch) -> Result<(), LedgerError> {
        if batch.scratch.hot(&action_id).is_some() {
            return Ok(());
        }
        let sequences = {
            let shared = self.state.read();
            match shared.lookup(&action_id) {
                None => return Err(LedgerError::NotFound(action_id)),
                Some(Lookup::Hot(_)) => {
                    batch.scratch.copy_hot_from(&shared, &action_id);
                    return Ok(());
                }
                Some(Lookup::Cold(sequences)) => sequences.to_vec(),
            }
        };
        // The writer never waits for the verification after start-up: the command is refused
        // for now (UNAVAILABLE), and a retry a moment later succeeds.
        self.chain.finished(std::time::Duration::ZERO)?;
        // Only this thread changes the state, so the entry cannot change meanwhile.
        let record = load_record(&self.log, action_id, &sequences)
            .inspect_err(|e| self.health.noticed(e))?;
        batch.scratch.insert_loaded(record, sequences);
        Ok(())
    }

    /// The batch is durable: make it visible, wake waiters, feed subscribers, answer.
    fn publish(&self, batch: Batch) {
        let Batch {
            scratch,
            events,
            replies,
            new_pending,
            ..
        } = batch;
        let mut touched: Vec<Uuid> = events.iter().map(|e| e.action_id).collect();
        touched.sort_unstable();
        touched.dedup();
        let feed_wanted = self.feed.receiver_count() > 0;

        let mut state = self.state.write();
        state.merge(scratch);
        let applied = state.applied_sequence();
        self.applied.send_replace(applied);
        let statuses: Vec<(Uuid, ActionStatus)> = touched
            .iter()
            .filter_map(|id| state.hot(id).map(|r| (*id, r.status)))
            .collect();
        // The feed carries only actions that went to review: the allow/deny fast path,
        // the bulk of traffic, never costs subscribers (or the ring buffer) anything.
        let records: HashMap<Uuid, Arc<ActionRecord>> = if feed_wanted {
            touched
                .iter()
                .filter_map(|id| state.hot(id))
                .filter(|r| r.expires_at.is_some())
                .map(|r| (r.id, Arc::new(r.clone())))
                .collect()
        } else {
            HashMap::new()
        };
        if let Some(observer) = self.observer.get() {
            report_decisions(observer.as_ref(), &events, &state);
        }
        let answers: Vec<(Reply, Option<ActionRecord>)> = replies
            .into_iter()
            .map(|reply| {
                let record = reply.action_id().and_then(|id| state.hot(&id).cloned());
                (reply, record)
            })
            .collect();
        // Only after the answers are taken: every record the batch touched was hot.
        let cooled = state.cool();
        drop(state);

        self.waiters.notify(&statuses);
        if new_pending {
            self.expiry_wakeup.notify_one();
        }
        if !records.is_empty() {
            let events: Vec<CommittedEvent> = events
                .into_iter()
                .filter(|e| records.contains_key(&e.action_id))
                .collect();
            // No receiver left between the check and now is fine: nobody to tell.
            let _ = self.feed.send(Arc::new(CommittedBatch { events, records }));
        }
        for (reply, record) in answers {
            answer(reply, record);
        }
        // Freeing hundreds of records takes a while: not under the lock, not before answers.
        drop(cooled);
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.applied(applied);
        }
    }

    /// The append failed: nothing of the batch is visible; tell every caller.
    fn fail(&self, mut batch: Batch, error: &StoreError) {
        let message = error.to_string();
        // Only an event that could not be encoded leaves the log untouched; any other
        // failure may have written part of a batch, or left it not durable.
        if !matches!(error, StoreError::Encode { .. }) {
            tracing::error!(error = %message, "event log write failed; refusing all further writes");
            self.health
                .refuse(WriteRefusal::NotDurable(message.clone()));
        } else {
            tracing::error!(error = %message, "event log append failed; nothing was written");
        }
        let state = self.state.read();
        for reply in std::mem::take(&mut batch.replies) {
            if reply.appended() {
                reply.refuse(LedgerError::WriteFailed(message.clone()));
            } else {
                // Nothing of this command was in the failed append: answer as usual.
                // A retry's record may have been loaded into the batch only.
                let record = reply
                    .action_id()
                    .and_then(|id| batch.scratch.hot(&id).or_else(|| state.hot(&id)).cloned());
                answer(reply, record);
            }
        }
    }
}

/// Refuses one caller's event that the log could not store as given, before it joins a
/// batch: in the batch it would fail every other caller's events with it.
fn unstorable(event: &NewEvent) -> Result<(), LedgerError> {
    event.check_storable().map_err(|problem| {
        tracing::warn!(kind = %event.kind, %problem, "refused an event the log cannot store as given");
        LedgerError::Unrecordable(problem)
    })
}

/// Tells the observer which statuses the batch's events gave their actions.
fn report_decisions(observer: &dyn LedgerObserver, events: &[CommittedEvent], state: &Actions) {
    for committed in events {
        // The request's interim status is not a decision.
        if matches!(committed.event, ActionEvent::Requested(_)) {
            continue;
        }
        let Some(status) = committed.event.status_after() else {
            continue;
        };
        let Some(record) = state.hot(&committed.action_id) else {
            continue;
        };
        let Some(decision) = &record.decision else {
            continue;
        };
        let waited = match &committed.event {
            ActionEvent::Evaluated(_) => None,
            _ => record
                .decided_at
                .and_then(|decided| (decided - record.created_at).to_std().ok()),
        };
        observer.decided(status, decision.risk, waited);
    }
}

impl Reply {
    fn action_id(&self) -> Option<Uuid> {
        match self {
            Reply::Check { action_id, .. } | Reply::Act { action_id, .. } => Some(*action_id),
            Reply::Record { .. } => None,
        }
    }

    fn appended(&self) -> bool {
        match self {
            Reply::Check { appended, .. } | Reply::Act { appended, .. } => *appended,
            Reply::Record { .. } => true,
        }
    }

    fn refuse(self, error: LedgerError) {
        match self {
            Reply::Check { reply, .. } => drop(reply.send(Err(error))),
            Reply::Act { reply, .. } => drop(reply.send(Err(error))),
            Reply::Record { reply, .. } => drop(reply.send(Err(error))),
        }
    }
}

fn answer(reply: Reply, record: Option<ActionRecord>) {
    match reply {
        Reply::Check {
            reply,
            action_id,
            appended,
        } => {
            let answer = match record {
                Some(record) if appended => Ok(CheckRecorded::New(record)),
                Some(record) => Ok(CheckRecorded::Existing(record)),
                None => Err(LedgerError::NotFound(action_id)),
            };
            let _ = reply.send(answer);
        }
        Reply::Act {
            reply,
            action_id,
            result,
            ..
        } => {
            let answer = match (result, record) {
                (Err(refusal), _) => Err(LedgerError::Refused(refusal)),
                (Ok(()), Some(record)) => Ok(record),
                (Ok(()), None) => Err(LedgerError::NotFound(action_id)),
            };
            let _ = reply.send(answer);
        }
        Reply::Record {
            reply,
            last_sequence,
        } => drop(reply.send(Ok(last_sequence))),
    }
}
