//! The broker's configuration: a TOML file (`deploy/config/broker.toml` is the commented example)
//! overlaid with `FLASHGATE_*` environment variables, read through the `config` crate. Nested keys
//! use a double underscore: `FLASHGATE_LEDGER__URL`, `FLASHGATE_LISTEN__GRPC`,
//! `FLASHGATE_VENDOR__CA_KEYS` (comma-separated). Secrets never live in the file: the soft keystore
//! passphrase comes from `FLASHGATE_KEYSTORE_PASSPHRASE` (or a `passphrase_file`), PKCS#11 PINs from
//! the variable or file each member names; they are held in zeroizing strings and never logged.
//!
//! [`BrokerConfig::load_from`] takes the environment as an argument: the testable seam.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flashgate_common::settings::{self, duration};
use serde::Deserialize;
use zeroize::Zeroizing;

/// The variable holding the soft keystore passphrase.
pub const PASSPHRASE_ENV: &str = "FLASHGATE_KEYSTORE_PASSPHRASE";

/// The systemd credential (`LoadCredential=keystore-passphrase:FILE`) a soft keystore without
/// `passphrase_file` reads its passphrase from, when the unit loads it.
pub const PASSPHRASE_CREDENTIAL: &str = "keystore-passphrase";

/// Configuration errors, each naming the file, key or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override could not be read or does not match the schema.
    #[error(transparent)]
    Load(#[from] settings::LoadError),
    /// A value is present but unusable.
    #[error("configuration key {key} = {value:?}: {why}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// The value.
        value: String,
        /// Why it is refused.
        why: String,
    },
    /// A secret is missing.
    #[error("secret {what} is not set: {how}")]
    MissingSecret {
        /// Which secret.
        what: String,
        /// How to provide it.
        how: String,
    },
    /// A secret file could not be read.
    #[error("cannot read secret file {path}: {source}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// This broker's name (logs, HSM status, metrics).
    pub name: String,
    /// SPIFFE trust domain of every caller (e.g. `factory.test`).
    pub trust_domain: String,
    /// Listening addresses.
    pub listen: ListenConfig,
    /// The broker's certificate, key and the CA that signs callers.
    pub tls: TlsConfig,
    /// Trusted vendor CA keys for chip certificates.
    pub vendor: VendorConfig,
    /// The ledger database.
    pub ledger: LedgerSection,
    /// The HSM pool.
    pub hsm: HsmSection,
    /// Operational limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Signed audit checkpoints.
    #[serde(default)]
    pub audit: AuditSection,
    /// Site brokers this (central) broker grants quota leases to: broker name (the NAME of its
    /// `spiffe://TD/broker/NAME` certificate) → the one site it serves. At most [`MAX_SITE_BROKERS`].
    #[serde(default)]
    pub site_brokers: std::collections::BTreeMap<String, String>,
    /// Present on a site broker: the central brokers it takes quota leases from and replicates to.
    #[serde(default)]
    pub upstream: Option<UpstreamSection>,
}

/// Most entries of [`BrokerConfig::site_brokers`].
pub const MAX_SITE_BROKERS: usize = 256;

/// Most entries of [`UpstreamSection::endpoints`].
pub const MAX_UPSTREAM_ENDPOINTS: usize = 8;
/// Most entries of [`UpstreamSection::batches`] (the `SyncSite` limit).
pub const MAX_UPSTREAM_BATCHES: usize = 64;
// `lease_units` and `lease_ttl` are bounded by central's `AcquireLease` limits.
use crate::ledger::leases::{MAX_LEASE_TTL, MAX_LEASE_UNITS, MIN_LEASE_TTL};
/// Shortest and longest [`UpstreamSection::refresh_interval`].
pub const MIN_UPSTREAM_REFRESH: Duration = Duration::from_millis(100);
/// See [`MIN_UPSTREAM_REFRESH`].
pub const MAX_UPSTREAM_REFRESH: Duration = Duration::from_secs(300);

/// `[upstream]`: makes this broker a **site broker** (docs/architecture.md, site brokers). It serves the
/// stations of `site` from its own HSM and ledger, issuing against quota leases of `batches` that it
/// takes from the first central broker of `endpoints` that answers (over mutual TLS with this broker's
/// own certificate, `spiffe://TD/broker/NAME`, which central's `[site_brokers]` must map to `site`).
/// Every `refresh_interval` it syncs the batches' state and the revocations from central, tops its
/// leases up to `lease_units` when the units left fall to `low_water`, renews a lease when less than
/// half its `lease_ttl` is left, and replicates its ledger upstream. Cut off from central, it issues
/// until its leases are used up or expire, then refuses new devices with `LEASE_EXPIRED`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// The site this broker serves (its stations' site).
    pub site: String,
    /// `https://host:port` of the central brokers, tried in order (1 ..= 8).
    pub endpoints: Vec<String>,
    /// TLS server name to verify instead of each endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The batches this site mirrors and takes leases of (1 ..= 64 ids).
    pub batches: Vec<String>,
    /// Units the site tops its leases up to: the high-water mark (1 ..= 1,000,000).
    #[serde(default = "default_lease_units")]
    pub lease_units: i64,
    /// Ask for more when the units left at the site fall to this (0 ..< lease_units).
    #[serde(default = "default_low_water")]
    pub low_water: i64,
    /// How long a lease lets the site issue without reaching central (1 s ..= 7 days): the offline bound.
    #[serde(default = "default_lease_ttl", deserialize_with = "duration")]
    pub lease_ttl: Duration,
    /// How often the site syncs with central (100 ms ..= 5 min).
    #[serde(default = "default_upstream_refresh", deserialize_with = "duration")]
    pub refresh_interval: Duration,
}

fn default_lease_units() -> i64 {
    100
}
fn default_low_water() -> i64 {
    20
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_upstream_refresh() -> Duration {
    Duration::from_secs(5)
}

/// Default of [`AuditSection::checkpoint_every_records`].
pub const DEFAULT_CHECKPOINT_EVERY_RECORDS: u64 = 1000;
/// Largest [`AuditSection::checkpoint_every_records`].
pub const MAX_CHECKPOINT_EVERY_RECORDS: u64 = 1_000_000;
/// Default of [`AuditSection::checkpoint_interval`].
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest [`AuditSection::checkpoint_interval`].
pub const MIN_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Longest [`AuditSection::checkpoint_interval`].
pub const MAX_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(3600);
/// Most entries of [`AuditSection::checkpoint_sinks`].
pub const MAX_CHECKPOINT_SINKS: usize = 8;

/// `[audit]`: when the broker signs the head of the audit chain (docs/protocol.md §3). It signs every
/// `checkpoint_every_records` records its writer appends, every `checkpoint_interval` when the head
/// moved (also by other brokers on the ledger), at start, at shutdown and on demand.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Sign after this many new records (1..=1,000,000).
    #[serde(default = "default_checkpoint_every_records")]
    pub checkpoint_every_records: u64,
    /// Sign at least this often while the head moves (1 s ..= 1 h).
    #[serde(default = "default_checkpoint_interval", deserialize_with = "duration")]
    pub checkpoint_interval: Duration,
    /// External append-only sinks every checkpoint is also written to: `file:PATH` (one hex checkpoint
    /// per line, the witness file format of `flashgate audit verify --witness`), `syslog:udp://HOST:PORT`,
    /// `syslog:unix:PATH`, `command:PROGRAM [ARG…]` (see [`crate::checkpoint::Sink`]). At most 8.
    #[serde(default)]
    pub checkpoint_sinks: Vec<String>,
}

fn default_checkpoint_every_records() -> u64 {
    DEFAULT_CHECKPOINT_EVERY_RECORDS
}
fn default_checkpoint_interval() -> Duration {
    DEFAULT_CHECKPOINT_INTERVAL
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            checkpoint_every_records: DEFAULT_CHECKPOINT_EVERY_RECORDS,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            checkpoint_sinks: Vec::new(),
        }
    }
}

impl AuditSection {
    /// The sinks named by `checkpoint_sinks` (relative file paths against `base`), or which entry is wrong.
    pub fn sinks(&self, base: &Path) -> Result<Vec<crate::checkpoint::Sink>, ConfigError> {
        self.checkpoint_sinks
            .iter()
            .enumerate()
            .map(|(i, s)| {
                crate::checkpoint::Sink::parse(s, base).map_err(|why| ConfigError::Invalid {
                    key: format!("audit.checkpoint_sinks[{i}]"),
                    value: s.clone(),
                    why,
                })
            })
            .collect()
    }
}

impl UpstreamSection {
    /// Checks the section against the limits above.
    pub fn validate(&self, trust_domain: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, why: String| Err(ConfigError::Invalid { key: key.into(), value, why });
        if let Err(e) = flashgate_common::pki::Identity::station(trust_domain, &self.site, 1) {
            return invalid("upstream.site", self.site.clone(), format!("not a site name: {e}"));
        }
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_UPSTREAM_ENDPOINTS {
            return invalid(
                "upstream.endpoints",
                self.endpoints.len().to_string(),
                format!("expected 1 to {MAX_UPSTREAM_ENDPOINTS} central broker endpoints"),
            );
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Err(err) = flashgate_proto::transport::BrokerUrl::parse(e) {
                return invalid(&format!("upstream.endpoints[{i}]"), e.clone(), err.to_string());
            }
        }
        if self.batches.is_empty() || self.batches.len() > MAX_UPSTREAM_BATCHES {
            return invalid(
                "upstream.batches",
                self.batches.len().to_string(),
                format!("expected 1 to {MAX_UPSTREAM_BATCHES} batch ids"),
            );
        }
        for (i, b) in self.batches.iter().enumerate() {
            if crate::service::validate::batch_id("batch", b).is_err() {
                return invalid(&format!("upstream.batches[{i}]"), b.clone(), "not a batch id".into());
            }
        }
        if !(1..=MAX_LEASE_UNITS).contains(&self.lease_units) {
            return invalid(
                "upstream.lease_units",
                self.lease_units.to_string(),
                format!("expected 1 to {MAX_LEASE_UNITS}"),
            );
        }
        if !(0..self.lease_units).contains(&self.low_water) {
            return invalid(
                "upstream.low_water",
                self.low_water.to_string(),
                format!("expected 0 to lease_units - 1 ({})", self.lease_units - 1),
            );
        }
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&self.lease_ttl) {
            return invalid(
                "upstream.lease_ttl",
                humantime::format_duration(self.lease_ttl).to_string(),
                "expected 1s to 7days".into(),
            );
        }
        if !(MIN_UPSTREAM_REFRESH..=MAX_UPSTREAM_REFRESH).contains(&self.refresh_interval) {
            return invalid(
                "upstream.refresh_interval",
                humantime::format_duration(self.refresh_interval).to_string(),
                "expected 100ms to 5min".into(),
            );
        }
        if self.refresh_interval * 2 > self.lease_ttl {
            return invalid(
                "upstream.refresh_interval",
                humantime::format_duration(self.refresh_interval).to_string(),
                "must be at most half of upstream.lease_ttl, or a lease could expire between two renewals".into(),
            );
        }
        Ok(())
    }
}

/// `[listen]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// gRPC over mutual TLS, e.g. `0.0.0.0:7443` (port 0: ephemeral).
    pub grpc: SocketAddr,
    /// Prometheus `/metrics` over plain HTTP; absent or empty: disabled.
    #[serde(default)]
    pub metrics: Option<String>,
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The broker's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The CA certificate(s) that sign stations, admins and brokers (PEM).
    pub ca: PathBuf,
}

/// `[vendor]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VendorConfig {
    /// PEM `PUBLIC KEY` files of the trusted vendor CAs (at least one).
    pub ca_keys: Vec<PathBuf>,
}

/// `[ledger]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSection {
    /// `sqlite:///path/ledger.db` or `postgres://user@host:port/db` (a password is better in `PGPASSWORD`).
    pub url: String,
    /// Most operations committed in one group transaction.
    #[serde(default = "default_max_group")]
    pub max_group: usize,
    /// Writer queue depth.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// PostgreSQL pool size.
    #[serde(default = "default_pg_connections")]
    pub pg_connections: u32,
}

fn default_max_group() -> usize {
    256
}
fn default_queue_depth() -> usize {
    4096
}
fn default_pg_connections() -> u32 {
    8
}

/// `[hsm]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// Deadline of one HSM request, failovers included.
    #[serde(default = "default_hsm_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Requests admitted (running or waiting for a slot) before shedding (0: 64 × the members' capacities).
    #[serde(default)]
    pub max_in_flight: usize,
    /// The pool members (at least one).
    pub members: Vec<HsmMemberConfig>,
}

fn default_hsm_timeout() -> Duration {
    Duration::from_secs(5)
}

/// One `[[hsm.members]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HsmMemberConfig {
    /// The built-in encrypted keystore file.
    Soft {
        /// The keystore file (created on first start, mode 0600).
        path: PathBuf,
        /// A file holding the passphrase instead of `FLASHGATE_KEYSTORE_PASSPHRASE`.
        #[serde(default)]
        passphrase_file: Option<PathBuf>,
    },
    /// A PKCS#11 token.
    Pkcs11 {
        /// The module (shared library).
        module: PathBuf,
        /// The token's label.
        token_label: String,
        /// Environment variable holding the user PIN.
        #[serde(default)]
        pin_env: Option<String>,
        /// File holding the user PIN.
        #[serde(default)]
        pin_file: Option<PathBuf>,
        /// Parallel sessions on this token.
        #[serde(default = "default_sessions")]
        sessions: usize,
    },
}

fn default_sessions() -> usize {
    4
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// How long in-flight requests may take to finish after a shutdown signal.
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// How often revocations made by other brokers on the same ledger are picked up.
    #[serde(default = "default_refresh", deserialize_with = "duration")]
    pub revocation_refresh: Duration,
    /// Largest gRPC message `AdminService` accepts (images are uploaded in one message), in MiB. The
    /// station services accept at most 16 KiB per message whatever this says.
    #[serde(default = "default_max_message_mib")]
    pub max_message_mib: usize,
    /// A new connection that has not sent its first TLS bytes within this is dropped.
    #[serde(default = "default_first_byte_timeout", deserialize_with = "duration")]
    pub first_byte_timeout: Duration,
    /// A TLS handshake not completed within this (after its first bytes) is dropped.
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// Most TLS handshakes in progress at once; beyond it the oldest is shed.
    #[serde(default = "default_max_pending_handshakes")]
    pub max_pending_handshakes: usize,
    /// Most TLS handshakes in progress from one source address; beyond it that address's oldest is shed.
    #[serde(default = "default_max_pending_per_source")]
    pub max_pending_per_source: usize,
    /// Most open connections of one certificate identity (station or admin).
    #[serde(default = "default_max_connections_per_identity")]
    pub max_connections_per_identity: usize,
    /// New TLS handshakes one source address (IPv4 address or IPv6 /64) may start per second once its
    /// burst is spent; its further connections wait unread (0: no rate).
    #[serde(default = "default_handshake_rate_per_source")]
    pub handshake_rate_per_source: u32,
    /// Handshakes one source address may start at once before the rate applies.
    #[serde(default = "default_handshake_burst_per_source")]
    pub handshake_burst_per_source: u32,
    /// Most connections waiting for their source's rate, in all (at most the open-file limit less
    /// 4,096); beyond it an over-rate source's new connection is closed at once.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// Most concurrent HTTP/2 streams (calls) on one connection.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
}

fn default_first_byte_timeout() -> Duration {
    flashgate_proto::admission::DEFAULT_FIRST_BYTE_TIMEOUT
}
fn default_handshake_timeout() -> Duration {
    flashgate_proto::admission::DEFAULT_HANDSHAKE_TIMEOUT
}
fn default_max_pending_handshakes() -> usize {
    flashgate_proto::admission::DEFAULT_MAX_PENDING_HANDSHAKES
}
fn default_max_pending_per_source() -> usize {
    flashgate_proto::admission::DEFAULT_MAX_PENDING_PER_SOURCE
}
fn default_max_connections_per_identity() -> usize {
    flashgate_proto::admission::DEFAULT_MAX_CONNECTIONS_PER_IDENTITY
}
fn default_handshake_rate_per_source() -> u32 {
    flashgate_proto::admission::DEFAULT_HANDSHAKE_RATE_PER_SOURCE
}
fn default_handshake_burst_per_source() -> u32 {
    flashgate_proto::admission::DEFAULT_HANDSHAKE_BURST_PER_SOURCE
}
fn default_max_waiting() -> usize {
    flashgate_proto::admission::DEFAULT_MAX_WAITING
}
/// Default of [`LimitsConfig::max_streams_per_connection`].
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 64;
fn default_max_streams_per_connection() -> u32 {
    DEFAULT_MAX_STREAMS_PER_CONNECTION
}

impl LimitsConfig {
    /// The accept loop's limits.
    pub fn admission(&self) -> flashgate_proto::admission::AdmissionLimits {
        flashgate_proto::admission::AdmissionLimits {
            first_byte_timeout: self.first_byte_timeout,
            handshake_timeout: self.handshake_timeout,
            max_pending_handshakes: self.max_pending_handshakes,
            max_pending_per_source: self.max_pending_per_source,
            max_connections_per_identity: self.max_connections_per_identity,
            handshake_rate_per_source: self.handshake_rate_per_source,
            handshake_burst_per_source: self.handshake_burst_per_source,
            max_waiting: self.max_waiting,
        }
    }
}

fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_refresh() -> Duration {
    Duration::from_secs(5)
}
fn default_max_message_mib() -> usize {
    64
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: default_grace(),
            revocation_refresh: default_refresh(),
            max_message_mib: default_max_message_mib(),
            first_byte_timeout: default_first_byte_timeout(),
            handshake_timeout: default_handshake_timeout(),
            max_pending_handshakes: default_max_pending_handshakes(),
            max_pending_per_source: default_max_pending_per_source(),
            max_connections_per_identity: default_max_connections_per_identity(),
            handshake_rate_per_source: default_handshake_rate_per_source(),
            handshake_burst_per_source: default_handshake_burst_per_source(),
            max_waiting: default_max_waiting(),
            max_streams_per_connection: default_max_streams_per_connection(),
        }
    }
}

/// Top-level keys that may be overridden from the environment (`FLASHGATE_NAME`, …); every other
/// override is nested (`FLASHGATE_SECTION__KEY`). Other `FLASHGATE_*` variables (`FLASHGATE_LOG`,
/// `FLASHGATE_KEYSTORE_PASSPHRASE`) are not configuration keys.
const TOP_LEVEL_ENV: [&str; 2] = ["FLASHGATE_NAME", "FLASHGATE_TRUST_DOMAIN"];

impl BrokerConfig {
    /// Loads `path` overlaid with the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    /// Loads `path` overlaid with the `FLASHGATE_*` entries of `env`, resolves its relative paths
    /// ([`BrokerConfig::resolve_paths`]), then validates.
    pub fn load_from(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut cfg: BrokerConfig = settings::load_toml(
            path,
            env.iter().cloned(),
            &TOP_LEVEL_ENV,
            &["vendor.ca_keys", "audit.checkpoint_sinks", "upstream.endpoints", "upstream.batches"],
        )?;
        cfg.resolve_paths(&settings::PathBases::new(path, env.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
        cfg.validate()?;
        Ok(cfg)
    }

    /// Makes the relative paths of the file land where [`settings::PathBases`] says: the TLS files and
    /// vendor CA keys beside the file; the soft keystores and an SQLite ledger in the state directory
    /// (systemd's `StateDirectory=`, else beside the file); `passphrase_file` and `pin_file` in the
    /// credentials directory (systemd's `LoadCredential=`, else beside the file). A soft member without
    /// `passphrase_file` reads the credential [`PASSPHRASE_CREDENTIAL`] when the unit loads one, else
    /// [`PASSPHRASE_ENV`].
    pub fn resolve_paths(&mut self, bases: &settings::PathBases) {
        for p in [&mut self.tls.cert, &mut self.tls.key, &mut self.tls.ca] {
            *p = bases.config_file(p);
        }
        for p in &mut self.vendor.ca_keys {
            *p = bases.config_file(p);
        }
        for m in &mut self.hsm.members {
            match m {
                HsmMemberConfig::Soft { path, passphrase_file } => {
                    *path = bases.state_file(path);
                    match passphrase_file {
                        Some(f) => *f = bases.secret_file(f),
                        None if bases.has_credentials_dir() => {
                            let credential = bases.secret_file(Path::new(PASSPHRASE_CREDENTIAL));
                            if credential.exists() {
                                *passphrase_file = Some(credential);
                            }
                        }
                        None => {}
                    }
                }
                HsmMemberConfig::Pkcs11 { pin_file, .. } => {
                    if let Some(f) = pin_file {
                        *f = bases.secret_file(f);
                    }
                }
            }
        }
        if let Some(path) = sqlite_path(&self.ledger.url) {
            let (file, query) = path.split_once('?').map_or((path, None), |(f, q)| (f, Some(q)));
            if !file.is_empty() && !file.starts_with('/') && !file.starts_with(':') {
                let resolved = bases.state_file(Path::new(file));
                self.ledger.url = match query {
                    Some(q) => format!("sqlite://{}?{q}", resolved.display()),
                    None => format!("sqlite://{}", resolved.display()),
                };
            }
        }
        // Checkpoint sinks are written by the broker: state, like the ledger.
        for sink in &mut self.audit.checkpoint_sinks {
            if let Some(p) = sink.strip_prefix("file:")
                && !p.is_empty()
                && !p.starts_with('/')
            {
                *sink = format!("file:{}", bases.state_file(Path::new(p)).display());
            }
        }
    }

    /// Checks what the schema cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, value: String, why: &str| Err(ConfigError::Invalid { key: key.into(), value, why: why.into() });
        if flashgate_common::pki::Identity::broker(&self.trust_domain, &self.name).is_err() {
            return invalid(
                "name/trust_domain",
                format!("{}/{}", self.name, self.trust_domain),
                "not a valid broker identity (names: a-z 0-9 . - _)",
            );
        }
        if self.vendor.ca_keys.is_empty() {
            return invalid("vendor.ca_keys", String::new(), "at least one trusted vendor CA key is required");
        }
        if self.hsm.members.is_empty() {
            return invalid("hsm.members", String::new(), "at least one HSM member is required");
        }
        if !(self.ledger.url.starts_with("sqlite:") || self.ledger.url.starts_with("postgres")) {
            return invalid("ledger.url", self.ledger.url.clone(), "expected sqlite://PATH or postgres://…");
        }
        if self.limits.max_message_mib == 0 || self.limits.max_message_mib > 1024 {
            return invalid(
                "limits.max_message_mib",
                self.limits.max_message_mib.to_string(),
                "expected a number from 1 to 1024",
            );
        }
        let a = &self.audit;
        if !(1..=MAX_CHECKPOINT_EVERY_RECORDS).contains(&a.checkpoint_every_records) {
            return invalid(
                "audit.checkpoint_every_records",
                a.checkpoint_every_records.to_string(),
                &format!("expected 1 to {MAX_CHECKPOINT_EVERY_RECORDS}"),
            );
        }
        if !(MIN_CHECKPOINT_INTERVAL..=MAX_CHECKPOINT_INTERVAL).contains(&a.checkpoint_interval) {
            return invalid(
                "audit.checkpoint_interval",
                humantime::format_duration(a.checkpoint_interval).to_string(),
                "expected 1s to 1h",
            );
        }
        if a.checkpoint_sinks.len() > MAX_CHECKPOINT_SINKS {
            return invalid(
                "audit.checkpoint_sinks",
                a.checkpoint_sinks.len().to_string(),
                &format!("at most {MAX_CHECKPOINT_SINKS} sinks"),
            );
        }
        a.sinks(Path::new(""))?;
        if self.site_brokers.len() > MAX_SITE_BROKERS {
            return invalid(
                "site_brokers",
                self.site_brokers.len().to_string(),
                &format!("at most {MAX_SITE_BROKERS} site brokers"),
            );
        }
        for (name, site) in &self.site_brokers {
            let key = format!("site_brokers.{name}");
            if let Err(e) = flashgate_common::pki::Identity::broker(&self.trust_domain, name) {
                return invalid(&key, name.clone(), &format!("not a broker name: {e}"));
            }
            if let Err(e) = flashgate_common::pki::Identity::station(&self.trust_domain, site, 1) {
                return invalid(&key, site.clone(), &format!("not a site name: {e}"));
            }
        }
        if let Some(u) = &self.upstream {
            u.validate(&self.trust_domain)?;
            if !self.site_brokers.is_empty() {
                return invalid(
                    "site_brokers",
                    self.site_brokers.len().to_string(),
                    "a site broker ([upstream]) grants no leases of its own: leave [site_brokers] to central",
                );
            }
        }
        for (i, m) in self.hsm.members.iter().enumerate() {
            if let HsmMemberConfig::Pkcs11 { pin_env, pin_file, sessions, .. } = m {
                if pin_env.is_some() == pin_file.is_some() {
                    return invalid(
                        &format!("hsm.members[{i}]"),
                        String::new(),
                        "a pkcs11 member needs exactly one of pin_env or pin_file",
                    );
                }
                if *sessions == 0 {
                    return invalid(&format!("hsm.members[{i}].sessions"), "0".into(), "at least 1");
                }
            }
        }
        Ok(())
    }

    /// The metrics address, if enabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match self.listen.metrics.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|e| ConfigError::Invalid {
                key: "listen.metrics".into(),
                value: s.into(),
                why: format!("not a socket address: {e}"),
            }),
        }
    }
}

/// The path part of an SQLite ledger URL (`sqlite://PATH` or `sqlite:PATH`, query included).
fn sqlite_path(url: &str) -> Option<&str> {
    url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))
}

/// Reads a secret from a file (trailing newline removed) or an environment variable.
pub fn read_secret(
    what: &str,
    file: Option<&Path>,
    env_var: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Zeroizing<String>, ConfigError> {
    if let Some(path) = file {
        let s = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile { path: path.into(), source })?,
        );
        return Ok(Zeroizing::new(s.trim_end_matches(['\r', '\n']).to_owned()));
    }
    let var = env_var.unwrap_or(PASSPHRASE_ENV);
    match env(var) {
        Some(v) if !v.is_empty() => Ok(Zeroizing::new(v)),
        _ if var == PASSPHRASE_ENV => Err(ConfigError::MissingSecret {
            what: what.into(),
            how: format!(
                "set {var}, configure passphrase_file, or (systemd) load the credential \
                 {PASSPHRASE_CREDENTIAL} with LoadCredential="
            ),
        }),
        _ => Err(ConfigError::MissingSecret { what: what.into(), how: format!("set {var} or configure pin_file") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Sink;

    const GOOD: &str = r#"
name = "broker-1"
trust_domain = "factory.test"
[listen]
grpc = "127.0.0.1:0"
[tls]
cert = "b.pem"
key = "b.key"
ca = "ca.pem"
[vendor]
ca_keys = ["vendor.pub"]
[ledger]
url = "sqlite:///tmp/l.db"
[hsm]
timeout = "2s"
[[hsm.members]]
kind = "soft"
path = "keys.fgks"
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<BrokerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broker.toml");
        std::fs::write(&p, text).unwrap();
        BrokerConfig::load_from(&p, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn good_file_loads_with_defaults() {
        let c = load(GOOD, &[]).unwrap();
        assert_eq!(c.hsm.timeout, Duration::from_secs(2));
        assert_eq!(c.limits.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.ledger.max_group, 256);
        assert!(matches!(c.hsm.members[0], HsmMemberConfig::Soft { .. }));
        assert_eq!(c.metrics_addr().unwrap(), None);
    }

    #[test]
    fn environment_overrides_nested_keys_and_ignores_other_variables() {
        let c = load(
            GOOD,
            &[
                ("FLASHGATE_LEDGER__URL", "postgres://fg@127.0.0.1:5432/fg"),
                ("FLASHGATE_LISTEN__METRICS", "127.0.0.1:9464"),
                ("FLASHGATE_NAME", "broker-2"),
                ("FLASHGATE_VENDOR__CA_KEYS", "a.pub,b.pub"),
                ("FLASHGATE_KEYSTORE_PASSPHRASE", "secret"),
                ("FLASHGATE_LOG", "debug"),
            ],
        )
        .unwrap();
        assert_eq!(c.ledger.url, "postgres://fg@127.0.0.1:5432/fg");
        assert_eq!(c.name, "broker-2");
        // The overridden list, each resolved against the file's directory like the file's own keys.
        let names: Vec<_> = c.vendor.ca_keys.iter().map(|p| p.file_name().unwrap().to_owned()).collect();
        assert_eq!(names, ["a.pub", "b.pub"]);
        assert!(c.vendor.ca_keys.iter().all(|p| p.is_absolute() && p.parent() == c.tls.ca.parent()));
        assert_eq!(c.metrics_addr().unwrap(), Some("127.0.0.1:9464".parse().unwrap()));
    }

    #[test]
    fn negative_fixtures_name_the_key() {
        let typo = GOOD.replace("[ledger]\nurl", "[ledger]\nulr");
        let e = load(&typo, &[]).unwrap_err().to_string();
        assert!(e.contains("ulr") || e.contains("url"), "{e}");

        let no_members = GOOD.replace("[[hsm.members]]\nkind = \"soft\"\npath = \"keys.fgks\"\n", "members = []\n");
        let e = load(&no_members, &[]).unwrap_err().to_string();
        assert!(e.contains("hsm.members"), "{e}");

        let bad_kind = GOOD.replace("kind = \"soft\"", "kind = \"tpm\"");
        let e = load(&bad_kind, &[]).unwrap_err().to_string();
        assert!(e.contains("tpm"), "{e}");

        let bad_duration = GOOD.replace("timeout = \"2s\"", "timeout = \"soon\"");
        let e = load(&bad_duration, &[]).unwrap_err().to_string();
        assert!(e.contains("soon"), "{e}");

        let e = load(GOOD, &[("FLASHGATE_LEDGER__URL", "mysql://x")]).unwrap_err().to_string();
        assert!(e.contains("ledger.url") && e.contains("mysql"), "{e}");

        let pin = GOOD.replace(
            "kind = \"soft\"\npath = \"keys.fgks\"",
            "kind = \"pkcs11\"\nmodule = \"/m.so\"\ntoken_label = \"t\"",
        );
        let e = load(&pin, &[]).unwrap_err().to_string();
        assert!(e.contains("pin_env or pin_file"), "{e}");
    }

    const UPSTREAM: &str = "[upstream]\nsite = \"berlin\"\nendpoints = [\"https://central.factory.test:7443\"]\n\
                            batches = [\"B1\"]\nlease_units = 20\nlow_water = 5\nlease_ttl = \"10m\"\n";

    #[test]
    fn upstream_makes_a_site_broker_with_bounded_leases() {
        let c = load(&format!("{GOOD}{UPSTREAM}"), &[]).unwrap();
        let u = c.upstream.unwrap();
        assert_eq!((u.site.as_str(), u.lease_units, u.low_water), ("berlin", 20, 5));
        assert_eq!((u.lease_ttl, u.refresh_interval), (Duration::from_secs(600), Duration::from_secs(5)));
        let c = load(&format!("{GOOD}{UPSTREAM}"), &[("FLASHGATE_UPSTREAM__BATCHES", "B1,B2")]).unwrap();
        assert_eq!(c.upstream.unwrap().batches, vec!["B1", "B2"]);
        assert!(load(GOOD, &[]).unwrap().upstream.is_none());
        for (edit, key) in [
            ("lease_units = 0\nlow_water = 0", "upstream.lease_units"),
            ("lease_units = 1000001\nlow_water = 5", "upstream.lease_units"),
            ("lease_units = 20\nlow_water = 20", "upstream.low_water"),
            ("lease_units = 20\nlow_water = -1", "upstream.low_water"),
            ("lease_units = 20\nlow_water = 5\nrefresh_interval = \"6m\"", "upstream.refresh_interval"),
            ("lease_units = 20\nlow_water = 5\nrefresh_interval = \"301s\"", "upstream.refresh_interval"),
            ("lease_ttl = \"8days\"", "upstream.lease_ttl"),
            ("lease_ttl = \"999ms\"", "upstream.lease_ttl"),
        ] {
            let text = format!("{GOOD}{UPSTREAM}");
            let text = if edit.starts_with("lease_ttl") {
                text.replace("lease_ttl = \"10m\"", edit)
            } else {
                text.replace("lease_units = 20\nlow_water = 5", edit)
            };
            let e = load(&text, &[]).unwrap_err().to_string();
            assert!(e.contains(key), "{edit}: {e}");
        }
        // At the edges: low water one below the units, a refresh of exactly half the ttl.
        let text = format!("{GOOD}{UPSTREAM}")
            .replace("lease_units = 20\nlow_water = 5", "lease_units = 20\nlow_water = 19\nrefresh_interval = \"5m\"");
        assert!(load(&text, &[]).is_ok());
        let e = load(&format!("{GOOD}{UPSTREAM}").replace("batches = [\"B1\"]", "batches = []"), &[]).unwrap_err();
        assert!(e.to_string().contains("upstream.batches"), "{e}");
        let e = load(&format!("{GOOD}{UPSTREAM}").replace("https://central", "http://central"), &[]).unwrap_err();
        assert!(e.to_string().contains("upstream.endpoints[0]"), "{e}");
        let e = load(&format!("{GOOD}[site_brokers]\nsite-a = \"a\"\n{UPSTREAM}"), &[]).unwrap_err();
        assert!(e.to_string().contains("site_brokers"), "{e}");
    }

    #[test]
    fn site_brokers_map_broker_names_to_sites() {
        let c = load(&format!("{GOOD}[site_brokers]\nsite-berlin = \"berlin\"\n"), &[]).unwrap();
        assert_eq!(c.site_brokers.get("site-berlin").map(String::as_str), Some("berlin"));
        assert!(load(GOOD, &[]).unwrap().site_brokers.is_empty());
        for (bad, value) in [("\"Site B\" = \"berlin\"", "Site B"), ("site-b = \"Ber lin\"", "Ber lin")] {
            let e = load(&format!("{GOOD}[site_brokers]\n{bad}\n"), &[]).unwrap_err().to_string();
            assert!(e.contains("site_brokers.") && e.contains(value), "{bad}: {e}");
        }
    }

    #[test]
    fn audit_section_defaults_and_limits() {
        let c = load(GOOD, &[]).unwrap();
        assert_eq!(c.audit.checkpoint_every_records, 1000);
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(10));
        assert!(c.audit.checkpoint_sinks.is_empty());
        let with = |section: &str| format!("{GOOD}[audit]\n{section}\n");
        let c = load(&with("checkpoint_every_records = 1000000\ncheckpoint_interval = \"1h\""), &[]).unwrap();
        assert_eq!(c.audit.checkpoint_every_records, MAX_CHECKPOINT_EVERY_RECORDS);
        for (bad, key) in [
            ("checkpoint_every_records = 0", "audit.checkpoint_every_records"),
            ("checkpoint_every_records = 1000001", "audit.checkpoint_every_records"),
            ("checkpoint_interval = \"999ms\"", "audit.checkpoint_interval"),
            ("checkpoint_interval = \"61m\"", "audit.checkpoint_interval"),
            ("checkpoint_sinks = [\"syslog:local0\"]", "audit.checkpoint_sinks[0]"),
            ("checkpoint_sinks = [\"file:/a\", \"syslog:udp://collector\"]", "audit.checkpoint_sinks[1]"),
            ("checkpoint_sinks = [\"syslog:udp://collector:0\"]", "audit.checkpoint_sinks[0]"),
            ("checkpoint_sinks = [\"syslog:unix:dev/log\"]", "audit.checkpoint_sinks[0]"),
            ("checkpoint_sinks = [\"command:logger -t fg\"]", "audit.checkpoint_sinks[0]"),
            ("checkpoint_sinks = [\"command:\"]", "audit.checkpoint_sinks[0]"),
        ] {
            let e = load(&with(bad), &[]).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let c = load(
            &with("checkpoint_sinks = [\"syslog:udp://10.0.0.5:514\", \"syslog:unix:/dev/log\", \"command:/usr/bin/logger -t fg\"]"),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.audit.sinks(Path::new("/")).unwrap(),
            vec![
                Sink::SyslogUdp("10.0.0.5:514".into()),
                Sink::SyslogUnix(PathBuf::from("/dev/log")),
                Sink::Command(vec!["/usr/bin/logger".into(), "-t".into(), "fg".into()]),
            ]
        );
        let nine: Vec<String> = (0..9).map(|i| format!("\"file:/tmp/s{i}\"")).collect();
        let e = load(&with(&format!("checkpoint_sinks = [{}]", nine.join(", "))), &[]).unwrap_err().to_string();
        assert!(e.contains("at most 8"), "{e}");
        // A relative sink is state, like the ledger: it lands in systemd's StateDirectory= when set.
        let c = load(
            GOOD,
            &[("FLASHGATE_AUDIT__CHECKPOINT_SINKS", "file:a.log,file:/b.log"), ("STATE_DIRECTORY", "/var/lib/fg")],
        )
        .unwrap();
        assert_eq!(
            c.audit.sinks(Path::new("/etc/fg")).unwrap(),
            vec![Sink::File(PathBuf::from("/var/lib/fg/a.log")), Sink::File(PathBuf::from("/b.log"))]
        );
    }

    #[test]
    fn the_commented_example_in_deploy_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/broker.toml");
        let c = BrokerConfig::load_from(&p, std::iter::empty()).unwrap();
        assert_eq!(c.name, "broker-1");
        assert_eq!(c.hsm.members.len(), 1);
        assert_eq!(c.metrics_addr().unwrap(), Some("127.0.0.1:9464".parse().unwrap()));
        assert!(c.upstream.is_none());
        // The commented site-broker section, uncommented as an operator would, loads as documented.
        let text = std::fs::read_to_string(&p).unwrap();
        let (head, tail) = text.split_once("# [upstream]").unwrap();
        let uncommented: String = std::iter::once("[upstream]")
            .chain(tail.lines().filter_map(|l| l.strip_prefix("# ")).filter(|l| l.contains(" = ")))
            .collect::<Vec<_>>()
            .join("\n");
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("broker.toml");
        std::fs::write(&site, format!("{head}{uncommented}\n")).unwrap();
        for entry in std::fs::read_dir(p.parent().unwrap()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != "broker.toml" {
                let _ = std::fs::copy(entry.path(), dir.path().join(entry.file_name()));
            }
        }
        let c = BrokerConfig::load_from(&site, std::iter::empty()).unwrap();
        let u = c.upstream.expect("[upstream] loads");
        assert_eq!(
            (u.site.as_str(), u.batches.as_slice(), u.lease_units, u.low_water),
            ("berlin", &["lot-7".to_owned()][..], 100, 20)
        );
        assert_eq!(u.server_name.as_deref(), Some("central.factory.example"));
    }

    /// Relative paths: read-only files beside the file, state in systemd's `StateDirectory=`, secrets
    /// in its credentials directory (the keystore passphrase from the `keystore-passphrase` credential).
    #[test]
    fn relative_paths_land_in_the_state_and_credentials_directories_under_systemd() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        let creds = dir.path().join("creds");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&creds).unwrap();
        let p = etc.join("broker.toml");
        let pkcs11 =
            "[[hsm.members]]\nkind = \"pkcs11\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\npin_file = \"token-pin\"\n";
        std::fs::write(&p, GOOD.replace("sqlite:///tmp/l.db", "sqlite://ledger.db?cache=shared") + pkcs11).unwrap();

        let c = BrokerConfig::load_from(&p, std::iter::empty()).unwrap();
        assert_eq!(c.tls.cert, etc.join("b.pem"));
        assert_eq!(c.ledger.url, format!("sqlite://{}?cache=shared", etc.join("ledger.db").display()));
        let HsmMemberConfig::Soft { path, passphrase_file } = &c.hsm.members[0] else { panic!() };
        assert_eq!((path, passphrase_file), (&etc.join("keys.fgks"), &None));

        std::fs::write(creds.join(PASSPHRASE_CREDENTIAL), "pw\n").unwrap();
        let env = [
            ("STATE_DIRECTORY".to_string(), "/var/lib/flashgate".to_string()),
            ("CREDENTIALS_DIRECTORY".to_string(), creds.display().to_string()),
        ];
        let c = BrokerConfig::load_from(&p, env).unwrap();
        assert_eq!(c.tls.ca, etc.join("ca.pem"));
        assert_eq!(c.vendor.ca_keys, vec![etc.join("vendor.pub")]);
        assert_eq!(c.ledger.url, "sqlite:///var/lib/flashgate/ledger.db?cache=shared");
        let HsmMemberConfig::Soft { path, passphrase_file } = &c.hsm.members[0] else { panic!() };
        assert_eq!(path, Path::new("/var/lib/flashgate/keys.fgks"));
        assert_eq!(passphrase_file.as_deref(), Some(creds.join(PASSPHRASE_CREDENTIAL).as_path()));
        let HsmMemberConfig::Pkcs11 { pin_file, .. } = &c.hsm.members[1] else { panic!() };
        assert_eq!(pin_file.as_deref(), Some(creds.join("token-pin").as_path()));
    }

    #[test]
    fn secrets_come_from_files_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        std::fs::write(&f, "1234\n").unwrap();
        assert_eq!(read_secret("pin", Some(&f), None, &|_| None).unwrap().as_str(), "1234");
        let env = |k: &str| (k == PASSPHRASE_ENV).then(|| "pw".to_string());
        assert_eq!(read_secret("passphrase", None, None, &env).unwrap().as_str(), "pw");
        let e = read_secret("pin", None, Some("FLASHGATE_PIN_X"), &|_| None).unwrap_err().to_string();
        assert!(e.contains("FLASHGATE_PIN_X"), "{e}");
    }
}
