//! The action digest binds a decision to exactly one action.
//!
//! Executors recompute it from the action they are about to perform and compare, so the
//! canonical form is documented and reproducible outside Rust: the JSON object below with
//! object keys sorted at every level, no insignificant whitespace, UTF-8, integers without
//! a fraction; the digest is the lower-case hex SHA-256 of those bytes. In Python:
//! `hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
//! ensure_ascii=False).encode()).hexdigest()`.
//!
//! ```json
//! {"action": {"environment", "parameters", "purpose", "resource", "type"},
//!  "requester": {"id", "kind"},
//!  "task": {"labels", "on_behalf_of", "origin", "task_id"},
//!  "v": "countersign.action.v1"}
//! ```

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::domain::{ActionRequest, Principal};

/// Domain separation: a digest of this form can never collide with another use of SHA-256.
const DIGEST_VERSION: &str = "countersign.action.v1";

/// The canonical form, borrowed from the request: it is computed on every CheckAction, and
/// building a `serde_json::Value` first meant copying the parameters. Fields are declared in
/// sorted order because serde writes them in declaration order; `parameters` is a
/// `serde_json::Map` and `labels` a `BTreeMap`, both sorted (serde_json's `preserve_order`
/// feature is off).
#[derive(Serialize)]
struct Canonical<'a> {
    action: CanonicalAction<'a>,
    requester: CanonicalRequester<'a>,
    task: CanonicalTask<'a>,
    v: &'static str,
}

#[derive(Serialize)]
struct CanonicalAction<'a> {
    environment: &'a str,
    parameters: &'a Map<String, Value>,
    purpose: &'a str,
    resource: &'a str,
    #[serde(rename = "type")]
    action_type: &'a str,
}

#[derive(Serialize)]
struct CanonicalRequester<'a> {
    id: &'a str,
    kind: &'a str,
}

#[derive(Serialize)]
struct CanonicalTask<'a> {
    labels: &'a BTreeMap<String, String>,
    on_behalf_of: &'a str,
    origin: &'a str,
    task_id: &'a str,
}

/// Feeds serialized bytes straight into the hash.
struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn action_digest(requester: &Principal, request: &ActionRequest) -> String {
    let action = &request.action;
    let task = &request.task;
    let canonical = Canonical {
        action: CanonicalAction {
            environment: &action.environment,
            parameters: &action.parameters,
            purpose: &action.purpose,
            resource: &action.resource,
            action_type: &action.action_type,
        },
        requester: CanonicalRequester {
            id: &requester.id,
            kind: requester.kind.as_str(),
        },
        task: CanonicalTask {
            labels: &task.labels,
            on_behalf_of: &task.on_behalf_of,
            origin: &task.origin,
            task_id: &task.task_id,
        },
        v: DIGEST_VERSION,
    };
    let mut hasher = HashWriter(Sha256::new());
    // Serializing strings, maps and JSON values into a writer that never fails cannot fail.
    if let Err(e) = serde_json::to_writer(&mut hasher, &canonical) {
        tracing::error!(error = %e, "the action digest's canonical form did not serialize");
    }
    hex::encode(hasher.0.finalize())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::{ActionSpec, PrincipalKind, TaskContext};

    fn request(role: &str) -> ActionRequest {
        let mut parameters = Map::new();
        parameters.insert("role".into(), Value::String(role.into()));
        parameters.insert("count".into(), json!(3));
        ActionRequest {
            action: ActionSpec {
                action_type: "iam.role.grant".into(),
                resource: "projects/acme".into(),
                environment: "production".into(),
                parameters,
                purpose: "onboarding".into(),
            },
            task: TaskContext::default(),
            idempotency_key: "k1".into(),
        }
    }

    fn agent() -> Principal {
        Principal {
            id: "agent-1".into(),
            kind: PrincipalKind::Agent,
            groups: vec![],
            authenticated_by: "test".into(),
        }
    }

    #[test]
    fn digest_matches_the_documented_canonical_form() {
        // Computed independently with the Python one-liner from the module docs.
        let expected_json = r#"{"action":{"environment":"production","parameters":{"count":3,"role":"admin"},"purpose":"onboarding","resource":"projects/acme","type":"iam.role.grant"},"requester":{"id":"agent-1","kind":"agent"},"task":{"labels":{},"on_behalf_of":"","origin":"","task_id":""},"v":"countersign.action.v1"}"#;
        assert_eq!(
            action_digest(&agent(), &request("admin")),
            hex::encode(Sha256::digest(expected_json.as_bytes()))
        );
    }

    #[test]
    fn digest_of_nested_parameters_labels_and_escapes_is_the_sorted_json_form() {
        let mut request = request("admin");
        request.action.parameters.insert(
            "nested".into(),
            json!({"z": [1, 2.5, null, true], "a": {"ü": "line\nbreak \"quoted\""}}),
        );
        request.task.labels.insert("team".into(), "payments".into());
        request.task.labels.insert("env".into(), "prod".into());
        request.task.on_behalf_of = "alice@example.com".into();
        // The canonical form built as a serde_json::Value (sorted keys at every level).
        let reference = json!({
            "action": {
                "type": request.action.action_type,
                "resource": request.action.resource,
                "environment": request.action.environment,
                "parameters": Value::Object(request.action.parameters.clone()),
                "purpose": request.action.purpose,
            },
            "requester": {"id": "agent-1", "kind": "agent"},
            "task": {
                "task_id": "", "origin": "", "on_behalf_of": "alice@example.com",
                "labels": {"team": "payments", "env": "prod"},
            },
            "v": DIGEST_VERSION,
        });
        assert_eq!(
            action_digest(&agent(), &request),
            hex::encode(Sha256::digest(reference.to_string().as_bytes()))
        );
    }

    #[test]
    fn any_change_to_the_action_changes_the_digest() {
        assert_ne!(
            action_digest(&agent(), &request("admin")),
            action_digest(&agent(), &request("owner"))
        );
        let mut other = agent();
        other.id = "agent-2".into();
        assert_ne!(
            action_digest(&agent(), &request("admin")),
            action_digest(&other, &request("admin"))
        );
    }

    #[test]
    fn idempotency_key_and_groups_do_not_change_the_digest() {
        let mut retried = request("admin");
        retried.idempotency_key = "k2".into();
        let mut regrouped = agent();
        regrouped.groups = vec!["deployers".into()];
        assert_eq!(
            action_digest(&agent(), &request("admin")),
            action_digest(&regrouped, &retried)
        );
    }
}
