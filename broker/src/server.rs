//! Running a broker: [`start`] builds everything a [`BrokerConfig`] describes (ledger, HSM pool,
//! vendor CA keys, revocation list, TLS, metrics exporter) and [`serve`] runs the gRPC services —
//! `LicenceService`, `ImageService`, `StationService`, `AdminService`, gRPC health and server
//! reflection — over mutual TLS until [`RunningBroker::shutdown`]. Shutdown is graceful: the listener
//! closes, health turns NOT_SERVING, station control streams end with `UNAVAILABLE` (agents reconnect
//! elsewhere), in-flight requests finish (bounded by `limits.shutdown_grace`), then the ledger's
//! pools close; a licence whose commit was answered is durable, and no request is cut mid-write.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flashgate_common::cert::VendorCaPublicKey;
use flashgate_proto::FILE_DESCRIPTOR_SET;
use flashgate_proto::deadline::DeadlineLayer;
use flashgate_proto::transport::{self, AdmissionCounts, AdmissionStats, RevokedSerials, TlsFiles, TransportError};
use flashgate_proto::v1::admin_service_server::AdminServiceServer;
use flashgate_proto::v1::image_service_server::ImageServiceServer;
use flashgate_proto::v1::licence_service_server::LicenceServiceServer;
use flashgate_proto::v1::site_service_server::SiteServiceServer;
use flashgate_proto::v1::station_service_server::StationServiceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::checkpoint::{self, CheckpointSettings};
use crate::config::{BrokerConfig, ConfigError, HsmMemberConfig, LimitsConfig, read_secret};
use crate::hsm::{HsmBackend, HsmError, HsmPool, KdfParams, Pkcs11Config, Pkcs11Hsm, PoolConfig, SoftHsm};
use crate::ledger::{Ledger, LedgerConfig, LedgerError};
use crate::service::BrokerState;
use crate::service::admin::Admin;
use crate::service::image::Images;
use crate::service::licence::Licences;
use crate::service::site::Sites;
use crate::service::station::{self, Stations};
use crate::service::validate;

/// Largest HTTP/2 header block accepted (gRPC metadata of station and admin calls is far smaller).
pub const HTTP2_MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 flow-control window of one stream, client to broker: what a client may have in flight, unread,
/// on one call. Station messages are at most 16 KiB; hyper's default (1 MiB) let a client that sends as
/// fast as it can hold a megabyte of broker memory per stream (issue 10, the Attach flood). An admin's
/// image upload streams through it at one window per round trip.
pub const HTTP2_STREAM_WINDOW: u32 = 128 * 1024;
/// HTTP/2 flow-control window of one connection (all its streams together), client to broker.
pub const HTTP2_CONNECTION_WINDOW: u32 = 512 * 1024;
/// HTTP/2 keep-alive PING interval on server connections: a client that vanished is noticed.
pub const SERVER_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a server keep-alive PING may go unanswered before the connection is closed.
pub const SERVER_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a broker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The ledger could not be opened.
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// An HSM member could not be opened.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// TLS setup or serving failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A vendor CA key file is unreadable or not a P-256 public key.
    #[error("vendor CA key {path}: {reason}")]
    VendorKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The gRPC or metrics address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// The Prometheus exporter could not start.
    #[error("metrics exporter on {addr}: {reason}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The reflection service could not be built from the descriptor set.
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    /// The server task ended unexpectedly.
    #[error("broker server task failed: {0}")]
    Task(String),
}

/// Everything [`serve`] needs, already built (tests assemble their own pools and ledgers).
pub struct ServeSpec {
    /// Broker name.
    pub name: String,
    /// Trust domain of callers.
    pub trust_domain: String,
    /// Where to listen (port 0: ephemeral).
    pub listen: SocketAddr,
    /// Broker certificate, key and client CA.
    pub tls: TlsFiles,
    /// Trusted vendor CA keys.
    pub vendor_keys: Vec<VendorCaPublicKey>,
    /// The ledger.
    pub ledger: Ledger,
    /// The HSM pool.
    pub pool: HsmPool,
    /// Limits.
    pub limits: LimitsConfig,
    /// When to sign audit checkpoints.
    pub checkpoints: CheckpointSettings,
    /// Site brokers this broker leases quota to: broker name → site.
    pub site_brokers: std::collections::BTreeMap<String, String>,
    /// On a site broker, its central brokers (`[upstream]`).
    pub upstream: Option<crate::config::UpstreamSection>,
}

/// A broker serving on [`RunningBroker::addr`].
pub struct RunningBroker {
    addr: SocketAddr,
    state: BrokerState,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
    grace: Duration,
    admission: Arc<AdmissionStats>,
    signer: JoinHandle<()>,
}

impl std::fmt::Debug for RunningBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningBroker").field("addr", &self.addr).field("state", &self.state).finish_non_exhaustive()
    }
}

impl RunningBroker {
    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// What the accept loop dropped so far (idle sockets, stalled handshakes, shed ones).
    pub fn admission(&self) -> AdmissionCounts {
        self.admission.snapshot()
    }

    /// The shared service state (ledger, pool).
    pub fn state(&self) -> &BrokerState {
        &self.state
    }

    /// Stops accepting, lets in-flight requests finish (up to the grace period), closes the ledger.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join().await
    }

    /// Waits for the server to stop (after a shutdown signal from elsewhere, or a failure).
    pub async fn join(&mut self) -> Result<(), ServerError> {
        let grace = self.grace;
        let result = match tokio::time::timeout(grace + Duration::from_secs(1), &mut self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(ServerError::Task(e.to_string())),
            Err(_) => {
                tracing::warn!(?grace, "in-flight requests did not finish within the shutdown grace period");
                self.task.abort();
                Ok(())
            }
        };
        // The last records of this run are signed before the ledger closes.
        self.signer.abort();
        if let Err(e) = checkpoint::sign_if_moved(&self.state, "shutdown").await {
            tracing::warn!(error = %e, "could not sign the audit checkpoint at shutdown");
        }
        self.state.ledger().close().await;
        result
    }

    /// Resolves when `signal` does, then shuts down gracefully.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) -> Result<(), ServerError> {
        signal.await;
        tracing::info!("shutdown requested: finishing in-flight requests");
        self.shutdown().await
    }
}

fn load_vendor_keys(paths: &[PathBuf]) -> Result<Vec<VendorCaPublicKey>, ServerError> {
    paths
        .iter()
        .map(|p| {
            let pem = std::fs::read_to_string(p)
                .map_err(|e| ServerError::VendorKey { path: p.clone(), reason: e.to_string() })?;
            VendorCaPublicKey::from_pem(&pem)
                .map_err(|e| ServerError::VendorKey { path: p.clone(), reason: e.to_string() })
        })
        .collect()
}

fn relative(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// Opens the HSM members a configuration lists. `env` reads secrets (the process environment in production).
pub fn open_hsm_members(
    cfg: &BrokerConfig,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Arc<dyn HsmBackend>>, ServerError> {
    let mut members: Vec<Arc<dyn HsmBackend>> = Vec::new();
    for m in &cfg.hsm.members {
        match m {
            HsmMemberConfig::Soft { path, passphrase_file } => {
                let file = passphrase_file.as_ref().map(|f| relative(base, f));
                let pass = read_secret("soft keystore passphrase", file.as_deref(), None, env)?;
                let hsm = SoftHsm::open_or_create(&relative(base, path), &pass, KdfParams::default())?;
                members.push(Arc::new(hsm));
            }
            HsmMemberConfig::Pkcs11 { module, token_label, pin_env, pin_file, sessions } => {
                let file = pin_file.as_ref().map(|f| relative(base, f));
                let pin =
                    read_secret(&format!("PIN of token {token_label}"), file.as_deref(), pin_env.as_deref(), env)?;
                let mut c = Pkcs11Config::new(module.clone(), token_label.clone(), pin);
                c.sessions = *sessions;
                members.push(Arc::new(Pkcs11Hsm::connect(c)?));
            }
        }
    }
    Ok(members)
}

/// Everything a start would need, checked without creating anything (`flashgate broker --check`):
/// the TLS files, the vendor CA keys, the secrets, an existing keystore opened with its passphrase,
/// the ledger (an existing SQLite file, or a directory it can be created in; a PostgreSQL
/// connection). Every problem, each naming its file or value; empty when the broker can start.
pub async fn check(cfg: &BrokerConfig, base: &Path, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let tls = TlsFiles::new(relative(base, &cfg.tls.cert), relative(base, &cfg.tls.key), relative(base, &cfg.tls.ca));
    if let Err(e) = transport::server_config(&tls, Arc::new(RevokedSerials::default())) {
        problems.push(format!("TLS: {e}"));
    }
    for p in &cfg.vendor.ca_keys {
        if let Err(e) = load_vendor_keys(&[relative(base, p)]) {
            problems.push(e.to_string());
        }
    }
    for m in &cfg.hsm.members {
        match m {
            HsmMemberConfig::Soft { path, passphrase_file } => {
                let file = passphrase_file.as_ref().map(|f| relative(base, f));
                match read_secret("soft keystore passphrase", file.as_deref(), None, env) {
                    Err(e) => problems.push(e.to_string()),
                    Ok(pass) => {
                        let path = relative(base, path);
                        if path.exists() {
                            if let Err(e) = SoftHsm::open(&path, &pass) {
                                problems.push(format!("HSM: {e}"));
                            }
                        } else if !path.parent().is_some_and(|d| d.as_os_str().is_empty() || d.is_dir()) {
                            problems.push(format!(
                                "soft keystore {}: its directory does not exist (the keystore is created there at first start)",
                                path.display()
                            ));
                        }
                    }
                }
            }
            HsmMemberConfig::Pkcs11 { module, token_label, pin_env, pin_file, .. } => {
                let file = pin_file.as_ref().map(|f| relative(base, f));
                if let Err(e) =
                    read_secret(&format!("PIN of token {token_label}"), file.as_deref(), pin_env.as_deref(), env)
                {
                    problems.push(e.to_string());
                }
                if !module.exists() {
                    problems.push(format!("PKCS#11 module {}: no such file", module.display()));
                }
            }
        }
    }
    match cfg.audit.sinks(base) {
        Ok(sinks) => {
            use crate::checkpoint::Sink;
            for s in sinks {
                match &s {
                    Sink::File(p) if !p.parent().is_some_and(|d| d.as_os_str().is_empty() || d.is_dir()) => {
                        problems.push(format!("audit checkpoint sink {}: its directory does not exist", s.describe()));
                    }
                    Sink::SyslogUnix(p) if !p.exists() => {
                        problems.push(format!("audit checkpoint sink {}: no such socket", s.describe()));
                    }
                    Sink::Command(argv) if argv.first().is_none_or(|p| !Path::new(p).is_file()) => {
                        problems.push(format!("audit checkpoint sink {}: no such program", s.describe()));
                    }
                    _ => {}
                }
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    match cfg.ledger.url.strip_prefix("sqlite://") {
        Some(path) => {
            let path = relative(base, Path::new(path.split('?').next().unwrap_or(path)));
            if path.exists() {
                match std::fs::read(&path).map(|b| b.starts_with(b"SQLite format 3\0") || b.is_empty()) {
                    Ok(true) => {}
                    Ok(false) => problems.push(format!("ledger {}: not an SQLite database", path.display())),
                    Err(e) => problems.push(format!("ledger {}: {e}", path.display())),
                }
            } else if !path.parent().is_some_and(|d| d.as_os_str().is_empty() || d.is_dir()) {
                problems.push(format!(
                    "ledger {}: its directory does not exist (the database is created there at first start)",
                    path.display()
                ));
            }
        }
        None => {
            use sqlx::Connection;
            if let Err(e) = sqlx::postgres::PgConnection::connect(&cfg.ledger.url).await {
                problems.push(format!("ledger {}: {e}", crate::ledger::redact_url(&cfg.ledger.url)));
            }
        }
    }
    problems
}

/// Starts the broker a configuration file describes. Relative paths in the file are relative to
/// `base` (the file's directory). Secrets are read through `env`.
pub async fn start(
    cfg: &BrokerConfig,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RunningBroker, ServerError> {
    // What can be checked is checked before anything is created (ledger, keystore).
    let vendor_keys = load_vendor_keys(&cfg.vendor.ca_keys.iter().map(|p| relative(base, p)).collect::<Vec<_>>())?;
    let tls = TlsFiles::new(relative(base, &cfg.tls.cert), relative(base, &cfg.tls.key), relative(base, &cfg.tls.ca));
    transport::server_config(&tls, Arc::new(RevokedSerials::default()))?;
    if let Some(addr) = cfg.metrics_addr()? {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| ServerError::Metrics { addr, reason: e.to_string() })?;
        tracing::info!(%addr, "Prometheus metrics at http://{addr}/metrics");
    }
    let mut lc = LedgerConfig::new(cfg.ledger.url.clone());
    lc.max_group = cfg.ledger.max_group;
    lc.queue_depth = cfg.ledger.queue_depth;
    lc.pg_connections = cfg.ledger.pg_connections;
    if let Some(path) = lc.url.strip_prefix("sqlite://")
        && !path.starts_with('/')
    {
        lc.url = format!("sqlite://{}", base.join(path).display());
    }
    let ledger = Ledger::open_with(lc).await?;
    // Connections waiting at the admission gate each hold a descriptor (proto::admission).
    match flashgate_proto::admission::raise_open_file_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit to its hard limit"),
    }
    let members = open_hsm_members(cfg, base, env)?;
    let pool = HsmPool::new(
        members,
        PoolConfig {
            timeout: cfg.hsm.timeout,
            max_in_flight: (cfg.hsm.max_in_flight > 0).then_some(cfg.hsm.max_in_flight),
            ..PoolConfig::default()
        },
    )?;
    serve(ServeSpec {
        name: cfg.name.clone(),
        trust_domain: cfg.trust_domain.clone(),
        listen: cfg.listen.grpc,
        tls,
        vendor_keys,
        ledger,
        pool,
        limits: cfg.limits.clone(),
        checkpoints: CheckpointSettings {
            every_records: cfg.audit.checkpoint_every_records,
            interval: cfg.audit.checkpoint_interval,
            sinks: cfg.audit.sinks(base)?,
        },
        site_brokers: cfg.site_brokers.clone(),
        upstream: cfg.upstream.clone(),
    })
    .await
}

/// Serves the broker's gRPC services over mutual TLS on `spec.listen`.
pub async fn serve(spec: ServeSpec) -> Result<RunningBroker, ServerError> {
    let revoked = Arc::new(RevokedSerials::default());
    let state = BrokerState::new(
        spec.name.clone(),
        spec.trust_domain,
        spec.ledger,
        spec.pool,
        spec.vendor_keys,
        revoked.clone(),
        spec.checkpoints,
    );
    state.set_site_brokers(spec.site_brokers);
    if let Some(up) = spec.upstream {
        let site = up.site.clone();
        let link = crate::upstream::UpstreamLink::new(up, &spec.tls).map_err(|e| ServerError::Task(e.to_string()))?;
        state.set_upstream(Arc::new(link));
        tracing::info!(%site, "site broker: quota leases, batches and revocations come from central");
    }
    let n = state.refresh_revocations().await?;
    // The audit-signing key of every member (created inside it at first start), then a checkpoint of the
    // head as it is now, before any request is served.
    let keys = state.pool().ensure_audit_keys().await;
    if keys == 0 {
        tracing::warn!("no HSM member has an audit-signing key: audit checkpoints are not signed");
    }
    checkpoint::start(&state).await;
    let signer = tokio::spawn(checkpoint::run(state.clone()));
    let stats = Arc::new(AdmissionStats::default());
    let tls = transport::server_config(&spec.tls, revoked)?;
    let listener = TcpListener::bind(spec.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: spec.listen.to_string(), source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: spec.listen.to_string(), source })?;

    // Decode limits per service: the station services' messages are small and bounded; only AdminService
    // (image upload and pack) takes large ones.
    let admin_max = spec.limits.max_message_mib * 1024 * 1024;
    let station_max = validate::STATION_DECODE_LIMIT;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<LicenceServiceServer<Licences>>().await;
    health.set_serving::<ImageServiceServer<Images>>().await;
    health.set_serving::<StationServiceServer<Stations>>().await;
    health.set_serving::<AdminServiceServer<Admin>>().await;
    // Both reflection versions: grpcurl and grpcio's reflection client still speak only v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(spec.limits.max_streams_per_connection))
        .http2_max_header_list_size(Some(HTTP2_MAX_HEADER_LIST))
        .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW))
        .http2_keepalive_interval(Some(SERVER_KEEP_ALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(SERVER_KEEP_ALIVE_TIMEOUT))
        .layer(DeadlineLayer)
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(LicenceServiceServer::new(Licences::new(state.clone())).max_decoding_message_size(station_max))
        .add_service(ImageServiceServer::new(Images::new(state.clone())).max_decoding_message_size(station_max))
        .add_service(StationServiceServer::new(Stations::new(state.clone())).max_decoding_message_size(station_max))
        .add_service(AdminServiceServer::new(Admin::new(state.clone())).max_decoding_message_size(admin_max))
        .add_service(
            SiteServiceServer::new(Sites::new(state.clone())).max_decoding_message_size(validate::SITE_DECODE_LIMIT),
        );

    // Revocations made by other brokers sharing the ledger.
    let refresher = {
        let state = state.clone();
        let every = spec.limits.revocation_refresh.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = state.refresh_revocations().await {
                    tracing::warn!(error = %e, "could not refresh revocations from the ledger");
                }
            }
        })
    };

    // Assignments made through other brokers sharing the ledger, for the stations attached here.
    let poller = tokio::spawn(station::poll_assignments(state.clone(), station::ASSIGNMENT_POLL));
    // A site broker's sync with central.
    let upstream = state.upstream().map(|link| tokio::spawn(Arc::clone(link).run(state.clone())));

    let (tx, rx) = oneshot::channel::<()>();
    let name = spec.name;
    let admission = spec.limits.admission();
    let admission_stats = Arc::clone(&stats);
    let stations = state.clone();
    tracing::info!(broker = %name, %addr, revoked = n, "broker serving");
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.await;
            health.set_not_serving::<LicenceServiceServer<Licences>>().await;
            health.set_not_serving::<ImageServiceServer<Images>>().await;
            health.set_not_serving::<StationServiceServer<Stations>>().await;
            health.set_not_serving::<AdminServiceServer<Admin>>().await;
            // Long-lived control streams would otherwise hold the graceful shutdown for its whole grace.
            stations.stations().close();
        };
        let r = transport::serve_with_options(router, listener, tls, admission, admission_stats, shutdown).await;
        refresher.abort();
        poller.abort();
        if let Some(u) = upstream {
            u.abort();
        }
        tracing::info!(broker = %name, "broker stopped");
        r.map_err(ServerError::from)
    });
    Ok(RunningBroker {
        addr,
        state,
        shutdown: Some(tx),
        task,
        grace: spec.limits.shutdown_grace,
        admission: stats,
        signer,
    })
}
