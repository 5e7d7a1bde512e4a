//! The server's listeners under hostile load: how many connections each holds, how long a
//! connection may sit without a request or an open stream, and what happens when the
//! process runs out of file descriptors.
//!
//! - [`accept`]: the accept loop every listener shares (cap, refusal at the cap with a
//!   count and a rate-limited log line, backoff on EMFILE/ENFILE instead of spinning).
//! - [`conn`]: gRPC connections closed when no request comes within the first-request
//!   timeout, or no stream is open for the idle timeout.
//! - [`stats`]: the counters, read by [`crate::telemetry::metrics`].
//!
//! The HTTP/1 listeners (`/metrics`, Slack interactivity) use [`accept`] too; hyper's
//! header-read timeout closes their connections that send no request.
//!
//! At start the soft `nofile` limit is raised to the hard one ([`raise_open_file_limit`]),
//! and the gRPC cap is kept below what is left of it ([`connection_cap`]): a server that
//! hit the descriptor limit would fail to open its own files (the event log's), and a
//! failed write stops all writes.

pub mod accept;
pub mod conn;
pub mod stats;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub use accept::Acceptor;
pub use conn::{Conn, Connections, StreamsLayer, Timeouts};
pub use stats::ConnectionStats;

/// Connections the gRPC listener holds at once, unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// From accept to the first request's headers (TLS handshake and HTTP/2 preface included).
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no open stream this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// HTTP/2 pings to find dead peers, and how long an answer may take.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Descriptors kept out of the gRPC cap for everything else: the event log's files,
/// checkpoints, the runtime, outgoing connections (OTLP, notifications).
pub const RESERVED_DESCRIPTORS: u64 = 128;
/// Connections each HTTP/1 listener (`/metrics`, Slack interactivity) holds at once.
pub const HTTP_LISTENER_CONNECTIONS: usize = 64;

/// `[limits]` settings for connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSettings {
    pub max_connections: usize,
    pub first_request_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            first_request_timeout: DEFAULT_FIRST_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

/// The soft and hard `RLIMIT_NOFILE` of this process.
pub fn open_file_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given and nothing else.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (got == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

/// What [`raise_open_file_limit`] did, logged once the server has started (a start-up
/// failure prints one line, and this is not it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenFileLimit {
    Raised { from: u64, to: u64 },
    AlreadyAtHard(u64),
    NotRaised { soft: u64, error: String },
    Unknown,
}

impl OpenFileLimit {
    pub fn log(&self) {
        match self {
            OpenFileLimit::Raised { from, to } => tracing::info!(
                from,
                to,
                "raised the soft open-file limit (nofile) to the hard limit"
            ),
            OpenFileLimit::AlreadyAtHard(limit) => {
                tracing::info!(open_files = limit, "open-file limit (nofile; soft = hard)")
            }
            OpenFileLimit::NotRaised { soft, error } => tracing::warn!(
                open_files = soft,
                %error,
                "cannot raise the soft open-file limit (nofile) to the hard limit"
            ),
            OpenFileLimit::Unknown => {
                tracing::warn!("cannot read the open-file limit (RLIMIT_NOFILE)")
            }
        }
    }
}

/// Raises the soft `nofile` limit to the hard one. A process serving many connections
/// needs more than the usual soft 1,024, and the hard limit is what the operator allowed.
pub fn raise_open_file_limit() -> OpenFileLimit {
    let Some((soft, hard)) = open_file_limit() else {
        return OpenFileLimit::Unknown;
    };
    if soft >= hard {
        return OpenFileLimit::AlreadyAtHard(soft);
    }
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given; raising the soft limit up to the hard
    // one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        OpenFileLimit::Raised {
            from: soft,
            to: hard,
        }
    } else {
        OpenFileLimit::NotRaised {
            soft,
            error: std::io::Error::last_os_error().to_string(),
        }
    }
}

/// The gRPC listener's cap: as configured, but below the open-file limit less what the
/// rest of the server needs (`other_listeners`: the HTTP/1 listeners' caps). Logged when
/// lowered.
pub fn connection_cap(configured: usize, other_listeners: usize) -> usize {
    let Some((soft, _)) = open_file_limit() else {
        return configured;
    };
    let available = soft
        .saturating_sub(RESERVED_DESCRIPTORS)
        .saturating_sub(other_listeners as u64);
    let cap = usize::try_from(available).unwrap_or(usize::MAX).max(1);
    if cap < configured {
        tracing::warn!(
            configured,
            cap,
            open_files = soft,
            "limits.max_connections lowered to stay under the open-file limit; raise `nofile` to allow more"
        );
        cap
    } else {
        configured
    }
}

/// The gRPC listener's connections, as tonic's `serve_with_incoming_shutdown` takes them.
/// One task accepts; it ends when tonic drops the stream (at shutdown), closing the port.
pub fn grpc_incoming(
    mut acceptor: Acceptor,
    connections: Connections,
    timeouts: Timeouts,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer, slot) = tokio::select! {
                accepted = acceptor.accept() => accepted,
                () = tx.closed() => return,
            };
            // As before this listener was ours: without it, Nagle's algorithm and delayed
            // ACKs add ~40 ms to small replies such as a waiter's wake-up.
            let _ = stream.set_nodelay(true);
            let conn = Conn::new(stream, peer, slot, &connections, timeouts);
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
