//! Process exit codes of `flashgate`, so that a script can tell a quota refusal from a device failure,
//! an unreachable broker or a local I/O error: the BSD `sysexits` values where one fits, and codes of
//! Flashgate's own from 80 where none does. [`classify`] reads an error chain (an explicit [`Coded`]
//! first, then gRPC statuses, the libraries' errors, finally operating-system errors); the table is in
//! `flashgate --help` and `docs/operator-guide.md`.

use std::fmt;

use flashgate_agent::bootloader::BootloaderError;
use flashgate_agent::broker_client::BrokerError;
use tonic::Code;

/// Why the process ends, as its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// A failure none of the others describe.
    Failure = 1,
    /// The command line is wrong (`EX_USAGE`).
    Usage = 64,
    /// Input data is malformed: an image, a firmware file, an argument's value (`EX_DATAERR`).
    Data = 65,
    /// An input file does not exist or cannot be read (`EX_NOINPUT`).
    NoInput = 66,
    /// No broker, or no target, answers (`EX_UNAVAILABLE`).
    Unavailable = 69,
    /// A bug: an internal error of Flashgate or the broker (`EX_SOFTWARE`).
    Software = 70,
    /// A local file could not be written or read (`EX_IOERR`): a full disk, the journal.
    Io = 74,
    /// Try again later: the broker is overloaded or a deadline passed (`EX_TEMPFAIL`).
    TempFail = 75,
    /// The broker refused this identity: certificate revoked, expired, unknown CA, wrong role (`EX_NOPERM`).
    NoPerm = 77,
    /// The configuration is wrong (`EX_CONFIG`).
    Config = 78,
    /// The broker refused the request for a production reason: quota exhausted, batch paused or
    /// closed, site not allowed, unknown batch (Flashgate's own).
    Refused = 80,
    /// A device failed: it refused the licence or the image, or its flash CRC did not match
    /// (Flashgate's own).
    DeviceFailed = 81,
    /// The operator stopped the work with Ctrl-C before it was done: a second Ctrl-C aborted the
    /// devices in flight (`agent run`, `demo`; each journalled as failed before INSTALL), or a
    /// demo stopped before every device was handled (128 + SIGINT, as a shell reports it).
    Interrupted = 130,
}

/// Every code with its meaning, for `--help` and the docs.
pub const TABLE: &[(Exit, &str)] = &[
    (Exit::Ok, "success"),
    (Exit::Failure, "failure not covered below"),
    (Exit::Usage, "command line error"),
    (Exit::Data, "malformed input (image, firmware, option bytes, argument value)"),
    (Exit::NoInput, "input file missing or unreadable"),
    (Exit::Unavailable, "no broker or target answers"),
    (Exit::Software, "internal error (a bug; please report it)"),
    (Exit::Io, "local file not writable or readable (full disk, journal)"),
    (Exit::TempFail, "temporary failure (broker overloaded, deadline passed): try again"),
    (Exit::NoPerm, "refused by the broker for this identity (revoked, expired, unknown CA, wrong role)"),
    (Exit::Config, "configuration error"),
    (Exit::Refused, "refused by the broker (quota exhausted, batch paused/closed, site, unknown batch)"),
    (Exit::DeviceFailed, "a device failed (licence or image refused by the chip, CRC mismatch)"),
    (Exit::Interrupted, "stopped by Ctrl-C: devices in flight aborted (second Ctrl-C), or a demo cut short"),
];

/// The help text listing every exit code.
pub fn help() -> String {
    let mut s = String::from("Exit codes:\n");
    for (e, what) in TABLE {
        s.push_str(&format!("  {:>3}  {what}\n", *e as u8));
    }
    s
}

/// An error that says which exit code it ends the process with.
#[derive(Debug)]
pub struct Coded {
    /// The exit code.
    pub exit: Exit,
    /// The error, shown with its causes.
    pub error: anyhow::Error,
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::output::error_text(&self.error))
    }
}

impl std::error::Error for Coded {}

/// `error`, ending the process with `exit`.
pub fn with(exit: Exit, error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Coded { exit, error: error.into() })
}

/// The exit code of a gRPC status from a broker.
pub fn from_status(s: &tonic::Status) -> Exit {
    if let Some(r) = flashgate_proto::errors::Refusal::from_status(s) {
        return match (r.reason.as_str(), r.code) {
            ("STATION_REVOKED" | "NOT_AUTHORISED" | "CERTIFICATE_EXPIRED", _) => Exit::NoPerm,
            // A request the broker can never accept as written (a window already over, a bad value).
            (_, Code::InvalidArgument | Code::OutOfRange) => Exit::Data,
            _ => Exit::Refused,
        };
    }
    if let Some(auth) = flashgate_proto::tls_alert::auth_failure(s) {
        // Our certificate refused: permission; the broker's certificate refused: our configuration.
        return if auth.refused_by_broker() { Exit::NoPerm } else { Exit::Config };
    }
    match s.code() {
        Code::Ok => Exit::Ok,
        Code::Unavailable => Exit::Unavailable,
        Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => Exit::TempFail,
        Code::PermissionDenied | Code::Unauthenticated => Exit::NoPerm,
        // Refusals (quota, batch state, site) travel as FAILED_PRECONDITION with a reason.
        Code::FailedPrecondition => Exit::Refused,
        Code::InvalidArgument | Code::OutOfRange | Code::AlreadyExists => Exit::Data,
        Code::NotFound => Exit::NoInput,
        Code::Internal | Code::DataLoss | Code::Unimplemented => Exit::Software,
        Code::Unknown | Code::Cancelled => Exit::Failure,
    }
}

fn from_io(e: &std::io::Error) -> Exit {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => Exit::NoInput,
        K::PermissionDenied => Exit::NoPerm,
        K::ConnectionRefused | K::ConnectionReset | K::TimedOut | K::HostUnreachable | K::NetworkUnreachable => {
            Exit::Unavailable
        }
        _ => Exit::Io,
    }
}

/// The exit code for `e`: the first cause in its chain that says.
pub fn classify(e: &anyhow::Error) -> Exit {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.exit;
        }
        if let Some(s) = cause.downcast_ref::<tonic::Status>() {
            return from_status(s);
        }
        if let Some(b) = cause.downcast_ref::<BrokerError>() {
            return match b {
                BrokerError::Refused { .. } => Exit::Refused,
                BrokerError::Unreachable { .. } => Exit::Unavailable,
                BrokerError::Unauthorised { why, .. } if why.refused_by_broker() => Exit::NoPerm,
                BrokerError::Unauthorised { .. } => Exit::Config,
                BrokerError::Status { status, .. } => from_status(status),
                BrokerError::NoEndpoints | BrokerError::Endpoint { .. } => Exit::Config,
            };
        }
        if let Some(b) = cause.downcast_ref::<BootloaderError>() {
            return match b {
                BootloaderError::Device { .. } | BootloaderError::NotInstalled { .. } => Exit::DeviceFailed,
                BootloaderError::Addr(_) => Exit::Usage,
                BootloaderError::Image(_) => Exit::Data,
                BootloaderError::Connect { .. } => Exit::Unavailable,
                _ => Exit::Unavailable,
            };
        }
        if cause.is::<flashgate_broker::config::ConfigError>() || cause.is::<flashgate_agent::config::ConfigError>() {
            return Exit::Config;
        }
        if let Some(s) = cause.downcast_ref::<flashgate_broker::server::ServerError>() {
            use flashgate_broker::server::ServerError as S;
            match s {
                S::Config(_) | S::VendorKey { .. } | S::Transport(_) => return Exit::Config,
                S::Bind { .. } => return Exit::Unavailable,
                _ => {}
            }
        }
        if cause.is::<flashgate_common::sfi::SfiError>()
            || cause.is::<flashgate_common::firmware::FirmwareError>()
            || cause.is::<flashgate_common::cert::CertError>()
            || cause.is::<flashgate_common::licence::LicenceError>()
            || cause.is::<flashgate_common::keyfile::KeyFileError>()
        {
            // Their I/O causes (a missing file) are more precise, when there is one.
            if let Some(io) = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()) {
                return from_io(io);
            }
            return Exit::Data;
        }
        if cause.is::<flashgate_agent::journal::JournalError>()
            || cause.is::<flashgate_common::atomic_file::WriteError>()
        {
            return Exit::Io;
        }
    }
    match e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()) {
        Some(io) => from_io(io),
        None => Exit::Failure,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use anyhow::Context;

    use super::*;

    #[test]
    fn codes_follow_sysexits_and_are_distinct() {
        let mut codes: Vec<u8> = TABLE.iter().map(|(e, _)| *e as u8).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), TABLE.len());
        assert_eq!(
            (Exit::Usage as u8, Exit::Data as u8, Exit::Unavailable as u8, Exit::Config as u8),
            (64, 65, 69, 78)
        );
        assert!(help().contains(" 80  refused by the broker"));
    }

    #[test]
    fn an_error_chain_is_classified_by_its_most_telling_cause() {
        let refused = tonic::Status::failed_precondition("QUOTA_EXHAUSTED");
        assert_eq!(classify(&anyhow::Error::new(refused).context("issuing")), Exit::Refused);
        assert_eq!(classify(&anyhow::Error::new(tonic::Status::unavailable("down"))), Exit::Unavailable);
        assert_eq!(classify(&anyhow::Error::new(tonic::Status::permission_denied("revoked"))), Exit::NoPerm);
        let missing = std::fs::read("/no/such/file").context("reading the image").unwrap_err();
        assert_eq!(classify(&missing), Exit::NoInput);
        let coded = with(Exit::DeviceFailed, anyhow::anyhow!("2 devices failed")).context("agent run");
        assert_eq!(classify(&coded), Exit::DeviceFailed);
        assert_eq!(coded.root_cause().to_string(), "2 devices failed");
        assert_eq!(classify(&anyhow::anyhow!("something")), Exit::Failure);
    }
}
