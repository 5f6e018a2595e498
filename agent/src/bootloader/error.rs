//! Errors of the bootloader host client: bad target addresses ([`AddrError`]) and everything that
//! can go wrong talking to a device ([`BootloaderError`]). Every message names what failed and with
//! what value (command, stage, offset, timeout, status code) in plain words.

use std::io;
use std::time::Duration;

use flashgate_common::protocol::{SfiOpcode, SfiState, SfiStatus};
use flashgate_common::sfi::SfiError;

/// A target address string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The scheme is neither `tcp://` nor `serial:`.
    #[error(
        "target address {addr:?}: unknown scheme (expected tcp://HOST:PORT or \
         serial:PATH[?baud=N&parity=even|none])"
    )]
    Scheme {
        /// The whole address.
        addr: String,
    },
    /// One part of the address is wrong.
    #[error("target address {addr:?}: {part} {value:?}: {reason}")]
    Part {
        /// The whole address.
        addr: String,
        /// Which part: `host`, `port`, `path`, `baud`, `parity`, `option`.
        part: &'static str,
        /// The offending text.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Everything that can go wrong talking to an AN3155 bootloader.
#[derive(Debug, thiserror::Error)]
pub enum BootloaderError {
    /// The target address did not parse.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// Opening the transport failed.
    #[error("cannot connect to {target}: {error}")]
    Connect {
        /// The target as written.
        target: String,
        /// The operating system's error.
        #[source]
        error: io::Error,
    },
    /// Reading or writing the transport failed.
    #[error("i/o error during {stage} of {command}: {error}")]
    Io {
        /// The command being exchanged.
        command: String,
        /// What was being sent or awaited.
        stage: String,
        /// The operating system's error.
        #[source]
        error: io::Error,
    },
    /// The transport reached end of file.
    #[error("connection closed by the device while waiting for {stage} of {command}")]
    Closed {
        /// The command being exchanged.
        command: String,
        /// What was awaited.
        stage: String,
    },
    /// The device did not answer in time.
    #[error("timeout after {} ms waiting for {stage} of {command}", after.as_millis())]
    Timeout {
        /// The command being exchanged.
        command: String,
        /// What was awaited, e.g. "ACK after buffer 2".
        stage: String,
        /// How long the client waited.
        after: Duration,
    },
    /// The device refused a frame with NACK.
    #[error("device answered NACK to {stage} of {command}")]
    Nack {
        /// The command being exchanged.
        command: String,
        /// Which frame was refused, e.g. "the address".
        stage: String,
    },
    /// The device's answer does not fit the protocol (a byte was lost or corrupted).
    #[error("garbled answer to {stage} of {command}: {detail}")]
    Garbled {
        /// The command being exchanged.
        command: String,
        /// What was awaited.
        stage: String,
        /// What arrived instead.
        detail: String,
    },
    /// A command kept failing with transient errors until the retry budget ran out.
    #[error("{command}: gave up after {attempts} attempts: {last}")]
    RetriesExhausted {
        /// The command.
        command: String,
        /// How many times it was sent.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        last: Box<BootloaderError>,
    },
    /// The device executed an SFI command and answered a non-zero status.
    #[error("{} failed: {} (status 0x{:04X})", opcode.name(), status.message(), status.code())]
    Device {
        /// The SFI command.
        opcode: SfiOpcode,
        /// The device's status.
        status: SfiStatus,
    },
    /// The caller asked for something the protocol cannot carry.
    #[error("{command}: {reason}")]
    InvalidArgument {
        /// The command.
        command: String,
        /// What is wrong with the arguments.
        reason: String,
    },
    /// Two reads of the chip certificate never agreed (responses carry no checksum).
    #[error("the chip certificate read differently on each of {reads} reads; the line corrupts data")]
    CertificateUnstable {
        /// How many reads were made.
        reads: u32,
    },
    /// After INSTALL the device does not report `installed`.
    #[error(
        "after INSTALL the device reports state {state} with last status 0x{last_status:04X}, \
         not installed"
    )]
    NotInstalled {
        /// State reported by GET_STATE.
        state: SfiState,
        /// Last status reported by GET_STATE.
        last_status: u16,
    },
    /// A retried INSTALL found the device already installed: the first INSTALL took effect
    /// but its answer, the flash CRC, was lost on the line.
    #[error(
        "INSTALL took effect (the device reports installed) but its answer with the flash \
         CRC was lost on the line"
    )]
    InstallAnswerLost,
    /// The image could not be read while installing it.
    #[error("reading the image: {0}")]
    Image(#[from] SfiError),
}

impl BootloaderError {
    /// Whether resynchronising and resending the command may cure this error (NACK, timeout,
    /// garbled answer). I/O errors, closed connections and device statuses are final.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Nack { .. } | Self::Timeout { .. } | Self::Garbled { .. })
    }

    /// The SFI status if this is (or wraps) a device refusal.
    pub fn device_status(&self) -> Option<SfiStatus> {
        match self {
            Self::Device { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_plain_words() {
        let e = BootloaderError::Device { opcode: SfiOpcode::StartArea, status: SfiStatus::AreaNotAuthentic };
        assert_eq!(e.to_string(), "START_AREA failed: area not authentic (status 0x0105)");
        let e = BootloaderError::Timeout {
            command: "WRITE_CHUNK at offset 4096".into(),
            stage: "ACK after buffer 2".into(),
            after: Duration::from_millis(500),
        };
        assert_eq!(e.to_string(), "timeout after 500 ms waiting for ACK after buffer 2 of WRITE_CHUNK at offset 4096");
        assert!(e.is_transient());
        let e = BootloaderError::RetriesExhausted {
            command: "Get ID".into(),
            attempts: 4,
            last: Box::new(BootloaderError::Nack { command: "Get ID".into(), stage: "the command byte".into() }),
        };
        assert_eq!(
            e.to_string(),
            "Get ID: gave up after 4 attempts: device answered NACK to the command byte of Get ID"
        );
        assert!(!e.is_transient());
    }
}
