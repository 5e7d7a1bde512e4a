//! Which log events are notifications, and what a notification carries. Pure: a stored
//! event in, a trigger out; the deliverer attaches the action's record.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::store::StoredEvent;
use crate::workflow::{ActionEvent, ActionRecord, ActionStatus};

/// What happened to an action that went to review.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationKind {
    /// The policy sent it to review: reviewers are asked.
    Pending,
    /// It was approved, rejected, expired or cancelled.
    Resolved,
}

impl NotificationKind {
    /// The `type` of a webhook event.
    pub fn event_type(self) -> &'static str {
        match self {
            NotificationKind::Pending => "action.pending",
            NotificationKind::Resolved => "action.resolved",
        }
    }
}

/// How a reviewed action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub status: ActionStatus,
    /// Who decided: the approvers, the rejecter, the requester who cancelled; empty when
    /// it expired.
    pub by: Vec<String>,
    /// The cancellation's reason (votes carry their own).
    pub reason: Option<String>,
}

/// A log event that is a notification, before the record is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub kind: NotificationKind,
    pub action_id: Uuid,
    pub resolution: Option<Resolution>,
}

/// One notification, as every channel renders it.
#[derive(Debug, Clone)]
pub struct Notification {
    pub kind: NotificationKind,
    /// The log sequence of the event: with the action id, the delivery's idempotency id.
    pub sequence: u64,
    /// When the event happened.
    pub at: DateTime<Utc>,
    /// The action as it is at delivery time (a late delivery of `Pending` may already see
    /// its final status; the `Resolved` one follows).
    pub record: ActionRecord,
    pub resolution: Option<Resolution>,
}

impl Notification {
    /// Stable across retries and restarts: receivers drop repeats by it.
    pub fn delivery_id(&self) -> String {
        format!("{}/{}", self.record.id, self.sequence)
    }
}

/// The notification an event stands for, if any. Events that do not decode are not
/// notifications (the span exporter and verification report them).
pub fn trigger(stored: &StoredEvent) -> Option<Trigger> {
    let action_id = stored.action_id?;
    let event = ActionEvent::from_stored(&stored.kind, &stored.payload).ok()??;
    let resolved = |status, by: Vec<String>, reason| {
        Some(Trigger {
            kind: NotificationKind::Resolved,
            action_id,
            resolution: Some(Resolution { status, by, reason }),
        })
    };
    match event {
        ActionEvent::Evaluated(evaluated) if evaluated.status == ActionStatus::Pending => {
            Some(Trigger {
                kind: NotificationKind::Pending,
                action_id,
                resolution: None,
            })
        }
        // Each of these ends a pending action: only actions that went to review have them.
        ActionEvent::Approved(e) => resolved(ActionStatus::Approved, e.approved_by, None),
        ActionEvent::Rejected(e) => resolved(ActionStatus::Rejected, vec![e.rejected_by], None),
        ActionEvent::Expired(_) => resolved(ActionStatus::Expired, Vec::new(), None),
        ActionEvent::Cancelled(e) => resolved(
            ActionStatus::Cancelled,
            vec![e.cancelled_by],
            Some(e.reason),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::{ActionApproved, ActionCancelled, ReviewVoted, Verdict};

    fn stored(event: &ActionEvent, action: bool) -> StoredEvent {
        StoredEvent {
            sequence: 7,
            kind: event.kind().to_string(),
            time: Utc::now(),
            actor: "x".into(),
            action_id: action.then(Uuid::nil),
            payload: event.to_payload().unwrap(),
            prev_hash: [0; 32],
            hash: [0; 32],
        }
    }

    #[test]
    fn final_statuses_after_review_are_resolutions_and_votes_are_not() {
        let approved = ActionEvent::Approved(ActionApproved {
            valid_until: Utc::now(),
            approved_by: vec!["bob".into(), "carol".into()],
        });
        let trigger = trigger(&stored(&approved, true)).unwrap();
        assert_eq!(trigger.kind, NotificationKind::Resolved);
        let resolution = trigger.resolution.unwrap();
        assert_eq!(resolution.status, ActionStatus::Approved);
        assert_eq!(resolution.by, vec!["bob", "carol"]);

        let cancelled = ActionEvent::Cancelled(ActionCancelled {
            cancelled_by: "bot".into(),
            reason: "not needed".into(),
        });
        let resolution = super::trigger(&stored(&cancelled, true))
            .unwrap()
            .resolution
            .unwrap();
        assert_eq!(resolution.reason.as_deref(), Some("not needed"));

        let voted = ActionEvent::Voted(ReviewVoted {
            reviewer: crate::domain::Principal {
                id: "bob".into(),
                kind: crate::domain::PrincipalKind::Human,
                groups: vec![],
                authenticated_by: "t".into(),
            },
            verdict: Verdict::Approve,
            reason: "ok".into(),
        });
        assert_eq!(super::trigger(&stored(&voted, true)), None);
        // Events about no action (access denials) are never notifications.
        assert_eq!(super::trigger(&stored(&approved, false)), None);
    }
}
