//! The follower's loop against an in-memory log and consumer: no disk, no server. Waits and
//! backoffs are a few milliseconds; only the grace test takes [`STOP_GRACE`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use chrono::Utc;

use super::*;

/// An in-memory [`Log`] that can be told to fail reads.
#[derive(Default)]
struct MemoryLog {
    events: Mutex<Vec<StoredEvent>>,
    cursors: Mutex<HashMap<String, u64>>,
    /// Every cursor save, in order.
    saves: Mutex<Vec<u64>>,
    /// Reads still to fail.
    failing_reads: AtomicUsize,
}

impl Log for MemoryLog {
    fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.cursors.lock().get(name).copied().unwrap_or(0))
    }

    fn read_after(
        &self,
        cursor: u64,
        visible: u64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if take_one(&self.failing_reads) {
            return Err(StoreError::Corrupt {
                sequence: cursor + 1,
                problem: "test damage".to_string(),
            });
        }
        Ok(self
            .events
            .lock()
            .iter()
            .filter(|e| e.sequence > cursor && e.sequence <= visible)
            .take(max)
            .cloned()
            .collect())
    }

    fn save_cursor(&self, name: &str, sequence: u64) -> Result<(), StoreError> {
        self.cursors.lock().insert(name.to_string(), sequence);
        self.saves.lock().push(sequence);
        Ok(())
    }
}

struct MemorySource {
    log: Arc<MemoryLog>,
    applied: watch::Sender<u64>,
}

impl Source for MemorySource {
    type Log = MemoryLog;

    fn log(&self) -> &Arc<MemoryLog> {
        &self.log
    }

    fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }
}

impl MemorySource {
    fn new() -> Arc<MemorySource> {
        Arc::new(MemorySource {
            log: Arc::default(),
            applied: watch::Sender::new(0),
        })
    }

    /// Appends events of `kinds` without making them visible.
    fn append(&self, kinds: &[&str]) {
        let mut events = self.log.events.lock();
        for kind in kinds {
            let sequence = events.len() as u64 + 1;
            events.push(StoredEvent {
                sequence,
                kind: kind.to_string(),
                time: Utc::now(),
                actor: "test".to_string(),
                action_id: None,
                payload: serde_json::Value::Null,
                prev_hash: [0; 32],
                hash: [0; 32],
            });
        }
    }

    /// Appends events of `kinds` and makes them visible.
    fn commit(&self, kinds: &[&str]) {
        self.append(kinds);
        let head = self.log.events.lock().len() as u64;
        self.applied.send_replace(head);
    }

    fn saves(&self) -> Vec<u64> {
        self.log.saves.lock().clone()
    }
}

/// What the test consumer saw and how it behaves.
#[derive(Default)]
struct Receiver {
    /// The sequences of each accepted item, in order.
    accepted: Mutex<Vec<Vec<u64>>>,
    attempts: AtomicUsize,
    /// While set, every attempt fails.
    down: AtomicBool,
    /// How long each attempt takes.
    delay: Mutex<Duration>,
    /// Items still to fail to build.
    failing_builds: AtomicUsize,
}

/// Hands over to a [`Receiver`]: one item per `notice` event, or, `whole_batch`, one item
/// for every batch with a `notice` in it.
struct TestConsumer {
    whole_batch: bool,
    receiver: Arc<Receiver>,
}

impl Consumer<MemorySource> for TestConsumer {
    type Item = Vec<u64>;
    type Error = String;

    async fn next_item(
        &mut self,
        _source: &MemorySource,
        events: &[StoredEvent],
    ) -> Result<Option<(usize, Vec<u64>)>, String> {
        if self.whole_batch {
            let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
            return Ok(events
                .iter()
                .any(|e| e.kind == "notice")
                .then(|| (events.len() - 1, sequences)));
        }
        let Some(index) = events.iter().position(|e| e.kind == "notice") else {
            return Ok(None);
        };
        if take_one(&self.receiver.failing_builds) {
            return Err("the record cannot be read back".to_string());
        }
        Ok(Some((index, vec![events[index].sequence])))
    }

    fn hand_over(&self, item: &Vec<u64>) -> impl Future<Output = Result<(), String>> + Send {
        let receiver = self.receiver.clone();
        let item = item.clone();
        async move {
            receiver.attempts.fetch_add(1, Ordering::SeqCst);
            let delay = *receiver.delay.lock();
            tokio::time::sleep(delay).await;
            if receiver.down.load(Ordering::SeqCst) {
                return Err("receiver down".to_string());
            }
            receiver.accepted.lock().push(item);
            Ok(())
        }
    }
}

fn settings(batch_events: usize) -> Settings {
    Settings {
        cursor: "test".to_string(),
        activity: "test delivery",
        batch_events,
        backoff: Backoff {
            first: Duration::from_millis(1),
            max: Duration::from_millis(4),
        },
    }
}

struct Running {
    receiver: Arc<Receiver>,
    progress: Arc<Progress>,
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Running {
    /// Stops the server and waits for the follower's task to end.
    async fn stop_within(&mut self, limit: Duration, what: &str) {
        self.stop.send_replace(true);
        tokio::time::timeout(limit, &mut self.task)
            .await
            .unwrap_or_else(|_| panic!("not ended: {what}"))
            .expect("does not panic");
    }
}

fn follow(source: &Arc<MemorySource>, whole_batch: bool, settings: Settings) -> Running {
    let receiver = Arc::new(Receiver::default());
    let (stop, stopping) = watch::channel(false);
    let consumer = TestConsumer {
        whole_batch,
        receiver: receiver.clone(),
    };
    let started = start(source.clone(), consumer, settings, stopping).expect("cursor reads");
    Running {
        receiver,
        progress: started.progress,
        task: started.task,
        stop,
    }
}

/// Waits (up to 5 s) until `condition` holds.
async fn until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[test]
fn backoff_doubles_up_to_its_longest_wait() {
    let backoff = Backoff {
        first: Duration::from_millis(200),
        max: Duration::from_secs(60),
    };
    let waits: Vec<Duration> =
        std::iter::successors(Some(backoff.first), |w| Some(backoff.after(*w)))
            .take(11)
            .collect();
    assert_eq!(waits[1], Duration::from_millis(400));
    assert_eq!(waits[8], Duration::from_millis(51_200));
    assert_eq!(waits[9], Duration::from_secs(60));
    assert_eq!(waits[10], Duration::from_secs(60));
}

#[tokio::test]
async fn items_are_handed_over_in_log_order_and_the_cursor_follows_each_one() {
    let source = MemorySource::new();
    source.commit(&["notice", "other", "notice"]);
    let running = follow(&source, false, settings(256));

    until("both notices accepted", || running.progress.through() == 3).await;
    assert_eq!(*running.receiver.accepted.lock(), vec![vec![1], vec![3]]);
    assert_eq!(source.saves(), vec![1, 3]);
}

#[tokio::test]
async fn the_cursor_moves_only_after_the_receiver_accepted() {
    let source = MemorySource::new();
    source.commit(&["notice"]);
    // The task first runs at the first await below (a current-thread runtime).
    let running = follow(&source, false, settings(256));
    running.receiver.down.store(true, Ordering::SeqCst);

    until("several failed attempts", || {
        running.progress.consecutive_failures() >= 3
    })
    .await;
    assert_eq!(running.progress.through(), 0);
    assert_eq!(
        running.progress.last_error().as_deref(),
        Some("receiver down")
    );
    assert!(source.saves().is_empty());

    running.receiver.down.store(false, Ordering::SeqCst);
    until("accepted once up", || running.progress.through() == 1).await;
    assert_eq!(source.saves(), vec![1]);
    assert_eq!(running.progress.consecutive_failures(), 0);
    assert_eq!(running.progress.last_error(), None);
}

#[tokio::test]
async fn events_no_item_stands_for_are_passed_over_at_the_end_of_the_batch() {
    let source = MemorySource::new();
    source.commit(&["other", "other"]);
    let running = follow(&source, false, settings(256));

    until("cursor past the batch", || running.progress.through() == 2).await;
    assert!(running.receiver.accepted.lock().is_empty());
    assert_eq!(source.saves(), vec![2]);
}

#[tokio::test]
async fn a_whole_batch_can_be_one_item_and_batches_are_bounded() {
    let source = MemorySource::new();
    source.commit(&["notice", "other", "other", "other", "notice"]);
    let running = follow(&source, true, settings(2));

    until("all batches accepted", || running.progress.through() == 5).await;
    assert_eq!(
        *running.receiver.accepted.lock(),
        vec![vec![1, 2], vec![5]],
        "the batch [3, 4] has no notice and is no item"
    );
    assert_eq!(source.saves(), vec![2, 4, 5]);
}

#[tokio::test]
async fn a_follower_starts_after_its_saved_cursor_and_waits_for_the_visible_head() {
    let source = MemorySource::new();
    source.commit(&["notice", "notice"]);
    source.log.cursors.lock().insert("test".to_string(), 1);
    source.append(&["notice"]);
    let running = follow(&source, false, settings(256));
    assert_eq!(running.progress.through(), 1);

    until("the visible notice accepted", || {
        running.progress.through() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(*running.receiver.accepted.lock(), vec![vec![2]]);

    source.applied.send_replace(3);
    until("the newly visible notice accepted", || {
        running.progress.through() == 3
    })
    .await;
    assert_eq!(*running.receiver.accepted.lock(), vec![vec![2], vec![3]]);
}

#[tokio::test]
async fn a_log_that_cannot_be_read_is_reported_and_read_again() {
    let source = MemorySource::new();
    source.log.failing_reads.store(1, Ordering::SeqCst);
    let mut slow_retry = settings(256);
    slow_retry.backoff.max = Duration::from_millis(200);
    source.commit(&["notice"]);
    let running = follow(&source, false, slow_retry);

    until("the failed read reported", || {
        running.progress.consecutive_failures() == 1
    })
    .await;
    let error = running.progress.last_error().unwrap_or_default();
    assert!(
        error.starts_with("the event log cannot be read: "),
        "{error}"
    );
    until("read again and accepted", || {
        running.progress.through() == 1
    })
    .await;
    assert_eq!(running.progress.consecutive_failures(), 0);
}

#[tokio::test]
async fn an_item_that_cannot_be_built_is_reported_and_built_again_never_skipped() {
    let source = MemorySource::new();
    source.commit(&["notice", "other", "notice"]);
    let mut slow_retry = settings(256);
    slow_retry.backoff.max = Duration::from_millis(200);
    let running = follow(&source, false, slow_retry);
    // The first build fails before anything is handed over (the task first runs at the
    // first await below): the cursor must not move past the event it stands for.
    running.receiver.failing_builds.store(1, Ordering::SeqCst);

    until("the failed build reported", || {
        running.progress.consecutive_failures() == 1
    })
    .await;
    assert_eq!(
        running.progress.last_error().as_deref(),
        Some("the record cannot be read back")
    );
    assert!(running.receiver.accepted.lock().is_empty());
    assert!(source.saves().is_empty(), "the cursor stayed where it was");
    until("both notices accepted", || running.progress.through() == 3).await;
    assert_eq!(*running.receiver.accepted.lock(), vec![vec![1], vec![3]]);
    assert_eq!(source.saves(), vec![1, 3]);
    assert_eq!(running.progress.consecutive_failures(), 0);
}

#[tokio::test]
async fn stopping_lets_the_item_in_flight_finish_then_ends_and_lets_go_of_the_source() {
    let source = MemorySource::new();
    source.commit(&["notice", "notice", "notice"]);
    let mut running = follow(&source, false, settings(256));
    *running.receiver.delay.lock() = Duration::from_millis(100);

    until("first attempt in flight", || {
        running.receiver.attempts.load(Ordering::SeqCst) == 1
    })
    .await;
    running
        .stop_within(Duration::from_secs(1), "ends within the grace")
        .await;

    assert_eq!(*running.receiver.accepted.lock(), vec![vec![1]]);
    assert_eq!(
        source.saves(),
        vec![1],
        "the accepted item is not sent again"
    );
    assert_eq!(
        running.receiver.attempts.load(Ordering::SeqCst),
        1,
        "nothing new is started once stopping"
    );
    assert_eq!(Arc::strong_count(&source), 1);
}

#[tokio::test]
async fn an_item_not_accepted_within_the_grace_is_handed_over_again_after_a_restart() {
    let source = MemorySource::new();
    source.commit(&["notice"]);
    let mut running = follow(&source, false, settings(256));
    *running.receiver.delay.lock() = STOP_GRACE * 2;

    until("attempt in flight", || {
        running.receiver.attempts.load(Ordering::SeqCst) == 1
    })
    .await;
    running
        .stop_within(
            STOP_GRACE + Duration::from_secs(1),
            "ends once the grace is over",
        )
        .await;
    assert!(running.receiver.accepted.lock().is_empty());
    assert!(source.saves().is_empty());

    let restarted = follow(&source, false, settings(256));
    until("handed over again", || restarted.progress.through() == 1).await;
    assert_eq!(*restarted.receiver.accepted.lock(), vec![vec![1]]);
}

#[tokio::test]
async fn stopping_ends_a_wait_for_the_head_or_for_a_retry_at_once() {
    let mut patient = settings(256);
    patient.backoff = Backoff {
        first: Duration::from_secs(60),
        max: Duration::from_secs(60),
    };

    let idle = MemorySource::new();
    let mut waiting = follow(&idle, false, patient.clone());
    waiting
        .stop_within(Duration::from_secs(1), "ends at once")
        .await;

    let source = MemorySource::new();
    source.commit(&["notice"]);
    let mut retrying = follow(&source, false, patient);
    retrying.receiver.down.store(true, Ordering::SeqCst);
    until("first attempt failed", || {
        retrying.progress.consecutive_failures() == 1
    })
    .await;
    retrying
        .stop_within(Duration::from_secs(1), "ends at once")
        .await;
    assert!(source.saves().is_empty());
}
