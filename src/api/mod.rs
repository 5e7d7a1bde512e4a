//! The gRPC edge: validates requests, asks the policy engine and the ledger, answers.
//!
//! Handlers stay thin: identity comes from [`crate::auth`], shapes from [`validate`],
//! decisions from [`crate::policy`] and [`crate::workflow`], durability from
//! [`crate::ledger`]. Errors become statuses only in [`status`].

mod action_gate;
mod audit;
pub mod convert;
mod policy_admin;
mod review;
mod review_stream;
mod status;
pub mod strict;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;

pub use action_gate::ActionGateApi;
pub use audit::AuditApi;
pub use policy_admin::PolicyApi;
pub use review::ReviewApi;

use crate::ledger::Ledger;
use crate::policy::PolicySet;
use crate::workflow::DecisionTimes;

/// The loaded policy set, swappable as a whole so a reload never mixes two versions.
pub struct CurrentPolicies {
    directory: PathBuf,
    current: RwLock<Arc<PolicySet>>,
}

impl CurrentPolicies {
    pub fn new(directory: PathBuf, policies: PolicySet) -> Self {
        CurrentPolicies {
            directory,
            current: RwLock::new(Arc::new(policies)),
        }
    }

    pub fn get(&self) -> Arc<PolicySet> {
        self.current.read().clone()
    }

    pub fn directory(&self) -> &std::path::Path {
        &self.directory
    }
}

/// What every service shares.
pub struct Core {
    pub ledger: Arc<Ledger>,
    pub policies: Arc<CurrentPolicies>,
    pub times: DecisionTimes,
    /// The longest one AwaitDecision call waits before answering with the current status.
    pub max_await: std::time::Duration,
    /// How long a reviewer stream's client may leave its buffer full before it is told to
    /// resync and closed.
    pub reviewer_stall_timeout: std::time::Duration,
    /// Becomes `true` when the server begins to stop: long waits answer at once and
    /// streams end, so graceful shutdown never waits on a reviewer who never leaves.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl Core {
    /// Resolves when the server begins to stop.
    pub async fn stopped(&self) {
        let mut stopping = self.stopping.clone();
        // An error means the server is gone, which is stopping too.
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }
}

/// UNIMPLEMENTED, naming the RPC: the v1 surface is complete, its implementation is not yet.
fn not_yet(rpc: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!(
        "{rpc} is part of the countersign v1 API but not implemented by this server version"
    ))
}
