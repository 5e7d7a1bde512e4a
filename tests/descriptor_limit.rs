//! The server binary under a flood of idle connections at a lowered open-file limit
//! (issue 16, defect 5): more idle TCP connections than `nofile` allows, none sending a
//! byte. Before the fix the server spun at over 100 % CPU once `accept` failed with
//! EMFILE, and idle connections were never closed, so new clients timed out.
//!
//! Outcomes asserted: idle connections are closed by the server, a new gRPC client gets an
//! answer within this test's own deadline while the flood goes on, the refusals are counted
//! in `/metrics`, and the server's CPU over a window of the flood stays under half a core
//! (a generous bound on an outcome, not a speed benchmark). The figures are printed
//! (`cargo test --test descriptor_limit -- --nocapture`).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The server's open-file limit (soft and hard) in this test.
const SERVER_NOFILE: u64 = 512;
/// Idle connections kept open against it: more than the limit allows.
const IDLE_CONNECTIONS: usize = 1_000;
/// How long this test lets anything take; far above what any of it needs.
const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_at_the_descriptor_limit_are_closed_and_new_clients_get_answers() {
    raise_own_open_file_limit(IDLE_CONNECTIONS as u64 + 512);
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("countersign.toml");
    std::fs::write(
        &config,
        r#"
[limits]
first_request_timeout = "1s"
idle_timeout = "2s"

[telemetry]
metrics_listen = "127.0.0.1:0"
"#,
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_countersign"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--config")
        .arg(&config)
        .env("COUNTERSIGN_DATA_DIR", data.path().join("data"))
        .env("COUNTERSIGN_POLICIES", common::shipped_policies());
    limit_open_files(&mut command, SERVER_NOFILE);
    let server = common::spawn_serve(command).await;
    let pid = server.child.id();
    let metrics_addr = metrics_address(&server.startup_logs);

    // The flood: each idle connection is reopened shortly after the server closes it.
    // `served_open` counts those the server accepted and has not closed yet (it sends its
    // HTTP/2 settings at once); a connect the kernel completed but whose accept queue
    // overflowed in a burst never reaches the server, which then holds nothing for it.
    let flooding = Arc::new(AtomicBool::new(true));
    let closed_by_server = Arc::new(AtomicU64::new(0));
    let served_open = Arc::new(AtomicU64::new(0));
    let mut idle = Vec::new();
    for i in 0..IDLE_CONNECTIONS {
        let flooding = flooding.clone();
        let closed_by_server = closed_by_server.clone();
        let served_open = served_open.clone();
        let address = server.address;
        idle.push(tokio::spawn(async move {
            // Spread out, so reconnections do not arrive as one burst.
            let pause = Duration::from_millis(200 + (i as u64 * 7) % 400);
            while flooding.load(Ordering::Relaxed) {
                if let Ok(mut stream) = TcpStream::connect(address).await {
                    // Sends nothing, reads what the server sends (its HTTP/2 settings)
                    // until the server closes the connection.
                    let mut buffer = [0u8; 256];
                    let mut served = false;
                    while let Ok(1..) = stream.read(&mut buffer).await {
                        if !served {
                            served = true;
                            served_open.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if served {
                        served_open.fetch_sub(1, Ordering::Relaxed);
                    }
                    closed_by_server.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(pause).await;
            }
        }));
    }
    // An idle connection to /metrics, which must be closed too.
    let mut idle_metrics = TcpStream::connect(metrics_addr).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // (c) The server's CPU over a window of the flood.
    let (cpu_before, wall_before) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = (cpu_seconds(pid) - cpu_before) / wall_before.elapsed().as_secs_f64();

    // (a) A new client during the flood: it retries, as gRPC clients do, until answered.
    let started = Instant::now();
    let mut attempts = 0;
    let (mut health, first_answer) = loop {
        attempts += 1;
        assert!(
            started.elapsed() < DEADLINE,
            "no answer for a new client within {DEADLINE:?} ({attempts} attempts)"
        );
        if let Some(client) = health_check(server.address).await {
            break (client, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut round_trips = Vec::new();
    for _ in 0..20 {
        let sent = Instant::now();
        health
            .check(HealthCheckRequest::default())
            .await
            .expect("an established client keeps getting answers during the flood");
        round_trips.push(sent.elapsed());
    }
    round_trips.sort();

    // (b) The flood stops reconnecting; every connection it still holds is closed by the
    // server, and so is the idle one to /metrics.
    let reconnections = closed_by_server.load(Ordering::Relaxed);
    flooding.store(false, Ordering::Relaxed);
    let all_closed = tokio::time::timeout(DEADLINE, async {
        while served_open.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        all_closed.is_ok(),
        "{} idle connections were still open after {DEADLINE:?}",
        served_open.load(Ordering::Relaxed)
    );
    for task in idle {
        task.abort();
    }
    let mut byte = [0u8; 1];
    let metrics_closed = tokio::time::timeout(DEADLINE, idle_metrics.read(&mut byte)).await;
    assert!(
        matches!(metrics_closed, Ok(Ok(0) | Err(_))),
        "the idle /metrics connection was not closed: {metrics_closed:?}"
    );

    let metrics = scrape(metrics_addr).await;
    let refused = metric(
        &metrics,
        r#"countersign_connections_refused_total{listener="grpc",reason="limit"}"#,
    );
    let timed_out = metric(
        &metrics,
        r#"countersign_connections_closed_total{listener="grpc",reason="first_request_timeout"}"#,
    );
    eprintln!(
        "nofile {SERVER_NOFILE}, {IDLE_CONNECTIONS} idle connections: server CPU {:.1} % of one core \
         over 3 s; new client answered after {first_answer:?} ({attempts} attempts); health \
         round trips during the flood: median {:?}, max {:?}; connections closed by the \
         server as seen by the flood {reconnections}; refused at the cap {refused}; closed \
         for no first request {timed_out}",
        cpu * 100.0,
        round_trips[round_trips.len() / 2],
        round_trips[round_trips.len() - 1],
    );
    assert!(refused > 0.0, "refusals at the cap are counted:\n{metrics}");
    assert!(
        timed_out > 0.0,
        "first-request timeouts are counted:\n{metrics}"
    );
    assert!(
        cpu < 0.5,
        "the server used {:.0} % of a core while flooded with idle connections",
        cpu * 100.0
    );
}

/// A health check over a new connection; the client if it was answered.
async fn health_check(address: SocketAddr) -> Option<HealthClient<tonic::transport::Channel>> {
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    let mut health = HealthClient::new(channel);
    health.check(HealthCheckRequest::default()).await.ok()?;
    Some(health)
}

/// Sets the child's `RLIMIT_NOFILE` (soft and hard) before it runs.
fn limit_open_files(command: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and touches only the child being started.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// This test holds over a thousand sockets: raise its own soft limit (up to the hard one).
fn raise_own_open_file_limit(needed: u64) {
    let mut rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlimit), 0);
        assert!(
            rlimit.rlim_max >= needed,
            "this test needs {needed} open files; the hard limit is {}",
            rlimit.rlim_max
        );
        if rlimit.rlim_cur < needed {
            rlimit.rlim_cur = rlimit.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit), 0);
        }
    }
}

/// User plus system CPU time of a process so far, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let after_name = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / per_second as f64
}

/// Where the server said it serves /metrics.
fn metrics_address(startup_logs: &str) -> SocketAddr {
    startup_logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["fields"]["message"] == "serving /metrics and /status")
        .and_then(|entry| entry["fields"]["address"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in:\n{startup_logs}"))
}

/// `GET /metrics` over a plain HTTP/1.0 connection.
async fn scrape(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("/metrics answers")
        .unwrap();
    response
}

/// The value of one sample in Prometheus text, 0 if absent.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}
