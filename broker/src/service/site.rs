//! `SiteService`: what a central broker offers its site brokers (issue 14) — quota leases granted against
//! the batch quota (`crate::ledger::leases`) and units handed back; the batches, leases and revocations a
//! site mirrors (`SyncSite`); images of its batches (`GetSiteImage`); device claims and the replication
//! of its ledger (`ClaimDevice`, `Replicate`, applied by `crate::ledger::replica`). Callers are broker
//! identities named in `[site_brokers]`, each bound to one site; a lease is always for the caller's site,
//! and only its holder returns its units. Owns the site-facing limits ([`MAX_SYNC_BATCHES`],
//! [`MAX_SITE_DETAILS`], …), checked on every field before any work, and the replication lag gauges.

use std::time::{Duration, Instant};

use flashgate_proto::v1 as pb;
use flashgate_proto::v1::site_service_server::SiteService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use tokio::sync::mpsc;

use super::image::STREAM_CHUNK;
use super::licence::observe;
use super::status::{ledger_status, refused};
use super::{BrokerState, auth, metric, validate};
use crate::ledger::audit::AuditRecord;
use crate::ledger::leases::{Lease, LeaseRequest};
use crate::ledger::replica::{
    MAX_REPLICATE_RECORDS, SiteInstall, SiteItem, SiteLicence, SiteRecord, SiteRefusal, SiteStream,
};
use crate::ledger::{ANY_SITE, BatchState, IMAGE_CHUNK, LedgerError, RefusalReason, now_ms};

/// Length of a lease id (hex digits).
pub const LEASE_ID_LEN: usize = 32;
/// Most batches one `SyncSite` names.
pub const MAX_SYNC_BATCHES: usize = 64;
/// Length of a site ledger id (hex digits).
pub const SITE_LEDGER_ID_LEN: usize = 32;
/// Length of a replicated record's `prev_hash` and `hash` (hex digits of SHA-256).
pub const RECORD_HASH_HEX_LEN: usize = 64;
/// Longest actor, event, subject or refusal reason of a replicated record, bytes.
pub const MAX_SITE_AUDIT_FIELD: usize = 256;
/// Longest details JSON of a replicated record, bytes.
pub const MAX_SITE_DETAILS: usize = 4096;
/// Longest replicated licence, bytes (a profile-v1 licence is 132).
pub const MAX_SITE_LICENCE: usize = 1024;
/// Longest station identity or site name in a replicated row, bytes.
pub const MAX_SITE_IDENTITY: usize = 256;
/// Longest stage timings JSON of a replicated install report, bytes.
pub const MAX_SITE_TIMINGS_JSON: usize = 4096;

/// A lease id: [`LEASE_ID_LEN`] hex digits.
fn lease_id(id: &str) -> Result<(), Status> {
    if id.len() != LEASE_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(validate::invalid("lease_id", format!("must be {LEASE_ID_LEN} hex digits")));
    }
    Ok(())
}

/// The service.
#[derive(Debug, Clone)]
pub struct Sites {
    state: BrokerState,
}

impl Sites {
    /// The service over `state`.
    pub fn new(state: BrokerState) -> Self {
        Self { state }
    }
}

/// A lease as the API shows it.
pub fn lease_info(l: Lease) -> pb::LeaseInfo {
    pb::LeaseInfo {
        outstanding: l.outstanding(),
        id: l.id,
        batch_id: l.batch_id,
        site: l.site,
        holder: l.holder,
        granted: l.granted,
        used: l.used,
        returned: l.returned,
        state: l.state.as_str().into(),
        granted_at_ms: l.granted_at,
        expires_at_ms: l.expires_at,
        settled_at_ms: l.settled_at,
    }
}

macro_rules! site_rpc {
    ($name:literal, $self:ident, $req:ident, |$caller:ident, $body:ident| $block:block) => {{
        let started = Instant::now();
        let span = tracing::info_span!("rpc", rpc = $name, site_broker = tracing::field::Empty);
        let result = async {
            let $caller = auth::site_broker(&$self.state, &$req)?;
            tracing::Span::current().record("site_broker", $caller.uri.as_str());
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
impl SiteService for Sites {
    async fn acquire_lease(&self, req: Request<pb::AcquireLeaseRequest>) -> Result<Response<pb::LeaseGrant>, Status> {
        site_rpc!("AcquireLease", self, req, |caller, body| {
            validate::batch_id("batch_id", &body.batch_id)?;
            let lease = self
                .state
                .ledger()
                .grant_lease(
                    &LeaseRequest {
                        batch_id: body.batch_id.clone(),
                        site: caller.site.clone(),
                        holder: caller.uri.clone(),
                        units: body.units,
                        ttl: Duration::from_millis(body.ttl_ms),
                    },
                    &caller.uri,
                )
                .await
                .map_err(|e| ledger_status(e, &body.batch_id, ""))?;
            tracing::info!(lease = %lease.id, batch = %lease.batch_id, site = %lease.site, granted = lease.granted,
                asked = body.units, "quota lease granted");
            let s = self
                .state
                .ledger()
                .batch_status(&body.batch_id)
                .await
                .map_err(|e| ledger_status(e, &body.batch_id, ""))?;
            Ok(pb::LeaseGrant {
                lease: Some(lease_info(lease)),
                batch: Some(super::admin::batch_info(&s.batch, Some(&s))),
            })
        })
    }

    async fn renew_lease(&self, req: Request<pb::RenewLeaseRequest>) -> Result<Response<pb::LeaseInfo>, Status> {
        site_rpc!("RenewLease", self, req, |caller, body| {
            lease_id(&body.lease_id)?;
            let lease = self
                .state
                .ledger()
                .renew_lease(&body.lease_id, &caller.uri, Duration::from_millis(body.ttl_ms), &caller.uri)
                .await
                .map_err(|e| ledger_status(e, "", ""))?;
            tracing::debug!(lease = %lease.id, expires_at = lease.expires_at, "lease renewed");
            Ok(lease_info(lease))
        })
    }

    async fn return_lease(&self, req: Request<pb::ReturnLeaseRequest>) -> Result<Response<pb::LeaseInfo>, Status> {
        site_rpc!("ReturnLease", self, req, |caller, body| {
            lease_id(&body.lease_id)?;
            let lease = self
                .state
                .ledger()
                .return_lease(&body.lease_id, &caller.uri, body.units, &caller.uri)
                .await
                .map_err(|e| ledger_status(e, "", ""))?;
            tracing::info!(lease = %lease.id, units = body.units, outstanding = lease.outstanding(), "lease units returned");
            Ok(lease_info(lease))
        })
    }

    async fn sync_site(&self, req: Request<pb::SyncSiteRequest>) -> Result<Response<pb::SyncSiteResponse>, Status> {
        site_rpc!("SyncSite", self, req, |caller, body| {
            if body.batch_ids.is_empty() || body.batch_ids.len() > MAX_SYNC_BATCHES {
                return Err(validate::invalid(
                    "batch_ids",
                    format!("lists {} batches, must be 1 ..= {MAX_SYNC_BATCHES}", body.batch_ids.len()),
                ));
            }
            for (i, id) in body.batch_ids.iter().enumerate() {
                validate::batch_id(&format!("batch_ids[{i}]"), id)?;
            }
            site_ledger_id("site_ledger_id", &body.site_ledger_id, true)?;
            head_seq(body.site_head_seq)?;
            let ledger = self.state.ledger();
            let mut batches = Vec::with_capacity(body.batch_ids.len());
            for id in &body.batch_ids {
                match ledger.batch_status(id).await {
                    Ok(s) => batches.push(super::admin::batch_info(&s.batch, Some(&s))),
                    Err(LedgerError::NotFound { .. }) => {}
                    Err(e) => return Err(ledger_status(e, id, "")),
                }
            }
            let leases = ledger.leases_of(&caller.uri, &body.batch_ids).await.map_err(|e| ledger_status(e, "", ""))?;
            let revoked = ledger
                .revocations()
                .await
                .map_err(|e| ledger_status(e, "", ""))?
                .into_iter()
                .map(|r| pb::RevokedSerial { serial: r.serial, identity: r.identity, reason: r.reason })
                .collect();
            if !body.site_ledger_id.is_empty() {
                ledger
                    .note_site_head(&caller.uri, &caller.site, &body.site_ledger_id, body.site_head_seq)
                    .await
                    .map_err(|e| ledger_status(e, "", ""))?;
            }
            let streams = ledger.site_streams().await.map_err(|e| ledger_status(e, "", ""))?;
            let now = now_ms();
            observe_lag(&streams, &caller.uri, now);
            // The stream the caller named, else its most recently updated one.
            let mine = streams
                .iter()
                .find(|s| s.holder == caller.uri && s.site_ledger_id == body.site_ledger_id)
                .or_else(|| streams.iter().find(|s| s.holder == caller.uri));
            Ok(pb::SyncSiteResponse {
                batches,
                leases: leases.into_iter().map(lease_info).collect(),
                revoked,
                replicated_seq: mine.map_or(0, |s| s.acked_seq),
                site_ledger_id: mine.map(|s| s.site_ledger_id.clone()).unwrap_or_default(),
                now_ms: now,
            })
        })
    }

    type GetSiteImageStream = tokio_stream::wrappers::ReceiverStream<Result<pb::SiteImageChunk, Status>>;

    async fn get_site_image(
        &self,
        req: Request<pb::GetSiteImageRequest>,
    ) -> Result<Response<Self::GetSiteImageStream>, Status> {
        site_rpc!("GetSiteImage", self, req, |caller, body| {
            validate::image_sha256("image_sha256", &body.image_sha256)?;
            let st = self.state.clone();
            let meta = st.image_meta(&body.image_sha256).await.map_err(|e| ledger_status(e, "", ""))?;
            let batches = st.ledger().batches().await.map_err(|e| ledger_status(e, "", ""))?;
            let allowed = batches.iter().any(|b| {
                b.image_sha256 == meta.sha256
                    && b.state != BatchState::Closed
                    && b.allowed_sites.iter().any(|s| s == ANY_SITE || *s == caller.site)
            });
            if !allowed {
                return Err(refused(
                    RefusalReason::SiteNotAllowed,
                    format!("image {} is in no open or paused batch of site {:?}", meta.sha256, caller.site),
                    "",
                    "",
                ));
            }
            let size = u64::try_from(meta.size).unwrap_or(0);
            let info = pb::SiteImageInfo {
                image_sha256: meta.sha256.clone(),
                size,
                key_id: meta.key_id.clone(),
                nonce: hex::encode(meta.nonce),
                family: meta.family.clone(),
                product_id: meta.product_id.clone(),
                area_count: meta.area_count,
                expected_crc: meta.expected_crc,
            };
            let (tx, rx) = mpsc::channel(4);
            let span = tracing::info_span!("site_image_stream", site_broker = %caller.uri, image = %meta.sha256);
            tokio::spawn(
                async move {
                    let first = pb::SiteImageChunk { item: Some(pb::site_image_chunk::Item::Info(info)) };
                    if tx.send(Ok(first)).await.is_err() {
                        return;
                    }
                    let chunks = size.div_ceil(IMAGE_CHUNK as u64);
                    for idx in 0..chunks {
                        let chunk = match st.ledger().image_chunk(&meta.sha256, idx as i64).await {
                            Ok(c) => c,
                            Err(e) => {
                                let _ = tx.send(Err(ledger_status(e, "", ""))).await;
                                return;
                            }
                        };
                        for piece in chunk.chunks(STREAM_CHUNK) {
                            let msg =
                                pb::SiteImageChunk { item: Some(pb::site_image_chunk::Item::Chunk(piece.to_vec())) };
                            if tx.send(Ok(msg)).await.is_err() {
                                tracing::debug!(idx, "site broker closed the image stream");
                                return;
                            }
                            metrics::counter!(metric::IMAGE_BYTES).increment(piece.len() as u64);
                        }
                    }
                    tracing::debug!("site image stream complete");
                }
                .instrument(span),
            );
            Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
        })
    }

    async fn claim_device(
        &self,
        req: Request<pb::ClaimDeviceRequest>,
    ) -> Result<Response<pb::ClaimDeviceResponse>, Status> {
        site_rpc!("ClaimDevice", self, req, |caller, body| {
            validate::batch_id("batch_id", &body.batch_id)?;
            validate::device_id("device_id", &body.device_id)?;
            let claimed = self
                .state
                .ledger()
                .claim_device(&body.batch_id, &body.device_id, &caller.site, &caller.uri)
                .await
                .map_err(|e| ledger_status(e, &body.batch_id, &body.device_id))?;
            tracing::debug!(batch = %body.batch_id, device = %body.device_id, site = %caller.site, claimed, "device claimed");
            Ok(pb::ClaimDeviceResponse { claimed })
        })
    }

    async fn replicate(&self, req: Request<pb::ReplicateRequest>) -> Result<Response<pb::ReplicateResponse>, Status> {
        site_rpc!("Replicate", self, req, |caller, body| {
            site_ledger_id("site_ledger_id", &body.site_ledger_id, false)?;
            head_seq(body.site_head_seq)?;
            if body.records.is_empty() || body.records.len() > MAX_REPLICATE_RECORDS {
                return Err(validate::invalid(
                    "records",
                    format!("holds {} records, must be 1 ..= {MAX_REPLICATE_RECORDS}", body.records.len()),
                ));
            }
            let records = body
                .records
                .into_iter()
                .enumerate()
                .map(|(i, r)| site_record(&format!("records[{i}]"), r))
                .collect::<Result<Vec<_>, _>>()?;
            let ledger = self.state.ledger();
            let done = ledger
                .replicate(&caller.uri, &caller.site, &body.site_ledger_id, body.site_head_seq, &records)
                .await
                .map_err(|e| ledger_status(e, "", ""))?;
            tracing::info!(site = %caller.site, site_ledger = %body.site_ledger_id, acked = done.acked_seq,
                stored = done.stored, skipped = done.skipped, licences = done.licences, conflicts = done.conflicts,
                unleased = done.unleased, "site records replicated");
            if let Ok(streams) = ledger.site_streams().await {
                observe_lag(&streams, &caller.uri, now_ms());
            }
            Ok(pb::ReplicateResponse { acked_seq: done.acked_seq, conflicts: done.conflicts })
        })
    }
}

/// Sets the replication lag gauges of `holder`'s most recent stream (labelled by its site).
fn observe_lag(streams: &[SiteStream], holder: &str, now: i64) {
    if let Some(s) = streams.iter().find(|s| s.holder == holder) {
        metrics::gauge!(metric::SITE_LAG_RECORDS, "site" => s.site.clone()).set(s.lag_records() as f64);
        metrics::gauge!(metric::SITE_LAG_SECONDS, "site" => s.site.clone()).set(s.lag_ms(now) as f64 / 1000.0);
    }
}

/// A site ledger id: 32 lowercase hex digits (or empty, when `empty_ok`).
fn site_ledger_id(field: &str, id: &str, empty_ok: bool) -> Result<(), Status> {
    if empty_ok && id.is_empty() {
        return Ok(());
    }
    if id.len() != SITE_LEDGER_ID_LEN || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(validate::invalid(field, format!("must be {SITE_LEDGER_ID_LEN} lowercase hex digits")));
    }
    Ok(())
}

fn head_seq(seq: i64) -> Result<(), Status> {
    if seq < 0 {
        return Err(validate::invalid("site_head_seq", "must not be negative"));
    }
    Ok(())
}

/// A record hash: [`RECORD_HASH_HEX_LEN`] lowercase hex digits, as bytes.
fn record_hash_hex(field: &str, h: &str) -> Result<Vec<u8>, Status> {
    if h.len() != RECORD_HASH_HEX_LEN || !h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(validate::invalid(field, format!("must be {RECORD_HASH_HEX_LEN} lowercase hex digits")));
    }
    hex::decode(h).map_err(|_| validate::invalid(field, "is not hex"))
}

/// Bytes of at most `max` (and at least one).
fn bytes_field(field: &str, b: &[u8], max: usize) -> Result<(), Status> {
    if b.is_empty() || b.len() > max {
        return Err(validate::invalid(field, format!("is {} bytes long, must be 1 ..= {max}", b.len())));
    }
    Ok(())
}

/// One replicated record, every field checked against its limit, as the ledger takes it.
fn site_record(field: &str, r: pb::SiteRecord) -> Result<SiteRecord, Status> {
    let a = r.audit.ok_or_else(|| validate::invalid(&format!("{field}.audit"), "is missing"))?;
    if a.seq < 1 {
        return Err(validate::invalid(&format!("{field}.audit.seq"), "must be at least 1"));
    }
    validate::identifier(&format!("{field}.audit.actor"), &a.actor, MAX_SITE_AUDIT_FIELD)?;
    validate::identifier(&format!("{field}.audit.event"), &a.event, MAX_SITE_AUDIT_FIELD)?;
    validate::identifier(&format!("{field}.audit.subject"), &a.subject, MAX_SITE_AUDIT_FIELD)?;
    validate::text(&format!("{field}.audit.details_json"), &a.details_json, MAX_SITE_DETAILS)?;
    let audit = AuditRecord {
        seq: a.seq,
        at: a.at_ms,
        prev_hash: record_hash_hex(&format!("{field}.audit.prev_hash"), &a.prev_hash)?,
        hash: record_hash_hex(&format!("{field}.audit.hash"), &a.hash)?,
        actor: a.actor,
        event: a.event,
        subject: a.subject,
        details: a.details_json,
    };
    use pb::site_record::Item;
    let item = match r.item {
        None => None,
        Some(Item::Licence(l)) => {
            validate::batch_id(&format!("{field}.licence.batch_id"), &l.batch_id)?;
            validate::device_id(&format!("{field}.licence.device_id"), &l.device_id)?;
            bytes_field(&format!("{field}.licence.licence"), &l.licence, MAX_SITE_LICENCE)?;
            bytes_field(&format!("{field}.licence.certificate"), &l.certificate, validate::MAX_CHIP_CERTIFICATE)?;
            validate::identifier(&format!("{field}.licence.station"), &l.station, MAX_SITE_IDENTITY)?;
            validate::identifier(&format!("{field}.licence.site"), &l.site, MAX_SITE_IDENTITY)?;
            Some(SiteItem::Licence(SiteLicence {
                batch_id: l.batch_id,
                device_id: l.device_id,
                licence: l.licence,
                certificate: l.certificate,
                station: l.station,
                site: l.site,
                issued_at: l.issued_at_ms,
            }))
        }
        Some(Item::Refusal(f)) => {
            // A refusal may name a batch that does not exist (UNKNOWN_BATCH) and no device.
            validate::identifier(&format!("{field}.refusal.batch_id"), &f.batch_id, validate::MAX_BATCH_ID)?;
            if !f.device_id.is_empty() {
                validate::device_id(&format!("{field}.refusal.device_id"), &f.device_id)?;
            }
            validate::identifier(&format!("{field}.refusal.station"), &f.station, MAX_SITE_IDENTITY)?;
            validate::optional_identifier(&format!("{field}.refusal.site"), &f.site, MAX_SITE_IDENTITY)?;
            validate::identifier(&format!("{field}.refusal.reason"), &f.reason, MAX_SITE_AUDIT_FIELD)?;
            validate::text(&format!("{field}.refusal.detail"), &f.detail, validate::MAX_MESSAGE)?;
            Some(SiteItem::Refusal(SiteRefusal {
                batch_id: f.batch_id,
                device_id: f.device_id,
                station: f.station,
                site: f.site,
                reason: f.reason,
                detail: f.detail,
            }))
        }
        Some(Item::Install(i)) => {
            validate::identifier(&format!("{field}.install.station"), &i.station, MAX_SITE_IDENTITY)?;
            validate::identifier(&format!("{field}.install.result_id"), &i.result_id, validate::MAX_RESULT_ID)?;
            validate::batch_id(&format!("{field}.install.batch_id"), &i.batch_id)?;
            validate::device_id(&format!("{field}.install.device_id"), &i.device_id)?;
            validate::text(&format!("{field}.install.message"), &i.message, validate::MAX_MESSAGE)?;
            validate::text(&format!("{field}.install.timings_json"), &i.timings_json, MAX_SITE_TIMINGS_JSON)?;
            Some(SiteItem::Install(SiteInstall {
                station: i.station,
                result_id: i.result_id,
                batch_id: i.batch_id,
                device_id: i.device_id,
                status_code: i.status_code,
                message: i.message,
                flash_crc: i.flash_crc,
                attempt: i.attempt,
                timings_json: i.timings_json,
                reported_at: i.reported_at_ms,
            }))
        }
    };
    Ok(SiteRecord { audit, item })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(seq: i64) -> pb::SiteRecord {
        pb::SiteRecord {
            audit: Some(pb::AuditRecord {
                seq,
                at_ms: 1,
                actor: "spiffe://t/station/lyon/1".into(),
                event: "install.reported".into(),
                subject: "batch/b/device/00".into(),
                details_json: "{}".into(),
                prev_hash: "0".repeat(64),
                hash: "1".repeat(64),
            }),
            item: None,
        }
    }

    #[test]
    fn records_are_bounded_at_their_limits() {
        assert!(site_record("r", record(1)).is_ok());
        assert!(site_record("r", record(0)).unwrap_err().message().contains("seq"));
        let mut r = record(1);
        r.audit.as_mut().unwrap().details_json = "x".repeat(MAX_SITE_DETAILS);
        assert!(site_record("r", r.clone()).is_ok());
        r.audit.as_mut().unwrap().details_json.push('x');
        let e = site_record("r", r).unwrap_err();
        assert_eq!(
            e.message(),
            format!("r.audit.details_json: is {} bytes long, the limit is {MAX_SITE_DETAILS}", MAX_SITE_DETAILS + 1)
        );
        let mut r = record(1);
        r.audit.as_mut().unwrap().hash = "A".repeat(64);
        assert!(site_record("r", r).unwrap_err().message().contains("r.audit.hash"));
        let mut r = record(1);
        r.audit.as_mut().unwrap().subject = "s".repeat(MAX_SITE_AUDIT_FIELD + 1);
        assert!(site_record("r", r).is_err());
        let mut r = record(1);
        r.item = Some(pb::site_record::Item::Licence(pb::SiteLicence {
            batch_id: "b".into(),
            device_id: "0".repeat(32),
            licence: vec![1; MAX_SITE_LICENCE + 1],
            certificate: vec![1; 136],
            station: "s".into(),
            site: "lyon".into(),
            issued_at_ms: 1,
        }));
        assert!(site_record("r", r).unwrap_err().message().contains("r.licence.licence"));
    }

    #[test]
    fn site_ledger_ids_and_heads() {
        assert!(site_ledger_id("f", "", true).is_ok());
        assert!(site_ledger_id("f", "", false).is_err());
        assert!(site_ledger_id("f", &"ab".repeat(16), false).is_ok());
        assert!(site_ledger_id("f", &"AB".repeat(16), false).is_err());
        assert!(head_seq(-1).is_err());
    }
}
