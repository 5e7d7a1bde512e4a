//! What happens to an existing action when someone acts on it: pure decisions.
//!
//! Each command is decided against the action's current record and the time, and yields
//! the events to append plus the answer for the caller. A refused command may still yield
//! events: refusals that matter to auditors (self-review, a second vote, a late start) are
//! recorded, not just returned.

use chrono::{DateTime, Utc};

use super::events::{
    ActionApproved, ActionCancelled, ActionEvent, ActionExpired, ActionRejected, Outcome,
    OutcomeRefused, OutcomeReported, ReviewRefused, ReviewVoted, Verdict,
};
use super::record::{ActionRecord, ActionStatus};
use super::{DecisionTimes, after};
use crate::domain::{Principal, PrincipalKind};

/// The actor recorded for events countersign causes itself.
pub const SERVER_ACTOR: &str = "countersign";

#[derive(Debug, Clone, PartialEq)]
pub enum ActionCommand {
    Review {
        reviewer: Principal,
        verdict: Verdict,
        reason: String,
        /// The digest the reviewer saw, if the client sent it.
        expected_digest: Option<String>,
    },
    Cancel {
        by: Principal,
        reason: String,
    },
    ReportOutcome {
        by: Principal,
        outcome: Outcome,
        details: String,
    },
    /// Sent by the expiry timer; a no-op unless the action is pending and due.
    Expire,
}

/// Why a command was refused, in words for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
}

/// The events a command produces and what its caller is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// (actor, event) pairs, appended in order.
    pub events: Vec<(String, ActionEvent)>,
    pub result: Result<(), Refusal>,
}

impl Decided {
    fn ok(events: Vec<(String, ActionEvent)>) -> Decided {
        Decided {
            events,
            result: Ok(()),
        }
    }

    fn refused(events: Vec<(String, ActionEvent)>, refusal: Refusal) -> Decided {
        Decided {
            events,
            result: Err(refusal),
        }
    }
}

/// The same person under different spellings of an address is still the same person.
fn same_identity(a: &str, b: &str) -> bool {
    !a.is_empty() && a.eq_ignore_ascii_case(b)
}

pub fn decide(
    record: &ActionRecord,
    command: &ActionCommand,
    now: DateTime<Utc>,
    times: &DecisionTimes,
) -> Decided {
    // A pending action past its expiry is expired now, whatever was asked: fail closed at
    // the exact time, not when the timer gets round to it.
    if record.status == ActionStatus::Pending
        && let Some(expires_at) = record.expires_at
        && now >= expires_at
    {
        let expired = (
            SERVER_ACTOR.to_string(),
            ActionEvent::Expired(ActionExpired { expires_at }),
        );
        return match command {
            ActionCommand::Expire => Decided::ok(vec![expired]),
            _ => Decided::refused(
                vec![expired],
                Refusal::FailedPrecondition(format!(
                    "action {} expired at {} without a decision",
                    record.id,
                    expires_at.to_rfc3339()
                )),
            ),
        };
    }
    match command {
        ActionCommand::Expire => Decided::ok(Vec::new()),
        ActionCommand::Review {
            reviewer,
            verdict,
            reason,
            expected_digest,
        } => review(
            record,
            reviewer,
            *verdict,
            reason,
            expected_digest.as_deref(),
            now,
            times,
        ),
        ActionCommand::Cancel { by, reason } => cancel(record, by, reason),
        ActionCommand::ReportOutcome {
            by,
            outcome,
            details,
        } => report_outcome(record, by, *outcome, details, now),
    }
}

fn not_pending(record: &ActionRecord) -> Refusal {
    Refusal::FailedPrecondition(format!(
        "action {} is {}, no longer pending",
        record.id,
        record.status.as_str()
    ))
}

/// Why this reviewer may not review this action, if they may not.
fn review_refusal(
    record: &ActionRecord,
    reviewer: &Principal,
    expected_digest: Option<&str>,
) -> Option<Refusal> {
    let denied = |why: String| Some(Refusal::PermissionDenied(why));
    if reviewer.kind != PrincipalKind::Human {
        return denied(format!(
            "{} is an agent; only humans review actions",
            reviewer.id
        ));
    }
    if same_identity(&reviewer.id, &record.requester.id) {
        return denied(format!(
            "{} requested this action and cannot review it",
            reviewer.id
        ));
    }
    if same_identity(&reviewer.id, &record.request.task.on_behalf_of) {
        return denied(format!(
            "the action is taken on behalf of {}, who cannot review it",
            reviewer.id
        ));
    }
    let groups = record.reviewer_groups();
    if !groups.is_empty() && !groups.iter().any(|g| reviewer.in_group(g)) {
        return denied(format!(
            "{} is not in a reviewer group of this action (needs one of: {})",
            reviewer.id,
            groups.join(", ")
        ));
    }
    if record
        .votes
        .iter()
        .any(|v| same_identity(&v.reviewer.id, &reviewer.id))
    {
        return denied(format!(
            "{} has already voted on this action; quorums need distinct reviewers",
            reviewer.id
        ));
    }
    if let Some(expected) = expected_digest
        && expected != record.action_digest
    {
        return Some(Refusal::FailedPrecondition(format!(
            "the action's digest is {}, not the {} that was reviewed",
            record.action_digest, expected
        )));
    }
    None
}

fn review(
    record: &ActionRecord,
    reviewer: &Principal,
    verdict: Verdict,
    reason: &str,
    expected_digest: Option<&str>,
    now: DateTime<Utc>,
    times: &DecisionTimes,
) -> Decided {
    if record.status != ActionStatus::Pending {
        return Decided::refused(Vec::new(), not_pending(record));
    }
    if let Some(refusal) = review_refusal(record, reviewer, expected_digest) {
        let audit = ActionEvent::ReviewRefused(ReviewRefused {
            reviewer: reviewer.clone(),
            verdict,
            reason: reason.to_string(),
            refusal: refusal.to_string(),
        });
        return Decided::refused(vec![(reviewer.id.clone(), audit)], refusal);
    }
    let mut events = vec![(
        reviewer.id.clone(),
        ActionEvent::Voted(ReviewVoted {
            reviewer: reviewer.clone(),
            verdict,
            reason: reason.to_string(),
        }),
    )];
    match verdict {
        Verdict::Reject => events.push((
            SERVER_ACTOR.to_string(),
            ActionEvent::Rejected(ActionRejected {
                rejected_by: reviewer.id.clone(),
            }),
        )),
        Verdict::Approve => {
            let approvals = record.approvals() + 1;
            let required =
                usize::try_from(record.approvals_required().max(1)).unwrap_or(usize::MAX);
            if approvals >= required {
                let approved_by = record
                    .votes
                    .iter()
                    .filter(|v| v.verdict == Verdict::Approve)
                    .map(|v| v.reviewer.id.clone())
                    .chain(std::iter::once(reviewer.id.clone()))
                    .collect();
                events.push((
                    SERVER_ACTOR.to_string(),
                    ActionEvent::Approved(ActionApproved {
                        valid_until: after(now, times.approval_validity),
                        approved_by,
                    }),
                ));
            }
        }
    }
    Decided::ok(events)
}

fn cancel(record: &ActionRecord, by: &Principal, reason: &str) -> Decided {
    if by.id != record.requester.id {
        return Decided::refused(
            Vec::new(),
            Refusal::PermissionDenied(format!(
                "only the requester ({}) can cancel this action",
                record.requester.id
            )),
        );
    }
    if record.status != ActionStatus::Pending {
        return Decided::refused(Vec::new(), not_pending(record));
    }
    Decided::ok(vec![(
        by.id.clone(),
        ActionEvent::Cancelled(ActionCancelled {
            cancelled_by: by.id.clone(),
            reason: reason.to_string(),
        }),
    )])
}

fn report_outcome(
    record: &ActionRecord,
    by: &Principal,
    outcome: Outcome,
    details: &str,
    now: DateTime<Utc>,
) -> Decided {
    if by.id != record.requester.id {
        return Decided::refused(
            Vec::new(),
            Refusal::PermissionDenied(format!(
                "only the requester ({}) can report this action's outcome",
                record.requester.id
            )),
        );
    }
    if !matches!(
        record.status,
        ActionStatus::Allowed | ActionStatus::Approved
    ) {
        return Decided::refused(
            Vec::new(),
            Refusal::FailedPrecondition(format!(
                "action {} is {}; outcomes are reported only for allowed or approved actions",
                record.id,
                record.status.as_str()
            )),
        );
    }
    if record.outcome.is_some() {
        return Decided::refused(
            Vec::new(),
            Refusal::FailedPrecondition(format!(
                "the outcome of action {} was already reported",
                record.id
            )),
        );
    }
    // Executed or failed means the action was started; after `valid_until` it must not
    // have been. Record the attempt for the auditors and refuse it.
    if outcome != Outcome::Abandoned
        && let Some(valid_until) = record.valid_until
        && now > valid_until
    {
        let refusal = Refusal::FailedPrecondition(format!(
            "the decision on action {} was valid until {}; a start reported later is refused and recorded",
            record.id,
            valid_until.to_rfc3339()
        ));
        let audit = ActionEvent::OutcomeRefused(OutcomeRefused {
            reporter: by.id.clone(),
            outcome,
            details: details.to_string(),
            refusal: refusal.to_string(),
        });
        return Decided::refused(vec![(by.id.clone(), audit)], refusal);
    }
    Decided::ok(vec![(
        by.id.clone(),
        ActionEvent::OutcomeReported(OutcomeReported {
            outcome,
            details: details.to_string(),
        }),
    )])
}
