//! Evidence that the log once went further than it does now: what start-up compares the
//! end of the stored log with.
//!
//! sled's recovery treats a damaged record of its own log as its end, so a flipped byte can
//! cut the last events and leave a valid, shorter chain. Whatever recorded a later position
//! and survived the cut shows the loss: the head witness (outside sled, written after every
//! durable batch, see [`super::witness`]), checkpoint files (named by the last event they
//! include), the record of the newest checkpoint (the event that vouches for it), and the
//! cursors of followers (never ahead of the durable head). The head record in sled is
//! compared at open as well (see `chain::compare_head`).
//!
//! This module only decides; the store gathers the evidence.

use std::path::PathBuf;

use super::chain::Problem;
use super::codec::HASH_LEN;
use super::witness::Witnessed;

/// What the data directory says about how far the log went.
#[derive(Debug, Clone)]
pub(crate) struct Evidence {
    pub witness: Witnessed,
    pub witness_path: PathBuf,
    /// The greatest `covers` of the checkpoint files on disk.
    pub checkpoint_file: Option<u64>,
    /// The event the record of the newest checkpoint names as vouching for it.
    pub checkpoint_record: Option<u64>,
    /// Each follower's cursor: the last event it handed on.
    pub cursors: Vec<(String, u64)>,
}

/// A log that lost its end, or was changed where the witness saw it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Loss {
    pub problem: Problem,
    /// The greatest sequence the evidence shows the log reached (0 when unknown).
    pub reached: u64,
}

impl Evidence {
    /// Compares the evidence with a log whose last stored event is `ends_at`; `hash_at`
    /// gives the stored hash of an event (`None` if missing).
    pub fn check(
        &self,
        ends_at: u64,
        hash_at: impl Fn(u64) -> Option<[u8; HASH_LEN]>,
    ) -> Option<Loss> {
        let mut beyond: Vec<(u64, String)> = Vec::new();
        if let Some(covers) = self.checkpoint_file.filter(|c| *c > ends_at) {
            beyond.push((covers, format!("checkpoint {} exists", grouped(covers))));
        }
        if let Some(event) = self.checkpoint_record.filter(|e| *e > ends_at) {
            beyond.push((
                event,
                format!(
                    "the newest checkpoint's record names event {}",
                    grouped(event)
                ),
            ));
        }
        if let Witnessed::Head { sequence, .. } = &self.witness
            && *sequence > ends_at
        {
            beyond.push((
                *sequence,
                format!("the head witness records event {}", grouped(*sequence)),
            ));
        }
        for (name, cursor) in &self.cursors {
            if *cursor > ends_at {
                beyond.push((
                    *cursor,
                    format!(
                        "reader {name} has handed on events up to {}",
                        grouped(*cursor)
                    ),
                ));
            }
        }
        if !beyond.is_empty() {
            beyond.sort_by_key(|(sequence, _)| std::cmp::Reverse(*sequence));
            let reached = beyond[0].0;
            let said: Vec<&str> = beyond.iter().map(|(_, s)| s.as_str()).collect();
            return Some(Loss {
                problem: Problem {
                    sequence: ends_at + 1,
                    message: format!(
                        "the log ends at {} but {}: events {} to {} are missing (sled's recovery \
                         stops at a damaged record of its own log); restore the data directory \
                         from a backup, or accept the loss with `countersign log accept-loss`",
                        grouped(ends_at),
                        said.join(", and "),
                        grouped(ends_at + 1),
                        grouped(reached),
                    ),
                },
                reached,
            });
        }
        match &self.witness {
            Witnessed::Damaged(why) => Some(Loss {
                problem: Problem {
                    sequence: ends_at + 1,
                    message: format!(
                        "the head witness {} is damaged ({why}), so whether the log lost events \
                         after {} is unknown; compare with a backup or an anchored head, then \
                         accept with `countersign log accept-loss`",
                        self.witness_path.display(),
                        grouped(ends_at),
                    ),
                },
                reached: 0,
            }),
            Witnessed::Head { sequence, hash } if *sequence > 0 => match hash_at(*sequence) {
                Some(stored) if stored == *hash => None,
                Some(_) => Some(Loss {
                    problem: Problem {
                        sequence: *sequence,
                        message: format!(
                            "event {} is not the one the head witness recorded: the log was \
                             rewritten at or before it",
                            grouped(*sequence)
                        ),
                    },
                    reached: *sequence,
                }),
                None => Some(Loss {
                    problem: Problem {
                        sequence: *sequence,
                        message: format!(
                            "event {}, which the head witness records, is missing",
                            grouped(*sequence)
                        ),
                    },
                    reached: *sequence,
                }),
            },
            _ => None,
        }
    }
}

/// `2100` as `2,100`: sequence numbers in messages people read.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(witness: Witnessed) -> Evidence {
        Evidence {
            witness,
            witness_path: PathBuf::from("log/head.witness"),
            checkpoint_file: None,
            checkpoint_record: None,
            cursors: Vec::new(),
        }
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_790), "1,790");
        assert_eq!(grouped(12_345_678), "12,345,678");
    }

    #[test]
    fn a_checkpoint_beyond_the_end_is_a_loss_named_in_the_message() {
        let mut found = evidence(Witnessed::Absent);
        found.checkpoint_file = Some(2_100);
        let loss = found.check(1_790, |_| Some([0; 32])).unwrap();
        assert_eq!(loss.problem.sequence, 1_791);
        assert_eq!(loss.reached, 2_100);
        assert!(
            loss.problem
                .message
                .starts_with("the log ends at 1,790 but checkpoint 2,100 exists"),
            "{}",
            loss.problem.message
        );
    }

    #[test]
    fn every_kind_of_evidence_counts_and_the_furthest_is_reached() {
        let mut found = evidence(Witnessed::Head {
            sequence: 12,
            hash: [1; 32],
        });
        found.checkpoint_record = Some(11);
        found.cursors = vec![("otlp-spans".into(), 13), ("notify-slack".into(), 5)];
        let loss = found.check(10, |_| None).unwrap();
        assert_eq!(loss.reached, 13);
        let message = loss.problem.message;
        for said in ["witness records event 12", "names event 11", "otlp-spans"] {
            assert!(message.contains(said), "{message}");
        }
        assert!(!message.contains("notify-slack"), "{message}");
    }

    #[test]
    fn a_witness_at_or_below_the_end_must_match_the_stored_hash() {
        let found = evidence(Witnessed::Head {
            sequence: 5,
            hash: [1; 32],
        });
        assert_eq!(found.check(9, |_| Some([1; 32])), None);
        let rewritten = found.check(9, |_| Some([2; 32])).unwrap();
        assert!(rewritten.problem.message.contains("rewritten"));
        assert!(found.check(9, |_| None).is_some());
    }

    #[test]
    fn no_witness_or_an_empty_one_is_no_evidence_but_a_damaged_one_is() {
        assert_eq!(evidence(Witnessed::Absent).check(9, |_| None), None);
        assert_eq!(evidence(Witnessed::Empty).check(9, |_| None), None);
        let damaged = evidence(Witnessed::Damaged("x".into()))
            .check(9, |_| None)
            .unwrap();
        assert!(damaged.problem.message.contains("damaged"));
    }
}
