//! Cross-crate scenarios in one test binary (each module is one scenario, described in its header):
//! real brokers, station agents and simulated targets in-process over real mutual TLS on ephemeral
//! loopback ports. One binary instead of one per scenario: each links the whole workspace once.
//! The SoftHSM2 scenario (`e2e_softhsm_install`, which sets `SOFTHSM2_CONF` for the PKCS#11 module)
//! and the Docker scenario (`compose_faults`) keep binaries of their own.

mod admin_guards;
mod agent_broker_restart;
mod agent_link_faults;
mod agent_parallel;
mod agent_probe_watch;
mod agent_serial;
mod agent_unplug;
mod audit_offline;
mod conformance;
mod console_browser;
mod hostile;
mod licences;
mod pool_and_ledger;
mod refusals;
mod service_lifecycle;
mod sites;
mod station_faults;
mod station_stream;
