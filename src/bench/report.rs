//! What a benchmark reports, as JSON (`--json`) and as a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tonic::Code;

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, with three
/// significant digits (an error of at most 0.1 %).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid bounds")
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }

    fn row(&self) -> String {
        format!(
            "p50 {:>8}  p90 {:>8}  p99 {:>8}  max {:>8}",
            micros(self.p50_us),
            micros(self.p90_us),
            micros(self.p99_us),
            micros(self.max_us)
        )
    }
}

/// One driven RPC: the health check (baseline) or CheckAction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `baseline` or `check_action`.
    pub name: String,
    /// The gRPC method driven.
    pub rpc: String,
    /// Calls completed inside the measured window (answers and errors).
    pub requests: u64,
    pub ok: u64,
    /// Failed calls by gRPC code name, e.g. `UNAVAILABLE`.
    pub errors: BTreeMap<String, u64>,
    /// The measured window, from the end of the warm-up to the last answer.
    pub seconds: f64,
    pub requests_per_second: f64,
    /// Every call, successful or not.
    pub latency: LatencySummary,
    /// CheckAction only: latency by the path the request was chosen to take
    /// (`allow`, `deny`, `pending`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_by_path: BTreeMap<String, LatencySummary>,
    /// CheckAction only: answers by status (`ALLOWED`, `DENIED`, `PENDING`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub statuses: BTreeMap<String, u64>,
    /// CheckAction only: answers whose status was not the one the mix asked for (policies
    /// other than the shipped ones).
    #[serde(default)]
    pub unexpected_status: u64,
}

/// `countersign bench`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub server: String,
    pub connections: u32,
    pub in_flight: u32,
    pub warmup_seconds: f64,
    pub duration_seconds: f64,
    /// Weights of each path, as given to `--mix`.
    pub mix: BTreeMap<String, u32>,
    /// Present with `--baseline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<RunReport>,
    pub check_action: RunReport,
    /// CheckAction's requests/s divided by the baseline's, with `--baseline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_to_baseline: Option<f64>,
}

impl LoadReport {
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mix: Vec<String> = self.mix.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            out,
            "{}: {} connections, {} in flight, {:.1}s warm-up, {:.1}s measured, mix {}",
            self.server,
            self.connections,
            self.in_flight,
            self.warmup_seconds,
            self.duration_seconds,
            mix.join(",")
        );
        for run in self.baseline.iter().chain([&self.check_action]) {
            let _ = writeln!(
                out,
                "{:<13} {:>9.0} req/s  {}  ({} calls, {} errors)",
                run.name,
                run.requests_per_second,
                run.latency.row(),
                run.requests,
                run.requests - run.ok
            );
            for (path, latency) in &run.latency_by_path {
                let _ = writeln!(out, "  {path:<11} {:>15}  {}", "", latency.row());
            }
            if !run.statuses.is_empty() {
                let statuses: Vec<String> = run
                    .statuses
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                let _ = writeln!(out, "  statuses: {}", statuses.join(", "));
            }
            if run.unexpected_status > 0 {
                let _ = writeln!(
                    out,
                    "  {} answers had another status than the mix asked for (not the shipped policies?)",
                    run.unexpected_status
                );
            }
            for (code, n) in &run.errors {
                let _ = writeln!(out, "  error {code}: {n}");
            }
        }
        if let Some(ratio) = self.ratio_to_baseline {
            let _ = writeln!(
                out,
                "CheckAction throughput is {:.1}% of the baseline's",
                ratio * 100.0
            );
        }
        out
    }
}

/// `countersign bench review-loop`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReviewLoopReport {
    pub server: String,
    pub connections: u32,
    /// AwaitDecision calls waiting at once.
    pub waiters: u32,
    /// Reviewer StreamPending streams open at once.
    pub reviewers: u32,
    /// Pending actions created for the waiters.
    pub created: u64,
    /// Approving reviews sent and accepted.
    pub approvals: u64,
    /// Waiters that got their final answer.
    pub woken: u64,
    /// Pending actions the reviewer streams delivered (each stream counts its own).
    pub streamed: u64,
    /// From sending the approving SubmitReview to the waiter's AwaitDecision answer.
    pub wake_latency: LatencySummary,
    /// The SubmitReview round trip of the approvals.
    pub approve_latency: LatencySummary,
    /// Failed calls by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// The approval rate asked for (0: as fast as the reviewers can).
    pub approvals_per_second: f64,
    /// The server's resident memory with every waiter and stream open (`--server-pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_rss_kib: Option<u64>,
    /// The server's peak resident memory so far (`--server-pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_peak_rss_kib: Option<u64>,
}

impl ReviewLoopReport {
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} waiters, {} reviewer streams, {} connections, approvals {}",
            self.server,
            self.waiters,
            self.reviewers,
            self.connections,
            if self.approvals_per_second > 0.0 {
                format!("at {:.0}/s", self.approvals_per_second)
            } else {
                "as fast as possible".to_string()
            }
        );
        let _ = writeln!(
            out,
            "created {}, streamed {}, approved {}, woken {}",
            self.created, self.streamed, self.approvals, self.woken
        );
        let _ = writeln!(
            out,
            "approve sent -> waiter woken  {}",
            self.wake_latency.row()
        );
        let _ = writeln!(
            out,
            "SubmitReview round trip       {}",
            self.approve_latency.row()
        );
        if let Some(rss) = self.server_rss_kib {
            let _ = writeln!(
                out,
                "server RSS with everyone waiting: {:.1} MiB (peak {:.1} MiB)",
                rss as f64 / 1024.0,
                self.server_peak_rss_kib.unwrap_or(rss) as f64 / 1024.0
            );
        }
        for (code, n) in &self.errors {
            let _ = writeln!(out, "  error {code}: {n}");
        }
        out
    }
}

/// Microseconds as a short human figure: `87µs`, `1.32ms`, `2.10s`.
pub fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// The canonical upper-case name of a gRPC code, as in the gRPC specification.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Resident and peak resident memory of a process, from `/proc/PID/status` (Linux).
pub fn process_rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_percentiles_in_microseconds() {
        let mut h = histogram();
        for us in 1..=100u64 {
            h.record(us).unwrap();
        }
        let s = LatencySummary::of(&h);
        assert_eq!((s.count, s.p50_us, s.p99_us, s.max_us), (100, 50, 99, 100));
        assert_eq!(LatencySummary::of(&histogram()), LatencySummary::default());
    }

    #[test]
    fn figures_read_naturally() {
        assert_eq!(micros(87), "87µs");
        assert_eq!(micros(1_320), "1.32ms");
        assert_eq!(micros(2_100_000), "2.10s");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
    }
}
