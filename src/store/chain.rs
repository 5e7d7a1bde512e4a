//! Walking the chain: the checks that need an event's neighbours (no gaps, each event links to
//! the one before) and the comparison of the log's end with the recorded head.
//!
//! Iteration and `verify` share this code, so a replay at start-up and an auditor's
//! verification report tampering in the same words at the same sequence. The one difference:
//! `verify` does not decode a body whose hash already proves it is what `append` wrote.

use super::StoredEvent;
use super::codec::{self, HASH_LEN};

/// The first thing wrong with the log, located at a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Problem {
    pub sequence: u64,
    pub message: String,
}

/// Position in the chain: which sequence must come next and which hash it must link to.
pub(crate) struct Chain {
    /// Where this walk started.
    start: u64,
    next: u64,
    /// `None` when the walk started mid-log without its predecessor's hash (a slice of a
    /// parallel verification, or a predecessor that could not be read): the first event's link
    /// is then checked by whoever joins the walks, or left to `verify`.
    prev_hash: Option<[u8; HASH_LEN]>,
    /// The `prev_hash` of the first event that passed, for joining this walk to the one before.
    first_prev_hash: Option<[u8; HASH_LEN]>,
    /// Events that passed every check so far.
    pub checked: u64,
}

impl Chain {
    pub fn genesis() -> Chain {
        Chain::resume(1, Some(codec::GENESIS_HASH))
    }

    pub fn resume(next: u64, prev_hash: Option<[u8; HASH_LEN]>) -> Chain {
        // Sequence numbers start at 1; clamping keeps `next - 1` meaningful.
        let next = next.max(1);
        Chain {
            start: next,
            next,
            prev_hash,
            first_prev_hash: None,
            checked: 0,
        }
    }

    fn advance(&mut self, prev_hash: [u8; HASH_LEN], hash: [u8; HASH_LEN]) {
        if self.checked == 0 {
            self.first_prev_hash = Some(prev_hash);
        }
        self.next = self.next.saturating_add(1);
        self.prev_hash = Some(hash);
        self.checked += 1;
    }

    /// Where the next walk must start to continue this one.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Extends this walk by `later` when `later` starts exactly where this one ends and its first
    /// event links to this one's last.
    /// Returns false (and changes nothing) otherwise: the caller then walks that part again in
    /// order, so problems are reported exactly as a single walk would report them.
    pub fn join(&mut self, later: &Chain) -> bool {
        let continues = later.checked > 0
            && later.start == self.next
            && self.prev_hash.is_some()
            && later.first_prev_hash == self.prev_hash;
        if continues {
            self.next = later.next;
            self.prev_hash = later.prev_hash;
            self.checked += later.checked;
        }
        continues
    }

    /// The last event that passed, as `(sequence, hash)`; `(0, zeros)` before the first.
    pub fn last(&self) -> (u64, [u8; HASH_LEN]) {
        (
            self.next.saturating_sub(1),
            self.prev_hash.unwrap_or(codec::GENESIS_HASH),
        )
    }

    /// Checks the next `(key, value)` pair of the `events` tree without decoding it, when it can:
    /// the right key, and a stored hash equal to `SHA-256(previous hash || body)`. That one
    /// comparison proves the body is byte for byte what `append` wrote after this chain's last
    /// event, and `append` only writes bodies that read back exactly. Anything else goes through
    /// [`Chain::check`], which explains what is wrong (or accepts the first event of a walk that
    /// started without its predecessor's hash).
    pub fn check_linked(&mut self, key: &[u8], value: &[u8]) -> Result<(), Problem> {
        if let (Some(prev), Some(sequence), Some((stored, body))) = (
            self.prev_hash,
            codec::decode_key(key),
            value.split_first_chunk::<HASH_LEN>(),
        ) && sequence == self.next
            && codec::chain_hash(&prev, body) == *stored
        {
            self.advance(prev, *stored);
            return Ok(());
        }
        self.check(key, value).map(drop)
    }

    /// Checks the next `(key, value)` pair of the `events` tree, in key order, and decodes it.
    pub fn check(&mut self, key: &[u8], value: &[u8]) -> Result<StoredEvent, Problem> {
        let expected = self.next;
        let fail = |message: String| Problem {
            sequence: expected,
            message,
        };
        let Some(sequence) = codec::decode_key(key) else {
            return Err(fail(format!(
                "event {expected}: a key that is not a sequence number (0x{}) is stored where \
                 event {expected} should be (the log was edited outside countersign)",
                hex::encode(key)
            )));
        };
        if sequence < expected {
            return Err(fail(format!(
                "event {expected}: key {sequence} is stored where event {expected} should be \
                 (sequence numbers start at 1; the log was edited outside countersign)"
            )));
        }
        if sequence > expected {
            let after = match expected {
                1 => "the log starts at".to_owned(),
                _ => format!("the log jumps from {} to", expected - 1),
            };
            let what = if sequence - expected == 1 {
                format!("event {expected} is missing")
            } else {
                format!("events {expected} to {} are missing", sequence - 1)
            };
            return Err(fail(format!("{what}: {after} {sequence}")));
        }
        let event = codec::decode(sequence, value).map_err(fail)?;
        if let Some(prev) = self.prev_hash
            && event.prev_hash != prev
        {
            return Err(fail(format!(
                "event {sequence}: its prev_hash does not match the hash of event {} (an event \
                 before it was replaced, or events were reordered)",
                sequence - 1
            )));
        }
        self.advance(event.prev_hash, event.hash);
        Ok(event)
    }
}

/// Compares where a walk ended, `last = (sequence, hash)`, with the recorded head.
///
/// `recorded` is `Err` when the head record exists but cannot be read, `Ok(None)` when there is
/// none (correct only for an empty log). The reported sequence is the first one the head no longer
/// vouches for.
pub(crate) fn compare_head(
    last: (u64, [u8; HASH_LEN]),
    recorded: &Result<Option<(u64, [u8; HASH_LEN])>, String>,
) -> Option<Problem> {
    let (last_seq, last_hash) = last;
    let (head_seq, head_hash) = match recorded {
        Ok(Some(head)) => *head,
        Ok(None) if last_seq == 0 => return None,
        Ok(None) => {
            return Some(Problem {
                sequence: last_seq.saturating_add(1),
                message: format!(
                    "the head record is missing although the log holds events 1 to {last_seq}: \
                     events deleted from the end cannot be ruled out"
                ),
            });
        }
        Err(why) => {
            return Some(Problem {
                sequence: last_seq.saturating_add(1),
                message: format!(
                    "the head record cannot be read ({why}): events deleted from the end cannot \
                     be ruled out"
                ),
            });
        }
    };
    if head_seq > last_seq {
        let what = if head_seq - last_seq == 1 {
            format!("event {head_seq} is missing")
        } else {
            format!("events {} to {head_seq} are missing", last_seq + 1)
        };
        return Some(Problem {
            sequence: last_seq + 1,
            message: format!(
                "{what}: the log ends at event {last_seq} but its recorded head is event \
                 {head_seq} (events were deleted from the end)"
            ),
        });
    }
    if head_seq < last_seq {
        return Some(Problem {
            sequence: head_seq + 1,
            message: format!(
                "event {}: it lies beyond the recorded head (event {head_seq}), so it was added \
                 outside countersign or the head record was rolled back",
                head_seq + 1
            ),
        });
    }
    if head_hash != last_hash {
        return Some(Problem {
            sequence: head_seq,
            message: format!(
                "event {head_seq}: its hash does not match the recorded head hash (the end of \
                 the log or the head record was changed)"
            ),
        });
    }
    None
}
