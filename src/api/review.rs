//! `ReviewService`: what human reviewers call.

use std::sync::Arc;

use chrono::Utc;
use tonic::{Request, Response, Status};

use super::review_stream::{self, PendingStream};
use super::{Core, convert, status, validate};
use crate::auth;
use crate::ledger::LedgerError;
use crate::proto;
use crate::proto::review_service_server::ReviewService;
use crate::workflow::ActionCommand;
use crate::workflow::record::ListFilter;

pub struct ReviewApi {
    core: Arc<Core>,
}

impl ReviewApi {
    pub fn new(core: Arc<Core>) -> Self {
        ReviewApi { core }
    }
}

#[tonic::async_trait]
impl ReviewService for ReviewApi {
    type StreamPendingStream = PendingStream;

    async fn stream_pending(
        &self,
        request: Request<proto::StreamPendingRequest>,
    ) -> Result<Response<Self::StreamPendingStream>, Status> {
        let reviewer = auth::principal(&request)?;
        let after = request.into_inner().after_sequence;
        let stream = review_stream::open(self.core.clone(), reviewer, after)?;
        Ok(Response::new(stream))
    }

    async fn submit_review(
        &self,
        request: Request<proto::SubmitReviewRequest>,
    ) -> Result<Response<proto::SubmitReviewResponse>, Status> {
        let reviewer = auth::principal(&request)?;
        // Someone who may not review at all (an agent, a human outside `[roles]
        // reviewers`) is admitted only to be refused on the action it targeted, so the
        // attempt is in that action's history. Without the guard's word, not a reviewer.
        let refused_by_role = (!auth::grants(&request).reviewer).then(|| {
            auth::role_refusal(&request)
                .unwrap_or_else(|| format!("{} may not review actions", reviewer.id))
        });
        let refuser = auth::Refuser::of(&request);
        let body = request.into_inner();
        let parsed = (|| {
            let id = validate::action_id("action_id", &body.action_id)?;
            let verdict = validate::verdict(body.verdict)?;
            let reason = validate::reason("reason", &body.reason)?;
            Ok((id, verdict, reason))
        })();
        let (id, verdict, reason) = match (parsed, &refused_by_role) {
            (Ok(parsed), _) => parsed,
            // Nothing to record it on: refused (and recorded) as the edge would have.
            (Err(_), Some(why)) => return Err(refuser.permission_denied(why.clone())),
            (Err(violation), None) => return Err(status::invalid(violation)),
        };
        let expected_digest = (!body.action_digest.is_empty()).then_some(body.action_digest);
        let reviewer_id = reviewer.id.clone();
        let command = ActionCommand::Review {
            reviewer,
            verdict,
            reason,
            expected_digest,
            refused_by_role: refused_by_role.clone(),
        };
        let result = self.core.ledger.act(id, command, Utc::now()).await;
        match &result {
            Ok(record) => tracing::info!(
                action_id = %id,
                reviewer = %reviewer_id,
                verdict = ?verdict,
                status = record.status.as_str(),
                approvals_remaining = record.approvals_remaining(),
                "review recorded"
            ),
            Err(e) => {
                tracing::warn!(action_id = %id, reviewer = %reviewer_id, error = %e, "review refused")
            }
        }
        let record = match (result, refused_by_role) {
            (Ok(record), _) => record,
            (Err(e @ LedgerError::Refused(_)), _) | (Err(e), None) => {
                return Err(status::ledger(e));
            }
            // No such action, or it could not be recorded on it: refused (and recorded) as
            // the edge would have; whether the action exists is not the caller's business.
            (Err(_), Some(why)) => return Err(refuser.permission_denied(why)),
        };
        Ok(Response::new(proto::SubmitReviewResponse {
            action: Some(convert::action_record(&record)),
        }))
    }

    async fn get_action(
        &self,
        request: Request<proto::GetActionRequest>,
    ) -> Result<Response<proto::GetActionResponse>, Status> {
        let principal = auth::principal(&request)?;
        let grants = auth::grants(&request);
        let refuser = auth::Refuser::of(&request);
        let id = validate::action_id("action_id", &request.get_ref().action_id)
            .map_err(status::invalid)?;
        let record = self
            .core
            .ledger
            .action(&id)
            .await
            .map_err(status::ledger)?
            .ok_or_else(|| Status::not_found(format!("no action with id {id}")))?;
        if record.requester.id != principal.id && !grants.reads_all_actions() {
            return Err(refuser.permission_denied(format!(
                "action {id} belongs to another requester; only reviewers and auditors read others' actions"
            )));
        }
        Ok(Response::new(proto::GetActionResponse {
            action: Some(convert::action_record(&record)),
        }))
    }

    async fn list_actions(
        &self,
        request: Request<proto::ListActionsRequest>,
    ) -> Result<Response<proto::ListActionsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let grants = auth::grants(&request);
        let refuser = auth::Refuser::of(&request);
        let body = request.into_inner();
        let status_filter = validate::status_filter(body.status).map_err(status::invalid)?;
        let page_size = validate::page_size(body.page_size).map_err(status::invalid)?;
        let before = if body.page_token.is_empty() {
            None
        } else {
            Some(validate::action_id("page_token", &body.page_token).map_err(status::invalid)?)
        };
        let requester = if grants.reads_all_actions() {
            body.requester_id
        } else if body.requester_id.is_empty() || body.requester_id == principal.id {
            principal.id.clone()
        } else {
            return Err(refuser.permission_denied(
                "only reviewers and auditors list others' actions; leave requester_id empty for your own",
            ));
        };

        let filter = ListFilter {
            status: status_filter,
            requester_id: requester,
            action_type: body.action_type,
        };
        let (records, more) = self
            .core
            .ledger
            .list_actions(filter, before, page_size)
            .await
            .map_err(status::ledger)?;
        Ok(Response::new(proto::ListActionsResponse {
            next_page_token: match (more, records.last()) {
                (true, Some(last)) => last.id.to_string(),
                _ => String::new(),
            },
            actions: records.iter().map(convert::action_record).collect(),
        }))
    }
}
