//! From a policy decision to the status a new action starts in.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::events::PolicyEvaluated;
use super::status::ActionStatus;
use crate::domain::Effect;
use crate::policy::Decision;

/// Time limits that policies may leave unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionTimes {
    /// How long an action may stay pending when its policy names no `ttl`.
    pub default_pending_ttl: Duration,
    /// How long after the decision an ALLOWED (or APPROVED) action may still be started.
    pub approval_validity: Duration,
}

impl Default for DecisionTimes {
    fn default() -> Self {
        DecisionTimes {
            default_pending_ttl: Duration::from_secs(60 * 60),
            approval_validity: Duration::from_secs(15 * 60),
        }
    }
}

/// Saturates instead of overflowing: a limit far in the future is still a limit.
pub(crate) fn after(now: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(duration)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

pub fn evaluate_check(
    decision: Decision,
    now: DateTime<Utc>,
    times: &DecisionTimes,
) -> PolicyEvaluated {
    let (status, expires_at, valid_until) = match decision.effect {
        Effect::Allow => (
            ActionStatus::Allowed,
            None,
            Some(after(now, times.approval_validity)),
        ),
        Effect::Deny => (ActionStatus::Denied, None, None),
        Effect::RequireApproval => {
            let ttl = decision
                .ttl_seconds
                .map(Duration::from_secs)
                .unwrap_or(times.default_pending_ttl);
            (ActionStatus::Pending, Some(after(now, ttl)), None)
        }
    };
    PolicyEvaluated {
        decision,
        status,
        expires_at,
        valid_until,
    }
}
