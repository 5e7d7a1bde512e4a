//! Following the event log from a durable cursor: the one loop behind every reader that
//! hands the log on to something outside (the span exporter, each notification channel).
//!
//! A follower keeps a named cursor in the store (the last sequence it is done with). It
//! waits until the ledger has made events after the cursor visible, reads at most
//! [`Settings::batch_events`] of them, lets its [`Consumer`] turn them into items, and hands
//! each item over, retrying with [`Backoff`] until the consumer accepts it. The cursor moves,
//! and is flushed, only after that. So:
//!
//! - a receiver that is down loses nothing and blocks nothing but its own follower:
//!   decisions never wait for a follower, and each one has its own cursor;
//! - memory is bounded: one batch of events and the one item in hand;
//! - items are handed over in log order; one refused for good holds its follower back (and
//!   says so in the logs and [`Progress`]) rather than being skipped;
//! - an item can arrive twice: when the receiver accepted it but the cursor did not move
//!   (the process died first, the cursor could not be saved, or a stopping server gave up on
//!   an item still in flight after [`STOP_GRACE`]). Consumers make repeats recognisable.
//!
//! A follower never writes to the log (only its cursor) and never blocks the writer; it runs
//! as one task. It holds the ledger (its [`Source`]) strongly while it runs and lets go when
//! the server starts stopping: after the item in flight, if any, is accepted or its grace
//! ran out. The ledger knows nothing of what its followers feed; they come to it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::Ledger;
use crate::store::{EventLog, StoreError, StoredEvent};

/// How long a stopping server waits for an item in flight. One that is accepted within it
/// is not handed over again after the restart; one that is not, is.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// The durable part of what a follower reads: events and named cursors. Calls block (sled
/// reads and flushes); the follower makes them off the async workers.
pub trait Log: Send + Sync + 'static {
    /// The position saved under `name`; 0 when none.
    fn cursor(&self, name: &str) -> Result<u64, StoreError>;
    /// The events after `cursor`, up to `visible` and at most `max`, in order.
    fn read_after(
        &self,
        cursor: u64,
        visible: u64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// Saves the position under `name` durably.
    fn save_cursor(&self, name: &str, sequence: u64) -> Result<(), StoreError>;
}

/// What a follower follows: a [`Log`] and how far it is visible. The [`Ledger`] in the
/// server; a test may follow something smaller.
pub trait Source: Send + Sync + 'static {
    type Log: Log;
    fn log(&self) -> &Arc<Self::Log>;
    /// The sequence of the last visible event, changing as batches commit. A follower never
    /// reads beyond it, so it never hands on an event readers cannot see yet.
    fn watch_applied(&self) -> watch::Receiver<u64>;
}

/// What a follower hands the log to.
pub trait Consumer<S>: Send + Sync + 'static {
    /// What one attempt hands over.
    type Item: Send + Sync;
    /// Why an attempt failed; retried. Its text is shown as the follower's last error.
    type Error: std::fmt::Display + Send;

    /// The next item in `events` (what is left of a batch, in log order), built now, with
    /// the index in `events` of the last event it stands for; `None` when no event left
    /// stands for one. Called only once the item before it was accepted, so what the item
    /// shows of the state (an action's record) is as current as it can be. Events no item
    /// stands for are passed over: the cursor moves past them with the next item, or at the
    /// end of the batch. `Err` when the item cannot be built now (its action's record
    /// cannot be read back): it is reported, and the follower reads again from its cursor
    /// after a pause, so nothing is skipped. Async because building may read a record back
    /// from the log, which must not block the runtime.
    fn next_item(
        &mut self,
        source: &S,
        events: &[StoredEvent],
    ) -> impl Future<Output = Result<Option<(usize, Self::Item)>, String>> + Send;

    /// One attempt to hand `item` over; `Ok` once the receiver accepted it.
    fn hand_over(&self, item: &Self::Item) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// How long to wait after a failed attempt: doubling from `first`, capped at `max`. Each
/// user sets its own, for what its receiver tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after `wait`.
    pub fn after(&self, wait: Duration) -> Duration {
        wait.saturating_mul(2).min(self.max)
    }
}

/// What tells one follower from another.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The store cursor; also names the follower in logs.
    pub cursor: String,
    /// What the follower does, for log lines ("span export", "notification delivery").
    pub activity: &'static str,
    /// Events read (and held) per batch: bounds memory while a receiver is down.
    pub batch_events: usize,
    /// Between failed attempts. `max` is also the wait after the log could not be read.
    pub backoff: Backoff,
}

/// How far a follower has come; read by `/status` and metrics while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// The last log sequence the follower is done with (its cursor).
    through: AtomicU64,
    /// Failed attempts (and failed reads) since the cursor last moved.
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Progress {
    /// The last log sequence the follower is done with.
    pub fn through(&self) -> u64 {
        self.through.load(Ordering::Acquire)
    }

    pub fn consecutive_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    fn failed(&self, settings: &Settings, problem: &str) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let (cursor, activity) = (settings.cursor.as_str(), settings.activity);
        // Loud once, then at powers of two: a receiver down for hours must not flood logs.
        if failures == 1 || failures.is_power_of_two() {
            tracing::warn!(cursor, error = %problem, failures, "{activity} failed; retrying");
        } else {
            tracing::debug!(cursor, error = %problem, failures, "{activity} failed; retrying");
        }
        *self.last_error.lock() = Some(problem.to_string());
    }

    /// The cursor moved to `sequence`: whatever failed before is behind the follower.
    fn advanced(&self, settings: &Settings, sequence: u64) {
        self.through.store(sequence, Ordering::Release);
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            let (cursor, activity) = (settings.cursor.as_str(), settings.activity);
            tracing::info!(cursor, through = sequence, "{activity} recovered");
        }
        *self.last_error.lock() = None;
    }
}

/// A running follower.
#[derive(Debug)]
pub struct Started {
    /// Shared with the task; the cursor it started from until it moves.
    pub progress: Arc<Progress>,
    /// Ends when `stopping` becomes true (see [`start`]).
    pub task: tokio::task::JoinHandle<()>,
}

/// Reads the cursor and starts the follower's task. The task ends when `stopping` becomes
/// true, after letting an item in flight finish for up to [`STOP_GRACE`], and then lets go
/// of `source` and `consumer`.
pub fn start<S, C>(
    source: Arc<S>,
    consumer: C,
    settings: Settings,
    stopping: watch::Receiver<bool>,
) -> Result<Started, StoreError>
where
    S: Source,
    C: Consumer<S>,
{
    let cursor = source.log().cursor(&settings.cursor)?;
    let progress = Arc::new(Progress::default());
    progress.through.store(cursor, Ordering::Release);
    let mut follower = Follower {
        source,
        consumer,
        settings,
        progress: progress.clone(),
        stopping,
    };
    let task = tokio::spawn(async move { follower.follow().await });
    Ok(Started { progress, task })
}

/// What the follower's task owns; all of it is dropped when the task ends.
struct Follower<S, C> {
    source: Arc<S>,
    consumer: C,
    settings: Settings,
    progress: Arc<Progress>,
    stopping: watch::Receiver<bool>,
}

/// How handing one item over ended.
enum Handed {
    Accepted,
    /// Accepted within the grace of a stopping server: the follower ends after moving the
    /// cursor past it.
    AcceptedWhileStopping,
    /// The server stopped first; the item is handed over again after the restart.
    Stopped,
}

impl<S: Source, C: Consumer<S>> Follower<S, C> {
    /// The loop; returns when the server stops (or the ledger or runtime is gone).
    async fn follow(&mut self) {
        let mut applied = self.source.watch_applied();
        'reading: loop {
            let cursor = self.progress.through();
            // Wait until there is something after the cursor that readers may see.
            let visible = *applied.borrow_and_update();
            if visible <= cursor {
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    () = stopped(&mut self.stopping) => return,
                }
                continue;
            }
            let log = self.source.log().clone();
            let max = self.settings.batch_events;
            let read =
                tokio::task::spawn_blocking(move || log.read_after(cursor, visible, max)).await;
            let events = match read {
                Ok(Ok(events)) if !events.is_empty() => events,
                Ok(Ok(_)) => {
                    // Nothing readable although the position says otherwise: wait for news.
                    if self.pause(self.settings.backoff.max).await {
                        return;
                    }
                    continue;
                }
                Ok(Err(problem)) => {
                    let problem = format!("the event log cannot be read: {problem}");
                    self.progress.failed(&self.settings, &problem);
                    if self.pause(self.settings.backoff.max).await {
                        return;
                    }
                    continue;
                }
                // The reading thread was cancelled: the runtime is shutting down.
                Err(_) => return,
            };
            let last = events.last().map_or(cursor, |e| e.sequence);
            let mut rest = events.as_slice();
            loop {
                let (end, item) = match self.consumer.next_item(&self.source, rest).await {
                    Ok(Some(next)) => next,
                    Ok(None) => break,
                    Err(problem) => {
                        self.progress.failed(&self.settings, &problem);
                        if self.pause(self.settings.backoff.max).await {
                            return;
                        }
                        continue 'reading;
                    }
                };
                let end = end.min(rest.len() - 1);
                let through = rest[end].sequence;
                rest = &rest[end + 1..];
                match self.hand_over(&item).await {
                    Handed::Accepted => self.save_cursor(through).await,
                    Handed::AcceptedWhileStopping => {
                        self.save_cursor(through).await;
                        return;
                    }
                    Handed::Stopped => return,
                }
                if rest.is_empty() {
                    break;
                }
            }
            if self.progress.through() < last {
                self.save_cursor(last).await;
            }
        }
    }

    /// Hands `item` over until it is accepted or the server stops.
    async fn hand_over(&mut self, item: &C::Item) -> Handed {
        let mut backoff = self.settings.backoff.first;
        loop {
            let mut in_grace = false;
            let result = {
                let attempt = self.consumer.hand_over(item);
                tokio::pin!(attempt);
                tokio::select! {
                    result = &mut attempt => result,
                    () = stopped(&mut self.stopping) => {
                        // A graceful stop lets the attempt in flight finish (briefly), so
                        // that what the receiver accepted is not handed over again after
                        // the restart.
                        in_grace = true;
                        match tokio::time::timeout(STOP_GRACE, &mut attempt).await {
                            Ok(result) => result,
                            Err(_) => return Handed::Stopped,
                        }
                    }
                }
            };
            match result {
                Ok(()) if in_grace => return Handed::AcceptedWhileStopping,
                Ok(()) => return Handed::Accepted,
                Err(_) if in_grace => return Handed::Stopped,
                Err(e) => self.progress.failed(&self.settings, &e.to_string()),
            }
            if self.pause(backoff).await {
                return Handed::Stopped;
            }
            backoff = self.settings.backoff.after(backoff);
        }
    }

    /// Moves the cursor durably (the flush runs off the async workers). A cursor that cannot
    /// be saved means repeats after a restart, never a loss.
    async fn save_cursor(&self, sequence: u64) {
        let log = self.source.log().clone();
        let name = self.settings.cursor.clone();
        let saved = tokio::task::spawn_blocking(move || log.save_cursor(&name, sequence)).await;
        if let Ok(Err(e)) = saved {
            let cursor = self.settings.cursor.as_str();
            tracing::warn!(cursor, error = %e, "the cursor cannot be saved; what it passed may be handed over again after a restart");
        }
        self.progress.advanced(&self.settings, sequence);
    }

    /// Sleeps for `wait` unless the server stops first; `true` when it stops.
    async fn pause(&mut self, wait: Duration) -> bool {
        let stopped = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            () = stopped(&mut self.stopping) => true,
        };
        stopped || *self.stopping.borrow()
    }
}

/// Resolves when the server begins to stop (or is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

// === impl Log for EventLog, Source for Ledger ===

impl Log for EventLog {
    fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        EventLog::cursor(self, name)
    }

    fn read_after(
        &self,
        cursor: u64,
        visible: u64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.iter_from(cursor + 1)
            .take(max)
            .take_while(|e| e.as_ref().map_or(true, |e| e.sequence <= visible))
            .collect()
    }

    fn save_cursor(&self, name: &str, sequence: u64) -> Result<(), StoreError> {
        EventLog::save_cursor(self, name, sequence)
    }
}

impl Source for Ledger {
    type Log = EventLog;

    fn log(&self) -> &Arc<EventLog> {
        Ledger::log(self)
    }

    fn watch_applied(&self) -> watch::Receiver<u64> {
        Ledger::watch_applied(self)
    }
}

#[cfg(test)]
mod tests;
