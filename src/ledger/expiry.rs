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
            // A strong sender only while submitting: when the ledger is dropped the upgrade
            // fails and the timer ends, so it never keeps the writer alive.
            let Some(sender) = commands.upgrade() else {
                return;
            };
            for action_id in due {
                let (reply, answer) = oneshot::channel();
                let command = Command::Act {
                    action_id,
                    command: ActionCommand::Expire,
                    time: now,
                    reply,
                };
                if sender.send(command).await.is_err() {
                    return;
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
