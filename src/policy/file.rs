//! The YAML shape of a policy file and its validation, up to (not including) CEL compilation.
//!
//! A file is read in two steps. First into a generic YAML tree through a reader that counts
//! nodes and string bytes, so aliases cannot expand a 1 MiB file into gigabytes. Then each
//! rule is converted on its own, so a schema error can name the rule it is in.

use std::cell::Cell;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_yaml_ng::{Mapping, Value};

use super::error::{PolicyError, RuleProblem};
use crate::domain::{Effect, RiskLevel};

/// Larger files are refused before parsing; policies are small and a huge file is a mistake.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most distinct reviewers a rule can demand; more cannot be staffed and is a typo.
pub const MAX_APPROVALS: u32 = 10;
/// Longest a pending approval may wait; older requests are stale context for a reviewer.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Bounds on the YAML tree after alias expansion (see the module comment).
const MAX_YAML_NODES: usize = 200_000;
const MAX_YAML_STRING_BYTES: usize = 2 * MAX_FILE_BYTES as usize;
/// Longest reviewer group name accepted; group names come from the identity provider.
const MAX_GROUP_BYTES: usize = 128;

/// One rule as written, validated except for its expression.
#[derive(Debug, Clone)]
pub(crate) struct RuleDef {
    pub name: String,
    pub expression: String,
    pub message: String,
    pub outcome: Outcome,
}

/// What a rule (or the default) contributes when it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub effect: Effect,
    pub risk: RiskLevel,
    /// `None` means "not set": 1 when the effect is require_approval.
    pub approvals: Option<u32>,
    /// Sorted and deduplicated.
    pub groups: Vec<String>,
    pub ttl_seconds: Option<u64>,
}

impl Outcome {
    /// Fail closed: used when no file sets `default`.
    pub(crate) fn builtin_default() -> Outcome {
        Outcome {
            effect: Effect::RequireApproval,
            risk: RiskLevel::Medium,
            approvals: None,
            groups: Vec::new(),
            ttl_seconds: None,
        }
    }
}

/// One file after YAML parsing and per-rule validation.
#[derive(Debug)]
pub(crate) struct ParsedFile {
    pub rules: Vec<RuleDef>,
    pub default: Option<Outcome>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    #[serde(default)]
    description: Option<String>,
    expression: String,
    #[serde(default)]
    message: Option<String>,
    risk: RiskLevel,
    effect: Effect,
    #[serde(default)]
    approvals: Option<u32>,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultSpec {
    effect: Effect,
    risk: RiskLevel,
    #[serde(default)]
    approvals: Option<u32>,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    ttl: Option<String>,
}

/// Parses and validates one file. Expressions are checked later, by the compiler.
pub(crate) fn parse_file(file: &str, contents: &str) -> Result<ParsedFile, PolicyError> {
    if contents.len() as u64 > MAX_FILE_BYTES {
        return Err(PolicyError::FileTooLarge {
            file: file.to_owned(),
            size: contents.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    let tree = read_yaml(file, contents)?;
    let file_problem = |problem: &str| PolicyError::File {
        file: file.to_owned(),
        problem: problem.to_owned(),
    };
    let top = match tree {
        Value::Mapping(top) => top,
        Value::Null => {
            return Err(file_problem(
                "file is empty (expected `rules:` and/or `default:`)",
            ));
        }
        _ => {
            return Err(file_problem(
                "expected a mapping with `rules:` and/or `default:`",
            ));
        }
    };

    let mut rules_value = None;
    let mut default_value = None;
    for (key, value) in top {
        match key.as_str() {
            Some("rules") => rules_value = Some(value),
            Some("default") => default_value = Some(value),
            _ => {
                return Err(file_problem(&format!(
                    "unknown field {}, expected `rules` or `default`",
                    describe_key(&key)
                )));
            }
        }
    }
    if rules_value.is_none() && default_value.is_none() {
        return Err(file_problem("file sets neither `rules:` nor `default:`"));
    }

    let rules = match rules_value {
        None => Vec::new(),
        Some(Value::Sequence(items)) => items
            .into_iter()
            .enumerate()
            .map(|(index, item)| parse_rule(file, index, item))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(file_problem("`rules` must be a list of rules")),
    };

    let default = match default_value {
        None => None,
        Some(value @ Value::Mapping(_)) => {
            Some(
                parse_default(value).map_err(|problem| PolicyError::Default {
                    file: file.to_owned(),
                    problem,
                })?,
            )
        }
        Some(_) => {
            return Err(file_problem(
                "`default` must be a mapping with effect and risk",
            ));
        }
    };

    Ok(ParsedFile { rules, default })
}

fn parse_rule(file: &str, index: usize, item: Value) -> Result<RuleDef, PolicyError> {
    // Name the rule in errors even when the rest of it does not deserialize.
    let label = item
        .get("name")
        .and_then(Value::as_str)
        .map_or_else(|| format!("#{}", index + 1), str::to_owned);
    let fail = |problem: RuleProblem| PolicyError::Rule {
        file: file.to_owned(),
        rule: label.clone(),
        problem,
    };
    if !matches!(item, Value::Mapping(_)) {
        return Err(fail(RuleProblem::Schema(
            "a rule must be a mapping with name, expression, risk and effect".to_owned(),
        )));
    }
    let spec: RuleSpec =
        serde_yaml_ng::from_value(item).map_err(|e| fail(RuleProblem::Schema(e.to_string())))?;
    if !is_valid_rule_name(&spec.name) {
        return Err(fail(RuleProblem::InvalidName));
    }
    let outcome = outcome(
        spec.effect,
        spec.risk,
        spec.approvals,
        spec.groups,
        spec.ttl,
    )
    .map_err(&fail)?;
    let message = spec.message.or(spec.description).unwrap_or_default();
    Ok(RuleDef {
        name: spec.name,
        expression: spec.expression,
        message,
        outcome,
    })
}

fn parse_default(value: Value) -> Result<Outcome, RuleProblem> {
    let spec: DefaultSpec =
        serde_yaml_ng::from_value(value).map_err(|e| RuleProblem::Schema(e.to_string()))?;
    outcome(
        spec.effect,
        spec.risk,
        spec.approvals,
        spec.groups,
        spec.ttl,
    )
}

/// Checks the approval fields against the effect and normalises them.
fn outcome(
    effect: Effect,
    risk: RiskLevel,
    approvals: Option<u32>,
    groups: Option<Vec<String>>,
    ttl: Option<String>,
) -> Result<Outcome, RuleProblem> {
    if effect != Effect::RequireApproval {
        let misplaced = [
            ("approvals", approvals.is_some()),
            ("groups", groups.is_some()),
            ("ttl", ttl.is_some()),
        ];
        if let Some((field, _)) = misplaced.into_iter().find(|(_, set)| *set) {
            return Err(RuleProblem::NotForEffect { field, effect });
        }
    }
    if let Some(got) = approvals
        && !(1..=MAX_APPROVALS).contains(&got)
    {
        return Err(RuleProblem::ApprovalsOutOfRange {
            got,
            max: MAX_APPROVALS,
        });
    }
    let mut groups = groups.unwrap_or_default();
    for group in &groups {
        validate_group(group)?;
    }
    groups.sort();
    groups.dedup();
    let ttl_seconds = ttl.map(|ttl| parse_ttl(&ttl)).transpose()?;
    Ok(Outcome {
        effect,
        risk,
        approvals,
        groups,
        ttl_seconds,
    })
}

fn validate_group(group: &str) -> Result<(), RuleProblem> {
    let reason = if group.is_empty() {
        "empty"
    } else if group.len() > MAX_GROUP_BYTES {
        "longer than 128 bytes"
    } else if group.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "contains whitespace or control characters"
    } else {
        return Ok(());
    };
    Err(RuleProblem::InvalidGroup {
        group: group.to_owned(),
        reason,
    })
}

/// Parses a humantime duration (`30m`, `4h`, `1d 12h`) into whole seconds within (0, 7 days].
fn parse_ttl(ttl: &str) -> Result<u64, RuleProblem> {
    let invalid = |reason: String| RuleProblem::InvalidTtl {
        ttl: ttl.to_owned(),
        reason,
    };
    let duration = humantime::parse_duration(ttl).map_err(|e| invalid(e.to_string()))?;
    if duration.is_zero() {
        return Err(invalid("must be more than zero".to_owned()));
    }
    if duration > MAX_TTL {
        return Err(invalid("must be at most 7 days".to_owned()));
    }
    if duration.subsec_nanos() != 0 {
        return Err(invalid("must be a whole number of seconds".to_owned()));
    }
    Ok(duration.as_secs())
}

/// `^[a-z0-9][a-z0-9._-]{0,63}$`, checked by hand to avoid a regex dependency.
pub(crate) fn is_valid_rule_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let Some((first, rest)) = bytes.split_first() else {
        return false;
    };
    bytes.len() <= 64
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && rest.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

fn describe_key(key: &Value) -> String {
    match key.as_str() {
        Some(key) => format!("`{key}`"),
        None => "(a non-string key)".to_owned(),
    }
}

fn read_yaml(file: &str, contents: &str) -> Result<Value, PolicyError> {
    let budget = Budget::default();
    let deserializer = serde_yaml_ng::Deserializer::from_str(contents);
    BoundedValue { budget: &budget }
        .deserialize(deserializer)
        .map_err(|e| {
            let location = e.location();
            let mut message = e.to_string();
            if let Some(at) = &location
                && !message.contains("line")
            {
                message.push_str(&format!(" at line {} column {}", at.line(), at.column()));
            }
            PolicyError::Yaml {
                file: file.to_owned(),
                line: location.as_ref().map(|at| at.line()),
                column: location.as_ref().map(|at| at.column()),
                message,
            }
        })
}

/// Running totals for one document; shared by every node of the reader.
#[derive(Default)]
struct Budget {
    nodes: Cell<usize>,
    string_bytes: Cell<usize>,
}

impl Budget {
    fn charge<E: de::Error>(&self, string_bytes: usize) -> Result<(), E> {
        let nodes = self.nodes.get().saturating_add(1);
        let bytes = self.string_bytes.get().saturating_add(string_bytes);
        self.nodes.set(nodes);
        self.string_bytes.set(bytes);
        if nodes > MAX_YAML_NODES || bytes > MAX_YAML_STRING_BYTES {
            return Err(E::custom(
                "document is too large once YAML aliases are expanded",
            ));
        }
        Ok(())
    }
}

/// Builds a [`Value`] like serde_yaml_ng does, but charges every node to a [`Budget`],
/// refuses duplicate keys and refuses tags (nothing in a policy needs them).
#[derive(Clone, Copy)]
struct BoundedValue<'b> {
    budget: &'b Budget,
}

impl<'de> DeserializeSeed<'de> for BoundedValue<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoundedValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.budget.charge(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.budget.charge(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.budget.charge(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.budget.charge(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.budget.charge(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.budget.charge(v.len())?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.budget.charge(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.budget.charge(0)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.budget.charge(0)?;
        let mut mapping = Mapping::new();
        while let Some(key) = map.next_key_seed(self)? {
            let value = map.next_value_seed(self)?;
            let shown = describe_key(&key);
            if mapping.insert(key, value).is_some() {
                return Err(de::Error::custom(format!("duplicate key {shown}")));
            }
        }
        Ok(Value::Mapping(mapping))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<Value, A::Error> {
        Err(de::Error::custom("YAML tags (`!tag`) are not supported"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_names_follow_the_documented_pattern() {
        for ok in ["a", "0", "iam-admin-grant", "db.drop_v2", &"a".repeat(64)] {
            assert!(is_valid_rule_name(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "A", "a b", "a/b", "é", &"a".repeat(65)] {
            assert!(!is_valid_rule_name(bad), "{bad}");
        }
    }

    #[test]
    fn ttl_accepts_humantime_within_seven_days() {
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("1d 12h"), Ok(129_600));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("7d 1s").is_err());
        assert!(parse_ttl("1500ms").is_err());
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn alias_expansion_is_bounded() {
        // Each level multiplies the previous one by 64: far beyond the node budget.
        let mut yaml = String::from("a: &a [x, x, x, x, x, x, x, x]\n");
        let mut previous = "a".to_owned();
        for level in 0..6 {
            let name = format!("l{level}");
            let refs = vec![format!("*{previous}"); 64].join(", ");
            yaml.push_str(&format!("{name}: &{name} [{refs}]\n"));
            previous = name;
        }
        let err = parse_file("bomb.yaml", &yaml).expect_err("must refuse");
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn duplicate_keys_and_tags_are_refused() {
        let dup = "rules:\n  - name: a\n    effect: allow\n    effect: deny\n";
        let err = parse_file("dup.yaml", dup).expect_err("duplicate key");
        assert!(err.to_string().contains("duplicate key `effect`"), "{err}");

        let tagged = "rules: !weird []\n";
        let err = parse_file("tag.yaml", tagged).expect_err("tag");
        assert!(err.to_string().contains("tags"), "{err}");
    }

    #[test]
    fn several_documents_are_refused() {
        let err = parse_file("two.yaml", "rules: []\n---\nrules: []\n").expect_err("two docs");
        assert!(err.to_string().contains("more than one document"), "{err}");
    }
}
