//! Ships the event log to an OTLP collector as spans, from a durable cursor.
//!
//! The exporter is a reader of the log like any auditor, a [`follower`] of it: it reads the
//! events after its cursor (a named position the store keeps beside the chain), turns the
//! ones that close a span into spans ([`super::spans`]), and sends them over OTLP/gRPC. The
//! cursor moves, and is flushed to disk, only after the collector accepted the batch. So:
//!
//! - a collector that is down loses nothing: the exporter retries with backoff, holding at
//!   most one batch ([`MAX_BATCH_EVENTS`] events) in memory, while the API keeps serving;
//! - after a restart export continues from the cursor;
//! - a span can arrive twice: when the collector accepted a batch but the cursor did not
//!   move: the process died first, the cursor could not be saved, or a stopping server gave
//!   up on an export still in flight after [`follower::STOP_GRACE`]. Span ids are derived
//!   from the action, so such a repeat is the identical span.
//!
//! The exporter never writes to the log and never blocks a writer; it runs as one task.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use tokio::sync::watch;

use super::spans::{self, Closing, SpanModel, SpanStatus, Value};
use crate::ledger::Ledger;
use crate::ledger::follower::{self, Backoff, Consumer, Progress};
use crate::store::StoredEvent;
use crate::workflow::ActionEvent;

/// The store cursor the span exporter keeps.
pub const CURSOR: &str = "otlp-spans";

/// Events read (and spans held) per batch: bounds memory while a collector is down.
pub const MAX_BATCH_EVENTS: usize = 512;

/// Backoff between failed exports: doubling from the first to the last.
const BACKOFF: Backoff = Backoff {
    first: Duration::from_millis(500),
    max: Duration::from_secs(30),
};

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

/// Starts the exporter task. It ends when `stopping` becomes true, after letting a batch
/// in flight finish for up to [`follower::STOP_GRACE`]; one that does not finish by then is
/// sent again after the restart.
pub fn start(
    ledger: Arc<Ledger>,
    settings: &ExportSettings,
    stopping: watch::Receiver<bool>,
) -> Result<(Arc<Progress>, tokio::task::JoinHandle<()>), ExportError> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(build_failed(settings))?;
    exporter.set_resource(&resource(settings));
    let sink = SpanSink {
        exporter,
        scope: InstrumentationScope::builder("countersign")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    };
    let follow = follower::Settings {
        cursor: CURSOR.to_string(),
        activity: "span export",
        batch_events: MAX_BATCH_EVENTS,
        backoff: BACKOFF,
    };
    let started = follower::start(ledger, sink, follow, stopping)
        .map_err(|e| ExportError::Cursor(e.to_string()))?;
    let cursor = started.progress.through();
    tracing::info!(endpoint = %settings.endpoint, cursor, "exporting the event log as spans");
    Ok((started.progress, started.task))
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
        .map_err(build_failed(settings))?;
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
        .with_interval(settings.metrics_interval)
        .build();
    Ok(opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource(settings))
        .build())
}

/// The error for an OTLP exporter that cannot be built for `settings`.
pub(crate) fn build_failed(
    settings: &ExportSettings,
) -> impl FnOnce(opentelemetry_otlp::ExporterBuildError) -> ExportError + '_ {
    |e| ExportError::Build {
        endpoint: settings.endpoint.clone(),
        reason: e.to_string(),
    }
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

/// The exporter as a follower's consumer: a whole batch of events is one item, the spans
/// they close.
struct SpanSink {
    exporter: opentelemetry_otlp::SpanExporter,
    scope: InstrumentationScope,
}

impl Consumer<Ledger> for SpanSink {
    type Item = Vec<SpanData>;
    type Error = OTelSdkError;

    async fn next_item(
        &mut self,
        ledger: &Ledger,
        events: &[StoredEvent],
    ) -> Result<Option<(usize, Vec<SpanData>)>, String> {
        let batch: Vec<SpanData> = build_spans(ledger, events)
            .await?
            .into_iter()
            .map(|span| span_data(span, &self.scope))
            .collect();
        Ok((!batch.is_empty()).then(|| (events.len().saturating_sub(1), batch)))
    }

    fn hand_over(
        &self,
        batch: &Vec<SpanData>,
    ) -> impl Future<Output = Result<(), OTelSdkError>> + Send {
        self.exporter.export(batch.clone())
    }
}

/// The spans the events close, built against the current state of their actions. `Err`
/// when an action's record cannot be read back from the log (tried again later).
async fn build_spans(ledger: &Ledger, events: &[StoredEvent]) -> Result<Vec<SpanModel>, String> {
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
        let record = match ledger.action(&action_id).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                tracing::error!(sequence = stored.sequence, %action_id, "an event names an unknown action; no span for it");
                continue;
            }
            Err(e) => {
                return Err(format!(
                    "action {action_id} (event {}) cannot be read back: {e}",
                    stored.sequence
                ));
            }
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
    Ok(spans)
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
