//! `AdminService`: what operators do — firmware keys (generated in or imported into the HSM pool),
//! images (uploaded ciphertext, or plaintext packed inside the HSM under a fresh nonce and never
//! stored), batches, device history, stations (their certificates and counts, whether they are attached,
//! and the batch assigned to each, or a pause) and revocation, the audit log and HSM status. Every
//! RPC requires an admin identity; every change is audited by the ledger with that identity as actor.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::str::FromStr;
use std::time::{Duration, Instant, UNIX_EPOCH};

use flashgate_common::family::Family;
use flashgate_common::keyfile::fresh_nonce;
use flashgate_common::licence::KeyId;
use flashgate_common::pki::Identity;
use flashgate_common::sfi::{AreaType, FirmwareKey, ImageReader, PlainArea, ReaderOptions, expected_flash_crc};
use flashgate_proto::errors::refusal;
use flashgate_proto::transport::normalize_serial;
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::admin_service_server::AdminService;
use p256::pkcs8::EncodePublicKey as _;
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;
use zeroize::Zeroizing;

use super::licence::observe;
use super::station::{probe_activity, probe_info};
use super::status::{hsm_status, ledger_status};
use super::traceability::{self, ChunkStream};
use super::{BrokerState, auth, validate};
use crate::ledger::{
    ANY_SITE, Batch, BatchState, BatchStatus, ImageMeta, KeyRecord, LedgerError, NewBatch, NewImage, StationSummary,
    now_ms,
};

/// The `AdminService` implementation.
#[derive(Debug, Clone)]
pub struct Admin {
    state: BrokerState,
}

impl Admin {
    /// The service over `state`.
    pub fn new(state: BrokerState) -> Self {
        Self { state }
    }
}

fn lst(e: LedgerError) -> Status {
    ledger_status(e, "", "")
}

fn key_id_from_hex(s: &str) -> Result<KeyId, Status> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(s, &mut id)
        .map_err(|_| Status::invalid_argument(format!("key id {s:?} is not 32 hex characters (16 bytes)")))?;
    Ok(KeyId(id))
}

fn family_and_product(family: &str, product_id: &str) -> Result<(Family, String), Status> {
    let fam = Family::from_str(family).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let own = String::from_utf8_lossy(&fam.profile().product_id).into_owned();
    if !product_id.is_empty() && product_id != own {
        return Err(Status::invalid_argument(format!(
            "product id {product_id:?} is not the product id of family {fam} ({own:?})"
        )));
    }
    Ok((fam, own))
}

fn image_summary(m: &ImageMeta) -> pb::ImageSummary {
    pb::ImageSummary {
        sha256: m.sha256.clone(),
        key_id: m.key_id.clone(),
        family: m.family.clone(),
        product_id: m.product_id.clone(),
        size: u64::try_from(m.size).unwrap_or(0),
        area_count: m.area_count,
        expected_flash_crc: m.expected_crc,
        created_at_ms: m.created_at,
        created_by: m.created_by.clone(),
    }
}

fn state_to_pb(s: BatchState) -> i32 {
    match s {
        BatchState::Open => pb::BatchState::Open as i32,
        BatchState::Paused => pb::BatchState::Paused as i32,
        BatchState::Closed => pb::BatchState::Closed as i32,
    }
}

pub(crate) fn batch_info(b: &Batch, counts: Option<&BatchStatus>) -> pb::BatchInfo {
    pb::BatchInfo {
        id: b.id.clone(),
        product_id: b.product_id.clone(),
        image_sha256: b.image_sha256.clone(),
        key_id: b.key_id.clone(),
        quota: b.quota,
        issued: b.issued,
        installed: counts.map_or(0, |c| c.installed),
        failed: counts.map_or(0, |c| c.failed),
        remaining: b.remaining(),
        leased: b.leased,
        allowed_sites: b.allowed_sites.clone(),
        not_before_ms: b.not_before,
        not_after_ms: b.not_after,
        state: state_to_pb(b.state),
        created_at_ms: b.created_at,
        created_by: b.created_by.clone(),
        warnings: Vec::new(),
        sites: counts
            .map(|c| {
                c.sites
                    .iter()
                    .map(|s| pb::SiteUnits {
                        site: s.site.clone(),
                        issued: s.issued,
                        leased: s.leased,
                        conflicts: s.conflicts,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// A station's certificates and counts; the live fields are filled in by [`Admin::station_infos`].
fn station_summary_info(s: StationSummary, revs: &[crate::ledger::Revocation]) -> pb::StationInfo {
    pb::StationInfo {
        last_seen_ms: s.certificates.iter().map(|c| c.last_seen).max().unwrap_or(0),
        certificates: s
            .certificates
            .iter()
            .map(|c| {
                let rev = revs.iter().find(|r| normalize_serial(&r.serial) == c.serial);
                pb::StationCert {
                    serial: c.serial.clone(),
                    first_seen_ms: c.first_seen,
                    last_seen_ms: c.last_seen,
                    revoked: rev.is_some(),
                    revoked_reason: rev.map(|r| r.reason.clone()).unwrap_or_default(),
                }
            })
            .collect(),
        identity: s.identity,
        site: s.site,
        licences: s.licences,
        installs_ok: s.installs_ok,
        installs_failed: s.installs_failed,
        ..Default::default()
    }
}

/// How many names a guard's message lists before saying "and N more".
const NAMES_LISTED: usize = 12;

/// `2020-01-01T00:00:00Z` for ms since the epoch (the number itself before 1970).
fn ms_text(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(m) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(m)).to_string(),
        Err(_) => format!("{ms} ms since the epoch"),
    }
}

/// `SITE/N` for a station identity URI of any trust domain, else the URI.
fn short_station(uri: &str) -> String {
    match Identity::parse_uri(uri) {
        Ok(Identity::Station { site, station, .. }) => format!("{site}/{station}"),
        _ => uri.to_owned(),
    }
}

/// `a, b, c` — at most [`NAMES_LISTED`], then `and N more`; `none` for none.
fn name_list(names: &[String]) -> String {
    if names.is_empty() {
        return "none".into();
    }
    let mut text = names.iter().take(NAMES_LISTED).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > NAMES_LISTED {
        text.push_str(&format!(" and {} more", names.len() - NAMES_LISTED));
    }
    text
}

/// Stations that have connected to a broker of this ledger (a certificate seen, a licence, an install
/// report or a status recorded), by identity, with their site. An assignment alone does not count.
fn connected_stations(
    summaries: &[StationSummary],
    statuses: &[crate::ledger::StationStatus],
) -> BTreeMap<String, String> {
    summaries
        .iter()
        .map(|s| (s.identity.clone(), s.site.clone()))
        .chain(statuses.iter().map(|s| (s.identity.clone(), s.site.clone())))
        .collect()
}

/// The warnings of `CreateBatch`: each allowed site (other than `*`) with no connected station.
fn site_warnings(allowed: &[String], connected: &BTreeMap<String, String>) -> Vec<String> {
    let mut sites: Vec<String> = connected.values().cloned().collect();
    sites.sort();
    sites.dedup();
    allowed
        .iter()
        .filter(|a| a.as_str() != ANY_SITE && !sites.contains(a))
        .map(|a| {
            format!(
                "no station of site {a:?} has connected to this broker's ledger yet; sites with stations: {}",
                name_list(&sites)
            )
        })
        .collect()
}

/// The warning of `AssignStation` for a station that never connected, naming the known stations of
/// its site (or every known station when its site has none).
fn station_warning(station: &str, connected: &BTreeMap<String, String>) -> Option<String> {
    if connected.contains_key(station) {
        return None;
    }
    let site = match Identity::parse_uri(station) {
        Ok(Identity::Station { site, .. }) => site,
        _ => String::new(),
    };
    let same_site: Vec<String> =
        connected.iter().filter(|(_, s)| **s == site).map(|(id, _)| short_station(id)).collect();
    let known = if same_site.is_empty() {
        let all: Vec<String> = connected.keys().map(|id| short_station(id)).collect();
        format!("no station of site {site:?} has; known stations: {}", name_list(&all))
    } else {
        format!("known stations of site {site:?}: {}", name_list(&same_site))
    };
    Some(format!(
        "station {station} has never connected to this broker's ledger (the batch is assigned for when it \
         does); {known}"
    ))
}

/// The serials the ledger has seen, `SITE/N: a, b` per station, for a refusal's message.
fn known_serials(stations: &[&StationSummary]) -> String {
    let per: Vec<String> = stations
        .iter()
        .filter(|s| !s.certificates.is_empty())
        .map(|s| {
            let serials: Vec<String> = s.certificates.iter().map(|c| c.serial.clone()).collect();
            format!("{}: {}", short_station(&s.identity), serials.join(", "))
        })
        .collect();
    if per.is_empty() { "none".into() } else { name_list(&per) }
}

/// Most leases `ListLeases` returns (newest first).
pub const MAX_LEASES_LISTED: i64 = 10_000;

type AuditStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecord, Status>> + Send + 'static>>;
type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::AuditBundleChunk, Status>> + Send + 'static>>;

/// A signed checkpoint as the admin API returns it.
fn checkpoint_info(cp: &flashgate_common::checkpoint::SignedCheckpoint) -> Result<pb::AuditCheckpoint, Status> {
    let bytes = cp.to_bytes().map_err(|e| Status::internal(format!("checkpoint does not encode: {e}")))?;
    Ok(pb::AuditCheckpoint {
        checkpoint: bytes.to_vec(),
        seq: i64::try_from(cp.head.seq).unwrap_or(i64::MAX),
        hash: hex::encode(cp.head.hash),
        at: cp.head.at,
        broker: cp.head.broker.clone(),
        ledger_id: hex::encode(cp.head.ledger_id),
    })
}

fn checkpoint_status(e: crate::checkpoint::CheckpointFailure) -> Status {
    use crate::checkpoint::CheckpointFailure;
    match e {
        CheckpointFailure::Ledger(e) => lst(e),
        CheckpointFailure::Hsm(e) => hsm_status(e),
        other => Status::internal(other.to_string()),
    }
}

impl Admin {
    async fn record_key(&self, info: crate::hsm::KeyInfo, actor: &str) -> Result<pb::KeyInfo, Status> {
        let rec = KeyRecord {
            key_id: hex::encode(info.key_id.as_bytes()),
            label: info.label.clone(),
            backend: "pool".into(),
            backend_ref: self.state.name().to_owned(),
        };
        // On a ledger shared by several brokers the first broker of the key ceremony recorded this
        // key id already (ImportKey with `key_id` exists for exactly that): the record stands.
        match self.state.ledger().add_key(&rec, actor).await {
            Ok(()) => {}
            Err(LedgerError::AlreadyExists { .. }) => {
                // Audit the import into this broker's pool (a security event of its own).
                let details = serde_json::json!({"broker": self.state.name(), "label": rec.label});
                self.state
                    .ledger()
                    .record_event(actor, "key.imported", format!("key/{}", rec.key_id), details)
                    .await
                    .map_err(lst)?;
            }
            Err(e) => return Err(lst(e)),
        }
        let listing = self.state.ledger().keys().await.map_err(lst)?.into_iter().find(|k| k.key.key_id == rec.key_id);
        Ok(pb::KeyInfo {
            key_id: rec.key_id,
            label: rec.label,
            backend: rec.backend,
            created_at_ms: listing.as_ref().map_or(0, |l| l.created_at),
            created_by: listing.map_or_else(|| actor.to_owned(), |l| l.created_by),
        })
    }

    /// The key must be known to the ledger and held by every pool member.
    async fn check_key(&self, key_id: &str) -> Result<KeyId, Status> {
        let id = key_id_from_hex(key_id)?;
        let known = self.state.ledger().keys().await.map_err(lst)?.iter().any(|k| k.key.key_id == key_id);
        if !known {
            return Err(Status::not_found(format!("key {key_id} is not recorded in the ledger")));
        }
        if !self.state.pool().has_key(id).await.map_err(hsm_status)? {
            return Err(Status::failed_precondition(format!(
                "key {key_id} is not held by every HSM of broker {} (see docs/key-ceremony.md)",
                self.state.name()
            )));
        }
        Ok(id)
    }

    async fn batch_with_counts(&self, id: &str) -> Result<pb::BatchInfo, Status> {
        let s = self.state.ledger().batch_status(id).await.map_err(lst)?;
        Ok(batch_info(&s.batch, Some(&s)))
    }

    /// The canonical URI of a station of this trust domain named by `uri`, or `INVALID_ARGUMENT`.
    fn station_uri(&self, uri: &str) -> Result<String, Status> {
        let id = Identity::parse_uri(uri).map_err(|e| Status::invalid_argument(format!("station {uri:?}: {e}")))?;
        if !matches!(id, Identity::Station { .. }) {
            return Err(Status::invalid_argument(format!(
                "{uri} is a {} identity, not a station (spiffe://TD/site/SITE/station/N)",
                id.role()
            )));
        }
        if id.trust_domain() != self.state.trust_domain() {
            return Err(Status::invalid_argument(format!(
                "station {uri} is not in this broker's trust domain {}",
                self.state.trust_domain()
            )));
        }
        Ok(id.to_uri())
    }

    /// Every station the ledger knows — by certificate, licence, install report, status or
    /// assignment — with its counts, live status and assignment, by identity.
    async fn station_infos(&self) -> Result<Vec<pb::StationInfo>, Status> {
        let ledger = self.state.ledger();
        let revs = ledger.revocations().await.map_err(lst)?;
        let summaries = ledger.stations().await.map_err(lst)?;
        let statuses = ledger.station_statuses().await.map_err(lst)?;
        let assignments = ledger.station_assignments().await.map_err(lst)?;
        let mut map: std::collections::BTreeMap<String, pb::StationInfo> =
            summaries.into_iter().map(|s| (s.identity.clone(), station_summary_info(s, &revs))).collect();
        let site_of = |identity: &str| match Identity::parse_uri(identity) {
            Ok(Identity::Station { site, .. }) => site,
            _ => String::new(),
        };
        let now = now_ms();
        for st in statuses {
            let info = map.entry(st.identity.clone()).or_insert_with(|| pb::StationInfo {
                identity: st.identity.clone(),
                site: st.site.clone(),
                ..Default::default()
            });
            info.online = st.online(now);
            info.broker = if info.online { st.broker.clone() } else { String::new() };
            info.probes = st.probes.iter().map(probe_info).collect();
            info.current_batch = st.current_batch.clone();
            info.devices_ok = st.devices_ok;
            info.devices_failed = st.devices_failed;
        }
        for a in assignments {
            let info = map.entry(a.identity.clone()).or_insert_with(|| pb::StationInfo {
                site: site_of(&a.identity),
                identity: a.identity.clone(),
                ..Default::default()
            });
            info.assigned_batch = a.batch_id;
            info.paused = a.paused;
        }
        for live in self.state.stations().attached() {
            if let Some(info) = map.get_mut(&live.status.identity) {
                info.activity = live.probes.iter().map(|(id, a)| probe_activity(id, a)).collect();
            }
        }
        Ok(map.into_values().collect())
    }

    /// One station as [`Admin::station_infos`] lists it.
    async fn station_info(&self, identity: &str) -> Result<pb::StationInfo, Status> {
        self.station_infos()
            .await?
            .into_iter()
            .find(|s| s.identity == identity)
            .ok_or_else(|| Status::not_found(format!("station {identity} is not known to the ledger")))
    }
}

macro_rules! rpc {
    ($name:literal, $self:ident, $req:ident, |$caller:ident, $body:ident| $block:block) => {{
        let started = Instant::now();
        let span = tracing::info_span!("rpc", rpc = $name, admin = tracing::field::Empty);
        let result = async {
            let $caller = auth::admin(&$self.state, &$req)?;
            tracing::Span::current().record("admin", $caller.uri.as_str());
            let $body = $req.into_inner();
            $block
        }
        .instrument(span)
        .await;
        observe($name, started, &result);
        result.map(Response::new)
    }};
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn generate_key(&self, req: Request<pb::GenerateKeyRequest>) -> Result<Response<pb::KeyInfo>, Status> {
        rpc!("GenerateKey", self, req, |caller, body| {
            let info = self.state.pool().generate_key(&body.label).await.map_err(hsm_status)?;
            tracing::info!(key_id = %info.key_id, label = %info.label, "firmware key generated in the HSM");
            self.record_key(info, &caller.uri).await
        })
    }

    async fn import_key(&self, req: Request<pb::ImportKeyRequest>) -> Result<Response<pb::KeyInfo>, Status> {
        rpc!("ImportKey", self, req, |caller, body| {
            let bytes = Zeroizing::new(body.key);
            let key: [u8; 16] = bytes.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!("a firmware key is 16 bytes (key.bin); got {} bytes", bytes.len()))
            })?;
            let key = FirmwareKey::new(key);
            let info = if body.key_id.is_empty() {
                self.state.pool().import_key(&body.label, key).await
            } else {
                self.state.pool().import_key_with_id(key_id_from_hex(&body.key_id)?, &body.label, key).await
            }
            .map_err(hsm_status)?;
            tracing::info!(key_id = %info.key_id, label = %info.label, "firmware key imported into the HSM pool");
            self.record_key(info, &caller.uri).await
        })
    }

    async fn list_keys(&self, req: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        rpc!("ListKeys", self, req, |_caller, _body| {
            let keys = self.state.ledger().keys().await.map_err(lst)?;
            Ok(pb::ListKeysResponse {
                keys: keys
                    .into_iter()
                    .map(|k| pb::KeyInfo {
                        key_id: k.key.key_id,
                        label: k.key.label,
                        backend: k.key.backend,
                        created_at_ms: k.created_at,
                        created_by: k.created_by,
                    })
                    .collect(),
            })
        })
    }

    async fn upload_image(&self, req: Request<pb::UploadImageRequest>) -> Result<Response<pb::ImageSummary>, Status> {
        rpc!("UploadImage", self, req, |caller, body| {
            let (family, product_id) = family_and_product(&body.family, &body.product_id)?;
            let nonce: [u8; 12] = body.nonce.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!("an image nonce is 12 bytes (nonce.bin); got {}", body.nonce.len()))
            })?;
            self.check_key(&body.key_id).await?;
            // Check the structure against the family's memory map (the tags need the key: the device checks them).
            let opts = ReaderOptions { file_len: Some(body.sfi.len() as u64), memory_map: Some(family.profile()) };
            let mut reader = ImageReader::new(std::io::Cursor::new(body.sfi.as_slice()), opts)
                .map_err(|e| Status::invalid_argument(format!("not a valid .sfi image for {family}: {e}")))?;
            let mut areas = 0u32;
            while reader
                .next_area()
                .map_err(|e| Status::invalid_argument(format!("not a valid .sfi image for {family}: {e}")))?
                .is_some()
            {
                areas += 1;
            }
            let img = NewImage {
                key_id: body.key_id.clone(),
                nonce,
                family: family.name().to_owned(),
                product_id,
                area_count: areas,
                expected_crc: None,
            };
            let meta = self.state.ledger().put_image(&img, &body.sfi, &caller.uri).await.map_err(lst)?;
            tracing::info!(image = %meta.sha256, size = meta.size, "image uploaded");
            Ok(image_summary(&meta))
        })
    }

    async fn pack_image(&self, req: Request<pb::PackImageRequest>) -> Result<Response<pb::ImageSummary>, Status> {
        rpc!("PackImage", self, req, |caller, body| {
            let (family, product_id) = family_and_product(&body.family, &body.product_id)?;
            let key_id = self.check_key(&body.key_id).await?;
            if body.areas.is_empty() {
                return Err(Status::invalid_argument("no areas to pack"));
            }
            let mut areas = Vec::with_capacity(body.areas.len());
            for (i, a) in body.areas.into_iter().enumerate() {
                let t = match a.kind.as_bytes() {
                    [b] => AreaType::from_byte(*b),
                    _ => None,
                }
                .ok_or_else(|| Status::invalid_argument(format!("area {}: unknown kind {:?}", i + 1, a.kind)))?;
                areas.push(PlainArea { area_type: t, address: a.address, data: a.data });
            }
            let crc = expected_flash_crc(family.profile(), &areas);
            let area_count = areas.len() as u32;
            let nonce = fresh_nonce();
            let sfi = self.state.pool().encrypt_image(key_id, nonce, areas).await.map_err(hsm_status)?;
            let img = NewImage {
                key_id: body.key_id.clone(),
                nonce: nonce.0,
                family: family.name().to_owned(),
                product_id,
                area_count,
                expected_crc: Some(crc),
            };
            let meta = self.state.ledger().put_image(&img, &sfi, &caller.uri).await.map_err(lst)?;
            tracing::info!(image = %meta.sha256, size = meta.size, "image packed inside the HSM");
            Ok(image_summary(&meta))
        })
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        rpc!("ListImages", self, req, |_caller, _body| {
            let images = self.state.ledger().images().await.map_err(lst)?;
            Ok(pb::ListImagesResponse { images: images.iter().map(image_summary).collect() })
        })
    }

    async fn create_batch(&self, req: Request<pb::CreateBatchRequest>) -> Result<Response<pb::BatchInfo>, Status> {
        rpc!("CreateBatch", self, req, |caller, body| {
            if body.id.is_empty() || body.id.len() > 64 || body.id.chars().any(|c| c.is_control() || c == '/') {
                return Err(Status::invalid_argument(format!(
                    "batch id {:?} must be 1 to 64 characters long, without '/' or control characters",
                    body.id
                )));
            }
            if body.allowed_sites.is_empty() {
                return Err(Status::invalid_argument("a batch needs at least one allowed site (or \"*\")"));
            }
            let now = now_ms();
            if let Some(na) = body.not_after_ms
                && na <= now
            {
                return Err(refusal(
                    Code::InvalidArgument,
                    "WINDOW_OVER",
                    format!(
                        "batch {}: its validity window ended at {} (not_after {na}), before now ({}); it could \
                         never issue a licence",
                        body.id,
                        ms_text(na),
                        ms_text(now)
                    ),
                    [("batch_id", body.id.clone()), ("not_after_ms", na.to_string())],
                ));
            }
            let ledger = self.state.ledger();
            let connected = connected_stations(
                &ledger.stations().await.map_err(lst)?,
                &ledger.station_statuses().await.map_err(lst)?,
            );
            let warnings = site_warnings(&body.allowed_sites, &connected);
            let b = self
                .state
                .ledger()
                .create_batch(
                    &NewBatch {
                        id: body.id,
                        product_id: body.product_id,
                        image_sha256: body.image_sha256,
                        quota: body.quota,
                        allowed_sites: body.allowed_sites,
                        not_before: body.not_before_ms,
                        not_after: body.not_after_ms,
                    },
                    &caller.uri,
                )
                .await
                .map_err(lst)?;
            tracing::info!(batch = %b.id, quota = b.quota, "batch created");
            for w in &warnings {
                tracing::warn!(batch = %b.id, "{w}");
            }
            Ok(pb::BatchInfo { warnings, ..batch_info(&b, None) })
        })
    }

    async fn set_batch_state(&self, req: Request<pb::SetBatchStateRequest>) -> Result<Response<pb::BatchInfo>, Status> {
        rpc!("SetBatchState", self, req, |caller, body| {
            let state = match pb::BatchState::try_from(body.state) {
                Ok(pb::BatchState::Open) => BatchState::Open,
                Ok(pb::BatchState::Paused) => BatchState::Paused,
                Ok(pb::BatchState::Closed) => BatchState::Closed,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "batch state {} is not open/paused/closed",
                        body.state
                    )));
                }
            };
            self.state.ledger().set_batch_state(&body.id, state, &caller.uri).await.map_err(lst)?;
            tracing::info!(batch = %body.id, state = state.as_str(), "batch state changed");
            self.batch_with_counts(&body.id).await
        })
    }

    async fn list_batches(
        &self,
        req: Request<pb::ListBatchesRequest>,
    ) -> Result<Response<pb::ListBatchesResponse>, Status> {
        rpc!("ListBatches", self, req, |_caller, _body| {
            let mut out = Vec::new();
            for b in self.state.ledger().batches().await.map_err(lst)? {
                out.push(self.batch_with_counts(&b.id).await?);
            }
            Ok(pb::ListBatchesResponse { batches: out })
        })
    }

    async fn batch_status(&self, req: Request<pb::BatchStatusRequest>) -> Result<Response<pb::BatchInfo>, Status> {
        rpc!("BatchStatus", self, req, |_caller, body| { self.batch_with_counts(&body.id).await })
    }

    async fn device_history(
        &self,
        req: Request<pb::DeviceHistoryRequest>,
    ) -> Result<Response<pb::DeviceHistoryResponse>, Status> {
        rpc!("DeviceHistory", self, req, |_caller, body| {
            validate::device_id("device_id", &body.device_id)?;
            let h = self.state.ledger().device_history(&body.device_id).await.map_err(lst)?;
            let (records_json, vendor_keys) = traceability::device_records(&self.state, &body.device_id).await?;
            Ok(pb::DeviceHistoryResponse {
                records_json,
                vendor_keys,
                device_id: body.device_id,
                licences: h
                    .licences
                    .into_iter()
                    .map(|l| pb::DeviceLicence {
                        batch_id: l.batch_id,
                        station: l.station,
                        site: l.site,
                        issued_at_ms: l.issued_at,
                        licence: l.licence,
                    })
                    .collect(),
                installs: h
                    .installs
                    .into_iter()
                    .map(|i| pb::DeviceInstall {
                        batch_id: i.batch_id,
                        station: i.station,
                        result_id: i.result_id,
                        status_code: u32::from(i.status_code),
                        message: i.message,
                        flash_crc: i.flash_crc,
                        attempt: i.attempt,
                        reported_at_ms: i.reported_at,
                    })
                    .collect(),
            })
        })
    }

    async fn list_stations(
        &self,
        req: Request<pb::ListStationsRequest>,
    ) -> Result<Response<pb::ListStationsResponse>, Status> {
        rpc!("ListStations", self, req, |_caller, _body| {
            Ok(pb::ListStationsResponse { stations: self.station_infos().await? })
        })
    }

    async fn assign_station(
        &self,
        req: Request<pb::AssignStationRequest>,
    ) -> Result<Response<pb::StationInfo>, Status> {
        rpc!("AssignStation", self, req, |caller, body| {
            let station = self.station_uri(&body.station)?;
            if body.batch_id.is_empty() {
                return Err(Status::invalid_argument(format!("no batch given to assign to {station}")));
            }
            let ledger = self.state.ledger();
            let connected = connected_stations(
                &ledger.stations().await.map_err(lst)?,
                &ledger.station_statuses().await.map_err(lst)?,
            );
            let warning = station_warning(&station, &connected);
            let a = self
                .state
                .ledger()
                .assign_station(&station, &body.batch_id, &caller.uri)
                .await
                .map_err(|e| ledger_status(e, &body.batch_id, ""))?;
            self.state.stations().publish(a);
            tracing::info!(station = %station, batch = %body.batch_id, "batch assigned to station");
            let mut info = self.station_info(&station).await?;
            if let Some(w) = warning {
                tracing::warn!(station = %station, "{w}");
                info.warnings.push(w);
            }
            Ok(info)
        })
    }

    async fn pause_station(&self, req: Request<pb::PauseStationRequest>) -> Result<Response<pb::StationInfo>, Status> {
        rpc!("PauseStation", self, req, |caller, body| {
            let station = self.station_uri(&body.station)?;
            let a = self.state.ledger().pause_station(&station, &body.reason, &caller.uri).await.map_err(lst)?;
            self.state.stations().publish(a);
            tracing::info!(station = %station, reason = %body.reason, "station paused");
            self.station_info(&station).await
        })
    }

    async fn revoke_station(
        &self,
        req: Request<pb::RevokeStationRequest>,
    ) -> Result<Response<pb::RevokeStationResponse>, Status> {
        rpc!("RevokeStation", self, req, |caller, body| {
            if body.reason.trim().is_empty() {
                return Err(Status::invalid_argument("a revocation needs a reason"));
            }
            let stations = self.state.ledger().stations().await.map_err(lst)?;
            let mut warnings = Vec::new();
            // (serial, identity) pairs to revoke.
            let targets: Vec<(String, String)> = match (body.serial.is_empty(), body.identity.is_empty()) {
                (false, only_serial) => {
                    let serial = normalize_serial(&body.serial);
                    if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(Status::invalid_argument(format!("serial {:?} is not hex", body.serial)));
                    }
                    let named = if only_serial { None } else { Some(self.station_uri(&body.identity)?) };
                    let owner = stations.iter().find(|s| s.certificates.iter().any(|c| c.serial == serial));
                    match (owner, &named) {
                        (Some(o), Some(n)) if o.identity != *n => {
                            return Err(Status::invalid_argument(format!(
                                "certificate serial {serial} belongs to {}, not to {n}",
                                o.identity
                            )));
                        }
                        (Some(o), _) => vec![(serial, o.identity.clone())],
                        (None, _) if body.force => {
                            warnings.push(format!(
                                "serial {serial} has not been seen by this broker's ledger: revoked in advance{}",
                                named.as_ref().map(|n| format!(" for {n}")).unwrap_or_default()
                            ));
                            vec![(serial, named.clone().unwrap_or_default())]
                        }
                        (None, Some(n)) => {
                            let of: Vec<&StationSummary> = stations.iter().filter(|s| s.identity == *n).collect();
                            return Err(refusal(
                                Code::FailedPrecondition,
                                "UNKNOWN_SERIAL",
                                format!(
                                    "no certificate with serial {serial} has been seen for {n}; its known serials: \
                                     {}; nothing revoked (force, `--force` on the command line, revokes a \
                                     certificate before it is first used)",
                                    known_serials(&of)
                                ),
                                [("serial", serial.clone()), ("identity", n.clone())],
                            ));
                        }
                        (None, None) => {
                            let all: Vec<&StationSummary> = stations.iter().collect();
                            return Err(refusal(
                                Code::FailedPrecondition,
                                "UNKNOWN_SERIAL",
                                format!(
                                    "no certificate with serial {serial} has been seen by this broker's ledger; \
                                     known serials: {}; nothing revoked (force, `--force` on the command line, \
                                     revokes a certificate before it is first used)",
                                    known_serials(&all)
                                ),
                                [("serial", serial.clone())],
                            ));
                        }
                    }
                }
                (true, false) => {
                    let s = stations.iter().find(|s| s.identity == body.identity).ok_or_else(|| {
                        Status::not_found(format!(
                            "no certificate of {} has been seen; revoke by --serial instead",
                            body.identity
                        ))
                    })?;
                    s.certificates.iter().map(|c| (c.serial.clone(), s.identity.clone())).collect()
                }
                (true, true) => return Err(Status::invalid_argument("give a serial, an identity, or both")),
            };
            let revoked = self.state.ledger().revocations().await.map_err(lst)?;
            let mut serials = Vec::new();
            for (serial, identity) in targets {
                if let Some(r) = revoked.iter().find(|r| normalize_serial(&r.serial) == serial) {
                    warnings.push(format!(
                        "serial {serial} was already revoked at {} by {} ({})",
                        ms_text(r.revoked_at),
                        r.revoked_by,
                        r.reason
                    ));
                }
                let r = self
                    .state
                    .ledger()
                    .revoke_station(&serial, &identity, &body.reason, &caller.uri)
                    .await
                    .map_err(lst)?;
                self.state.revoke_now(&r.serial);
                tracing::warn!(serial = %r.serial, identity = %r.identity, reason = %r.reason, "station certificate revoked");
                serials.push(r.serial);
            }
            Ok(pb::RevokeStationResponse { serials, warnings })
        })
    }

    type ExportAuditStream = AuditStream;

    async fn export_audit(
        &self,
        req: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        rpc!("ExportAudit", self, req, |_caller, body| {
            let (tx, rx) = mpsc::channel(64);
            let ledger = self.state.ledger().clone();
            tokio::spawn(async move {
                let mut after = body.after_seq;
                loop {
                    let page = match ledger.audit_page(after, 500).await {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(lst(e))).await;
                            return;
                        }
                    };
                    let Some(last) = page.last() else { return };
                    after = last.seq;
                    for r in page {
                        let rec = pb::AuditRecord {
                            seq: r.seq,
                            at_ms: r.at,
                            actor: r.actor,
                            event: r.event,
                            subject: r.subject,
                            details_json: r.details,
                            prev_hash: hex::encode(&r.prev_hash),
                            hash: hex::encode(&r.hash),
                        };
                        if tx.send(Ok(rec)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(Box::pin(ReceiverStream::new(rx)) as AuditStream)
        })
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        rpc!("VerifyAudit", self, req, |_caller, _body| {
            match self.state.ledger().verify_audit().await {
                Ok(s) => Ok(pb::VerifyAuditResponse {
                    ok: true,
                    records: s.records,
                    head_seq: s.head_seq,
                    head_hash: s.head_hash,
                    broken_seq: 0,
                    fault: String::new(),
                    ledger_id: s.ledger_id,
                    genesis: s.genesis.as_str().to_owned(),
                }),
                Err(LedgerError::AuditBroken { seq, why }) => {
                    tracing::error!(seq, fault = %why, "audit chain verification failed");
                    Ok(pb::VerifyAuditResponse {
                        ok: false,
                        records: 0,
                        head_seq: 0,
                        head_hash: String::new(),
                        broken_seq: seq,
                        fault: why.to_string(),
                        ledger_id: hex::encode(self.state.ledger().ledger_id()),
                        genesis: self.state.ledger().genesis().as_str().to_owned(),
                    })
                }
                Err(e) => Err(lst(e)),
            }
        })
    }

    async fn checkpoint_audit(
        &self,
        req: Request<pb::CheckpointAuditRequest>,
    ) -> Result<Response<pb::AuditCheckpoint>, Status> {
        rpc!("CheckpointAudit", self, req, |caller, _body| {
            let cp = crate::checkpoint::sign_now(&self.state, "on demand").await.map_err(checkpoint_status)?;
            tracing::info!(admin = %caller.uri, seq = cp.head.seq, "audit checkpoint signed on demand");
            checkpoint_info(&cp)
        })
    }

    type ExportAuditBundleStream = BundleStream;

    async fn export_audit_bundle(
        &self,
        req: Request<pb::ExportAuditBundleRequest>,
    ) -> Result<Response<Self::ExportAuditBundleStream>, Status> {
        rpc!("ExportAuditBundle", self, req, |_caller, _body| {
            // The export ends covered by a signature: a checkpoint of the head as it is now.
            crate::checkpoint::sign_now(&self.state, "export").await.map_err(checkpoint_status)?;
            let (tx, rx) = mpsc::channel::<Result<pb::AuditBundleChunk, Status>>(16);
            let (lines_tx, mut lines) = mpsc::channel::<String>(256);
            let state = self.state.clone();
            let name = self.state.name().to_owned();
            let producer = tokio::spawn(async move { state.ledger().export_bundle(&name, &lines_tx).await });
            tokio::spawn(async move {
                let wrap = |data| pb::AuditBundleChunk { data };
                let Some(rest) = traceability::forward_lines(&mut lines, &tx, wrap).await else { return };
                // The producer has finished (its sender is dropped): send the rest, or its error.
                match traceability::joined(producer, "audit export").await {
                    Ok(end) => {
                        if !rest.is_empty() {
                            let _ = tx.send(Ok(wrap(rest))).await;
                        }
                        tracing::info!(
                            records = end.records,
                            checkpoints = end.checkpoints,
                            licences = end.licences,
                            "audit export streamed"
                        );
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                    }
                }
            });
            Ok(Box::pin(ReceiverStream::new(rx)) as BundleStream)
        })
    }

    type ExportDevicesStream = ChunkStream<pb::DevicesChunk>;

    async fn export_devices(
        &self,
        req: Request<pb::ExportDevicesRequest>,
    ) -> Result<Response<Self::ExportDevicesStream>, Status> {
        rpc!("ExportDevices", self, req, |_caller, body| {
            validate::batch_id("batch_id", &body.batch_id)?;
            // The batch must exist before the stream starts (one row; its counts are not needed).
            self.state.ledger().batch(&body.batch_id).await.map_err(lst)?;
            Ok(traceability::export_devices(&self.state, &body.batch_id))
        })
    }

    async fn batch_report(
        &self,
        req: Request<pb::BatchReportRequest>,
    ) -> Result<Response<pb::BatchReportResponse>, Status> {
        rpc!("BatchReport", self, req, |_caller, body| {
            validate::batch_id("batch_id", &body.batch_id)?;
            traceability::batch_report(&self.state, &body.batch_id).await
        })
    }

    type BatchCertificateStream = ChunkStream<pb::CertificateChunk>;

    async fn batch_certificate(
        &self,
        req: Request<pb::BatchCertificateRequest>,
    ) -> Result<Response<Self::BatchCertificateStream>, Status> {
        rpc!("BatchCertificate", self, req, |caller, body| {
            validate::batch_id("batch_id", &body.batch_id)?;
            // The batch must exist before the stream starts (one row; its counts are not needed).
            self.state.ledger().batch(&body.batch_id).await.map_err(lst)?;
            tracing::info!(admin = %caller.uri, batch = %body.batch_id, "certificate of conformance requested");
            Ok(traceability::certificate(&self.state, &body.batch_id))
        })
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        rpc!("ListLeases", self, req, |_caller, body| {
            if !body.batch_id.is_empty() {
                validate::batch_id("batch_id", &body.batch_id)?;
            }
            let batch = (!body.batch_id.is_empty()).then_some(body.batch_id.as_str());
            let leases = self.state.ledger().leases(batch, MAX_LEASES_LISTED).await.map_err(lst)?;
            Ok(pb::ListLeasesResponse { leases: leases.into_iter().map(super::site::lease_info).collect() })
        })
    }

    async fn drain_site(&self, req: Request<pb::DrainSiteRequest>) -> Result<Response<pb::DrainSiteResponse>, Status> {
        rpc!("DrainSite", self, req, |caller, body| {
            validate::batch_id("batch_id", &body.batch_id)?;
            let Some(link) = self.state.upstream() else {
                return Err(Status::failed_precondition(
                    "this broker is not a site broker (it has no [upstream]): only a site broker drains",
                ));
            };
            let b = self.state.ledger().set_drained(&body.batch_id, !body.resume, &caller.uri).await.map_err(lst)?;
            link.nudge();
            tracing::info!(batch = %b.id, drained = b.drained_at.is_some(), units_left = b.quota - b.issued,
                "site broker {} for the batch", if body.resume { "resumed" } else { "drained" });
            Ok(pb::DrainSiteResponse {
                batch_id: b.id.clone(),
                drained: b.drained_at.is_some(),
                units_left: (b.quota - b.issued).max(0),
            })
        })
    }

    async fn list_sites(&self, req: Request<pb::ListSitesRequest>) -> Result<Response<pb::ListSitesResponse>, Status> {
        rpc!("ListSites", self, req, |_caller, _body| {
            let ledger = self.state.ledger();
            let streams = ledger.site_streams().await.map_err(lst)?;
            let leases = ledger.leases(None, MAX_LEASES_LISTED).await.map_err(lst)?;
            let now = crate::ledger::now_ms();
            let sites = streams
                .into_iter()
                .map(|s| pb::SiteInfo {
                    outstanding_units: leases
                        .iter()
                        .filter(|l| l.holder == s.holder && l.state == crate::ledger::leases::LeaseState::Active)
                        .map(crate::ledger::leases::Lease::outstanding)
                        .sum(),
                    lag_records: s.lag_records(),
                    lag_ms: s.lag_ms(now),
                    site: s.site,
                    holder: s.holder,
                    site_ledger_id: s.site_ledger_id,
                    acked_seq: s.acked_seq,
                    site_head_seq: s.site_head_seq,
                    last_record_at_ms: s.last_record_at,
                    licences: s.licences,
                    conflicts: s.conflicts,
                    updated_at_ms: s.updated_at,
                })
                .collect();
            Ok(pb::ListSitesResponse { sites })
        })
    }

    async fn hsm_status(&self, req: Request<pb::HsmStatusRequest>) -> Result<Response<pb::HsmStatusResponse>, Status> {
        rpc!("HsmStatus", self, req, |_caller, _body| {
            let members = self
                .state
                .pool()
                .status()
                .into_iter()
                .map(|m| {
                    let spki = m.audit_key.and_then(|k| k.to_public_key_der().ok()).map(|d| d.as_bytes().to_vec());
                    (m, spki)
                })
                .map(|(m, spki)| pb::HsmMember {
                    audit_key_fingerprint: spki
                        .as_ref()
                        .map(|d| hex::encode(sha2::Sha256::digest(d)))
                        .unwrap_or_default(),
                    audit_key_spki: spki.unwrap_or_default(),
                    name: m.name,
                    healthy: m.healthy,
                    in_flight: u32::try_from(m.in_flight).unwrap_or(u32::MAX),
                    capacity: u32::try_from(m.capacity).unwrap_or(u32::MAX),
                    last_error: m.last_error.unwrap_or_default(),
                    consecutive_failures: m.consecutive_failures,
                    requests: m.requests,
                    device_errors: m.device_errors,
                    latency_mean_ms: m.latency_mean.as_secs_f64() * 1000.0,
                    latency_max_ms: m.latency_max.as_secs_f64() * 1000.0,
                })
                .collect();
            Ok(pb::HsmStatusResponse { broker: self.state.name().to_owned(), members })
        })
    }
}
