//! The action state machine, as pure functions over events.
//!
//! Every change to an action is an [`ActionEvent`] in the log; an [`ActionRecord`] is only
//! ever built by applying those events in log order ([`Actions::apply`]). The same code
//! rebuilds the state at start-up and keeps it current while serving, so the two cannot
//! drift apart. Nothing here does I/O or reads the clock: time comes in as an argument.

mod check;
mod commands;
mod digest;
mod events;
pub mod record;
pub mod refusals;
mod status;

pub(crate) use check::after;
pub use check::{DecisionTimes, evaluate_check};
pub use commands::{ActionCommand, Decided, Refusal, SERVER_ACTOR, decide};
pub use digest::action_digest;
pub use events::{
    ActionApproved, ActionCancelled, ActionEvent, ActionExpired, ActionRejected, ActionRequested,
    CutText, EventDecodeError, EventSummary, KEPT_TEXT_BYTES, Outcome, OutcomeRefused,
    OutcomeReported, PolicyEvaluated, Repeats, ReviewRefused, ReviewVoted, Verdict, kept_text,
};
pub use record::{ActionRecord, Actions, ReportedOutcome, Vote};
pub use refusals::{RefusalAggregator, Summary};
pub use status::ActionStatus;
