//! Machine-readable refusals on the wire: a refusal is a `tonic::Status` whose details carry one
//! `google.rpc.ErrorInfo` with domain [`DOMAIN`], a stable `SCREAMING_SNAKE` reason (e.g.
//! `QUOTA_EXHAUSTED`) and metadata naming the batch and device where known. The broker builds them
//! with [`refusal`]; agents and the CLI read them back with [`Refusal::from_status`].

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every Flashgate refusal.
pub const DOMAIN: &str = "flashgate.dev";

/// A refusal read back from a gRPC status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The gRPC code (e.g. `ResourceExhausted` for `QUOTA_EXHAUSTED`).
    pub code: Code,
    /// The stable reason, e.g. `QUOTA_EXHAUSTED`.
    pub reason: String,
    /// The human-readable message.
    pub message: String,
    /// Metadata (`batch_id`, `device_id`, …).
    pub metadata: HashMap<String, String>,
}

impl Refusal {
    /// The Flashgate refusal carried by `status`, if it carries one (an `ErrorInfo` of [`DOMAIN`]).
    pub fn from_status(status: &Status) -> Option<Refusal> {
        let info = status.get_details_error_info()?;
        (info.domain == DOMAIN).then(|| Refusal {
            code: status.code(),
            reason: info.reason,
            message: status.message().to_owned(),
            metadata: info.metadata,
        })
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused ({}): {}", self.reason, self.message)
    }
}

/// A status with `code`, `message` and an `ErrorInfo { reason, domain: flashgate.dev, metadata }`.
pub fn refusal<'a>(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: impl IntoIterator<Item = (&'a str, String)>,
) -> Status {
    let metadata: HashMap<String, String> = metadata.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, DOMAIN, metadata))
}

/// A one-line description of a status for people: the refusal reason when there is one, else the code.
pub fn describe_status(status: &Status) -> String {
    if let Some(r) = Refusal::from_status(status) {
        return r.to_string();
    }
    // A TLS alert (certificate revoked, unknown CA, …) hides behind `Unknown: transport error`.
    if let Some(auth) = crate::tls_alert::auth_failure(status) {
        return auth.to_string();
    }
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_round_trips_through_a_status() {
        let s = refusal(
            Code::ResourceExhausted,
            "QUOTA_EXHAUSTED",
            "batch b1 has issued 8 of 8",
            [("batch_id", "b1".to_owned())],
        );
        let r = Refusal::from_status(&s).unwrap();
        assert_eq!(r.code, Code::ResourceExhausted);
        assert_eq!(r.reason, "QUOTA_EXHAUSTED");
        assert_eq!(r.metadata.get("batch_id").map(String::as_str), Some("b1"));
        assert_eq!(describe_status(&s), "refused (QUOTA_EXHAUSTED): batch b1 has issued 8 of 8");
        assert!(Refusal::from_status(&Status::internal("x")).is_none());
    }
}
