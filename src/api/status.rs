//! Internal errors to gRPC statuses: the one place that decides what a caller is told.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::validate::FieldViolation;
use crate::ledger::LedgerError;
use crate::workflow::Refusal;

/// INVALID_ARGUMENT naming the field, with a machine-readable `google.rpc.BadRequest`.
pub fn invalid(violation: FieldViolation) -> Status {
    let details = ErrorDetails::with_bad_request_violation(&violation.field, &violation.problem);
    Status::with_error_details(Code::InvalidArgument, violation.to_string(), details)
}

pub fn ledger(error: LedgerError) -> Status {
    match &error {
        LedgerError::IdempotencyConflict { .. } => Status::already_exists(error.to_string()),
        LedgerError::Unrecordable(_) => Status::invalid_argument(error.to_string()),
        LedgerError::IntegrityFailure(_) => Status::failed_precondition(error.to_string()),
        LedgerError::NotFound(_) => Status::not_found(error.to_string()),
        LedgerError::Refused(Refusal::PermissionDenied(why)) => Status::permission_denied(why),
        LedgerError::Refused(Refusal::FailedPrecondition(why)) => Status::failed_precondition(why),
        LedgerError::WriteFailed(_)
        | LedgerError::ReadFailed(_)
        | LedgerError::Verifying
        | LedgerError::Poisoned(_)
        | LedgerError::Stopped
        | LedgerError::Open(_) => Status::unavailable(error.to_string()),
    }
}
