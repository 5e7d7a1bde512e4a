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
pub mod too_large;
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
    /// Held for a whole reload, so two reloads cannot record and swap out of order.
    reloading: tokio::sync::Mutex<()>,
}

impl CurrentPolicies {
    pub fn new(directory: PathBuf, policies: PolicySet) -> Self {
        CurrentPolicies {
            directory,
            current: RwLock::new(Arc::new(policies)),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    pub fn get(&self) -> Arc<PolicySet> {
        self.current.read().clone()
    }

    pub fn directory(&self) -> &std::path::Path {
        &self.directory
    }

    /// Serializes reloads; hold the guard from reading the files until the swap.
    pub async fn reload_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reloading.lock().await
    }

    /// Makes `policies` the set every later decision uses.
    pub fn replace(&self, policies: PolicySet) {
        *self.current.write() = Arc::new(policies);
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
    /// Open reviewer streams, for metrics.
    pub reviewer_streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl Core {
    /// Resolves when the server begins to stop.
    pub async fn stopped(&self) {
        let mut stopping = self.stopping.clone();
        // An error means the server is gone, which is stopping too.
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }
}
