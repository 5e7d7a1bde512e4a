//! The typed events of an action's life, as they are stored in the log.
//!
//! The store keeps a `kind` string and a JSON payload; this module owns the mapping in both
//! directions, so the event vocabulary lives in one place.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::record::ActionStatus;
use crate::domain::{ActionRequest, Principal};
use crate::policy::Decision;

/// A caller asked for an action. Always followed, in the same atomic append, by its
/// [`PolicyEvaluated`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRequested {
    pub requester: Principal,
    pub request: ActionRequest,
    pub action_digest: String,
    /// The caller's W3C trace id, when it propagated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
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

#[derive(Debug, Clone, PartialEq)]
pub enum ActionEvent {
    /// Boxed: a request with its parameters is several times larger than an evaluation.
    Requested(Box<ActionRequested>),
    Evaluated(PolicyEvaluated),
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

    pub fn kind(&self) -> &'static str {
        match self {
            ActionEvent::Requested(_) => Self::REQUESTED,
            ActionEvent::Evaluated(_) => Self::EVALUATED,
        }
    }

    pub fn to_payload(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            ActionEvent::Requested(e) => serde_json::to_value(e),
            ActionEvent::Evaluated(e) => serde_json::to_value(e),
        }
    }

    /// `Ok(None)` for kinds that do not change an action's state (audit-only events).
    pub fn from_stored(
        kind: &str,
        payload: &serde_json::Value,
    ) -> Result<Option<ActionEvent>, EventDecodeError> {
        let decode_error = |source| EventDecodeError {
            kind: kind.to_string(),
            source,
        };
        Ok(match kind {
            Self::REQUESTED => Some(ActionEvent::Requested(Box::new(
                ActionRequested::deserialize(payload).map_err(decode_error)?,
            ))),
            Self::EVALUATED => Some(ActionEvent::Evaluated(
                PolicyEvaluated::deserialize(payload).map_err(decode_error)?,
            )),
            _ => None,
        })
    }
}
