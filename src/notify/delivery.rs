//! The delivery loop: one task per channel, reading the event log after the channel's own
//! durable cursor, like the span exporter (`telemetry::export`).
//!
//! For each event that is a notification ([`super::event::trigger`]) the loop builds the
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::event::{Notification, trigger};
use crate::ledger::Ledger;
use crate::store::{EventLog, StoredEvent};

/// Events read per batch.
pub const MAX_BATCH_EVENTS: usize = 256;

/// Backoff between failed attempts: doubling from the first to the last.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How long a stopping server waits for a delivery in flight.
const STOP_GRACE: Duration = Duration::from_secs(2);

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

/// How far one channel has come; shown by `/status`.
#[derive(Debug, Default)]
pub struct DeliveryProgress {
    delivered_through: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl DeliveryProgress {
    /// The last log sequence this channel is done with.
    pub fn delivered_through(&self) -> u64 {
        self.delivered_through.load(Ordering::Acquire)
    }

    pub fn consecutive_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    fn failed(&self, channel: &str, problem: &str) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        // Loud once, then at powers of two: a channel down for hours must not flood logs.
        if failures == 1 || failures.is_power_of_two() {
            tracing::warn!(channel, error = %problem, failures, "notification delivery failed; retrying");
        } else {
            tracing::debug!(channel, error = %problem, failures, "notification delivery failed; retrying");
        }
        *self.last_error.lock() = Some(problem.to_string());
    }

    fn succeeded(&self, channel: &str) {
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            tracing::info!(channel, "notification delivery recovered");
        }
        *self.last_error.lock() = None;
    }
}

/// Starts the loop for `channel`. It ends when `stopping` becomes true (a delivery in
/// flight gets [`STOP_GRACE`]) and then lets go of the ledger.
pub fn start<C: Channel>(
    channel: C,
    ledger: Arc<Ledger>,
    stopping: watch::Receiver<bool>,
) -> Result<Arc<DeliveryProgress>, crate::store::StoreError> {
    let cursor = ledger.log().cursor(channel.name())?;
    let progress = Arc::new(DeliveryProgress::default());
    progress.delivered_through.store(cursor, Ordering::Release);
    tracing::info!(channel = channel.name(), cursor, "delivering notifications");
    tokio::spawn(run(channel, ledger, progress.clone(), stopping));
    Ok(progress)
}

async fn run<C: Channel>(
    channel: C,
    ledger: Arc<Ledger>,
    progress: Arc<DeliveryProgress>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut applied = ledger.watch_applied();
    loop {
        let cursor = progress.delivered_through();
        let visible = *applied.borrow_and_update();
        if visible <= cursor {
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                () = stopped(&mut stopping) => return,
            }
            continue;
        }
        let log = ledger.log().clone();
        let events =
            match tokio::task::spawn_blocking(move || read_batch(&log, cursor, visible)).await {
                Ok(Ok(events)) if !events.is_empty() => events,
                Ok(Ok(_)) => {
                    if wait_or_stop(&mut stopping, MAX_BACKOFF).await {
                        return;
                    }
                    continue;
                }
                Ok(Err(problem)) => {
                    progress.failed(
                        channel.name(),
                        &format!("the event log cannot be read: {problem}"),
                    );
                    if wait_or_stop(&mut stopping, MAX_BACKOFF).await {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            };
        let last = events.last().map_or(cursor, |e| e.sequence);
        for stored in &events {
            let Some(notification) = notification(&ledger, stored) else {
                continue;
            };
            match deliver(&channel, &notification, &progress, &mut stopping).await {
                Delivered::Yes => {
                    save_cursor(&ledger, channel.name(), stored.sequence, &progress).await;
                }
                Delivered::Stopped => return,
            }
        }
        if progress.delivered_through() < last {
            save_cursor(&ledger, channel.name(), last, &progress).await;
        }
    }
}

enum Delivered {
    Yes,
    /// The server stopped first; the notification is delivered after the restart.
    Stopped,
}

async fn deliver<C: Channel>(
    channel: &C,
    notification: &Notification,
    progress: &DeliveryProgress,
    stopping: &mut watch::Receiver<bool>,
) -> Delivered {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let attempt = channel.deliver(notification);
        tokio::pin!(attempt);
        let mut stop_after = false;
        let result = tokio::select! {
            result = &mut attempt => result,
            () = stopped(stopping) => {
                stop_after = true;
                match tokio::time::timeout(STOP_GRACE, &mut attempt).await {
                    Ok(result) => result,
                    Err(_) => return Delivered::Stopped,
                }
            }
        };
        match result {
            Ok(()) => {
                progress.succeeded(channel.name());
                return Delivered::Yes;
            }
            Err(_) if stop_after => return Delivered::Stopped,
            Err(e) => progress.failed(channel.name(), &e.0),
        }
        if wait_or_stop(stopping, backoff).await {
            return Delivered::Stopped;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Moves the cursor durably (the flush runs off the async workers). A cursor that cannot
/// be saved means repeats after a restart, never a loss.
async fn save_cursor(ledger: &Ledger, name: &str, sequence: u64, progress: &DeliveryProgress) {
    let log = ledger.log().clone();
    let owned = name.to_string();
    let saved = tokio::task::spawn_blocking(move || log.save_cursor(&owned, sequence)).await;
    if let Ok(Err(e)) = saved {
        tracing::warn!(channel = name, error = %e, "the notification cursor cannot be saved");
    }
    progress
        .delivered_through
        .store(sequence, Ordering::Release);
}

/// The notification `stored` stands for, with its action's record as it is now.
fn notification(ledger: &Ledger, stored: &StoredEvent) -> Option<Notification> {
    let trigger = trigger(stored)?;
    let record = ledger.actions().get(&trigger.action_id).cloned();
    let Some(record) = record else {
        tracing::error!(sequence = stored.sequence, action_id = %trigger.action_id, "an event names an unknown action; not notified");
        return None;
    };
    Some(Notification {
        kind: trigger.kind,
        sequence: stored.sequence,
        at: stored.time,
        record,
        resolution: trigger.resolution,
    })
}

/// The events after `cursor`, up to `visible` and at most [`MAX_BATCH_EVENTS`].
fn read_batch(
    log: &EventLog,
    cursor: u64,
    visible: u64,
) -> Result<Vec<StoredEvent>, crate::store::StoreError> {
    log.iter_from(cursor + 1)
        .take(MAX_BATCH_EVENTS)
        .take_while(|e| e.as_ref().map_or(true, |e| e.sequence <= visible))
        .collect()
}

/// Resolves when the server begins to stop (or is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Sleeps for `wait` unless the server stops first; `true` when it stops.
async fn wait_or_stop(stopping: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    let stopped = tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = stopped(stopping) => true,
    };
    stopped || *stopping.borrow()
}
