//! What the listeners count, shared with [`crate::telemetry::metrics`]: connections open,
//! refused (at the cap, or out of file descriptors) and closed by the server (no first
//! request in time, or idle).
//!
//! Kept as prometheus-client instruments (cheap atomics, cloned handles share the value)
//! so the accept loops count without knowing whether metrics are served; the metrics
//! module registers them and mirrors them into OpenTelemetry when it is on.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// The listeners, as named in metrics and logs.
pub const LISTENERS: [&str; 3] = [GRPC, METRICS, SLACK];
pub const GRPC: &str = "grpc";
pub const METRICS: &str = "metrics";
pub const SLACK: &str = "slack_interactivity";

/// Why a connection was refused or closed by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Refused at once: the listener's connection cap was reached.
    Limit,
    /// Not accepted for now: the process is out of file descriptors (EMFILE, ENFILE).
    Descriptors,
    /// Closed: no request within the first-request timeout (TLS handshake and HTTP/2
    /// preface included).
    FirstRequestTimeout,
    /// Closed: no open stream for the idle timeout.
    Idle,
}

impl Reason {
    pub const REFUSED: [Reason; 2] = [Reason::Limit, Reason::Descriptors];
    pub const CLOSED: [Reason; 2] = [Reason::FirstRequestTimeout, Reason::Idle];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Limit => "limit",
            Reason::Descriptors => "descriptors",
            Reason::FirstRequestTimeout => "first_request_timeout",
            Reason::Idle => "idle",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

/// The connection counters of every listener of one server.
#[derive(Clone, Debug, Default)]
pub struct ConnectionStats {
    pub open: Family<ListenerLabels, Gauge>,
    pub refused: Family<ReasonLabels, Counter>,
    pub closed: Family<ReasonLabels, Counter>,
}

impl ConnectionStats {
    pub fn opened(&self, listener: &'static str) {
        self.open.get_or_create(&ListenerLabels { listener }).inc();
    }

    pub fn ended(&self, listener: &'static str) {
        self.open.get_or_create(&ListenerLabels { listener }).dec();
    }

    pub fn refused(&self, listener: &'static str, reason: Reason) {
        self.refused.get_or_create(&labels(listener, reason)).inc();
    }

    pub fn closed(&self, listener: &'static str, reason: Reason) {
        self.closed.get_or_create(&labels(listener, reason)).inc();
    }

    /// Current values, for the OpenTelemetry mirror.
    pub fn open_now(&self, listener: &'static str) -> i64 {
        self.open.get_or_create(&ListenerLabels { listener }).get()
    }

    pub fn refused_total(&self, listener: &'static str, reason: Reason) -> u64 {
        self.refused.get_or_create(&labels(listener, reason)).get()
    }

    pub fn closed_total(&self, listener: &'static str, reason: Reason) -> u64 {
        self.closed.get_or_create(&labels(listener, reason)).get()
    }
}

fn labels(listener: &'static str, reason: Reason) -> ReasonLabels {
    ReasonLabels {
        listener,
        reason: reason.as_str(),
    }
}
