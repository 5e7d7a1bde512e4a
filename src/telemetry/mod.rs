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

/// Installs the global log subscriber. `RUST_LOG` overrides the default `info` level.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // The default reports a failed log write with `eprintln!`, which panics when stderr
        // is gone (a closed pipe): losing a log line must never take the server down.
        .log_internal_errors(false);
    // A second init (tests starting several servers) is harmless and ignored.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
