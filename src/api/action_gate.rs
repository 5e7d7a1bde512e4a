//! `ActionGate`: what agents and pipelines call.

use std::sync::Arc;

use std::time::Duration;

use chrono::Utc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{Core, convert, status, validate};
use crate::auth;
use crate::domain::{OnBehalfOfSource, Principal, PrincipalKind, TaskContext};
use crate::ledger::{CheckRecorded, LedgerError, NewCheck};
use crate::policy::EvaluationInput;
use crate::proto;
use crate::proto::action_gate_server::ActionGate;
use crate::telemetry;
use crate::workflow::{
    ActionCommand, ActionRequested, ActionStatus, action_digest, evaluate_check,
};

pub struct ActionGateApi {
    core: Arc<Core>,
}

impl ActionGateApi {
    pub fn new(core: Arc<Core>) -> Self {
        ActionGateApi { core }
    }
}

/// Settles `task.on_behalf_of` and who vouches for it. A pure decision; the reason in
/// `Err` is what the caller is told (PERMISSION_DENIED).
///
/// - The credential names the human ([`auth::ActingFor`]): an empty field is filled in from
///   it; the same human (case-insensitively, as reviews compare identities) is kept; anyone
///   else is refused, since a request body must not contradict its credential.
/// - Otherwise a named human is accepted only when the caller is that human, the caller
///   is an agent trusted to assert it (`roles.on_behalf_of_asserters`), or the identity is
///   a development one (which asserts everything). The two last are recorded as asserted.
///
/// The settled task is what the action's digest and its `action.requested` event record.
fn settle_on_behalf_of(
    task: &mut TaskContext,
    acting_for: Option<&auth::ActingFor>,
    principal: &Principal,
    grants: &auth::Grants,
) -> Result<Option<OnBehalfOfSource>, String> {
    let vouched = |acting_for: &auth::ActingFor| {
        if acting_for.asserted {
            OnBehalfOfSource::Asserted
        } else {
            OnBehalfOfSource::Credential
        }
    };
    if let Some(acting_for) = acting_for {
        if task.on_behalf_of.is_empty() {
            task.on_behalf_of = acting_for.human.clone();
            return Ok(Some(vouched(acting_for)));
        }
        if task.on_behalf_of.eq_ignore_ascii_case(&acting_for.human) {
            return Ok(Some(vouched(acting_for)));
        }
        return Err(format!(
            "the token acts for {}; the request names {} in task.on_behalf_of",
            acting_for.human, task.on_behalf_of
        ));
    }
    if task.on_behalf_of.is_empty() {
        return Ok(None);
    }
    if principal.kind == PrincipalKind::Human
        && task.on_behalf_of.eq_ignore_ascii_case(&principal.id)
    {
        return Ok(Some(OnBehalfOfSource::Credential));
    }
    if grants.may_assert_on_behalf_of || principal.authenticated_by == auth::DEVELOPMENT_METHOD {
        return Ok(Some(OnBehalfOfSource::Asserted));
    }
    Err(format!(
        "{} may not name the human it acts for: its credential names none, and it is not in a group of roles.on_behalf_of_asserters; leave task.on_behalf_of empty or use a credential that names the human",
        principal.id
    ))
}

#[tonic::async_trait]
impl ActionGate for ActionGateApi {
    async fn check_action(
        &self,
        request: Request<proto::CheckActionRequest>,
    ) -> Result<Response<proto::CheckActionResponse>, Status> {
        let principal = auth::principal(&request)?;
        let acting_for = auth::acting_for(&request);
        let grants = auth::grants(&request);
        let refuser = auth::Refuser::of(&request);
        let trace = telemetry::trace_context(request.metadata());
        let mut action =
            validate::check_action_request(request.into_inner()).map_err(status::invalid)?;
        let on_behalf_of_source =
            settle_on_behalf_of(&mut action.task, acting_for.as_ref(), &principal, &grants)
                .map_err(|reason| refuser.permission_denied(reason))?;
        let ledger = &self.core.ledger;
        if let Some(refusal) = ledger.write_refusal() {
            return Err(status::ledger(refusal));
        }
        let digest = action_digest(&principal, &action);

        // An idempotent retry is answered from the state without evaluating again; the
        // ledger re-checks, so two racing first attempts still make one action.
        if !action.idempotency_key.is_empty()
            && let Some(existing) = ledger
                .by_idempotency_key(&principal.id, &action.idempotency_key)
                .await
                .map_err(status::ledger)?
        {
            if existing.action_digest != digest {
                return Err(status::ledger(LedgerError::IdempotencyConflict {
                    existing: existing.id,
                }));
            }
            return Ok(Response::new(convert::check_response(&existing)));
        }

        let now = Utc::now();
        let decision = self.core.policies.get().evaluate(&EvaluationInput {
            principal: &principal,
            request: &action,
            now,
        });
        let evaluated = evaluate_check(decision, now, &self.core.times);
        let action_id = Uuid::now_v7();
        let (trace_id, caller_span) = match trace {
            Some(trace) => (trace.trace_id, Some(trace.caller)),
            None => (telemetry::trace_context::derived_trace_id(&action_id), None),
        };
        let check = NewCheck {
            action_id,
            time: now,
            requested: ActionRequested {
                requester: principal,
                request: action,
                action_digest: digest,
                on_behalf_of_source,
                trace_id: Some(trace_id),
                caller_span,
            },
            evaluated,
        };
        let record = match ledger.record_check(check).await.map_err(status::ledger)? {
            CheckRecorded::New(record) => {
                if let Some(decision) = &record.decision {
                    macro_rules! log_decision {
                        ($level:expr) => {
                            tracing::event!(
                                target: telemetry::DECISION_TARGET,
                                $level,
                                action_id = %record.id,
                                action_type = %record.request.action.action_type,
                                requester = %record.requester.id,
                                status = ?record.status,
                                risk = %decision.risk,
                                rules = ?decision.matched_rules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
                                rule_errors = decision.errors.len(),
                                "action checked"
                            )
                        };
                    }
                    if record.status == ActionStatus::Allowed {
                        log_decision!(tracing::Level::DEBUG);
                    } else {
                        log_decision!(tracing::Level::INFO);
                    }
                }
                record
            }
            CheckRecorded::Existing(record) => record,
        };
        Ok(Response::new(convert::check_response(&record)))
    }

    async fn await_decision(
        &self,
        request: Request<proto::AwaitDecisionRequest>,
    ) -> Result<Response<proto::AwaitDecisionResponse>, Status> {
        let principal = auth::principal(&request)?;
        let grants = auth::grants(&request);
        let refuser = auth::Refuser::of(&request);
        let deadline = client_deadline(request.metadata());
        let body = request.into_inner();
        let id = validate::action_id("action_id", &body.action_id).map_err(status::invalid)?;
        let requested = body
            .wait
            .as_ref()
            .map(|w| validate::duration("wait", w))
            .transpose()
            .map_err(status::invalid)?;
        let requester = self
            .core
            .ledger
            .actions()
            .requester_of(&id)
            .map(str::to_owned)
            .ok_or_else(|| Status::not_found(format!("no action with id {id}")))?;
        if requester != principal.id && !grants.waits_on_any_action() {
            return Err(refuser.permission_denied(format!(
                "action {id} belongs to {requester}; a caller may wait only on its own actions"
            )));
        }
        // Answer a little before the client gives up, so it gets the status rather than
        // DEADLINE_EXCEEDED, and can simply call again.
        let mut wait = requested
            .unwrap_or(self.core.max_await)
            .min(self.core.max_await);
        if let Some(deadline) = deadline {
            wait = wait.min(deadline.saturating_sub(deadline_margin(deadline)));
        }
        let record = tokio::select! {
            record = self.core.ledger.await_final(id, wait) => record,
            () = self.core.stopped() => self
                .core
                .ledger
                .action(&id)
                .await
                .and_then(|record| record.ok_or(LedgerError::NotFound(id))),
        }
        .map_err(status::ledger)?;
        Ok(Response::new(proto::AwaitDecisionResponse {
            is_final: record.status.is_final(),
            action: Some(convert::action_record(&record)),
        }))
    }

    async fn cancel_action(
        &self,
        request: Request<proto::CancelActionRequest>,
    ) -> Result<Response<proto::CancelActionResponse>, Status> {
        let principal = auth::principal(&request)?;
        let body = request.into_inner();
        let id = validate::action_id("action_id", &body.action_id).map_err(status::invalid)?;
        let reason = validate::free_text("reason", &body.reason, validate::MAX_REASON_BYTES)
            .map_err(status::invalid)?;
        let record = self
            .core
            .ledger
            .act(
                id,
                ActionCommand::Cancel {
                    by: principal,
                    reason,
                },
                Utc::now(),
            )
            .await
            .map_err(status::ledger)?;
        tracing::info!(action_id = %id, status = record.status.as_str(), "action cancelled");
        Ok(Response::new(proto::CancelActionResponse {
            action: Some(convert::action_record(&record)),
        }))
    }

    async fn report_outcome(
        &self,
        request: Request<proto::ReportOutcomeRequest>,
    ) -> Result<Response<proto::ReportOutcomeResponse>, Status> {
        let principal = auth::principal(&request)?;
        let body = request.into_inner();
        let id = validate::action_id("action_id", &body.action_id).map_err(status::invalid)?;
        let outcome = validate::outcome(body.outcome).map_err(status::invalid)?;
        let details = validate::free_text(
            "details",
            &body.details,
            validate::MAX_OUTCOME_DETAILS_BYTES,
        )
        .map_err(status::invalid)?;
        let command = ActionCommand::ReportOutcome {
            by: principal,
            outcome,
            details,
        };
        let record = self
            .core
            .ledger
            .act(id, command, Utc::now())
            .await
            .map_err(status::ledger)?;
        Ok(Response::new(proto::ReportOutcomeResponse {
            action: Some(convert::action_record(&record)),
        }))
    }
}

/// The time the client allows for this call, from its `grpc-timeout` header.
fn client_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// How long before the client's deadline to answer: enough for the reply to travel.
fn deadline_margin(deadline: Duration) -> Duration {
    (deadline / 10).clamp(Duration::from_millis(5), Duration::from_millis(250))
}

#[cfg(test)]
mod on_behalf_of_tests {
    use super::*;

    fn alice() -> auth::ActingFor {
        auth::ActingFor {
            human: "alice@example.com".into(),
            asserted: false,
        }
    }

    fn task(on_behalf_of: &str) -> TaskContext {
        TaskContext {
            on_behalf_of: on_behalf_of.into(),
            ..TaskContext::default()
        }
    }

    fn caller(id: &str, kind: PrincipalKind, authenticated_by: &str) -> Principal {
        Principal {
            id: id.into(),
            kind,
            groups: vec![],
            authenticated_by: authenticated_by.into(),
        }
    }

    fn agent() -> Principal {
        caller("deployer", PrincipalKind::Agent, "token:ci")
    }

    fn no_grants() -> auth::Grants {
        auth::Grants::default()
    }

    #[test]
    fn the_credentials_human_fills_an_empty_on_behalf_of() {
        let mut t = task("");
        let source = settle_on_behalf_of(&mut t, Some(&alice()), &agent(), &no_grants());
        assert_eq!(source, Ok(Some(OnBehalfOfSource::Credential)));
        assert_eq!(t.on_behalf_of, "alice@example.com");
    }

    #[test]
    fn the_same_human_is_kept() {
        let mut t = task("Alice@Example.com");
        let source = settle_on_behalf_of(&mut t, Some(&alice()), &agent(), &no_grants());
        assert_eq!(source, Ok(Some(OnBehalfOfSource::Credential)));
        assert_eq!(t.on_behalf_of, "Alice@Example.com");
    }

    #[test]
    fn a_request_naming_another_human_than_the_token_is_denied() {
        let refusal = settle_on_behalf_of(&mut task("bob"), Some(&alice()), &agent(), &no_grants())
            .unwrap_err();
        assert_eq!(
            refusal,
            "the token acts for alice@example.com; the request names bob in task.on_behalf_of"
        );
    }

    #[test]
    fn without_a_credential_naming_one_only_trusted_agents_may_assert_a_human() {
        let refusal =
            settle_on_behalf_of(&mut task("bob"), None, &agent(), &no_grants()).unwrap_err();
        assert!(
            refusal.contains("roles.on_behalf_of_asserters"),
            "{refusal}"
        );
        let trusted = auth::Grants {
            may_assert_on_behalf_of: true,
            ..auth::Grants::default()
        };
        let mut t = task("bob");
        let source = settle_on_behalf_of(&mut t, None, &agent(), &trusted);
        assert_eq!(source, Ok(Some(OnBehalfOfSource::Asserted)));
        assert_eq!(t.on_behalf_of, "bob");
    }

    #[test]
    fn development_identities_assert_and_humans_may_name_themselves() {
        let dev = caller("bot", PrincipalKind::Agent, auth::DEVELOPMENT_METHOD);
        let source = settle_on_behalf_of(&mut task("bob"), None, &dev, &no_grants());
        assert_eq!(source, Ok(Some(OnBehalfOfSource::Asserted)));
        let bob = caller("bob", PrincipalKind::Human, "jwt:idp");
        let source = settle_on_behalf_of(&mut task("Bob"), None, &bob, &no_grants());
        assert_eq!(source, Ok(Some(OnBehalfOfSource::Credential)));
        assert!(settle_on_behalf_of(&mut task("carol"), None, &bob, &no_grants()).is_err());
    }

    #[test]
    fn nobody_named_is_nobody_vouched_for() {
        assert_eq!(
            settle_on_behalf_of(&mut task(""), None, &agent(), &no_grants()),
            Ok(None)
        );
    }
}
