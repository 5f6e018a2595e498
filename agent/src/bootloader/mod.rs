//! AN3155 bootloader host client (SFI profile v1 §5): transports ([`transport`]: TCP byte stream,
//! serial port, in-memory), the framed command client with frame-level retry ([`client`]), the
//! Flashgate SFI helpers and the install pipeline over them ([`sfi`]), and their errors
//! ([`error`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), flashgate_agent::bootloader::BootloaderError> {
//! use flashgate_agent::bootloader::{connect, Bootloader, ClientConfig, TargetAddr};
//! let target: TargetAddr = "tcp://127.0.0.1:7000".parse()?;
//! let mut bl = Bootloader::new(connect(&target).await?, ClientConfig::default());
//! bl.sync().await?;
//! let pid = bl.get_id().await?;
//! # let _ = pid; Ok(()) }
//! ```

pub mod client;
pub mod error;
pub mod sfi;
pub mod transport;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

pub use client::{Bootloader, ClientConfig, Erase, LinkStats, SpecialResponse, VersionInfo};
pub use error::{AddrError, BootloaderError};
pub use sfi::{
    AreaSource, CERTIFICATE_LEN, InstallProgress, InstallReport, InstallStage, LICENCE_LEN, MemoryImage, NoProgress,
    Progress,
};
pub use transport::{SerialParity, TargetAddr, Transport, connect};
