//! Which refusals reach the log: the first of a kind at once, repeats counted.
//!
//! A refused vote or outcome report changes nothing, but is recorded for the auditors
//! (`review.refused`, `outcome.refused`) on the action it targeted. Being refused costs the
//! caller nothing, so without a bound one credential could make the log grow as fast as it
//! can send (2,780 self-approvals a second were measured, ~80 GB an hour). The discipline is
//! that of `access.denied` (`auth::denials`): the first refusal of a kind (event kind,
//! refused principal, action) is recorded at once; further ones within [`WINDOW`] of it are
//! only counted, and recorded as one summary event on the same action (its `repeats` say
//! how many and when) once the window has closed. At most [`MAX_OPEN`] kinds are tracked;
//! a new kind beyond that closes the oldest window early, recording its summary then. So
//! memory stays bounded, nothing counted is lost, and the log grows by at most two events
//! per principal, action and window, however fast the refusals come.
//!
//! Pure: time is passed in. The ledger's writer runs it on every decided command and
//! closes due windows when asked (a timer every few seconds, and at shutdown).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::events::{ActionEvent, Repeats};

/// How long further refusals of a kind are only counted after the first is recorded.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Kinds of refusal tracked at once; a new one beyond this closes the oldest window.
pub const MAX_OPEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    kind: &'static str,
    actor: String,
    action_id: Uuid,
}

/// The refusals of one kind since the first of the current window.
#[derive(Debug)]
struct Open {
    opened: DateTime<Utc>,
    /// The refusals after the first, counted, not yet recorded.
    summary: Option<Summary>,
}

/// Refusals counted together, to be recorded as one event on `action_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub action_id: Uuid,
    /// The refused principal, the event's actor.
    pub actor: String,
    /// The first repeat's event, with `repeats` set.
    pub event: ActionEvent,
}

impl Summary {
    /// How many refusals the summary stands for.
    pub fn count(&self) -> u64 {
        repeats(&self.event).map_or(0, |r| r.count)
    }
}

fn repeats(event: &ActionEvent) -> Option<&Repeats> {
    match event {
        ActionEvent::ReviewRefused(refused) => refused.repeats.as_ref(),
        ActionEvent::OutcomeRefused(refused) => refused.repeats.as_ref(),
        _ => None,
    }
}

fn repeats_mut(event: &mut ActionEvent) -> Option<&mut Option<Repeats>> {
    match event {
        ActionEvent::ReviewRefused(refused) => Some(&mut refused.repeats),
        ActionEvent::OutcomeRefused(refused) => Some(&mut refused.repeats),
        _ => None,
    }
}

/// What became of one decided command's events.
#[derive(Debug, Default, PartialEq)]
pub struct Filtered {
    /// To append now: every event that changes the action, and audit-only ones that are
    /// the first of their kind in a window.
    pub events: Vec<(String, ActionEvent)>,
    /// Summaries of windows closed early to make room; to append now too.
    pub closed_early: Vec<Summary>,
    /// The audit-only events seen, by kind, and whether each was recorded (`true`) or
    /// only counted (`false`): for metrics.
    pub seen: Vec<(&'static str, bool)>,
}

/// Decides which refusals become events; see the module documentation.
#[derive(Debug)]
pub struct RefusalAggregator {
    window: chrono::Duration,
    max_open: usize,
    open: HashMap<Key, Open>,
    /// The open windows' keys, oldest first: each key in `open` is here exactly once.
    order: VecDeque<Key>,
}

impl Default for RefusalAggregator {
    fn default() -> Self {
        RefusalAggregator::new(WINDOW, MAX_OPEN)
    }
}

impl RefusalAggregator {
    pub fn new(window: Duration, max_open: usize) -> RefusalAggregator {
        RefusalAggregator {
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            max_open: max_open.max(1),
            open: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Windows open right now.
    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Passes a decided command's events on action `action_id` at `at`, holding back the
    /// audit-only ones that repeat a refusal already recorded in the current window.
    pub fn filter(
        &mut self,
        action_id: Uuid,
        events: Vec<(String, ActionEvent)>,
        at: DateTime<Utc>,
    ) -> Filtered {
        let mut filtered = Filtered::default();
        for (actor, event) in events {
            if !event.is_audit_only() {
                filtered.events.push((actor, event));
                continue;
            }
            let kind = event.kind();
            let key = Key {
                kind,
                actor,
                action_id,
            };
            match self.open.get_mut(&key) {
                Some(open) => {
                    count(open, &key, event, at);
                    filtered.seen.push((kind, false));
                }
                None => {
                    if self.open.len() >= self.max_open {
                        filtered.closed_early.extend(self.close_oldest());
                    }
                    self.order.push_back(key.clone());
                    self.open.insert(
                        key.clone(),
                        Open {
                            opened: at,
                            summary: None,
                        },
                    );
                    filtered.events.push((key.actor, event));
                    filtered.seen.push((kind, true));
                }
            }
        }
        filtered
    }

    /// Closes the windows that ended by `now`, oldest first; returns their summaries (only
    /// those that counted anything after their first refusal). A window opened at a time
    /// the clock later went back behind waits at most one window longer.
    pub fn close_due(&mut self, now: DateTime<Utc>) -> Vec<Summary> {
        let mut due = Vec::new();
        while let Some(oldest) = self.order.front() {
            let opened = self.open.get(oldest).map(|open| open.opened);
            if opened.is_some_and(|opened| now.signed_duration_since(opened) < self.window) {
                break;
            }
            due.extend(self.close_oldest());
        }
        due
    }

    /// Closes every window (shutdown): nothing counted is lost.
    pub fn close_all(&mut self) -> Vec<Summary> {
        let mut all = Vec::new();
        while !self.order.is_empty() {
            all.extend(self.close_oldest());
        }
        all
    }

    fn close_oldest(&mut self) -> Option<Summary> {
        let key = self.order.pop_front()?;
        self.open.remove(&key)?.summary
    }
}

/// Counts one more refusal of an open window into its summary.
fn count(open: &mut Open, key: &Key, event: ActionEvent, at: DateTime<Utc>) {
    if let Some(summary) = &mut open.summary {
        if let Some(Some(repeats)) = repeats_mut(&mut summary.event) {
            repeats.count += 1;
            repeats.first_at = repeats.first_at.min(at);
            repeats.last_at = repeats.last_at.max(at);
        }
        return;
    }
    let mut event = event;
    if let Some(slot) = repeats_mut(&mut event) {
        *slot = Some(Repeats {
            count: 1,
            first_at: at,
            last_at: at,
        });
    }
    open.summary = Some(Summary {
        action_id: key.action_id,
        actor: key.actor.clone(),
        event,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Principal, PrincipalKind};
    use crate::workflow::{ActionExpired, Outcome, OutcomeRefused, ReviewRefused, Verdict};

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn refused(who: &str, reason: &str) -> (String, ActionEvent) {
        let reviewer = Principal {
            id: who.into(),
            kind: PrincipalKind::Human,
            groups: vec![],
            authenticated_by: "test".into(),
        };
        let event = ActionEvent::ReviewRefused(ReviewRefused {
            reviewer,
            verdict: Verdict::Approve,
            reason: reason.into(),
            reason_cut: None,
            refusal: format!("{who} requested this action and cannot review it"),
            repeats: None,
        });
        (who.to_string(), event)
    }

    fn late_outcome(who: &str) -> (String, ActionEvent) {
        let event = ActionEvent::OutcomeRefused(OutcomeRefused {
            reporter: who.into(),
            outcome: Outcome::Executed,
            details: String::new(),
            details_cut: None,
            refusal: "too late".into(),
            repeats: None,
        });
        (who.to_string(), event)
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn the_first_refusal_is_recorded_at_once_and_repeats_are_one_summary_when_the_window_closes() {
        let mut aggregator = RefusalAggregator::new(Duration::from_secs(60), 16);
        let first = aggregator.filter(id(1), vec![refused("alice", "first")], at(0));
        assert_eq!(first.events.len(), 1);
        assert_eq!(first.seen, [("review.refused", true)]);
        for n in 1..10_000 {
            let again = aggregator.filter(id(1), vec![refused("alice", "again")], at(n % 59));
            assert!(again.events.is_empty() && again.closed_early.is_empty());
            assert_eq!(again.seen, [("review.refused", false)]);
        }
        assert!(aggregator.close_due(at(59)).is_empty());
        let closed = aggregator.close_due(at(60));
        assert_eq!(closed.len(), 1);
        let summary = &closed[0];
        assert_eq!(
            (summary.action_id, summary.actor.as_str()),
            (id(1), "alice")
        );
        assert_eq!(summary.count(), 9_999);
        let ActionEvent::ReviewRefused(event) = &summary.event else {
            panic!("{summary:?}");
        };
        let repeats = event.repeats.as_ref().unwrap();
        assert_eq!((repeats.first_at, repeats.last_at), (at(0), at(58)));
        assert_eq!(event.reason, "again");
        assert_eq!(aggregator.open_windows(), 0);
        // A new window starts with a new immediate event.
        let next = aggregator.filter(id(1), vec![refused("alice", "later")], at(61));
        assert_eq!(next.events.len(), 1);
    }

    #[test]
    fn a_lone_refusal_leaves_no_summary() {
        let mut aggregator = RefusalAggregator::default();
        aggregator.filter(id(1), vec![refused("alice", "x")], at(0));
        assert!(aggregator.close_due(at(600)).is_empty());
        assert!(aggregator.close_all().is_empty());
    }

    #[test]
    fn kinds_are_told_apart_by_event_principal_and_action() {
        let mut aggregator = RefusalAggregator::default();
        for (action, event) in [
            (1, refused("alice", "x")),
            (2, refused("alice", "x")),
            (1, refused("bob", "x")),
            (1, late_outcome("alice")),
        ] {
            let filtered = aggregator.filter(id(action), vec![event], at(0));
            assert_eq!(filtered.events.len(), 1);
        }
        let repeat = aggregator.filter(id(2), vec![refused("alice", "y")], at(1));
        assert!(repeat.events.is_empty());
    }

    #[test]
    fn events_that_change_the_action_always_pass() {
        let mut aggregator = RefusalAggregator::default();
        let expired = (
            "countersign".to_string(),
            ActionEvent::Expired(ActionExpired { expires_at: at(0) }),
        );
        aggregator.filter(id(1), vec![refused("alice", "x")], at(0));
        let filtered =
            aggregator.filter(id(1), vec![expired.clone(), refused("alice", "x")], at(1));
        assert_eq!(filtered.events, [expired]);
    }

    #[test]
    fn past_the_limit_the_oldest_window_closes_early_and_nothing_is_lost() {
        let mut aggregator = RefusalAggregator::new(Duration::from_secs(60), 4);
        let mut recorded = 0;
        let mut summarized = 0;
        for n in 0..1000u128 {
            // Every action twice in a row: one recorded, one counted.
            for _ in 0..2 {
                let filtered = aggregator.filter(id(n), vec![refused("mallory", "x")], at(0));
                recorded += filtered.events.len() as u64;
                summarized += filtered
                    .closed_early
                    .iter()
                    .map(Summary::count)
                    .sum::<u64>();
            }
            assert!(aggregator.open_windows() <= 4);
        }
        summarized += aggregator
            .close_all()
            .iter()
            .map(Summary::count)
            .sum::<u64>();
        assert_eq!(recorded, 1000);
        assert_eq!(recorded + summarized, 2000);
    }
}
