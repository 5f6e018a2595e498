//! Flashgate station agent library: USB probe discovery, the AN3155 bootloader host client and the
//! SFI install pipeline that drives a target from an encrypted image and a licence. This crate
//! currently holds the host client ([`bootloader`]); later issues add probes and the pipeline.

pub mod bootloader;
