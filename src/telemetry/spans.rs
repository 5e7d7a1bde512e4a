//! An action's history as OpenTelemetry spans. Pure: events and records in, span models
//! out; [`super::export`] ships them.
//!
//! The span model (see also README, "Traces"):
//! - `countersign.action`: one per action, from the request to its final status: the
//!   decision for actions allowed or denied at once, otherwise the approval, rejection,
//!   expiry or cancellation. Span events: `policy.evaluated`, each `review.voted`, and the
//!   final `action.*` event. A child of the caller's span when CheckAction carried a
//!   `traceparent`.
//! - `countersign.check`: for an action that goes to review, a short span at request time
//!   (same parent), so a waiting agent's trace shows the request at once rather than only
//!   when a human has answered.
//! - `countersign.outcome`: the outcome the requester reported (or one refused), a child of
//!   the action span. Spans are immutable once exported, and an outcome may come long after
//!   the decision, or never; so it is a span of its own rather than an event of a span held
//!   open.
//!
//! Span ids are derived from the action id and the span's role, and the trace id is the
//! caller's (or derived from the action id): exporting the same event twice yields the same
//! span, which collectors and backends can de-duplicate.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::{OnBehalfOfSource, PrincipalKind};
use crate::telemetry::trace_context::derived_trace_id;
use crate::workflow::{ActionEvent, ActionRecord, ActionStatus, Outcome, Verdict};

pub const ACTION_SPAN: &str = "countersign.action";
pub const CHECK_SPAN: &str = "countersign.check";
pub const OUTCOME_SPAN: &str = "countersign.outcome";

/// An attribute value; the few shapes countersign uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    StrArray(Vec<String>),
}

pub type Attributes = Vec<(&'static str, Value)>;

#[derive(Debug, Clone, PartialEq)]
pub struct SpanEvent {
    pub name: &'static str,
    pub time: DateTime<Utc>,
    pub attributes: Attributes,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SpanStatus {
    Unset,
    Ok,
    Error(String),
}

/// One finished span, ready to export.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanModel {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's span (remote) or, for outcome spans, the action span.
    pub parent_span_id: Option<[u8; 8]>,
    pub parent_is_remote: bool,
    pub tracestate: Option<String>,
    pub name: &'static str,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub attributes: Attributes,
    pub events: Vec<SpanEvent>,
    pub status: SpanStatus,
}

/// One stored event of an action, as the exporter reads it.
#[derive(Debug, Clone, Copy)]
pub struct Closing<'a> {
    pub sequence: u64,
    pub time: DateTime<Utc>,
    pub event: &'a ActionEvent,
}

/// The spans an event closes, given the record of its action (as it is now; only what
/// happened up to the event is used, so re-exporting later yields the same spans).
pub fn spans_for(closing: Closing<'_>, record: &ActionRecord) -> Vec<SpanModel> {
    match closing.event {
        ActionEvent::Evaluated(evaluated) => match evaluated.status {
            ActionStatus::Pending => vec![check_span(record, closing.sequence)],
            _ => vec![action_span(record, closing.sequence, None)],
        },
        ActionEvent::Approved(_)
        | ActionEvent::Rejected(_)
        | ActionEvent::Expired(_)
        | ActionEvent::Cancelled(_) => vec![action_span(record, closing.sequence, Some(closing))],
        ActionEvent::OutcomeReported(_) | ActionEvent::OutcomeRefused(_) => {
            vec![outcome_span(record, closing)]
        }
        ActionEvent::Requested(_) | ActionEvent::Voted(_) | ActionEvent::ReviewRefused(_) => {
            Vec::new()
        }
    }
}

/// The ids every span of an action shares.
struct Lineage {
    trace_id: [u8; 16],
    caller: Option<[u8; 8]>,
    tracestate: Option<String>,
}

fn lineage(record: &ActionRecord) -> Lineage {
    let trace_hex = record
        .trace_id
        .clone()
        .unwrap_or_else(|| derived_trace_id(&record.id));
    let trace_id = decode_hex::<16>(&trace_hex)
        .or_else(|| decode_hex::<16>(&derived_trace_id(&record.id)))
        .unwrap_or([1; 16]);
    let caller = record.caller_span.as_ref();
    Lineage {
        trace_id,
        caller: caller.and_then(|c| decode_hex::<8>(&c.span_id)),
        tracestate: caller.and_then(|c| c.tracestate.clone()),
    }
}

/// A span id that is the same every time this action's span of this role is built.
pub fn span_id(role: &str, action_id: &Uuid) -> [u8; 8] {
    let digest = Sha256::new()
        .chain_update(b"countersign span\0")
        .chain_update(role.as_bytes())
        .chain_update(b"\0")
        .chain_update(action_id.as_bytes())
        .finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    // An all-zero span id is invalid; astronomically unlikely, but never emit one.
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// What every span of an action says about it.
fn action_attributes(record: &ActionRecord, last_sequence: u64) -> Attributes {
    let action = &record.request.action;
    let mut attributes: Attributes = vec![
        ("rpc.system", Value::Str("grpc".into())),
        (
            "rpc.service",
            Value::Str("countersign.v1.ActionGate".into()),
        ),
        ("rpc.method", Value::Str("CheckAction".into())),
        ("enduser.id", Value::Str(record.requester.id.clone())),
        ("countersign.action.id", Value::Str(record.id.to_string())),
        (
            "countersign.action.type",
            Value::Str(action.action_type.clone()),
        ),
        (
            "countersign.action.resource",
            Value::Str(action.resource.clone()),
        ),
        (
            "countersign.action.environment",
            Value::Str(action.environment.clone()),
        ),
        (
            "countersign.action.digest",
            Value::Str(record.action_digest.clone()),
        ),
        (
            "countersign.requester.id",
            Value::Str(record.requester.id.clone()),
        ),
        (
            "countersign.requester.kind",
            Value::Str(kind(record.requester.kind).into()),
        ),
        (
            "countersign.requester.authenticated_by",
            Value::Str(record.requester.authenticated_by.clone()),
        ),
        (
            "countersign.log.first_sequence",
            Value::Int(to_i64(record.first_sequence)),
        ),
        (
            "countersign.log.last_sequence",
            Value::Int(to_i64(last_sequence)),
        ),
    ];
    let task = &record.request.task;
    if !task.on_behalf_of.is_empty() {
        attributes.push((
            "countersign.on_behalf_of",
            Value::Str(task.on_behalf_of.clone()),
        ));
        if let Some(source) = record.on_behalf_of_source {
            attributes.push((
                "countersign.on_behalf_of.source",
                Value::Str(
                    match source {
                        OnBehalfOfSource::Credential => "credential",
                        OnBehalfOfSource::Asserted => "asserted",
                    }
                    .into(),
                ),
            ));
        }
    }
    if !task.task_id.is_empty() {
        attributes.push(("countersign.task.id", Value::Str(task.task_id.clone())));
    }
    if let Some(decision) = &record.decision {
        attributes.extend([
            ("countersign.risk", Value::Str(decision.risk.to_string())),
            (
                "countersign.policy.version",
                Value::Str(decision.policy_version.clone()),
            ),
            (
                "countersign.policy.matched_rules",
                Value::StrArray(
                    decision
                        .matched_rules
                        .iter()
                        .map(|m| m.name.clone())
                        .collect(),
                ),
            ),
            (
                "countersign.policy.rule_errors",
                Value::Int(to_i64(decision.errors.len() as u64)),
            ),
            (
                "countersign.policy.defaulted",
                Value::Bool(decision.defaulted),
            ),
            (
                "countersign.approvals.required",
                Value::Int(i64::from(decision.approvals_required)),
            ),
        ]);
    }
    attributes
}

/// The status right after the policy decided, from the record's evaluation.
fn evaluated_status(record: &ActionRecord) -> ActionStatus {
    match record.decision.as_ref().map(|d| d.effect) {
        Some(crate::domain::Effect::Allow) => ActionStatus::Allowed,
        Some(crate::domain::Effect::Deny) => ActionStatus::Denied,
        _ => ActionStatus::Pending,
    }
}

fn evaluation_event(record: &ActionRecord) -> SpanEvent {
    let mut attributes: Attributes = vec![(
        "countersign.status",
        Value::Str(evaluated_status(record).as_str().into()),
    )];
    if let Some(decision) = &record.decision {
        attributes.push(("countersign.risk", Value::Str(decision.risk.to_string())));
        attributes.push((
            "countersign.policy.matched_rules",
            Value::StrArray(
                decision
                    .matched_rules
                    .iter()
                    .map(|m| m.name.clone())
                    .collect(),
            ),
        ));
        if !decision.reviewer_groups.is_empty() {
            attributes.push((
                "countersign.reviewer_groups",
                Value::StrArray(decision.reviewer_groups.clone()),
            ));
        }
    }
    SpanEvent {
        name: ActionEvent::EVALUATED,
        time: record.created_at,
        attributes,
    }
}

fn check_span(record: &ActionRecord, sequence: u64) -> SpanModel {
    let lineage = lineage(record);
    let mut attributes = action_attributes(record, sequence);
    attributes.push(("countersign.status", Value::Str("pending".into())));
    if let Some(expires_at) = record.expires_at {
        attributes.push((
            "countersign.expires_at",
            Value::Str(expires_at.to_rfc3339()),
        ));
    }
    SpanModel {
        trace_id: lineage.trace_id,
        span_id: span_id(CHECK_SPAN, &record.id),
        parent_span_id: lineage.caller,
        parent_is_remote: lineage.caller.is_some(),
        tracestate: lineage.tracestate,
        name: CHECK_SPAN,
        start: record.created_at,
        end: record.created_at,
        attributes,
        events: vec![evaluation_event(record)],
        status: SpanStatus::Unset,
    }
}

/// The action span, closed by `closing` (a final-status event), or by the evaluation
/// itself when `closing` is `None` (allowed or denied at once).
fn action_span(record: &ActionRecord, sequence: u64, closing: Option<Closing<'_>>) -> SpanModel {
    let lineage = lineage(record);
    let mut attributes = action_attributes(record, sequence);
    let mut events = vec![evaluation_event(record)];
    let votes: Vec<_> = record
        .votes
        .iter()
        .filter(|v| v.sequence <= sequence)
        .collect();
    for vote in &votes {
        events.push(SpanEvent {
            name: ActionEvent::VOTED,
            time: vote.time,
            attributes: vec![
                (
                    "countersign.reviewer.id",
                    Value::Str(vote.reviewer.id.clone()),
                ),
                (
                    "countersign.review.verdict",
                    Value::Str(verdict(vote.verdict).into()),
                ),
                ("countersign.review.reason", Value::Str(vote.reason.clone())),
            ],
        });
    }
    if !votes.is_empty() {
        attributes.push((
            "countersign.reviewers",
            Value::StrArray(votes.iter().map(|v| v.reviewer.id.clone()).collect()),
        ));
        attributes.push((
            "countersign.review.reasons",
            Value::StrArray(votes.iter().map(|v| v.reason.clone()).collect()),
        ));
    }

    let (status, end, span_status) = match closing {
        None => {
            let status = evaluated_status(record);
            let span_status = if status == ActionStatus::Allowed {
                SpanStatus::Ok
            } else {
                SpanStatus::Error(denial_message(record))
            };
            (status, record.created_at, span_status)
        }
        Some(Closing {
            time: end, event, ..
        }) => {
            let (status, attributes, span_status): (ActionStatus, Attributes, SpanStatus) =
                match event {
                    ActionEvent::Approved(approved) => (
                        ActionStatus::Approved,
                        vec![
                            (
                                "countersign.approved_by",
                                Value::StrArray(approved.approved_by.clone()),
                            ),
                            (
                                "countersign.valid_until",
                                Value::Str(approved.valid_until.to_rfc3339()),
                            ),
                        ],
                        SpanStatus::Ok,
                    ),
                    ActionEvent::Rejected(rejected) => (
                        ActionStatus::Rejected,
                        vec![(
                            "countersign.rejected_by",
                            Value::Str(rejected.rejected_by.clone()),
                        )],
                        SpanStatus::Error(format!("rejected by {}", rejected.rejected_by)),
                    ),
                    ActionEvent::Expired(_) => (
                        ActionStatus::Expired,
                        Vec::new(),
                        SpanStatus::Error("expired: nobody decided in time".into()),
                    ),
                    ActionEvent::Cancelled(cancelled) => (
                        ActionStatus::Cancelled,
                        vec![
                            (
                                "countersign.cancelled_by",
                                Value::Str(cancelled.cancelled_by.clone()),
                            ),
                            (
                                "countersign.cancel.reason",
                                Value::Str(cancelled.reason.clone()),
                            ),
                        ],
                        SpanStatus::Error("cancelled by the requester".into()),
                    ),
                    _ => (record.status, Vec::new(), SpanStatus::Unset),
                };
            events.push(SpanEvent {
                name: event.kind(),
                time: end,
                attributes,
            });
            (status, end, span_status)
        }
    };
    attributes.push(("countersign.status", Value::Str(status.as_str().into())));

    SpanModel {
        trace_id: lineage.trace_id,
        span_id: span_id(ACTION_SPAN, &record.id),
        parent_span_id: lineage.caller,
        parent_is_remote: lineage.caller.is_some(),
        tracestate: lineage.tracestate,
        name: ACTION_SPAN,
        start: record.created_at,
        end,
        attributes,
        events,
        status: span_status,
    }
}

fn outcome_span(record: &ActionRecord, closing: Closing<'_>) -> SpanModel {
    let Closing {
        sequence,
        time,
        event,
    } = closing;
    let lineage = lineage(record);
    let mut attributes = action_attributes(record, sequence);
    let (outcome, details, status, refusal) = match event {
        ActionEvent::OutcomeReported(reported) => {
            let status = match reported.outcome {
                Outcome::Executed => SpanStatus::Ok,
                Outcome::Failed => SpanStatus::Error("the requester reports a failure".into()),
                Outcome::Abandoned => SpanStatus::Unset,
            };
            (reported.outcome, reported.details.as_str(), status, None)
        }
        ActionEvent::OutcomeRefused(refused) => (
            refused.outcome,
            refused.details.as_str(),
            SpanStatus::Error(refused.refusal.clone()),
            Some(refused.refusal.clone()),
        ),
        _ => (Outcome::Abandoned, "", SpanStatus::Unset, None),
    };
    let mut event_attributes: Attributes = vec![
        (
            "countersign.outcome",
            Value::Str(outcome_name(outcome).into()),
        ),
        (
            "countersign.outcome.details",
            Value::Str(details.to_string()),
        ),
    ];
    if let Some(refusal) = refusal {
        event_attributes.push(("countersign.outcome.refusal", Value::Str(refusal)));
    }
    attributes.push((
        "countersign.status",
        Value::Str(record.status.as_str().into()),
    ));
    attributes.extend(event_attributes.iter().cloned());
    SpanModel {
        trace_id: lineage.trace_id,
        span_id: span_id(&format!("{OUTCOME_SPAN}@{sequence}"), &record.id),
        parent_span_id: Some(span_id(ACTION_SPAN, &record.id)),
        parent_is_remote: false,
        tracestate: lineage.tracestate,
        name: OUTCOME_SPAN,
        start: time,
        end: time,
        attributes,
        events: vec![SpanEvent {
            name: event.kind(),
            time,
            attributes: event_attributes,
        }],
        status,
    }
}

fn denial_message(record: &ActionRecord) -> String {
    record
        .decision
        .as_ref()
        .and_then(|d| {
            d.matched_rules
                .iter()
                .find(|m| m.effect == crate::domain::Effect::Deny)
        })
        .map_or_else(
            || "denied by policy".to_string(),
            |rule| format!("denied by policy rule {}", rule.name),
        )
}

fn kind(kind: PrincipalKind) -> &'static str {
    kind.as_str()
}

fn verdict(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Approve => "approve",
        Verdict::Reject => "reject",
    }
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Executed => "executed",
        Outcome::Failed => "failed",
        Outcome::Abandoned => "abandoned",
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = hex::decode(text).ok()?;
    let array: [u8; N] = bytes.try_into().ok()?;
    (array != [0; N]).then_some(array)
}
