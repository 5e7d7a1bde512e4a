//! Compiling rule expressions: cheap text checks, the CEL parser, then a walk over the AST
//! that refuses what would fail or misbehave at run time, and finds the action-type guard
//! used by the index.
//!
//! The parser and the AST walk recurse, so they run on the dedicated compiler thread (see
//! `COMPILER_STACK_BYTES` in `mod.rs`). The AST depth limit here is what keeps *evaluation*,
//! which runs on the caller's thread, within an ordinary thread stack.

use cel::common::ast::{CallExpr, EntryExpr, Expr, IdedExpr, LiteralValue, SelectExpr, operators};
use cel::{Env, Program};

use super::error::RuleProblem;

/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4096;
/// Deepest bracket/parenthesis nesting accepted, checked on the text before parsing.
pub const MAX_BRACKET_DEPTH: usize = 32;
/// Deepest AST accepted. The interpreter recurses once per level; 32 levels stay well inside
/// a 2 MiB thread stack even in an unoptimised build.
pub const MAX_AST_DEPTH: usize = 32;
/// Deepest nesting of comprehension *bodies*: run time grows as input size to this power.
pub const MAX_COMPREHENSION_DEPTH: usize = 2;

/// The variables every expression may use, with the fields each one has.
const VARIABLES: [(&str, &[&str]); 4] = [
    ("principal", &["id", "kind", "groups", "authenticated_by"]),
    (
        "action",
        &["type", "resource", "environment", "parameters", "purpose"],
    ),
    ("task", &["task_id", "origin", "on_behalf_of", "labels"]),
    ("now", &[]),
];

/// A necessary condition on `action.type`, proven from a top-level conjunct of the rule.
/// When it does not hold the rule evaluates to `false` (CEL's `&&` is false as soon as one
/// side is false, even if the other side errors), so the rule can be skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TypeGuard {
    /// `action.type == "t"` or `action.type in ["t", ...]`.
    Exact(Vec<String>),
    /// `action.type.startsWith("p")`.
    Prefix(String),
}

impl TypeGuard {
    #[cfg(test)]
    pub(crate) fn admits(&self, action_type: &str) -> bool {
        match self {
            TypeGuard::Exact(types) => types.iter().any(|t| t == action_type),
            TypeGuard::Prefix(prefix) => action_type.starts_with(prefix.as_str()),
        }
    }
}

#[derive(Debug)]
pub(crate) struct CompiledExpression {
    pub program: Program,
    pub guard: Option<TypeGuard>,
}

/// Builds the environment rules are compiled and evaluated with: the CEL standard library
/// plus the strings extension (`lowerAscii`, `split`, ...).
pub(crate) fn environment() -> Result<Env, String> {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::strings)
        .map_err(|e| format!("cannot register the CEL strings extension: {e}"))?;
    Ok(env)
}

pub(crate) fn compile(env: &Env, source: &str) -> Result<CompiledExpression, RuleProblem> {
    if source.len() > MAX_EXPRESSION_BYTES {
        return Err(RuleProblem::ExpressionTooLong {
            len: source.len(),
            max: MAX_EXPRESSION_BYTES,
        });
    }
    if bracket_depth(source) > MAX_BRACKET_DEPTH {
        return Err(RuleProblem::NestingTooDeep {
            max: MAX_BRACKET_DEPTH,
        });
    }
    let program = env
        .compile(source)
        .map_err(|e| RuleProblem::CelSyntax(summarize_parse_error(&e.to_string())))?;
    Analyzer {
        env,
        bound: Vec::new(),
    }
    .walk(program.expression(), 1, 0)?;
    let guard = type_guard(program.expression());
    Ok(CompiledExpression { program, guard })
}

/// Keeps the `ERROR: <input>:line:col: message` lines of the parser's report and drops the
/// snippet/caret lines, so the error fits on one log line.
fn summarize_parse_error(report: &str) -> String {
    let lines: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("ERROR:"))
        .map(|l| l.trim_start_matches("ERROR: ").trim())
        .collect();
    if lines.is_empty() {
        report.trim().to_owned()
    } else {
        lines.join("; ")
    }
}

/// Deepest `(`/`[`/`{` nesting outside string literals. Errs on the side of counting: a
/// lexing mistake can only make it refuse, and the parser keeps its own recursion limit.
pub(crate) fn bracket_depth(source: &str) -> usize {
    let bytes = source.as_bytes();
    let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            quote @ (b'"' | b'\'') => {
                let raw = i > 0 && matches!(bytes[i - 1], b'r' | b'R');
                let triple = bytes.get(i..i + 3) == Some(&[quote, quote, quote][..]);
                let close_len = if triple { 3 } else { 1 };
                i += close_len;
                while i < bytes.len() {
                    if !raw && bytes[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if bytes[i] == quote
                        && (!triple || bytes.get(i..i + 3) == Some(&[quote, quote, quote][..]))
                    {
                        break;
                    }
                    i += 1;
                }
                i += close_len;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    deepest
}

/// Walks the AST once, refusing what cannot be right. `bound` holds the comprehension
/// variables in scope, innermost last.
struct Analyzer<'a> {
    env: &'a Env,
    bound: Vec<&'a str>,
}

impl<'a> Analyzer<'a> {
    /// `depth` is this node's depth (root = 1); `loops` is how many comprehension bodies
    /// enclose it.
    fn walk(&mut self, node: &'a IdedExpr, depth: usize, loops: usize) -> Result<(), RuleProblem> {
        if depth > MAX_AST_DEPTH {
            return Err(RuleProblem::ExpressionTooDeep { max: MAX_AST_DEPTH });
        }
        let next = depth + 1;
        match &node.expr {
            Expr::Literal(_) => Ok(()),
            Expr::Ident(name) => self.check_ident(name),
            Expr::Select(select) => {
                self.check_field(select)?;
                self.walk(&select.operand, next, loops)
            }
            Expr::Call(call) => self.walk_call(call, next, loops),
            Expr::List(list) => list
                .elements
                .iter()
                .try_for_each(|e| self.walk(e, next, loops)),
            Expr::Map(map) => map.entries.iter().try_for_each(|entry| match &entry.expr {
                EntryExpr::MapEntry(entry) => {
                    self.walk(&entry.key, next, loops)?;
                    self.walk(&entry.value, next, loops)
                }
                // The interpreter panics on this shape; the parser should never build it.
                EntryExpr::StructField(_) => Err(RuleProblem::Unsupported(
                    "struct field inside a map literal".to_owned(),
                )),
            }),
            Expr::Comprehension(c) => {
                let level = loops + 1;
                if level > MAX_COMPREHENSION_DEPTH {
                    return Err(RuleProblem::ComprehensionTooDeep {
                        max: MAX_COMPREHENSION_DEPTH,
                    });
                }
                self.walk(&c.iter_range, next, loops)?;
                self.walk(&c.accu_init, next, loops)?;
                let scope = self.bound.len();
                self.bound.push(&c.accu_var);
                self.walk(&c.result, next, loops)?;
                self.bound.push(&c.iter_var);
                if let Some(second) = &c.iter_var2 {
                    self.bound.push(second);
                }
                self.walk(&c.loop_cond, next, level)?;
                self.walk(&c.loop_step, next, level)?;
                self.bound.truncate(scope);
                Ok(())
            }
            Expr::Struct(s) => Err(RuleProblem::Unsupported(format!(
                "message literal `{}{{...}}`: no message types are declared",
                s.type_name
            ))),
            // The interpreter panics on this node; only a parser bug could produce it.
            Expr::Unspecified => Err(RuleProblem::Unsupported("incomplete expression".to_owned())),
        }
    }

    fn walk_call(
        &mut self,
        call: &'a CallExpr,
        next: usize,
        loops: usize,
    ) -> Result<(), RuleProblem> {
        // A caller-supplied regex would be compiled on every evaluation: a cheap way to
        // make the hot path slow. Only literal patterns are accepted.
        if call.func_name == "matches" {
            let pattern = if call.target.is_some() {
                call.args.first()
            } else {
                call.args.get(1)
            };
            if pattern.is_none_or(|p| string_literal(p).is_none()) {
                return Err(RuleProblem::Unsupported(
                    "matches() needs a string literal pattern".to_owned(),
                ));
            }
        }
        if let Some(target) = &call.target {
            // `strings.quote(x)` is a namespaced function, not a field of a variable.
            let namespace = matches!(&target.expr, Expr::Ident(ns) if ns == "strings")
                && call.func_name == "quote"
                && !self.is_bound("strings");
            if !namespace {
                self.walk(target, next, loops)?;
            }
        }
        call.args.iter().try_for_each(|a| self.walk(a, next, loops))
    }

    fn is_bound(&self, name: &str) -> bool {
        self.bound.contains(&name)
    }

    fn check_ident(&self, name: &str) -> Result<(), RuleProblem> {
        let known = self.is_bound(name)
            || VARIABLES.iter().any(|(variable, _)| *variable == name)
            // Type names (`int`, `string`, ...) for `type(x) == string`.
            || self.env.types().find_type(name).is_some();
        if known {
            Ok(())
        } else {
            Err(RuleProblem::UnknownVariable(name.to_owned()))
        }
    }

    /// `action.tpye` would fail on every evaluation; catch it at load instead.
    fn check_field(&self, select: &SelectExpr) -> Result<(), RuleProblem> {
        let Expr::Ident(root) = &select.operand.expr else {
            return Ok(());
        };
        if self.is_bound(root) {
            return Ok(());
        }
        let Some((variable, fields)) = VARIABLES.iter().find(|(v, _)| v == root) else {
            return Ok(());
        };
        if fields.contains(&select.field.as_str()) {
            return Ok(());
        }
        let known = if fields.is_empty() {
            "no fields, it is a timestamp".to_owned()
        } else {
            fields.join(", ")
        };
        Err(RuleProblem::UnknownField {
            variable: (*variable).to_owned(),
            field: select.field.clone(),
            known,
        })
    }
}

fn string_literal(node: &IdedExpr) -> Option<&str> {
    match &node.expr {
        Expr::Literal(LiteralValue::String(s)) => Some(s.inner()),
        _ => None,
    }
}

fn is_action_type(node: &IdedExpr) -> bool {
    matches!(&node.expr, Expr::Select(s)
        if !s.test && s.field == "type" && matches!(&s.operand.expr, Expr::Ident(v) if v == "action"))
}

/// The guard of the first top-level conjunct that is one of the recognised shapes.
pub(crate) fn type_guard(root: &IdedExpr) -> Option<TypeGuard> {
    let mut conjuncts = Vec::new();
    flatten_and(root, &mut conjuncts);
    conjuncts.into_iter().find_map(conjunct_guard)
}

/// The parser builds `a && b && c` as a balanced tree; collect its leaves in order.
fn flatten_and<'e>(node: &'e IdedExpr, out: &mut Vec<&'e IdedExpr>) {
    match &node.expr {
        Expr::Call(call)
            if call.func_name == operators::LOGICAL_AND
                && call.target.is_none()
                && call.args.len() == 2 =>
        {
            call.args.iter().for_each(|arg| flatten_and(arg, out));
        }
        _ => out.push(node),
    }
}

fn conjunct_guard(node: &IdedExpr) -> Option<TypeGuard> {
    let Expr::Call(call) = &node.expr else {
        return None;
    };
    match (
        call.func_name.as_str(),
        call.target.as_deref(),
        call.args.as_slice(),
    ) {
        (operators::EQUALS, None, [left, right]) => {
            let literal = if is_action_type(left) {
                string_literal(right)
            } else if is_action_type(right) {
                string_literal(left)
            } else {
                None
            }?;
            Some(TypeGuard::Exact(vec![literal.to_owned()]))
        }
        (operators::IN, None, [left, right]) if is_action_type(left) => {
            let Expr::List(list) = &right.expr else {
                return None;
            };
            if !list.optional_indices.is_empty() {
                return None;
            }
            let mut types = list
                .elements
                .iter()
                .map(|e| string_literal(e).map(str::to_owned))
                .collect::<Option<Vec<_>>>()?;
            types.sort();
            types.dedup();
            Some(TypeGuard::Exact(types))
        }
        ("startsWith", Some(target), [prefix]) if is_action_type(target) => {
            Some(TypeGuard::Prefix(string_literal(prefix)?.to_owned()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_ok(source: &str) -> CompiledExpression {
        let env = environment().expect("env");
        match compile(&env, source) {
            Ok(compiled) => compiled,
            Err(problem) => panic!("{source}: {problem}"),
        }
    }

    fn problem(source: &str) -> RuleProblem {
        let env = environment().expect("env");
        match compile(&env, source) {
            Ok(_) => panic!("{source} should not compile"),
            Err(problem) => problem,
        }
    }

    #[test]
    fn bracket_depth_ignores_brackets_inside_strings() {
        assert_eq!(bracket_depth("((a))"), 2);
        assert_eq!(bracket_depth(r#"a == "((((" && b[0]"#), 1);
        assert_eq!(bracket_depth(r#"a == 'it\'s (' && (b)"#), 1);
        assert_eq!(bracket_depth(r#"a == """ ( " ( """ && (b)"#), 1);
        assert_eq!(bracket_depth(r#"a == r"\" && ((b))"#), 2);
    }

    #[test]
    fn comprehension_variables_are_not_unknown() {
        compile_ok("principal.groups.exists(g, g == 'sre')");
        compile_ok("action.parameters.all(k, k != '' && action.parameters[k] != null)");
        compile_ok("[1, 2, 3].map(x, x > 1, x * 2).size() == 2");
        compile_ok("[1, 2].map(x, x * 2).exists(y, y > 3)");
        compile_ok("principal.groups.exists(g, [g].all(h, h == g))");
        // A bound variable may shadow a declared one, and then has any field.
        compile_ok("[{'x': 1}].exists(action, action.x == 1)");
    }

    #[test]
    fn unknown_variables_are_refused_even_next_to_comprehensions() {
        assert_eq!(
            problem("principal.groups.exists(g, g == h)"),
            RuleProblem::UnknownVariable("h".into())
        );
        // The iteration variable is out of scope after the comprehension.
        assert_eq!(
            problem("principal.groups.exists(g, true) && g == 'x'"),
            RuleProblem::UnknownVariable("g".into())
        );
        assert_eq!(
            problem("request.type == 'x'"),
            RuleProblem::UnknownVariable("request".into())
        );
    }

    #[test]
    fn type_names_and_namespaced_functions_are_not_variables() {
        compile_ok("type(action.parameters) == map");
        compile_ok("strings.quote(action.type) != ''");
    }

    #[test]
    fn misspelt_fields_of_declared_variables_are_refused() {
        assert!(matches!(
            problem("action.tpye == 'x'"),
            RuleProblem::UnknownField { field, .. } if field == "tpye"
        ));
        assert!(matches!(
            problem("has(task.label)"),
            RuleProblem::UnknownField { .. }
        ));
        assert!(matches!(
            problem("now.hour == 3"),
            RuleProblem::UnknownField { .. }
        ));
    }

    #[test]
    fn comprehensions_nest_at_most_two_deep() {
        compile_ok("[1].all(x, [2].exists(y, y > x))");
        assert_eq!(
            problem("[1].all(x, [2].exists(y, [3].exists(z, z > y)))"),
            RuleProblem::ComprehensionTooDeep { max: 2 }
        );
        // Chained comprehensions run one after the other: not nested.
        compile_ok("[1].map(x, x).map(y, y).map(z, z).exists(w, w > 0)");
    }

    #[test]
    fn hostile_shapes_are_refused_without_crashing() {
        let long = format!("action.type == '{}'", "a".repeat(MAX_EXPRESSION_BYTES));
        assert!(matches!(
            problem(&long),
            RuleProblem::ExpressionTooLong { .. }
        ));
        let parens = format!("{}true{}", "(".repeat(33), ")".repeat(33));
        assert_eq!(problem(&parens), RuleProblem::NestingTooDeep { max: 32 });
        let sum = format!("1{} > 0", " + 1".repeat(40));
        assert_eq!(problem(&sum), RuleProblem::ExpressionTooDeep { max: 32 });
        assert!(matches!(problem("Foo{a: 1}"), RuleProblem::Unsupported(_)));
        assert!(matches!(
            problem("action.type.matches(action.purpose)"),
            RuleProblem::Unsupported(_)
        ));
        compile_ok("action.type.matches('^db[.]')");
        assert!(matches!(
            problem("action.type =="),
            RuleProblem::CelSyntax(_)
        ));
    }

    fn guard(source: &str) -> Option<TypeGuard> {
        compile_ok(source).guard
    }

    #[test]
    fn guards_come_from_top_level_conjuncts_only() {
        assert_eq!(
            guard("action.type == 'db.drop'"),
            Some(TypeGuard::Exact(vec!["db.drop".into()]))
        );
        assert_eq!(
            guard("'db.drop' == action.type && action.environment == 'prod'"),
            Some(TypeGuard::Exact(vec!["db.drop".into()]))
        );
        assert_eq!(
            guard("action.purpose == 'x' || true && action.type in ['b', 'a', 'b']"),
            None,
            "the guard is under ||"
        );
        assert_eq!(
            guard(
                "action.environment == 'x' && action.resource != '' && action.type in ['b', 'a', 'b']"
            ),
            Some(TypeGuard::Exact(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            guard("action.purpose != '' && action.type.startsWith('iam.')"),
            Some(TypeGuard::Prefix("iam.".into()))
        );
        assert_eq!(guard("action.type == 'x' || action.type == 'y'"), None);
        assert_eq!(guard("!(action.type == 'x')"), None);
        assert_eq!(guard("action.type in ['x', action.resource]"), None);
        assert_eq!(guard("action.type.endsWith('.read')"), None);
        assert!(TypeGuard::Prefix("iam.".into()).admits("iam.role.grant"));
        assert!(!TypeGuard::Exact(vec!["a".into()]).admits("b"));
    }
}
