//! Logs, and the trace context callers propagate.

use std::io::IsTerminal;

use tonic::metadata::MetadataMap;
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

/// The trace id of a W3C `traceparent` header (`00-<trace id>-<parent id>-<flags>`), if the
/// caller sent a well-formed one. An invalid header is ignored, as the W3C spec asks.
pub fn trace_id(metadata: &MetadataMap) -> Option<String> {
    let header = metadata.get("traceparent")?.to_str().ok()?.trim();
    let mut parts = header.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    valid.then(|| trace_id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_traceparent(value: &'static str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("traceparent", value.parse().unwrap());
        m
    }

    #[test]
    fn a_valid_traceparent_yields_its_trace_id() {
        let m = with_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(
            trace_id(&m).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert_eq!(trace_id(&with_traceparent(bad)), None, "{bad}");
        }
        assert_eq!(trace_id(&MetadataMap::new()), None);
    }
}
