//! AwaitDecision waiters: one watch channel per action someone waits on.
//!
//! Ten thousand waiters cost ten thousand small receivers and no threads: the writer wakes
//! exactly the waiters of the actions a batch changed.

use std::collections::HashMap;

use parking_lot::Mutex;
use tokio::sync::watch;
use uuid::Uuid;

use crate::workflow::ActionStatus;

#[derive(Default)]
pub(super) struct Waiters {
    /// Entries exist only for pending actions someone waits on; they are removed when the
    /// action becomes final, which every pending action does (at the latest, it expires).
    by_action: Mutex<HashMap<Uuid, watch::Sender<ActionStatus>>>,
}

impl Waiters {
    pub(super) fn subscribe(
        &self,
        id: Uuid,
        current: ActionStatus,
    ) -> watch::Receiver<ActionStatus> {
        self.by_action
            .lock()
            .entry(id)
            .or_insert_with(|| watch::Sender::new(current))
            .subscribe()
    }

    /// Called by the writer after a batch, with the new status of every action it touched.
    /// One lock per batch, and nothing to do in the common case of nobody waiting.
    pub(super) fn notify(&self, changed: &[(Uuid, ActionStatus)]) {
        let mut by_action = self.by_action.lock();
        if by_action.is_empty() {
            return;
        }
        for (id, status) in changed {
            if let Some(sender) = by_action.get(id) {
                sender.send_replace(*status);
                if status.is_final() {
                    by_action.remove(id);
                }
            }
        }
    }

    pub(super) fn count(&self) -> usize {
        self.by_action
            .lock()
            .values()
            .map(watch::Sender::receiver_count)
            .sum()
    }
}
