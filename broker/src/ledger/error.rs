//! Ledger errors and the machine-readable refusal reasons the licence service returns to stations.
//!
//! Owns [`LedgerError`] (every failure of the ledger, each message naming what failed and with what value),
//! [`RefusalReason`] (stable `SCREAMING_SNAKE` names, used as gRPC `ErrorInfo.reason` and in audit details)
//! and [`AuditFault`] (why `verify_audit` rejected a record).

use std::fmt;

/// Why a licence was refused. The names returned by [`RefusalReason::as_str`] are stable: stations, dashboards
/// and the audit log match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// Every unit of the batch quota has been issued.
    QuotaExhausted,
    /// The batch was closed by an administrator.
    BatchClosed,
    /// The batch is paused by an administrator.
    BatchPaused,
    /// The batch's validity window has ended (`now >= not_after`).
    BatchExpired,
    /// The batch's validity window has not started (`now < not_before`).
    BatchNotStarted,
    /// The requesting station's site is not in the batch's allowed sites.
    SiteNotAllowed,
    /// The chip certificate's product id differs from the batch's.
    ProductMismatch,
    /// No batch with the requested id exists.
    UnknownBatch,
    /// The chip certificate did not verify against any trusted vendor CA (checked by the service).
    CertUnverified,
    /// The station's client certificate is revoked (checked by the service).
    StationRevoked,
    /// The caller's identity may not perform the request (checked by the service).
    NotAuthorised,
    /// The caller's client certificate expired while its connection stayed open (checked per request).
    CertificateExpired,
    /// An install report names a device that holds no licence of the batch (checked by the service).
    NotLicensed,
    /// An install report comes from a site none of whose stations holds the device's licence (checked by
    /// the service).
    NotLicenceHolder,
    /// A site broker's quota leases for the batch expired: it could not renew them from central in time
    /// (a WAN cut longer than the lease's time to live), so it issues no more until central answers.
    LeaseExpired,
    /// Central holds a licence or a claim for the device from another site (asked by a connected site
    /// broker before licensing it).
    LicensedAtOtherSite,
}

impl RefusalReason {
    /// Every reason, in declaration order.
    pub const ALL: [RefusalReason; 16] = [
        Self::QuotaExhausted,
        Self::BatchClosed,
        Self::BatchPaused,
        Self::BatchExpired,
        Self::BatchNotStarted,
        Self::SiteNotAllowed,
        Self::ProductMismatch,
        Self::UnknownBatch,
        Self::CertUnverified,
        Self::StationRevoked,
        Self::NotAuthorised,
        Self::CertificateExpired,
        Self::NotLicensed,
        Self::NotLicenceHolder,
        Self::LeaseExpired,
        Self::LicensedAtOtherSite,
    ];

    /// The stable machine-readable name, e.g. `QUOTA_EXHAUSTED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QuotaExhausted => "QUOTA_EXHAUSTED",
            Self::BatchClosed => "BATCH_CLOSED",
            Self::BatchPaused => "BATCH_PAUSED",
            Self::BatchExpired => "BATCH_EXPIRED",
            Self::BatchNotStarted => "BATCH_NOT_STARTED",
            Self::SiteNotAllowed => "SITE_NOT_ALLOWED",
            Self::ProductMismatch => "PRODUCT_MISMATCH",
            Self::UnknownBatch => "UNKNOWN_BATCH",
            Self::CertUnverified => "CERT_UNVERIFIED",
            Self::StationRevoked => "STATION_REVOKED",
            Self::NotAuthorised => "NOT_AUTHORISED",
            Self::CertificateExpired => "CERTIFICATE_EXPIRED",
            Self::NotLicensed => "NOT_LICENSED",
            Self::NotLicenceHolder => "NOT_LICENCE_HOLDER",
            Self::LeaseExpired => "LEASE_EXPIRED",
            Self::LicensedAtOtherSite => "LICENSED_AT_OTHER_SITE",
        }
    }

    /// Parses a stable name produced by [`RefusalReason::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the audit chain failed verification at a given record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditFault {
    /// The record's stored hash does not match the hash recomputed from its fields: the record was edited.
    Edited,
    /// The sequence jumps: records between `expected` and `found` are missing (deleted).
    Gap {
        /// The sequence number the chain expected next.
        expected: i64,
        /// The sequence number actually found.
        found: i64,
    },
    /// The record's `prev_hash` is not the hash of the record before it: records were reordered, or a
    /// predecessor was replaced.
    PrevHashMismatch,
    /// The first record does not start from the genesis hash of the ledger's id: the chain was started
    /// from another hash (rebuilt elsewhere, or its first records deleted and the rest re-chained).
    Genesis,
    /// A stored signed checkpoint contradicts the chain (records rewritten, or deleted with the head moved
    /// back, after it was signed), or does not parse.
    Checkpoint(String),
    /// The ledger's identity row (`ledger_meta`) is missing or differs from the one read when the ledger
    /// was opened.
    Identity(String),
    /// The chain ends before the head (trailing records deleted) or the head's hash differs from the last record.
    HeadMismatch {
        /// The head's sequence number.
        head_seq: i64,
        /// The last sequence number present in the chain.
        chain_seq: i64,
    },
    /// The chain is intact but does not agree with the ledger's tables: a licence without its
    /// `licence.issued` record (records deleted and the chain rebuilt), an issue record without its
    /// licence, or a batch whose issued count differs from its issue records.
    Unreconciled(String),
}

impl fmt::Display for AuditFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Edited => f.write_str("stored hash differs from the recomputed hash (record edited)"),
            Self::Gap { expected, found } => {
                write!(f, "expected seq {expected}, found seq {found} (record(s) missing: deleted)")
            }
            Self::PrevHashMismatch => {
                f.write_str("prev_hash is not the hash of the preceding record (records reordered or replaced)")
            }
            Self::Genesis => f.write_str(
                "the first record does not start from the genesis hash of the ledger id (chain started from \
                 another hash)",
            ),
            Self::Identity(what) => write!(f, "ledger identity: {what}"),
            Self::Checkpoint(what) => write!(f, "{what}"),
            Self::Unreconciled(what) => write!(f, "the chain does not match the ledger: {what}"),
            Self::HeadMismatch { head_seq, chain_seq } => write!(
                f,
                "audit head is at seq {head_seq} but the chain ends at seq {chain_seq} with a different hash \
                 (trailing records deleted or head edited)"
            ),
        }
    }
}

/// Every failure of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The request is refused for a business reason; nothing was consumed. The refusal has been audited.
    #[error("licence refused: {reason}: {detail}")]
    Refused {
        /// Machine-readable reason.
        reason: RefusalReason,
        /// Human-readable detail naming the values involved.
        detail: String,
    },
    /// A site broker's mirrored batch has no unit it may use now (its leases are used up or expired) but
    /// central may still grant some: the device waits. Nothing was consumed or recorded.
    #[error("licence deferred: {detail}")]
    LeaseWait {
        /// In words: what the site is waiting for.
        detail: String,
    },
    /// A database operation failed; the transaction (and every licence in its group) was rolled back.
    #[error("ledger database error during {op}: {source}")]
    Database {
        /// What the ledger was doing, e.g. "commit issue group".
        op: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The database could not be opened or connected to.
    #[error("cannot open the {what} {location}: {source}")]
    Open {
        /// Which kind of ledger, e.g. "SQLite ledger".
        what: &'static str,
        /// The file (SQLite) or the URL without its password (PostgreSQL).
        location: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the schema migrations failed.
    #[error("ledger migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The audit chain failed verification at `seq`.
    #[error("audit chain broken at seq {seq}: {why}")]
    AuditBroken {
        /// The first sequence number at which verification failed.
        seq: i64,
        /// What is wrong with it.
        why: AuditFault,
    },
    /// A referenced object does not exist.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// Kind of object, e.g. "batch".
        what: &'static str,
        /// Its id as given.
        id: String,
    },
    /// An object with this id already exists with different content.
    #[error("{what} {id:?} already exists")]
    AlreadyExists {
        /// Kind of object, e.g. "batch".
        what: &'static str,
        /// Its id as given.
        id: String,
    },
    /// The request conflicts with what the ledger holds (e.g. assigning a station a batch its site may not use).
    #[error("{what} {id:?}: {why}")]
    Precondition {
        /// Kind of object, e.g. "batch".
        what: &'static str,
        /// Its id as given.
        id: String,
        /// Why the request cannot be carried out, naming the values involved.
        why: String,
    },
    /// A site broker's replicated record does not continue what this ledger holds of its ledger: a gap, a
    /// `prev_hash` or hash that does not chain, or a payload that does not match its record. Nothing of the
    /// request was stored.
    #[error("site ledger {site_ledger_id} record seq {seq} refused: {why}")]
    SiteChain {
        /// The site ledger (32 hex digits).
        site_ledger_id: String,
        /// The first refused seq.
        seq: i64,
        /// What is wrong with it, naming the values involved.
        why: String,
    },
    /// An input value is invalid.
    #[error("invalid {field} {value:?}: {why}")]
    Invalid {
        /// The field name.
        field: &'static str,
        /// The offending value, rendered.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Stored data fails an integrity check (e.g. an image whose bytes do not hash to its id).
    #[error("{what} {id:?} is corrupt: {why}")]
    Corrupt {
        /// Kind of object.
        what: &'static str,
        /// Its id.
        id: String,
        /// What failed.
        why: String,
    },
    /// Writing an export failed.
    #[error("writing {what} failed: {source}")]
    Io {
        /// What was being written.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A ledger file could not be created or its mode set.
    #[error("cannot {what} {path}: {source}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An internal invariant was violated (a bug); nothing was committed for this request.
    #[error("internal ledger error: {what}")]
    Internal {
        /// What went wrong.
        what: &'static str,
    },
    /// The ledger's writer task has stopped (the ledger is shutting down); nothing was committed for this request.
    #[error("ledger writer is not running; request not committed")]
    WriterStopped,
}

impl LedgerError {
    /// Wraps a driver error with the operation that failed.
    pub fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> LedgerError {
        move |source| LedgerError::Database { op, source }
    }

    /// The refusal reason, when this error is a refusal.
    pub fn refusal(&self) -> Option<RefusalReason> {
        match self {
            Self::Refused { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in RefusalReason::ALL {
            assert!(seen.insert(r.as_str()));
            assert_eq!(RefusalReason::from_name(r.as_str()), Some(r));
        }
        assert_eq!(RefusalReason::QuotaExhausted.to_string(), "QUOTA_EXHAUSTED");
    }
}
