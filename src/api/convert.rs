//! Domain values to protobuf messages. The only place that knows both.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::domain::{ActionRequest, Effect, OnBehalfOfSource, Principal, PrincipalKind, RiskLevel};
use crate::proto;
use crate::store::{StoredEvent, VerifyReport};
use crate::workflow::{ActionRecord, ActionStatus, Outcome, Verdict, Vote};

pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        // Always < 2e9, so the cast is exact.
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

pub fn status(status: ActionStatus) -> proto::ActionStatus {
    match status {
        ActionStatus::Allowed => proto::ActionStatus::Allowed,
        ActionStatus::Denied => proto::ActionStatus::Denied,
        ActionStatus::Pending => proto::ActionStatus::Pending,
        ActionStatus::Approved => proto::ActionStatus::Approved,
        ActionStatus::Rejected => proto::ActionStatus::Rejected,
        ActionStatus::Expired => proto::ActionStatus::Expired,
        ActionStatus::Cancelled => proto::ActionStatus::Cancelled,
    }
}

pub fn risk(risk: RiskLevel) -> proto::RiskLevel {
    match risk {
        RiskLevel::Low => proto::RiskLevel::Low,
        RiskLevel::Medium => proto::RiskLevel::Medium,
        RiskLevel::High => proto::RiskLevel::High,
        RiskLevel::Critical => proto::RiskLevel::Critical,
    }
}

pub fn effect(effect: Effect) -> proto::PolicyEffect {
    match effect {
        Effect::Allow => proto::PolicyEffect::Allow,
        Effect::RequireApproval => proto::PolicyEffect::RequireApproval,
        Effect::Deny => proto::PolicyEffect::Deny,
    }
}

pub fn verdict(verdict: Verdict) -> proto::Verdict {
    match verdict {
        Verdict::Approve => proto::Verdict::Approve,
        Verdict::Reject => proto::Verdict::Reject,
    }
}

pub fn outcome(outcome: Outcome) -> proto::Outcome {
    match outcome {
        Outcome::Executed => proto::Outcome::Executed,
        Outcome::Failed => proto::Outcome::Failed,
        Outcome::Abandoned => proto::Outcome::Abandoned,
    }
}

pub fn vote(vote: &Vote) -> proto::Vote {
    proto::Vote {
        reviewer_id: vote.reviewer.id.clone(),
        verdict: verdict(vote.verdict) as i32,
        reason: vote.reason.clone(),
        time: Some(timestamp(vote.time)),
        sequence: vote.sequence,
    }
}

pub fn principal(principal: &Principal) -> proto::Principal {
    proto::Principal {
        id: principal.id.clone(),
        kind: match principal.kind {
            PrincipalKind::Agent => proto::PrincipalKind::Agent,
            PrincipalKind::Human => proto::PrincipalKind::Human,
        } as i32,
        groups: principal.groups.clone(),
        authenticated_by: principal.authenticated_by.clone(),
    }
}

fn struct_value(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        // Parameters arrived as doubles, so this is where they came from.
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(struct_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(structure(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn structure(map: &serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), struct_value(v)))
            .collect(),
    }
}

fn action(request: &ActionRequest) -> proto::Action {
    let spec = &request.action;
    proto::Action {
        r#type: spec.action_type.clone(),
        resource: spec.resource.clone(),
        environment: spec.environment.clone(),
        parameters: Some(structure(&spec.parameters)),
        purpose: spec.purpose.clone(),
    }
}

fn task(request: &ActionRequest) -> proto::Task {
    let task = &request.task;
    proto::Task {
        task_id: task.task_id.clone(),
        origin: task.origin.clone(),
        on_behalf_of: task.on_behalf_of.clone(),
        labels: task
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

pub fn action_record(record: &ActionRecord) -> proto::ActionRecord {
    let decision = record.decision.as_ref();
    proto::ActionRecord {
        action_id: record.id.to_string(),
        status: status(record.status) as i32,
        action: Some(action(&record.request)),
        task: Some(task(&record.request)),
        requester: Some(principal(&record.requester)),
        risk: decision.map_or(proto::RiskLevel::Unspecified, |d| risk(d.risk)) as i32,
        matched_rules: matched_rules(record),
        rule_errors: rule_errors(record),
        defaulted: decision.is_some_and(|d| d.defaulted),
        approvals_required: decision.map_or(0, |d| d.approvals_required),
        reviewer_groups: decision
            .map(|d| d.reviewer_groups.clone())
            .unwrap_or_default(),
        votes: record.votes.iter().map(vote).collect(),
        created_at: Some(timestamp(record.created_at)),
        expires_at: record.expires_at.map(timestamp),
        decided_at: record.decided_at.map(timestamp),
        valid_until: record.valid_until.map(timestamp),
        policy_version: decision
            .map(|d| d.policy_version.clone())
            .unwrap_or_default(),
        action_digest: record.action_digest.clone(),
        idempotency_key: record.request.idempotency_key.clone(),
        outcome: record.outcome.as_ref().map(|o| proto::OutcomeReport {
            outcome: outcome(o.outcome) as i32,
            details: o.details.clone(),
            time: Some(timestamp(o.time)),
        }),
        trace_id: record.trace_id.clone().unwrap_or_default(),
        first_sequence: record.first_sequence,
        last_sequence: record.last_sequence,
        on_behalf_of_source: match record.on_behalf_of_source {
            None => proto::OnBehalfOfSource::Unspecified,
            Some(OnBehalfOfSource::Credential) => proto::OnBehalfOfSource::Credential,
            Some(OnBehalfOfSource::Asserted) => proto::OnBehalfOfSource::Asserted,
        } as i32,
    }
}

fn matched_rules(record: &ActionRecord) -> Vec<proto::MatchedRule> {
    record.decision.as_ref().map_or_else(Vec::new, |d| {
        d.matched_rules
            .iter()
            .map(|m| proto::MatchedRule {
                name: m.name.clone(),
                message: m.message.clone(),
                effect: effect(m.effect) as i32,
                risk: risk(m.risk) as i32,
            })
            .collect()
    })
}

fn rule_errors(record: &ActionRecord) -> Vec<proto::RuleError> {
    record.decision.as_ref().map_or_else(Vec::new, |d| {
        d.errors
            .iter()
            .map(|e| proto::RuleError {
                rule: e.rule.clone(),
                message: e.message.clone(),
            })
            .collect()
    })
}

/// CheckAction's answer: the record's headline fields, built directly (this is the hot
/// path; the request's own parameters are not echoed back).
pub fn check_response(record: &ActionRecord) -> proto::CheckActionResponse {
    let decision = record.decision.as_ref();
    proto::CheckActionResponse {
        action_id: record.id.to_string(),
        status: status(record.status) as i32,
        risk: decision.map_or(proto::RiskLevel::Unspecified, |d| risk(d.risk)) as i32,
        matched_rules: matched_rules(record),
        approvals_required: record.approvals_required(),
        expires_at: record.expires_at.map(timestamp),
        policy_version: decision
            .map(|d| d.policy_version.clone())
            .unwrap_or_default(),
        action_digest: record.action_digest.clone(),
        reviewer_groups: record.reviewer_groups().to_vec(),
        rule_errors: rule_errors(record),
        defaulted: decision.is_some_and(|d| d.defaulted),
        trace_id: record.trace_id.clone().unwrap_or_default(),
        sequence: record.last_sequence,
        valid_until: record.valid_until.map(timestamp),
    }
}

pub fn event(event: &StoredEvent) -> proto::Event {
    proto::Event {
        sequence: event.sequence,
        kind: event.kind.clone(),
        time: Some(timestamp(event.time)),
        actor: event.actor.clone(),
        action_id: event.action_id.map(|id| id.to_string()).unwrap_or_default(),
        payload_json: event.payload.to_string(),
        prev_hash: hex::encode(event.prev_hash),
        hash: hex::encode(event.hash),
    }
}

pub fn verify_report(report: &VerifyReport) -> proto::VerifyLogResponse {
    proto::VerifyLogResponse {
        ok: report.ok,
        events_checked: report.events_checked,
        first_bad_sequence: report.first_bad_sequence.unwrap_or(0),
        problem: report.problem.clone().unwrap_or_default(),
        head_sequence: report.head_sequence,
        head_hash: hex::encode(report.head_hash),
    }
}
