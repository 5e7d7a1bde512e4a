//! The server's metrics: one set of instruments, read two ways.
//!
//! Every metric is defined here once, in [`Metrics`]. It is kept in a Prometheus registry
//! (`prometheus-client`, scraped as text from `--metrics-listen`, see [`super::http`]) and,
//! when an OTLP endpoint is configured, mirrored into OpenTelemetry instruments pushed by a
//! periodic reader. Counters and histograms are fed as things happen (the ledger reports
//! through [`crate::ledger::LedgerObserver`]; the listeners through
//! [`crate::listener::ConnectionStats`]); gauges are sampled when read, from the ledger,
//! the reviewer streams and the span exporter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter as OtelCounter, Histogram as OtelHistogram, Meter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::auth::{Budget, LimitObserver};
use crate::domain::RiskLevel;
use crate::ledger::follower::Progress;
use crate::ledger::{Ledger, LedgerObserver};
use crate::listener::ConnectionStats;
use crate::listener::stats::{LISTENERS, Reason};
use crate::workflow::ActionStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    status: &'static str,
    risk: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    /// `review.refused` or `outcome.refused`.
    event: &'static str,
    /// `at_once`: recorded as it happened; `counted`: into its window's summary.
    logged: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    budget: &'static str,
}

/// Values read when metrics are read, not counted as they happen.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub pending_actions: u64,
    /// Action records held whole in memory: pending and recently settled ones.
    pub records_in_memory: u64,
    pub await_waiters: u64,
    pub reviewer_streams: u64,
    /// Events recorded but not yet accepted by the collector (0 without export).
    pub export_lag_events: u64,
    /// Age of the oldest of those events, in seconds.
    pub export_lag_seconds: f64,
}

/// Where gauges are sampled from. The ledger is held weakly: metrics must never keep a
/// stopped server's data directory open.
#[derive(Debug, Default)]
pub struct Sources {
    ledger: Weak<Ledger>,
    reviewer_streams: Arc<AtomicUsize>,
    export: Option<Arc<Progress>>,
    /// Counted by the listeners as connections come and go.
    connections: ConnectionStats,
}

impl Sources {
    pub fn new(
        ledger: &Arc<Ledger>,
        reviewer_streams: Arc<AtomicUsize>,
        export: Option<Arc<Progress>>,
        connections: ConnectionStats,
    ) -> Sources {
        Sources {
            ledger: Arc::downgrade(ledger),
            reviewer_streams,
            export,
            connections,
        }
    }

    pub fn sample(&self) -> Sample {
        let mut sample = Sample {
            reviewer_streams: self.reviewer_streams.load(Ordering::Relaxed) as u64,
            ..Sample::default()
        };
        let Some(ledger) = self.ledger.upgrade() else {
            return sample;
        };
        let applied = {
            let actions = ledger.actions();
            sample.pending_actions = actions.pending_count() as u64;
            sample.records_in_memory = actions.hot_count() as u64;
            actions.applied_sequence()
        };
        sample.await_waiters = ledger.waiter_count() as u64;
        if let Some(export) = &self.export {
            let exported = export.through();
            sample.export_lag_events = applied.saturating_sub(exported);
            if sample.export_lag_events > 0
                && let Ok(Some(oldest)) = ledger.log().get(exported + 1)
            {
                sample.export_lag_seconds =
                    (Utc::now() - oldest.time).num_milliseconds().max(0) as f64 / 1000.0;
            }
        }
        sample
    }
}

/// The OpenTelemetry side of the instruments, when OTLP metrics are on.
struct OtelInstruments {
    decisions: OtelCounter<u64>,
    refusals: OtelCounter<u64>,
    rate_limited: OtelCounter<u64>,
    review_wait: OtelHistogram<f64>,
    flush: OtelHistogram<f64>,
}

/// Every countersign metric; see the module documentation.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    rate_limited: Family<BudgetLabels, Counter>,
    review_wait: Histogram,
    flush: Histogram,
    pending_actions: Gauge,
    records_in_memory: Gauge,
    await_waiters: Gauge,
    reviewer_streams: Gauge,
    export_lag_events: Gauge,
    export_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    sources: Arc<Sources>,
    otel: Option<OtelInstruments>,
}

impl Metrics {
    /// The instruments, sampling gauges from `sources`; mirrored into `meter` if given.
    pub fn new(sources: Sources, meter: Option<&Meter>) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("countersign");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Actions given a status, by status and risk: at evaluation (allowed, denied, pending) and after review (approved, rejected, expired, cancelled)",
            decisions.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "audit_refusals",
            "Refused votes and outcome reports, by event and whether each was recorded at once or counted into a summary of repeats",
            refusals.clone(),
        );
        let rate_limited = Family::<BudgetLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Calls refused RESOURCE_EXHAUSTED for their caller's rate budget, by budget",
            rate_limited.clone(),
        );
        // 1 s to about 1.5 days.
        let review_wait = Histogram::new(exponential_buckets(1.0, 2.0, 18));
        registry.register_with_unit(
            "review_wait",
            "Time from request to final status, for actions that went to review",
            prometheus_client::registry::Unit::Seconds,
            review_wait.clone(),
        );
        // 100 µs to about 1.6 s.
        let flush = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register_with_unit(
            "store_flush",
            "Time to append and flush one group commit to the event log",
            prometheus_client::registry::Unit::Seconds,
            flush.clone(),
        );
        let pending_actions = Gauge::default();
        registry.register(
            "pending_actions",
            "Actions waiting for reviewers",
            pending_actions.clone(),
        );
        let records_in_memory = Gauge::default();
        registry.register(
            "action_records_in_memory",
            "Action records held whole in memory (pending and recently settled; the rest are read from the log)",
            records_in_memory.clone(),
        );
        let await_waiters = Gauge::default();
        registry.register(
            "await_waiters",
            "AwaitDecision calls waiting right now",
            await_waiters.clone(),
        );
        let reviewer_streams = Gauge::default();
        registry.register(
            "reviewer_streams",
            "Open StreamPending reviewer streams",
            reviewer_streams.clone(),
        );
        let export_lag_events = Gauge::default();
        registry.register(
            "export_lag_events",
            "Events recorded but not yet accepted by the OTLP collector",
            export_lag_events.clone(),
        );
        let export_lag_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "export_lag",
            "Age of the oldest event not yet accepted by the OTLP collector",
            prometheus_client::registry::Unit::Seconds,
            export_lag_seconds.clone(),
        );

        let connections = &sources.connections;
        registry.register(
            "connections_open",
            "Connections open, by listener",
            connections.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused by a listener: at its cap (limit), or not accepted for now because the process was out of file descriptors (descriptors)",
            connections.refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the server closed: no request within the first-request timeout, or no open stream for the idle timeout",
            connections.closed.clone(),
        );

        let sources = Arc::new(sources);
        let otel = meter.map(|meter| otel_instruments(meter, &sources));
        Arc::new(Metrics {
            registry,
            decisions,
            refusals,
            rate_limited,
            review_wait,
            flush,
            pending_actions,
            records_in_memory,
            await_waiters,
            reviewer_streams,
            export_lag_events,
            export_lag_seconds,
            sources,
            otel,
        })
    }

    /// The Prometheus (OpenMetrics) text exposition, gauges sampled now.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let sample = self.sources.sample();
        self.pending_actions.set(to_i64(sample.pending_actions));
        self.records_in_memory.set(to_i64(sample.records_in_memory));
        self.await_waiters.set(to_i64(sample.await_waiters));
        self.reviewer_streams.set(to_i64(sample.reviewer_streams));
        self.export_lag_events.set(to_i64(sample.export_lag_events));
        self.export_lag_seconds.set(sample.export_lag_seconds);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    pub fn sample(&self) -> Sample {
        self.sources.sample()
    }
}

impl LedgerObserver for Metrics {
    fn decided(&self, status: ActionStatus, risk: RiskLevel, waited: Option<Duration>) {
        let risk = risk.to_string();
        if let Some(otel) = &self.otel {
            otel.decisions.add(
                1,
                &[
                    KeyValue::new("status", status.as_str()),
                    KeyValue::new("risk", risk.clone()),
                ],
            );
            if let Some(waited) = waited {
                otel.review_wait.record(waited.as_secs_f64(), &[]);
            }
        }
        self.decisions
            .get_or_create(&DecisionLabels {
                status: status.as_str(),
                risk,
            })
            .inc();
        if let Some(waited) = waited {
            self.review_wait.observe(waited.as_secs_f64());
        }
    }

    fn flushed(&self, took: Duration, _events: usize) {
        self.flush.observe(took.as_secs_f64());
        if let Some(otel) = &self.otel {
            otel.flush.record(took.as_secs_f64(), &[]);
        }
    }

    fn refused(&self, kind: &'static str, recorded: bool) {
        let logged = if recorded { "at_once" } else { "counted" };
        self.refusals
            .get_or_create(&RefusalLabels {
                event: kind,
                logged,
            })
            .inc();
        if let Some(otel) = &self.otel {
            otel.refusals.add(
                1,
                &[
                    KeyValue::new("event", kind),
                    KeyValue::new("logged", logged),
                ],
            );
        }
    }
}

impl LimitObserver for Metrics {
    fn limited(&self, budget: Budget) {
        self.rate_limited
            .get_or_create(&BudgetLabels {
                budget: budget.name(),
            })
            .inc();
        if let Some(otel) = &self.otel {
            otel.rate_limited
                .add(1, &[KeyValue::new("budget", budget.name())]);
        }
    }
}

fn otel_instruments(meter: &Meter, sources: &Arc<Sources>) -> OtelInstruments {
    // Gauges are observed when the periodic reader collects; they hold the sources weakly
    // through `sources`, which holds the ledger weakly.
    let gauge = |name: &'static str, description: &'static str, read: fn(&Sample) -> u64| {
        let sources = sources.clone();
        meter
            .u64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |observer| observer.observe(read(&sources.sample()), &[]))
            .build();
    };
    gauge(
        "countersign.actions.pending",
        "Actions waiting for reviewers",
        |s| s.pending_actions,
    );
    gauge(
        "countersign.actions.records_in_memory",
        "Action records held whole in memory",
        |s| s.records_in_memory,
    );
    gauge(
        "countersign.await.waiters",
        "AwaitDecision calls waiting right now",
        |s| s.await_waiters,
    );
    gauge(
        "countersign.reviewer.streams",
        "Open StreamPending reviewer streams",
        |s| s.reviewer_streams,
    );
    gauge(
        "countersign.export.lag.events",
        "Events recorded but not yet accepted by the OTLP collector",
        |s| s.export_lag_events,
    );
    let connections = sources.connections.clone();
    meter
        .i64_observable_gauge("countersign.connections.open")
        .with_description("Connections open, by listener")
        .with_callback(move |observer| {
            for listener in LISTENERS {
                observer.observe(
                    connections.open_now(listener),
                    &[KeyValue::new("listener", listener)],
                );
            }
        })
        .build();
    // Refused and closed connections: one counter each, by listener and reason.
    let by_reason = |name: &'static str,
                     description: &'static str,
                     reasons: &'static [Reason],
                     total: fn(&ConnectionStats, &'static str, Reason) -> u64| {
        let connections = sources.connections.clone();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |observer| {
                for listener in LISTENERS {
                    for &reason in reasons {
                        observer.observe(
                            total(&connections, listener, reason),
                            &[
                                KeyValue::new("listener", listener),
                                KeyValue::new("reason", reason.as_str()),
                            ],
                        );
                    }
                }
            })
            .build();
    };
    by_reason(
        "countersign.connections.refused",
        "Connections refused by a listener, by reason (limit, descriptors)",
        &Reason::REFUSED,
        ConnectionStats::refused_total,
    );
    by_reason(
        "countersign.connections.closed",
        "Connections the server closed, by reason (first_request_timeout, idle)",
        &Reason::CLOSED,
        ConnectionStats::closed_total,
    );
    let lag_sources = sources.clone();
    meter
        .f64_observable_gauge("countersign.export.lag.age")
        .with_unit("s")
        .with_description("Age of the oldest event not yet accepted by the OTLP collector")
        .with_callback(move |observer| {
            observer.observe(lag_sources.sample().export_lag_seconds, &[]);
        })
        .build();
    OtelInstruments {
        decisions: meter
            .u64_counter("countersign.decisions")
            .with_description("Actions given a status, by status and risk")
            .build(),
        refusals: meter
            .u64_counter("countersign.audit.refusals")
            .with_description(
                "Refused votes and outcome reports, by event and how they were logged",
            )
            .build(),
        rate_limited: meter
            .u64_counter("countersign.rate_limited")
            .with_description("Calls refused for their caller's rate budget, by budget")
            .build(),
        review_wait: meter
            .f64_histogram("countersign.review.wait")
            .with_unit("s")
            .with_description("Time from request to final status, for reviewed actions")
            .build(),
        flush: meter
            .f64_histogram("countersign.store.flush.duration")
            .with_unit("s")
            .with_description("Time to append and flush one group commit")
            .build(),
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
