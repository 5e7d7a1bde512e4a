//! `ReviewService`: what human reviewers call.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{Core, convert, not_yet, status, validate};
use crate::auth;
use crate::domain::PrincipalKind;
use crate::proto;
use crate::proto::review_service_server::ReviewService;

pub struct ReviewApi {
    core: Arc<Core>,
}

impl ReviewApi {
    pub fn new(core: Arc<Core>) -> Self {
        ReviewApi { core }
    }
}

type PendingStream =
    Pin<Box<dyn Stream<Item = Result<proto::StreamPendingResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ReviewService for ReviewApi {
    type StreamPendingStream = PendingStream;

    async fn stream_pending(
        &self,
        _request: Request<proto::StreamPendingRequest>,
    ) -> Result<Response<Self::StreamPendingStream>, Status> {
        Err(not_yet("ReviewService.StreamPending"))
    }

    async fn submit_review(
        &self,
        _request: Request<proto::SubmitReviewRequest>,
    ) -> Result<Response<proto::SubmitReviewResponse>, Status> {
        Err(not_yet("ReviewService.SubmitReview"))
    }

    async fn get_action(
        &self,
        request: Request<proto::GetActionRequest>,
    ) -> Result<Response<proto::GetActionResponse>, Status> {
        let principal = auth::principal(&request)?;
        let id = validate::action_id("action_id", &request.get_ref().action_id)
            .map_err(status::invalid)?;
        let actions = self.core.ledger.actions();
        let record = actions
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("no action with id {id}")))?;
        // Until roles arrive (authentication issue): an agent sees only its own actions;
        // humans, who review, see all.
        if principal.kind != PrincipalKind::Human && record.requester.id != principal.id {
            return Err(Status::permission_denied(format!(
                "action {id} belongs to another requester; agents may read only their own actions"
            )));
        }
        Ok(Response::new(proto::GetActionResponse {
            action: Some(convert::action_record(record)),
        }))
    }

    async fn list_actions(
        &self,
        _request: Request<proto::ListActionsRequest>,
    ) -> Result<Response<proto::ListActionsResponse>, Status> {
        Err(not_yet("ReviewService.ListActions"))
    }
}
