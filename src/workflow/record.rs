//! An action's current state, folded from its events.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::events::{ActionEvent, ActionRequested, Outcome, PolicyEvaluated, Verdict};
use crate::domain::{ActionRequest, CallerSpan, OnBehalfOfSource, Principal};
use crate::policy::Decision;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    Allowed,
    Denied,
    Pending,
    Approved,
    Rejected,
    Expired,
    Cancelled,
}

impl ActionStatus {
    /// Final statuses never change again.
    pub fn is_final(self) -> bool {
        !matches!(self, ActionStatus::Pending)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ActionStatus::Allowed => "allowed",
            ActionStatus::Denied => "denied",
            ActionStatus::Pending => "pending",
            ActionStatus::Approved => "approved",
            ActionStatus::Rejected => "rejected",
            ActionStatus::Expired => "expired",
            ActionStatus::Cancelled => "cancelled",
        }
    }
}

/// An accepted vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    pub reviewer: Principal,
    pub verdict: Verdict,
    pub reason: String,
    pub time: DateTime<Utc>,
    pub sequence: u64,
}

/// The outcome the requester reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedOutcome {
    pub outcome: Outcome,
    pub details: String,
    pub time: DateTime<Utc>,
}

/// Everything known about one action.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionRecord {
    pub id: Uuid,
    pub requester: Principal,
    pub request: ActionRequest,
    pub action_digest: String,
    /// Who vouches for `request.task.on_behalf_of`, when it names a human.
    pub on_behalf_of_source: Option<OnBehalfOfSource>,
    pub trace_id: Option<String>,
    pub caller_span: Option<CallerSpan>,
    pub status: ActionStatus,
    /// `None` only between the request event and its evaluation, never outside the ledger.
    pub decision: Option<Decision>,
    pub votes: Vec<Vote>,
    pub outcome: Option<ReportedOutcome>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub decided_at: Option<DateTime<Utc>>,
    pub valid_until: Option<DateTime<Utc>>,
    pub first_sequence: u64,
    pub last_sequence: u64,
}

impl ActionRecord {
    pub fn approvals_required(&self) -> u32 {
        self.decision.as_ref().map_or(0, |d| d.approvals_required)
    }

    pub fn reviewer_groups(&self) -> &[String] {
        self.decision
            .as_ref()
            .map_or(&[][..], |d| d.reviewer_groups.as_slice())
    }

    pub fn approvals(&self) -> usize {
        self.votes
            .iter()
            .filter(|v| v.verdict == Verdict::Approve)
            .count()
    }

    /// Approvals still needed before the quorum is reached.
    pub fn approvals_remaining(&self) -> u32 {
        let approvals = u32::try_from(self.approvals()).unwrap_or(u32::MAX);
        self.approvals_required().saturating_sub(approvals)
    }
}

/// The event a record was folded from, with the log position it came from.
#[derive(Debug, Clone, Copy)]
pub struct EventContext {
    pub sequence: u64,
    pub time: DateTime<Utc>,
    pub action_id: Uuid,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApplyError {
    #[error("event {sequence}: action {action_id} was requested twice")]
    DuplicateRequest { sequence: u64, action_id: Uuid },
    #[error("event {sequence}: refers to action {action_id}, which was never requested")]
    UnknownAction { sequence: u64, action_id: Uuid },
}

/// All actions, indexed for the lookups the API needs.
#[derive(Debug, Default)]
pub struct Actions {
    /// UUIDv7 ids sort by creation time, so this map is also the "newest first" index.
    /// Boxed: ids arrive in increasing order, so B-tree leaves split and stay about half
    /// full, and a 700-byte record inline wasted ~600 bytes an action and was copied on
    /// every split.
    by_id: BTreeMap<Uuid, Box<ActionRecord>>,
    /// (requester id, idempotency key) → action.
    by_idempotency_key: HashMap<(String, String), Uuid>,
    /// Pending actions by expiry, for the expiry timer.
    pending_by_expiry: BTreeSet<(DateTime<Utc>, Uuid)>,
    /// The sequence number of the last event folded in.
    applied_sequence: u64,
}

impl Actions {
    pub fn get(&self, id: &Uuid) -> Option<&ActionRecord> {
        self.by_id.get(id).map(|record| &**record)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The log position this state reflects.
    pub fn applied_sequence(&self) -> u64 {
        self.applied_sequence
    }

    pub fn by_idempotency_key(&self, requester_id: &str, key: &str) -> Option<&ActionRecord> {
        // Allocation-free lookup would need a borrowed key type; keys are short, so the
        // two small clones are cheaper than the complexity.
        self.by_idempotency_key
            .get(&(requester_id.to_string(), key.to_string()))
            .and_then(|id| self.get(id))
    }

    /// How many actions wait for reviewers.
    pub fn pending_count(&self) -> usize {
        self.pending_by_expiry.len()
    }

    /// The pending action that expires first.
    pub fn next_expiry(&self) -> Option<(DateTime<Utc>, Uuid)> {
        self.pending_by_expiry.first().copied()
    }

    /// Pending actions whose expiry is at or before `now`.
    pub fn due_for_expiry(&self, now: DateTime<Utc>) -> Vec<Uuid> {
        self.pending_by_expiry
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .collect()
    }

    pub fn pending(&self) -> impl Iterator<Item = &ActionRecord> {
        self.pending_by_expiry
            .iter()
            .filter_map(|(_, id)| self.get(id))
    }

    /// Newest first, strictly older than `before` when given.
    pub fn newest_first(&self, before: Option<Uuid>) -> impl Iterator<Item = &ActionRecord> {
        let upper = match before {
            Some(id) => std::ops::Bound::Excluded(id),
            None => std::ops::Bound::Unbounded,
        };
        self.by_id
            .range((std::ops::Bound::Unbounded, upper))
            .rev()
            .map(|(_, r)| &**r)
    }

    pub fn count_with_status(&self, status: ActionStatus) -> usize {
        if status == ActionStatus::Pending {
            return self.pending_by_expiry.len();
        }
        self.by_id.values().filter(|r| r.status == status).count()
    }

    /// Folds one event into the state. Events must come in log order.
    pub fn apply(&mut self, at: EventContext, event: &ActionEvent) -> Result<(), ApplyError> {
        if let ActionEvent::Requested(requested) = event {
            self.apply_requested(at, requested)?;
        } else {
            let record = self
                .by_id
                .get_mut(&at.action_id)
                .ok_or(ApplyError::UnknownAction {
                    sequence: at.sequence,
                    action_id: at.action_id,
                })?;
            let was_pending = record.status == ActionStatus::Pending && record.expires_at.is_some();
            let old_expiry = record.expires_at;
            apply_to_record(record, at, event);
            let is_pending = record.status == ActionStatus::Pending && record.expires_at.is_some();
            if was_pending && let Some(expiry) = old_expiry {
                self.pending_by_expiry.remove(&(expiry, at.action_id));
            }
            if is_pending && let Some(expiry) = record.expires_at {
                self.pending_by_expiry.insert((expiry, at.action_id));
            }
        }
        self.applied_sequence = self.applied_sequence.max(at.sequence);
        Ok(())
    }

    /// [`Actions::apply`] taking the event by value: a request and a decision are moved into
    /// the record rather than copied (start-up replay folds a million of them).
    pub fn apply_owned(&mut self, at: EventContext, event: ActionEvent) -> Result<(), ApplyError> {
        match event {
            ActionEvent::Requested(requested) => {
                self.insert_requested(at, *requested)?;
                self.applied_sequence = self.applied_sequence.max(at.sequence);
                Ok(())
            }
            ActionEvent::Evaluated(evaluated) => {
                let record = self.by_id.get_mut(&at.action_id);
                match record {
                    // A fresh request (the usual case): nothing is pending in the index yet.
                    Some(record) if record.decision.is_none() && record.expires_at.is_none() => {
                        let evaluated = *evaluated;
                        record.status = evaluated.status;
                        record.expires_at = evaluated.expires_at;
                        record.valid_until = evaluated.valid_until;
                        if evaluated.status.is_final() {
                            record.decided_at = Some(at.time);
                        }
                        record.decision = Some(evaluated.decision);
                        record.last_sequence = at.sequence;
                        if record.status == ActionStatus::Pending
                            && let Some(expiry) = record.expires_at
                        {
                            self.pending_by_expiry.insert((expiry, at.action_id));
                        }
                        self.applied_sequence = self.applied_sequence.max(at.sequence);
                        Ok(())
                    }
                    _ => self.apply(at, &ActionEvent::Evaluated(evaluated)),
                }
            }
            other => self.apply(at, &other),
        }
    }

    fn apply_requested(
        &mut self,
        at: EventContext,
        requested: &ActionRequested,
    ) -> Result<(), ApplyError> {
        if self.by_id.contains_key(&at.action_id) {
            return Err(ApplyError::DuplicateRequest {
                sequence: at.sequence,
                action_id: at.action_id,
            });
        }
        self.insert_requested(at, requested.clone())
    }

    fn insert_requested(
        &mut self,
        at: EventContext,
        requested: ActionRequested,
    ) -> Result<(), ApplyError> {
        if self.by_id.contains_key(&at.action_id) {
            return Err(ApplyError::DuplicateRequest {
                sequence: at.sequence,
                action_id: at.action_id,
            });
        }
        let key = &requested.request.idempotency_key;
        if !key.is_empty() {
            self.by_idempotency_key
                .insert((requested.requester.id.clone(), key.clone()), at.action_id);
        }
        self.by_id.insert(
            at.action_id,
            Box::new(ActionRecord {
                id: at.action_id,
                requester: requested.requester,
                request: requested.request,
                action_digest: requested.action_digest,
                on_behalf_of_source: requested.on_behalf_of_source,
                trace_id: requested.trace_id,
                caller_span: requested.caller_span,
                // Until the evaluation is applied; both are appended atomically.
                status: ActionStatus::Pending,
                decision: None,
                votes: Vec::new(),
                outcome: None,
                created_at: at.time,
                expires_at: None,
                decided_at: None,
                valid_until: None,
                first_sequence: at.sequence,
                last_sequence: at.sequence,
            }),
        );
        Ok(())
    }

    /// Moves the position past an event that is not about any action (an access denial, a
    /// policy reload), so followers of the log see it as visible too.
    pub fn pass_over(&mut self, sequence: u64) {
        self.applied_sequence = self.applied_sequence.max(sequence);
    }

    /// Replaces (or inserts) whole records; used to publish a committed batch at once.
    pub fn merge(&mut self, other: Actions) {
        for record in other.by_id.values() {
            if let Some(old) = self.by_id.get(&record.id)
                && let Some(expiry) = old.expires_at
            {
                self.pending_by_expiry.remove(&(expiry, record.id));
            }
            if record.status == ActionStatus::Pending
                && let Some(expiry) = record.expires_at
            {
                self.pending_by_expiry.insert((expiry, record.id));
            }
        }
        self.by_idempotency_key.extend(other.by_idempotency_key);
        self.by_id.extend(other.by_id);
        self.applied_sequence = self.applied_sequence.max(other.applied_sequence);
    }

    /// Copies one record into a scratch state, so a batch can be folded on the side.
    pub fn copy_record_from(&mut self, source: &Actions, id: &Uuid) {
        if let Some(record) = source.by_id.get(id) {
            if record.status == ActionStatus::Pending
                && let Some(expiry) = record.expires_at
            {
                self.pending_by_expiry.insert((expiry, *id));
            }
            self.by_id.insert(*id, record.clone());
        }
    }
}

fn apply_to_record(record: &mut ActionRecord, at: EventContext, event: &ActionEvent) {
    let finish = |record: &mut ActionRecord, status: ActionStatus| {
        record.status = status;
        record.decided_at = Some(at.time);
    };
    match event {
        ActionEvent::Requested(_) => {}
        ActionEvent::Evaluated(evaluated) => apply_evaluated(record, at, evaluated),
        ActionEvent::Voted(vote) => record.votes.push(Vote {
            reviewer: vote.reviewer.clone(),
            verdict: vote.verdict,
            reason: vote.reason.clone(),
            time: at.time,
            sequence: at.sequence,
        }),
        ActionEvent::Approved(approved) => {
            finish(record, ActionStatus::Approved);
            record.valid_until = Some(approved.valid_until);
        }
        ActionEvent::Rejected(_) => finish(record, ActionStatus::Rejected),
        ActionEvent::Expired(_) => finish(record, ActionStatus::Expired),
        ActionEvent::Cancelled(_) => finish(record, ActionStatus::Cancelled),
        ActionEvent::OutcomeReported(reported) => {
            record.outcome = Some(ReportedOutcome {
                outcome: reported.outcome,
                details: reported.details.clone(),
                time: at.time,
            });
        }
        // Audit-only: recorded in the log, no change to the action.
        ActionEvent::ReviewRefused(_) | ActionEvent::OutcomeRefused(_) => return,
    }
    record.last_sequence = at.sequence;
}

fn apply_evaluated(record: &mut ActionRecord, at: EventContext, evaluated: &PolicyEvaluated) {
    record.status = evaluated.status;
    record.decision = Some(evaluated.decision.clone());
    record.expires_at = evaluated.expires_at;
    record.valid_until = evaluated.valid_until;
    if evaluated.status.is_final() {
        record.decided_at = Some(at.time);
    }
}
