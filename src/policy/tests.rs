//! Behaviour tests for the policy engine: loading, combination, failure modes, the type
//! index and the shipped policy set.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;

use super::compile::MAX_EXPRESSION_BYTES;
use super::context::MAX_PARAMETER_DEPTH;
use super::*;
use crate::domain::{ActionSpec, PrincipalKind, TaskContext};

// === helpers ===

fn agent() -> Principal {
    Principal {
        id: "agent:deployer".into(),
        kind: PrincipalKind::Agent,
        groups: vec!["automation".into()],
        authenticated_by: "development-header".into(),
    }
}

fn request(action_type: &str, environment: &str, parameters: serde_json::Value) -> ActionRequest {
    let parameters = match parameters {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    ActionRequest {
        action: ActionSpec {
            action_type: action_type.into(),
            resource: "res-1".into(),
            environment: environment.into(),
            parameters,
            purpose: "testing".into(),
        },
        task: TaskContext::default(),
        idempotency_key: String::new(),
    }
}

fn noon() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 4, 12, 0, 0)
        .single()
        .unwrap_or_default()
}

fn decide(set: &PolicySet, request: &ActionRequest) -> Decision {
    set.evaluate(&EvaluationInput {
        principal: &agent(),
        request,
        now: noon(),
    })
}

fn decide_type(
    set: &PolicySet,
    action_type: &str,
    env: &str,
    params: serde_json::Value,
) -> Decision {
    decide(set, &request(action_type, env, params))
}

fn sources(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files
        .iter()
        .map(|(name, contents)| ((*name).to_owned(), (*contents).to_owned()))
        .collect()
}

fn load(files: &[(&str, &str)]) -> PolicySet {
    match PolicySet::from_sources(&sources(files)) {
        Ok(set) => set,
        Err(e) => panic!("policy set should load: {e}"),
    }
}

fn load_error(files: &[(&str, &str)]) -> PolicyError {
    match PolicySet::from_sources(&sources(files)) {
        Ok(_) => panic!("policy set should be refused"),
        Err(e) => e,
    }
}

/// Asserts the error's message mentions every fragment (file, rule, problem).
fn assert_mentions(error: &PolicyError, fragments: &[&str]) {
    let message = error.to_string();
    for fragment in fragments {
        assert!(
            message.contains(fragment),
            "{fragment:?} missing from: {message}"
        );
    }
}

/// A one-rule file; `extra` is appended to the rule's mapping.
fn rule_yaml(name: &str, expression: &str, effect: &str, risk: &str, extra: &str) -> String {
    format!(
        "rules:\n  - name: {name}\n    expression: '{}'\n    effect: {effect}\n    risk: {risk}\n{extra}",
        expression.replace('\'', "''")
    )
}

fn names(decision: &Decision) -> Vec<&str> {
    decision
        .matched_rules
        .iter()
        .map(|m| m.name.as_str())
        .collect()
}

// === load errors ===

#[test]
fn yaml_syntax_error_names_the_file_line_and_column() {
    let err = load_error(&[("bad.yaml", "rules:\n  - name: a\n   effect: [unclosed\n")]);
    assert_mentions(&err, &["\"bad.yaml\"", "line"]);
    match err {
        PolicyError::Yaml { line, column, .. } => {
            assert!(line.is_some() && column.is_some(), "location known");
        }
        other => panic!("expected a YAML error, got {other}"),
    }
}

#[test]
fn unknown_field_in_a_rule_names_the_file_rule_and_field() {
    let yaml = rule_yaml("a-rule", "true", "allow", "low", "    severity: high\n");
    let err = load_error(&[("f.yaml", &yaml)]);
    assert_mentions(
        &err,
        &["\"f.yaml\"", "\"a-rule\"", "unknown field `severity`"],
    );
}

#[test]
fn unknown_top_level_and_default_fields_are_refused() {
    let err = load_error(&[("f.yaml", "rule: []\n")]);
    assert_mentions(&err, &["\"f.yaml\"", "unknown field `rule`"]);
    let err = load_error(&[(
        "d.yaml",
        "default:\n  effect: deny\n  risk: high\n  message: no\n",
    )]);
    assert_mentions(&err, &["\"d.yaml\"", "default", "unknown field `message`"]);
}

#[test]
fn each_required_field_is_reported_when_missing() {
    let full = [
        ("name", "name: r1"),
        ("expression", "expression: 'true'"),
        ("risk", "risk: low"),
        ("effect", "effect: allow"),
    ];
    for (missing, _) in full {
        let mut yaml = String::from("rules:\n  -\n");
        for (field, line) in full {
            if field != missing {
                yaml.push_str(&format!("    {line}\n"));
            }
        }
        let err = load_error(&[("m.yaml", &yaml)]);
        let rule = if missing == "name" { "#1" } else { "r1" };
        assert_mentions(
            &err,
            &["\"m.yaml\"", rule, &format!("missing field `{missing}`")],
        );
    }
}

#[test]
fn duplicate_rule_names_name_both_files() {
    let a = rule_yaml("same", "true", "allow", "low", "");
    let err = load_error(&[("b.yaml", &a), ("a.yaml", &a)]);
    assert_mentions(&err, &["\"same\"", "\"a.yaml\"", "\"b.yaml\""]);
    assert!(matches!(err, PolicyError::DuplicateRule { .. }));
}

#[test]
fn invalid_rule_names_are_refused() {
    for name in ["Upper", "-leading", "has space", &"x".repeat(65)] {
        let yaml = rule_yaml(&format!("'{name}'"), "true", "allow", "low", "");
        let err = load_error(&[("n.yaml", &yaml)]);
        assert_mentions(&err, &["\"n.yaml\"", name, "invalid rule name"]);
    }
}

#[test]
fn cel_syntax_errors_name_the_rule() {
    let yaml = rule_yaml("broken", "action.type == ", "allow", "low", "");
    let err = load_error(&[("s.yaml", &yaml)]);
    assert_mentions(&err, &["\"s.yaml\"", "\"broken\"", "CEL syntax error"]);
}

#[test]
fn unknown_variables_are_refused_but_comprehension_variables_are_not() {
    let yaml = rule_yaml("uses-request", "request.type == \"x\"", "allow", "low", "");
    let err = load_error(&[("v.yaml", &yaml)]);
    assert_mentions(
        &err,
        &[
            "\"v.yaml\"",
            "\"uses-request\"",
            "unknown variable `request`",
        ],
    );

    let yaml = rule_yaml(
        "sre-only",
        "principal.groups.exists(g, g == \"sre\") && action.parameters.all(k, k != \"\")",
        "deny",
        "high",
        "",
    );
    let set = load(&[("v.yaml", &yaml)]);
    assert_eq!(
        decide_type(&set, "x", "dev", json!({})).effect,
        Effect::RequireApproval
    );
}

#[test]
fn approval_fields_are_only_for_require_approval_rules() {
    for (field, line) in [
        ("approvals", "    approvals: 2\n"),
        ("groups", "    groups: [security]\n"),
        ("ttl", "    ttl: 30m\n"),
    ] {
        for effect in ["allow", "deny"] {
            let yaml = rule_yaml("misplaced", "true", effect, "low", line);
            let err = load_error(&[("e.yaml", &yaml)]);
            assert_mentions(
                &err,
                &["\"e.yaml\"", "\"misplaced\"", &format!("`{field}`"), effect],
            );
        }
    }
}

#[test]
fn approvals_must_be_between_one_and_ten() {
    for approvals in [0, 11] {
        let extra = format!("    approvals: {approvals}\n");
        let yaml = rule_yaml("count", "true", "require_approval", "low", &extra);
        let err = load_error(&[("a.yaml", &yaml)]);
        assert_mentions(
            &err,
            &[
                "\"a.yaml\"",
                "\"count\"",
                "approvals must be between 1 and 10",
            ],
        );
    }
}

#[test]
fn ttl_must_be_positive_and_at_most_seven_days() {
    for ttl in ["0s", "8d", "soon"] {
        let extra = format!("    ttl: {ttl}\n");
        let yaml = rule_yaml("wait", "true", "require_approval", "low", &extra);
        let err = load_error(&[("t.yaml", &yaml)]);
        assert_mentions(&err, &["\"t.yaml\"", "\"wait\"", "invalid ttl"]);
    }
}

#[test]
fn only_one_file_may_set_the_default() {
    let d = "default:\n  effect: require_approval\n  risk: medium\n";
    let err = load_error(&[("z.yaml", d), ("a.yaml", d)]);
    assert_mentions(&err, &["\"a.yaml\"", "\"z.yaml\"", "default"]);
    assert!(matches!(err, PolicyError::DuplicateDefault { .. }));
}

#[test]
fn overlong_expressions_are_refused() {
    let expression = format!("action.type == \"{}\"", "a".repeat(MAX_EXPRESSION_BYTES));
    let yaml = rule_yaml("long", &expression, "allow", "low", "");
    let err = load_error(&[("l.yaml", &yaml)]);
    assert_mentions(
        &err,
        &["\"l.yaml\"", "\"long\"", "over the limit of 4096 bytes"],
    );
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    let expression = format!("{}true{}", "(".repeat(33), ")".repeat(33));
    let yaml = rule_yaml("deep", &expression, "allow", "low", "");
    let err = load_error(&[("d.yaml", &yaml)]);
    assert_mentions(&err, &["\"d.yaml\"", "\"deep\"", "deeper than 32"]);
}

#[test]
fn hostile_expressions_within_the_byte_limit_load_or_fail_cleanly() {
    // Each of these crashes the CEL parser on a 2 MiB stack in a debug build; on the
    // compiler thread they must come back as ordinary errors (or load, if within limits).
    let cases = [
        format!("{}true{}", "(".repeat(32), ")".repeat(32)),
        format!("{}[true]{}", "[".repeat(31), "]".repeat(31)),
        format!("1{} > 0", "+1".repeat(2000)),
        format!("action{}", ".type".repeat(800)),
        format!("action.parameters{}", "[0]".repeat(1300)),
        format!("action.type{}", ".size()".repeat(500)),
        format!(
            "{}1{} > 0{}",
            "(".repeat(32),
            "+1".repeat(1900),
            ")".repeat(32)
        ),
        format!("{}true", "!".repeat(4000)),
        format!("true{}", " ? true : true".repeat(280)),
    ];
    for expression in cases {
        assert!(expression.len() <= MAX_EXPRESSION_BYTES);
        let yaml = rule_yaml("hostile", &expression, "allow", "low", "");
        if let Err(err) = PolicySet::from_sources(&sources(&[("h.yaml", &yaml)])) {
            assert_mentions(&err, &["\"h.yaml\"", "\"hostile\""]);
        }
    }
}

#[test]
fn the_deepest_accepted_expression_evaluates_on_a_small_stack() {
    // AST depth exactly 32: `>` over 28 nested additions over `action.parameters.n`
    // (three more levels). Plus two nested comprehensions, the deepest loops allowed.
    let sum = format!("action.parameters.n{} > 0", " + 1".repeat(28));
    let nested = "principal.groups.all(g, [g].exists(h, h.size() + 1 + 1 + 1 > 0))";
    let yaml = format!(
        "rules:\n  - name: deep-sum\n    expression: {sum}\n    effect: allow\n    risk: low\n  - name: deep-loops\n    expression: '{nested}'\n    effect: allow\n    risk: low\n"
    );
    let set = load(&[("deep.yaml", &yaml)]);
    let decision = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || decide_type(&set, "x", "dev", json!({"n": 1})))
        .map(|handle| handle.join());
    match decision {
        Ok(Ok(decision)) => {
            assert_eq!(decision.errors, vec![]);
            assert_eq!(names(&decision), vec!["deep-sum", "deep-loops"]);
        }
        _ => panic!("evaluation thread failed"),
    }
}

#[test]
fn comprehensions_nested_three_deep_are_refused() {
    let expression =
        "principal.groups.all(a, principal.groups.all(b, principal.groups.exists(c, a == c)))";
    let yaml = rule_yaml("loops", expression, "allow", "low", "");
    let err = load_error(&[("c.yaml", &yaml)]);
    assert_mentions(
        &err,
        &["\"c.yaml\"", "\"loops\"", "nested more than 2 deep"],
    );
}

#[test]
fn empty_sources_and_empty_files_are_refused() {
    assert!(matches!(
        PolicySet::from_sources(&[]),
        Err(PolicyError::NoPolicyFiles { .. })
    ));
    let err = load_error(&[("empty.yaml", "")]);
    assert_mentions(&err, &["\"empty.yaml\"", "empty"]);
    let err = load_error(&[("comment.yaml", "# nothing\n")]);
    assert_mentions(&err, &["\"comment.yaml\"", "empty"]);
}

#[test]
fn oversized_sources_are_refused() {
    let big = format!("# {}\nrules: []\n", "x".repeat(MAX_FILE_BYTES as usize));
    let err = load_error(&[("big.yaml", &big)]);
    assert_mentions(&err, &["\"big.yaml\"", "over the limit of 1048576 bytes"]);
}

// === load_dir ===

fn temp_dir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("tempdir: {e}"),
    }
}

fn write(dir: &std::path::Path, name: &str, contents: &str) {
    if let Err(e) = std::fs::write(dir.join(name), contents) {
        panic!("write {name}: {e}");
    }
}

#[test]
fn a_directory_without_yaml_files_is_refused() {
    let dir = temp_dir();
    write(dir.path(), "README.md", "# not a policy");
    write(dir.path(), ".hidden.yaml", "rules: []");
    let err = match PolicySet::load_dir(dir.path()) {
        Ok(_) => panic!("must refuse"),
        Err(e) => e,
    };
    assert!(matches!(err, PolicyError::NoPolicyFiles { .. }));
    assert_mentions(
        &err,
        &["no policy files", &dir.path().display().to_string()],
    );
}

#[test]
fn a_missing_directory_is_a_read_error() {
    let dir = temp_dir();
    let missing = dir.path().join("nope");
    assert!(matches!(
        PolicySet::load_dir(&missing),
        Err(PolicyError::ReadDir { .. })
    ));
}

#[test]
fn files_over_one_mebibyte_are_refused_before_reading() {
    let dir = temp_dir();
    let big = "#".repeat(MAX_FILE_BYTES as usize + 1);
    write(dir.path(), "big.yaml", &big);
    let err = match PolicySet::load_dir(dir.path()) {
        Ok(_) => panic!("must refuse"),
        Err(e) => e,
    };
    assert!(matches!(err, PolicyError::FileTooLarge { .. }));
    assert_mentions(&err, &["\"big.yaml\"", "1048577 bytes"]);
}

#[test]
fn yml_files_are_refused_rather_than_ignored() {
    let dir = temp_dir();
    write(
        dir.path(),
        "a.yaml",
        "default:\n  effect: deny\n  risk: low\n",
    );
    write(dir.path(), "b.yml", "rules: []\n");
    assert!(matches!(
        PolicySet::load_dir(dir.path()),
        Err(PolicyError::WrongExtension { .. })
    ));
}

#[test]
fn load_dir_and_from_sources_agree_on_the_version() {
    let dir = temp_dir();
    let rule = rule_yaml("r", "true", "allow", "low", "");
    write(dir.path(), "b.yaml", &rule);
    write(
        dir.path(),
        "a.yaml",
        "default:\n  effect: deny\n  risk: low\n",
    );
    write(dir.path(), "notes.txt", "ignored");
    let from_dir = match PolicySet::load_dir(dir.path()) {
        Ok(set) => set,
        Err(e) => panic!("{e}"),
    };
    let from_sources = load(&[
        ("a.yaml", "default:\n  effect: deny\n  risk: low\n"),
        ("b.yaml", &rule),
    ]);
    assert_eq!(from_dir.version(), from_sources.version());
    assert!(from_dir.version().starts_with("sha256:"));
    assert_eq!(from_dir.version().len(), "sha256:".len() + 64);
    assert_eq!(from_dir.rule_count(), 1);
    assert_eq!(from_dir.rule_names().collect::<Vec<_>>(), vec!["r"]);

    let changed = load(&[
        ("a.yaml", "default:\n  effect: deny\n  risk: high\n"),
        ("b.yaml", &rule),
    ]);
    assert_ne!(changed.version(), from_sources.version());
}

// === combination ===

/// Rules that match on `action.parameters.<flag> == true`, one per effect/shape.
fn combination_set() -> PolicySet {
    let yaml = r#"
rules:
  - name: allow-low
    expression: has(action.parameters.allow) && action.parameters.allow
    effect: allow
    risk: low
  - name: approve-medium
    expression: has(action.parameters.approve) && action.parameters.approve
    effect: require_approval
    risk: medium
    approvals: 2
    groups: [sre, dba]
    ttl: 2h
  - name: approve-high
    expression: has(action.parameters.approve2) && action.parameters.approve2
    effect: require_approval
    risk: high
    approvals: 3
    groups: [security, dba]
    ttl: 30m
  - name: approve-plain
    expression: has(action.parameters.plain) && action.parameters.plain
    effect: require_approval
    risk: low
  - name: deny-critical
    expression: has(action.parameters.deny) && action.parameters.deny
    effect: deny
    risk: critical
    message: never
default:
  effect: require_approval
  risk: low
  approvals: 4
  groups: [oncall]
  ttl: 10m
"#;
    load(&[("c.yaml", yaml)])
}

#[test]
fn deny_beats_require_approval_beats_allow() {
    let set = combination_set();
    let d = decide_type(
        &set,
        "x",
        "",
        json!({"allow": true, "approve": true, "deny": true}),
    );
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.risk, RiskLevel::Critical);
    assert_eq!(d.approvals_required, 0);
    assert!(d.reviewer_groups.is_empty());
    assert_eq!(d.ttl_seconds, None);
    assert_eq!(
        names(&d),
        vec!["allow-low", "approve-medium", "deny-critical"]
    );
    assert_eq!(d.matched_rules[2].message, "never");

    let d = decide_type(&set, "x", "", json!({"allow": true, "approve": true}));
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.risk, RiskLevel::Medium);

    let d = decide_type(&set, "x", "", json!({"allow": true}));
    assert_eq!(d.effect, Effect::Allow);
    assert_eq!(d.risk, RiskLevel::Low);
    assert_eq!(d.approvals_required, 0);
    assert!(!d.defaulted);
}

#[test]
fn approval_terms_combine_max_union_and_min() {
    let set = combination_set();
    let d = decide_type(
        &set,
        "x",
        "",
        json!({"approve": true, "approve2": true, "plain": true}),
    );
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.risk, RiskLevel::High);
    assert_eq!(d.approvals_required, 3);
    assert_eq!(d.reviewer_groups, vec!["dba", "security", "sre"]);
    assert_eq!(d.ttl_seconds, Some(30 * 60));
    assert!(!d.defaulted);
}

#[test]
fn a_require_approval_rule_without_approvals_needs_one() {
    let set = combination_set();
    let d = decide_type(&set, "x", "", json!({"plain": true}));
    assert_eq!(d.approvals_required, 1);
    assert!(d.reviewer_groups.is_empty());
    assert_eq!(d.ttl_seconds, None);
}

#[test]
fn the_default_applies_only_when_nothing_matched() {
    let set = combination_set();
    let d = decide_type(&set, "x", "", json!({}));
    assert!(d.defaulted);
    assert!(d.matched_rules.is_empty() && d.errors.is_empty());
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.risk, RiskLevel::Low);
    assert_eq!(d.approvals_required, 4);
    assert_eq!(d.reviewer_groups, vec!["oncall"]);
    assert_eq!(d.ttl_seconds, Some(600));
    assert_eq!(d.policy_version, set.version());
}

#[test]
fn without_a_default_block_the_builtin_default_fails_closed() {
    let set = load(&[("r.yaml", &rule_yaml("never", "false", "allow", "low", ""))]);
    let d = decide_type(&set, "x", "", json!({}));
    assert!(d.defaulted);
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.risk, RiskLevel::Medium);
    assert_eq!(d.approvals_required, 1);
    assert!(d.reviewer_groups.is_empty());
    assert_eq!(d.ttl_seconds, None);
}

#[test]
fn matched_rules_follow_file_order_then_rule_order() {
    let a = "rules:\n  - name: a2\n    expression: 'true'\n    effect: allow\n    risk: low\n  - name: a1\n    expression: 'true'\n    effect: allow\n    risk: low\n";
    let b = rule_yaml("b1", "true", "allow", "low", "");
    let set = load(&[("20-b.yaml", &b), ("10-a.yaml", a)]);
    assert_eq!(
        names(&decide_type(&set, "x", "", json!({}))),
        vec!["a2", "a1", "b1"]
    );
}

// === runtime errors fail closed ===

#[test]
fn an_errored_allow_rule_requires_approval_and_records_the_error() {
    let yaml = rule_yaml(
        "needs-role",
        "action.parameters.role == \"viewer\"",
        "allow",
        "low",
        "",
    );
    let set = load(&[("e.yaml", &yaml)]);
    let d = decide_type(&set, "x", "", json!({}));
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.approvals_required, 1);
    assert!(!d.defaulted);
    assert!(d.matched_rules.is_empty());
    assert_eq!(d.errors.len(), 1);
    assert_eq!(d.errors[0].rule, "needs-role");
    assert!(
        d.errors[0].message.contains("No such key: role"),
        "{}",
        d.errors[0].message
    );
}

#[test]
fn an_errored_deny_rule_still_denies() {
    let yaml = rule_yaml(
        "deny-big",
        "action.parameters.size > 10",
        "deny",
        "critical",
        "",
    );
    let set = load(&[("e.yaml", &yaml)]);
    let d = decide_type(&set, "x", "", json!({"size": "huge"}));
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.risk, RiskLevel::Critical);
    assert_eq!(d.errors.len(), 1);
    assert!(
        d.errors[0].message.contains("_>_"),
        "{}",
        d.errors[0].message
    );
}

#[test]
fn an_errored_require_approval_rule_keeps_its_approval_terms() {
    let extra = "    approvals: 2\n    groups: [security]\n    ttl: 15m\n";
    let yaml = rule_yaml(
        "guarded",
        "action.parameters.x.y == 1",
        "require_approval",
        "high",
        extra,
    );
    let set = load(&[("e.yaml", &yaml)]);
    let d = decide_type(&set, "x", "", json!({"x": 5}));
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.risk, RiskLevel::High);
    assert_eq!(d.approvals_required, 2);
    assert_eq!(d.reviewer_groups, vec!["security"]);
    assert_eq!(d.ttl_seconds, Some(900));
}

#[test]
fn a_non_bool_result_is_an_error() {
    let yaml = "rules:\n  - name: number\n    expression: '1 + 1'\n    effect: allow\n    risk: low\n  - name: text\n    expression: action.type\n    effect: allow\n    risk: low\n";
    let set = load(&[("n.yaml", yaml)]);
    let d = decide_type(&set, "x", "", json!({}));
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.errors.len(), 2);
    assert!(
        d.errors[0].message.contains("int, not bool"),
        "{}",
        d.errors[0].message
    );
    assert!(
        d.errors[1].message.contains("string, not bool"),
        "{}",
        d.errors[1].message
    );
}

#[test]
fn over_deep_parameters_make_every_candidate_rule_error() {
    let yaml = rule_yaml("harmless", "action.type == \"x\"", "allow", "low", "");
    let set = load(&[("p.yaml", &yaml)]);
    // The parameters map is level 1, so this is one level too many.
    let mut deep = json!(1);
    for _ in 0..MAX_PARAMETER_DEPTH + 1 {
        deep = json!({ "k": deep });
    }
    let d = decide_type(&set, "x", "", deep.clone());
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.errors.len(), 1);
    assert!(d.errors[0].message.contains("nested deeper than 32"));

    // One level less is fine.
    let serde_json::Value::Object(outer) = deep else {
        panic!("object")
    };
    let shallower = outer.get("k").cloned().unwrap_or_default();
    let d = decide_type(&set, "x", "", shallower);
    assert_eq!(d.effect, Effect::Allow, "{:?}", d.errors);
}

// === variables and numbers ===

#[test]
fn integral_json_numbers_compare_as_ints_and_others_as_doubles() {
    let yaml = r#"
rules:
  - name: more-than-three
    expression: action.parameters.replicas > 3
    effect: deny
    risk: high
  - name: exactly-three
    expression: action.parameters.replicas == 3 && type(action.parameters.replicas) == int
    effect: allow
    risk: low
  - name: fraction
    expression: type(action.parameters.ratio) == double && action.parameters.ratio < 1
    effect: allow
    risk: low
  - name: huge
    expression: type(action.parameters.huge) == double
    effect: allow
    risk: low
"#;
    let set = load(&[("n.yaml", yaml)]);
    // A Struct-sourced 3 arrives as 3.0; both spellings must behave as the integer 3.
    for replicas in [json!(3), json!(3.0)] {
        let params = json!({"replicas": replicas, "ratio": 0.5, "huge": 1e300});
        let d = decide_type(&set, "x", "", params);
        assert_eq!(d.errors, vec![]);
        assert_eq!(names(&d), vec!["exactly-three", "fraction", "huge"]);
    }
    let d = decide_type(
        &set,
        "x",
        "",
        json!({"replicas": 4, "ratio": 0.5, "huge": u64::MAX}),
    );
    assert_eq!(names(&d), vec!["more-than-three", "fraction", "huge"]);
}

#[test]
fn every_documented_variable_is_available() {
    let yaml = r#"
rules:
  - name: everything
    expression: >-
      principal.id == "agent:deployer" && principal.kind == "agent"
      && "automation" in principal.groups && principal.authenticated_by == "development-header"
      && action.type == "x" && action.resource == "res-1" && action.environment == "dev"
      && action.purpose == "testing" && action.parameters.list[1].name == "b"
      && action.parameters.nested.flag == true && action.parameters.none == null
      && task.task_id == "t-1" && task.origin == "ci" && task.on_behalf_of == "alice"
      && task.labels["team"] == "payments"
      && now == timestamp("2025-03-04T12:00:00Z") && now.getHours("UTC") == 12
      && double(action.parameters.n) * 1.5 == 4.5 && action.parameters.n < 3.5
    effect: allow
    risk: low
"#;
    let set = load(&[("v.yaml", yaml)]);
    let mut req = request(
        "x",
        "dev",
        json!({"list": [{"name": "a"}, {"name": "b"}], "nested": {"flag": true}, "none": null, "n": 3}),
    );
    req.task = TaskContext {
        task_id: "t-1".into(),
        origin: "ci".into(),
        on_behalf_of: "alice".into(),
        labels: BTreeMap::from([("team".to_owned(), "payments".to_owned())]),
    };
    let d = decide(&set, &req);
    assert_eq!(d.errors, vec![]);
    assert_eq!(names(&d), vec!["everything"]);
}

#[test]
fn a_comprehension_variable_shadows_the_request_variable_of_the_same_name() {
    let yaml = rule_yaml(
        "shadow",
        "[{\"type\": \"inner\"}].exists(action, action.type == \"inner\")",
        "allow",
        "low",
        "",
    );
    let set = load(&[("s.yaml", &yaml)]);
    let d = decide_type(&set, "outer", "", json!({}));
    assert_eq!(d.errors, vec![]);
    assert_eq!(names(&d), vec!["shadow"]);
}

// === type index ===

#[test]
fn an_indexed_rule_is_skipped_for_other_types_and_evaluated_for_its_own() {
    let yaml = r#"
rules:
  - name: by-type
    expression: action.type == "db.drop" && action.environment == "prod"
    effect: deny
    risk: critical
  - name: by-list
    expression: action.environment == "prod" && action.type in ["db.drop", "db.table.drop"]
    effect: deny
    risk: critical
  - name: by-prefix
    expression: action.type.startsWith("iam.") && action.environment == "prod"
    effect: require_approval
    risk: high
  - name: guard-under-or
    expression: action.type == "db.drop" || action.environment == "prod"
    effect: require_approval
    risk: high
"#;
    let set = load(&[("i.yaml", yaml)]);
    let rule_names = |action_type: &str| -> Vec<&str> {
        set.index
            .candidates(action_type)
            .into_iter()
            .filter_map(|i| set.rules.get(i).map(|r| r.name.as_str()))
            .collect()
    };
    assert_eq!(
        rule_names("db.drop"),
        vec!["by-type", "by-list", "guard-under-or"]
    );
    assert_eq!(
        rule_names("db.table.drop"),
        vec!["by-list", "guard-under-or"]
    );
    assert_eq!(
        rule_names("iam.role.grant"),
        vec!["by-prefix", "guard-under-or"]
    );
    assert_eq!(rule_names("deploy.apply"), vec!["guard-under-or"]);

    let d = decide_type(&set, "db.drop", "prod", json!({}));
    assert_eq!(names(&d), vec!["by-type", "by-list", "guard-under-or"]);
    assert_eq!(d.effect, Effect::Deny);
    let d = decide_type(&set, "deploy.apply", "prod", json!({}));
    assert_eq!(names(&d), vec!["guard-under-or"]);
}

/// Evaluates every rule, ignoring the index: the reference the index must agree with.
fn decide_without_index(set: &PolicySet, request: &ActionRequest) -> Decision {
    let principal = agent();
    let input = EvaluationInput {
        principal: &principal,
        request,
        now: noon(),
    };
    let mut combiner = Combiner::default();
    match context::Variables::new(&input) {
        Ok(variables) => {
            let mut ctx = cel::Context::with_env(Arc::clone(&set.env));
            ctx.set_variable_resolver(&variables);
            for rule in &set.rules {
                match evaluate::run(&rule.program, &ctx) {
                    Ok(true) => combiner.matched(&rule.name, &rule.message, &rule.outcome),
                    Ok(false) => {}
                    Err(message) => combiner.errored(&rule.name, message, &rule.outcome),
                }
            }
        }
        Err(context::ContextError(message)) => {
            for rule in &set.rules {
                combiner.errored(&rule.name, message.clone(), &rule.outcome);
            }
        }
    }
    combiner.finish(&set.default, &set.version)
}

// === the shipped policy set ===

fn shipped() -> PolicySet {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"));
    match PolicySet::load_dir(&dir) {
        Ok(set) => set,
        Err(e) => panic!("shipped policies must load: {e}"),
    }
}

/// A spread of requests over the shipped vocabulary, including awkward ones.
fn shipped_requests() -> Vec<ActionRequest> {
    let mut requests = Vec::new();
    for (action_type, env, params) in [
        ("storage.object.read", "production", json!({})),
        ("db.instance.describe", "prod", json!({})),
        ("iam.role.list", "production", json!({})),
        ("secret.value.read", "production", json!({})),
        ("secret.list", "production", json!({})),
        ("secret.rotate", "production", json!({})),
        ("secret.rotate", "staging", json!({})),
        ("secret.create", "", json!({})),
        ("iam.role.grant", "production", json!({"role": "admin"})),
        (
            "iam.role.grant",
            "production",
            json!({"role": "roles/Owner"}),
        ),
        ("iam.role.grant", "production", json!({"role": "viewer"})),
        ("iam.role.grant", "production", json!({})),
        ("iam.access_key.create", "production", json!({})),
        ("db.drop", "production", json!({})),
        ("db.table.drop", "PROD", json!({})),
        ("db.drop", "staging", json!({})),
        ("db.instance.create", "production", json!({})),
        ("db.instance.create", "dev", json!({})),
        (
            "data.export",
            "production",
            json!({"destination": "evil.example.net"}),
        ),
        (
            "data.export",
            "production",
            json!({"destination": "warehouse.example.com"}),
        ),
        ("data.export", "production", json!({})),
        ("deploy.apply", "production", json!({})),
        ("deploy.apply", "staging", json!({})),
        ("deploy.rollback", "staging", json!({})),
        ("frobnicate.widget", "production", json!({})),
        ("", "", json!({})),
    ] {
        requests.push(request(action_type, env, params));
    }
    requests
}

#[test]
fn every_shipped_file_loads() {
    let set = shipped();
    assert!(set.rule_count() >= 15, "{}", set.rule_count());
    assert!(set.version().starts_with("sha256:"));
}

#[test]
fn shipped_rules_never_error_on_ordinary_requests_and_the_index_changes_nothing() {
    let set = shipped();
    for req in shipped_requests() {
        let d = decide(&set, &req);
        assert_eq!(d.errors, vec![], "{}", req.action.action_type);
        assert_eq!(
            d,
            decide_without_index(&set, &req),
            "{}",
            req.action.action_type
        );
    }
}

#[test]
fn shipped_reads_are_allowed() {
    let set = shipped();
    for action_type in [
        "storage.object.read",
        "db.instance.describe",
        "iam.role.list",
        "deploy.status.watch",
    ] {
        let d = decide_type(&set, action_type, "production", json!({}));
        assert_eq!(d.effect, Effect::Allow, "{action_type}");
        assert_eq!(d.risk, RiskLevel::Low);
        assert_eq!(names(&d), vec!["read-only-actions"]);
    }
}

#[test]
fn shipped_secret_value_reads_need_security() {
    let set = shipped();
    let d = decide_type(&set, "secret.value.read", "production", json!({}));
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.risk, RiskLevel::High);
    assert_eq!(d.reviewer_groups, vec!["security"]);
    assert_eq!(names(&d), vec!["secret-value-read"]);

    let d = decide_type(&set, "secret.list", "production", json!({}));
    assert_eq!(d.effect, Effect::Allow);
}

#[test]
fn shipped_admin_grant_needs_two_security_reviewers() {
    let set = shipped();
    let d = decide_type(
        &set,
        "iam.role.grant",
        "production",
        json!({"role": "admin"}),
    );
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.risk, RiskLevel::Critical);
    assert_eq!(d.approvals_required, 2);
    assert_eq!(d.reviewer_groups, vec!["security"]);
    assert_eq!(d.ttl_seconds, Some(30 * 60));
    assert!(names(&d).contains(&"iam-admin-grant"));

    let d = decide_type(
        &set,
        "iam.role.grant",
        "production",
        json!({"role": "viewer"}),
    );
    assert_eq!(
        (d.effect, d.risk, d.approvals_required),
        (Effect::RequireApproval, RiskLevel::High, 1)
    );
    assert_eq!(d.reviewer_groups, vec!["security"]);
    assert_eq!(names(&d), vec!["iam-privilege-change"]);

    // No role at all: still a privilege change, and no error from the admin rule.
    let d = decide_type(&set, "iam.role.grant", "production", json!({}));
    assert_eq!(
        (d.effect, d.risk),
        (Effect::RequireApproval, RiskLevel::High)
    );
    assert_eq!(d.errors, vec![]);

    // A role that is not a string cannot dodge the admin rule: it errors, failing closed.
    let d = decide_type(
        &set,
        "iam.role.grant",
        "production",
        json!({"role": ["admin"]}),
    );
    assert_eq!((d.risk, d.approvals_required), (RiskLevel::Critical, 2));
    assert_eq!(d.errors.len(), 1);
}

#[test]
fn shipped_production_database_drop_is_denied() {
    let set = shipped();
    for (action_type, env) in [
        ("db.drop", "production"),
        ("db.instance.delete", "prod"),
        ("db.table.drop", "Production"),
    ] {
        let d = decide_type(&set, action_type, env, json!({}));
        assert_eq!(d.effect, Effect::Deny, "{action_type} {env}");
        assert_eq!(d.risk, RiskLevel::Critical);
        assert_eq!(names(&d), vec!["production-database-drop"]);
        assert!(d.matched_rules[0].message.contains("snapshot"));
    }
    let d = decide_type(&set, "db.drop", "staging", json!({}));
    assert_eq!(
        (d.effect, d.risk),
        (Effect::RequireApproval, RiskLevel::High)
    );
    assert_eq!(d.reviewer_groups, vec!["dba"]);
}

#[test]
fn shipped_database_creation_depends_on_environment() {
    let set = shipped();
    let d = decide_type(&set, "db.instance.create", "production", json!({}));
    assert_eq!(
        (d.effect, d.risk),
        (Effect::RequireApproval, RiskLevel::High)
    );
    assert_eq!(d.reviewer_groups, vec!["dba"]);
    let d = decide_type(&set, "db.instance.create", "", json!({}));
    assert_eq!(
        d.effect,
        Effect::RequireApproval,
        "unknown environment counts as production"
    );
    let d = decide_type(&set, "db.instance.create", "dev", json!({}));
    assert_eq!((d.effect, d.risk), (Effect::Allow, RiskLevel::Medium));
}

#[test]
fn shipped_external_exports_need_security_and_data_governance() {
    let set = shipped();
    for params in [
        json!({"destination": "bucket.evil.net"}),
        json!({"destination": "evil-example.com"}),
        json!({"destination": "example.com.evil.net"}),
        json!({}),
    ] {
        let d = decide_type(&set, "data.export", "production", params.clone());
        assert_eq!(
            (d.effect, d.risk),
            (Effect::RequireApproval, RiskLevel::Critical),
            "{params}"
        );
        assert_eq!(d.reviewer_groups, vec!["data-governance", "security"]);
        assert_eq!(names(&d), vec!["external-data-export"]);
    }
    let d = decide_type(
        &set,
        "data.export",
        "production",
        json!({"destination": "Warehouse.Example.com"}),
    );
    assert_eq!(
        (d.effect, d.risk),
        (Effect::RequireApproval, RiskLevel::Medium)
    );
    assert_eq!(d.reviewer_groups, vec!["data-governance"]);
    assert_eq!(names(&d), vec!["internal-data-export"]);
}

#[test]
fn shipped_secret_changes_need_review() {
    let set = shipped();
    let d = decide_type(&set, "secret.rotate", "production", json!({}));
    assert_eq!(
        (d.effect, d.risk),
        (Effect::RequireApproval, RiskLevel::High)
    );
    assert_eq!(d.reviewer_groups, vec!["security"]);
    let d = decide_type(&set, "secret.delete", "staging", json!({}));
    assert_eq!(
        (d.effect, d.risk),
        (Effect::RequireApproval, RiskLevel::Medium)
    );
    assert_eq!(d.reviewer_groups, vec!["platform"]);
}

#[test]
fn shipped_deploys_to_sensitive_clusters_need_an_sre() {
    let set = shipped();
    let d = decide_type(&set, "deploy.apply", "production", json!({}));
    assert_eq!(
        (d.effect, d.risk),
        (Effect::RequireApproval, RiskLevel::High)
    );
    assert_eq!(d.reviewer_groups, vec!["sre"]);

    let d = decide_type(&set, "deploy.apply", "staging", json!({}));
    assert_eq!((d.effect, d.risk), (Effect::Allow, RiskLevel::Low));
    assert_eq!(names(&d), vec!["nonproduction-deploy"]);

    let mut to_payments = request("deploy.apply", "staging", json!({}));
    to_payments.action.resource = "payments".into();
    assert_eq!(decide(&set, &to_payments).effect, Effect::RequireApproval);

    let mut labelled = request("deploy.rollback", "staging", json!({}));
    labelled
        .task
        .labels
        .insert("sensitive".into(), "true".into());
    assert_eq!(decide(&set, &labelled).effect, Effect::RequireApproval);
}

#[test]
fn shipped_unknown_action_types_get_the_default() {
    let set = shipped();
    let d = decide_type(&set, "frobnicate.widget", "production", json!({}));
    assert!(d.defaulted);
    assert_eq!(
        (d.effect, d.risk, d.approvals_required),
        (Effect::RequireApproval, RiskLevel::Medium, 1)
    );
    assert!(d.matched_rules.is_empty());
}
