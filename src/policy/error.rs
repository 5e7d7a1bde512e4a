//! Load-time errors. Every message names the file, the rule (when there is one) and the
//! problem, because the person reading it is an operator whose deploy was just refused.

use std::path::PathBuf;

use crate::domain::Effect;

/// Why a policy set was refused at load. Names are quoted with `{:?}` so a hostile file or
/// rule name cannot inject line breaks into logs.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy directory {dir:?}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot read policy file {file:?}: {source}")]
    ReadFile {
        file: String,
        source: std::io::Error,
    },

    /// Loading zero files would silently fall back to the default for everything.
    #[error("no policy files (*.yaml) in {dir}")]
    NoPolicyFiles { dir: String },

    /// `.yml` files are refused rather than skipped, so a misnamed file cannot silently
    /// drop its rules.
    #[error("policy file {file:?} must be renamed to end in .yaml (only *.yaml files are loaded)")]
    WrongExtension { file: String },

    #[error("policy file name {file:?} is given twice")]
    DuplicateFileName { file: String },

    #[error("policy file {file:?} is {size} bytes, over the limit of {limit} bytes")]
    FileTooLarge { file: String, size: u64, limit: u64 },

    #[error("policy file {file:?} is not valid UTF-8")]
    NotUtf8 { file: String },

    /// YAML syntax, or a document the YAML reader refuses (tags, duplicate keys, too large
    /// once aliases are expanded). `line`/`column` are 1-based when the parser knows them;
    /// the message always carries them too.
    #[error("policy file {file:?}: YAML error: {message}")]
    Yaml {
        file: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },

    /// The file parses as YAML but its top level is not `rules:` / `default:`.
    #[error("policy file {file:?}: {problem}")]
    File { file: String, problem: String },

    #[error("policy file {file:?}, rule {rule:?}: {problem}")]
    Rule {
        file: String,
        rule: String,
        problem: RuleProblem,
    },

    #[error("policy file {file:?}, default: {problem}")]
    Default { file: String, problem: RuleProblem },

    #[error("duplicate rule name {rule:?}: defined in {first_file:?} and in {second_file:?}")]
    DuplicateRule {
        rule: String,
        first_file: String,
        second_file: String,
    },

    #[error(
        "policy files {first_file:?} and {second_file:?} both set `default`; at most one file may"
    )]
    DuplicateDefault {
        first_file: String,
        second_file: String,
    },

    /// The compiler thread could not start or crashed; never caused by file contents alone.
    #[error("policy compiler failed: {message}")]
    Internal { message: String },
}

/// What is wrong with one rule (or with the `default` block).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleProblem {
    /// Unknown field, missing required field, or a value of the wrong type (serde's words).
    #[error("{0}")]
    Schema(String),

    #[error("invalid rule name: it must match ^[a-z0-9][a-z0-9._-]{{0,63}}$")]
    InvalidName,

    #[error("expression is {len} bytes, over the limit of {max} bytes")]
    ExpressionTooLong { len: usize, max: usize },

    #[error("expression nests brackets or parentheses deeper than {max} levels")]
    NestingTooDeep { max: usize },

    #[error("expression nests deeper than {max} levels")]
    ExpressionTooDeep { max: usize },

    #[error("comprehensions (all/exists/exists_one/map/filter) are nested more than {max} deep")]
    ComprehensionTooDeep { max: usize },

    #[error("CEL syntax error: {0}")]
    CelSyntax(String),

    #[error(
        "unknown variable `{0}` (only principal, action, task, now and comprehension variables exist)"
    )]
    UnknownVariable(String),

    #[error("`{variable}` has no field `{field}` (it has: {known})")]
    UnknownField {
        variable: String,
        field: String,
        known: String,
    },

    #[error("unsupported expression: {0}")]
    Unsupported(String),

    #[error("`{field}` is only allowed when effect is require_approval, not {effect}")]
    NotForEffect { field: &'static str, effect: Effect },

    #[error("approvals must be between 1 and {max}, got {got}")]
    ApprovalsOutOfRange { got: u32, max: u32 },

    #[error("invalid ttl {ttl:?}: {reason}")]
    InvalidTtl { ttl: String, reason: String },

    #[error("invalid reviewer group {group:?}: {reason}")]
    InvalidGroup { group: String, reason: &'static str },
}
