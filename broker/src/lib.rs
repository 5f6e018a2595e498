//! flashgate-broker: the OEM-side licence service of Flashgate (SFI profile v1). It verifies chip
//! certificates against the trusted vendor CA keys, counts each licence against a batch quota in a
//! ledger with an audit chain, and has the licence — the firmware key wrapped for one chip (§4) —
//! issued inside an HSM, over mutual-TLS gRPC to the station agents.
//!
//! Modules:
//! - [`hsm`]: the HSM trait, its software (encrypted keystore) and PKCS#11 backends, and the pool
//!   that spreads requests over several HSMs with failover, health probes and load shedding.
//! - [`ledger`]: batches, quotas, one licence per (batch, device), install reports and the hash-chained
//!   audit log, on SQLite or a PostgreSQL database shared by several brokers (group commit).
//! - [`service`]: the gRPC services (licences, images, the stations' control stream, admin), caller
//!   authorisation by SPIFFE identity, and the mapping of domain errors to gRPC statuses with
//!   machine-readable refusal reasons.
//! - [`checkpoint`]: the signer of audit checkpoints (the chain head signed with an HSM's audit key,
//!   periodically, at start and shutdown, on demand) and the newest checkpoint licence responses carry.
//! - [`config`]: `broker.toml` with `FLASHGATE_*` overrides.
//! - [`server`]: starting, serving and gracefully stopping a broker.
//! - [`upstream`]: a site broker's link to central: leases, mirrored batches, replication, claims.

pub mod checkpoint;
pub mod config;
pub mod hsm;
pub mod ledger;
pub mod server;
pub mod service;
pub mod upstream;
