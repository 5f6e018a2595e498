//! flashgate-sim: a faithful simulator of STM32 targets for Flashgate SFI profile v1.
//!
//! Layers, bottom up: [`flash`] (flash array semantics and timings), [`device`] (one chip:
//! identity, flash, option bytes, RDP, SFI state machine; pure logic), [`link`] (UART pacing and
//! the flash write buffer on a modelled timeline), [`fault`] (seeded byte drop/corruption),
//! [`bootloader`] (the AN3155 device side over any async byte stream), [`state`] (`--state-dir`
//! persistence and vendor CA files), [`pty`] (pseudo-terminals) and [`server`] (TCP/pty serving,
//! `SimTarget` in memory).

pub mod bootloader;
pub mod device;
pub mod fault;
pub mod flash;
pub mod link;
pub mod pty;
pub mod server;
pub mod state;

pub use bootloader::{BootloaderError, SessionStats};
pub use device::{ChipIdentity, Device, DeviceError, RdpLevel, SfiReply};
pub use fault::FaultConfig;
pub use flash::{Flash, FlashError};
pub use link::LinkConfig;
pub use server::{RunningSimulator, SimConfig, SimError, SimTarget, Simulator, TargetHandle};
pub use state::{StateError, dump_flash, load_vendor_ca, write_vendor_ca};

#[cfg(test)]
#[path = "../tests/integration/support/mod.rs"]
mod test_support;
