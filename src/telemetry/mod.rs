//! What SREs see: logs, the trace context callers propagate, and the event log exported
//! as OpenTelemetry spans.
//!
//! [`trace_context`] reads a caller's W3C `traceparent`; [`spans`] turns an action's
//! history into spans (pure); [`export`] ships them from the event log to an OTLP
//! collector, after a durable cursor, so a collector that is down loses nothing.

pub mod export;
pub mod http;
pub mod metrics;
pub mod spans;
pub mod trace_context;

pub use trace_context::{TraceContext, trace_context};

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The tracing target of the per-RPC spans; only the OpenTelemetry layer listens to it.
pub const RPC_TARGET: &str = "countersign::rpc";

/// The tracing target of the one line each CheckAction decision logs. Allowed actions log it
/// at DEBUG: they are the bulk of traffic and already in the event log, the spans and the
/// metrics, and formatting and writing a line per call cost about 6 % of the server's CPU on
/// the allow path. Denied and pending ones log at INFO. The OpenTelemetry layer takes all of
/// them, so every RPC span carries its decision.
pub const DECISION_TARGET: &str = "countersign::decision";

/// Set once the OpenTelemetry layer is installed: only then does the edge read the caller's
/// trace context for the RPC span.
static RPC_TRACING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether RPC spans are exported through OpenTelemetry.
pub fn rpc_tracing() -> bool {
    RPC_TRACING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global log subscriber. `RUST_LOG` overrides the default `info` level. With
/// `tracer`, every RPC's span (and the log events inside it) are also exported through it.
pub fn init_logging(format: LogFormat, tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // The default reports a failed log write with `eprintln!`, which panics when stderr
        // is gone (a closed pipe): losing a log line must never take the server down.
        .log_internal_errors(false);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let with_otel = tracer.is_some();
    let otel = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(RPC_TARGET, tracing::Level::DEBUG)
                    .with_target(DECISION_TARGET, tracing::Level::DEBUG)
                    .with_target("countersign", tracing::Level::INFO),
            )
    });
    // A second init (tests starting several servers) is harmless and ignored.
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    if installed && with_otel {
        RPC_TRACING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A tracer exporting RPC spans over OTLP/gRPC in batches. Build it inside the tokio runtime;
/// shut the provider down before exiting so the last spans are sent.
pub fn rpc_tracer_provider(
    settings: &export::ExportSettings,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, export::ExportError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .build()
        .map_err(export::build_failed(settings))?;
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(export::resource(settings))
        .build())
}

/// The caller's trace context from HTTP/2 headers, for the RPC span's parent.
pub fn remote_context(headers: &::http::HeaderMap) -> opentelemetry::Context {
    use opentelemetry::propagation::TextMapPropagator as _;
    struct Headers<'a>(&'a ::http::HeaderMap);
    impl opentelemetry::propagation::Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }
    opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Headers(headers))
}
