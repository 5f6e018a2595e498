//! Domain errors to gRPC statuses: the one place where [`LedgerError`] and [`HsmError`] become
//! `tonic::Status`. Refusals carry a `google.rpc.ErrorInfo` (domain `flashgate.dev`, the stable
//! reason, batch and device metadata) so agents can show and act on them.

use flashgate_proto::errors::refusal;
use tonic::{Code, Status};

use crate::hsm::HsmError;
use crate::ledger::{LedgerError, RefusalReason};

/// The gRPC code of each refusal reason.
pub fn refusal_code(reason: RefusalReason) -> Code {
    match reason {
        RefusalReason::QuotaExhausted => Code::ResourceExhausted,
        RefusalReason::BatchClosed
        | RefusalReason::BatchPaused
        | RefusalReason::BatchExpired
        | RefusalReason::BatchNotStarted
        | RefusalReason::ProductMismatch
        | RefusalReason::NotLicensed
        | RefusalReason::LeaseExpired
        | RefusalReason::LicensedAtOtherSite => Code::FailedPrecondition,
        RefusalReason::SiteNotAllowed
        | RefusalReason::StationRevoked
        | RefusalReason::NotAuthorised
        | RefusalReason::CertificateExpired
        | RefusalReason::NotLicenceHolder => Code::PermissionDenied,
        RefusalReason::UnknownBatch => Code::NotFound,
        RefusalReason::CertUnverified => Code::InvalidArgument,
    }
}

/// A refusal status for `reason` with `detail`, naming the batch and device when given.
pub fn refused(reason: RefusalReason, detail: impl Into<String>, batch_id: &str, device_id: &str) -> Status {
    let mut meta = Vec::with_capacity(2);
    if !batch_id.is_empty() {
        meta.push(("batch_id", batch_id.to_owned()));
    }
    if !device_id.is_empty() {
        meta.push(("device_id", device_id.to_owned()));
    }
    refusal(refusal_code(reason), reason.as_str(), detail, meta)
}

/// A ledger error as a status; refusals keep their reason, with the batch and device as metadata.
pub fn ledger_status(e: LedgerError, batch_id: &str, device_id: &str) -> Status {
    match e {
        LedgerError::Refused { reason, detail } => refused(reason, detail, batch_id, device_id),
        // The station keeps the device on its fixture and asks again (or asks its next broker).
        LedgerError::LeaseWait { detail } => {
            Status::unavailable(format!("{detail}; the device waits (nothing was recorded)"))
        }
        LedgerError::NotFound { .. } => Status::not_found(e.to_string()),
        LedgerError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        LedgerError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        LedgerError::Precondition { .. } | LedgerError::SiteChain { .. } => Status::failed_precondition(e.to_string()),
        LedgerError::AuditBroken { .. } => Status::data_loss(e.to_string()),
        LedgerError::Database { .. } | LedgerError::WriterStopped => {
            // The database's own words stay in the broker's log; the caller learns only that it may retry.
            tracing::error!(error = %e, "ledger unavailable");
            Status::unavailable("ledger unavailable (retry is safe; the broker's log has the cause)")
        }
        other => {
            tracing::error!(error = %other, "ledger failure");
            Status::internal(other.to_string())
        }
    }
}

/// An HSM error as a status: overload and outages are retryable (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`),
/// an unusable chip key is the caller's (`INVALID_ARGUMENT`), a missing key is a configuration problem.
pub fn hsm_status(e: HsmError) -> Status {
    match &e {
        HsmError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
        HsmError::Timeout { .. } => Status::unavailable(e.to_string()),
        HsmError::NoHealthyMember { .. } | HsmError::AllMembersFailed { .. } => {
            tracing::error!(error = %e, "HSM pool unavailable");
            Status::unavailable(e.to_string())
        }
        HsmError::Licence { .. } | HsmError::Image(_) | HsmError::InvalidLabel { .. } => {
            Status::invalid_argument(e.to_string())
        }
        HsmError::UnknownKey { .. } => Status::failed_precondition(e.to_string()),
        HsmError::DuplicateKey { .. } => Status::already_exists(e.to_string()),
        HsmError::Unsupported(_) => Status::failed_precondition(e.to_string()),
        _ => {
            tracing::error!(error = %e, "HSM failure");
            Status::internal(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use flashgate_proto::errors::Refusal;

    use super::*;

    #[test]
    fn every_reason_has_a_distinct_name_and_round_trips() {
        let mut names = std::collections::HashSet::new();
        for r in RefusalReason::ALL {
            let s = refused(r, "why", "b1", "d1");
            let back = Refusal::from_status(&s).unwrap();
            assert_eq!(back.reason, r.as_str());
            assert_eq!(back.code, refusal_code(r));
            assert_eq!(back.metadata.get("batch_id").map(String::as_str), Some("b1"));
            assert!(names.insert(back.reason));
        }
    }

    #[test]
    fn quota_is_resource_exhausted() {
        let s = ledger_status(
            LedgerError::Refused { reason: RefusalReason::QuotaExhausted, detail: "8 of 8".into() },
            "b",
            "",
        );
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(!Refusal::from_status(&s).unwrap().metadata.contains_key("device_id"));
    }
}
