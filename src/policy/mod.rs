//! The policy engine: decides whether a privileged action is allowed now, denied now, or
//! needs human approval, from CEL rules in YAML files.
//!
//! - [`PolicySet::load_dir`] reads every `*.yaml` in a directory (sorted by file name),
//!   validates and compiles it, and refuses the whole set on any problem: a server keeps
//!   running its previous set rather than a partial one.
//! - [`PolicySet::evaluate`] is pure and never panics. It runs the rules that can match the
//!   action type, combines them (strictest effect wins), and reports which rules matched and
//!   which errored. Errors fail closed.
//!
//! The policy language is documented for policy authors in `policies/README.md`.
//!
//! Module map: `file` (YAML shape, per-file validation), `compile` (expression checks, CEL
//! parsing, type guards), `index` (rules by action type), `context` (request → CEL
//! variables), `evaluate` (running rules, combining outcomes).

mod compile;
mod context;
pub mod error;
mod evaluate;
mod file;
mod index;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::domain::{ActionRequest, Effect, Principal, RiskLevel};
use evaluate::Combiner;
use file::MAX_FILE_BYTES;
use file::Outcome;
use index::TypeIndex;

pub use error::PolicyError;

/// Stack of the thread that parses and checks expressions. The CEL parser recurses deeply
/// (in a debug build a dozen nested parentheses exhaust a 2 MiB stack), so loading never runs
/// it on the caller's stack. Only touched pages are committed.
const COMPILER_STACK_BYTES: usize = 64 * 1024 * 1024;

/// A loaded, compiled, immutable set of rules. Share it through an `Arc`; reloading builds a
/// new set and swaps the `Arc`.
pub struct PolicySet {
    /// In evaluation order: file name order, then order within the file.
    rules: Vec<CompiledRule>,
    /// Applies when no rule matched or errored.
    default: Outcome,
    index: TypeIndex,
    /// The CEL functions rules were compiled against; every evaluation context refers to it.
    env: Arc<cel::Env>,
    version: String,
}

struct CompiledRule {
    name: String,
    message: String,
    outcome: Outcome,
    program: cel::Program,
}

// The server shares one set across all request tasks.
const _: fn() = || {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<PolicySet>();
};

/// One request to decide on.
#[derive(Debug, Clone, Copy)]
pub struct EvaluationInput<'a> {
    pub principal: &'a Principal,
    pub request: &'a ActionRequest,
    /// The evaluation time, passed in so evaluation stays pure; exposed to rules as `now`.
    pub now: chrono::DateTime<chrono::Utc>,
}

/// The outcome of evaluating a request, with the reasons that travel into the event log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    pub effect: Effect,
    pub risk: RiskLevel,
    /// At least 1 when `effect` is require_approval, otherwise 0.
    pub approvals_required: u32,
    /// Sorted, deduplicated union of the groups of the require_approval contributors; empty
    /// means any human reviewer. Empty unless `effect` is require_approval.
    pub reviewer_groups: Vec<String>,
    /// Shortest ttl among the require_approval contributors (or the default's, when it
    /// applied); `None` when none set one or `effect` is not require_approval.
    pub ttl_seconds: Option<u64>,
    /// In evaluation order (file order, then rule order).
    pub matched_rules: Vec<MatchedRule>,
    /// Rules whose expression failed at run time; each contributed as if matched, with its
    /// effect raised to at least require_approval.
    pub errors: Vec<RuleError>,
    /// True when no rule matched and none errored, so the default applied.
    pub defaulted: bool,
    pub policy_version: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MatchedRule {
    pub name: String,
    pub message: String,
    pub effect: Effect,
    pub risk: RiskLevel,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuleError {
    pub rule: String,
    /// The CEL error text, e.g. `No such key: role`.
    pub message: String,
}

impl PolicySet {
    /// Loads every `*.yaml` file in `dir` (not recursive). Names starting with `.` are
    /// skipped (editor files, the `..data` links of a Kubernetes ConfigMap mount); symlinks
    /// are followed; a `*.yml` file is refused so it cannot be silently ignored.
    ///
    /// Blocks on file I/O and on the compiler thread: from async code, call it through
    /// `spawn_blocking`.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        let read_dir_error = |source| PolicyError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
            let entry = entry.map_err(read_dir_error)?;
            let raw_name = entry.file_name();
            let shown = raw_name.to_string_lossy().into_owned();
            if shown.starts_with('.') {
                continue;
            }
            if shown.ends_with(".yml") {
                return Err(PolicyError::WrongExtension { file: shown });
            }
            if !shown.ends_with(".yaml") {
                continue;
            }
            let Some(name) = raw_name.to_str() else {
                return Err(PolicyError::NotUtf8 { file: shown });
            };
            let path = entry.path();
            let read_error = |source| PolicyError::ReadFile {
                file: name.to_owned(),
                source,
            };
            let metadata = std::fs::metadata(&path).map_err(read_error)?;
            if !metadata.is_file() {
                continue;
            }
            files.push((name.to_owned(), read_limited(name, &path, metadata.len())?));
        }
        if files.is_empty() {
            return Err(PolicyError::NoPolicyFiles {
                dir: dir.display().to_string(),
            });
        }
        PolicySet::from_sources(&files)
    }

    /// Pure constructor for tests: (file name, contents) pairs, in any order. Blocks while
    /// the compiler thread runs.
    pub fn from_sources(files: &[(String, String)]) -> Result<PolicySet, PolicyError> {
        on_compiler_thread(|| build(files))
    }

    /// `sha256:<hex>` over the sorted (file name, contents) pairs; identical files give
    /// an identical version wherever they are loaded from.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Rule names in evaluation order (file name order, then order within the file).
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|rule| rule.name.as_str())
    }

    /// Decides on one request. Pure, no I/O, never panics.
    pub fn evaluate(&self, input: &EvaluationInput<'_>) -> Decision {
        let candidates = self.index.candidates(&input.request.action.action_type);
        let rules = candidates.iter().filter_map(|&i| self.rules.get(i));
        let mut combiner = Combiner::default();
        if !candidates.is_empty() {
            match context::Variables::new(input) {
                Ok(variables) => {
                    let mut cel_context = cel::Context::with_env(Arc::clone(&self.env));
                    cel_context.set_variable_resolver(&variables);
                    for rule in rules {
                        match evaluate::run(&rule.program, &cel_context) {
                            Ok(true) => combiner.matched(&rule.name, &rule.message, &rule.outcome),
                            Ok(false) => {}
                            Err(message) => combiner.errored(&rule.name, message, &rule.outcome),
                        }
                    }
                }
                Err(context::ContextError(message)) => {
                    for rule in rules {
                        combiner.errored(&rule.name, message.clone(), &rule.outcome);
                    }
                }
            }
        }
        combiner.finish(&self.default, &self.version)
    }
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field(
                "rules",
                &self
                    .rules
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Reads at most `MAX_FILE_BYTES + 1` bytes, so a file growing after `stat` is still caught.
fn read_limited(name: &str, path: &Path, size: u64) -> Result<String, PolicyError> {
    let too_large = |size| PolicyError::FileTooLarge {
        file: name.to_owned(),
        size,
        limit: MAX_FILE_BYTES,
    };
    if size > MAX_FILE_BYTES {
        return Err(too_large(size));
    }
    let read_error = |source| PolicyError::ReadFile {
        file: name.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read_error)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|_| PolicyError::NotUtf8 {
        file: name.to_owned(),
    })
}

/// Runs `job` on a thread with [`COMPILER_STACK_BYTES`] of stack.
fn on_compiler_thread<T: Send>(
    job: impl FnOnce() -> Result<T, PolicyError> + Send,
) -> Result<T, PolicyError> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("policy-compiler".to_owned())
            .stack_size(COMPILER_STACK_BYTES)
            .spawn_scoped(scope, job)
            .map_err(|e| PolicyError::Internal {
                message: format!("cannot start the compiler thread: {e}"),
            })?;
        handle.join().unwrap_or_else(|_| {
            Err(PolicyError::Internal {
                message: "the compiler thread panicked".to_owned(),
            })
        })
    })
}

fn build(files: &[(String, String)]) -> Result<PolicySet, PolicyError> {
    if files.is_empty() {
        return Err(PolicyError::NoPolicyFiles {
            dir: "the given sources".to_owned(),
        });
    }
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(PolicyError::DuplicateFileName {
            file: pair[0].0.clone(),
        });
    }

    let env = compile::environment().map_err(|message| PolicyError::Internal { message })?;
    let mut rules = Vec::new();
    let mut guards = Vec::new();
    let mut defined_in: HashMap<String, &str> = HashMap::new();
    let mut default: Option<(&str, Outcome)> = None;

    for (file, contents) in sorted.iter().map(|pair| (pair.0.as_str(), pair.1.as_str())) {
        let parsed = file::parse_file(file, contents)?;
        if let Some(outcome) = parsed.default {
            if let Some((first_file, _)) = &default {
                return Err(PolicyError::DuplicateDefault {
                    first_file: (*first_file).to_owned(),
                    second_file: file.to_owned(),
                });
            }
            default = Some((file, outcome));
        }
        for rule in parsed.rules {
            if let Some(first_file) = defined_in.get(&rule.name) {
                return Err(PolicyError::DuplicateRule {
                    rule: rule.name,
                    first_file: (*first_file).to_owned(),
                    second_file: file.to_owned(),
                });
            }
            let compiled =
                compile::compile(&env, &rule.expression).map_err(|problem| PolicyError::Rule {
                    file: file.to_owned(),
                    rule: rule.name.clone(),
                    problem,
                })?;
            defined_in.insert(rule.name.clone(), file);
            guards.push(compiled.guard);
            rules.push(CompiledRule {
                name: rule.name,
                message: rule.message,
                outcome: rule.outcome,
                program: compiled.program,
            });
        }
    }

    Ok(PolicySet {
        rules,
        default: default.map_or_else(Outcome::builtin_default, |(_, outcome)| outcome),
        index: TypeIndex::build(guards.iter().map(Option::as_ref)),
        env: Arc::new(env),
        version: version_of(&sorted),
    })
}

/// Length-prefixed, so no two different file sets hash the same input stream.
fn version_of(sorted: &[&(String, String)]) -> String {
    let mut hasher = Sha256::new();
    for (name, contents) in sorted.iter().map(|pair| (&pair.0, &pair.1)) {
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((contents.len() as u64).to_le_bytes());
        hasher.update(contents.as_bytes());
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}
