//! Checkpoints: the action state saved beside the log and bound into its chain, so start-up
//! reads only the events after the newest one instead of the whole log.
//!
//! Saving one (a thread of its own, see [`Checkpointer`]): the state is encoded under its
//! read lock and written, with the pending actions' events, to a file beside the log (see
//! [`EventLog::create_checkpoint`]); then an event `log.checkpointed` is appended through
//! the writer like any other. That event carries the SHA-256 of the
//! stored bytes and the hash of the last event they include, so the chain vouches for the
//! checkpoint: changing its bytes changes their digest, and changing the digest breaks the
//! chain. Only once that event is durable is the checkpoint adopted as the newest.
//!
//! Loading one ([`load`]): the event that vouches for it is read and its own hash checked,
//! the bytes are checked against its digest, and the state is restored; the ledger then
//! replays the events after it with every link checked, the vouching event among them. A
//! checkpoint that is missing, damaged or of another format only costs time: start-up
//! replays the whole log instead. A log that contradicts its checkpoint (the event that
//! vouches for it, or the one it was taken after, missing or different) is another matter:
//! the log lost or changed events, and the ledger refuses writes as for a failed verification.
//!
//! Format 1: the eight bytes `CSCKPT\0\x01`, then [`crate::workflow::record::SnapshotOf`]
//! and the events of the actions pending at the checkpoint (`Vec<(sequence, stored bytes)>`),
//! each encoded with postcard 1. Those events are kept verbatim so that start-up reads
//! nothing the checkpoint covers from the log itself: until the verification that runs
//! after start-up has passed, that part of the log is not trusted (see [`super::ChainGate`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use chrono::Utc;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::{ChainCheck, ChainGate, Command, Health, LedgerError};
use crate::store::{CheckpointRef, CheckpointWriter, EventLog, NewEvent, StoreError};
use crate::workflow::record::Snapshot;
use crate::workflow::{Actions, SERVER_ACTOR};

/// The kind of the event that vouches for a checkpoint.
pub const CHECKPOINTED: &str = "log.checkpointed";

/// Starts every stored checkpoint: a name, then the format version.
const MAGIC: &[u8; 8] = b"CSCKPT\0\x01";
const FORMAT: u32 = 1;

/// Save a checkpoint every this many events unless configured otherwise. Start-up after a
/// crash replays at most this many events on top of the newest checkpoint (50,707 took
/// 0.47–0.85 s on the 2-core machine of docs/performance.md); a clean stop saves one at the head.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 100_000;

/// The payload of `log.checkpointed`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Checkpointed {
    format: u32,
    /// The last event the checkpoint includes...
    covers_sequence: u64,
    /// ...and its hash, hex.
    covers_hash: String,
    /// SHA-256 of the stored bytes, hex.
    digest: String,
    bytes: u64,
    actions: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("the state does not encode: {0}")]
    Encode(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("event {0}, which the state includes, is not in the log")]
    Missing(u64),
    /// The log contradicts the checkpoint: events it was taken after, or the event that
    /// vouches for it, are missing or are no longer the ones they were. That is a log that
    /// lost events or was rewritten, not a damaged checkpoint.
    #[error(
        "the log contradicts the checkpoint of events up to {covers} (vouched for by event {event}): {problem}"
    )]
    Contradicted {
        covers: u64,
        event: u64,
        problem: String,
    },
    #[error("checkpoint of events up to {covers}, vouched for by event {event}: {problem}")]
    Unusable {
        covers: u64,
        event: u64,
        problem: String,
    },
}

/// A state read back from a checkpoint.
pub struct Restored {
    pub actions: Actions,
    /// The last event it includes, and that event's hash: replay continues from there.
    pub covers: u64,
    pub covers_hash: [u8; 32],
    /// The event that vouches for it.
    pub event: u64,
    /// The events of the actions pending at the checkpoint, as stored in the log (read
    /// them with [`EventLog::decode_stored`]).
    pub pending_events: HashMap<u64, Vec<u8>>,
}

/// A checkpoint saved, and what it cost.
struct Saved {
    covers: u64,
    bytes: u64,
    /// How long the state's read lock was held (the writer could not publish meanwhile).
    locked: std::time::Duration,
}

/// Encodes the state as it is now and stores it beside the log; returns it with the event
/// to append for it. `None` for an empty log.
fn save(
    log: &EventLog,
    state: &RwLock<Actions>,
) -> Result<Option<(Saved, NewEvent)>, CheckpointError> {
    let buffer = encoding_buffer(state.read().len());
    // The only time the writer waits: it cannot publish a batch while this reads the state.
    let locking = std::time::Instant::now();
    let (state_bytes, covers, actions, pending, locked) = {
        let state = state.read();
        let bytes = postcard::to_extend(&state.snapshot(), buffer)
            .map_err(|e| CheckpointError::Encode(e.to_string()))?;
        let pending = state.pending_sequences();
        let applied = state.applied_sequence();
        (bytes, applied, state.len(), pending, locking.elapsed())
    };
    if covers == 0 {
        return Ok(None);
    }
    let covers_hash = log
        .get(covers)?
        .ok_or(CheckpointError::Missing(covers))?
        .hash;
    // Then the events of the actions still pending, verbatim: start-up rebuilds them from
    // here, so it reads nothing from before the checkpoint until the whole chain has
    // verified. Written one at a time: never the whole checkpoint in memory.
    // A failure leaves a temporary file, removed when the next checkpoint is adopted.
    let mut out = Hashing::new(log.create_checkpoint(covers)?);
    out.write(&state_bytes)?;
    drop(state_bytes);
    // As postcard encodes a `Vec<(u64, Vec<u8>)>`: its length, then each element.
    out.write(&encode(&pending.len())?)?;
    for sequence in pending {
        let stored = log
            .stored_bytes(sequence)?
            .ok_or(CheckpointError::Missing(sequence))?;
        out.write(&encode(&(sequence, &stored[..]))?)?;
    }
    let (file, digest, bytes) = out.finish();
    file.finish()?;
    let payload = Checkpointed {
        format: FORMAT,
        covers_sequence: covers,
        covers_hash: hex::encode(covers_hash),
        digest: hex::encode(digest),
        bytes,
        actions: actions as u64,
    };
    let payload =
        serde_json::to_value(&payload).map_err(|e| CheckpointError::Encode(e.to_string()))?;
    let saved = Saved {
        covers,
        bytes,
        locked,
    };
    let event = NewEvent {
        kind: CHECKPOINTED.to_owned(),
        time: Utc::now(),
        actor: SERVER_ACTOR.to_owned(),
        action_id: None,
        payload,
    };
    Ok(Some((saved, event)))
}

/// Room for the encoded state of `actions` actions, starting with [`MAGIC`], its memory
/// already touched. Encoding into a buffer that grows from nothing copied it a dozen times
/// and faulted in every new page while the state's lock was held: at 500,000–700,000
/// actions the lock was held for a median 124 ms, now 80 ms.
fn encoding_buffer(actions: usize) -> Vec<u8> {
    // ~27 bytes an action as measured at 500,000 (without pending actions' events, which
    // are written separately), plus room for the actions added before the lock is taken.
    let room = MAGIC.len() + actions.saturating_mul(32).saturating_add(1 << 20);
    // Not zeros: a zeroed vector is fresh pages, touched only later, under the lock.
    let mut buffer = vec![0xff; room];
    buffer.clear();
    buffer.extend_from_slice(MAGIC);
    buffer
}

fn encode(value: &impl Serialize) -> Result<Vec<u8>, CheckpointError> {
    postcard::to_stdvec(value).map_err(|e| CheckpointError::Encode(e.to_string()))
}

/// Writes a checkpoint and hashes what it writes.
struct Hashing {
    file: CheckpointWriter,
    hasher: Sha256,
    bytes: u64,
}

impl Hashing {
    fn new(file: CheckpointWriter) -> Hashing {
        Hashing {
            file,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        use std::io::Write as _;
        self.file
            .write_all(bytes)
            .map_err(|e| CheckpointError::Store(StoreError::Write(sled::Error::Io(e))))?;
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn finish(self) -> (CheckpointWriter, [u8; 32], u64) {
        (self.file, self.hasher.finalize().into(), self.bytes)
    }
}

/// The newest adopted checkpoint, checked against the event that vouches for it; `Ok(None)`
/// when there is none. The events after it still have to be replayed and checked.
pub fn load(log: &EventLog, hot_limit: usize) -> Result<Option<Restored>, CheckpointError> {
    let Some(CheckpointRef { event, covers }) = log.current_checkpoint()? else {
        return Ok(None);
    };
    let unusable = |problem: String| CheckpointError::Unusable {
        covers,
        event,
        problem,
    };
    let contradicted = |problem: String| CheckpointError::Contradicted {
        covers,
        event,
        problem,
    };
    let vouching = log.get(event)?.ok_or_else(|| {
        contradicted(format!(
            "the event is not in the log, which ends at {}",
            log.last_sequence()
        ))
    })?;
    if vouching.kind != CHECKPOINTED || vouching.action_id.is_some() || event <= covers {
        return Err(unusable(format!(
            "event {event} is {}, not the checkpoint's",
            vouching.kind
        )));
    }
    let claims: Checkpointed = serde_json::from_value(vouching.payload)
        .map_err(|e| unusable(format!("the event does not decode: {e}")))?;
    if claims.format != FORMAT || claims.covers_sequence != covers {
        return Err(unusable(format!(
            "the event describes format {} up to event {}",
            claims.format, claims.covers_sequence
        )));
    }
    let covers_hash = log
        .get(covers)?
        .ok_or_else(|| contradicted("the event it covers is not in the log".into()))?
        .hash;
    if hex::encode(covers_hash) != claims.covers_hash {
        return Err(contradicted(format!(
            "event {covers} is not the one it was taken after: the log was rewritten at or \
             before it"
        )));
    }
    let bytes = log
        .checkpoint(covers, claims.bytes)
        .map_err(|e| unusable(e.to_string()))?
        .ok_or_else(|| unusable("its bytes are missing".into()))?;
    if bytes.len() as u64 != claims.bytes || hex::encode(Sha256::digest(&bytes)) != claims.digest {
        return Err(unusable(
            "its bytes do not match the digest the log holds for them".into(),
        ));
    }
    let body = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| unusable("it is not in format 1".into()))?;
    let (snapshot, rest) = postcard::take_from_bytes::<Snapshot>(body)
        .map_err(|e| unusable(format!("its state does not decode: {e}")))?;
    let (events, rest) = postcard::take_from_bytes::<Vec<(u64, Vec<u8>)>>(rest)
        .map_err(|e| unusable(format!("its pending actions' events do not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(unusable(format!("{} bytes follow its end", rest.len())));
    }
    if let Some((sequence, _)) = events.iter().find(|(sequence, _)| *sequence > covers) {
        return Err(unusable(format!(
            "it holds event {sequence}, which it does not cover"
        )));
    }
    // Decoded (and their own hashes checked) only as the pending actions are rebuilt, on
    // several threads: a tree of JSON values for each of them at once would be large.
    let pending_events = events.into_iter().collect();
    let actions = Actions::restore(snapshot, hot_limit).map_err(|e| unusable(e.to_string()))?;
    if actions.applied_sequence() != covers {
        return Err(unusable(format!(
            "it holds the state after event {}",
            actions.applied_sequence()
        )));
    }
    Ok(Some(Restored {
        actions,
        covers,
        covers_hash,
        event,
        pending_events,
    }))
}

/// What the checkpointer thread is asked to do.
enum Request {
    /// Enough events since the last checkpoint.
    Due,
    /// The ledger is stopping: save one at the head if anything happened, then end.
    Last,
}

/// Saves checkpoints on a thread of its own, so the writer never waits for the disk.
pub(super) struct Checkpointer {
    trigger: Trigger,
    thread: Option<JoinHandle<()>>,
}

/// The writer's side: asks for a checkpoint when enough events have been applied.
#[derive(Clone)]
pub(super) struct Trigger {
    requests: std::sync::mpsc::Sender<Request>,
    /// A request is queued or being worked on; the writer asks again only after it is done.
    busy: Arc<AtomicBool>,
    /// The last event the newest checkpoint includes.
    covers: Arc<AtomicU64>,
    every: u64,
}

/// Everything the checkpointer thread works with.
pub(super) struct Shared {
    pub log: Arc<EventLog>,
    pub state: Arc<RwLock<Actions>>,
    pub health: Arc<Health>,
    /// A checkpoint copies the pending actions' events: only from a verified chain.
    pub chain: Arc<ChainGate>,
    /// Weak, so the writer's queue closes when the ledger is dropped.
    pub commands: mpsc::WeakSender<Command>,
}

impl Checkpointer {
    /// `restored`: the last event the checkpoint start-up used includes, and the event
    /// that vouches for it ((0, 0) without one).
    pub(super) fn start(
        shared: Shared,
        every: u64,
        restored: (u64, u64),
    ) -> Result<Checkpointer, std::io::Error> {
        let (requests, inbox) = std::sync::mpsc::channel();
        let trigger = Trigger {
            requests,
            busy: Arc::new(AtomicBool::new(false)),
            covers: Arc::new(AtomicU64::new(restored.0)),
            every,
        };
        let thread = {
            let (busy, covers) = (trigger.busy.clone(), trigger.covers.clone());
            std::thread::Builder::new()
                .name("countersign-checkpoint".into())
                .spawn(move || run(&shared, &inbox, &busy, &covers, restored.1))?
        };
        Ok(Checkpointer {
            trigger,
            thread: Some(thread),
        })
    }

    pub(super) fn trigger(&self) -> Trigger {
        self.trigger.clone()
    }

    /// Saves a last checkpoint at the head and waits for the thread to end. The writer
    /// must still be running.
    pub(super) fn finish(&mut self) {
        let _ = self.trigger.requests.send(Request::Last);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the checkpoint thread panicked");
        }
    }
}

impl Trigger {
    /// Called by the writer after each batch.
    pub(super) fn applied(&self, sequence: u64) {
        let since = sequence.saturating_sub(self.covers.load(Ordering::Acquire));
        if since >= self.every && !self.busy.swap(true, Ordering::AcqRel) {
            let _ = self.requests.send(Request::Due);
        }
    }
}

fn run(
    shared: &Shared,
    inbox: &std::sync::mpsc::Receiver<Request>,
    busy: &AtomicBool,
    covers: &AtomicU64,
    mut vouched_by: u64,
) {
    while let Ok(request) = inbox.recv() {
        let last = matches!(request, Request::Last);
        // Nothing but checkpoint events since the last one: a restart without traffic
        // must not append an event each time.
        let idle = shared.state.read().applied_sequence() <= vouched_by;
        // Never from a chain not yet verified: the checkpoint would vouch for its events.
        let verified = matches!(shared.chain.get(), ChainCheck::Passed { .. });
        if shared.health.refuse_writes().is_none() && verified && !idle {
            let started = std::time::Instant::now();
            match save_and_adopt(shared) {
                Ok(Some((adopted, saved))) => {
                    covers.store(adopted.covers, Ordering::Release);
                    vouched_by = adopted.event;
                    tracing::info!(
                        covers = adopted.covers,
                        event = adopted.event,
                        bytes = saved.bytes,
                        state_locked_ms = saved.locked.as_millis() as u64,
                        took_ms = started.elapsed().as_millis() as u64,
                        "checkpoint saved"
                    );
                }
                Ok(None) => {}
                // Costs only start-up time: the next one is tried after `every` events.
                Err(e) => tracing::warn!(error = %e, "checkpoint not saved"),
            }
        }
        busy.store(false, Ordering::Release);
        if last {
            return;
        }
    }
}

fn save_and_adopt(shared: &Shared) -> Result<Option<(CheckpointRef, Saved)>, CheckpointError> {
    let Some((saved, event)) = save(&shared.log, &shared.state)? else {
        return Ok(None);
    };
    let commands = shared.commands.upgrade().ok_or(LedgerError::Stopped)?;
    let (reply, answer) = oneshot::channel();
    commands
        .blocking_send(Command::Record {
            events: vec![event],
            reply,
        })
        .map_err(|_| LedgerError::Stopped)?;
    // Not held while waiting: the queue must be able to close.
    drop(commands);
    let event = answer.blocking_recv().map_err(|_| LedgerError::Stopped)??;
    let adopted = CheckpointRef {
        event,
        covers: saved.covers,
    };
    shared.log.adopt_checkpoint(adopted)?;
    Ok(Some((adopted, saved)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state is encoded after the magic, into room reserved before the lock is taken.
    #[test]
    fn encoding_buffer_starts_with_the_magic_and_has_room_for_the_state() {
        let buffer = encoding_buffer(500_000);
        assert_eq!(&buffer[..], MAGIC);
        assert!(buffer.capacity() >= MAGIC.len() + 500_000 * 32);
        let state = Actions::default();
        let bytes = postcard::to_extend(&state.snapshot(), buffer).unwrap();
        assert!(bytes.starts_with(MAGIC));
        assert!(postcard::from_bytes::<Snapshot>(&bytes[MAGIC.len()..]).is_ok());
    }

    /// The pending actions' events are written one at a time; read back, they must be the
    /// `Vec<(u64, Vec<u8>)>` that `load` decodes.
    #[test]
    fn events_written_one_at_a_time_read_back_as_one_list() {
        let events: Vec<(u64, Vec<u8>)> =
            vec![(3, vec![1, 2, 3]), (300, vec![0; 200]), (7, vec![])];
        let mut streamed = encode(&events.len()).unwrap();
        for (sequence, bytes) in &events {
            streamed.extend(encode(&(*sequence, &bytes[..])).unwrap());
        }
        assert_eq!(streamed, postcard::to_stdvec(&events).unwrap());
        let (read, rest) = postcard::take_from_bytes::<Vec<(u64, Vec<u8>)>>(&streamed).unwrap();
        assert_eq!(read, events);
        assert!(rest.is_empty());
    }
}
