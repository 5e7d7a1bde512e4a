//! `AuditService`: the raw evidence, for auditors.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{Core, convert, not_yet};
use crate::auth;
use crate::proto;
use crate::proto::audit_service_server::AuditService;

pub struct AuditApi {
    core: Arc<Core>,
}

impl AuditApi {
    pub fn new(core: Arc<Core>) -> Self {
        AuditApi { core }
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<proto::ReadEventsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AuditService for AuditApi {
    type ReadEventsStream = EventStream;

    async fn read_events(
        &self,
        _request: Request<proto::ReadEventsRequest>,
    ) -> Result<Response<Self::ReadEventsStream>, Status> {
        Err(not_yet("AuditService.ReadEvents"))
    }

    async fn verify_log(
        &self,
        request: Request<proto::VerifyLogRequest>,
    ) -> Result<Response<proto::VerifyLogResponse>, Status> {
        let principal = auth::principal(&request)?;
        let log = self.core.ledger.log().clone();
        // Re-hashing the whole log is long and blocking; keep it off the async workers.
        let report = tokio::task::spawn_blocking(move || log.verify())
            .await
            .map_err(|e| Status::internal(format!("log verification did not finish: {e}")))?;
        tracing::info!(
            requested_by = %principal.id,
            ok = report.ok,
            events_checked = report.events_checked,
            first_bad_sequence = ?report.first_bad_sequence,
            "event log verified"
        );
        Ok(Response::new(convert::verify_report(&report)))
    }
}
