//! The one error type of the event log. Every message says what happened and, where the operator
//! can act, what to do; none of them needs the source chain to make sense.

use std::path::PathBuf;

/// Why an event-log operation failed.
///
/// Causes are included in the message rather than exposed as `source()`, so a log line that
/// prints only the top-level error still shows them, and a reporter that walks the chain does
/// not print them twice.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be opened; `hint` says what to do about it.
    #[error("cannot open the event log at {}: {hint} (sled: {error})", path.display())]
    Open {
        path: PathBuf,
        hint: &'static str,
        error: sled::Error,
    },
    /// sled's own files are damaged (it reported corruption, or panicked reading them).
    #[error(
        "the event log at {} is damaged ({detail}); restore the data directory from a backup and keep the damaged copy for investigation",
        path.display()
    )]
    Damaged { path: PathBuf, detail: String },
    /// A loss of events cannot be accepted as asked; nothing was written.
    #[error("cannot accept the loss: {0}")]
    Acceptance(String),
    /// A batch could not be written or made durable. Nothing more is accepted afterwards.
    #[error("writing to the event log failed: {0}")]
    Write(sled::Error),
    /// sled could not read the tree (an I/O error, or its own files are damaged).
    #[error("reading the event log failed: {0}")]
    Read(sled::Error),
    /// A stored event is damaged, missing or out of place: tampering or storage corruption.
    #[error("the event log is corrupt: {problem}")]
    Corrupt { sequence: u64, problem: String },
    /// An event of a batch cannot be stored as given; nothing of the batch was written.
    #[error(
        "cannot store event {index} of the batch (counting from 0), so nothing was written: {problem}"
    )]
    Encode { index: usize, problem: String },
    /// Appends are refused because the log is in a state where writing could lose evidence.
    #[error("the event log does not accept writes: {reason}")]
    WritesRefused { reason: String },
}
