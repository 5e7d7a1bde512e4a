//! Turns protobuf requests into domain values, refusing anything out of shape.
//!
//! Every limit is a named constant and documented in the proto files; every refusal names
//! the field, so a caller can fix its request without reading server logs.

use std::collections::BTreeMap;

use serde_json::{Map, Number, Value};
use uuid::Uuid;

use crate::domain::{ActionRequest, ActionSpec, TaskContext};
use crate::proto;

pub const MAX_TYPE_BYTES: usize = 128;
pub const MAX_RESOURCE_BYTES: usize = 512;
pub const MAX_ENVIRONMENT_BYTES: usize = 512;
pub const MAX_PURPOSE_BYTES: usize = 4096;
pub const MAX_PARAMETERS_BYTES: usize = 64 * 1024;
pub const MAX_PARAMETERS_DEPTH: usize = 16;
pub const MAX_PARAMETERS_ENTRIES: usize = 1024;
pub const MAX_PARAMETER_KEY_BYTES: usize = 256;
pub const MAX_TASK_FIELD_BYTES: usize = 256;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_BYTES: usize = 128;
pub const MAX_LABEL_VALUE_BYTES: usize = 512;
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// Largest integer a double carries exactly; larger whole numbers stay doubles.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// A request field that is out of shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldViolation {
    pub field: String,
    pub problem: String,
}

fn violation(field: impl Into<String>, problem: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Text without control characters (newlines and tabs allowed where `multiline`).
fn text(
    field: &str,
    value: &str,
    max_bytes: usize,
    multiline: bool,
) -> Result<String, FieldViolation> {
    if value.len() > max_bytes {
        return Err(violation(
            field,
            format!("is {} bytes, at most {max_bytes} allowed", value.len()),
        ));
    }
    let allowed = |c: char| !c.is_control() || (multiline && (c == '\n' || c == '\t'));
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(violation(
            field,
            format!("contains the control character U+{:04X}", bad as u32),
        ));
    }
    if let Some(bad) = value.chars().find(|c| is_bidi_control(*c)) {
        return Err(violation(
            field,
            format!(
                "contains the bidirectional control character U+{:04X}, which can make a reviewer read something other than what is stored",
                bad as u32
            ),
        ));
    }
    Ok(value.to_string())
}

/// Characters that reorder how text is displayed ("Trojan Source"): a purpose or resource
/// shown to a reviewer must read the way it is stored.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `iam.role.grant`: at least two lower-case segments of `[a-z0-9_-]`.
fn action_type(value: &str) -> Result<String, FieldViolation> {
    const FIELD: &str = "action.type";
    if value.is_empty() {
        return Err(violation(
            FIELD,
            "is required (a dotted verb such as `iam.role.grant`)",
        ));
    }
    if value.len() > MAX_TYPE_BYTES {
        return Err(violation(
            FIELD,
            format!("is {} bytes, at most {MAX_TYPE_BYTES} allowed", value.len()),
        ));
    }
    let segments: Vec<&str> = value.split('.').collect();
    let segment_ok = |s: &&str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    if segments.len() < 2 || !segments.iter().all(segment_ok) {
        return Err(violation(
            FIELD,
            format!(
                "`{}` is not a dotted verb: use lower-case segments of [a-z0-9_-] separated by dots, domain first (e.g. `db.instance.create`)",
                value.escape_debug()
            ),
        ));
    }
    Ok(value.to_string())
}

pub fn check_action_request(
    request: proto::CheckActionRequest,
) -> Result<ActionRequest, FieldViolation> {
    let action = request
        .action
        .ok_or_else(|| violation("action", "is required"))?;
    let parameters = match &action.parameters {
        None => Map::new(),
        Some(parameters) => {
            let size = prost::Message::encoded_len(parameters);
            if size > MAX_PARAMETERS_BYTES {
                return Err(violation(
                    "action.parameters",
                    format!("is {size} bytes, at most {MAX_PARAMETERS_BYTES} allowed"),
                ));
            }
            structure("action.parameters", parameters, 1)?
        }
    };
    let spec = ActionSpec {
        action_type: action_type(&action.r#type)?,
        resource: text(
            "action.resource",
            &action.resource,
            MAX_RESOURCE_BYTES,
            false,
        )?,
        environment: text(
            "action.environment",
            &action.environment,
            MAX_ENVIRONMENT_BYTES,
            false,
        )?,
        parameters,
        purpose: text("action.purpose", &action.purpose, MAX_PURPOSE_BYTES, true)?,
    };
    let task = match request.task {
        None => TaskContext::default(),
        Some(task) => task_context(task)?,
    };
    Ok(ActionRequest {
        action: spec,
        task,
        idempotency_key: text(
            "idempotency_key",
            &request.idempotency_key,
            MAX_IDEMPOTENCY_KEY_BYTES,
            false,
        )?,
    })
}

fn task_context(task: proto::Task) -> Result<TaskContext, FieldViolation> {
    if task.labels.len() > MAX_LABELS {
        return Err(violation(
            "task.labels",
            format!(
                "has {} labels, at most {MAX_LABELS} allowed",
                task.labels.len()
            ),
        ));
    }
    let mut labels = BTreeMap::new();
    for (key, value) in &task.labels {
        if key.is_empty() {
            return Err(violation("task.labels", "has an empty key"));
        }
        let field = format!("task.labels[{}]", key.escape_debug());
        let key = text(&field, key, MAX_LABEL_KEY_BYTES, false)?;
        let value = text(&field, value, MAX_LABEL_VALUE_BYTES, false)?;
        labels.insert(key, value);
    }
    Ok(TaskContext {
        task_id: text("task.task_id", &task.task_id, MAX_TASK_FIELD_BYTES, false)?,
        origin: text("task.origin", &task.origin, MAX_TASK_FIELD_BYTES, false)?,
        on_behalf_of: text(
            "task.on_behalf_of",
            &task.on_behalf_of,
            MAX_TASK_FIELD_BYTES,
            false,
        )?,
        labels,
    })
}

fn structure(
    field: &str,
    value: &prost_types::Struct,
    depth: usize,
) -> Result<Map<String, Value>, FieldViolation> {
    if value.fields.len() > MAX_PARAMETERS_ENTRIES {
        return Err(violation(
            field,
            format!(
                "has {} entries, at most {MAX_PARAMETERS_ENTRIES} allowed",
                value.fields.len()
            ),
        ));
    }
    let mut map = Map::new();
    for (key, item) in &value.fields {
        let path = format!("{field}.{}", key.escape_debug());
        if key.len() > MAX_PARAMETER_KEY_BYTES {
            return Err(violation(
                path,
                format!("key is longer than {MAX_PARAMETER_KEY_BYTES} bytes"),
            ));
        }
        map.insert(key.clone(), json_value(&path, item, depth)?);
    }
    Ok(map)
}

fn json_value(
    field: &str,
    value: &prost_types::Value,
    depth: usize,
) -> Result<Value, FieldViolation> {
    use prost_types::value::Kind;
    if depth > MAX_PARAMETERS_DEPTH {
        return Err(violation(
            field,
            format!("is nested deeper than {MAX_PARAMETERS_DEPTH} levels"),
        ));
    }
    Ok(match &value.kind {
        None => return Err(violation(field, "has no value (kind not set)")),
        Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => number(field, *n)?,
        Some(Kind::StructValue(s)) => Value::Object(structure(field, s, depth + 1)?),
        Some(Kind::ListValue(list)) => {
            if list.values.len() > MAX_PARAMETERS_ENTRIES {
                return Err(violation(
                    field,
                    format!(
                        "has {} items, at most {MAX_PARAMETERS_ENTRIES} allowed",
                        list.values.len()
                    ),
                ));
            }
            Value::Array(
                list.values
                    .iter()
                    .enumerate()
                    .map(|(i, item)| json_value(&format!("{field}[{i}]"), item, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

/// Whole numbers become JSON integers, so policies compare them as ints and the digest
/// has one spelling for them; other finite numbers stay doubles.
fn number(field: &str, n: f64) -> Result<Value, FieldViolation> {
    if !n.is_finite() {
        return Err(violation(field, "must be a finite number"));
    }
    if n.fract() == 0.0 && n.abs() <= MAX_EXACT_INTEGER {
        // Exact: the value is whole and within the range a double represents exactly.
        return Ok(Value::Number(Number::from(n as i64)));
    }
    Number::from_f64(n)
        .map(Value::Number)
        .ok_or_else(|| violation(field, "must be a finite number"))
}

pub const MAX_REASON_BYTES: usize = 4096;
pub const MAX_OUTCOME_DETAILS_BYTES: usize = 16 * 1024;
pub const MAX_PAGE_SIZE: u32 = 500;
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// A required free-text reason (reviews): 1..=4096 bytes, newlines allowed.
pub fn reason(field: &str, value: &str) -> Result<String, FieldViolation> {
    if value.trim().is_empty() {
        return Err(violation(
            field,
            "is required: say why, it is recorded for the auditors",
        ));
    }
    text(field, value, MAX_REASON_BYTES, true)
}

/// An optional free-text field with a limit, newlines allowed.
pub fn free_text(field: &str, value: &str, max_bytes: usize) -> Result<String, FieldViolation> {
    text(field, value, max_bytes, true)
}

pub fn verdict(value: i32) -> Result<crate::workflow::Verdict, FieldViolation> {
    use crate::workflow::Verdict;
    match proto::Verdict::try_from(value) {
        Ok(proto::Verdict::Approve) => Ok(Verdict::Approve),
        Ok(proto::Verdict::Reject) => Ok(Verdict::Reject),
        Ok(proto::Verdict::Unspecified) => Err(violation(
            "verdict",
            "is required: VERDICT_APPROVE or VERDICT_REJECT",
        )),
        Err(_) => Err(violation(
            "verdict",
            format!("{value} is not a known verdict"),
        )),
    }
}

pub fn outcome(value: i32) -> Result<crate::workflow::Outcome, FieldViolation> {
    use crate::workflow::Outcome;
    match proto::Outcome::try_from(value) {
        Ok(proto::Outcome::Executed) => Ok(Outcome::Executed),
        Ok(proto::Outcome::Failed) => Ok(Outcome::Failed),
        Ok(proto::Outcome::Abandoned) => Ok(Outcome::Abandoned),
        Ok(proto::Outcome::Unspecified) => Err(violation(
            "outcome",
            "is required: OUTCOME_EXECUTED, OUTCOME_FAILED or OUTCOME_ABANDONED",
        )),
        Err(_) => Err(violation(
            "outcome",
            format!("{value} is not a known outcome"),
        )),
    }
}

/// An optional status filter: unset means any.
pub fn status_filter(value: i32) -> Result<Option<crate::workflow::ActionStatus>, FieldViolation> {
    use crate::workflow::ActionStatus;
    Ok(Some(match proto::ActionStatus::try_from(value) {
        Ok(proto::ActionStatus::Unspecified) => return Ok(None),
        Ok(proto::ActionStatus::Allowed) => ActionStatus::Allowed,
        Ok(proto::ActionStatus::Denied) => ActionStatus::Denied,
        Ok(proto::ActionStatus::Pending) => ActionStatus::Pending,
        Ok(proto::ActionStatus::Approved) => ActionStatus::Approved,
        Ok(proto::ActionStatus::Rejected) => ActionStatus::Rejected,
        Ok(proto::ActionStatus::Expired) => ActionStatus::Expired,
        Ok(proto::ActionStatus::Cancelled) => ActionStatus::Cancelled,
        Err(_) => {
            return Err(violation(
                "status",
                format!("{value} is not a known status"),
            ));
        }
    }))
}

pub fn page_size(value: u32) -> Result<usize, FieldViolation> {
    match value {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        1..=MAX_PAGE_SIZE => Ok(value as usize),
        _ => Err(violation(
            "page_size",
            format!("is {value}, at most {MAX_PAGE_SIZE} allowed"),
        )),
    }
}

/// A non-negative duration, for `wait` fields.
pub fn duration(
    field: &str,
    value: &prost_types::Duration,
) -> Result<std::time::Duration, FieldViolation> {
    std::time::Duration::try_from(*value).map_err(|_| {
        violation(
            field,
            "must be a non-negative duration with nanos in 0..1e9",
        )
    })
}

pub fn action_id(field: &str, value: &str) -> Result<Uuid, FieldViolation> {
    if value.is_empty() {
        return Err(violation(field, "is required"));
    }
    Uuid::try_parse(value).map_err(|_| {
        violation(
            field,
            format!(
                "`{}` is not a UUID",
                value.chars().take(64).collect::<String>().escape_debug()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::value::Kind;

    fn request(action_type: &str) -> proto::CheckActionRequest {
        proto::CheckActionRequest {
            action: Some(proto::Action {
                r#type: action_type.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with_parameter(value: prost_types::Value) -> proto::CheckActionRequest {
        let mut r = request("db.instance.create");
        let mut fields = BTreeMap::new();
        fields.insert("p".to_string(), value);
        if let Some(a) = r.action.as_mut() {
            a.parameters = Some(prost_types::Struct { fields });
        }
        r
    }

    fn number_value(n: f64) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    #[test]
    fn missing_action_or_type_names_the_field() {
        let err = check_action_request(proto::CheckActionRequest::default()).unwrap_err();
        assert_eq!(err.field, "action");
        let err = check_action_request(request("")).unwrap_err();
        assert_eq!(err.field, "action.type");
        assert!(err.problem.contains("required"));
    }

    #[test]
    fn action_types_must_be_dotted_lower_case() {
        assert!(check_action_request(request("iam.role.grant")).is_ok());
        for bad in [
            "iam",
            "IAM.role",
            "iam..grant",
            ".iam",
            "iam.role grant",
            "iam.rôle",
        ] {
            let err = check_action_request(request(bad)).unwrap_err();
            assert_eq!(err.field, "action.type", "{bad}");
        }
    }

    #[test]
    fn whole_numbers_become_integers_and_non_finite_numbers_are_refused() {
        let ok = check_action_request(with_parameter(number_value(3.0))).unwrap();
        assert_eq!(ok.action.parameters["p"], serde_json::json!(3));
        let ok = check_action_request(with_parameter(number_value(2.5))).unwrap();
        assert_eq!(ok.action.parameters["p"], serde_json::json!(2.5));
        let err = check_action_request(with_parameter(number_value(f64::NAN))).unwrap_err();
        assert_eq!(err.field, "action.parameters.p");
    }

    #[test]
    fn deep_nesting_is_refused_with_its_path() {
        let mut value = number_value(1.0);
        for _ in 0..(MAX_PARAMETERS_DEPTH + 2) {
            value = prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: vec![value],
                })),
            };
        }
        let err = check_action_request(with_parameter(value)).unwrap_err();
        assert!(err.field.starts_with("action.parameters.p[0]"), "{err}");
        assert!(err.problem.contains("nested deeper"), "{err}");
    }

    #[test]
    fn a_value_without_a_kind_is_refused() {
        let err =
            check_action_request(with_parameter(prost_types::Value { kind: None })).unwrap_err();
        assert_eq!(err.field, "action.parameters.p");
    }

    #[test]
    fn oversized_fields_are_refused() {
        let mut r = request("data.export");
        if let Some(a) = r.action.as_mut() {
            a.purpose = "x".repeat(MAX_PURPOSE_BYTES + 1);
        }
        assert_eq!(check_action_request(r).unwrap_err().field, "action.purpose");
        let mut r = request("data.export");
        if let Some(a) = r.action.as_mut() {
            a.purpose = "rotate key \u{202E}gnp.exe".into();
        }
        let err = check_action_request(r).unwrap_err();
        assert_eq!(err.field, "action.purpose");
        assert!(err.problem.contains("U+202E"), "{err}");
        let mut r = request("data.export");
        r.idempotency_key = "k\u{7}".into();
        assert_eq!(
            check_action_request(r).unwrap_err().field,
            "idempotency_key"
        );
    }
}
