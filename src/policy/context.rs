//! Turns one request into the CEL variables `principal`, `action`, `task` and `now`.
//!
//! Built once per evaluation and shared by every rule, as a [`VariableResolver`] rather than
//! a map of variables: the interpreter looks `action.type` up as the whole dotted name before
//! it tries `action`, so answering the dotted names directly skips a map lookup per field
//! access, and the composite values (`action`, `action.parameters`, ...) are only built if a
//! rule asks for them. Strings are borrowed from the request, never copied.
//!
//! JSON numbers become CEL `int` when they are integral and fit in an `i64` (parameters
//! arrive through `google.protobuf.Struct`, where every number is a double, and
//! `action.parameters.replicas == 3` must hold for a JSON `3`), and `double` otherwise.

use std::collections::HashMap;
use std::sync::OnceLock;

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelTimestamp,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;

use super::EvaluationInput;

/// Deepest JSON nesting accepted in `action.parameters` (the parameters map itself is
/// level 1). Deeper input makes every evaluated rule error, which fails closed.
pub const MAX_PARAMETER_DEPTH: usize = 32;

type Boxed<'a> = Box<dyn Val + 'a>;

/// Why the variables could not be built; reported as the error of each evaluated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContextError(pub String);

/// The variables of one evaluation. Scalars are ready; composites are built on first use.
pub(crate) struct Variables<'a> {
    input: EvaluationInput<'a>,
    principal_id: CelString<'a>,
    principal_kind: CelString<'a>,
    principal_authenticated_by: CelString<'a>,
    action_type: CelString<'a>,
    action_resource: CelString<'a>,
    action_environment: CelString<'a>,
    action_purpose: CelString<'a>,
    task_id: CelString<'a>,
    task_origin: CelString<'a>,
    task_on_behalf_of: CelString<'a>,
    now: CelTimestamp,
    principal: OnceLock<Boxed<'a>>,
    principal_groups: OnceLock<Boxed<'a>>,
    action: OnceLock<Boxed<'a>>,
    action_parameters: OnceLock<Boxed<'a>>,
    task: OnceLock<Boxed<'a>>,
    task_labels: OnceLock<Boxed<'a>>,
}

impl<'a> Variables<'a> {
    /// Fails only when `action.parameters` is nested too deeply to convert.
    pub(crate) fn new(input: &EvaluationInput<'a>) -> Result<Self, ContextError> {
        let action = &input.request.action;
        if json_depth(&action.parameters, 1) > MAX_PARAMETER_DEPTH {
            return Err(ContextError(format!(
                "action.parameters is nested deeper than {MAX_PARAMETER_DEPTH} levels"
            )));
        }
        let principal = input.principal;
        let task = &input.request.task;
        Ok(Variables {
            input: *input,
            principal_id: principal.id.as_str().into(),
            principal_kind: principal.kind.as_str().into(),
            principal_authenticated_by: principal.authenticated_by.as_str().into(),
            action_type: action.action_type.as_str().into(),
            action_resource: action.resource.as_str().into(),
            action_environment: action.environment.as_str().into(),
            action_purpose: action.purpose.as_str().into(),
            task_id: task.task_id.as_str().into(),
            task_origin: task.origin.as_str().into(),
            task_on_behalf_of: task.on_behalf_of.as_str().into(),
            now: CelTimestamp::from(input.now.fixed_offset()),
            principal: OnceLock::new(),
            principal_groups: OnceLock::new(),
            action: OnceLock::new(),
            action_parameters: OnceLock::new(),
            task: OnceLock::new(),
            task_labels: OnceLock::new(),
        })
    }

    fn groups(&self) -> Boxed<'a> {
        let groups = &self.input.principal.groups;
        Box::new(CelList::from(
            groups.iter().map(|g| string(g)).collect::<Vec<_>>(),
        ))
    }

    fn parameters(&self) -> Boxed<'a> {
        object(&self.input.request.action.parameters)
    }

    fn labels(&self) -> Boxed<'a> {
        let labels = &self.input.request.task.labels;
        map(labels.iter().map(|(k, v)| (k.as_str(), string(v))))
    }

    fn build_principal(&self) -> Boxed<'a> {
        map([
            ("id", self.principal_id.clone_as_boxed()),
            ("kind", self.principal_kind.clone_as_boxed()),
            ("groups", self.groups()),
            (
                "authenticated_by",
                self.principal_authenticated_by.clone_as_boxed(),
            ),
        ])
    }

    fn build_action(&self) -> Boxed<'a> {
        map([
            ("type", self.action_type.clone_as_boxed()),
            ("resource", self.action_resource.clone_as_boxed()),
            ("environment", self.action_environment.clone_as_boxed()),
            ("parameters", self.parameters()),
            ("purpose", self.action_purpose.clone_as_boxed()),
        ])
    }

    fn build_task(&self) -> Boxed<'a> {
        map([
            ("task_id", self.task_id.clone_as_boxed()),
            ("origin", self.task_origin.clone_as_boxed()),
            ("on_behalf_of", self.task_on_behalf_of.clone_as_boxed()),
            ("labels", self.labels()),
        ])
    }
}

impl VariableResolver for Variables<'_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        let value: &'b (dyn Val + 'b) = match name {
            "action.type" => &self.action_type,
            "action.environment" => &self.action_environment,
            "action.resource" => &self.action_resource,
            "action.purpose" => &self.action_purpose,
            "action.parameters" => self
                .action_parameters
                .get_or_init(|| self.parameters())
                .as_ref(),
            "action" => self.action.get_or_init(|| self.build_action()).as_ref(),
            "principal.id" => &self.principal_id,
            "principal.kind" => &self.principal_kind,
            "principal.groups" => self.principal_groups.get_or_init(|| self.groups()).as_ref(),
            "principal.authenticated_by" => &self.principal_authenticated_by,
            "principal" => self
                .principal
                .get_or_init(|| self.build_principal())
                .as_ref(),
            "task.task_id" => &self.task_id,
            "task.origin" => &self.task_origin,
            "task.on_behalf_of" => &self.task_on_behalf_of,
            "task.labels" => self.task_labels.get_or_init(|| self.labels()).as_ref(),
            "task" => self.task.get_or_init(|| self.build_task()).as_ref(),
            "now" => &self.now,
            _ => return None,
        };
        Some(CowVal::Borrowed(value))
    }
}

fn string(s: &str) -> Boxed<'_> {
    Box::new(CelString::from(s))
}

fn map<'a>(entries: impl IntoIterator<Item = (&'a str, Boxed<'a>)>) -> Boxed<'a> {
    let entries: HashMap<CelMapKey<'a>, Boxed<'a>> = entries
        .into_iter()
        .map(|(k, v)| (CelMapKey::String(CelString::from(k)), v))
        .collect();
    Box::new(CelMap::from(entries))
}

/// Nesting depth of a JSON object whose own level is `level`; stops counting once past
/// the limit, so hostile input costs no more than the limit allows.
fn json_depth(fields: &serde_json::Map<String, serde_json::Value>, level: usize) -> usize {
    if level > MAX_PARAMETER_DEPTH {
        return level;
    }
    fields
        .values()
        .map(|value| value_depth(value, level))
        .max()
        .unwrap_or(level)
}

/// Depth of `value` held by a container at `level`.
fn value_depth(value: &serde_json::Value, level: usize) -> usize {
    match value {
        serde_json::Value::Object(fields) => json_depth(fields, level + 1),
        serde_json::Value::Array(_) if level + 1 > MAX_PARAMETER_DEPTH => level + 1,
        serde_json::Value::Array(items) => items
            .iter()
            .map(|item| value_depth(item, level + 1))
            .max()
            .unwrap_or(level + 1),
        _ => level,
    }
}

/// Converts a JSON object whose depth [`Variables::new`] has already checked.
fn object(fields: &serde_json::Map<String, serde_json::Value>) -> Boxed<'_> {
    map(fields.iter().map(|(k, v)| (k.as_str(), json(v))))
}

fn json(value: &serde_json::Value) -> Boxed<'_> {
    use serde_json::Value as J;
    match value {
        J::Null => Box::new(CelNull),
        J::Bool(b) => Box::new(CelBool::from(*b)),
        J::Number(n) => number(n),
        J::String(s) => string(s),
        J::Array(items) => Box::new(CelList::from(items.iter().map(json).collect::<Vec<_>>())),
        J::Object(fields) => object(fields),
    }
}

/// Integral values within `i64` become `int` (so `== 3` and `> 3` work), others `double`.
fn number(n: &serde_json::Number) -> Boxed<'static> {
    // 2^63 is exact in f64; `-2^63 <= f < 2^63` is exactly the set that fits in an i64.
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if let Some(i) = n.as_i64() {
        return Box::new(CelInt::from(i));
    }
    let Some(f) = n.as_f64() else {
        // Unreachable without serde_json's arbitrary_precision; NaN matches nothing.
        return Box::new(CelDouble::from(f64::NAN));
    };
    if f.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(&f) {
        #[allow(clippy::cast_possible_truncation)] // integral and in range, checked above
        return Box::new(CelInt::from(f as i64));
    }
    Box::new(CelDouble::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn depth(value: serde_json::Value) -> usize {
        match value {
            serde_json::Value::Object(fields) => json_depth(&fields, 1),
            _ => 0,
        }
    }

    #[test]
    fn depth_counts_the_parameters_map_as_level_one() {
        assert_eq!(depth(json!({})), 1);
        assert_eq!(depth(json!({"a": 1})), 1);
        assert_eq!(depth(json!({"a": {"b": 1}})), 2);
        assert_eq!(depth(json!({"a": [1]})), 2);
        assert_eq!(depth(json!({"a": [{"b": [1]}]})), 4);
    }
}
