//! `review watch`: a reviewer's live list of what waits for them.
//!
//! One task follows `StreamPending` and prints each message as it arrives; it stops on
//! Ctrl-C (or SIGTERM), exiting 0. The connection is the only thing that may fail, and a
//! lost one is reopened with backoff, resuming where the stream left off ([`Resume`]
//! holds the protocol rules). Only the very first connection is allowed to fail the
//! command: a reviewer who mistyped `--server` hears about it at once, while one who has
//! been watching for hours keeps watching through a server restart.
//!
//! Notices about the connection go to stderr, so stdout carries only the list (or, with
//! `--json`, only one JSON object per message received).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use tonic::Code;

use super::client::Connector;
use super::text::{self, Detail, Style};
use super::{CliError, CommonArgs, is_refusal, note, print, render};
use crate::proto;
use crate::proto::stream_pending_response::Event as StreamEvent;

/// First wait before reconnecting; doubled after each failed attempt up to the maximum.
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest wait between attempts: a restarted server is picked up within this.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub async fn run(args: &CommonArgs) -> Result<(), CliError> {
    let connector = Connector::new(args)?;
    let stop = stop_signal()?;
    tokio::pin!(stop);

    let mut watcher = Watcher {
        connector: &connector,
        json: args.json,
        resume: Resume::default(),
        view: View::new(Style::for_stdout()),
        backoff: Backoff::default(),
        connected_once: false,
    };
    loop {
        let ended = tokio::select! {
            ended = watcher.follow() => ended,
            () = &mut stop => return Ok(()),
        };
        let delay = match ended {
            Ended::Fatal(error) => return Err(error),
            Ended::Lost(error) if !watcher.connected_once => return Err(error),
            Ended::Lost(error) => {
                let delay = watcher.backoff.next();
                note(&format!(
                    "countersign: connection lost ({error}); reconnecting in {}\n",
                    humantime::format_duration(round_to_millis(delay))
                ));
                delay
            }
            Ended::Resync(reason) => {
                note(&format!(
                    "countersign: the server asked for a fresh start ({}); reconnecting\n",
                    text::clean(&reason)
                ));
                // A server that keeps asking must not be hammered either.
                watcher.backoff.next()
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut stop => return Ok(()),
        }
    }
}

/// Why one connection's stream ended.
enum Ended {
    /// Retrying cannot help (the server refused us, or stdout is gone).
    Fatal(CliError),
    /// The connection or stream broke; reconnect and resume.
    Lost(CliError),
    /// The server asked for a fresh snapshot.
    Resync(String),
}

/// State that outlives a single connection.
struct Watcher<'a> {
    connector: &'a Connector,
    json: bool,
    resume: Resume,
    view: View,
    backoff: Backoff,
    /// Set once a stream opened; from then on a lost connection is retried, not fatal.
    connected_once: bool,
}

impl Watcher<'_> {
    /// Opens one stream and prints its messages until it ends.
    async fn follow(&mut self) -> Ended {
        let after = self.resume.begin();
        let mut client = match self.connector.connect().await {
            Ok(client) => client,
            Err(error) => return Ended::Lost(error),
        };
        let request = tonic::Request::new(proto::StreamPendingRequest {
            after_sequence: after,
        });
        // Only opening is bounded by --timeout; the stream itself is meant to stay open.
        let opened =
            tokio::time::timeout(self.connector.timeout(), client.stream_pending(request)).await;
        let mut stream = match opened {
            Err(_) => return Ended::Lost(CliError::TimedOut(self.connector.timeout())),
            Ok(Err(status)) => return classify(status),
            Ok(Ok(response)) => response.into_inner(),
        };
        if self.connected_once {
            let how = if after == 0 {
                "taking a fresh snapshot".to_string()
            } else {
                format!("resuming after sequence {after}")
            };
            note(&format!(
                "countersign: reconnected to {}; {how}\n",
                self.connector.server()
            ));
        }
        self.connected_once = true;
        if after == 0 {
            self.view.begin_snapshot();
        }
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    return Ended::Lost(CliError::Other("the server closed the stream".into()));
                }
                // The server cut the stream (it fell behind, or cannot resume); the
                // resync notice normally comes first, this is for one that got lost.
                Err(status) if status.code() == Code::Aborted => {
                    self.resume.start_over();
                    return Ended::Resync(status.message().to_string());
                }
                Err(status) => return classify(status),
            };
            self.backoff.reset();
            let printed = if self.json {
                print(&format!("{}\n", render::stream_message(&message)))
            } else {
                print(&self.view.render(&message))
            };
            if let Err(error) = printed {
                return Ended::Fatal(error);
            }
            if let Step::Resync(reason) = self.resume.observe(&message) {
                return Ended::Resync(reason);
            }
        }
    }
}

/// A refusal ends the watch; anything else is a connection problem worth retrying.
fn classify(status: tonic::Status) -> Ended {
    let code = status.code();
    if is_refusal(code) || matches!(code, Code::Unauthenticated | Code::Unimplemented) {
        Ended::Fatal(CliError::Status(status))
    } else {
        Ended::Lost(CliError::Status(status))
    }
}

/// Where to resume after a reconnect. The rule (see the server's `review_stream`): the
/// sequence of the last message received may be resumed from only once the snapshot is
/// complete; snapshot items carry their own action's sequence, not the stream's position,
/// so a stream cut during the snapshot starts over with 0.
#[derive(Debug, Default)]
struct Resume {
    /// What the next connection asks for: 0 for a fresh snapshot.
    after: u64,
    /// The current stream is still sending its snapshot.
    in_snapshot: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    Resync(String),
}

impl Resume {
    /// A new stream starts; returns the `after_sequence` to ask for.
    fn begin(&mut self) -> u64 {
        self.in_snapshot = self.after == 0;
        self.after
    }

    /// The next connection takes a fresh snapshot.
    fn start_over(&mut self) {
        self.after = 0;
    }

    fn observe(&mut self, message: &proto::StreamPendingResponse) -> Step {
        match &message.event {
            Some(StreamEvent::ResyncRequired(resync)) => {
                self.after = 0;
                Step::Resync(resync.reason.clone())
            }
            Some(StreamEvent::SnapshotComplete(_)) => {
                self.in_snapshot = false;
                self.after = message.sequence;
                Step::Continue
            }
            _ if self.in_snapshot => Step::Continue,
            // Never move backwards, whatever a server sends.
            _ => {
                self.after = self.after.max(message.sequence);
                Step::Continue
            }
        }
    }
}

/// The human-readable list: remembers what is pending so resolutions can say what they
/// were about, and so a fresh snapshot after a reconnect prints only what is new.
struct View {
    style: Style,
    /// Actions shown as pending and not yet seen resolved, by id.
    pending: BTreeMap<String, proto::ActionRecord>,
    /// While a snapshot is arriving: the ids it contained so far.
    snapshot: Option<BTreeSet<String>>,
}

impl View {
    fn new(style: Style) -> View {
        View {
            style,
            pending: BTreeMap::new(),
            snapshot: None,
        }
    }

    fn begin_snapshot(&mut self) {
        self.snapshot = Some(BTreeSet::new());
    }

    /// The text for one message (possibly nothing).
    fn render(&mut self, message: &proto::StreamPendingResponse) -> String {
        match &message.event {
            Some(StreamEvent::Pending(record)) => {
                let id = record.action_id.clone();
                if let Some(seen) = &mut self.snapshot {
                    seen.insert(id.clone());
                }
                let new = self.pending.insert(id, record.clone()).is_none();
                if new {
                    let block = text::action_block(record, Utc::now(), self.style, Detail::Review);
                    format!("{block}\n")
                } else {
                    String::new()
                }
            }
            Some(StreamEvent::VoteAdded(added)) => {
                if let (Some(record), Some(vote)) =
                    (self.pending.get_mut(&added.action_id), &added.vote)
                    && !record.votes.iter().any(|v| v.sequence == vote.sequence)
                {
                    record.votes.push(vote.clone());
                }
                text::vote_line(added, self.style)
            }
            Some(StreamEvent::Resolved(resolved)) => {
                let known = self.pending.remove(&resolved.action_id);
                text::resolved_line(resolved, known.as_ref(), self.style)
            }
            Some(StreamEvent::SnapshotComplete(complete)) => {
                let mut out = String::new();
                if let Some(seen) = self.snapshot.take() {
                    // Known from before a reconnect but no longer pending: decided meanwhile.
                    let gone: Vec<String> = self
                        .pending
                        .keys()
                        .filter(|id| !seen.contains(*id))
                        .cloned()
                        .collect();
                    for id in gone {
                        self.pending.remove(&id);
                        out.push_str(&format!(
                            "{:<10}{}  no longer pending (decided while disconnected)\n",
                            "gone",
                            text::clean(&id)
                        ));
                    }
                }
                out.push_str(&text::snapshot_line(complete.pending_count));
                out
            }
            Some(StreamEvent::CaughtUp(_)) => text::caught_up_line(self.pending.len()),
            Some(StreamEvent::ResyncRequired(_)) | None => String::new(),
        }
    }
}

/// Exponential backoff between reconnect attempts, reset by any message received.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = self.base();
        self.failures = self.failures.saturating_add(1);
        // Up to a quarter more, so reviewers cut off together do not return in lockstep.
        base + base.mul_f64(jitter() / 4.0)
    }

    /// The next wait before its jitter: doubling from `BACKOFF_START` with each failure,
    /// capped at `BACKOFF_MAX`.
    fn base(&self) -> Duration {
        BACKOFF_START
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(BACKOFF_MAX)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A number in [0, 1) that differs between processes; good enough to spread reconnects.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

fn round_to_millis(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// Resolves on Ctrl-C or SIGTERM. Registered before the first connection, so a signal
/// that arrives while connecting still ends the watch cleanly.
fn stop_signal() -> Result<impl Future<Output = ()>, CliError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let cannot = |e: std::io::Error| CliError::Other(format!("cannot handle signals: {e}"));
        let mut interrupt = signal(SignalKind::interrupt()).map_err(cannot)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(cannot)?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sequence: u64, event: StreamEvent) -> proto::StreamPendingResponse {
        proto::StreamPendingResponse {
            sequence,
            event: Some(event),
        }
    }

    fn pending(sequence: u64, id: &str) -> proto::StreamPendingResponse {
        message(
            sequence,
            StreamEvent::Pending(proto::ActionRecord {
                action_id: id.into(),
                ..Default::default()
            }),
        )
    }

    fn complete(sequence: u64, count: u32) -> proto::StreamPendingResponse {
        message(
            sequence,
            StreamEvent::SnapshotComplete(proto::SnapshotComplete {
                pending_count: count,
            }),
        )
    }

    fn resolved(sequence: u64, id: &str) -> proto::StreamPendingResponse {
        message(
            sequence,
            StreamEvent::Resolved(proto::ActionResolved {
                action_id: id.into(),
                status: proto::ActionStatus::Approved as i32,
                ..Default::default()
            }),
        )
    }

    #[test]
    fn a_stream_cut_during_the_snapshot_starts_over() {
        let mut resume = Resume::default();
        assert_eq!(resume.begin(), 0);
        // Snapshot items carry their action's sequence, not the stream position.
        resume.observe(&pending(40, "a"));
        assert_eq!(
            resume.begin(),
            0,
            "cut before snapshot_complete: start over"
        );
    }

    #[test]
    fn after_the_snapshot_the_last_sequence_received_is_resumed_from() {
        let mut resume = Resume::default();
        resume.begin();
        resume.observe(&pending(40, "a"));
        resume.observe(&complete(57, 1));
        assert_eq!(resume.after, 57);
        resume.observe(&resolved(60, "a"));
        assert_eq!(resume.begin(), 60);
        // A resumed stream has no snapshot: every message moves the position.
        resume.observe(&pending(61, "b"));
        assert_eq!(resume.begin(), 61);
    }

    #[test]
    fn a_resync_request_means_a_fresh_snapshot() {
        let mut resume = Resume::default();
        resume.begin();
        resume.observe(&complete(57, 0));
        let step = resume.observe(&message(
            0,
            StreamEvent::ResyncRequired(proto::ResyncRequired {
                reason: "too slow".into(),
            }),
        ));
        assert_eq!(step, Step::Resync("too slow".into()));
        assert_eq!(resume.begin(), 0);
    }

    #[test]
    fn caught_up_moves_the_resume_position_to_where_the_stream_stands() {
        let mut resume = Resume::default();
        resume.begin();
        resume.observe(&complete(57, 0));
        assert_eq!(resume.begin(), 57);
        resume.observe(&message(63, StreamEvent::CaughtUp(proto::CaughtUp {})));
        assert_eq!(resume.begin(), 63);
    }

    #[test]
    fn the_resume_position_never_moves_backwards() {
        let mut resume = Resume::default();
        resume.begin();
        resume.observe(&complete(57, 0));
        resume.observe(&resolved(3, "odd"));
        assert_eq!(resume.after, 57);
    }

    #[test]
    fn a_fresh_snapshot_after_a_reconnect_prints_only_what_changed() {
        let mut view = View::new(Style::plain());
        view.begin_snapshot();
        assert!(view.render(&pending(1, "a")).contains("action a"));
        assert!(view.render(&pending(2, "b")).contains("action b"));
        assert!(
            view.render(&complete(2, 2))
                .contains("— 2 pending; watching for more —")
        );

        // Reconnected with a fresh snapshot: a still pending, b decided meanwhile, c new.
        view.begin_snapshot();
        assert_eq!(view.render(&pending(1, "a")), "");
        assert!(view.render(&pending(5, "c")).contains("action c"));
        let end = view.render(&complete(6, 2));
        assert!(end.contains("b  no longer pending"), "{end}");
        assert!(!end.contains("a  no longer"), "{end}");
    }

    #[test]
    fn a_resolution_says_what_was_resolved() {
        let mut view = View::new(Style::plain());
        let mut record = proto::ActionRecord {
            action_id: "a".into(),
            ..Default::default()
        };
        record.action = Some(proto::Action {
            r#type: "iam.role.grant".into(),
            resource: "projects/acme".into(),
            environment: "production".into(),
            ..Default::default()
        });
        view.render(&message(1, StreamEvent::Pending(record)));
        let line = view.render(&resolved(2, "a"));
        assert!(line.starts_with("APPROVED"), "{line}");
        assert!(
            line.contains("iam.role.grant on projects/acme in production"),
            "{line}"
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut backoff = Backoff::default();
        let mut expected = BACKOFF_START;
        for _ in 0..20 {
            assert_eq!(backoff.base(), expected);
            let wait = backoff.next();
            assert!(
                wait >= expected && wait <= expected + expected / 4,
                "{wait:?} is not {expected:?} plus at most a quarter"
            );
            expected = (expected * 2).min(BACKOFF_MAX);
        }
        assert_eq!(backoff.base(), BACKOFF_MAX, "twenty failures reach the cap");
        backoff.reset();
        assert_eq!(backoff.base(), BACKOFF_START);
    }
}
