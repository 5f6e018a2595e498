//! Cross-crate scenarios live in `tests/tests/`; this library holds shared test fixtures.

/// A throwaway PostgreSQL cluster (initdb + pg_ctl in a temp dir), shared with the broker's ledger tests.
#[path = "../../broker/tests/support/pg.rs"]
pub mod pg;
