//! What happens to an existing action when someone acts on it: pure decisions.
//!
//! Each command is decided against the action's current record and the time, and yields
//! the events to append plus the answer for the caller. A refused command may still yield
//! events: refusals that matter to auditors (self-review, a second vote, a vote from someone
//! who may not review at all, a late start) are recorded, not just returned. How many of
//! those reach the log is the writer's business (`super::refusals`).

use chrono::{DateTime, Utc};

use super::events::{
    ActionApproved, ActionCancelled, ActionEvent, ActionExpired, ActionRejected, Outcome,
    OutcomeRefused, OutcomeReported, ReviewRefused, ReviewVoted, Verdict, kept_text,
};
use super::record::ActionRecord;
use super::status::ActionStatus;
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
        /// Set when the edge found that the caller may not review at all (an agent, a
        /// human outside `[roles] reviewers`), saying why: the vote is refused with that
        /// and recorded on the action, whatever its status, so the attempt is in the
        /// action's history.
        refused_by_role: Option<String>,
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
    let expired_at = (record.status == ActionStatus::Pending)
        .then_some(record.expires_at)
        .flatten()
        .filter(|expires_at| now >= *expires_at);
    let expiry = |expires_at| {
        (
            SERVER_ACTOR.to_string(),
            ActionEvent::Expired(ActionExpired { expires_at }),
        )
    };
    // Someone who may not review at all is told so (not that the action expired or was
    // decided), and the attempt is recorded on the action.
    if let ActionCommand::Review {
        reviewer,
        verdict,
        reason,
        refused_by_role: Some(why),
        ..
    } = command
    {
        let refusal = Refusal::PermissionDenied(why.clone());
        let mut events: Vec<_> = expired_at.map(expiry).into_iter().collect();
        events.push((
            reviewer.id.clone(),
            refused_review(reviewer, *verdict, reason, &refusal),
        ));
        return Decided::refused(events, refusal);
    }
    if let Some(expires_at) = expired_at {
        let expired = expiry(expires_at);
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
            refused_by_role: _,
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
            record.action_digest,
            shown_digest(expected)
        )));
    }
    None
}

/// A digest a client sent, as a refusal quotes it: a real one is 64 characters, and the
/// refusal is stored, so anything longer is cut.
fn shown_digest(digest: &str) -> String {
    const SHOWN: usize = 64;
    match digest.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &digest[..end]),
        None => digest.to_string(),
    }
}

/// The audit event of a refused vote, its reason cut to what the log keeps.
fn refused_review(
    reviewer: &Principal,
    verdict: Verdict,
    reason: &str,
    refusal: &Refusal,
) -> ActionEvent {
    let (reason, reason_cut) = kept_text(reason);
    ActionEvent::ReviewRefused(ReviewRefused {
        reviewer: reviewer.clone(),
        verdict,
        reason,
        reason_cut,
        refusal: refusal.to_string(),
        repeats: None,
    })
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
        let audit = refused_review(reviewer, verdict, reason, &refusal);
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
        let (details, details_cut) = kept_text(details);
        let audit = ActionEvent::OutcomeRefused(OutcomeRefused {
            reporter: by.id.clone(),
            outcome,
            details,
            details_cut,
            refusal: refusal.to_string(),
            repeats: None,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::TimeZone;
    use uuid::Uuid;

    use super::*;
    use crate::domain::{ActionRequest, ActionSpec, Effect, RiskLevel, TaskContext};
    use crate::policy::Decision;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + seconds, 0)
            .single()
            .unwrap()
    }

    fn person(id: &str, groups: &[&str]) -> Principal {
        Principal {
            id: id.into(),
            kind: PrincipalKind::Human,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            authenticated_by: "test".into(),
        }
    }

    fn pending(approvals: u32, groups: &[&str]) -> ActionRecord {
        ActionRecord {
            id: Uuid::now_v7(),
            requester: Principal {
                kind: PrincipalKind::Agent,
                ..person("deploy-bot", &[])
            },
            request: ActionRequest {
                action: ActionSpec {
                    action_type: "iam.role.grant".into(),
                    resource: "r".into(),
                    environment: "production".into(),
                    parameters: Default::default(),
                    purpose: "p".into(),
                },
                task: TaskContext {
                    on_behalf_of: "alice@example.com".into(),
                    ..Default::default()
                },
                idempotency_key: String::new(),
            },
            action_digest: "d".repeat(64),
            on_behalf_of_source: None,
            trace_id: None,
            caller_span: None,
            status: ActionStatus::Pending,
            decision: Some(Decision {
                effect: Effect::RequireApproval,
                risk: RiskLevel::High,
                approvals_required: approvals,
                reviewer_groups: groups.iter().map(|g| g.to_string()).collect(),
                ttl_seconds: Some(600),
                matched_rules: vec![],
                errors: vec![],
                defaulted: false,
                policy_version: "v".into(),
            }),
            votes: vec![],
            outcome: None,
            created_at: at(0),
            expires_at: Some(at(600)),
            decided_at: None,
            valid_until: None,
            first_sequence: 1,
            last_sequence: 2,
        }
    }

    fn vote(reviewer: Principal, verdict: Verdict) -> ActionCommand {
        ActionCommand::Review {
            reviewer,
            verdict,
            reason: "because".into(),
            expected_digest: None,
            refused_by_role: None,
        }
    }

    fn times() -> DecisionTimes {
        DecisionTimes {
            default_pending_ttl: Duration::from_secs(3600),
            approval_validity: Duration::from_secs(300),
        }
    }

    /// Applies accepted votes to the record, as the ledger's fold would.
    fn with_vote(mut record: ActionRecord, reviewer: Principal) -> ActionRecord {
        record.votes.push(crate::workflow::Vote {
            reviewer,
            verdict: Verdict::Approve,
            reason: "ok".into(),
            time: at(1),
            sequence: 3,
        });
        record
    }

    fn kinds(decided: &Decided) -> Vec<&'static str> {
        decided.events.iter().map(|(_, e)| e.kind()).collect()
    }

    #[test]
    fn the_quorum_needs_distinct_reviewers() {
        let record = pending(2, &["security"]);
        let first = decide(
            &record,
            &vote(person("bob", &["security"]), Verdict::Approve),
            at(1),
            &times(),
        );
        assert_eq!(kinds(&first), ["review.voted"]);
        assert!(first.result.is_ok());

        let record = with_vote(record, person("bob", &["security"]));
        let again = decide(
            &record,
            &vote(person("BOB", &["security"]), Verdict::Approve),
            at(2),
            &times(),
        );
        assert_eq!(kinds(&again), ["review.refused"]);
        assert!(matches!(again.result, Err(Refusal::PermissionDenied(_))));

        let second = decide(
            &record,
            &vote(person("carol", &["security"]), Verdict::Approve),
            at(2),
            &times(),
        );
        assert_eq!(kinds(&second), ["review.voted", "action.approved"]);
        let ActionEvent::Approved(approved) = &second.events[1].1 else {
            unreachable!()
        };
        assert_eq!(approved.approved_by, ["bob", "carol"]);
        assert_eq!(approved.valid_until, at(302));
    }

    #[test]
    fn one_rejection_rejects() {
        let record = with_vote(pending(2, &["security"]), person("bob", &["security"]));
        let decided = decide(
            &record,
            &vote(person("carol", &["security"]), Verdict::Reject),
            at(2),
            &times(),
        );
        assert_eq!(kinds(&decided), ["review.voted", "action.rejected"]);
    }

    #[test]
    fn requester_on_behalf_of_agents_and_outsiders_are_refused_and_recorded() {
        let record = pending(1, &["security"]);
        let agent = Principal {
            kind: PrincipalKind::Agent,
            ..person("helper", &["security"])
        };
        for reviewer in [
            person("deploy-bot", &["security"]),
            person("Alice@Example.com", &["security"]),
            agent,
            person("erin", &["sre"]),
        ] {
            let decided = decide(
                &record,
                &vote(reviewer.clone(), Verdict::Approve),
                at(1),
                &times(),
            );
            assert_eq!(kinds(&decided), ["review.refused"], "{}", reviewer.id);
            assert!(matches!(decided.result, Err(Refusal::PermissionDenied(_))));
        }
    }

    #[test]
    fn a_vote_from_someone_who_may_not_review_is_recorded_on_the_action_whatever_its_status() {
        let agent = Principal {
            kind: PrincipalKind::Agent,
            ..person("helper", &["security"])
        };
        let role_refused = ActionCommand::Review {
            reviewer: agent,
            verdict: Verdict::Approve,
            reason: "trust me".into(),
            expected_digest: None,
            refused_by_role: Some("helper is an agent; only humans review actions".into()),
        };
        let mut record = pending(1, &["security"]);
        for status in [ActionStatus::Pending, ActionStatus::Approved] {
            record.status = status;
            let decided = decide(&record, &role_refused, at(1), &times());
            assert_eq!(kinds(&decided), ["review.refused"], "{status:?}");
            assert_eq!(
                decided.result,
                Err(Refusal::PermissionDenied(
                    "helper is an agent; only humans review actions".into()
                ))
            );
        }
        // Past its expiry, the action expires and the attempt is still recorded.
        record.status = ActionStatus::Pending;
        let late = decide(&record, &role_refused, at(600), &times());
        assert_eq!(kinds(&late), ["action.expired", "review.refused"]);
        assert!(matches!(late.result, Err(Refusal::PermissionDenied(_))));
    }

    #[test]
    fn refused_texts_are_kept_as_a_prefix_with_their_length_and_digest() {
        let record = pending(1, &["security"]);
        let long = "é".repeat(2048);
        let decided = decide(
            &record,
            &ActionCommand::Review {
                reviewer: person("deploy-bot", &["security"]),
                verdict: Verdict::Approve,
                reason: long.clone(),
                expected_digest: Some("f".repeat(10_000)),
                refused_by_role: None,
            },
            at(1),
            &times(),
        );
        let ActionEvent::ReviewRefused(refused) = &decided.events[0].1 else {
            panic!("{decided:?}");
        };
        assert!(refused.reason.len() <= crate::workflow::KEPT_TEXT_BYTES);
        assert!(long.starts_with(&refused.reason));
        let cut = refused.reason_cut.as_ref().unwrap();
        assert_eq!(cut.bytes, 4096);
        assert_eq!(cut.sha256.len(), 64);
        // A short reason is kept whole.
        let short = decide(
            &record,
            &vote(person("deploy-bot", &["security"]), Verdict::Approve),
            at(1),
            &times(),
        );
        let ActionEvent::ReviewRefused(refused) = &short.events[0].1 else {
            panic!("{short:?}");
        };
        assert_eq!(
            (refused.reason.as_str(), &refused.reason_cut),
            ("because", &None)
        );
        // A digest the client made up is quoted only in part.
        let wrong_digest = decide(
            &record,
            &ActionCommand::Review {
                reviewer: person("bob", &["security"]),
                verdict: Verdict::Approve,
                reason: "ok".into(),
                expected_digest: Some("f".repeat(10_000)),
                refused_by_role: None,
            },
            at(1),
            &times(),
        );
        let ActionEvent::ReviewRefused(refused) = &wrong_digest.events[0].1 else {
            panic!("{wrong_digest:?}");
        };
        assert!(refused.refusal.len() < 300, "{}", refused.refusal);
    }

    #[test]
    fn without_reviewer_groups_any_other_human_may_review() {
        let record = pending(1, &[]);
        let decided = decide(
            &record,
            &vote(person("zed", &[]), Verdict::Approve),
            at(1),
            &times(),
        );
        assert_eq!(kinds(&decided), ["review.voted", "action.approved"]);
    }

    #[test]
    fn anything_after_the_expiry_expires_the_action_first() {
        let record = pending(1, &["security"]);
        let late = decide(
            &record,
            &vote(person("bob", &["security"]), Verdict::Approve),
            at(600),
            &times(),
        );
        assert_eq!(kinds(&late), ["action.expired"]);
        assert!(matches!(late.result, Err(Refusal::FailedPrecondition(_))));
        assert_eq!(
            kinds(&decide(&record, &ActionCommand::Expire, at(599), &times())),
            Vec::<&str>::new()
        );
        assert_eq!(
            kinds(&decide(&record, &ActionCommand::Expire, at(600), &times())),
            ["action.expired"]
        );
    }

    #[test]
    fn final_actions_take_no_more_votes_or_cancellations() {
        let mut record = pending(1, &["security"]);
        record.status = ActionStatus::Approved;
        let decided = decide(
            &record,
            &vote(person("bob", &["security"]), Verdict::Approve),
            at(1),
            &times(),
        );
        assert!(decided.events.is_empty());
        assert!(matches!(
            decided.result,
            Err(Refusal::FailedPrecondition(_))
        ));
        let cancel = ActionCommand::Cancel {
            by: record.requester.clone(),
            reason: String::new(),
        };
        assert!(matches!(
            decide(&record, &cancel, at(1), &times()).result,
            Err(Refusal::FailedPrecondition(_))
        ));
    }

    #[test]
    fn outcomes_are_refused_after_valid_until_except_abandonment() {
        let mut record = pending(1, &[]);
        record.status = ActionStatus::Approved;
        record.valid_until = Some(at(100));
        let report = |outcome| ActionCommand::ReportOutcome {
            by: record.requester.clone(),
            outcome,
            details: String::new(),
        };
        assert_eq!(
            kinds(&decide(
                &record,
                &report(Outcome::Executed),
                at(100),
                &times()
            )),
            ["outcome.reported"]
        );
        let late = decide(&record, &report(Outcome::Executed), at(101), &times());
        assert_eq!(kinds(&late), ["outcome.refused"]);
        assert!(late.result.is_err());
        assert_eq!(
            kinds(&decide(
                &record,
                &report(Outcome::Abandoned),
                at(101),
                &times()
            )),
            ["outcome.reported"]
        );
    }

    /// Start-up replay folds events by value; the writer folds them by reference. Both
    /// must build the same state from the same events.
    #[test]
    fn folding_by_value_and_by_reference_agree() {
        use crate::workflow::record::EventContext;
        use crate::workflow::{
            ActionApproved, ActionRequested, Actions, PolicyEvaluated, ReviewVoted,
        };

        let record = pending(1, &["sre"]);
        let mut keyed = pending(1, &[]);
        keyed.request.idempotency_key = "k-1".into();
        let mut events = Vec::new();
        for (n, r) in [record, keyed].into_iter().enumerate() {
            let base = n as u64 * 10;
            let requested = ActionEvent::Requested(Box::new(ActionRequested {
                requester: r.requester.clone(),
                request: r.request.clone(),
                action_digest: r.action_digest.clone(),
                on_behalf_of_source: None,
                trace_id: Some("t".into()),
                caller_span: None,
            }));
            let evaluated = ActionEvent::Evaluated(Box::new(PolicyEvaluated {
                decision: r.decision.clone().unwrap(),
                status: ActionStatus::Pending,
                expires_at: r.expires_at,
                valid_until: None,
            }));
            events.push((base + 1, r.id, requested));
            events.push((base + 2, r.id, evaluated));
            if n == 0 {
                let voted = ActionEvent::Voted(ReviewVoted {
                    reviewer: person("rev", &["sre"]),
                    verdict: Verdict::Approve,
                    reason: "ok".into(),
                });
                let approved = ActionEvent::Approved(ActionApproved {
                    valid_until: at(900),
                    approved_by: vec!["rev".into()],
                });
                events.push((base + 3, r.id, voted));
                events.push((base + 4, r.id, approved));
            }
        }
        let (mut by_ref, mut by_value) = (Actions::default(), Actions::default());
        for (sequence, action_id, event) in events {
            let ctx = EventContext {
                sequence,
                time: at(sequence as i64),
                action_id,
            };
            by_ref.apply(ctx, &event).unwrap();
            by_value.apply_owned(ctx, event).unwrap();
        }
        assert_eq!(by_ref.len(), 2);
        let (listed, more) = by_ref.list(&Default::default(), None, 10);
        assert!(!more);
        let ids: Vec<Uuid> = listed
            .iter()
            .map(|listed| match listed {
                crate::workflow::record::Listed::Hot(record) => record.id,
                cold => panic!("every record stays in memory by default: {cold:?}"),
            })
            .collect();
        assert_eq!(ids.len(), 2);
        for id in &ids {
            assert_eq!(by_ref.hot(id), by_value.hot(id));
        }
        assert_eq!(by_ref.next_expiry(), by_value.next_expiry());
        assert_eq!(by_ref.applied_sequence(), by_value.applied_sequence());
        let requester = &by_ref.hot(&ids[0]).unwrap().requester.id;
        assert_eq!(
            by_ref.by_idempotency_key(requester, "k-1"),
            by_value.by_idempotency_key(requester, "k-1")
        );
        assert!(by_value.by_idempotency_key(requester, "k-1").is_some());
    }
}
