//! Which rules can possibly match a given action type, so the hot path skips the rest.
//!
//! Built from each rule's [`TypeGuard`]; a rule without one is always a candidate. Skipping is
//! exact, not a heuristic: a rule whose guard rejects the type evaluates to `false`.

use std::collections::HashMap;

use super::compile::TypeGuard;

#[derive(Debug, Default)]
pub(crate) struct TypeIndex {
    /// Rules guarded by `action.type == t` / `in [...]`, keyed by `t`.
    by_type: HashMap<String, Vec<usize>>,
    /// Rules guarded by `action.type.startsWith(p)`.
    by_prefix: Vec<(String, usize)>,
    /// Rules with no recognised guard.
    always: Vec<usize>,
}

impl TypeIndex {
    /// `guards[i]` is the guard of rule `i`.
    pub(crate) fn build<'g>(guards: impl IntoIterator<Item = Option<&'g TypeGuard>>) -> Self {
        let mut index = TypeIndex::default();
        for (rule, guard) in guards.into_iter().enumerate() {
            match guard {
                None => index.always.push(rule),
                Some(TypeGuard::Exact(types)) => {
                    for t in types {
                        index.by_type.entry(t.clone()).or_default().push(rule);
                    }
                }
                Some(TypeGuard::Prefix(prefix)) => index.by_prefix.push((prefix.clone(), rule)),
            }
        }
        index
    }

    /// Indices of the rules to evaluate for `action_type`, ascending (= evaluation order).
    pub(crate) fn candidates(&self, action_type: &str) -> Vec<usize> {
        let exact = self.by_type.get(action_type).map_or(&[][..], Vec::as_slice);
        let mut rules = Vec::with_capacity(self.always.len() + exact.len() + 4);
        rules.extend_from_slice(&self.always);
        rules.extend_from_slice(exact);
        rules.extend(
            self.by_prefix
                .iter()
                .filter(|(prefix, _)| action_type.starts_with(prefix.as_str()))
                .map(|(_, rule)| *rule),
        );
        rules.sort_unstable();
        rules.dedup();
        rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_keep_rule_order_and_skip_other_types() {
        let guards = [
            Some(TypeGuard::Exact(vec![
                "db.drop".into(),
                "db.table.drop".into(),
            ])),
            None,
            Some(TypeGuard::Prefix("iam.".into())),
            Some(TypeGuard::Exact(vec!["iam.role.grant".into()])),
            Some(TypeGuard::Exact(vec![])),
        ];
        let index = TypeIndex::build(guards.iter().map(Option::as_ref));
        assert_eq!(index.candidates("db.drop"), vec![0, 1]);
        assert_eq!(index.candidates("iam.role.grant"), vec![1, 2, 3]);
        assert_eq!(index.candidates("iam.user.create"), vec![1, 2]);
        assert_eq!(index.candidates("deploy.apply"), vec![1]);
    }
}
