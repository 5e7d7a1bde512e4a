//! The typed events of an action's life, as they are stored in the log.
//!
//! The store keeps a `kind` string and a JSON payload; this module owns the mapping in both
//! directions, so the event vocabulary lives in one place.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::status::ActionStatus;
use crate::domain::{ActionRequest, CallerSpan, OnBehalfOfSource, Principal};
use crate::policy::Decision;

/// A caller asked for an action. Always followed, in the same atomic append, by its
/// [`PolicyEvaluated`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRequested {
    pub requester: Principal,
    pub request: ActionRequest,
    pub action_digest: String,
    /// Set when `request.task.on_behalf_of` names a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of_source: Option<OnBehalfOfSource>,
    /// The W3C trace id the action's spans belong to: the caller's, or one derived from
    /// the action id when it propagated none. `None` only in logs from before traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The caller's span, when it propagated a trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_span: Option<CallerSpan>,
}

/// The policy decision for an action and the status it put the action in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyEvaluated {
    pub decision: Decision,
    /// `Allowed`, `Denied` or `Pending`.
    pub status: ActionStatus,
    /// Set for `Pending`: when the action expires unanswered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Set for `Allowed`: do not start the action after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Reject,
}

/// A reviewer's vote, accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewVoted {
    pub reviewer: Principal,
    pub verdict: Verdict,
    pub reason: String,
}

/// A review that was refused (self-review, wrong group, second vote, an agent, a human
/// outside `[roles] reviewers`, …). Recorded for the auditors; it does not change the
/// action. Refusals repeat at no cost to the caller, so what is kept of one is bounded:
/// the reason cut to [`KEPT_TEXT_BYTES`] (its length and digest kept), and repeats by the
/// same reviewer on the same action counted into one later event (`repeats`, see
/// `workflow::refusals`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewRefused {
    pub reviewer: Principal,
    pub verdict: Verdict,
    /// The reviewer's reason, at most [`KEPT_TEXT_BYTES`].
    pub reason: String,
    /// Set when `reason` was cut: the whole reason's length and SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_cut: Option<CutText>,
    /// Why it was refused, as told to the reviewer.
    pub refusal: String,
    /// Set on a summary: the further refusals it counts (see [`Repeats`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeats: Option<Repeats>,
}

/// The most bytes of a caller's free text (a refused vote's reason, a refused outcome's
/// details) an audit-only event keeps. A prefix, the length and the SHA-256 are evidence
/// enough of an attempt that changed nothing.
pub const KEPT_TEXT_BYTES: usize = 256;

/// What was cut from a caller's text kept in an audit-only event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutText {
    /// The whole text's length in bytes.
    pub bytes: usize,
    /// The whole text's SHA-256, hex.
    pub sha256: String,
}

/// `text` as an audit-only event keeps it: whole if at most [`KEPT_TEXT_BYTES`], else
/// its first bytes (on a character boundary) and what was cut.
pub fn kept_text(text: &str) -> (String, Option<CutText>) {
    if text.len() <= KEPT_TEXT_BYTES {
        return (text.to_string(), None);
    }
    let mut end = KEPT_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = CutText {
        bytes: text.len(),
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())),
    };
    (text[..end].to_string(), Some(cut))
}

/// On a summary of repeated refusals: how many it stands for and when they happened.
/// The first refusal of a reviewer (or reporter) on an action in a window is recorded on
/// its own, as it happens, without `repeats`; the ones after it in the window are counted
/// and recorded as one event with `repeats` when the window closes, carrying the first
/// repeat's reason and refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repeats {
    /// Refusals this event stands for (at least 1).
    pub count: u64,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
}

/// The quorum was reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionApproved {
    /// Do not start the action after this instant.
    pub valid_until: DateTime<Utc>,
    /// The reviewers whose approvals made the quorum, in vote order.
    pub approved_by: Vec<String>,
}

/// A reviewer rejected the action; one rejection is enough.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRejected {
    pub rejected_by: String,
}

/// Nobody decided in time: fail closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionExpired {
    pub expires_at: DateTime<Utc>,
}

/// The requester withdrew the action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionCancelled {
    pub cancelled_by: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Executed,
    Failed,
    Abandoned,
}

/// What the requester reports happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeReported {
    pub outcome: Outcome,
    pub details: String,
}

/// An outcome report that was refused, notably a start reported after `valid_until`.
/// Recorded for the auditors; it does not change the action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeRefused {
    pub reporter: String,
    pub outcome: Outcome,
    /// The reporter's details, at most [`KEPT_TEXT_BYTES`].
    pub details: String,
    /// Set when `details` was cut: the whole text's length and SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details_cut: Option<CutText>,
    pub refusal: String,
    /// Set on a summary: the further refusals it counts (see [`Repeats`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeats: Option<Repeats>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ActionEvent {
    /// Boxed: a request with its parameters is several times larger than the other events.
    Requested(Box<ActionRequested>),
    Evaluated(Box<PolicyEvaluated>),
    Voted(ReviewVoted),
    ReviewRefused(ReviewRefused),
    Approved(ActionApproved),
    Rejected(ActionRejected),
    Expired(ActionExpired),
    Cancelled(ActionCancelled),
    OutcomeReported(OutcomeReported),
    OutcomeRefused(OutcomeRefused),
}

#[derive(Debug, thiserror::Error)]
#[error("event of kind `{kind}` has a payload that does not decode: {source}")]
pub struct EventDecodeError {
    pub kind: String,
    #[source]
    pub source: serde_json::Error,
}

impl ActionEvent {
    pub const REQUESTED: &'static str = "action.requested";
    pub const EVALUATED: &'static str = "policy.evaluated";
    pub const VOTED: &'static str = "review.voted";
    pub const REVIEW_REFUSED: &'static str = "review.refused";
    pub const APPROVED: &'static str = "action.approved";
    pub const REJECTED: &'static str = "action.rejected";
    pub const EXPIRED: &'static str = "action.expired";
    pub const CANCELLED: &'static str = "action.cancelled";
    pub const OUTCOME_REPORTED: &'static str = "outcome.reported";
    pub const OUTCOME_REFUSED: &'static str = "outcome.refused";

    pub fn kind(&self) -> &'static str {
        match self {
            ActionEvent::Requested(_) => Self::REQUESTED,
            ActionEvent::Evaluated(_) => Self::EVALUATED,
            ActionEvent::Voted(_) => Self::VOTED,
            ActionEvent::ReviewRefused(_) => Self::REVIEW_REFUSED,
            ActionEvent::Approved(_) => Self::APPROVED,
            ActionEvent::Rejected(_) => Self::REJECTED,
            ActionEvent::Expired(_) => Self::EXPIRED,
            ActionEvent::Cancelled(_) => Self::CANCELLED,
            ActionEvent::OutcomeReported(_) => Self::OUTCOME_REPORTED,
            ActionEvent::OutcomeRefused(_) => Self::OUTCOME_REFUSED,
        }
    }

    /// Recorded for auditors only: the action's record does not change.
    pub fn is_audit_only(&self) -> bool {
        matches!(
            self,
            ActionEvent::ReviewRefused(_) | ActionEvent::OutcomeRefused(_)
        )
    }

    /// The status the event gives its action, if it sets one.
    pub fn status_after(&self) -> Option<ActionStatus> {
        match self {
            ActionEvent::Requested(_) => Some(ActionStatus::Pending),
            ActionEvent::Evaluated(evaluated) => Some(evaluated.status),
            ActionEvent::Approved(_) => Some(ActionStatus::Approved),
            ActionEvent::Rejected(_) => Some(ActionStatus::Rejected),
            ActionEvent::Expired(_) => Some(ActionStatus::Expired),
            ActionEvent::Cancelled(_) => Some(ActionStatus::Cancelled),
            ActionEvent::Voted(_)
            | ActionEvent::ReviewRefused(_)
            | ActionEvent::OutcomeReported(_)
            | ActionEvent::OutcomeRefused(_) => None,
        }
    }

    pub fn to_payload(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            ActionEvent::Requested(e) => serde_json::to_value(e),
            ActionEvent::Evaluated(e) => serde_json::to_value(e),
            ActionEvent::Voted(e) => serde_json::to_value(e),
            ActionEvent::ReviewRefused(e) => serde_json::to_value(e),
            ActionEvent::Approved(e) => serde_json::to_value(e),
            ActionEvent::Rejected(e) => serde_json::to_value(e),
            ActionEvent::Expired(e) => serde_json::to_value(e),
            ActionEvent::Cancelled(e) => serde_json::to_value(e),
            ActionEvent::OutcomeReported(e) => serde_json::to_value(e),
            ActionEvent::OutcomeRefused(e) => serde_json::to_value(e),
        }
    }

    /// `Ok(None)` for kinds that are not about actions (for example authentication audits).
    pub fn from_stored(
        kind: &str,
        payload: &serde_json::Value,
    ) -> Result<Option<ActionEvent>, EventDecodeError> {
        Self::decode(kind, PayloadSource::Value(payload))
    }

    /// Like [`ActionEvent::from_stored`], from the payload's JSON text, straight into the
    /// typed event (start-up replay: no `serde_json::Value` tree in between).
    pub fn from_json(kind: &str, payload: &str) -> Result<Option<ActionEvent>, EventDecodeError> {
        Self::decode(kind, PayloadSource::Text(payload))
    }

    fn decode(
        kind: &str,
        payload: PayloadSource<'_>,
    ) -> Result<Option<ActionEvent>, EventDecodeError> {
        Ok(Some(match kind {
            Self::REQUESTED => ActionEvent::Requested(Box::new(payload.decode(kind)?)),
            Self::EVALUATED => ActionEvent::Evaluated(Box::new(payload.decode(kind)?)),
            Self::VOTED => ActionEvent::Voted(payload.decode(kind)?),
            Self::REVIEW_REFUSED => ActionEvent::ReviewRefused(payload.decode(kind)?),
            Self::APPROVED => ActionEvent::Approved(payload.decode(kind)?),
            Self::REJECTED => ActionEvent::Rejected(payload.decode(kind)?),
            Self::EXPIRED => ActionEvent::Expired(payload.decode(kind)?),
            Self::CANCELLED => ActionEvent::Cancelled(payload.decode(kind)?),
            Self::OUTCOME_REPORTED => ActionEvent::OutcomeReported(payload.decode(kind)?),
            Self::OUTCOME_REFUSED => ActionEvent::OutcomeRefused(payload.decode(kind)?),
            _ => return Ok(None),
        }))
    }
}

/// What an action's entry keeps of an event, decoded without building the event: start-up
/// reads a million of them for actions that will not stay in memory.
#[derive(Debug, Clone, PartialEq)]
pub enum EventSummary {
    Requested {
        requester_id: String,
        action_type: String,
        idempotency_key: String,
    },
    /// Any other event: the status it gives its action, if any, and whether it is
    /// audit-only (it changes nothing).
    Other {
        status_after: Option<ActionStatus>,
        audit_only: bool,
    },
}

#[derive(Deserialize)]
struct RequestedSummary {
    requester: IdOnly,
    request: RequestSummary,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

#[derive(Deserialize)]
struct RequestSummary {
    action: TypeOnly,
    idempotency_key: String,
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    action_type: String,
}

#[derive(Deserialize)]
struct StatusOnly {
    status: ActionStatus,
}

impl EventSummary {
    /// `Ok(None)` for kinds that are not about actions, as [`ActionEvent::from_json`].
    pub fn from_json(kind: &str, payload: &str) -> Result<Option<EventSummary>, EventDecodeError> {
        let source = PayloadSource::Text(payload);
        let other = |status_after, audit_only| EventSummary::Other {
            status_after,
            audit_only,
        };
        Ok(Some(match kind {
            ActionEvent::REQUESTED => {
                let requested: RequestedSummary = source.decode(kind)?;
                EventSummary::Requested {
                    requester_id: requested.requester.id,
                    action_type: requested.request.action.action_type,
                    idempotency_key: requested.request.idempotency_key,
                }
            }
            ActionEvent::EVALUATED => {
                let evaluated: StatusOnly = source.decode(kind)?;
                other(Some(evaluated.status), false)
            }
            ActionEvent::APPROVED => other(Some(ActionStatus::Approved), false),
            ActionEvent::REJECTED => other(Some(ActionStatus::Rejected), false),
            ActionEvent::EXPIRED => other(Some(ActionStatus::Expired), false),
            ActionEvent::CANCELLED => other(Some(ActionStatus::Cancelled), false),
            ActionEvent::VOTED | ActionEvent::OUTCOME_REPORTED => other(None, false),
            ActionEvent::REVIEW_REFUSED | ActionEvent::OUTCOME_REFUSED => other(None, true),
            _ => return Ok(None),
        }))
    }
}

/// Where a payload is decoded from: a parsed tree, or its JSON text.
#[derive(Clone, Copy)]
enum PayloadSource<'p> {
    Value(&'p serde_json::Value),
    Text(&'p str),
}

impl PayloadSource<'_> {
    fn decode<T: serde::de::DeserializeOwned>(self, kind: &str) -> Result<T, EventDecodeError> {
        match self {
            PayloadSource::Value(value) => T::deserialize(value),
            PayloadSource::Text(text) => serde_json::from_str(text),
        }
        .map_err(|source| EventDecodeError {
            kind: kind.to_string(),
            source,
        })
    }
}
