//! The accept loop every listener shares: a connection cap, refusal at the cap, and backoff
//! when the process is out of file descriptors.
//!
//! At the cap a new connection is accepted and closed at once: the client learns in one
//! round trip that it should retry, instead of waiting in the kernel's backlog behind
//! whoever holds the slots, and the backlog never fills (which would drop SYNs and leave
//! every new client, legitimate or not, hanging). Slots come back when connections end,
//! and the first-request and idle timeouts make sure they do.
//!
//! Out of file descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM), `accept` fails with the
//! connection still queued, so retrying at once spins (issue 16: 118 % CPU). The loop
//! waits instead, 10 ms doubling to 1 s, and tries again; the cap is set below the
//! descriptor limit ([`super::connection_cap`]) so this is the exception.
//!
//! Refusals are counted in [`ConnectionStats`] and logged at most once per
//! [`REFUSAL_LOG_INTERVAL`] per listener, with how many there were since the last line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::stats::{ConnectionStats, Reason};

/// First wait after the process ran out of file descriptors; doubled up to the maximum.
const DESCRIPTOR_BACKOFF_START: Duration = Duration::from_millis(10);
const DESCRIPTOR_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Wait after any other accept error that is not about one connection.
const OTHER_ERROR_WAIT: Duration = Duration::from_millis(100);
/// At most one log line per listener this often about refused connections.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Accepts connections for one listener; see the module documentation.
pub struct Acceptor {
    /// As in metrics and logs (`grpc`, `metrics`, `slack_interactivity`).
    name: &'static str,
    listener: TcpListener,
    /// One permit per connection slot; a connection holds its [`Slot`] until it ends.
    slots: Arc<Semaphore>,
    cap: usize,
    stats: ConnectionStats,
    backoff: DescriptorBackoff,
    refusals: RefusalLog,
}

/// A connection's place under the cap, given back when it is dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
    stats: ConnectionStats,
}

impl Slot {
    pub fn listener(&self) -> &'static str {
        self.listener
    }

    pub fn stats(&self) -> &ConnectionStats {
        &self.stats
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.ended(self.listener);
    }
}

impl Acceptor {
    pub fn new(
        name: &'static str,
        listener: TcpListener,
        cap: usize,
        stats: ConnectionStats,
    ) -> Acceptor {
        Acceptor {
            name,
            listener,
            slots: Arc::new(Semaphore::new(cap)),
            cap,
            stats,
            backoff: DescriptorBackoff::default(),
            refusals: RefusalLog::default(),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection with a free slot. Never fails: every error is counted, logged
    /// and waited out as the module documentation says.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr, Slot) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff.reset();
                    if let Some(count) = self.refusals.flush(Instant::now()) {
                        tracing::warn!(
                            listener = self.name,
                            refused = count,
                            "connections refused since the last line"
                        );
                    }
                    match self.slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            self.stats.opened(self.name);
                            let slot = Slot {
                                _permit: permit,
                                listener: self.name,
                                stats: self.stats.clone(),
                            };
                            return (stream, peer, slot);
                        }
                        Err(_) => {
                            // Closed at once: the client retries rather than hangs.
                            drop(stream);
                            self.refuse(Reason::Limit);
                        }
                    }
                }
                Err(e) => match classify(&e) {
                    AcceptError::OneConnection => {}
                    AcceptError::OutOfDescriptors => {
                        self.refuse(Reason::Descriptors);
                        tokio::time::sleep(self.backoff.next()).await;
                    }
                    AcceptError::Other => {
                        tracing::warn!(listener = self.name, error = %e, "accept failed");
                        tokio::time::sleep(OTHER_ERROR_WAIT).await;
                    }
                },
            }
        }
    }

    fn refuse(&mut self, reason: Reason) {
        self.stats.refused(self.name, reason);
        if let Some(count) = self.refusals.record(Instant::now()) {
            match reason {
                Reason::Limit => tracing::warn!(
                    listener = self.name,
                    refused = count,
                    cap = self.cap,
                    "refusing connections: the connection cap is reached (limits.max_connections); idle ones are closed by the first-request and idle timeouts"
                ),
                _ => tracing::warn!(
                    listener = self.name,
                    refused = count,
                    "not accepting connections for now: the process is out of file descriptors; retrying with backoff"
                ),
            }
        }
    }
}

/// What an accept error means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptError {
    /// About the one connection being accepted (reset before it was accepted, …).
    OneConnection,
    /// The process or system is out of descriptors or buffers: wait, then retry.
    OutOfDescriptors,
    Other,
}

fn classify(error: &std::io::Error) -> AcceptError {
    use std::io::ErrorKind;
    if let Some(code) = error.raw_os_error()
        && [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM].contains(&code)
    {
        return AcceptError::OutOfDescriptors;
    }
    match error.kind() {
        ErrorKind::ConnectionAborted
        | ErrorKind::ConnectionReset
        | ErrorKind::Interrupted
        | ErrorKind::WouldBlock
        | ErrorKind::TimedOut => AcceptError::OneConnection,
        _ => AcceptError::Other,
    }
}

/// The wait after each accept that failed for lack of descriptors (pure).
#[derive(Debug, Default)]
struct DescriptorBackoff {
    failures: u32,
}

impl DescriptorBackoff {
    fn next(&mut self) -> Duration {
        let wait = DESCRIPTOR_BACKOFF_START
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(DESCRIPTOR_BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Rate limit for refusal log lines (pure): the first refusal is logged at once, then at
/// most one line per interval, carrying the count since the previous line.
#[derive(Debug, Default)]
struct RefusalLog {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Records one refusal; returns the count to log now, if a line is due.
    fn record(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        self.flush(now)
    }

    /// The refusals not logged yet, if there are any and a line is due. Also called as
    /// connections are accepted, so the count of a burst that ended is not lost.
    fn flush(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last_line
            .is_none_or(|last| now.duration_since(last) >= REFUSAL_LOG_INTERVAL);
        if self.unlogged == 0 || !due {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_told_apart_from_one_bad_connection() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let error = std::io::Error::from_raw_os_error(code);
            assert_eq!(classify(&error), AcceptError::OutOfDescriptors, "{error}");
        }
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        assert_eq!(classify(&reset), AcceptError::OneConnection);
        let other = std::io::Error::from_raw_os_error(libc::EINVAL);
        assert_eq!(classify(&other), AcceptError::Other);
    }

    #[test]
    fn the_descriptor_backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = DescriptorBackoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| backoff.next()).collect();
        assert_eq!(waits[0], Duration::from_millis(10));
        assert_eq!(waits[1], Duration::from_millis(20));
        assert_eq!(waits[6], Duration::from_millis(640));
        assert_eq!(waits[7], DESCRIPTOR_BACKOFF_MAX);
        assert_eq!(waits[9], DESCRIPTOR_BACKOFF_MAX);
        backoff.reset();
        assert_eq!(backoff.next(), DESCRIPTOR_BACKOFF_START);
    }

    #[test]
    fn refusals_are_logged_once_per_interval_with_their_count() {
        let mut log = RefusalLog::default();
        let start = Instant::now();
        assert_eq!(log.record(start), Some(1));
        for i in 1..1000 {
            assert_eq!(log.record(start + Duration::from_millis(i)), None);
        }
        assert_eq!(log.record(start + REFUSAL_LOG_INTERVAL), Some(1000));

        // A burst that ended is reported by the next accepted connection, once due.
        let later = start + REFUSAL_LOG_INTERVAL + Duration::from_secs(1);
        assert_eq!(log.record(later), None);
        assert_eq!(log.flush(later), None);
        assert_eq!(log.flush(start + REFUSAL_LOG_INTERVAL * 2), Some(1));
        assert_eq!(log.flush(start + REFUSAL_LOG_INTERVAL * 4), None);
    }
}
