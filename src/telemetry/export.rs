//! Ships the event log to an OTLP collector as spans, from a durable cursor.
//!
//! The exporter is a reader of the log like any auditor: it reads the events after its
//! cursor (a named position the store keeps beside the chain), turns the ones that close a
//! span into spans ([`super::spans`]), and sends them over OTLP/gRPC. The cursor moves, and
//! is flushed to disk, only after the collector accepted the batch. So:
//!
//! - a collector that is down loses nothing: the exporter retries with backoff, holding at
//!   most one batch ([`MAX_BATCH_EVENTS`] events) in memory, while the API keeps serving;
//! - after a restart export continues from the cursor;
//! - a span can arrive twice: when the collector accepted a batch but the cursor did not
//!   move: the process died first, the cursor could not be saved, or a stopping server gave
//!   up on an export still in flight after [`STOP_GRACE`]. Span ids are derived from the
//!   action, so such a repeat is the identical span.
//!
//! The exporter never writes to the log and never blocks a writer; it runs as one task.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::spans::{self, Closing, SpanModel, SpanStatus, Value};
use crate::ledger::Ledger;
use crate::store::StoredEvent;
use crate::workflow::ActionEvent;

/// The store cursor the span exporter keeps.
pub const CURSOR: &str = "otlp-spans";

/// Events read (and spans held) per batch: bounds memory while a collector is down.
pub const MAX_BATCH_EVENTS: usize = 512;

/// Backoff between failed exports: doubling from the first to the last.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long a stopping server waits for the export in flight.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long one export call may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSettings {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// `service.name`, unless `OTEL_SERVICE_NAME` sets it.
    pub service_name: String,
    /// How often metrics are pushed to the same endpoint.
    pub metrics_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the OTLP exporter for {endpoint} cannot be built: {reason}")]
    Build { endpoint: String, reason: String },
    #[error("the span export cursor cannot be read: {0}")]
    Cursor(String),
}

/// How far export has come; read by metrics and the status endpoint.
#[derive(Debug, Default)]
pub struct ExportProgress {
    /// The last log sequence whose spans the collector accepted.
    exported_through: AtomicU64,
    /// Failed export attempts since the last success.
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ExportProgress {
    pub fn exported_through(&self) -> u64 {
        self.exported_through.load(Ordering::Acquire)
    }

    pub fn consecutive_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }
}

/// Starts the exporter task. It ends when `stopping` becomes true, after letting a batch
/// in flight finish for up to [`STOP_GRACE`]; one that does not finish by then is sent
/// again after the restart.
pub fn start(
    ledger: Arc<Ledger>,
    settings: &ExportSettings,
    stopping: watch::Receiver<bool>,
) -> Result<(Arc<ExportProgress>, tokio::task::JoinHandle<()>), ExportError> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| ExportError::Build {
            endpoint: settings.endpoint.clone(),
            reason: e.to_string(),
        })?;
    exporter.set_resource(&resource(settings));
    let cursor = ledger
        .log()
        .cursor(CURSOR)
        .map_err(|e| ExportError::Cursor(e.to_string()))?;
    let progress = Arc::new(ExportProgress::default());
    progress.exported_through.store(cursor, Ordering::Release);
    tracing::info!(endpoint = %settings.endpoint, cursor, "exporting the event log as spans");
    let task = tokio::spawn(run(exporter, ledger, progress.clone(), stopping));
    Ok((progress, task))
}

/// A meter provider pushing metrics to the same collector every `metrics_interval`.
/// Must be built inside the tokio runtime (its gRPC channel lives there).
pub fn meter_provider(
    settings: &ExportSettings,
) -> Result<opentelemetry_sdk::metrics::SdkMeterProvider, ExportError> {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| ExportError::Build {
            endpoint: settings.endpoint.clone(),
            reason: e.to_string(),
        })?;
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
        .with_interval(settings.metrics_interval)
        .build();
    Ok(opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource(settings))
        .build())
}

/// The resource every exported signal carries: `service.name`, `service.version`, and
/// `OTEL_RESOURCE_ATTRIBUTES`.
pub(crate) fn resource(settings: &ExportSettings) -> Resource {
    let mut builder = Resource::builder();
    // The standard variable wins; the builder's default detectors read it.
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name(settings.service_name.clone());
    }
    builder
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

async fn run(
    exporter: opentelemetry_otlp::SpanExporter,
    ledger: Arc<Ledger>,
    progress: Arc<ExportProgress>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut applied = ledger.watch_applied();
    let scope = InstrumentationScope::builder("countersign")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    loop {
        let cursor = progress.exported_through();
        // Wait until there is something after the cursor that readers may see.
        let visible = *applied.borrow_and_update();
        if visible <= cursor {
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                () = stopped(&mut stopping) => return,
            }
            continue;
        }
        let log = ledger.log().clone();
        let read = tokio::task::spawn_blocking(move || read_batch(&log, cursor, visible)).await;
        let events = match read {
            Ok(Ok(events)) if !events.is_empty() => events,
            Ok(Ok(_)) => {
                // Nothing readable although the position says otherwise: wait for news.
                if wait_or_stop(&mut stopping, MAX_BACKOFF).await {
                    return;
                }
                continue;
            }
            Ok(Err(problem)) => {
                let problem = problem.to_string();
                record_failure(
                    &progress,
                    &problem,
                    "the event log cannot be read for export",
                );
                if wait_or_stop(&mut stopping, MAX_BACKOFF).await {
                    return;
                }
                continue;
            }
            // The reading thread was cancelled: the runtime is shutting down.
            Err(_) => return,
        };
        let last = events.last().map_or(cursor, |e| e.sequence);
        let batch: Vec<SpanData> = build_spans(&ledger, &events)
            .into_iter()
            .map(|span| span_data(span, &scope))
            .collect();

        let mut backoff = FIRST_BACKOFF;
        let mut stop_after_batch = false;
        while !batch.is_empty() {
            let export = exporter.export(batch.clone());
            tokio::pin!(export);
            let result = tokio::select! {
                result = &mut export => result,
                () = stopped(&mut stopping) => {
                    // A graceful stop lets the batch in flight finish (briefly), so that
                    // what the collector accepted is not sent again after the restart.
                    stop_after_batch = true;
                    match tokio::time::timeout(STOP_GRACE, &mut export).await {
                        Ok(result) => result,
                        Err(_) => return,
                    }
                }
            };
            match result {
                Ok(()) => break,
                Err(e) if !stop_after_batch => {
                    record_failure(&progress, &e.to_string(), "span export failed; retrying");
                }
                Err(_) => return,
            }
            if wait_or_stop(&mut stopping, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if let Err(e) = ledger.log().save_cursor(CURSOR, last) {
            // The spans were accepted; without a saved cursor they are sent again after a
            // restart, which is the documented "twice" case, never a loss.
            record_failure(
                &progress,
                &e.to_string(),
                "the export cursor cannot be saved",
            );
        }
        progress.exported_through.store(last, Ordering::Release);
        if progress.failures.swap(0, Ordering::Relaxed) > 0 {
            tracing::info!(through = last, "span export recovered");
        }
        *progress.last_error.lock() = None;
        if stop_after_batch {
            return;
        }
    }
}

/// Resolves when the server begins to stop (or is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Sleeps for `wait` unless the server stops first; `true` when it stops.
async fn wait_or_stop(stopping: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    let stopped = tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = stopped(stopping) => true,
    };
    stopped || *stopping.borrow()
}

fn record_failure(progress: &ExportProgress, problem: &str, what: &str) {
    let failures = progress.failures.fetch_add(1, Ordering::Relaxed) + 1;
    // Loud once, then quietly: a collector down for an hour must not flood the logs.
    if failures == 1 || failures.is_power_of_two() {
        tracing::warn!(error = %problem, failures, "{what}");
    } else {
        tracing::debug!(error = %problem, failures, "{what}");
    }
    *progress.last_error.lock() = Some(problem.to_string());
}

/// The events after `cursor`, up to `visible` and at most [`MAX_BATCH_EVENTS`].
fn read_batch(
    log: &crate::store::EventLog,
    cursor: u64,
    visible: u64,
) -> Result<Vec<StoredEvent>, crate::store::StoreError> {
    log.iter_from(cursor + 1)
        .take(MAX_BATCH_EVENTS)
        .take_while(|e| e.as_ref().map_or(true, |e| e.sequence <= visible))
        .collect()
}

/// The spans the events close, built against the current state of their actions.
fn build_spans(ledger: &Ledger, events: &[StoredEvent]) -> Vec<SpanModel> {
    let mut spans = Vec::new();
    for stored in events {
        let Some(action_id) = stored.action_id else {
            continue;
        };
        let event = match ActionEvent::from_stored(&stored.kind, &stored.payload) {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(sequence = stored.sequence, error = %e, "an event does not decode; no span for it");
                continue;
            }
        };
        let record = ledger.actions().get(&action_id).cloned();
        let Some(record) = record else {
            tracing::error!(sequence = stored.sequence, %action_id, "an event names an unknown action; no span for it");
            continue;
        };
        spans.extend(spans::spans_for(
            Closing {
                sequence: stored.sequence,
                time: stored.time,
                event: &event,
            },
            &record,
        ));
    }
    spans
}

/// The OpenTelemetry SDK's form of a span model.
fn span_data(span: SpanModel, scope: &InstrumentationScope) -> SpanData {
    let tracestate = span
        .tracestate
        .as_deref()
        .and_then(|t| t.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanData {
        // Exported whatever the caller sampled: this is the audit trail.
        span_context: SpanContext::new(
            TraceId::from_bytes(span.trace_id),
            SpanId::from_bytes(span.span_id),
            TraceFlags::SAMPLED,
            false,
            tracestate,
        ),
        parent_span_id: span
            .parent_span_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: span.parent_is_remote,
        span_kind: if span.name == spans::OUTCOME_SPAN {
            SpanKind::Internal
        } else {
            SpanKind::Server
        },
        name: Cow::Borrowed(span.name),
        start_time: SystemTime::from(span.start),
        end_time: SystemTime::from(span.end),
        attributes: key_values(span.attributes),
        dropped_attributes_count: 0,
        events: span_events(span.events),
        links: SpanLinks::default(),
        status: match span.status {
            SpanStatus::Unset => Status::Unset,
            SpanStatus::Ok => Status::Ok,
            SpanStatus::Error(description) => Status::error(description),
        },
        instrumentation_scope: scope.clone(),
    }
}

fn span_events(events: Vec<spans::SpanEvent>) -> SpanEvents {
    let mut out = SpanEvents::default();
    out.events = events
        .into_iter()
        .map(|e| {
            Event::new(
                e.name,
                SystemTime::from(e.time),
                key_values(e.attributes),
                0,
            )
        })
        .collect();
    out
}

fn key_values(attributes: spans::Attributes) -> Vec<KeyValue> {
    attributes
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                Value::Str(s) => opentelemetry::Value::from(s),
                Value::Int(i) => opentelemetry::Value::I64(i),
                Value::Bool(b) => opentelemetry::Value::Bool(b),
                Value::StrArray(items) => opentelemetry::Value::Array(Array::String(
                    items.into_iter().map(StringValue::from).collect(),
                )),
            };
            KeyValue::new(key, value)
        })
        .collect()
}
