//! The W3C trace context a caller sends with CheckAction (`traceparent`, `tracestate`).
//!
//! An action's span becomes a child of the caller's span, so the human wait shows up
//! inside the agent's own trace. Without a (valid) `traceparent`, the action starts a trace
//! of its own, whose id is derived from the action id so that re-exporting an action
//! always yields the same trace.

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use crate::domain::CallerSpan;

/// Longest `tracestate` kept (the W3C limit is 32 list members; 512 bytes is what
/// vendors are asked to keep).
const MAX_TRACESTATE_BYTES: usize = 512;

/// The caller's trace and the span CheckAction was called from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    pub caller: CallerSpan,
}

/// The caller's trace context, if it sent a well-formed `traceparent`. An invalid header
/// is ignored, as the W3C spec asks; so is a `tracestate` without a valid `traceparent`.
pub fn trace_context(metadata: &MetadataMap) -> Option<TraceContext> {
    let header = metadata.get("traceparent")?.to_str().ok()?.trim();
    let mut parts = header.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let valid = is_hex(version, 2)
        && version != "ff"
        && is_hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && is_hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && is_hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    if !valid {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceContext {
        trace_id: trace_id.to_string(),
        caller: CallerSpan {
            span_id: parent_id.to_string(),
            sampled: flags & 1 == 1,
            tracestate: tracestate(metadata),
        },
    })
}

/// `tracestate`, kept only if it is short printable ASCII (it goes into the log).
fn tracestate(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get("tracestate")?.to_str().ok()?.trim();
    (!value.is_empty()
        && value.len() <= MAX_TRACESTATE_BYTES
        && value.bytes().all(|b| (b' '..=b'~').contains(&b)))
    .then(|| value.to_string())
}

/// The trace id of an action the caller sent no trace context for: derived from the
/// action id, so the same action always lands in the same trace.
pub fn derived_trace_id(action_id: &Uuid) -> String {
    let digest = Sha256::new()
        .chain_update(b"countersign trace\0")
        .chain_update(action_id.as_bytes())
        .finalize();
    hex::encode(&digest[..16])
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&'static str, &'static str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn a_valid_traceparent_yields_the_trace_and_the_callers_span() {
        let m = with(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=opaque"),
        ]);
        let context = trace_context(&m).unwrap();
        assert_eq!(context.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.caller.span_id, "00f067aa0ba902b7");
        assert!(context.caller.sampled);
        assert_eq!(context.caller.tracestate.as_deref(), Some("vendor=opaque"));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(trace_context(&with(&[("traceparent", bad)])), None, "{bad}");
        }
        assert_eq!(trace_context(&with(&[("tracestate", "a=b")])), None);
    }

    #[test]
    fn an_unsampled_caller_and_an_oversized_tracestate_are_read_as_such() {
        let long: &'static str = Box::leak("a=".repeat(300).into_boxed_str());
        let m = with(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            ),
            ("tracestate", long),
        ]);
        let context = trace_context(&m).unwrap();
        assert!(!context.caller.sampled);
        assert_eq!(context.caller.tracestate, None);
    }

    #[test]
    fn derived_trace_ids_are_stable_and_distinct() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        assert_eq!(derived_trace_id(&a), derived_trace_id(&a));
        assert_ne!(derived_trace_id(&a), derived_trace_id(&b));
        assert!(is_hex(&derived_trace_id(&a), 32));
    }
}
