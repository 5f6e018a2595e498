//! The broker's gRPC services over the HSM pool and the ledger: [`licence::Licences`]
//! (`LicenceService`, stations), [`image::Images`] (`ImageService`, stations), [`station::Stations`]
//! (`StationService`, the stations' control stream) and [`admin::Admin`] (`AdminService`, operators). This module owns what they share: [`BrokerState`], who the caller is
//! ([`auth`]), and how domain errors become gRPC statuses ([`status`]) — the only place that mapping
//! happens.

pub mod admin;
pub mod auth;
pub mod image;
pub mod licence;
pub mod site;
pub mod station;
pub mod status;
pub mod traceability;
pub mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use flashgate_common::cert::VendorCaPublicKey;
use flashgate_proto::transport::RevokedSerials;

use self::station::StationHub;
use crate::checkpoint::{CheckpointSettings, Checkpoints};
use crate::hsm::HsmPool;
use crate::ledger::{ImageMeta, Ledger, LedgerError};

/// Prometheus metric names (documented in docs/operator-guide.md).
pub mod metric {
    /// Counter: licences returned, label `outcome` = `issued` (new, one quota unit) or `reissued`.
    pub const LICENCES: &str = "flashgate_licences_total";
    /// Counter: licences refused, label `reason` (the stable refusal name).
    pub const REFUSALS: &str = "flashgate_licence_refusals_total";
    /// Histogram (seconds): time inside the HSM pool for one licence.
    pub const HSM_LATENCY: &str = "flashgate_hsm_licence_seconds";
    /// Histogram (seconds): whole RPC latency, labels `rpc` and `code`.
    pub const RPC_LATENCY: &str = "flashgate_rpc_seconds";
    /// Counter: install reports recorded, label `result` = `ok`, `failed` or `duplicate`.
    pub const INSTALLS: &str = "flashgate_install_reports_total";
    /// Counter: image bytes streamed to stations.
    pub const IMAGE_BYTES: &str = "flashgate_image_bytes_sent_total";
    /// Gauge: stations attached to this broker over `StationService.Attach`.
    pub const STATIONS_ATTACHED: &str = "flashgate_stations_attached";
    /// Counter: audit checkpoints signed by this broker.
    pub const CHECKPOINTS: &str = "flashgate_audit_checkpoints_total";
    /// Counter: failed appends of a checkpoint to a configured sink.
    pub const CHECKPOINT_SINK_ERRORS: &str = "flashgate_audit_checkpoint_sink_errors_total";
    /// Gauge: records a site ledger holds that this (central) ledger does not, label `site`.
    pub const SITE_LAG_RECORDS: &str = "flashgate_site_replication_lag_records";
    /// Gauge (seconds): age of the last replicated record of a site behind, 0 when caught up, label `site`.
    pub const SITE_LAG_SECONDS: &str = "flashgate_site_replication_lag_seconds";
}

/// Everything the services share. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct BrokerState {
    inner: Arc<StateInner>,
}

struct StateInner {
    name: String,
    trust_domain: String,
    ledger: Ledger,
    pool: HsmPool,
    vendor_keys: Vec<VendorCaPublicKey>,
    revoked: Arc<RevokedSerials>,
    /// Images are immutable once stored: their metadata is cached by SHA-256.
    images: RwLock<HashMap<String, ImageMeta>>,
    /// When each (identity, serial) was last written to the ledger's stations table.
    stations_noted: Mutex<HashMap<(String, String), Instant>>,
    /// Stations attached to this broker and the latest station assignments.
    stations: Arc<StationHub>,
    /// The audit checkpoint signer's state and the newest checkpoint.
    checkpoints: Checkpoints,
    /// Site brokers this broker leases quota to: broker name → site (`[site_brokers]`).
    site_brokers: RwLock<std::collections::BTreeMap<String, String>>,
    /// On a site broker, its link to central (`[upstream]`).
    upstream: std::sync::OnceLock<Arc<crate::upstream::UpstreamLink>>,
}

impl std::fmt::Debug for BrokerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerState")
            .field("name", &self.inner.name)
            .field("trust_domain", &self.inner.trust_domain)
            .field("vendor_keys", &self.inner.vendor_keys.len())
            .finish_non_exhaustive()
    }
}

/// How often a station's certificate is re-noted in the ledger (its `last_seen`).
const STATION_NOTE_INTERVAL: Duration = Duration::from_secs(60);

impl BrokerState {
    /// State for a broker named `name` serving callers of `trust_domain`, trusting `vendor_keys` for chip
    /// certificates, refusing the serials in `revoked` (kept in step with the ledger by the server).
    pub fn new(
        name: impl Into<String>,
        trust_domain: impl Into<String>,
        ledger: Ledger,
        pool: HsmPool,
        vendor_keys: Vec<VendorCaPublicKey>,
        revoked: Arc<RevokedSerials>,
        checkpoints: CheckpointSettings,
    ) -> Self {
        Self {
            inner: Arc::new(StateInner {
                name: name.into(),
                trust_domain: trust_domain.into(),
                ledger,
                pool,
                vendor_keys,
                revoked,
                images: RwLock::new(HashMap::new()),
                stations_noted: Mutex::new(HashMap::new()),
                stations: Arc::new(StationHub::new()),
                checkpoints: Checkpoints::new(checkpoints),
                site_brokers: RwLock::new(std::collections::BTreeMap::new()),
                upstream: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The site broker (by name) that serves `site`, if `[site_brokers]` names one.
    pub fn site_broker_of_site(&self, site: &str) -> Option<String> {
        let map = self.inner.site_brokers.read().unwrap_or_else(|p| p.into_inner());
        map.iter().find(|(_, s)| s.as_str() == site).map(|(name, _)| name.clone())
    }

    /// Makes this broker a site broker with `link` to central (once; later calls are ignored).
    pub fn set_upstream(&self, link: Arc<crate::upstream::UpstreamLink>) {
        let _ = self.inner.upstream.set(link);
    }

    /// The link to central, on a site broker.
    pub fn upstream(&self) -> Option<&Arc<crate::upstream::UpstreamLink>> {
        self.inner.upstream.get()
    }

    /// Sets the site brokers this broker leases quota to (broker name → site).
    pub fn set_site_brokers(&self, map: std::collections::BTreeMap<String, String>) {
        *self.inner.site_brokers.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// The site the broker named `name` serves, if it is a site broker of this one.
    pub fn site_of_broker(&self, name: &str) -> Option<String> {
        self.inner.site_brokers.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// The broker's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The trust domain callers must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// The stations attached to this broker and the latest station assignments.
    pub fn stations(&self) -> &Arc<StationHub> {
        &self.inner.stations
    }

    /// The audit checkpoint signer's state (the newest checkpoint for licence responses).
    pub fn checkpoints(&self) -> &Checkpoints {
        &self.inner.checkpoints
    }

    /// The HSM pool.
    pub fn pool(&self) -> &HsmPool {
        &self.inner.pool
    }

    /// The trusted vendor CA keys.
    pub fn vendor_keys(&self) -> &[VendorCaPublicKey] {
        &self.inner.vendor_keys
    }

    /// The revoked serials (shared with the TLS layer).
    pub fn revoked(&self) -> &Arc<RevokedSerials> {
        &self.inner.revoked
    }

    /// Metadata of an image, from the cache or the ledger.
    pub async fn image_meta(&self, sha256: &str) -> Result<ImageMeta, LedgerError> {
        if let Some(m) = self.inner.images.read().unwrap_or_else(|p| p.into_inner()).get(sha256) {
            return Ok(m.clone());
        }
        let meta = self.inner.ledger.image_meta(sha256).await?;
        self.inner.images.write().unwrap_or_else(|p| p.into_inner()).insert(sha256.to_owned(), meta.clone());
        Ok(meta)
    }

    /// Notes a station's certificate in the ledger at most once per [`STATION_NOTE_INTERVAL`] per broker.
    /// Failures are logged, never fatal: this is bookkeeping.
    pub async fn note_station(&self, identity: &str, site: &str, serial: &str) {
        let key = (identity.to_owned(), serial.to_owned());
        {
            let mut seen = self.inner.stations_noted.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match seen.get(&key) {
                Some(t) if now.duration_since(*t) < STATION_NOTE_INTERVAL => return,
                _ => {
                    seen.insert(key, now);
                }
            }
        }
        if let Err(e) = self.inner.ledger.note_station(identity, site, serial).await {
            tracing::warn!(station = identity, serial, error = %e, "could not record the station in the ledger");
        }
    }

    /// Revokes `serial` on this broker at once (after the ledger recorded it): new handshakes and requests
    /// are refused and the open `Attach` streams of that certificate end.
    pub fn revoke_now(&self, serial: &str) {
        self.inner.revoked.revoke(serial);
        self.inner.stations.end_revoked(self.inner.revoked.as_ref());
    }

    /// Reloads the revocation list from the ledger (other brokers on a shared ledger may have revoked
    /// certificates). Returns how many serials are revoked.
    pub async fn refresh_revocations(&self) -> Result<usize, LedgerError> {
        let list = self.inner.ledger.revocations().await?;
        for r in &list {
            self.inner.revoked.revoke(&r.serial);
        }
        // Open control streams of a certificate revoked anywhere on the ledger end now (their next request
        // would be refused anyway; a stream that only receives must not wait for one).
        self.inner.stations.end_revoked(self.inner.revoked.as_ref());
        Ok(self.inner.revoked.len())
    }
}
