//! API messages to JSON for scripts (`--json`).
//!
//! prost types do not implement serde, and their field names are not a contract we want
//! to leak anyway, so this maps each message explicitly: enums become lower-case words
//! (`pending`, `critical`, `approve`, or `unknown(7)` for a value this client does not
//! know), timestamps RFC 3339 in UTC (or `null` when unset), `google.protobuf.Struct`
//! parameters real JSON. Absent optional messages become `null`; nothing here panics on
//! what a server sends.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use crate::proto;
use crate::proto::stream_pending_response::Event as StreamEvent;

/// One `StreamPending` message: `{"sequence": 12, "event": "pending", "action": {...}}`.
pub fn stream_message(message: &proto::StreamPendingResponse) -> Value {
    let mut object = Map::new();
    object.insert("sequence".into(), json!(message.sequence));
    match &message.event {
        Some(StreamEvent::Pending(record)) => {
            object.insert("event".into(), json!("pending"));
            object.insert("action".into(), action_record(record));
        }
        Some(StreamEvent::VoteAdded(added)) => {
            object.insert("event".into(), json!("vote_added"));
            object.insert("action_id".into(), json!(added.action_id));
            object.insert("vote".into(), added.vote.as_ref().map_or(Value::Null, vote));
            object.insert(
                "approvals_remaining".into(),
                json!(added.approvals_remaining),
            );
        }
        Some(StreamEvent::Resolved(resolved)) => {
            object.insert("event".into(), json!("resolved"));
            object.insert("action_id".into(), json!(resolved.action_id));
            object.insert("status".into(), json!(status(resolved.status)));
            object.insert("decided_at".into(), timestamp(resolved.decided_at.as_ref()));
            object.insert("decided_by".into(), json!(resolved.decided_by));
            object.insert("reason".into(), json!(resolved.reason));
        }
        Some(StreamEvent::SnapshotComplete(complete)) => {
            object.insert("event".into(), json!("snapshot_complete"));
            object.insert("pending_count".into(), json!(complete.pending_count));
        }
        Some(StreamEvent::ResyncRequired(resync)) => {
            object.insert("event".into(), json!("resync_required"));
            object.insert("reason".into(), json!(resync.reason));
        }
        Some(StreamEvent::CaughtUp(_)) => {
            object.insert("event".into(), json!("caught_up"));
        }
        // A kind of event added to the API after this client was built.
        None => {
            object.insert("event".into(), json!("unknown"));
        }
    }
    Value::Object(object)
}

/// The whole record of one action.
pub fn action_record(record: &proto::ActionRecord) -> Value {
    let action = record.action.as_ref();
    let task = record.task.as_ref();
    json!({
        "action_id": record.action_id,
        "status": status(record.status),
        "action": action.map_or(Value::Null, |a| json!({
            "type": a.r#type,
            "resource": a.resource,
            "environment": a.environment,
            "parameters": a.parameters.as_ref().map_or(Value::Null, structure),
            "purpose": a.purpose,
        })),
        "task": task.map_or(Value::Null, |t| json!({
            "task_id": t.task_id,
            "origin": t.origin,
            "on_behalf_of": t.on_behalf_of,
            "on_behalf_of_source": on_behalf_of_source(record.on_behalf_of_source),
            "labels": t.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>(),
        })),
        "requester": record.requester.as_ref().map_or(Value::Null, |p| json!({
            "id": p.id,
            "kind": principal_kind(p.kind),
            "groups": p.groups,
            "authenticated_by": p.authenticated_by,
        })),
        "risk": risk(record.risk),
        "matched_rules": record.matched_rules.iter().map(|r| json!({
            "name": r.name,
            "message": r.message,
            "effect": effect(r.effect),
            "risk": risk(r.risk),
        })).collect::<Vec<_>>(),
        "rule_errors": record.rule_errors.iter().map(|e| json!({
            "rule": e.rule,
            "message": e.message,
        })).collect::<Vec<_>>(),
        "defaulted": record.defaulted,
        "approvals_required": record.approvals_required,
        "approvals_remaining": approvals_remaining(record),
        "reviewer_groups": record.reviewer_groups,
        "votes": record.votes.iter().map(vote).collect::<Vec<_>>(),
        "created_at": timestamp(record.created_at.as_ref()),
        "expires_at": timestamp(record.expires_at.as_ref()),
        "decided_at": timestamp(record.decided_at.as_ref()),
        "valid_until": timestamp(record.valid_until.as_ref()),
        "policy_version": record.policy_version,
        "action_digest": record.action_digest,
        "idempotency_key": record.idempotency_key,
        "outcome": record.outcome.as_ref().map_or(Value::Null, |o| json!({
            "outcome": outcome(o.outcome),
            "details": o.details,
            "time": timestamp(o.time.as_ref()),
        })),
        "trace_id": record.trace_id,
        "first_sequence": record.first_sequence,
        "last_sequence": record.last_sequence,
    })
}

fn on_behalf_of_source(source: i32) -> Value {
    match proto::OnBehalfOfSource::try_from(source) {
        Ok(proto::OnBehalfOfSource::Credential) => json!("credential"),
        Ok(proto::OnBehalfOfSource::Asserted) => json!("asserted"),
        _ => Value::Null,
    }
}

pub fn vote(vote: &proto::Vote) -> Value {
    json!({
        "reviewer_id": vote.reviewer_id,
        "verdict": verdict(vote.verdict),
        "reason": vote.reason,
        "time": timestamp(vote.time.as_ref()),
        "sequence": vote.sequence,
    })
}

/// Approvals still needed: the record carries the quorum and the votes, not the difference.
pub fn approvals_remaining(record: &proto::ActionRecord) -> u32 {
    let approvals = record
        .votes
        .iter()
        .filter(|v| v.verdict == proto::Verdict::Approve as i32)
        .count();
    record
        .approvals_required
        .saturating_sub(u32::try_from(approvals).unwrap_or(u32::MAX))
}

/// A protobuf timestamp as a time, if it is one (`None` when unset or out of range).
pub fn time(timestamp: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let timestamp = timestamp?;
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    DateTime::from_timestamp(timestamp.seconds, nanos)
}

/// RFC 3339, `null` when unset; an out-of-range value is shown rather than dropped.
pub fn timestamp(timestamp: Option<&prost_types::Timestamp>) -> Value {
    match (timestamp, time(timestamp)) {
        (None, _) => Value::Null,
        (Some(_), Some(time)) => json!(time.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        (Some(t), None) => json!(format!("invalid({}s, {}ns)", t.seconds, t.nanos)),
    }
}

/// `google.protobuf.Struct` as the JSON object it stands for.
pub fn structure(value: &prost_types::Struct) -> Value {
    Value::Object(
        value
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), struct_value(v)))
            .collect(),
    )
}

fn struct_value(value: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::ListValue(list)) => Value::Array(list.values.iter().map(struct_value).collect()),
        Some(Kind::StructValue(object)) => structure(object),
    }
}

/// Struct numbers are doubles; whole ones print as integers (`3`, not `3.0`), as the
/// agent most likely sent them. Non-finite numbers have no JSON form and become `null`.
fn number(n: f64) -> Value {
    /// Beyond 2^53 a double no longer holds every integer, so it stays a double.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() <= EXACT {
        // Exact: whole and within i64's exactly representable range.
        json!(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// An enum value as a lower-case word without its prefix, or `unknown(N)`.
fn word(name: Option<&str>, prefix: &str, value: i32) -> String {
    match name {
        Some(name) => name
            .strip_prefix(prefix)
            .unwrap_or(name)
            .to_ascii_lowercase(),
        None => format!("unknown({value})"),
    }
}

pub fn status(value: i32) -> String {
    let name = proto::ActionStatus::try_from(value).ok();
    word(name.map(|n| n.as_str_name()), "ACTION_STATUS_", value)
}

pub fn risk(value: i32) -> String {
    let name = proto::RiskLevel::try_from(value).ok();
    word(name.map(|n| n.as_str_name()), "RISK_LEVEL_", value)
}

pub fn effect(value: i32) -> String {
    let name = proto::PolicyEffect::try_from(value).ok();
    word(name.map(|n| n.as_str_name()), "POLICY_EFFECT_", value)
}

pub fn verdict(value: i32) -> String {
    let name = proto::Verdict::try_from(value).ok();
    word(name.map(|n| n.as_str_name()), "VERDICT_", value)
}

pub fn principal_kind(value: i32) -> String {
    let name = proto::PrincipalKind::try_from(value).ok();
    word(name.map(|n| n.as_str_name()), "PRINCIPAL_KIND_", value)
}

pub fn outcome(value: i32) -> String {
    let name = proto::Outcome::try_from(value).ok();
    word(name.map(|n| n.as_str_name()), "OUTCOME_", value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::value::Kind;

    #[test]
    fn enums_are_lower_case_words_and_unknown_values_say_so() {
        assert_eq!(status(proto::ActionStatus::Pending as i32), "pending");
        assert_eq!(risk(proto::RiskLevel::Critical as i32), "critical");
        assert_eq!(
            effect(proto::PolicyEffect::RequireApproval as i32),
            "require_approval"
        );
        assert_eq!(verdict(proto::Verdict::Approve as i32), "approve");
        assert_eq!(status(0), "unspecified");
        assert_eq!(status(7), "cancelled");
        assert_eq!(status(42), "unknown(42)");
        assert_eq!(risk(-1), "unknown(-1)");
    }

    #[test]
    fn an_empty_record_renders_without_panicking() {
        let value = action_record(&proto::ActionRecord {
            status: 99,
            ..Default::default()
        });
        assert_eq!(value["status"], "unknown(99)");
        assert_eq!(value["action"], Value::Null);
        assert_eq!(value["created_at"], Value::Null);
        assert_eq!(value["outcome"], Value::Null);
    }

    #[test]
    fn parameters_are_real_json() {
        let mut fields = std::collections::BTreeMap::new();
        let value = |kind| prost_types::Value { kind: Some(kind) };
        fields.insert("role".to_string(), value(Kind::StringValue("admin".into())));
        fields.insert("count".to_string(), value(Kind::NumberValue(3.0)));
        fields.insert("ratio".to_string(), value(Kind::NumberValue(0.5)));
        fields.insert("bad".to_string(), value(Kind::NumberValue(f64::NAN)));
        fields.insert("none".to_string(), prost_types::Value { kind: None });
        fields.insert(
            "list".to_string(),
            value(Kind::ListValue(prost_types::ListValue {
                values: vec![value(Kind::BoolValue(true))],
            })),
        );
        let json = structure(&prost_types::Struct { fields });
        assert_eq!(
            json,
            json!({"role": "admin", "count": 3, "ratio": 0.5, "bad": null, "none": null, "list": [true]})
        );
    }

    #[test]
    fn timestamps_are_rfc3339_and_bad_ones_are_shown() {
        let t = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        };
        assert_eq!(timestamp(Some(&t)), json!("2023-11-14T22:13:20Z"));
        assert_eq!(timestamp(None), Value::Null);
        let bad = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(timestamp(Some(&bad)), json!("invalid(0s, -1ns)"));
    }

    #[test]
    fn stream_messages_name_their_event() {
        let message = proto::StreamPendingResponse {
            sequence: 12,
            event: Some(StreamEvent::SnapshotComplete(proto::SnapshotComplete {
                pending_count: 3,
            })),
        };
        assert_eq!(
            stream_message(&message),
            json!({"sequence": 12, "event": "snapshot_complete", "pending_count": 3})
        );
        let unknown = proto::StreamPendingResponse {
            sequence: 13,
            event: None,
        };
        assert_eq!(stream_message(&unknown)["event"], "unknown");
    }
}
