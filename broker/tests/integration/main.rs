//! The broker crate's integration tests in one binary (each module's header says what it covers): one
//! link of the crate's dependencies instead of one per file.

mod support;

mod hsm_pool;
mod hsm_soft;
mod ledger_audit_prop;
mod ledger_leases_prop;
mod ledger_postgres;
mod ledger_sqlite;
mod ledger_throughput;
mod ledger_upstream;
