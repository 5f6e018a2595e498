//! Flashgate station agent library: everything the station daemon does next to the fixtures.
//!
//! - [`bootloader`]: the AN3155 host client and the SFI opcodes (TCP, serial, in-memory links).
//! - [`probe`]: configured and USB-discovered probes (rusb, sysfs tty mapping), periodic re-scan.
//! - [`broker_client`]: gRPC to the broker(s) over mutual TLS with failover, retries, and the reporter
//!   that replays the journal.
//! - [`journal`]: the local append-only, fsynced result journal (no result lost).
//! - [`images`]: encrypted images cached by content hash, resumable downloads.
//! - [`pipeline`]: one device's install, from sync to the journalled result.
//! - [`runner`]: a batch on every probe at once.
//! - [`station`]: the control stream to the broker (register, heartbeats, progress, assignments).
//! - [`daemon`]: the station daemon: runs what the broker assigns, pauses when told.
//! - [`config`]: `agent.toml` with `FLASHGATE_*` overrides.

pub mod bootloader;
pub mod broker_client;
pub mod config;
pub mod daemon;
pub mod images;
pub mod journal;
pub mod pipeline;
pub mod probe;
pub mod runner;
pub mod station;
pub mod witness;
