//! `PolicyService`: which policy decides.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Core, not_yet};
use crate::auth;
use crate::proto;
use crate::proto::policy_service_server::PolicyService;

pub struct PolicyApi {
    core: Arc<Core>,
}

impl PolicyApi {
    pub fn new(core: Arc<Core>) -> Self {
        PolicyApi { core }
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
        _request: Request<proto::ReloadPoliciesRequest>,
    ) -> Result<Response<proto::ReloadPoliciesResponse>, Status> {
        Err(not_yet("PolicyService.ReloadPolicies"))
    }
}
