//! An action's status: the one type both the events (what status an event leads to) and
//! the fold (`record.rs`) name, kept apart so neither imports the other.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    Allowed,
    Denied,
    Pending,
    Approved,
    Rejected,
    Expired,
    Cancelled,
}

impl ActionStatus {
    /// Final statuses never change again.
    pub fn is_final(self) -> bool {
        !matches!(self, ActionStatus::Pending)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ActionStatus::Allowed => "allowed",
            ActionStatus::Denied => "denied",
            ActionStatus::Pending => "pending",
            ActionStatus::Approved => "approved",
            ActionStatus::Rejected => "rejected",
            ActionStatus::Expired => "expired",
            ActionStatus::Cancelled => "cancelled",
        }
    }
}
