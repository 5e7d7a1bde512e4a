//! The event log: an append-only, hash-chained record of everything countersign decides.
//!
//! It is the source of truth. In-memory state is rebuilt from it at start-up, and auditors read
//! and verify it. It is generic: events are a kind, a time, an actor, an optional action id and a
//! JSON payload, and this module knows nothing about what they mean.
//!
//! # On-disk layout (sled 0.34)
//!
//! Tree `events`, one entry per event:
//! - key: the sequence number as 8 bytes big-endian. Sequences start at 1 and have no gaps.
//! - value: `hash (32 raw bytes) || body`, where `body` is compact UTF-8 JSON with exactly these
//!   fields in this order:
//!   `{"sequence":42,"kind":"action.requested","time":"2025-01-02T03:04:05.123456789Z",
//!   "actor":"agent-7","action_id":"0190…-…"|null,"payload":{…},"prev_hash":"<64 hex digits>"}`.
//!   `time` is UTC with nine fractional digits; object keys inside `payload` are sorted (serde_json
//!   without `preserve_order`, which must stay off).
//! - `hash = SHA-256(prev_hash as 32 raw bytes || body)`; event 1's `prev_hash` is 32 zero bytes.
//!
//! The body is stored verbatim and verification hashes exactly the stored bytes, so the encoding
//! only has to be deterministic when written, never re-created when read.
//!
//! Tree `meta`, key `head`: `sequence (8 bytes big-endian) || hash (32 bytes)` of the last event.
//! It is absent while the log is empty and is written in the same sled transaction as the events.
//!
//! Trees `cursors` (reader name → last sequence it is done with, 8 bytes big-endian) and
//! `reader_notes` (reader name, NUL, key → a small value, e.g. where the Slack deliverer
//! posted an action's message) hold readers' working state. They are outside the chain:
//! changing them never touches the evidence, and verification ignores them.
//!
//! Directory `checkpoints/` beside sled's files holds saved copies of the ledger's state, one
//! file each, named by the last event the state includes (`covers`, 20 decimal digits, then
//! `.checkpoint`), written to a temporary name, synced and renamed. They are files rather
//! than sled values so that writing tens of megabytes never stands in the way of an
//! append's flush. Tree `meta`, key `checkpoint`:
//! `event sequence (8 bytes big-endian) || covers (8 bytes big-endian)`, the newest checkpoint
//! and the event of the chain that vouches for it (it carries the checkpoint's digest). Both
//! are outside the chain: this module stores the bytes and never interprets them (the ledger
//! does, see `ledger::checkpoint`). Their names and the record are evidence of how far the
//! log went, compared with its end at open (see [`evidence`]).
//!
//! File `head.witness` beside sled's: the last durable event's sequence and hash, written
//! after every batch (see [`witness`]), outside sled so that sled's recovery cutting its own
//! log cannot take it along.
//!
//! A test can tamper with a stopped server's data directory through sled itself (once the server
//! process has exited, which releases sled's lock): `sled::open(dir)?.open_tree("events")?`, get
//! key `sequence.to_be_bytes()`, change byte `32 + offset_in_body` (or a byte below 32 to change
//! the stored hash), insert it back and flush.
//!
//! # What the chain detects, and what it cannot
//!
//! [`EventLog::verify`] walks from event 1 and reports the first event that was changed (its hash
//! no longer matches its bytes), removed (a gap, or the next event no longer links to it), moved
//! or swapped (stored under the wrong key, or linked to the wrong predecessor), and any
//! disagreement between the last event and the head record (events cut from the end). It proves
//! each body is byte for byte what `append` wrote by hashing it, and decodes a body only to
//! explain a problem; `append` writes only bodies that read back exactly (certain by
//! construction, or checked by decoding them), so an unchanged body always decodes.
//! [`EventLog::iter_from`] makes the same checks and also decodes every event;
//! [`EventLog::verify_and_replay`] makes `verify`'s checks and decodes every event in one
//! read, on several threads (start-up).
//!
//! It cannot detect an attacker with write access who rewrites an event and every event after
//! it, recomputes their hashes and updates the head record: the result is a valid chain. Nor can
//! it tell a deleted directory from a new one. Both need an anchor outside this database:
//! `verify` returns the head sequence and hash, and an auditor who keeps them elsewhere
//! (a ticket, a signed message, another system) can later check that the log still leads to them.
//!
//! # Writing
//!
//! One writer thread calls [`EventLog::append`] once per batch (group commit happens one level
//! up). Each batch is one sled transaction over `events` and `meta`, then one synchronous
//! `Db::flush`, so a batch is entirely durable or entirely absent. sled 0.34's flush alone
//! does not reach the disk, so it is followed by an `fsync` of the blob files sled wrote
//! (large tree nodes, which sled keeps in files of their own and never syncs) and an
//! `fdatasync` of sled's data file. `flush_async` is never used:
//! concurrent calls deadlock in sled 0.34 (sled issue 1308).
//!
//! # Opening
//!
//! sled locks the directory, so only one `EventLog` (in any process) can have it open. Because
//! sled 0.34 releases that lock a moment after the last handle is dropped, `open` retries a locked
//! directory for up to a second before giving up with [`StoreError::Open`].

mod chain;
mod codec;
mod error;
mod evidence;
mod guard;
#[cfg(test)]
mod tests;
pub mod witness;

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use uuid::Uuid;

use chain::{Chain, Problem};
use codec::HASH_LEN;
pub use error::StoreError;
pub use evidence::grouped;
use evidence::{Evidence, Loss};
use witness::{Witness, Witnessed};

/// An event as the caller hands it in; the log assigns its sequence and hashes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// A short dotted name such as `action.requested`.
    pub kind: String,
    pub time: DateTime<Utc>,
    pub actor: String,
    pub action_id: Option<Uuid>,
    pub payload: serde_json::Value,
}

impl NewEvent {
    /// Whether [`EventLog::append`] can store this event as given. An event it cannot store
    /// fails its whole batch, so the writer checks each caller's events on their own first.
    pub fn check_storable(&self) -> Result<(), String> {
        codec::check_storable(self)
    }
}

/// An event as stored, with its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub sequence: u64,
    pub kind: String,
    pub time: DateTime<Utc>,
    pub actor: String,
    pub action_id: Option<Uuid>,
    pub payload: serde_json::Value,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// An event as [`EventLog::verify_and_replay`] hands it out: borrowed from the stored bytes,
/// its payload still JSON text, so the caller decodes it straight into its own types.
#[derive(Debug)]
pub struct RawEvent<'a> {
    pub sequence: u64,
    pub kind: std::borrow::Cow<'a, str>,
    pub time: DateTime<Utc>,
    pub actor: std::borrow::Cow<'a, str>,
    pub action_id: Option<Uuid>,
    pub payload: &'a serde_json::value::RawValue,
}

/// The outcome of [`EventLog::verify`].
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct VerifyReport {
    pub ok: bool,
    /// Events that passed every check before the first problem (all of them when `ok`).
    pub events_checked: u64,
    /// The first sequence number the log can no longer vouch for.
    pub first_bad_sequence: Option<u64>,
    /// What is wrong there, in words an auditor can act on.
    pub problem: Option<String>,
    /// The recorded head: give these two to an auditor to anchor outside this database.
    pub head_sequence: u64,
    pub head_hash: [u8; 32],
}

/// A checkpoint being saved (see [`EventLog::create_checkpoint`]). Dropped without
/// [`CheckpointWriter::finish`], it leaves a temporary file that the next adoption removes.
pub struct CheckpointWriter {
    file: std::io::BufWriter<std::fs::File>,
    temporary: std::path::PathBuf,
    path: std::path::PathBuf,
    covers: u64,
}

impl std::io::Write for CheckpointWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.file.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl CheckpointWriter {
    /// Syncs the file, gives it its name and syncs the directory: durable when this
    /// returns, before the event that vouches for it is appended.
    pub fn finish(self) -> Result<(), StoreError> {
        let covers = self.covers;
        let io = |e: std::io::Error| checkpoint_write_error(covers, &e);
        let file = self.file.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.temporary, &self.path).map_err(io)?;
        let dir = self.path.parent().unwrap_or(std::path::Path::new("."));
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io)
    }
}

fn checkpoint_write_error(covers: u64, error: &std::io::Error) -> StoreError {
    StoreError::Write(sled::Error::Io(std::io::Error::new(
        error.kind(),
        format!("saving the checkpoint up to event {covers}: {error}"),
    )))
}

/// A loss of events found at open (see [`EventLog::lost`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostEvents {
    /// The first sequence the log no longer holds (or the event found changed).
    pub from: u64,
    /// The furthest sequence the evidence shows the log reached (0 when unknown).
    pub reached: u64,
    /// What is missing, in words an operator can act on.
    pub problem: String,
}

/// Events appended at once when a loss is accepted.
const ACCEPT_LOSS_BATCH: usize = 4096;

/// At most this many numbers are marked lost at once: enough for the events between two
/// checkpoints many times over, and a typo in `--through` cannot fill the disk.
const MAX_ACCEPTED_LOSS: u64 = 10_000_000;

/// Where checkpoints from beyond a lost end are kept after the loss is accepted.
const LOST_CHECKPOINT_DIR: &str = "lost-checkpoints";

/// A checkpoint of the ledger's state: the events it includes (up to `covers`), and the
/// event of the chain that vouches for its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointRef {
    pub event: u64,
    pub covers: u64,
}

/// The last event of the log, or `(0, zeros)` when it is empty.
#[derive(Debug, Clone, Copy)]
struct Head {
    sequence: u64,
    hash: [u8; HASH_LEN],
}

impl Head {
    const EMPTY: Head = Head {
        sequence: 0,
        hash: codec::GENESIS_HASH,
    };
}

/// State owned by whoever is appending.
struct Writer {
    /// Where the next batch continues the chain. Ahead of `EventLog::durable` only while a batch
    /// is between its transaction and its flush, or after a flush failed.
    head: Head,
    /// Set once writing could lose evidence (a write or flush failed, or the stored log did not
    /// match its head at open); every later append is refused with this reason.
    refused: Option<String>,
    /// A write or flush failed. sled 0.34 then waits forever in any later flush, including
    /// the one it runs when the last handle to a tree is dropped (see `Drop`).
    write_failed: bool,
}

/// The append-only, hash-chained event log. `Send + Sync`; see the module doc for the layout.
pub struct EventLog {
    db: sled::Db,
    events: sled::Tree,
    meta: sled::Tree,
    /// Named positions in the log kept by its readers (the span exporter); not part of the
    /// chain, so moving one never touches the evidence.
    cursors: sled::Tree,
    /// Small values readers keep per key beside their cursor (the Slack deliverer's message
    /// of each action, so it can update it); not part of the chain either.
    notes: sled::Tree,
    /// Where checkpoints are saved (see the module doc); not part of the chain.
    checkpoints: std::path::PathBuf,
    /// Held while the newest checkpoint changes, so two savers cannot adopt out of order.
    adopting: Mutex<()>,
    /// Held for the whole of `append`, so sequence numbers cannot race even if two threads call it.
    writer: Mutex<Writer>,
    /// The head of the last batch known durable. Readers look only at this, so they never wait
    /// for a flush, and never see an event that a crash could still take back (an auditor who saw
    /// event N, then a different event N after a restart, would be looking at a fork).
    durable: RwLock<Head>,
    /// Set at open when the end of the stored log disagrees with the head record. Appends are then
    /// refused (they would overwrite or bury the evidence) and reads see every stored event.
    mismatch: Option<Problem>,
    /// The head record as read at open, compared with the log by `verify` after a mismatch.
    recorded_at_open: Result<Option<(u64, [u8; HASH_LEN])>, String>,
    /// Set at open when something durable shows the log once went further than it does now,
    /// or was changed where the head witness saw it (see [`evidence`]). Appends are refused
    /// (new events would take the lost events' numbers) and `verify` reports it, until an
    /// operator accepts the loss ([`EventLog::accept_loss`]).
    loss: Mutex<Option<Loss>>,
    /// The head witness, written after every durable batch (see [`witness`]).
    witness: Witness,
    /// The data directory, named in messages about damage.
    dir: std::path::PathBuf,
    /// sled's data file, opened again only to `fdatasync` it. On Linux sled 0.34's flush
    /// ends in `sync_file_range`, which neither flushes the disk's write cache nor persists
    /// the file's growing size; sled itself fsyncs only every 500 ms. An answer that says
    /// "recorded" must survive a power cut, so every flush is followed by this.
    data_file: std::fs::File,
    /// sled's `blobs` directory and how far its files are known durable (see [`BlobFiles`]).
    blobs: BlobFiles,
}

/// sled 0.34 writes a page fragment larger than a quarter of its segment (128 KiB by
/// default) to a file of its own under `blobs/`, named by log position, and never fsyncs
/// that file or the directory (`pagecache/blob_io.rs`). An event can approach 100 KB (64 KB
/// of parameters, escaped), so a tree node holding a few is already a blob. sled's log then
/// points at a file that a power cut could empty or remove, so every durable flush syncs the
/// blob files that are new or changed since the last one, and the directory that names them.
struct BlobFiles {
    dir: std::path::PathBuf,
    /// Each blob file already synced (by name) and its length then. Blob files are created
    /// by whichever sled thread rewrites a page, not in name order, and one can be seen
    /// while it is still being written; a set of names with lengths, not a high-water mark,
    /// is what never skips one. Names sled has removed are dropped at the next sync.
    synced: Mutex<std::collections::HashMap<u64, u64>>,
    /// Blob files synced by this handle, so a test can see the work happen.
    #[cfg(test)]
    synced_files: std::sync::atomic::AtomicU64,
}

impl BlobFiles {
    fn new(data_dir: &Path) -> BlobFiles {
        BlobFiles {
            dir: data_dir.join("blobs"),
            synced: Mutex::new(std::collections::HashMap::new()),
            #[cfg(test)]
            synced_files: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Syncs every blob file that is new or whose length changed since it was last synced,
    /// then the directory if a name is new. After a restart every file present is synced
    /// once: whether the previous process got to them is unknown. A name that is not a number
    /// is not sled's and is left alone; a file removed meanwhile (sled's garbage collection)
    /// needs no syncing.
    fn sync_new(&self) -> std::io::Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = std::collections::HashMap::with_capacity(synced.len());
        let mut new_name = false;
        for entry in entries {
            let entry = entry?;
            let Some(position) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u64>().ok())
            else {
                continue;
            };
            // Only the length is read on every flush; a file is opened only to sync it.
            let len = match entry.metadata() {
                Ok(metadata) => metadata.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let known = synced.get(&position).copied();
            if known != Some(len) {
                match std::fs::File::open(entry.path()) {
                    Ok(file) => file.sync_all()?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new_name |= known.is_none();
                #[cfg(test)]
                self.synced_files
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            present.insert(position, len);
        }
        if new_name {
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }
}

impl EventLog {
    /// Opens (or creates) the log in `dir`.
    ///
    /// A log whose stored events disagree with the head record still opens: [`EventLog::verify`]
    /// reports the problem and the caller decides. Appends to such a log are refused.
    ///
    /// sled's own files found damaged (it reports corruption, or panics reading them) is
    /// [`StoreError::Damaged`], never a panic.
    pub fn open(dir: &Path) -> Result<EventLog, StoreError> {
        guard::catching(|| Self::open_unguarded(dir)).unwrap_or_else(|panic| {
            Err(StoreError::Damaged {
                path: dir.to_path_buf(),
                detail: panic,
            })
        })
    }

    fn open_unguarded(dir: &Path) -> Result<EventLog, StoreError> {
        let open_err = |error: sled::Error| match error {
            sled::Error::Corruption { .. } => StoreError::Damaged {
                path: dir.to_path_buf(),
                detail: error.to_string(),
            },
            error => StoreError::Open {
                path: dir.to_path_buf(),
                hint: open_hint(&error),
                error,
            },
        };
        let db = open_sled(dir).map_err(open_err)?;
        let events = db.open_tree("events").map_err(open_err)?;
        let meta = db.open_tree("meta").map_err(open_err)?;
        let cursors = db.open_tree("cursors").map_err(open_err)?;
        let notes = db.open_tree("reader_notes").map_err(open_err)?;
        let checkpoints = dir.join(CHECKPOINT_DIR);
        let data_file =
            std::fs::File::open(dir.join("db")).map_err(|e| open_err(sled::Error::Io(e)))?;
        let blobs = BlobFiles::new(dir);
        // After a process crash (not a power cut) sled reads back what it had written but
        // never synced: the last batch, whose caller was never answered. The fold and readers
        // are about to see it, so it is made durable first; otherwise a power cut could take
        // back an event the span exporter or an auditor had already seen (a fork).
        if let Err(error) = sync_sled(&db, &blobs, &data_file) {
            // As after a failed append: dropping the handles would flush, which never returns.
            std::mem::forget((db.clone(), events.clone(), meta.clone()));
            std::mem::forget((cursors.clone(), notes.clone()));
            return Err(open_err(error));
        }

        let recorded = match meta.get(codec::HEAD_KEY).map_err(open_err)? {
            None => Ok(None),
            Some(v) => codec::decode_head(&v)
                .map(Some)
                .ok_or_else(|| format!("it is {} bytes instead of {}", v.len(), 8 + HASH_LEN)),
        };
        let last = events.last().map_err(open_err)?;
        let mismatch = match &last {
            None => chain::compare_head((0, codec::GENESIS_HASH), &recorded),
            Some((key, value)) => match (codec::decode_key(key), value.first_chunk::<HASH_LEN>()) {
                (Some(seq), Some(hash)) => chain::compare_head((seq, *hash), &recorded),
                (None, _) => Some(Problem {
                    sequence: 0,
                    message: format!(
                        "the last key of the log (0x{}) is not a sequence number (the log was \
                         edited outside countersign)",
                        hex::encode(key)
                    ),
                }),
                (Some(seq), None) => Some(Problem {
                    sequence: seq,
                    message: format!(
                        "event {seq}: its stored value is {} bytes, too short to hold a hash",
                        value.len()
                    ),
                }),
            },
        };
        // After a mismatch the head record is what the log claims to be; without one, the end
        // of the stored log is the best available answer for `last_sequence`.
        let head = match (&recorded, &last) {
            (Ok(Some((sequence, hash))), _) => Head {
                sequence: *sequence,
                hash: *hash,
            },
            (_, Some((key, value))) => Head {
                sequence: codec::decode_key(key).unwrap_or(0),
                hash: value
                    .first_chunk::<HASH_LEN>()
                    .copied()
                    .unwrap_or(codec::GENESIS_HASH),
            },
            _ => Head::EMPTY,
        };
        let ends_at = match &last {
            Some((key, _)) => codec::decode_key(key).unwrap_or(0),
            None => 0,
        };
        let evidence = gather_evidence(dir, &meta, &cursors).map_err(open_err)?;
        let loss = match &mismatch {
            Some(_) => None,
            None => evidence.check(ends_at, |sequence| {
                events
                    .get(sequence.to_be_bytes())
                    .ok()
                    .flatten()
                    .and_then(|value| value.first_chunk::<HASH_LEN>().copied())
            }),
        };
        let witness = Witness::open(dir).map_err(|e| open_err(sled::Error::Io(e)))?;
        if mismatch.is_none() && loss.is_none() && head.sequence > 0 {
            let witnessed = Witnessed::Head {
                sequence: head.sequence,
                hash: head.hash,
            };
            if evidence.witness != witnessed {
                witness
                    .record_durably(head.sequence, &head.hash)
                    .map_err(|e| open_err(sled::Error::Io(e)))?;
            }
        }
        let refused = match (&mismatch, &loss) {
            (Some(p), _) => Some(format!(
                "the stored log does not match its head record ({}); run verify and investigate \
                 before writing to it",
                p.message
            )),
            (None, Some(loss)) => Some(loss.problem.message.clone()),
            (None, None) => None,
        };
        Ok(EventLog {
            db,
            events,
            meta,
            cursors,
            notes,
            checkpoints,
            adopting: Mutex::new(()),
            writer: Mutex::new(Writer {
                head,
                refused,
                write_failed: false,
            }),
            durable: RwLock::new(head),
            mismatch,
            recorded_at_open: recorded,
            loss: Mutex::new(loss),
            witness,
            dir: dir.to_path_buf(),
            data_file,
            blobs,
        })
    }

    /// Appends a batch atomically and makes it durable before returning, with one flush.
    ///
    /// Single-writer by design (one thread does group commit); concurrent callers are serialised.
    /// Returns the events as stored, exactly as later reads will return them. An empty batch
    /// writes nothing. After a failed write or flush every later append is refused: whether the
    /// failed batch reached the disk is unknown, and continuing could fork the chain.
    pub fn append(&self, events: Vec<NewEvent>) -> Result<Vec<StoredEvent>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut writer = self.writer.lock().map_err(|_| StoreError::WritesRefused {
            reason: "an earlier append panicked; restart the server".to_owned(),
        })?;
        if let Some(reason) = &writer.refused {
            return Err(StoreError::WritesRefused {
                reason: reason.clone(),
            });
        }

        let mut head = writer.head;
        let mut values = Vec::with_capacity(events.len());
        let mut stored = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            let sequence =
                head.sequence
                    .checked_add(1)
                    .ok_or_else(|| StoreError::WritesRefused {
                        reason: "sequence numbers are exhausted".to_owned(),
                    })?;
            let (value, event) = codec::encode(sequence, event, &head.hash)
                .map_err(|problem| StoreError::Encode { index, problem })?;
            head = Head {
                sequence,
                hash: event.hash,
            };
            values.push((sequence.to_be_bytes(), value));
            stored.push(event);
        }
        let head_record = codec::encode_head(head.sequence, &head.hash);

        // sled can panic on damaged pages it meets while writing: that is damage, and
        // whether anything of the batch was written is unknown, as after a failed write.
        let committed = guard::catching(|| -> Result<(), TransactionError<u64>> {
            (&self.events, &self.meta).transaction(|(tx_events, tx_meta)| {
                for (key, value) in &values {
                    // Append-only, enforced: a key that is already taken means the log and the
                    // writer disagree, and overwriting would destroy whatever is stored there.
                    if tx_events.insert(&key[..], value.as_slice())?.is_some() {
                        return Err(ConflictableTransactionError::Abort(u64::from_be_bytes(
                            *key,
                        )));
                    }
                }
                tx_meta.insert(codec::HEAD_KEY, &head_record[..])?;
                Ok(())
            })
        })
        .unwrap_or_else(|panic| {
            Err(TransactionError::Storage(sled::Error::Corruption {
                at: None,
                bt: (),
            }))
            .inspect_err(|_| tracing::error!(%panic, "sled panicked while appending"))
        });
        match committed {
            Ok(()) => {}
            Err(TransactionError::Abort(taken)) => {
                let reason = format!(
                    "event {taken} is already stored although the head is event {}; the log was \
                     changed outside this writer, run verify and investigate",
                    writer.head.sequence
                );
                writer.refused = Some(reason.clone());
                return Err(StoreError::WritesRefused { reason });
            }
            Err(TransactionError::Storage(e)) => {
                writer.write_failed = true;
                writer.refused = Some(format!("an earlier write failed ({e}); restart the server"));
                return Err(StoreError::Write(e));
            }
        }
        // The batch is in the tree now, so the chain continues from it whatever happens next.
        writer.head = head;
        if let Err(e) = self.make_durable() {
            writer.write_failed = true;
            writer.refused = Some(format!(
                "flushing events up to {} failed ({e}), so whether they are on disk is unknown; \
                 restart the server",
                head.sequence
            ));
            return Err(StoreError::Write(e));
        }
        // Only once the batch is durable, and before anyone hears of it: the witness never
        // names an event a crash could take back, and names every acknowledged one (in the
        // page cache at once, on disk within `witness::SYNC_EVERY`).
        if let Err(e) = self.witness.record(head.sequence, &head.hash) {
            writer.refused = Some(format!(
                "recording the head witness ({}) at event {} failed ({e}); without it a later \
                 loss of events could go unseen; restart the server once the cause is fixed",
                self.witness.path().display(),
                head.sequence
            ));
            return Err(StoreError::Write(sled::Error::Io(e)));
        }
        *self.durable.write().unwrap_or_else(PoisonError::into_inner) = head;
        Ok(stored)
    }

    /// What start-up found missing, if the log lost its end or was changed where the head
    /// witness saw it (see [`evidence`]): appends are refused until it is accepted.
    pub fn lost(&self) -> Option<LostEvents> {
        self.loss().map(|loss| LostEvents {
            from: loss.problem.sequence,
            reached: loss.reached,
            problem: loss.problem.message,
        })
    }

    /// Records a problem found beside the chain (the ledger's checkpoint contradicting the
    /// log at `sequence`): from now on appends are refused and `verify` reports it, as for
    /// a loss found at open.
    pub fn record_contradiction(&self, sequence: u64, problem: &str) {
        let mut loss = self.loss.lock().unwrap_or_else(PoisonError::into_inner);
        loss.get_or_insert_with(|| Loss {
            problem: Problem {
                sequence,
                message: problem.to_owned(),
            },
            reached: 0,
        });
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .refused
            .get_or_insert_with(|| problem.to_owned());
    }

    /// Accepts a loss [`EventLog::lost`] reports, for an operator who decided to continue
    /// without the lost events (`countersign log accept-loss`). Appends `first` (the record
    /// of the acceptance) right after the last stored event, then `marker(sequence)` for
    /// every further number up to `through`: every number the lost events had, and any the
    /// evidence shows was reached, now names an event that says it was lost, so a number
    /// is never given to a different event without a record, and new events continue
    /// after `through`. Checkpoints from beyond the surviving log are moved to
    /// `lost-checkpoints/` (kept for investigation, never used) and the record of the
    /// newest is dropped if it names a lost event. Returns the new head.
    ///
    /// Refused unless the chain up to the last stored event verifies, and unless `through`
    /// reaches everything the evidence shows.
    pub fn accept_loss(
        &self,
        through: u64,
        first: NewEvent,
        mut marker: impl FnMut(u64) -> NewEvent,
    ) -> Result<u64, StoreError> {
        let Some(loss) = self.loss() else {
            return Err(StoreError::Acceptance(
                "nothing shows a loss: the log reaches every checkpoint, cursor and the head \
                 witness"
                    .into(),
            ));
        };
        if self.mismatch.is_some() {
            return Err(StoreError::Acceptance(
                "the stored log does not match its head record; that is not a lost end".into(),
            ));
        }
        let ends_at = self.last_sequence();
        if loss.problem.sequence != ends_at + 1 {
            return Err(StoreError::Acceptance(format!(
                "the log was changed, not cut: {}",
                loss.problem.message
            )));
        }
        let through_at_least = loss.reached.max(ends_at + 1);
        if through < through_at_least {
            return Err(StoreError::Acceptance(format!(
                "--through must be at least {}: {}",
                grouped(through_at_least),
                loss.problem.message
            )));
        }
        if through - ends_at > MAX_ACCEPTED_LOSS {
            return Err(StoreError::Acceptance(format!(
                "--through {} is more than {} events after the end of the log ({})",
                grouped(through),
                grouped(MAX_ACCEPTED_LOSS),
                grouped(ends_at)
            )));
        }
        let report = self.verify()?;
        if report.problem.as_deref() != Some(loss.problem.message.as_str()) {
            return Err(StoreError::Acceptance(format!(
                "the surviving log does not verify ({}); restore it from a backup",
                report.problem.unwrap_or_default()
            )));
        }
        // The refusal was the loss: lifted for these appends only.
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .refused = None;
        let mut next = ends_at + 1;
        let mut batch = vec![first];
        loop {
            next += 1;
            while next <= through && batch.len() < ACCEPT_LOSS_BATCH {
                batch.push(marker(next));
                next += 1;
            }
            let appended = self.append(std::mem::take(&mut batch));
            if let Err(e) = appended {
                self.writer
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .refused
                    .get_or_insert_with(|| loss.problem.message.clone());
                return Err(e);
            }
            if next > through {
                break;
            }
            batch.push(marker(next));
        }
        if let Some(checkpoint) = self.current_checkpoint()?
            && checkpoint.event > ends_at
        {
            self.write_beside_chain(|| self.meta.remove(CHECKPOINT_KEY).map(drop))?;
            self.flush()?;
        }
        self.set_aside_checkpoints_after(ends_at)?;
        *self.loss.lock().unwrap_or_else(PoisonError::into_inner) = None;
        Ok(self.last_sequence())
    }

    /// Moves checkpoint files covering events after `ends_at` to `lost-checkpoints/`.
    fn set_aside_checkpoints_after(&self, ends_at: u64) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Write(sled::Error::Io(e));
        let entries = match std::fs::read_dir(&self.checkpoints) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let aside = self.dir.join(LOST_CHECKPOINT_DIR);
        for entry in entries {
            let path = entry.map_err(io)?.path();
            let covers = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.parse::<u64>().ok());
            if covers.is_some_and(|covers| covers > ends_at)
                && let Some(name) = path.file_name()
            {
                std::fs::create_dir_all(&aside).map_err(io)?;
                std::fs::rename(&path, aside.join(name)).map_err(io)?;
            }
        }
        std::fs::File::open(&self.checkpoints)
            .and_then(|dir| dir.sync_all())
            .map_err(io)
    }

    /// Sequence number of the last durable event; 0 when the log is empty. After a mismatch at
    /// open it is the head record's claim (or the last stored key when there is no record).
    pub fn last_sequence(&self) -> u64 {
        self.durable_head().sequence
    }

    /// Hash of the last durable event; zeros when the log is empty.
    pub fn head_hash(&self) -> [u8; 32] {
        self.durable_head().hash
    }

    /// One event, with its own hash checked (links to its neighbours are checked by
    /// [`EventLog::iter_from`] and [`EventLog::verify`]). `Ok(None)` past the end of the log; an
    /// event missing below the head is `Corrupt`.
    pub fn get(&self, sequence: u64) -> Result<Option<StoredEvent>, StoreError> {
        let head = self.durable_head();
        if sequence == 0 || (self.mismatch.is_none() && sequence > head.sequence) {
            return Ok(None);
        }
        match self.read(|| self.events.get(sequence.to_be_bytes()))? {
            Some(value) => codec::decode(sequence, &value)
                .map(Some)
                .map_err(|problem| StoreError::Corrupt { sequence, problem }),
            None if sequence <= head.sequence => Err(StoreError::Corrupt {
                sequence,
                problem: format!(
                    "event {sequence} is missing (the head is event {})",
                    head.sequence
                ),
            }),
            None => Ok(None),
        }
    }

    /// One event's stored bytes (its hash, then its body), unchecked: to be kept elsewhere and
    /// read back with [`EventLog::decode_stored`]. `Ok(None)` past the durable head.
    pub fn stored_bytes(&self, sequence: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if sequence == 0 || sequence > self.durable_head().sequence {
            return Ok(None);
        }
        self.read(|| self.events.get(sequence.to_be_bytes()))
            .map(|value| value.map(|v| v.to_vec()))
    }

    /// Reads back bytes [`EventLog::stored_bytes`] returned, with the event's own hash
    /// checked, as [`EventLog::get`] does.
    pub fn decode_stored(sequence: u64, bytes: &[u8]) -> Result<StoredEvent, StoreError> {
        codec::decode(sequence, bytes).map_err(|problem| StoreError::Corrupt { sequence, problem })
    }

    /// The events from `sequence` (1 for all) up to the last durable event at the time of the
    /// call, each checked on its own and against the one before it.
    ///
    /// A damaged, missing or misplaced event is an `Err` item, after which the iteration ends:
    /// the order of anything beyond a break in the chain cannot be trusted.
    pub fn iter_from(
        &self,
        sequence: u64,
    ) -> impl Iterator<Item = Result<StoredEvent, StoreError>> + '_ {
        let sequence = sequence.max(1);
        let chain = if sequence == 1 {
            Chain::genesis()
        } else {
            // Link the first event to its predecessor when that one is intact; if it is not,
            // the problem belongs to the predecessor, and `verify` reports it.
            let prev = guard::catching(|| self.events.get((sequence - 1).to_be_bytes()))
                .ok()
                .and_then(Result::ok)
                .flatten()
                .and_then(|v| codec::decode(sequence - 1, &v).ok())
                .map(|e| e.hash);
            Chain::resume(sequence, prev)
        };
        Walk {
            range: self.events.range(self.read_range(sequence)),
            chain,
            done: false,
            dir: self.dir.clone(),
        }
    }

    /// Walks the whole chain from event 1 and compares its end with the head record.
    ///
    /// Never panics, and stops at the first problem. Events appended while it runs are not
    /// included; the report's head is the one verified. Large logs are checked in slices on
    /// several threads; a slice that does not join cleanly onto the one before is walked again in
    /// order, so the report is exactly what one walk from event 1 would give.
    ///
    /// A log that lost its end (see [`evidence`]) fails, at the first missing event. A read
    /// that fails for a reason that may pass (an I/O error, such as a full disk) is `Err`:
    /// it says nothing about the evidence, so it is not a verification result. sled
    /// reporting its files damaged is one.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.verify_with(
            threads.min(MAX_VERIFY_THREADS),
            MIN_EVENTS_PER_VERIFY_THREAD,
        )
    }

    /// [`EventLog::verify`], given up as soon as `stop` is set (`None` then): a verification
    /// running in the background must not keep a stopping server's directory locked.
    pub fn verify_unless(&self, stop: &AtomicBool) -> Option<Result<VerifyReport, StoreError>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let report = self.verify_inner(
            threads.min(MAX_VERIFY_THREADS),
            MIN_EVENTS_PER_VERIFY_THREAD,
            stop,
        );
        (!stop.load(Ordering::Acquire)).then_some(report)
    }

    /// [`EventLog::verify`] with its parallelism chosen by the caller (tests force slicing).
    fn verify_with(
        &self,
        max_threads: usize,
        min_events_per_thread: u64,
    ) -> Result<VerifyReport, StoreError> {
        self.verify_inner(max_threads, min_events_per_thread, &AtomicBool::new(false))
    }

    fn verify_inner(
        &self,
        max_threads: usize,
        min_events_per_thread: u64,
        stop: &AtomicBool,
    ) -> Result<VerifyReport, StoreError> {
        let head = self.durable_head();
        let (end, recorded) = match &self.mismatch {
            None => (
                Bound::Included(head.sequence.to_be_bytes()),
                Ok(Some((head.sequence, head.hash))),
            ),
            Some(_) => (Bound::Unbounded, self.recorded_at_open.clone()),
        };
        let (head_sequence, head_hash) = match &recorded {
            Ok(Some(head)) => *head,
            _ => (0, codec::GENESIS_HASH),
        };

        // After a mismatch the end of the log is unknown, so it is walked in one piece.
        let slices = match self.mismatch {
            None => self.verify_slices(
                head.sequence,
                end,
                (max_threads, min_events_per_thread),
                stop,
            ),
            Some(_) => Vec::new(),
        };
        let mut chain = Chain::genesis();
        let joined = slices
            .iter()
            .all(|(walk, found)| found.is_none() && chain.join(walk));
        let problem = if joined && !slices.is_empty() {
            None
        } else {
            self.check_range(&mut chain, end, stop)?
        };
        let problem = problem
            .or_else(|| chain::compare_head(chain.last(), &recorded))
            .or_else(|| self.mismatch.clone())
            .or_else(|| self.loss().map(|loss| loss.problem));
        Ok(VerifyReport {
            ok: problem.is_none(),
            events_checked: chain.checked,
            first_bad_sequence: problem.as_ref().map(|p| p.sequence),
            problem: problem.map(|p| p.message),
            head_sequence,
            head_hash,
        })
    }

    fn loss(&self) -> Option<Loss> {
        self.loss
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checks events 1 to `last` in contiguous slices, one thread each; empty for a small log.
    /// Slice 0 starts at the very first key so stray keys before event 1 are seen.
    fn verify_slices(
        &self,
        last: u64,
        end: Bound<[u8; 8]>,
        (max_threads, min_events_per_thread): (usize, u64),
        stop: &AtomicBool,
    ) -> Vec<(Chain, Option<Problem>)> {
        let count = max_threads
            .min(usize::try_from(last / min_events_per_thread.max(1)).unwrap_or(usize::MAX));
        if count < 2 {
            return Vec::new();
        }
        let starts: Vec<u64> = (0..count as u64)
            .map(|i| 1 + i * (last / count as u64))
            .collect();
        let slice = |i: usize| {
            let start = starts[i];
            let mut chain = Chain::resume(start, (i == 0).then_some(codec::GENESIS_HASH));
            let upper = match starts.get(i + 1) {
                Some(next) => Bound::Excluded(next.to_be_bytes()),
                None => end,
            };
            let lower = match i {
                0 => Bound::Unbounded,
                _ => Bound::Included(start.to_be_bytes()),
            };
            // A read error here only stops the slice from joining: the walk in order that
            // follows meets it again and reports it.
            let found = self
                .walk_checked(&mut chain, self.events.range((lower, upper)), stop)
                .unwrap_or_else(|e| {
                    Some(Problem {
                        sequence: chain.next(),
                        message: e.to_string(),
                    })
                });
            (chain, found)
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = (1..count)
                .map(|i| {
                    let run = move || slice(i);
                    std::thread::Builder::new()
                        .name("event-log-verify".to_owned())
                        .spawn_scoped(scope, run)
                })
                .collect();
            let mut slices = vec![slice(0)];
            for (i, handle) in (1..count).zip(handles) {
                // A slice that could not run here is simply walked again by the caller.
                match handle.map_err(drop).and_then(|h| h.join().map_err(drop)) {
                    Ok(done) => slices.push(done),
                    Err(()) => {
                        slices.push((Chain::resume(starts[i], None), None));
                        break;
                    }
                }
            }
            slices
        })
    }

    /// Verifies the whole chain and replays it in the same read: every event from 1 to the
    /// head is checked (its key, and its stored hash against SHA-256 of the previous hash and
    /// its body) and decoded by `decode` on up to [`MAX_REPLAY_THREADS`] threads, in chunks,
    /// and handed to `fold` on the caller's thread in sequence order.
    ///
    /// Returns the verification report when the log is intact from event 1 to its head
    /// record and every event was handed over. Returns `None` as soon as anything does not
    /// check out (or for a log that disagreed with its head record at open): `fold` may then
    /// have seen a prefix, which the caller discards before walking the log with
    /// [`EventLog::verify`] and [`EventLog::iter_from`], which say what is wrong and where.
    ///
    /// Start-up reads the whole log, and reading 1.2 GB through sled's iterator is a large
    /// part of it: checking and decoding in one pass reads it once instead of twice.
    pub fn verify_and_replay<T: Send>(
        &self,
        decode: impl Fn(RawEvent<'_>) -> Result<T, String> + Sync,
        fold: impl FnMut(u64, Result<T, String>),
    ) -> Option<VerifyReport> {
        self.verify_and_replay_after(0, codec::GENESIS_HASH, decode, fold)
    }

    /// [`EventLog::verify_and_replay`] of the events after `after` only, the first of them
    /// linked to `after_hash` (start-up from a checkpoint of the state up to `after`). The
    /// events up to `after` are not read: the caller checks that event `after` is stored
    /// with `after_hash`, and verifies them on its own (see [`EventLog::verify`]). The report
    /// counts the events handed over.
    pub fn verify_and_replay_after<T: Send>(
        &self,
        after: u64,
        after_hash: [u8; HASH_LEN],
        decode: impl Fn(RawEvent<'_>) -> Result<T, String> + Sync,
        mut fold: impl FnMut(u64, Result<T, String>),
    ) -> Option<VerifyReport> {
        if self.mismatch.is_some() || self.loss().is_some() {
            return None;
        }
        let head = self.durable_head();
        if after > head.sequence {
            return None;
        }
        let chunks = (head.sequence - after).div_ceil(REPLAY_CHUNK);
        let check_chunk = |chunk: u64| -> CheckedChunk<T> {
            let first = after + 1 + chunk * REPLAY_CHUNK;
            let last = (first + REPLAY_CHUNK - 1).min(head.sequence);
            // The chunk's first event links to its predecessor's stored hash, read here and
            // compared with what the chunk before ends on when the chunks are joined.
            let (mut chain, lower) = if chunk == 0 && after == 0 {
                // From the very first key, so stray keys before event 1 are caught.
                (Chain::genesis(), Bound::Unbounded)
            } else if chunk == 0 {
                (
                    Chain::resume(first, Some(after_hash)),
                    Bound::Included(first.to_be_bytes()),
                )
            } else {
                let prev = guard::catching(|| self.events.get((first - 1).to_be_bytes()))
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
                    .and_then(|v| v.first_chunk::<HASH_LEN>().copied());
                let Some(prev) = prev else {
                    return CheckedChunk::failed();
                };
                (
                    Chain::resume(first, Some(prev)),
                    Bound::Included(first.to_be_bytes()),
                )
            };
            let starts_after = chain.last().1;
            let mut items = Vec::with_capacity((last + 1 - first) as usize);
            let mut range = self
                .events
                .range((lower, Bound::Included(last.to_be_bytes())));
            while let Ok(Some(item)) = guard::catching(|| range.next()) {
                let Ok((key, value)) = item else {
                    return CheckedChunk::failed();
                };
                let sequence = chain.next();
                if chain.check_linked(&key, &value).is_err() {
                    return CheckedChunk::failed();
                }
                items.push((
                    sequence,
                    codec::decode_verified(sequence, &value).and_then(&decode),
                ));
            }
            if chain.next() != last + 1 {
                return CheckedChunk::failed();
            }
            CheckedChunk {
                items: Some(items),
                starts_after,
                ends_on: chain.last().1,
            }
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_REPLAY_THREADS) as u64;
        // Joins the chunks in order: each must start on the hash the one before ended on.
        let mut previous_hash = after_hash;
        let mut handed = 0u64;
        let mut hand = |chunk: CheckedChunk<T>| -> bool {
            let Some(items) = chunk.items else {
                return false;
            };
            if chunk.starts_after != previous_hash {
                return false;
            }
            previous_hash = chunk.ends_on;
            for (sequence, item) in items {
                handed += 1;
                fold(sequence, item);
            }
            true
        };
        let intact = if chunks < 2 || threads < 2 {
            (0..chunks).all(|c| hand(check_chunk(c)))
        } else {
            std::thread::scope(|scope| {
                // Thread `t` takes chunks t, t + threads, ...; two chunks of look-ahead each
                // bound the memory, and reading the channels in turn restores the order.
                let receivers: Vec<_> = (0..threads)
                    .map(|t| {
                        let (tx, rx) = std::sync::mpsc::sync_channel(2);
                        let check_chunk = &check_chunk;
                        let spawned = std::thread::Builder::new()
                            .name("event-log-replay".to_owned())
                            .spawn_scoped(scope, move || {
                                for chunk in (t..chunks).step_by(threads as usize) {
                                    if tx.send(check_chunk(chunk)).is_err() {
                                        return;
                                    }
                                }
                            });
                        spawned.ok().map(|_| rx)
                    })
                    .collect();
                // Stopping early drops the receivers, which ends the threads.
                (0..chunks).all(|chunk| {
                    // A thread that could not start or stopped: check its chunk here.
                    let received = receivers[(chunk % threads) as usize]
                        .as_ref()
                        .and_then(|rx| rx.recv().ok());
                    hand(received.unwrap_or_else(|| check_chunk(chunk)))
                })
            })
        };
        let ends_at_head = previous_hash == head.hash && handed == head.sequence - after;
        (intact && ends_at_head).then_some(VerifyReport {
            ok: true,
            events_checked: handed,
            first_bad_sequence: None,
            problem: None,
            head_sequence: head.sequence,
            head_hash: head.hash,
        })
    }

    /// Continues `chain` in order up to `end`, returning the first problem.
    fn check_range(
        &self,
        chain: &mut Chain,
        end: Bound<[u8; 8]>,
        stop: &AtomicBool,
    ) -> Result<Option<Problem>, StoreError> {
        let start = match chain.next() {
            1 => Bound::Unbounded,
            next => Bound::Included(next.to_be_bytes()),
        };
        self.walk_checked(chain, self.events.range((start, end)), stop)
    }

    /// Checks every entry of `range` as a link of the chain, decoding only to explain a problem.
    /// Ends early, reporting nothing, once `stop` is set. A read that fails with an I/O
    /// error is `Err` (see [`EventLog::verify`]); sled finding its files damaged, or
    /// panicking on them, is a problem at the first event it could not read.
    fn walk_checked(
        &self,
        chain: &mut Chain,
        mut range: sled::Iter,
        stop: &AtomicBool,
    ) -> Result<Option<Problem>, StoreError> {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let unreadable = |detail: String| Problem {
                sequence: chain.next(),
                message: format!(
                    "event {} cannot be read: the event log at {} is damaged ({detail})",
                    chain.next(),
                    self.dir.display()
                ),
            };
            let checked = match guard::catching(|| range.next()) {
                Ok(None) => return Ok(None),
                Ok(Some(Ok((key, value)))) => chain.check_linked(&key, &value),
                Ok(Some(Err(e @ sled::Error::Io(_)))) => return Err(StoreError::Read(e)),
                Ok(Some(Err(e))) => Err(unreadable(e.to_string())),
                Err(panic) => Err(unreadable(panic)),
            };
            if let Err(p) = checked {
                return Ok(Some(p));
            }
        }
    }

    /// Makes everything written so far durable. `append` already does this for every batch.
    ///
    /// After a failed write it returns the refusal instead of asking sled: sled 0.34's flush
    /// waits forever for a log position that a failed write will never make stable.
    pub fn flush(&self) -> Result<(), StoreError> {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if writer.write_failed {
            return Err(StoreError::WritesRefused {
                reason: writer.refused.clone().unwrap_or_default(),
            });
        }
        self.make_durable().map_err(StoreError::Write)
    }

    /// The position saved under `name`: the last event its reader is done with; 0 when none.
    pub fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        match self.read(|| self.cursors.get(name.as_bytes()))? {
            None => Ok(0),
            Some(value) => value
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    sequence: 0,
                    problem: format!("cursor {name} is {} bytes instead of 8", value.len()),
                }),
        }
    }

    /// Saves the position under `name` durably. Refused like `flush` after a failed write.
    pub fn save_cursor(&self, name: &str, sequence: u64) -> Result<(), StoreError> {
        self.write_beside_chain(|| {
            self.cursors
                .insert(name.as_bytes(), &sequence.to_be_bytes())
                .map(drop)
        })?;
        self.flush()
    }

    /// A note `reader` kept under `key` (see [`EventLog::save_note`]).
    pub fn note(&self, reader: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|| self.notes.get(note_key(reader, key)))
            .map(|value| value.map(|v| v.to_vec()))
    }

    /// Saves (`Some`) or removes (`None`) a reader's note durably. Notes are working state
    /// of a reader, like cursors: never evidence, never part of the chain.
    pub fn save_note(
        &self,
        reader: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let key = note_key(reader, key);
        self.write_beside_chain(|| match value {
            Some(value) => self.notes.insert(key, value).map(drop),
            None => self.notes.remove(key).map(drop),
        })?;
        self.flush()
    }

    /// Starts saving a checkpoint: the bytes of a state that includes every event up to
    /// `covers`. Written to a temporary file; [`CheckpointWriter::finish`] makes it durable
    /// under its name, replacing any saved for the same event.
    pub fn create_checkpoint(&self, covers: u64) -> Result<CheckpointWriter, StoreError> {
        let path = self.checkpoint_path(covers);
        let temporary = path.with_extension(CHECKPOINT_TEMPORARY);
        let file = std::fs::create_dir_all(&self.checkpoints)
            .and_then(|()| std::fs::File::create(&temporary))
            .map_err(|e| checkpoint_write_error(covers, &e))?;
        Ok(CheckpointWriter {
            file: std::io::BufWriter::new(file),
            temporary,
            path,
            covers,
        })
    }

    /// Saves a checkpoint whole (see [`EventLog::create_checkpoint`]).
    pub fn save_checkpoint(&self, covers: u64, bytes: &[u8]) -> Result<(), StoreError> {
        use std::io::Write as _;
        let mut writer = self.create_checkpoint(covers)?;
        writer
            .write_all(bytes)
            .map_err(|e| checkpoint_write_error(covers, &e))?;
        writer.finish()
    }

    /// The stored bytes of the checkpoint that covers events up to `covers`; `None` when
    /// there is none. A file longer than `at_most` bytes (what the event that vouches for it
    /// records) is `Corrupt` without being read.
    pub fn checkpoint(&self, covers: u64, at_most: u64) -> Result<Option<Vec<u8>>, StoreError> {
        use std::io::Read as _;
        let read_error = |e: std::io::Error| StoreError::Read(sled::Error::Io(e));
        let file = match std::fs::File::open(self.checkpoint_path(covers)) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_error(e)),
        };
        let len = file.metadata().map_err(read_error)?.len();
        if len > at_most {
            return Err(StoreError::Corrupt {
                sequence: covers,
                problem: format!(
                    "the checkpoint up to event {covers} is {len} bytes, more than the {at_most} \
                     recorded for it"
                ),
            });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        file.take(at_most)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        Ok(Some(bytes))
    }

    fn checkpoint_path(&self, covers: u64) -> std::path::PathBuf {
        self.checkpoints
            .join(format!("{covers:020}.{CHECKPOINT_EXTENSION}"))
    }

    /// The newest adopted checkpoint, if any.
    pub fn current_checkpoint(&self) -> Result<Option<CheckpointRef>, StoreError> {
        let Some(value) = self.read(|| self.meta.get(CHECKPOINT_KEY))? else {
            return Ok(None);
        };
        match (value.get(..8), value.get(8..16), value.len()) {
            (Some(event), Some(covers), 16) => Ok(Some(CheckpointRef {
                event: u64::from_be_bytes(event.try_into().unwrap_or_default()),
                covers: u64::from_be_bytes(covers.try_into().unwrap_or_default()),
            })),
            _ => Err(StoreError::Corrupt {
                sequence: 0,
                problem: format!(
                    "the checkpoint record is {} bytes instead of 16",
                    value.len()
                ),
            }),
        }
    }

    /// Makes `checkpoint` the one start-up uses, once the event that vouches for it is
    /// durable, and removes older checkpoints and any a crash left half written. A
    /// checkpoint older than the current one is not adopted (two savers finishing out of
    /// order), and is removed. The record is durable with the next flush: until then
    /// start-up uses the previous one, which is removed only after it.
    pub fn adopt_checkpoint(&self, checkpoint: CheckpointRef) -> Result<(), StoreError> {
        let _adopting = self.adopting.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current_checkpoint().ok().flatten();
        let keep = match current {
            Some(current) if current.covers >= checkpoint.covers => current.covers,
            _ => {
                let mut value = [0u8; 16];
                value[..8].copy_from_slice(&checkpoint.event.to_be_bytes());
                value[8..].copy_from_slice(&checkpoint.covers.to_be_bytes());
                self.write_beside_chain(|| self.meta.insert(CHECKPOINT_KEY, &value[..]).map(drop))?;
                self.flush()?;
                checkpoint.covers
            }
        };
        self.remove_checkpoints_but(keep)
    }

    /// Removes every checkpoint file but the one covering `keep` and any newer (being
    /// saved), and temporary files.
    fn remove_checkpoints_but(&self, keep: u64) -> Result<(), StoreError> {
        let entries = match std::fs::read_dir(&self.checkpoints) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::Read(sled::Error::Io(e))),
        };
        for entry in entries {
            let path = entry
                .map_err(|e| StoreError::Read(sled::Error::Io(e)))?
                .path();
            let covers = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.parse::<u64>().ok());
            let extension = path.extension().and_then(|e| e.to_str());
            let stale = match (covers, extension) {
                (Some(covers), Some(CHECKPOINT_EXTENSION)) => covers < keep,
                (Some(_), Some(CHECKPOINT_TEMPORARY)) => true,
                // Not ours: left alone.
                _ => false,
            };
            if stale {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(StoreError::Write(sled::Error::Io(e)));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Runs one write to a tree outside the chain (cursors, notes, the checkpoint record). Refused after
    /// a failed write; a failure now refuses later ones, as a failed append does, because
    /// sled's next flush would wait forever.
    fn write_beside_chain(
        &self,
        write: impl FnOnce() -> sled::Result<()>,
    ) -> Result<(), StoreError> {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if writer.write_failed {
            return Err(StoreError::WritesRefused {
                reason: writer.refused.clone().unwrap_or_default(),
            });
        }
        write().map_err(|e| {
            writer.write_failed = true;
            writer.refused = Some(format!("an earlier write failed ({e}); restart the server"));
            StoreError::Write(e)
        })
    }

    /// sled's flush, then an `fsync` of the blob files it wrote (see [`BlobFiles`]) and an
    /// `fdatasync` of its data file (see `data_file`). Blobs first: the data file's log
    /// records point at them.
    fn make_durable(&self) -> sled::Result<()> {
        sync_sled(&self.db, &self.blobs, &self.data_file)
    }

    /// Runs one sled read: sled reporting its files corrupt, or panicking on them, is
    /// [`StoreError::Damaged`]; any other error is [`StoreError::Read`] (I/O, which may pass).
    fn read<T>(&self, read: impl FnOnce() -> sled::Result<T>) -> Result<T, StoreError> {
        match guard::catching(read) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error @ sled::Error::Io(_))) => Err(StoreError::Read(error)),
            Ok(Err(error)) => Err(self.damaged(error.to_string())),
            Err(panic) => Err(self.damaged(panic)),
        }
    }

    fn damaged(&self, detail: String) -> StoreError {
        StoreError::Damaged {
            path: self.dir.clone(),
            detail,
        }
    }

    fn durable_head(&self) -> Head {
        *self.durable.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keys a read may see from `sequence` on: up to the durable head, or everything stored when
    /// the log disagreed with its head at open (nothing is appended then, and an investigator
    /// must see all of it). From 1 the range starts at the very first key, so stray keys sorting
    /// before event 1 are reported too.
    fn read_range(&self, sequence: u64) -> (Bound<[u8; 8]>, Bound<[u8; 8]>) {
        let start = match sequence {
            0 | 1 => Bound::Unbounded,
            s => Bound::Included(s.to_be_bytes()),
        };
        let end = match self.mismatch {
            None => Bound::Included(self.durable_head().sequence.to_be_bytes()),
            Some(_) => Bound::Unbounded,
        };
        (start, end)
    }
}

/// A checked walk over a key range of `events`; ends after its first error.
struct Walk {
    range: sled::Iter,
    chain: Chain,
    done: bool,
    /// The data directory, named if sled finds its files damaged.
    dir: std::path::PathBuf,
}

impl Iterator for Walk {
    type Item = Result<StoredEvent, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let range = &mut self.range;
        let damaged = |detail: String| StoreError::Damaged {
            path: self.dir.clone(),
            detail,
        };
        let item = match guard::catching(|| range.next()) {
            Ok(None) => return None,
            Ok(Some(Err(e @ sled::Error::Io(_)))) => Err(StoreError::Read(e)),
            Ok(Some(Err(e))) => Err(damaged(e.to_string())),
            Err(panic) => Err(damaged(panic)),
            Ok(Some(Ok((key, value)))) => {
                self.chain
                    .check(&key, &value)
                    .map_err(|p| StoreError::Corrupt {
                        sequence: p.sequence,
                        problem: p.message,
                    })
            }
        };
        self.done = item.is_err();
        Some(item)
    }
}

/// One chunk of [`EventLog::verify_and_replay`]: its events decoded, and the hashes that
/// join it to its neighbours; `items` is `None` when something in it did not check out.
struct CheckedChunk<T> {
    items: Option<Vec<(u64, Result<T, String>)>>,
    /// The stored hash of the event before the chunk's first (zeros before event 1).
    starts_after: [u8; HASH_LEN],
    /// The stored hash of the chunk's last event.
    ends_on: [u8; HASH_LEN],
}

impl<T> CheckedChunk<T> {
    fn failed() -> CheckedChunk<T> {
        CheckedChunk {
            items: None,
            starts_after: codec::GENESIS_HASH,
            ends_on: codec::GENESIS_HASH,
        }
    }
}

/// Replay decodes on at most this many threads (the caller's thread folds)...
const MAX_REPLAY_THREADS: usize = 4;

/// ...in chunks of this many events, handed over in order.
const REPLAY_CHUNK: u64 = 4096;

/// Verification uses at most this many threads...
const MAX_VERIFY_THREADS: usize = 8;

/// ...and gives each at least this many events; below that, threads cost more than they save.
const MIN_EVENTS_PER_VERIFY_THREAD: u64 = 50_000;

/// sled's page cache. Its default (1 GiB) fills with every event a start-up verification
/// and replay read, most of which are never read again: a million-event log then held
/// about a gigabyte of resident memory, and faulting it in was a seventh of start-up.
/// Appends and recent reads need little; older events are read from the file.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// How long `open` keeps retrying a locked directory. sled 0.34 releases its file lock from
/// background threads shortly *after* the last `Db` is dropped (sled issues 1234 and 1289), so a
/// close followed at once by a reopen in the same process can find it still locked. A directory
/// held by a live server stays locked far longer than this, and still fails.
const LOCK_RETRY_BUDGET: Duration = Duration::from_secs(1);

/// See [`EventLog::make_durable`].
fn sync_sled(db: &sled::Db, blobs: &BlobFiles, data_file: &std::fs::File) -> sled::Result<()> {
    db.flush()?;
    blobs.sync_new().map_err(sled::Error::Io)?;
    data_file.sync_data().map_err(sled::Error::Io)
}

/// Where checkpoints are saved, inside the data directory.
const CHECKPOINT_DIR: &str = "checkpoints";
const CHECKPOINT_EXTENSION: &str = "checkpoint";
/// A checkpoint being written; renamed once synced, removed if a crash left it.
const CHECKPOINT_TEMPORARY: &str = "partial";

/// Where in `meta` the newest checkpoint is named.
const CHECKPOINT_KEY: &[u8] = b"checkpoint";

/// What the data directory says about how far the log went (see [`evidence`]).
fn gather_evidence(dir: &Path, meta: &sled::Tree, cursors: &sled::Tree) -> sled::Result<Evidence> {
    let witness = Witness::read(dir)?;
    let checkpoint_file = match std::fs::read_dir(dir.join(CHECKPOINT_DIR)) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let path = entry.path();
                let ours = path.extension().and_then(|e| e.to_str()) == Some(CHECKPOINT_EXTENSION);
                let covers = path.file_stem()?.to_str()?.parse::<u64>().ok()?;
                ours.then_some(covers)
            })
            .max(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(sled::Error::Io(e)),
    };
    let checkpoint_record = meta.get(CHECKPOINT_KEY)?.and_then(|value| {
        value
            .first_chunk::<8>()
            .map(|event| u64::from_be_bytes(*event))
    });
    let mut readers = Vec::new();
    for entry in cursors.iter() {
        let (name, value) = entry?;
        if let Some(cursor) = value.first_chunk::<8>().filter(|_| value.len() == 8) {
            readers.push((
                String::from_utf8_lossy(&name).into_owned(),
                u64::from_be_bytes(*cursor),
            ));
        }
    }
    Ok(Evidence {
        witness,
        witness_path: dir.join(witness::FILE_NAME),
        checkpoint_file,
        checkpoint_record,
        cursors: readers,
    })
}

/// `reader`, a NUL, then `key`: readers' names never contain NUL, so keys cannot collide.
fn note_key(reader: &str, key: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(reader.len() + 1 + key.len());
    bytes.extend_from_slice(reader.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

/// Opens sled, waiting out the lock a just-dropped `Db` may still hold.
fn open_sled(dir: &Path) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_RETRY_BUDGET;
    let mut pause = Duration::from_millis(5);
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .open()
        {
            Err(e) if is_locked(&e) && Instant::now() + pause < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}

/// sled reports a held lock only as an `Other` I/O error with this text (sled 0.34 `config.rs`).
fn is_locked(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(e) if e.to_string().contains("could not acquire lock"))
}

/// What an operator should do about an error from opening the data directory.
fn open_hint(error: &sled::Error) -> &'static str {
    use std::io::ErrorKind;
    match error {
        e if is_locked(e) => {
            "another process (or another EventLog in this process) has it open; stop that \
             server first, only one may use a data directory"
        }
        sled::Error::Io(e) => match e.kind() {
            ErrorKind::PermissionDenied => {
                "permission denied; the server's user needs read and write access to the \
                 directory and the files in it"
            }
            ErrorKind::ReadOnlyFilesystem => "the file system is read-only",
            ErrorKind::NotADirectory | ErrorKind::AlreadyExists => {
                "the path exists but is not a directory; point the server at a directory"
            }
            ErrorKind::StorageFull => "the disk is full",
            _ => "check that the path is right and the disk is healthy",
        },
        sled::Error::Corruption { .. } => {
            "sled found its own files damaged; restore the directory from a backup and keep the \
             damaged copy for investigation"
        }
        sled::Error::Unsupported(_) => {
            "it was written by an incompatible sled version or configuration"
        }
        _ => "this is unexpected; keep the directory for investigation",
    }
}

/// Compile-time proof that the log can be shared between the gRPC handlers and the writer.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<EventLog>();
};

impl Drop for EventLog {
    /// sled flushes when the last handle to a tree is dropped, and after a failed write that
    /// flush never returns (sled 0.34). A log whose write failed therefore keeps one handle
    /// of each tree alive for the rest of the process, so shutdown completes; the process has
    /// to restart before it can write again anyway.
    fn drop(&mut self) {
        let write_failed = self
            .writer
            .get_mut()
            .map_or(true, |writer| writer.write_failed);
        if write_failed {
            std::mem::forget(self.db.clone());
            std::mem::forget(self.events.clone());
            std::mem::forget(self.meta.clone());
        }
    }
}
