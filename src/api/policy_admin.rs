//! `PolicyService`: which policy decides, and replacing it while the server runs.
//!
//! A reload is recorded before it takes effect: an auditor can always say which policy
//! version was in force for any decision, and who put it there. A reload that cannot be
//! recorded does not happen; a policy set that does not load leaves the running one.

use std::sync::Arc;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::{Core, status};
use crate::auth;
use crate::policy::PolicySet;
use crate::proto;
use crate::proto::policy_service_server::PolicyService;
use crate::store::NewEvent;

/// The event kind of a reload that took effect.
pub const POLICY_RELOADED: &str = "policy.reloaded";
/// The event kind of a reload refused because the files did not load.
pub const POLICY_RELOAD_REFUSED: &str = "policy.reload_refused";

/// The payload of `policy.reloaded`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyReloaded {
    pub previous_version: String,
    pub policy_version: String,
    pub rule_count: usize,
    pub rule_names: Vec<String>,
}

/// The payload of `policy.reload_refused`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyReloadRefused {
    /// The version that stays in force.
    pub policy_version: String,
    pub error: String,
}

pub struct PolicyApi {
    core: Arc<Core>,
}

impl PolicyApi {
    pub fn new(core: Arc<Core>) -> Self {
        PolicyApi { core }
    }

    /// Appends one policy event; the actor is the admin who asked.
    async fn record(&self, kind: &str, actor: &str, payload: impl Serialize) -> Result<(), Status> {
        let payload = serde_json::to_value(payload)
            .map_err(|e| Status::internal(format!("policy event does not encode: {e}")))?;
        let event = NewEvent {
            kind: kind.to_string(),
            time: Utc::now(),
            actor: actor.to_string(),
            action_id: None,
            payload,
        };
        self.core
            .ledger
            .record(vec![event])
            .await
            .map(drop)
            .map_err(status::ledger)
    }
}

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn get_policy_set(
        &self,
        request: Request<proto::GetPolicySetRequest>,
    ) -> Result<Response<proto::GetPolicySetResponse>, Status> {
        auth::principal(&request)?;
        let policies = self.core.policies.get();
        Ok(Response::new(proto::GetPolicySetResponse {
            policy_version: policies.version().to_string(),
            rule_count: u32::try_from(policies.rule_count()).unwrap_or(u32::MAX),
            rule_names: policies.rule_names().map(str::to_string).collect(),
        }))
    }

    async fn reload_policies(
        &self,
        request: Request<proto::ReloadPoliciesRequest>,
    ) -> Result<Response<proto::ReloadPoliciesResponse>, Status> {
        // Only admins get here (see auth::roles).
        let admin = auth::principal(&request)?;
        if let Some(refusal) = self.core.ledger.write_refusal() {
            return Err(status::ledger(refusal));
        }
        let current = &self.core.policies;
        let _one_at_a_time = current.reload_lock().await;
        let previous = current.get();
        let directory = current.directory().to_path_buf();
        // Loading compiles every rule; keep it off the async workers.
        let loaded = tokio::task::spawn_blocking(move || PolicySet::load_dir(&directory))
            .await
            .map_err(|e| Status::internal(format!("policy loading did not finish: {e}")))?;
        let policies = match loaded {
            Ok(policies) => policies,
            Err(error) => {
                let refused = PolicyReloadRefused {
                    policy_version: previous.version().to_string(),
                    error: error.to_string(),
                };
                self.record(POLICY_RELOAD_REFUSED, &admin.id, &refused)
                    .await?;
                tracing::warn!(admin = %admin.id, error = %error, "policy reload refused");
                return Err(Status::failed_precondition(format!(
                    "the policies in {} do not load, so {} stays in force: {error}",
                    current.directory().display(),
                    previous.version()
                )));
            }
        };
        let reloaded = PolicyReloaded {
            previous_version: previous.version().to_string(),
            policy_version: policies.version().to_string(),
            rule_count: policies.rule_count(),
            rule_names: policies.rule_names().map(str::to_string).collect(),
        };
        // Durable first: a policy that decides anything is always in the record.
        self.record(POLICY_RELOADED, &admin.id, &reloaded).await?;
        current.replace(policies);
        tracing::info!(
            admin = %admin.id,
            previous = %reloaded.previous_version,
            version = %reloaded.policy_version,
            rules = reloaded.rule_count,
            "policies reloaded"
        );
        Ok(Response::new(proto::ReloadPoliciesResponse {
            previous_version: reloaded.previous_version,
            policy_version: reloaded.policy_version,
            rule_count: u32::try_from(reloaded.rule_count).unwrap_or(u32::MAX),
        }))
    }
}
