//! The expiry timer: expires pending actions at their `expires_at`.
//!
//! One task for the whole server sleeps until the earliest expiry (or until the writer says
//! a sooner one may exist) and submits `Expire` commands through the ledger like anyone
//! else, so an expiry is decided, logged and published like every other change. At start-up
//! it expires at once whatever fell due while the server was down.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use parking_lot::RwLock;
use tokio::sync::{Notify, mpsc, oneshot};

use super::{Command, LedgerError};
use crate::workflow::{ActionCommand, Actions};

/// Upper bound on one sleep, so a clock step (NTP) delays an expiry by at most this much.
const MAX_SLEEP: Duration = Duration::from_secs(5);

/// How often the writer is asked to record the summaries of refusal windows that closed
/// (`workflow::refusals`): a summary lands at most this long after its minute is over.
const REFUSAL_SWEEP: Duration = Duration::from_secs(5);

/// Asks the writer every [`REFUSAL_SWEEP`] to record the summaries of repeated refusals
/// whose window has closed. Holds only a weak sender, as [`run`] does, and ends with the
/// ledger. A full queue skips a sweep: the next one records what this one would have.
pub(super) async fn sweep_refusals(commands: mpsc::WeakSender<Command>) {
    let mut ticks = tokio::time::interval(REFUSAL_SWEEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(sender) = commands.upgrade() else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Closed(_)) = sender.try_send(Command::Sweep) {
            return;
        }
    }
}

/// How long to wait before handing over more expiries when the writer's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(20);

pub(super) async fn run(
    state: Arc<RwLock<Actions>>,
    commands: mpsc::WeakSender<Command>,
    wakeup: Arc<Notify>,
) {
    loop {
        let now = Utc::now();
        let (due, next) = {
            let state = state.read();
            (state.due_for_expiry(now), state.next_expiry())
        };
        if !due.is_empty() {
            for action_id in due {
                let (reply, answer) = oneshot::channel();
                let command = Command::Act {
                    action_id,
                    command: ActionCommand::Expire,
                    time: now,
                    reply,
                };
                // A strong sender only for the moment of handing over, never across an
                // await: dropping the ledger joins the writer, which stops only once every
                // sender is gone, so a timer holding one while it waits (for queue space or
                // for the answer) would hang the stop for good.
                let handed = match commands.upgrade() {
                    Some(sender) => sender.try_send(command),
                    None => return,
                };
                match handed {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        // The writer is busy; the due list is read again after a pause.
                        tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
                match answer.await {
                    Ok(Err(
                        e @ (LedgerError::IntegrityFailure(_)
                        | LedgerError::Poisoned(_)
                        | LedgerError::WriteFailed(_)),
                    )) => {
                        // Writes stay refused until a restart, which expires everything due
                        // at once; until then nothing can be decided anyway (fail closed).
                        tracing::error!(%action_id, error = %e, "expiry stopped: the ledger refuses writes");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::error!(%action_id, error = %e, "could not expire a pending action");
                        tokio::time::sleep(MAX_SLEEP).await;
                    }
                    Ok(Ok(_)) => {}
                    Err(_) => return,
                }
            }
            continue;
        }
        let sleep = next
            .and_then(|(at, _)| (at - now).to_std().ok())
            .map_or(MAX_SLEEP, |d| d.min(MAX_SLEEP));
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = wakeup.notified() => {}
        }
        if commands.strong_count() == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use uuid::Uuid;

    use super::*;
    use crate::bench::{CheckPath, sample_check};
    use crate::policy::PolicySet;
    use crate::workflow::ActionEvent;
    use crate::workflow::record::EventContext;

    /// The state with one pending action that fell due a minute ago.
    fn one_due_action() -> (Arc<RwLock<Actions>>, Uuid) {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let policies = PolicySet::load_dir(&shipped).unwrap();
        let mut check = sample_check(&policies, CheckPath::Pending, 0).unwrap();
        check.evaluated.expires_at = Some(Utc::now() - chrono::Duration::minutes(1));
        let mut actions = Actions::default();
        let at = |sequence| EventContext {
            sequence,
            time: check.time,
            action_id: check.action_id,
        };
        let requested = ActionEvent::Requested(Box::new(check.requested));
        let evaluated = ActionEvent::Evaluated(Box::new(check.evaluated));
        actions.apply(at(1), &requested).unwrap();
        actions.apply(at(2), &evaluated).unwrap();
        assert_eq!(actions.due_for_expiry(Utc::now()), vec![check.action_id]);
        (Arc::new(RwLock::new(actions)), check.action_id)
    }

    /// The ledger's own sender must be the last: dropping the ledger joins the writer,
    /// which ends when the queue closes. With the server on one runtime thread, a timer
    /// holding a sender while it awaited the answer hung the stop for good.
    #[tokio::test]
    async fn waiting_for_the_writers_answer_the_timer_holds_no_sender() {
        let (state, due) = one_due_action();
        let (sender, mut queue) = mpsc::channel(4);
        let timer = tokio::spawn(run(state, sender.downgrade(), Arc::new(Notify::new())));

        let Some(Command::Act {
            action_id,
            command: ActionCommand::Expire,
            reply,
            ..
        }) = queue.recv().await
        else {
            panic!("the timer did not hand over an expiry");
        };
        assert_eq!(action_id, due);
        assert_eq!(sender.strong_count(), 1, "the timer kept a sender");
        drop(sender);
        assert!(queue.recv().await.is_none(), "the queue did not close");
        // A writer that stopped without answering ends the timer.
        drop(reply);
        timer.await.unwrap();
    }

    #[tokio::test]
    async fn with_the_queue_full_the_timer_holds_no_sender_and_hands_over_once_there_is_room() {
        let (state, due) = one_due_action();
        let (sender, mut queue) = mpsc::channel(1);
        let (filler_reply, _) = oneshot::channel();
        let filler = Command::Record {
            events: Vec::new(),
            reply: filler_reply,
        };
        sender.try_send(filler).unwrap();
        let timer = tokio::spawn(run(state, sender.downgrade(), Arc::new(Notify::new())));

        tokio::time::sleep(QUEUE_FULL_PAUSE * 3).await;
        assert_eq!(sender.strong_count(), 1, "the timer kept a sender");
        assert!(matches!(queue.recv().await, Some(Command::Record { .. })));
        let handed = tokio::time::timeout(Duration::from_secs(10), queue.recv()).await;
        assert!(
            matches!(handed, Ok(Some(Command::Act { action_id, .. })) if action_id == due),
            "the expiry was not handed over once the queue had room"
        );
        timer.abort();
    }
}
