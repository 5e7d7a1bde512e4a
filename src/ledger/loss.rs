//! Accepting a known loss of events: `countersign log accept-loss`, run by an operator on a
//! stopped server's data directory after deciding to continue without the lost events
//! (no backup holds them, or the backup is older still).
//!
//! The acceptance is an event of the log itself, `log.loss_accepted`, right after the last
//! event that survived: who accepted, why, which numbers were lost and what showed it. Every
//! further number up to `--through` gets a `log.sequence_lost` event saying it was lost. So
//! no number ever names a different event without a record beside it, an auditor reading
//! the log meets the acceptance where the loss is, and new events continue after the lost
//! ones. Both kinds are audit-only: the workflow passes over them.

use std::path::Path;

use chrono::Utc;
use serde_json::json;

use crate::store::{EventLog, NewEvent, StoreError, grouped};

/// The kind of the event that records an accepted loss.
pub const LOSS_ACCEPTED: &str = "log.loss_accepted";
/// The kind of the events that stand for each further lost number.
pub const SEQUENCE_LOST: &str = "log.sequence_lost";

/// Longest reason an operator may give.
pub const MAX_REASON_CHARS: usize = 1024;

/// What `accept_loss` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedLoss {
    /// The first and last numbers marked lost (the acceptance takes the first).
    pub lost_from: u64,
    pub lost_through: u64,
    /// What showed the loss, as start-up reported it.
    pub evidence: String,
}

/// Accepts the loss the log in `data_dir` shows, through `through`. `operator` names who
/// accepts (recorded as the event's actor), `reason` why.
pub fn accept_loss(
    data_dir: &Path,
    through: u64,
    reason: &str,
    operator: &str,
) -> Result<AcceptedLoss, StoreError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS {
        return Err(StoreError::Acceptance(format!(
            "give a reason of 1 to {MAX_REASON_CHARS} characters"
        )));
    }
    let log = EventLog::open(data_dir)?;
    let Some(lost) = log.lost() else {
        return Err(StoreError::Acceptance(format!(
            "nothing shows a loss in {}: the log reaches every checkpoint, cursor and its head \
             witness (head {})",
            data_dir.display(),
            grouped(log.last_sequence())
        )));
    };
    let time = Utc::now();
    let actor = format!("operator:{operator}");
    let first = NewEvent {
        kind: LOSS_ACCEPTED.to_owned(),
        time,
        actor: actor.clone(),
        action_id: None,
        payload: json!({
            "lost_from": lost.from,
            "lost_through": through,
            "evidence": lost.problem,
            "reason": reason,
        }),
    };
    let accepted_at = lost.from;
    let marker = |sequence: u64| NewEvent {
        kind: SEQUENCE_LOST.to_owned(),
        time,
        actor: actor.clone(),
        action_id: None,
        payload: json!({ "sequence": sequence, "loss_accepted_at": accepted_at }),
    };
    log.accept_loss(through, first, marker)?;
    Ok(AcceptedLoss {
        lost_from: lost.from,
        lost_through: through,
        evidence: lost.problem,
    })
}
