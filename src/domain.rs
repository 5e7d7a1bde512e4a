//! The vocabulary shared by every layer: who is asking, what they ask for, how risky it is.
//!
//! These types are plain data. They carry no I/O and no protobuf types, so the policy engine
//! and the workflow state machine can be tested without a server, and the event log can store
//! them as stable JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The authenticated caller of an RPC. It always comes from credentials, never from a request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub id: String,
    pub kind: PrincipalKind,
    pub groups: Vec<String>,
    /// How the identity was established (e.g. `development-header`), recorded with every event
    /// so an auditor can tell a verified identity from an asserted one.
    pub authenticated_by: String,
}

impl Principal {
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// A workload: an AI agent, a pipeline, a service.
    Agent,
    /// A person.
    Human,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Agent => "agent",
            PrincipalKind::Human => "human",
        }
    }
}

impl fmt::Display for PrincipalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The span a caller called CheckAction from (W3C `traceparent`), recorded so the
/// action's span can be exported as its child, whenever that happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerSpan {
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// The caller's sampling flag. countersign exports every action regardless (it is an
    /// audit trail), but keeps the flag for whoever reads the log.
    pub sampled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// Who vouches for the human named in [`TaskContext::on_behalf_of`]. Reviewers and
/// auditors must be able to tell a verified delegation from a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBehalfOfSource {
    /// The caller's credential names the human (e.g. a JWT's `act` claim), or the caller
    /// is that human.
    Credential,
    /// Only the caller says so: an agent the configuration trusts to assert it, or a
    /// development identity.
    Asserted,
}

/// Everything a caller submits with CheckAction, validated and converted from protobuf.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRequest {
    pub action: ActionSpec,
    pub task: TaskContext,
    /// Empty when the caller did not ask for idempotency.
    pub idempotency_key: String,
}

/// The privileged action itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionSpec {
    /// Dotted verb, domain first: `iam.role.grant`, `db.instance.create`.
    #[serde(rename = "type")]
    pub action_type: String,
    pub resource: String,
    pub environment: String,
    /// Free-form parameters (from a `google.protobuf.Struct`); keys are sorted, so the
    /// serialized form is canonical.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Why the caller wants to act, in its own words.
    pub purpose: String,
}

/// The work the action belongs to and the human it is done for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskContext {
    pub task_id: String,
    pub origin: String,
    /// The human the agent acts for; that human may never review the action.
    pub on_behalf_of: String,
    pub labels: BTreeMap<String, String>,
}

/// How much damage an action could do. Ordered: `Low < Medium < High < Critical`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RiskLevel {
    #[default]
    Low,
    Medium,
    High,
    Critical,
}

impl RiskLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
            RiskLevel::Critical => "critical",
        }
    }
}

impl fmt::Display for RiskLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a policy says should happen. Ordered by strictness: `Allow < RequireApproval < Deny`,
/// so combining decisions is `max`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    #[default]
    RequireApproval,
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::RequireApproval => "require_approval",
            Effect::Deny => "deny",
        }
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
