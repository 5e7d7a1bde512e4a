//! The head witness: the sequence and hash of the last durable event, kept in a small file
//! beside sled's, outside sled.
//!
//! Why it exists: sled 0.34's recovery treats a damaged record of its own log as the end of
//! that log. One flipped byte can so cut the last events, the head record and every cursor
//! with them, and the hash chain cannot see a missing tail: what is left is a valid, shorter
//! chain. A record that sled does not hold survives that cut. [`EventLog::append`] writes
//! the witness after each batch is durable (and before any caller hears back), so at start-up
//! a log that ends before the witness, or holds another event where the witness says, has
//! lost or changed events that were acknowledged.
//!
//! Each batch's record is one `pwrite` (microseconds); a thread of the witness's own
//! `fdatasync`s it at most [`SYNC_EVERY`] later, and at once when the log is closed. An
//! `fdatasync` per batch doubled to quadrupled the cost of a small group commit on the
//! development machine's disk (the sync of a second file forces a second journal commit).
//! So the witness is in the page cache, and survives a crash of the process, as soon as a
//! caller hears back; it is on disk within a second. Only a power cut less than a second
//! after a batch, together with sled then losing that batch, can hide its loss.
//!
//! Format: one [`RECORD_LEN`]-byte record at offset 0 of a file of [`FILE_LEN`] bytes,
//! allocated once (so an update never changes the file's size or its blocks, and one
//! `fdatasync` of one block makes it durable): the eight bytes `CSWITN\0\x01`, the sequence
//! (8 bytes big-endian), the hash (32 bytes), then the first 16 bytes of SHA-256 of the 48
//! before, so a torn or damaged record is recognised as such instead of read as a head.
//!
//! It cannot stop someone who can write the data directory: deleting the file, or writing
//! it with a forged head, is as easy as editing sled. It is against storage damage, not
//! against an attacker (see the store's module doc for anchoring a head elsewhere).
//!
//! [`EventLog::append`]: super::EventLog::append

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::codec::HASH_LEN;

/// The witness's file name, in the data directory.
pub const FILE_NAME: &str = "head.witness";

const MAGIC: &[u8; 8] = b"CSWITN\0\x01";
const RECORD_LEN: usize = 8 + 8 + HASH_LEN + 16;
/// One file-system block: the record never straddles two, and the file never grows.
const FILE_LEN: u64 = 4096;

/// A record written is on disk at most this long after.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

/// What the witness file says.
#[derive(Debug, Clone, PartialEq)]
pub enum Witnessed {
    /// No witness file: a new data directory, or one written before witnesses existed.
    Absent,
    /// The file exists but holds no head yet (allocated, never written).
    Empty,
    Head {
        sequence: u64,
        hash: [u8; HASH_LEN],
    },
    /// The record does not read back: what it witnessed is unknown.
    Damaged(String),
}

/// The open witness file, written after every durable batch.
pub struct Witness {
    file: Arc<File>,
    path: PathBuf,
    /// Shared with the syncing thread.
    sync: Arc<SyncState>,
    /// `fdatasync`s the file at most [`SYNC_EVERY`] after a record; joined on drop, after a
    /// last sync.
    syncer: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct SyncState {
    /// A record was written since the last sync.
    dirty: AtomicBool,
    stop: AtomicBool,
    /// Why the last background sync failed: the next record reports it, and the log
    /// then refuses writes.
    failed: Mutex<Option<String>>,
}

impl Witness {
    /// Reads the witness of the log in `dir` without creating anything.
    pub fn read(dir: &Path) -> std::io::Result<Witnessed> {
        let path = dir.join(FILE_NAME);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Witnessed::Absent),
            Err(e) => return Err(e),
        };
        let mut record = Vec::with_capacity(RECORD_LEN);
        file.take(RECORD_LEN as u64).read_to_end(&mut record)?;
        Ok(decode(&record))
    }

    /// Opens the witness file in `dir` for writing, creating and allocating it (durably,
    /// with its directory entry) if it is missing.
    pub fn open(dir: &Path) -> std::io::Result<Witness> {
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new().read(true).write(true).open(&path);
        let file = match file {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let temporary = dir.join(format!("{FILE_NAME}.partial"));
                let mut file = File::create(&temporary)?;
                // Real zeros, not `set_len`: a sparse file would allocate its block, and
                // change its metadata, on the first record.
                file.write_all(&[0u8; FILE_LEN as usize])?;
                file.sync_all()?;
                std::fs::rename(&temporary, &path)?;
                File::open(dir)?.sync_all()?;
                OpenOptions::new().read(true).write(true).open(&path)?
            }
            Err(e) => return Err(e),
        };
        let file = Arc::new(file);
        let sync = Arc::new(SyncState::default());
        let syncer = {
            let (file, sync) = (file.clone(), sync.clone());
            std::thread::Builder::new()
                .name("event-log-witness".to_owned())
                .spawn(move || sync_in_background(&file, &sync))?
        };
        Ok(Witness {
            file,
            path,
            sync,
            syncer: Some(syncer),
        })
    }

    /// Records `sequence` and `hash` as the durable head: one write at offset 0, on disk
    /// within [`SYNC_EVERY`] (see the module doc). Fails if the last background sync did.
    pub fn record(&self, sequence: u64, hash: &[u8; HASH_LEN]) -> std::io::Result<()> {
        if let Some(failed) = self
            .sync
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(std::io::Error::other(format!(
                "the last sync of the head witness failed: {failed}"
            )));
        }
        self.file.write_all_at(&encode(sequence, hash), 0)?;
        self.sync.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// [`Witness::record`], then `fdatasync`: durable when this returns.
    pub fn record_durably(&self, sequence: u64, hash: &[u8; HASH_LEN]) -> std::io::Result<()> {
        self.record(sequence, hash)?;
        self.sync.dirty.store(false, Ordering::Release);
        self.file.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Witness {
    /// A last sync, so a clean stop leaves the witness on disk.
    fn drop(&mut self) {
        self.sync.stop.store(true, Ordering::Release);
        if let Some(syncer) = self.syncer.take() {
            syncer.thread().unpark();
            let _ = syncer.join();
        }
    }
}

/// The syncing thread: every [`SYNC_EVERY`], and once more when stopped, syncs the file if
/// a record was written since the last time.
fn sync_in_background(file: &File, sync: &SyncState) {
    loop {
        std::thread::park_timeout(SYNC_EVERY);
        let stopping = sync.stop.load(Ordering::Acquire);
        if sync.dirty.swap(false, Ordering::AcqRel)
            && let Err(e) = file.sync_data()
        {
            *sync.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
        }
        if stopping {
            return;
        }
    }
}

fn checksum(bytes: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(bytes);
    let mut sum = [0u8; 16];
    sum.copy_from_slice(&digest[..16]);
    sum
}

fn encode(sequence: u64, hash: &[u8; HASH_LEN]) -> [u8; RECORD_LEN] {
    let mut record = [0u8; RECORD_LEN];
    record[..8].copy_from_slice(MAGIC);
    record[8..16].copy_from_slice(&sequence.to_be_bytes());
    record[16..16 + HASH_LEN].copy_from_slice(hash);
    let sum = checksum(&record[..16 + HASH_LEN]);
    record[16 + HASH_LEN..].copy_from_slice(&sum);
    record
}

fn decode(record: &[u8]) -> Witnessed {
    if record.len() == RECORD_LEN && record.iter().all(|b| *b == 0) {
        return Witnessed::Empty;
    }
    let (Some(body), Some(sum)) = (record.get(..16 + HASH_LEN), record.get(16 + HASH_LEN..)) else {
        return Witnessed::Damaged(format!(
            "it is {} bytes, shorter than a record",
            record.len()
        ));
    };
    if !body.starts_with(MAGIC) {
        return Witnessed::Damaged("it does not start with the witness's magic bytes".into());
    }
    if sum != checksum(body) {
        return Witnessed::Damaged("its checksum does not match its record".into());
    }
    let mut sequence = [0u8; 8];
    sequence.copy_from_slice(&body[8..16]);
    let mut hash = [0u8; HASH_LEN];
    hash.copy_from_slice(&body[16..]);
    Witnessed::Head {
        sequence: u64::from_be_bytes(sequence),
        hash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_head_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Witness::read(dir.path()).unwrap(), Witnessed::Absent);
        let witness = Witness::open(dir.path()).unwrap();
        assert_eq!(Witness::read(dir.path()).unwrap(), Witnessed::Empty);
        witness.record(41, &[7; HASH_LEN]).unwrap();
        witness.record(42, &[9; HASH_LEN]).unwrap();
        assert_eq!(
            Witness::read(dir.path()).unwrap(),
            Witnessed::Head {
                sequence: 42,
                hash: [9; HASH_LEN]
            }
        );
        let len = std::fs::metadata(witness.path()).unwrap().len();
        assert_eq!(len, FILE_LEN, "the file never grows");
    }

    #[test]
    fn any_changed_byte_of_the_record_is_damage() {
        let record = encode(1_790, &[3; HASH_LEN]);
        for at in 0..RECORD_LEN {
            let mut changed = record;
            changed[at] ^= 0x10;
            assert!(
                matches!(decode(&changed), Witnessed::Damaged(_)),
                "byte {at}"
            );
        }
    }
}
