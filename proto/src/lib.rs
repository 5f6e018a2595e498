//! Flashgate gRPC API, package `flashgate.v1`, generated at build time from `proto/flashgate/v1/`,
//! and the mutual-TLS transport every Flashgate client and server uses (`transport`).
//! See `docs/protocol.md` for the meaning of every RPC.

/// Package `flashgate.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("flashgate.v1");
}

pub mod admission;
pub mod deadline;
pub mod errors;
pub mod tls_alert;
pub mod transport;

/// Encoded `FileDescriptorSet` of every Flashgate proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/flashgate_descriptor.bin"));
