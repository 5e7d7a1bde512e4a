//! `ActionGate`: what agents and pipelines call.

use std::sync::Arc;

use chrono::Utc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{Core, convert, not_yet, status, validate};
use crate::auth;
use crate::ledger::{CheckRecorded, LedgerError, NewCheck};
use crate::policy::EvaluationInput;
use crate::proto;
use crate::proto::action_gate_server::ActionGate;
use crate::telemetry;
use crate::workflow::{ActionRequested, action_digest, evaluate_check};

pub struct ActionGateApi {
    core: Arc<Core>,
}

impl ActionGateApi {
    pub fn new(core: Arc<Core>) -> Self {
        ActionGateApi { core }
    }
}

#[tonic::async_trait]
impl ActionGate for ActionGateApi {
    async fn check_action(
        &self,
        request: Request<proto::CheckActionRequest>,
    ) -> Result<Response<proto::CheckActionResponse>, Status> {
        let principal = auth::principal(&request)?;
        let trace_id = telemetry::trace_id(request.metadata());
        let action =
            validate::check_action_request(request.into_inner()).map_err(status::invalid)?;
        let ledger = &self.core.ledger;
        if let Some(refusal) = ledger.write_refusal() {
            return Err(status::ledger(refusal));
        }
        let digest = action_digest(&principal, &action);

        // An idempotent retry is answered from the state without evaluating again; the
        // ledger re-checks, so two racing first attempts still make one action.
        if !action.idempotency_key.is_empty() {
            let actions = ledger.actions();
            if let Some(existing) =
                actions.by_idempotency_key(&principal.id, &action.idempotency_key)
            {
                if existing.action_digest != digest {
                    return Err(status::ledger(LedgerError::IdempotencyConflict {
                        existing: existing.id,
                    }));
                }
                return Ok(Response::new(convert::check_response(existing)));
            }
        }

        let now = Utc::now();
        let decision = self.core.policies.get().evaluate(&EvaluationInput {
            principal: &principal,
            request: &action,
            now,
        });
        let evaluated = evaluate_check(decision, now, &self.core.times);
        let check = NewCheck {
            action_id: Uuid::now_v7(),
            time: now,
            requested: ActionRequested {
                requester: principal,
                request: action,
                action_digest: digest,
                trace_id,
            },
            evaluated,
        };
        let record = match ledger.record_check(check).await.map_err(status::ledger)? {
            CheckRecorded::New(record) => {
                if let Some(decision) = &record.decision {
                    tracing::info!(
                        action_id = %record.id,
                        action_type = %record.request.action.action_type,
                        requester = %record.requester.id,
                        status = ?record.status,
                        risk = %decision.risk,
                        rules = ?decision.matched_rules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
                        rule_errors = decision.errors.len(),
                        "action checked"
                    );
                }
                record
            }
            CheckRecorded::Existing(record) => record,
        };
        Ok(Response::new(convert::check_response(&record)))
    }

    async fn await_decision(
        &self,
        _request: Request<proto::AwaitDecisionRequest>,
    ) -> Result<Response<proto::AwaitDecisionResponse>, Status> {
        Err(not_yet("ActionGate.AwaitDecision"))
    }

    async fn cancel_action(
        &self,
        _request: Request<proto::CancelActionRequest>,
    ) -> Result<Response<proto::CancelActionResponse>, Status> {
        Err(not_yet("ActionGate.CancelAction"))
    }

    async fn report_outcome(
        &self,
        _request: Request<proto::ReportOutcomeRequest>,
    ) -> Result<Response<proto::ReportOutcomeResponse>, Status> {
        Err(not_yet("ActionGate.ReportOutcome"))
    }
}
