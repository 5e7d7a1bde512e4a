//! Who may do what, beyond "authenticated".
//!
//! Until configurable roles arrive with real authentication, two well-known groups carry
//! the elevated roles: members of `auditors` read every action and event, members of
//! `admins` administer. Reviewing is decided per action by its reviewer groups (see
//! `workflow::commands`).

use crate::domain::{Principal, PrincipalKind};

pub const AUDITOR_GROUP: &str = "auditors";
pub const ADMIN_GROUP: &str = "admins";

/// May read any action, not only its own: humans (who review) and auditors.
pub fn reads_all_actions(principal: &Principal) -> bool {
    principal.kind == PrincipalKind::Human || is_auditor(principal)
}

/// May wait on any action: auditors and admins.
pub fn is_auditor(principal: &Principal) -> bool {
    principal.in_group(AUDITOR_GROUP) || principal.in_group(ADMIN_GROUP)
}
