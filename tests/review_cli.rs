//! `countersign review` as a reviewer runs it: the real binary against the real server
//! (shipped policies), with actions created through the gate client.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Caller, TestServer, check, string};
use countersign::proto::{self, ActionStatus};
use serde_json::Value;
use tokio::sync::mpsc;

/// No single CLI run or awaited line may take longer; a hang fails instead of blocking CI.
const DEADLINE: Duration = Duration::from_secs(30);

/// The shipped iam rule's message, which a reviewer must get to read.
const ADMIN_GRANT_MESSAGE: &str =
    "Admin grants change who controls the account; two security reviewers must agree.";

/// `countersign review <args> --server <the test server>`, isolated from the caller's
/// environment.
fn countersign(server: &TestServer, args: &[&str]) -> Command {
    let url = format!("http://{}", server.addr());
    let mut command = countersign_bare(args);
    command.args(["--server", &url]);
    command
}

/// `countersign review <args>` without a server.
fn countersign_bare(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_countersign"));
    command
        .arg("review")
        .args(args)
        .env_remove("COUNTERSIGN_SERVER")
        .env_remove("COUNTERSIGN_PRINCIPAL")
        .env_remove("COUNTERSIGN_GROUPS")
        .env_remove("COUNTERSIGN_TOKEN")
        .env_remove("COUNTERSIGN_TOKEN_FILE")
        .env_remove("COUNTERSIGN_CA_CERT")
        .env_remove("COUNTERSIGN_CLIENT_CERT")
        .env_remove("COUNTERSIGN_CLIENT_KEY")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs one CLI command to completion (killed if it outlives `DEADLINE`). The server runs
/// on this test's runtime, so the wait happens off it.
async fn review(server: &TestServer, args: &[&str]) -> Run {
    run(countersign(server, args), args).await
}

async fn run(mut command: Command, args: &[&str]) -> Run {
    let described = format!("{args:?}");
    tokio::task::spawn_blocking(move || {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("countersign starts");
        let stdout = drain(child.stdout.take().expect("stdout"));
        let stderr = drain(child.stderr.take().expect("stderr"));
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > DEADLINE {
                let _ = child.kill();
                panic!("countersign review {described} did not finish within {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Run {
            code: status.code(),
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
        }
    })
    .await
    .expect("runner")
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// An IAM admin grant in production, requested by iam-bot on behalf of alice: PENDING,
/// two approvals from `security`. Returns its id.
async fn pending_admin_grant(server: &TestServer) -> String {
    let mut gate = server.gate(&Caller::agent("iam-bot")).await;
    let response = gate
        .check_action(check(
            "iam.role.grant",
            "production",
            &[("role", string("admin"))],
        ))
        .await
        .expect("check succeeds")
        .into_inner();
    assert_eq!(response.status(), ActionStatus::Pending);
    response.action_id
}

async fn record(server: &TestServer, id: &str) -> proto::ActionRecord {
    let mut review = server.review(&Caller::human("auditor", "auditors")).await;
    review
        .get_action(proto::GetActionRequest {
            action_id: id.to_string(),
        })
        .await
        .expect("get action")
        .into_inner()
        .action
        .expect("record")
}

/// A running `review watch`, killed when dropped. Lines arrive through a channel so the
/// test can wait for them with a deadline.
struct Watch {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Watch {
    fn spawn(server: &TestServer, args: &[&str]) -> Watch {
        Watch::from_command(countersign(server, args))
    }

    fn from_command(mut command: Command) -> Watch {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("countersign starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut pipe = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut buffer = [0u8; 1024];
            while let Ok(n @ 1..) = pipe.read(&mut buffer) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Watch {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// The next line that satisfies `wanted`, waiting at most `DEADLINE`.
    async fn until(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Ok(None) | Err(_) => panic!(
                    "watch never printed {what}\n--- stdout\n{}\n--- stderr\n{}",
                    self.seen.join("\n"),
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    /// The next JSON message satisfying `wanted`.
    async fn until_json(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let line = self
            .until(what, |line| {
                let value: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
                wanted(&value)
            })
            .await;
        serde_json::from_str(&line).expect("json")
    }
}

/// A TCP proxy in front of the server whose connections the test can cut, to drop a
/// `watch`'s connection without stopping the server.
struct Proxy {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let upstream = Arc::new(Mutex::new(upstream));
        let up = Arc::new(AtomicBool::new(true));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (target, accepting, tracked) = (upstream.clone(), up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                // While down, connections are accepted and closed at once.
                if !accepting.load(Ordering::SeqCst) {
                    continue;
                }
                let to = *target.lock().unwrap();
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                let mut tracked = tracked.lock().unwrap();
                for stream in [&client, &server] {
                    tracked.push(stream.try_clone().expect("clone"));
                }
                pipe(
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                pipe(server, client);
            }
        });
        Proxy {
            addr,
            upstream,
            up,
            open,
        }
    }

    /// Sends new connections to another server.
    fn point_at(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    /// `watch --json` as bob of security, through this proxy.
    fn watch(&self) -> Watch {
        let server = format!("http://{}", self.addr);
        let args = [
            "watch", "--json", "--as", "bob", "--groups", "security", "--server", &server,
        ];
        Watch::from_command(countersign_bare(&args))
    }

    /// Drops every open connection and refuses new ones until `restore`.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn show_prints_what_a_reviewer_needs_to_decide() {
    let server = TestServer::start().await;
    let id = pending_admin_grant(&server).await;

    let run = review(
        &server,
        &["show", &id, "--as", "bob", "--groups", "security"],
    )
    .await;

    assert_eq!(run.code, Some(0), "{run}");
    for expected in [
        id.as_str(),
        "PENDING",
        "iam.role.grant",
        "projects/acme",
        "production",
        "CRITICAL",
        "iam-admin-grant",
        ADMIN_GRANT_MESSAGE,
        "iam-bot (agent)",
        "on behalf of  alice (asserted by the requester, not verified)",
        "task-1 from tests",
        "{\"role\":\"admin\"}",
        "0 of 2, 2 still needed from security",
    ] {
        assert!(
            run.stdout.contains(expected),
            "{expected:?} missing:\n{run}"
        );
    }
    assert!(
        !run.stdout.contains('\x1b'),
        "no colour into a pipe:\n{run}"
    );
}

#[tokio::test]
async fn show_json_is_one_object_with_the_record() {
    let server = TestServer::start().await;
    let id = pending_admin_grant(&server).await;

    let run = review(&server, &["show", &id, "--json", "--as", "bob"]).await;

    assert_eq!(run.code, Some(0), "{run}");
    let value: Value = serde_json::from_str(&run.stdout).expect("one JSON object");
    assert_eq!(value["action_id"], id.as_str());
    assert_eq!(value["status"], "pending");
    assert_eq!(value["risk"], "critical");
    assert_eq!(value["action"]["parameters"]["role"], "admin");
    assert_eq!(value["requester"]["id"], "iam-bot");
    assert_eq!(value["requester"]["kind"], "agent");
    assert_eq!(value["task"]["on_behalf_of"], "alice");
    assert_eq!(value["task"]["on_behalf_of_source"], "asserted");
    assert_eq!(value["matched_rules"][0]["effect"], "require_approval");
    assert_eq!(value["approvals_remaining"], 2);
    assert!(
        value["expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
}

#[tokio::test]
async fn two_security_reviewers_approve_an_admin_grant() {
    let server = TestServer::start().await;
    let id = pending_admin_grant(&server).await;

    let bob = review(
        &server,
        &[
            "approve",
            &id,
            "--reason",
            "ticket SEC-1",
            "--as",
            "bob",
            "--groups",
            "security",
        ],
    )
    .await;
    assert_eq!(bob.code, Some(0), "{bob}");
    assert!(bob.stdout.starts_with("PENDING"), "{bob}");
    assert!(bob.stdout.contains("1 more approval needed"), "{bob}");
    // The reviewer is shown what the vote is about before it is sent.
    assert!(
        bob.stderr.contains(&format!("Approving action {id}")),
        "{bob}"
    );
    assert!(bob.stderr.contains("CRITICAL"), "{bob}");
    let digest = record(&server, &id).await.action_digest;
    assert!(bob.stderr.contains(&digest[..12]), "{bob}");

    let carol = review(
        &server,
        &[
            "approve", &id, "--reason", "agreed", "--as", "carol", "--groups", "security",
        ],
    )
    .await;
    assert_eq!(carol.code, Some(0), "{carol}");
    assert!(carol.stdout.starts_with("APPROVED"), "{carol}");

    let record = record(&server, &id).await;
    assert_eq!(record.status(), ActionStatus::Approved);
    let reviewers: Vec<&str> = record
        .votes
        .iter()
        .map(|v| v.reviewer_id.as_str())
        .collect();
    assert_eq!(reviewers, ["bob", "carol"]);
    assert_eq!(record.votes[0].reason, "ticket SEC-1");

    // Decided: a third vote is refused, with the reason.
    let late = review(
        &server,
        &[
            "approve", &id, "--reason", "late", "--as", "dave", "--groups", "security",
        ],
    )
    .await;
    assert_eq!(late.code, Some(1), "{late}");
    assert!(
        late.stderr.contains("countersign: failed precondition:"),
        "{late}"
    );
    assert!(late.stderr.contains("no longer pending"), "{late}");
}

#[tokio::test]
async fn the_human_an_action_is_for_cannot_approve_it() {
    let server = TestServer::start().await;
    let id = pending_admin_grant(&server).await;

    let run = review(
        &server,
        &[
            "approve",
            &id,
            "--reason",
            "it's mine",
            "--as",
            "alice",
            "--groups",
            "security",
        ],
    )
    .await;

    assert_eq!(run.code, Some(1), "{run}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("countersign: permission denied:") && last.contains("on behalf of alice"),
        "{run}"
    );
    assert!(record(&server, &id).await.votes.is_empty());
}

#[tokio::test]
async fn a_reviewer_outside_the_reviewer_groups_cannot_approve() {
    let server = TestServer::start().await;
    let id = pending_admin_grant(&server).await;

    let run = review(
        &server,
        &[
            "approve", &id, "--reason", "lgtm", "--as", "dave", "--groups", "sre",
        ],
    )
    .await;

    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr
            .contains("permission denied: dave is not in a reviewer group"),
        "{run}"
    );
    assert!(run.stderr.contains("security"), "{run}");
    assert!(record(&server, &id).await.votes.is_empty());
}

#[tokio::test]
async fn one_rejection_rejects() {
    let server = TestServer::start().await;
    let id = pending_admin_grant(&server).await;

    let run = review(
        &server,
        &[
            "reject",
            &id,
            "--reason",
            "no ticket",
            "--as",
            "bob",
            "--groups",
            "security",
        ],
    )
    .await;

    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.starts_with("REJECTED"), "{run}");
    assert!(
        run.stderr.contains(&format!("Rejecting action {id}")),
        "{run}"
    );
    assert_eq!(record(&server, &id).await.status(), ActionStatus::Rejected);
}

#[tokio::test]
async fn watch_json_streams_the_snapshot_then_live_votes_and_resolutions() {
    let server = TestServer::start().await;
    let existing = pending_admin_grant(&server).await;
    let mut watch = Watch::spawn(
        &server,
        &["watch", "--json", "--as", "bob", "--groups", "security"],
    );

    let first = watch
        .until_json("the existing pending action", |m| m["event"] == "pending")
        .await;
    assert_eq!(first["action"]["action_id"], existing.as_str());
    assert_eq!(first["action"]["risk"], "critical");
    let complete = watch
        .until_json("snapshot_complete", |m| m["event"] == "snapshot_complete")
        .await;
    assert_eq!(complete["pending_count"], 1);

    let new = pending_admin_grant(&server).await;
    let arrived = watch
        .until_json("the new pending action", |m| m["event"] == "pending")
        .await;
    assert_eq!(arrived["action"]["action_id"], new.as_str());
    assert!(arrived["sequence"].as_u64() > complete["sequence"].as_u64());

    for (reviewer, remaining) in [("bob", 1), ("carol", 0)] {
        let run = review(
            &server,
            &[
                "approve", &new, "--reason", "ok", "--as", reviewer, "--groups", "security",
            ],
        )
        .await;
        assert_eq!(run.code, Some(0), "{run}");
        let vote = watch
            .until_json("a vote_added", |m| m["event"] == "vote_added")
            .await;
        assert_eq!(vote["action_id"], new.as_str());
        assert_eq!(vote["vote"]["reviewer_id"], reviewer);
        assert_eq!(vote["vote"]["verdict"], "approve");
        assert_eq!(vote["approvals_remaining"], remaining);
    }
    let resolved = watch
        .until_json("resolved", |m| m["event"] == "resolved")
        .await;
    assert_eq!(resolved["action_id"], new.as_str());
    assert_eq!(resolved["status"], "approved");

    // Only messages, nothing else, on stdout.
    for line in &watch.seen {
        let value: Value = serde_json::from_str(line).expect("json line");
        assert!(value["sequence"].is_u64(), "{line}");
        assert!(value["event"].is_string(), "{line}");
    }
}

#[tokio::test]
async fn watch_prints_a_readable_block_for_each_pending_action() {
    let server = TestServer::start().await;
    let id = pending_admin_grant(&server).await;
    let mut watch = Watch::spawn(&server, &["watch", "--as", "bob", "--groups", "security"]);

    watch
        .until("the action's header", |l| l.contains(&id))
        .await;
    watch
        .until("the rule message", |l| {
            l.contains("iam-admin-grant") && l.contains(ADMIN_GRANT_MESSAGE)
        })
        .await;
    watch
        .until("the snapshot line", |l| {
            l.contains("— 1 pending; watching for more —")
        })
        .await;

    let block = watch.seen.join("\n");
    for expected in [
        "CRITICAL",
        "iam.role.grant",
        "iam-bot (agent)",
        "alice",
        "in 29m",
    ] {
        assert!(block.contains(expected), "{expected:?} missing:\n{block}");
    }
    assert!(!block.contains('\x1b'), "no colour into a pipe:\n{block}");
}

#[tokio::test]
async fn watch_resumes_after_a_dropped_connection_without_missing_or_repeating() {
    let server = TestServer::start().await;
    let before = pending_admin_grant(&server).await;
    let proxy = Proxy::start(server.addr());
    let mut watch = proxy.watch();
    let complete = watch
        .until_json("snapshot_complete", |m| m["event"] == "snapshot_complete")
        .await;

    // The connection drops; while it is down an action is requested and one resolved.
    proxy.cut();
    let during = pending_admin_grant(&server).await;
    let reject = review(
        &server,
        &[
            "reject", &before, "--reason", "no", "--as", "carol", "--groups", "security",
        ],
    )
    .await;
    assert_eq!(reject.code, Some(0), "{reject}");
    proxy.restore();

    let missed = watch
        .until_json("the action requested while disconnected", |m| {
            m["event"] == "pending"
        })
        .await;
    assert_eq!(missed["action"]["action_id"], during.as_str());
    let resolved = watch
        .until_json("the resolution while disconnected", |m| {
            m["event"] == "resolved"
        })
        .await;
    assert_eq!(resolved["action_id"], before.as_str());
    // The server says when the missed events are all there.
    let caught_up = watch
        .until_json("caught_up", |m| m["event"] == "caught_up")
        .await;
    assert!(caught_up["sequence"].as_u64() >= resolved["sequence"].as_u64());

    // Resumed, not restarted: no second snapshot, nothing seen twice, in log order.
    let sequences: Vec<u64> = watch
        .seen
        .iter()
        .filter(|l| !l.contains("\"caught_up\""))
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["sequence"]
                .as_u64()
                .expect("sequence")
        })
        .collect();
    let live = &sequences[2..];
    assert!(
        live.windows(2).all(|w| w[0] < w[1]) && live[0] > complete["sequence"].as_u64().unwrap(),
        "{:?}",
        watch.seen
    );
    assert_eq!(
        watch
            .seen
            .iter()
            .filter(|l| l.contains("snapshot_complete"))
            .count(),
        1
    );
    let stderr = watch.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains(&format!("resuming after sequence {}", complete["sequence"])),
        "{stderr}"
    );
}

#[tokio::test]
async fn watch_follows_the_server_through_a_restart() {
    let mut server = TestServer::start().await;
    pending_admin_grant(&server).await;
    let proxy = Proxy::start(server.addr());
    let mut watch = proxy.watch();
    let complete = watch
        .until_json("snapshot_complete", |m| m["event"] == "snapshot_complete")
        .await;

    // Same event log, new process (and, here, a new port behind the proxy).
    server.restart().await;
    proxy.point_at(server.addr());
    let after = pending_admin_grant(&server).await;

    let arrived = watch
        .until_json("the action requested after the restart", |m| {
            m["event"] == "pending"
        })
        .await;
    assert_eq!(arrived["action"]["action_id"], after.as_str());
    let stderr = watch.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains(&format!("resuming after sequence {}", complete["sequence"])),
        "{stderr}"
    );
}

#[tokio::test]
async fn watch_takes_a_fresh_snapshot_when_the_server_cannot_resume() {
    let first = TestServer::start().await;
    pending_admin_grant(&first).await;
    let proxy = Proxy::start(first.addr());
    let mut watch = proxy.watch();
    watch
        .until_json("snapshot_complete", |m| m["event"] == "snapshot_complete")
        .await;
    let live = pending_admin_grant(&first).await;
    watch
        .until_json("a live pending action", |m| {
            m["action"]["action_id"] == live.as_str()
        })
        .await;

    // Another server whose log is shorter than where the watch stands: it cannot resume.
    let second = TestServer::start().await;
    let only = pending_admin_grant(&second).await;
    proxy.cut();
    proxy.point_at(second.addr());
    proxy.restore();

    watch
        .until_json("resync_required", |m| m["event"] == "resync_required")
        .await;
    let fresh = watch
        .until_json("the fresh snapshot", |m| m["event"] == "pending")
        .await;
    assert_eq!(fresh["action"]["action_id"], only.as_str());
    let complete = watch
        .until_json("snapshot_complete", |m| m["event"] == "snapshot_complete")
        .await;
    assert_eq!(complete["pending_count"], 1);
}

#[cfg(unix)]
#[tokio::test]
async fn watch_ends_cleanly_on_ctrl_c() {
    let server = TestServer::start().await;
    let mut watch = Watch::spawn(&server, &["watch", "--json", "--as", "bob"]);
    watch
        .until_json("snapshot_complete", |m| m["event"] == "snapshot_complete")
        .await;

    let sent = Command::new("kill")
        .args(["-INT", &watch.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());

    let started = Instant::now();
    let status = loop {
        if let Some(status) = watch.child.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < DEADLINE, "watch ignored Ctrl-C");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_reviewer_sees_nothing_they_may_not_review() {
    let server = TestServer::start().await;
    pending_admin_grant(&server).await;
    // alice is in security but the action is on her behalf.
    let mut watch = Watch::spawn(
        &server,
        &["watch", "--json", "--as", "alice", "--groups", "security"],
    );

    let complete = watch
        .until_json("snapshot_complete", |m| m["event"] == "snapshot_complete")
        .await;

    assert_eq!(complete["pending_count"], 0);
    assert_eq!(watch.seen.len(), 1, "{:?}", watch.seen);
}

#[tokio::test]
async fn list_shows_pending_actions() {
    let server = TestServer::start().await;
    let pending = pending_admin_grant(&server).await;
    let mut gate = server.gate(&Caller::agent("reader-bot")).await;
    let allowed = gate
        .check_action(check("storage.object.read", "production", &[]))
        .await
        .expect("check")
        .into_inner()
        .action_id;

    let run = review(&server, &["list", "--status", "pending", "--as", "bob"]).await;

    assert_eq!(run.code, Some(0), "{run}");
    let row = run
        .stdout
        .lines()
        .find(|l| l.contains(&pending))
        .unwrap_or_else(|| panic!("pending action missing:\n{run}"));
    for column in [
        "PENDING",
        "CRITICAL",
        "iam.role.grant",
        "projects/acme",
        "iam-bot",
    ] {
        assert!(row.contains(column), "{column} missing from {row}");
    }
    assert!(!run.stdout.contains(&allowed), "{run}");

    let all = review(&server, &["list", "--json", "--limit", "1", "--as", "bob"]).await;
    assert_eq!(all.code, Some(0), "{all}");
    let lines: Vec<Value> = all
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1, "{all}");
    assert_eq!(lines[0]["action_id"], allowed.as_str(), "newest first");
}

#[tokio::test]
async fn list_pages_until_the_limit() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("reader-bot")).await;
    // More than one page (the CLI asks for at most 100 at a time).
    let mut ids = Vec::new();
    for _ in 0..130 {
        let response = gate
            .check_action(check("storage.object.read", "production", &[]))
            .await
            .expect("check")
            .into_inner();
        ids.push(response.action_id);
    }

    let run = review(
        &server,
        &["list", "--json", "--limit", "120", "--as", "bob"],
    )
    .await;

    assert_eq!(run.code, Some(0), "{run}");
    let listed: Vec<String> = run
        .stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json line");
            v["action_id"].as_str().expect("id").to_string()
        })
        .collect();
    ids.reverse();
    ids.truncate(120);
    assert_eq!(listed, ids, "newest first, each once, up to the limit");
}

#[tokio::test]
async fn without_a_principal_the_cli_says_who_is_missing() {
    let server = TestServer::start().await;
    let id = pending_admin_grant(&server).await;

    let run = review(&server, &["show", &id]).await;

    assert_eq!(run.code, Some(2), "{run}");
    assert!(run.stderr.contains("--as <PRINCIPAL>"), "{run}");
}

#[tokio::test]
async fn a_vote_without_a_reason_is_a_usage_error() {
    let server = TestServer::start().await;
    let id = pending_admin_grant(&server).await;

    let run = review(
        &server,
        &["approve", &id, "--as", "bob", "--groups", "security"],
    )
    .await;

    assert_eq!(run.code, Some(2), "{run}");
    assert!(run.stderr.contains("--reason"), "{run}");
    assert!(record(&server, &id).await.votes.is_empty());
}

#[tokio::test]
async fn an_unknown_action_is_not_found() {
    let server = TestServer::start().await;

    let run = review(
        &server,
        &[
            "show",
            "0196f0b2-7c1e-7a40-9a0e-3b1c2d4e5f60",
            "--as",
            "bob",
        ],
    )
    .await;

    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr
            .starts_with("countersign: not found: no action with id 0196f0b2"),
        "{run}"
    );
}

#[tokio::test]
async fn an_unreachable_server_exits_2_naming_it() {
    // Take a free port, then free it: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");

    let args = ["watch", "--as", "bob", "--server", &url];
    let run = run(countersign_bare(&args), &args).await;

    assert_eq!(run.code, Some(2), "{run}");
    assert!(
        run.stderr
            .contains(&format!("countersign: cannot reach the server at {url}")),
        "{run}"
    );
}
