//! An action's current state, folded from its events.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::events::{ActionEvent, ActionRequested, PolicyEvaluated};
use crate::domain::{ActionRequest, Principal};
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
}

/// Everything known about one action.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionRecord {
    pub id: Uuid,
    pub requester: Principal,
    pub request: ActionRequest,
    pub action_digest: String,
    pub trace_id: Option<String>,
    pub status: ActionStatus,
    /// `None` only between the request event and its evaluation, never outside the ledger.
    pub decision: Option<Decision>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub decided_at: Option<DateTime<Utc>>,
    pub valid_until: Option<DateTime<Utc>>,
    pub first_sequence: u64,
    pub last_sequence: u64,
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
    by_id: BTreeMap<Uuid, ActionRecord>,
    /// (requester id, idempotency key) → action.
    by_idempotency_key: HashMap<(String, String), Uuid>,
}

impl Actions {
    pub fn get(&self, id: &Uuid) -> Option<&ActionRecord> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn by_idempotency_key(&self, requester_id: &str, key: &str) -> Option<&ActionRecord> {
        // Allocation-free lookup would need a borrowed key type; keys are short, so the
        // two small clones are cheaper than the complexity.
        self.by_idempotency_key
            .get(&(requester_id.to_string(), key.to_string()))
            .and_then(|id| self.by_id.get(id))
    }

    pub fn count_with_status(&self, status: ActionStatus) -> usize {
        self.by_id.values().filter(|r| r.status == status).count()
    }

    /// Folds one event into the state. Events must come in log order.
    pub fn apply(&mut self, at: EventContext, event: &ActionEvent) -> Result<(), ApplyError> {
        match event {
            ActionEvent::Requested(requested) => self.apply_requested(at, requested),
            ActionEvent::Evaluated(evaluated) => self.apply_evaluated(at, evaluated),
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
        let key = &requested.request.idempotency_key;
        if !key.is_empty() {
            self.by_idempotency_key
                .insert((requested.requester.id.clone(), key.clone()), at.action_id);
        }
        self.by_id.insert(
            at.action_id,
            ActionRecord {
                id: at.action_id,
                requester: requested.requester.clone(),
                request: requested.request.clone(),
                action_digest: requested.action_digest.clone(),
                trace_id: requested.trace_id.clone(),
                // Until the evaluation is applied; both are appended atomically.
                status: ActionStatus::Pending,
                decision: None,
                created_at: at.time,
                expires_at: None,
                decided_at: None,
                valid_until: None,
                first_sequence: at.sequence,
                last_sequence: at.sequence,
            },
        );
        Ok(())
    }

    fn apply_evaluated(
        &mut self,
        at: EventContext,
        evaluated: &PolicyEvaluated,
    ) -> Result<(), ApplyError> {
        let record = self
            .by_id
            .get_mut(&at.action_id)
            .ok_or(ApplyError::UnknownAction {
                sequence: at.sequence,
                action_id: at.action_id,
            })?;
        record.status = evaluated.status;
        record.decision = Some(evaluated.decision.clone());
        record.expires_at = evaluated.expires_at;
        record.valid_until = evaluated.valid_until;
        if evaluated.status.is_final() {
            record.decided_at = Some(at.time);
        }
        record.last_sequence = at.sequence;
        Ok(())
    }

    /// Replaces (or inserts) whole records; used to publish a committed batch at once.
    pub fn merge(&mut self, other: Actions) {
        self.by_idempotency_key.extend(other.by_idempotency_key);
        self.by_id.extend(other.by_id);
    }

    /// Copies one record into a scratch state, so a batch can be folded on the side.
    pub fn copy_record_from(&mut self, source: &Actions, id: &Uuid) {
        if let Some(record) = source.by_id.get(id) {
            self.by_id.insert(*id, record.clone());
        }
    }
}
