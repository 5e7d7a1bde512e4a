//! Running the candidate rules against one request and combining what they say.
//!
//! Pure: no I/O, no clock, no randomness. A rule that errors never allows: it contributes
//! as if it matched, with its effect raised to at least require_approval.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};

use cel::common::types::CelBool;
use cel::{Context, Program, Value};

use super::file::Outcome;
use super::{Decision, MatchedRule, RuleError};
use crate::domain::{Effect, RiskLevel};

/// Runs one compiled expression. `Err` carries the text recorded in [`RuleError::message`].
pub(crate) fn run(program: &Program, context: &Context<'_, '_>) -> Result<bool, String> {
    // The interpreter is third-party code; a panic in it must not take the request (or the
    // server) down. It becomes a rule error, which fails closed.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        match Value::resolve_val(program.expression(), context) {
            Ok(value) => match value.downcast_ref::<CelBool>() {
                Some(b) => Ok(*b.inner()),
                None => Err(format!(
                    "expression evaluated to {}, not bool",
                    value.get_type().name()
                )),
            },
            Err(e) => Err(e.to_string()),
        }
    }));
    outcome.unwrap_or_else(|_| Err("the CEL interpreter panicked".to_owned()))
}

/// Everything the matching and errored rules said so far.
#[derive(Debug, Default)]
pub(crate) struct Combiner {
    effect: Option<Effect>,
    risk: RiskLevel,
    approvals: u32,
    groups: BTreeSet<String>,
    ttl_seconds: Option<u64>,
    matched: Vec<MatchedRule>,
    errors: Vec<RuleError>,
}

impl Combiner {
    pub(crate) fn matched(&mut self, name: &str, message: &str, outcome: &Outcome) {
        self.contribute(outcome.effect, outcome);
        self.matched.push(MatchedRule {
            name: name.to_owned(),
            message: message.to_owned(),
            effect: outcome.effect,
            risk: outcome.risk,
        });
    }

    pub(crate) fn errored(&mut self, name: &str, message: String, outcome: &Outcome) {
        self.contribute(outcome.effect.max(Effect::RequireApproval), outcome);
        self.errors.push(RuleError {
            rule: name.to_owned(),
            message,
        });
    }

    fn contribute(&mut self, effect: Effect, outcome: &Outcome) {
        self.effect = Some(self.effect.map_or(effect, |e| e.max(effect)));
        self.risk = self.risk.max(outcome.risk);
        if effect == Effect::RequireApproval {
            self.add_approval_terms(outcome);
        }
    }

    fn add_approval_terms(&mut self, outcome: &Outcome) {
        self.approvals = self.approvals.max(outcome.approvals.unwrap_or(1));
        self.groups.extend(outcome.groups.iter().cloned());
        if let Some(ttl) = outcome.ttl_seconds {
            self.ttl_seconds = Some(self.ttl_seconds.map_or(ttl, |t| t.min(ttl)));
        }
    }

    /// The decision; `default` applies only when no rule matched or errored.
    pub(crate) fn finish(mut self, default: &Outcome, policy_version: &str) -> Decision {
        let defaulted = self.effect.is_none();
        let effect = match self.effect {
            Some(effect) => effect,
            None => {
                self.risk = default.risk;
                if default.effect == Effect::RequireApproval {
                    self.add_approval_terms(default);
                }
                default.effect
            }
        };
        let (approvals_required, reviewer_groups, ttl_seconds) =
            if effect == Effect::RequireApproval {
                (
                    self.approvals.max(1),
                    self.groups.into_iter().collect(),
                    self.ttl_seconds,
                )
            } else {
                // Nobody reviews an allow or a deny.
                (0, Vec::new(), None)
            };
        Decision {
            effect,
            risk: self.risk,
            approvals_required,
            reviewer_groups,
            ttl_seconds,
            matched_rules: self.matched,
            errors: self.errors,
            defaulted,
            policy_version: policy_version.to_owned(),
        }
    }
}
