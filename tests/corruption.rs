//! One flipped byte of sled's `db` file, in copies of a small log: the real binary must
//! either refuse to start saying the event log is damaged (exit 2, one line, no panic
//! trace), or start and have VerifyLog report a problem, or start with the whole log
//! intact. Never a silently shorter (or otherwise different) log.
//!
//! `a_few_chosen_flips_are_never_silent` runs always; the full sweep is
//! `cargo test --locked --test corruption -- --ignored --nocapture` (a log of
//! `COUNTERSIGN_SWEEP_ACTIONS` actions, default 300; flips every `COUNTERSIGN_SWEEP_STRIDE`
//! bytes, default 509; prints the figures).

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Caller, TestServer, check, shipped_policies, string};
use countersign::proto::{self, Verdict};

/// What a flip led to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    /// Exit 2 with "the event log at DIR is damaged" and no panic trace.
    DetectedAtStart,
    /// Started, and VerifyLog answered `ok: false`.
    DetectedByVerify,
    /// Started, verified, and every event is the one written.
    Harmless,
    /// Started, verified, and the log is not the one written: the failure this guards against.
    Silent(String),
    /// Did not start, without saying the log is damaged, or with a panic trace.
    UnclearStartFailure(String),
    /// Started, but VerifyLog could not read the log (UNAVAILABLE).
    VerifyUnavailable(String),
    /// Neither served nor exited in time.
    Hung,
}

/// A small log written by the real server: checks allowed, denied, pending, approved and
/// rejected, a restart halfway and a clean stop (each saves a checkpoint). Returns its
/// data directory.
async fn small_log(actions: u32) -> TestServer {
    let mut server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("ops-bot")).await;
    let mut review = server.review(&Caller::human("carol", "security")).await;
    for i in 0..actions {
        if i == actions / 2 {
            // A restart halfway: sled then holds a snapshot of its pages from that start,
            // which its recovery reads before the log records after it.
            server.restart().await;
            gate = server.gate(&Caller::agent("ops-bot")).await;
            review = server.review(&Caller::human("carol", "security")).await;
        }
        let request = match i % 3 {
            0 => check("storage.object.read", "production", &[]),
            1 => check("db.drop", "production", &[]),
            _ => check("iam.role.grant", "production", &[("role", string("owner"))]),
        };
        let answer = gate.check_action(request).await.unwrap().into_inner();
        if i % 3 == 2 {
            let verdict = if i % 2 == 0 {
                Verdict::Approve
            } else {
                Verdict::Reject
            };
            review
                .submit_review(proto::SubmitReviewRequest {
                    action_id: answer.action_id,
                    verdict: verdict as i32,
                    reason: "reviewed".into(),
                    action_digest: String::new(),
                })
                .await
                .unwrap();
        }
    }
    server.stop().await;
    server
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A running `countersign serve`, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

enum Started {
    Serving(Child, std::net::SocketAddr),
    Exited(Option<i32>, String),
    Hung,
}

fn serve(data_dir: &Path) -> Started {
    let mut child = Command::new(env!("CARGO_BIN_EXE_countersign"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--policies")
        .arg(shipped_policies())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("countersign starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            seen.push_str(&line);
            seen.push('\n');
            let address = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .filter(|entry| entry["fields"]["message"] == "countersign is serving")
                .and_then(|entry| entry["fields"]["address"].as_str().map(str::to_owned));
            if let Some(address) = address {
                let _ = tx.send(Ok(address));
                // Keep draining so the child never blocks on a full pipe.
                continue;
            }
        }
        let _ = tx.send(Err(seen));
    });
    let mut child = Child(child);
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(address)) => Started::Serving(child, address.parse().expect("address")),
        Ok(Err(logs)) => {
            let code = child.0.wait().ok().and_then(|status| status.code());
            Started::Exited(code, logs)
        }
        Err(_) => Started::Hung,
    }
}

/// Every event's sequence, kind and hash, as an auditor reads them.
async fn events_at(address: std::net::SocketAddr) -> Vec<(u64, String, String)> {
    common::read_events_at(address, 0, "")
        .await
        .into_iter()
        .map(|e| (e.sequence, e.kind, e.hash))
        .collect()
}

async fn verify_at(
    address: std::net::SocketAddr,
) -> Result<proto::VerifyLogResponse, tonic::Status> {
    let mut audit = countersign::proto::audit_service_client::AuditServiceClient::with_interceptor(
        common::channel_to(address).await,
        Caller::human("auditor", "auditors"),
    );
    audit
        .verify_log(proto::VerifyLogRequest {})
        .await
        .map(tonic::Response::into_inner)
}

/// Starts the binary on a copy of `original` with byte `at` of `db` flipped.
async fn flip_and_start(original: &Path, at: u64, expected: &[(u64, String, String)]) -> Outcome {
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("log");
    copy_dir(original, &copy);
    let db = copy.join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    bytes[at as usize] ^= 0xff;
    std::fs::write(&db, bytes).unwrap();
    let started = tokio::task::spawn_blocking(move || serve(&copy))
        .await
        .unwrap();
    let outcome = match started {
        Started::Hung => Outcome::Hung,
        Started::Exited(code, logs) => {
            let said_damaged = logs.contains("is damaged");
            let traced = logs.contains("panicked at") || logs.contains("stack backtrace");
            if code == Some(2) && said_damaged && !traced && logs.trim().lines().count() >= 1 {
                Outcome::DetectedAtStart
            } else {
                Outcome::UnclearStartFailure(format!("exit {code:?}: {logs}"))
            }
        }
        Started::Serving(child, address) => {
            let outcome = match verify_at(address).await {
                Err(status) => Outcome::VerifyUnavailable(status.message().to_owned()),
                Ok(report) if !report.ok => {
                    if std::env::var_os("COUNTERSIGN_SWEEP_VERBOSE").is_some() {
                        eprintln!("byte {at}: VerifyLog: {}", report.problem);
                    }
                    Outcome::DetectedByVerify
                }
                Ok(_) => {
                    let seen = events_at(address).await;
                    // Events appended at this start (a checkpoint) come after the original ones.
                    if seen.len() >= expected.len() && seen[..expected.len()] == *expected {
                        Outcome::Harmless
                    } else {
                        Outcome::Silent(format!(
                            "{} events instead of {}",
                            seen.len(),
                            expected.len()
                        ))
                    }
                }
            };
            drop(child);
            outcome
        }
    };
    drop(scratch);
    outcome
}

/// The events of the unflipped log, read through the real binary.
async fn reference(original: &Path) -> Vec<(u64, String, String)> {
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("log");
    copy_dir(original, &copy);
    let Started::Serving(child, address) = tokio::task::spawn_blocking(move || serve(&copy))
        .await
        .unwrap()
    else {
        panic!("the unflipped log starts");
    };
    let report = verify_at(address).await.expect("verifies");
    assert!(report.ok, "{}", report.problem);
    let events = events_at(address).await;
    drop(child);
    events
}

/// How much of `db` sled has written: flips beyond are in space it never reads.
fn written_len(db: &Path) -> u64 {
    let bytes = std::fs::read(db).unwrap();
    bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |at| at as u64 + 1)
}

fn summary(outcomes: &[(u64, Outcome)]) -> String {
    let count = |pick: fn(&Outcome) -> bool| outcomes.iter().filter(|(_, o)| pick(o)).count();
    format!(
        "flips: {}, detected at start: {}, detected by VerifyLog: {}, harmless: {}, silent: {}, \
         unclear start failure: {}, VerifyLog unavailable: {}, hung: {}",
        outcomes.len(),
        count(|o| *o == Outcome::DetectedAtStart),
        count(|o| *o == Outcome::DetectedByVerify),
        count(|o| *o == Outcome::Harmless),
        count(|o| matches!(o, Outcome::Silent(_))),
        count(|o| matches!(o, Outcome::UnclearStartFailure(_))),
        count(|o| matches!(o, Outcome::VerifyUnavailable(_))),
        count(|o| *o == Outcome::Hung),
    )
}

fn assert_never_silent(outcomes: &[(u64, Outcome)]) {
    let bad: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| {
            !matches!(
                o,
                Outcome::DetectedAtStart | Outcome::DetectedByVerify | Outcome::Harmless
            )
        })
        .collect();
    assert!(bad.is_empty(), "{}\n{bad:#?}", summary(outcomes));
}

/// Offsets into the written part of `db`, chosen in the last records sled wrote (where a
/// flip made sled's recovery cut the log's end) and in its first pages.
const CHOSEN: [u64; 6] = [200, 4_000, 20_000, 40_000, 60_000, 70_000];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_chosen_flips_are_never_silent() {
    let original = small_log(12).await;
    let log = original.data.path().join("log");
    let written = written_len(&log.join("db"));
    let expected = reference(&log).await;
    let mut outcomes = Vec::new();
    for at in CHOSEN.iter().map(|at| at % written) {
        outcomes.push((at, flip_and_start(&log, at, &expected).await));
    }
    eprintln!("{}", summary(&outcomes));
    assert_never_silent(&outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: starts the binary once per flip; run with --ignored --nocapture for the figures"]
async fn single_byte_corruption_sweep() {
    let stride: u64 = std::env::var("COUNTERSIGN_SWEEP_STRIDE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(509);
    let actions: u32 = std::env::var("COUNTERSIGN_SWEEP_ACTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let original = small_log(actions).await;
    let log = original.data.path().join("log");
    let written = written_len(&log.join("db"));
    let expected = reference(&log).await;
    let mut outcomes = Vec::new();
    let mut at = 0;
    while at < written {
        let outcome = flip_and_start(&log, at, &expected).await;
        if !matches!(
            outcome,
            Outcome::DetectedAtStart | Outcome::DetectedByVerify | Outcome::Harmless
        ) {
            eprintln!("byte {at}: {outcome:?}");
        }
        outcomes.push((at, outcome));
        at += stride;
    }
    eprintln!("db written: {written} bytes, stride {stride}");
    eprintln!("{}", summary(&outcomes));
    assert_never_silent(&outcomes);
}

/// Offsets of sled's `db` file, in a log of 25,000 events written by `bench fill-log`, where
/// one flipped byte made sled 0.34 panic while opening (`tried to serialize Uninitialized`,
/// found by sweeping such a log). The layout depends on how the writes were batched, so
/// these are tried first, then every `SEARCH_STRIDE` bytes.
const PANICKING_AT_OPEN: [u64; 5] = [3_220_014, 3_450_015, 5_290_023, 5_520_024, 5_750_025];
const SEARCH_STRIDE: u64 = 230_001;

/// A copy of `log` with byte `at` of `db` flipped.
fn flipped_copy(log: &Path, at: u64) -> tempfile::TempDir {
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("log");
    copy_dir(log, &copy);
    let db = copy.join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    if let Some(byte) = bytes.get_mut(at as usize) {
        *byte ^= 0xff;
    }
    std::fs::write(&db, bytes).unwrap();
    scratch
}

/// sled panicking on damaged files at start-up: one line naming the data directory and the
/// damage, exit 2, never a panic trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_panicking_at_open_is_one_line_naming_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let filled = Command::new(env!("CARGO_BIN_EXE_countersign"))
        .args(["bench", "fill-log", "--events", "25000", "--data-dir"])
        .arg(&log)
        .arg("--policies")
        .arg(shipped_policies())
        .output()
        .unwrap();
    assert!(filled.status.success(), "{filled:?}");
    let len = std::fs::metadata(log.join("db")).unwrap().len();
    // Found by opening the store in this process (quick: no replay), where the panic
    // must come back as an error too.
    let candidates = PANICKING_AT_OPEN
        .into_iter()
        .chain((0..len).step_by(SEARCH_STRIDE as usize));
    let mut found = None;
    for at in candidates {
        let scratch = flipped_copy(&log, at);
        let opened = countersign::store::EventLog::open(&scratch.path().join("log"));
        if let Err(countersign::store::StoreError::Damaged { detail, .. }) = &opened
            && detail.starts_with("sled panicked")
        {
            found = Some((at, scratch));
            break;
        }
    }
    let Some((at, scratch)) = found else {
        panic!("no flip made sled panic at open in this log's layout");
    };
    let copy = scratch.path().join("log");
    let started = tokio::task::spawn_blocking(move || serve(&copy))
        .await
        .unwrap();
    let Started::Exited(code, logs) = started else {
        panic!("byte {at}: the server started on a log sled cannot open");
    };
    assert!(!logs.contains("panicked at"), "a panic trace:\n{logs}");
    assert!(!logs.contains("backtrace"), "a panic trace:\n{logs}");
    assert_eq!(code, Some(2), "{logs}");
    let last = logs.trim_end().lines().last().unwrap_or_default();
    let expected = format!(
        "the event log at {} is damaged (sled panicked: ",
        scratch.path().join("log").display()
    );
    assert!(last.starts_with("countersign: "), "{last}");
    assert!(last.contains(&expected), "{last}");
}
