//! Who may call which RPC: roles from configuration, required per RPC.
//!
//! Every countersign RPC has exactly one [`Requirement`] in [`requirement`]; an RPC
//! missing from that table is refused, so a new RPC cannot ship open by accident (a test
//! walks the descriptor set). The edge ([`super::guard`]) checks the requirement once per
//! call and stores the caller's [`Grants`] for the handlers, which decide what needs a
//! particular record (a caller waits only on its own actions, an agent lists only its own).
//!
//! This module is pure: configuration and a principal in, a verdict out.

use serde::Deserialize;

use super::credentials::normalize_groups;
use crate::domain::{Principal, PrincipalKind};

/// `[roles]` in the configuration: which groups hold which role.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolesConfig {
    /// Members read the event log and every action (`AuditService`), and may wait on any
    /// action.
    pub auditors: Vec<String>,
    /// Members administer (`PolicyService.ReloadPolicies`).
    pub admins: Vec<String>,
    /// Humans in one of these groups may review (`SubmitReview`, `StreamPending`); each
    /// action's policy may narrow that further with its own reviewer groups. Empty: every
    /// human may review, within the policy's groups.
    pub reviewers: Vec<String>,
    /// Agents in these groups may name the human they act for in `task.on_behalf_of`
    /// when their credential does not say. Recorded as asserted. Empty: nobody may.
    pub on_behalf_of_asserters: Vec<String>,
}

impl Default for RolesConfig {
    fn default() -> Self {
        RolesConfig {
            auditors: vec!["auditors".into()],
            admins: vec!["admins".into()],
            reviewers: Vec::new(),
            on_behalf_of_asserters: Vec::new(),
        }
    }
}

impl RolesConfig {
    /// Group names follow the rules for names from credentials, so a typo with a space or a
    /// control character is caught at start-up rather than never matching.
    pub fn validate(&self) -> Result<(), RolesConfigError> {
        for (field, groups) in [
            ("roles.auditors", &self.auditors),
            ("roles.admins", &self.admins),
            ("roles.reviewers", &self.reviewers),
            ("roles.on_behalf_of_asserters", &self.on_behalf_of_asserters),
        ] {
            normalize_groups(groups, field).map_err(RolesConfigError::Groups)?;
        }
        Ok(())
    }
}

/// Why `[roles]` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolesConfigError {
    /// A group name that would never match one from a credential; the message names the
    /// field and the rule.
    #[error("{0}")]
    Groups(String),
}

/// Why a caller may not make an RPC, in words fit for the caller: it names groups, never
/// credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleDenied {
    /// Not a countersign RPC (see [`requirement`]).
    #[error("{path} is not an RPC countersign grants to anyone")]
    UnknownRpc { path: String },
    #[error("{id} is an agent; only humans review actions")]
    AgentReviewing { id: String },
    #[error("{id} may not review; reviewing is for members of {groups}")]
    NotReviewer { id: String, groups: String },
    #[error("{id} may not read the audit log; it is for members of {groups}")]
    NotAuditor { id: String, groups: String },
    #[error("{id} may not administer countersign; that is for members of {groups}")]
    NotAdmin { id: String, groups: String },
}

/// What an RPC asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// Any authenticated agent or human.
    Caller,
    /// A human who may review.
    Reviewer,
    /// An auditor.
    Auditor,
    /// An administrator.
    Admin,
}

/// The requirement of each countersign RPC, by its gRPC path. `None`: not a countersign
/// RPC, refused.
pub fn requirement(path: &str) -> Option<Requirement> {
    let (service, method) = path.strip_prefix("/countersign.v1.")?.split_once('/')?;
    Some(match (service, method) {
        ("ActionGate", "CheckAction" | "AwaitDecision" | "ReportOutcome" | "CancelAction") => {
            Requirement::Caller
        }
        ("ReviewService", "SubmitReview" | "StreamPending") => Requirement::Reviewer,
        // What a caller may see is narrowed per record by the handlers.
        ("ReviewService", "ListActions" | "GetAction") => Requirement::Caller,
        ("AuditService", "ReadEvents" | "VerifyLog") => Requirement::Auditor,
        ("PolicyService", "GetPolicySet") => Requirement::Caller,
        ("PolicyService", "ReloadPolicies") => Requirement::Admin,
        _ => return None,
    })
}

/// Whether a refusal by role of the RPC at `path` is decided on the record the call
/// targets rather than at the edge: the guard then admits the caller with a
/// [`RoleRefusal`] attached, and the handler refuses the call on that record, so the
/// record's history shows the attempt. Only SubmitReview: a vote from someone who may not
/// review at all (an agent, a human outside `reviewers`) belongs in the history of the
/// action it targeted, as `review.refused`.
pub fn refused_on_record(path: &str) -> bool {
    path == "/countersign.v1.ReviewService/SubmitReview"
}

/// Why the caller may not make the call it was admitted to (see [`refused_on_record`]),
/// in words fit for the caller. Put in the request extensions by the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRefusal(pub String);

/// The roles one caller holds, as established by the edge for this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grants {
    pub auditor: bool,
    pub admin: bool,
    pub reviewer: bool,
    pub may_assert_on_behalf_of: bool,
}

impl Grants {
    /// May read any action, not only its own: reviewers (who must see what they review)
    /// and auditors.
    pub fn reads_all_actions(&self) -> bool {
        self.reviewer || self.auditor
    }

    /// May wait on any action: auditors and admins.
    pub fn waits_on_any_action(&self) -> bool {
        self.auditor || self.admin
    }
}

/// The configured roles, ready to check principals against.
#[derive(Debug, Clone)]
pub struct Roles {
    config: RolesConfig,
}

impl Roles {
    pub fn new(config: RolesConfig) -> Result<Roles, RolesConfigError> {
        config.validate()?;
        Ok(Roles { config })
    }

    pub fn grants(&self, principal: &Principal) -> Grants {
        let member = |groups: &[String]| groups.iter().any(|g| principal.in_group(g));
        let human = principal.kind == PrincipalKind::Human;
        Grants {
            auditor: member(&self.config.auditors),
            admin: member(&self.config.admins),
            reviewer: human && (self.config.reviewers.is_empty() || member(&self.config.reviewers)),
            may_assert_on_behalf_of: principal.kind == PrincipalKind::Agent
                && member(&self.config.on_behalf_of_asserters),
        }
    }

    /// Whether `principal` may call the RPC at `path`; the error says why not, in words
    /// fit for the caller (it names groups, never credentials).
    pub fn authorize(&self, path: &str, principal: &Principal) -> Result<Grants, RoleDenied> {
        let grants = self.grants(principal);
        let Some(requirement) = requirement(path) else {
            return Err(RoleDenied::UnknownRpc {
                path: path.to_string(),
            });
        };
        let id = principal.id.clone();
        let refusal = match requirement {
            Requirement::Caller => return Ok(grants),
            Requirement::Reviewer if grants.reviewer => return Ok(grants),
            Requirement::Auditor if grants.auditor => return Ok(grants),
            Requirement::Admin if grants.admin => return Ok(grants),
            Requirement::Reviewer if principal.kind != PrincipalKind::Human => {
                RoleDenied::AgentReviewing { id }
            }
            Requirement::Reviewer => RoleDenied::NotReviewer {
                id,
                groups: list(&self.config.reviewers),
            },
            Requirement::Auditor => RoleDenied::NotAuditor {
                id,
                groups: list(&self.config.auditors),
            },
            Requirement::Admin => RoleDenied::NotAdmin {
                id,
                groups: list(&self.config.admins),
            },
        };
        Err(refusal)
    }
}

fn list(groups: &[String]) -> String {
    if groups.is_empty() {
        return "no group (the role is not configured)".to_string();
    }
    groups
        .iter()
        .map(|g| format!("`{g}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn principal(id: &str, kind: PrincipalKind, groups: &[&str]) -> Principal {
        Principal {
            id: id.into(),
            kind,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            authenticated_by: "test".into(),
        }
    }

    fn roles() -> Roles {
        Roles::new(RolesConfig {
            reviewers: vec!["sre".into()],
            on_behalf_of_asserters: vec!["orchestrators".into()],
            ..RolesConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn every_countersign_rpc_has_a_requirement() {
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for file in set.file.iter().filter(|f| f.package() == "countersign.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/countersign.v1.{}/{}", service.name(), method.name());
                    assert!(requirement(&path).is_some(), "{path} has no requirement");
                    methods += 1;
                }
            }
        }
        assert!(methods >= 12, "only {methods} methods found");
    }

    #[test]
    fn unknown_paths_are_refused() {
        let admin = principal("root", PrincipalKind::Human, &["admins", "auditors"]);
        for path in [
            "/countersign.v1.ActionGate/DeleteEverything",
            "/countersign.v2.ActionGate/CheckAction",
            "/grpc.health.v1.Health/Check",
            "",
        ] {
            assert!(roles().authorize(path, &admin).is_err(), "{path}");
        }
    }

    #[test]
    fn agents_and_humans_may_use_the_gate_but_not_review() {
        let agent = principal("deployer", PrincipalKind::Agent, &["sre"]);
        let roles = roles();
        assert!(
            roles
                .authorize("/countersign.v1.ActionGate/CheckAction", &agent)
                .is_ok()
        );
        let refusal = roles
            .authorize("/countersign.v1.ReviewService/SubmitReview", &agent)
            .unwrap_err()
            .to_string();
        assert!(refusal.contains("agent"), "{refusal}");
    }

    #[test]
    fn reviewing_needs_a_reviewer_group_when_one_is_configured() {
        let roles = roles();
        let alice = principal("alice", PrincipalKind::Human, &["sre"]);
        let bob = principal("bob", PrincipalKind::Human, &["finance"]);
        let review = "/countersign.v1.ReviewService/SubmitReview";
        assert!(roles.authorize(review, &alice).unwrap().reviewer);
        let refusal = roles.authorize(review, &bob).unwrap_err().to_string();
        assert!(refusal.contains("`sre`"), "{refusal}");
        // With no reviewer groups configured, every human reviews.
        let open = Roles::new(RolesConfig::default()).unwrap();
        assert!(open.authorize(review, &bob).is_ok());
    }

    #[test]
    fn audit_is_for_auditors_and_reload_for_admins() {
        let roles = roles();
        let reviewer = principal("alice", PrincipalKind::Human, &["sre"]);
        let auditor = principal("erin", PrincipalKind::Human, &["auditors"]);
        let admin = principal("root", PrincipalKind::Human, &["admins"]);
        for rpc in ["ReadEvents", "VerifyLog"] {
            let path = format!("/countersign.v1.AuditService/{rpc}");
            let refusal = roles.authorize(&path, &reviewer).unwrap_err().to_string();
            assert!(refusal.contains("`auditors`"), "{refusal}");
            assert!(roles.authorize(&path, &auditor).is_ok());
            // Administering is not auditing: separation of duties.
            assert!(roles.authorize(&path, &admin).is_err());
        }
        let reload = "/countersign.v1.PolicyService/ReloadPolicies";
        assert!(roles.authorize(reload, &auditor).is_err());
        assert!(roles.authorize(reload, &admin).is_ok());
    }

    #[test]
    fn only_agents_in_an_asserter_group_may_assert_on_behalf_of() {
        let roles = roles();
        let orchestrator = principal("flow", PrincipalKind::Agent, &["orchestrators"]);
        let other = principal("bot", PrincipalKind::Agent, &[]);
        let human = principal("alice", PrincipalKind::Human, &["orchestrators"]);
        assert!(roles.grants(&orchestrator).may_assert_on_behalf_of);
        assert!(!roles.grants(&other).may_assert_on_behalf_of);
        assert!(!roles.grants(&human).may_assert_on_behalf_of);
    }

    #[test]
    fn group_names_are_checked_at_start_up() {
        let bad = RolesConfig {
            auditors: vec!["audit team".into()],
            ..RolesConfig::default()
        };
        let err = Roles::new(bad).unwrap_err().to_string();
        assert!(err.contains("roles.auditors"), "{err}");
    }
}
