//! Cross-crate scenarios live in `tests/tests/`; this library holds shared test fixtures:
//!
//! - [`agent`]: the station agent in-process (journal, image cache, broker client, reporter,
//!   `run_batch`) against simulated targets, and checks of what the targets hold afterwards.
//! - [`broker`]: a development PKI, a test vendor CA and chips, brokers started in-process on
//!   127.0.0.1 ephemeral ports with a chosen HSM pool and ledger, mutual-TLS station and admin
//!   clients, and seeding a key, an image and a batch through `AdminService`.
//! - [`compose`]: the multi-site docker-compose deployment driven from a test, and the pass
//!   criteria of its fault scenario.
//! - [`netcut`]: a TCP link a test cuts and restores (a WAN outage between a site and central).
//! - [`hsm`]: HSM backends for fault scenarios (a member that can be "unplugged" or slowed down).
//! - [`softhsm`]: the process-wide SoftHSM2 fixture (own `SOFTHSM2_CONF`, tokens by label).
//! - [`webdriver`]: headless Chromium driven over WebDriver (Debian's `chromium` and
//!   `chromedriver`), for the web console's browser test.
//! - [`pg`]: a throwaway PostgreSQL cluster (shared with the broker's ledger tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod broker;
pub mod compose;
pub mod hsm;
pub mod netcut;
pub mod softhsm;
pub mod webdriver;

/// A throwaway PostgreSQL cluster (initdb + pg_ctl in a temp dir), shared with the broker's ledger tests.
#[path = "../../broker/tests/integration/support/pg.rs"]
pub mod pg;
