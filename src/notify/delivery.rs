//! Delivery: one [`follower`] of the event log per channel, with the channel's own durable
//! cursor, like the span exporter (`telemetry::export`).
//!
//! For each event that is a notification ([`super::event::trigger`]) the follower builds the
//! [`Notification`] against the action's current record and hands it to the channel,
//! retrying with exponential backoff until the channel accepts it. The cursor moves, and
//! is flushed, only after that. So:
//!
//! - a channel that is down loses nothing and blocks nothing but itself: decisions never
//!   wait for a delivery, and each channel has its own cursor (`notify-slack`,
//!   `notify-teams`, `notify-webhook:<name>`);
//! - memory is bounded: at most [`MAX_BATCH_EVENTS`] events and one notification are held;
//! - deliveries are in log order per channel; a delivery refused for good (a receiver
//!   answering 4xx forever) holds its channel back until it is fixed, and says so in the
//!   logs and `/status`, rather than being skipped;
//! - a notification can arrive twice: when the channel accepted it but the process died, or
//!   the cursor could not be saved, before the cursor moved. Receivers drop repeats by the
//!   delivery id (`<action id>/<log sequence>`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::event::{Notification, trigger};
use crate::ledger::Ledger;
use crate::ledger::follower::{self, Backoff, Consumer, Progress};
use crate::store::StoredEvent;

/// Events read per batch: bounds what a channel holds while its receiver is down.
pub const MAX_BATCH_EVENTS: usize = 256;

/// Backoff between failed attempts: doubling from the first to the last.
const BACKOFF: Backoff = Backoff {
    first: Duration::from_millis(200),
    max: Duration::from_secs(60),
};

/// Why one delivery attempt failed; retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeliveryError(pub String);

/// A place notifications go.
pub trait Channel: Send + Sync + 'static {
    /// The store cursor (and log name) of this channel.
    fn name(&self) -> &str;
    /// One attempt; `Ok` once the receiver accepted it.
    fn deliver(
        &self,
        notification: &Notification,
    ) -> impl Future<Output = Result<(), DeliveryError>> + Send;
}

/// Starts the follower for `channel`. It ends when `stopping` becomes true (a delivery in
/// flight gets [`follower::STOP_GRACE`]) and then lets go of the ledger.
pub fn start<C: Channel>(
    channel: C,
    ledger: Arc<Ledger>,
    stopping: watch::Receiver<bool>,
) -> Result<Arc<Progress>, crate::store::StoreError> {
    let name = channel.name().to_string();
    let settings = follower::Settings {
        cursor: name.clone(),
        activity: "notification delivery",
        batch_events: MAX_BATCH_EVENTS,
        backoff: BACKOFF,
    };
    let started = follower::start(ledger, Deliveries(channel), settings, stopping)?;
    let cursor = started.progress.through();
    tracing::info!(channel = name, cursor, "delivering notifications");
    Ok(started.progress)
}

/// A channel as a follower's consumer: one notification per event that is one.
struct Deliveries<C>(C);

impl<C: Channel> Consumer<Ledger> for Deliveries<C> {
    type Item = Notification;
    type Error = DeliveryError;

    async fn next_item(
        &mut self,
        ledger: &Ledger,
        events: &[StoredEvent],
    ) -> Result<Option<(usize, Notification)>, String> {
        for (index, stored) in events.iter().enumerate() {
            if let Some(notification) = notification(ledger, stored).await? {
                return Ok(Some((index, notification)));
            }
        }
        Ok(None)
    }

    fn hand_over(
        &self,
        notification: &Notification,
    ) -> impl Future<Output = Result<(), DeliveryError>> + Send {
        self.0.deliver(notification)
    }
}

/// The notification `stored` stands for, with its action's record as it is now. `Err`
/// when the record cannot be read back from the log (tried again later).
async fn notification(
    ledger: &Ledger,
    stored: &StoredEvent,
) -> Result<Option<Notification>, String> {
    let Some(trigger) = trigger(stored) else {
        return Ok(None);
    };
    let record = match ledger.action(&trigger.action_id).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            tracing::error!(sequence = stored.sequence, action_id = %trigger.action_id, "an event names an unknown action; not notified");
            return Ok(None);
        }
        Err(e) => {
            return Err(format!(
                "action {} (event {}) cannot be read back: {e}",
                trigger.action_id, stored.sequence
            ));
        }
    };
    Ok(Some(Notification {
        kind: trigger.kind,
        sequence: stored.sequence,
        at: stored.time,
        record,
        resolution: trigger.resolution,
    }))
}
