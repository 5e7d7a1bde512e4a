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

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::domain::{ActionRequest, Principal};

/// Domain separation: a digest of this form can never collide with another use of SHA-256.
const DIGEST_VERSION: &str = "countersign.action.v1";

pub fn action_digest(requester: &Principal, request: &ActionRequest) -> String {
    let action = &request.action;
    let task = &request.task;
    let labels: Map<String, Value> = task
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    // serde_json's Map is a BTreeMap (the `preserve_order` feature is off), so every object
    // serializes with sorted keys.
    let canonical = json!({
        "action": {
            "type": action.action_type,
            "resource": action.resource,
            "environment": action.environment,
            "parameters": Value::Object(action.parameters.clone()),
            "purpose": action.purpose,
        },
        "requester": { "id": requester.id, "kind": requester.kind.as_str() },
        "task": {
            "task_id": task.task_id,
            "origin": task.origin,
            "on_behalf_of": task.on_behalf_of,
            "labels": labels,
        },
        "v": DIGEST_VERSION,
    });
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
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
