//! `LicenceService`: issue one licence per (batch, device) and record install results, for stations.
//!
//! IssueLicence, in order: the caller must be a station of the trust domain, not revoked; the chip
//! certificate must parse and verify against a trusted vendor CA key (else `CERT_UNVERIFIED`, audited);
//! the ledger's precheck returns an existing licence (a retry: byte-identical, nothing consumed) or the
//! batch if it is open for the station's site and the chip's product with quota left (when every HSM
//! member computes licences in memory, the precheck skips the device lookup and answers from a batch
//! read at most a second ago; the commit then finds a retry's licence, under the same rules); the HSM pool
//! computes the licence; the ledger commits it — one quota unit, the licence and its audit record in
//! one durable transaction — and only then is it returned. Two concurrent first requests for one device
//! both compute a licence but the ledger keeps one and both callers get that one.

use std::time::Instant;

use flashgate_common::cert::ChipCertificate;
use flashgate_common::licence::KeyId;
use flashgate_common::sfi::ImageNonce;
use flashgate_proto::v1::licence_service_server::LicenceService;
use flashgate_proto::v1::{IssueLicenceRequest, IssueLicenceResponse, ReportInstallRequest, ReportInstallResponse};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

/// Appended to the message of a success reported without a flash CRC (see [`Licences::report`]).
const NO_CRC_SEEN: &str = "flash CRC not seen (INSTALL's answer was lost; the chip reports installed)";

use super::status::{hsm_status, ledger_status, refused};
use super::{BrokerState, auth, metric, validate};
use crate::ledger::{
    ImageMeta, InstallOutcome, InstallReport, IssueOutcome, IssueRecord, LedgerError, Precheck, PrecheckRequest,
    RefusalReason, RefusalRecord,
};
use crate::upstream::Claim;

/// Status code the broker records for an install reported as successful whose flash CRC differs from
/// the image's expected CRC (outside the device's `0x01xx` range; docs/protocol.md).
pub const CRC_MISMATCH: u16 = 0xF001;

/// The `LicenceService` implementation.
#[derive(Debug, Clone)]
pub struct Licences {
    state: BrokerState,
}

impl Licences {
    /// The service over `state`.
    pub fn new(state: BrokerState) -> Self {
        Self { state }
    }
}

/// Records the latency and outcome of one RPC.
pub(crate) fn observe(rpc: &'static str, started: Instant, result: &Result<impl Sized, Status>) {
    let code = match result {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    metrics::histogram!(metric::RPC_LATENCY, "rpc" => rpc, "code" => format!("{code:?}"))
        .record(started.elapsed().as_secs_f64());
}

fn parse_key_id(hex_id: &str) -> Result<KeyId, Status> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(hex_id, &mut id)
        .map_err(|e| Status::internal(format!("stored key id {hex_id:?} is not 16 bytes of hex: {e}")))?;
    Ok(KeyId(id))
}

impl Licences {
    async fn issue(&self, req: Request<IssueLicenceRequest>) -> Result<IssueLicenceResponse, Status> {
        let st = &self.state;
        let caller = auth::station(st, &req)?;
        st.note_station(&caller.uri, &caller.site, &caller.serial).await;
        let body = req.into_inner();
        // Every field bounded before anything else sees it.
        validate::batch_id("batch_id", &body.batch_id)?;
        if body.chip_certificate.len() > validate::MAX_CHIP_CERTIFICATE {
            return Err(validate::invalid(
                "chip_certificate",
                format!(
                    "is {} bytes long, the limit is {}",
                    body.chip_certificate.len(),
                    validate::MAX_CHIP_CERTIFICATE
                ),
            ));
        }
        if let Some(p) = &body.probe {
            validate::probe("probe", p)?;
        }
        let batch_id = body.batch_id;
        let span = tracing::Span::current();
        span.record("batch", batch_id.as_str());

        // 1. The chip certificate must verify against a trusted vendor CA key.
        let verified = ChipCertificate::parse(&body.chip_certificate)
            .map_err(|e| format!("chip certificate ({} bytes) does not parse: {e}", body.chip_certificate.len()))
            .and_then(|c| match c.verify(st.vendor_keys()) {
                Ok(()) => Ok(c),
                Err(e) => Err(format!(
                    "chip certificate of device {} does not verify against the {} trusted vendor CA key(s): {e}",
                    c.device_id(),
                    st.vendor_keys().len()
                )),
            });
        let cert = match verified {
            Ok(c) => c,
            Err(detail) => {
                let device_id = ChipCertificate::parse(&body.chip_certificate)
                    .map(|c| c.device_id().to_string())
                    .unwrap_or_default();
                metrics::counter!(metric::REFUSALS, "reason" => RefusalReason::CertUnverified.as_str()).increment(1);
                tracing::warn!(station = %caller.uri, device = %device_id, "refused: {detail}");
                st.ledger()
                    .record_refusal(RefusalRecord {
                        batch_id: batch_id.clone(),
                        device_id: device_id.clone(),
                        station: caller.uri.clone(),
                        site: caller.site.clone(),
                        actor: caller.uri.clone(),
                        reason: RefusalReason::CertUnverified,
                        detail: detail.clone(),
                    })
                    .await
                    .map_err(|e| ledger_status(e, &batch_id, &device_id))?;
                return Err(refused(RefusalReason::CertUnverified, detail, &batch_id, &device_id));
            }
        };
        let device_id = cert.device_id().to_string();
        span.record("device", device_id.as_str());
        let product_id = cert.product_id_str();
        let refusal_metric = |s: Status| {
            if let Some(r) = flashgate_proto::errors::Refusal::from_status(&s) {
                metrics::counter!(metric::REFUSALS, "reason" => r.reason).increment(1);
            }
            s
        };

        // 2. Existing licence (a retry) or an open batch with quota left.
        if let Some(link) = st.upstream()
            && link.not_mirrored_yet(&batch_id)
        {
            link.want(&batch_id);
            return Err(Status::unavailable(format!(
                "batch {batch_id:?} has not been mirrored from central yet; the device waits (nothing was recorded)"
            )));
        }
        let pre_req = PrecheckRequest {
            batch_id: batch_id.clone(),
            device_id: device_id.clone(),
            product_id: product_id.clone(),
            station: caller.uri.clone(),
            site: caller.site.clone(),
            actor: caller.uri.clone(),
            lease_wait: st.upstream().is_none_or(|link| link.may_get_more(&batch_id)),
        };
        // With HSMs that compute a licence in memory, the device lookup costs more than the licence it saves
        // for a retry: skip it and let the commit return the existing licence (same rules, same audit).
        let pre = if st.pool().licences_in_memory() {
            st.ledger().precheck_fast(&pre_req).await
        } else {
            st.ledger().precheck(&pre_req).await
        };
        let pre = pre.map_err(|e| {
            if let (LedgerError::LeaseWait { detail }, Some(link)) = (&e, st.upstream()) {
                tracing::info!(station = %caller.uri, device = %device_id, "device waits for units: {detail}");
                link.want(&batch_id);
            }
            refusal_metric(ledger_status(e, &batch_id, &device_id))
        })?;
        let (outcome, image_sha) = match pre {
            Precheck::Existing(bytes) => {
                let batch = st.ledger().batch(&batch_id).await.map_err(|e| ledger_status(e, &batch_id, &device_id))?;
                (IssueOutcome::Existing(bytes), batch.image_sha256)
            }
            Precheck::Proceed(batch) => {
                // A site broker asks central first whether another site holds the device (while connected).
                if batch.lease_expires_at.is_some()
                    && let Some(link) = st.upstream()
                    && let Claim::Elsewhere(detail) = link.claim(&batch_id, &device_id).await
                {
                    metrics::counter!(metric::REFUSALS, "reason" => RefusalReason::LicensedAtOtherSite.as_str())
                        .increment(1);
                    tracing::warn!(station = %caller.uri, device = %device_id, "refused: {detail}");
                    st.ledger()
                        .record_refusal(RefusalRecord {
                            batch_id: batch_id.clone(),
                            device_id: device_id.clone(),
                            station: caller.uri.clone(),
                            site: caller.site.clone(),
                            actor: caller.uri.clone(),
                            reason: RefusalReason::LicensedAtOtherSite,
                            detail: detail.clone(),
                        })
                        .await
                        .map_err(|e| ledger_status(e, &batch_id, &device_id))?;
                    return Err(refused(RefusalReason::LicensedAtOtherSite, detail, &batch_id, &device_id));
                }
                let image = st.image_meta(&batch.image_sha256).await.map_err(|e| ledger_status(e, &batch_id, ""))?;
                let key_id = parse_key_id(&image.key_id)?;
                if image.nonce == [0; 12] {
                    return Err(Status::failed_precondition(format!(
                        "image {} of batch {batch_id:?} has no nonce recorded: it cannot be licensed",
                        image.sha256
                    )));
                }
                // 3. The HSM computes the licence (key material never leaves it).
                let t = Instant::now();
                let licence =
                    st.pool().issue_licence(key_id, cert.clone(), ImageNonce(image.nonce)).await.map_err(hsm_status)?;
                metrics::histogram!(metric::HSM_LATENCY).record(t.elapsed().as_secs_f64());
                // 4. Durable commit (one quota unit + licence + audit) before anything leaves the broker.
                let outcome = st
                    .ledger()
                    .commit_issue(IssueRecord {
                        batch_id: batch_id.clone(),
                        device_id: device_id.clone(),
                        product_id,
                        licence: licence.to_bytes().to_vec(),
                        certificate: cert.to_bytes().to_vec(),
                        station: caller.uri.clone(),
                        site: caller.site.clone(),
                        actor: caller.uri.clone(),
                        lease_wait: pre_req.lease_wait,
                    })
                    .await
                    .map_err(|e| {
                        // Another device took the last unit between the precheck and the commit: the writer
                        // answered a wait (nothing recorded) where units may come back.
                        if let (LedgerError::LeaseWait { .. }, Some(link)) = (&e, st.upstream()) {
                            link.want(&batch_id);
                        }
                        refusal_metric(ledger_status(e, &batch_id, &device_id))
                    })?;
                (outcome, batch.image_sha256)
            }
        };
        let image: ImageMeta = st.image_meta(&image_sha).await.map_err(|e| ledger_status(e, &batch_id, ""))?;
        let reissued = matches!(outcome, IssueOutcome::Existing(_));
        // New licences are counted by the ledger writer when they commit (so the metric equals the ledger
        // even when a caller gives up waiting); reissues here.
        if reissued {
            metrics::counter!(metric::LICENCES, "outcome" => "reissued").increment(1);
        }
        tracing::debug!(station = %caller.uri, device = %device_id, reissued, "licence returned");
        Ok(IssueLicenceResponse {
            licence: outcome.into_licence(),
            key_id: image.key_id,
            image_sha256: image.sha256,
            device_id,
            reissued,
            image_size: u64::try_from(image.size).unwrap_or(0),
            family: image.family,
            product_id: image.product_id,
            expected_flash_crc: image.expected_crc,
            // A copy of the signer's newest 217 bytes: no signing, no database, on this path.
            checkpoint: st.checkpoints().latest().unwrap_or_default(),
        })
    }

    async fn report(&self, req: Request<ReportInstallRequest>) -> Result<ReportInstallResponse, Status> {
        let st = &self.state;
        let caller = auth::station(st, &req)?;
        st.note_station(&caller.uri, &caller.site, &caller.serial).await;
        let r = req.into_inner();
        // Every field bounded before anything else sees it.
        validate::identifier("result_id", &r.result_id, validate::MAX_RESULT_ID)?;
        validate::batch_id("batch_id", &r.batch_id)?;
        validate::device_id("device_id", &r.device_id)?;
        validate::text("message", &r.message, validate::MAX_MESSAGE)?;
        if r.timings.len() > validate::MAX_TIMINGS {
            return Err(validate::invalid(
                "timings",
                format!("has {} entries, the limit is {}", r.timings.len(), validate::MAX_TIMINGS),
            ));
        }
        for (i, t) in r.timings.iter().enumerate() {
            validate::identifier(&format!("timings[{i}].stage"), &t.stage, validate::MAX_STAGE)?;
        }
        if let Some(p) = &r.probe {
            validate::probe("probe", p)?;
        }
        let status_code = u16::try_from(r.status_code)
            .map_err(|_| validate::invalid("status_code", format!("{:#x} does not fit in 16 bits", r.status_code)))?;
        let span = tracing::Span::current();
        span.record("batch", r.batch_id.as_str());
        span.record("device", r.device_id.as_str());
        // A station may report only on batches its site may use.
        let batch = st.ledger().batch(&r.batch_id).await.map_err(|e| ledger_status(e, &r.batch_id, &r.device_id))?;
        if !batch.allowed_sites.iter().any(|s| s == crate::ledger::ANY_SITE || *s == caller.site) {
            tracing::warn!(station = %caller.uri, "install report refused: site {:?} may not use batch {:?}",
                caller.site, batch.id);
            return Err(refused(
                RefusalReason::SiteNotAllowed,
                format!("site {:?} may not use batch {:?}", caller.site, batch.id),
                &r.batch_id,
                &r.device_id,
            ));
        }
        // Installs are counted for licensed devices only, and only from a site whose stations hold the licence
        // (its first station's site, or the site of a station it was reissued to): a station cannot make
        // another site's device "installed".
        match st
            .ledger()
            .licence_site_ok(&r.batch_id, &r.device_id, &caller.site)
            .await
            .map_err(|e| ledger_status(e, &r.batch_id, &r.device_id))?
        {
            None if st.upstream().is_some() => {
                // At a site broker, a device it never licensed was licensed through central while this
                // broker was down: transient here, so the station keeps the report and takes it to its
                // next broker (central), which holds the licence.
                return Err(Status::unavailable(format!(
                    "device {} holds no licence of batch {:?} at this site broker: it was licensed through \
                     central; report it there",
                    r.device_id, r.batch_id
                )));
            }
            None if st.site_broker_of_site(&caller.site).is_some() => {
                // A station that fell back from its site broker reports a device the site licensed and has
                // not replicated yet: transient, so the station keeps the report and sends it again.
                return Err(Status::unavailable(format!(
                    "device {} holds no licence of batch {:?} here yet: site {:?} has a site broker ({}) whose \
                     licences may not have reached this broker; report again later",
                    r.device_id,
                    r.batch_id,
                    caller.site,
                    st.site_broker_of_site(&caller.site).unwrap_or_default()
                )));
            }
            None => {
                return Err(refused(
                    RefusalReason::NotLicensed,
                    format!(
                        "device {} holds no licence of batch {:?}: there is no install to report",
                        r.device_id, r.batch_id
                    ),
                    &r.batch_id,
                    &r.device_id,
                ));
            }
            Some(false) => {
                tracing::warn!(station = %caller.uri, device = %r.device_id,
                    "install report refused: no station of site {:?} holds the device's licence", caller.site);
                return Err(refused(
                    RefusalReason::NotLicenceHolder,
                    format!("no station of site {:?} holds the licence of device {}", caller.site, r.device_id),
                    &r.batch_id,
                    &r.device_id,
                ));
            }
            Some(true) => {}
        }
        // A success whose flash CRC is not the image's is not a success. A success without a CRC is a
        // station that recovered an install whose answer was lost (the agent was killed after INSTALL;
        // GET_STATE says installed, and the profile has no way to read the CRC again): recorded as
        // installed, saying so. The check catches a flash that differs, not a station that lies: the
        // expected CRC is in every licence response.
        let (status_code, message) = match (status_code, st.image_meta(&batch.image_sha256).await) {
            (0, Ok(image)) => match (image.expected_crc, r.flash_crc) {
                (Some(expected), Some(got)) if got != expected => {
                    tracing::warn!(station = %caller.uri, device = %r.device_id,
                        "install reported ok with flash CRC {got:#010x}, image expects {expected:#010x}: recorded as failed");
                    (CRC_MISMATCH, format!("CRC mismatch: flash CRC {got:#010x}, image expects {expected:#010x}"))
                }
                (Some(_), None) => {
                    tracing::info!(station = %caller.uri, device = %r.device_id,
                        "install reported ok without its flash CRC (recovered after INSTALL's answer was lost)");
                    let message = if r.message.is_empty() {
                        NO_CRC_SEEN.to_owned()
                    } else {
                        format!("{}; {NO_CRC_SEEN}", r.message)
                    };
                    (0, message)
                }
                _ => (0, r.message.clone()),
            },
            (0, Err(e)) => return Err(ledger_status(e, &r.batch_id, &r.device_id)),
            (code, _) => (code, r.message.clone()),
        };
        let mut timings = serde_json::Map::new();
        for t in &r.timings {
            timings.insert(format!("{}_us", t.stage), serde_json::Value::from(t.micros));
        }
        if let Some(p) = &r.probe {
            timings.insert("probe".into(), serde_json::json!({"id": p.probe_id, "kind": p.kind, "port": p.port}));
        }
        let outcome = st
            .ledger()
            .report_install(InstallReport {
                station: caller.uri.clone(),
                result_id: r.result_id.clone(),
                batch_id: r.batch_id.clone(),
                device_id: r.device_id.clone(),
                status_code,
                message,
                flash_crc: r.flash_crc,
                attempt: r.attempt,
                timings_json: serde_json::Value::Object(timings).to_string(),
                actor: caller.uri.clone(),
            })
            .await
            .map_err(|e| ledger_status(e, &r.batch_id, &r.device_id))?;
        let recorded = outcome == InstallOutcome::Recorded;
        let result = match (recorded, status_code) {
            (false, _) => "duplicate",
            (true, 0) => "ok",
            (true, _) => "failed",
        };
        metrics::counter!(metric::INSTALLS, "result" => result).increment(1);
        Ok(ReportInstallResponse { recorded })
    }
}

#[tonic::async_trait]
impl LicenceService for Licences {
    async fn issue_licence(
        &self,
        request: Request<IssueLicenceRequest>,
    ) -> Result<Response<IssueLicenceResponse>, Status> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "rpc",
            rpc = "IssueLicence",
            batch = tracing::field::Empty,
            device = tracing::field::Empty
        );
        let result = self.issue(request).instrument(span).await;
        observe("IssueLicence", started, &result);
        result.map(Response::new)
    }

    async fn report_install(
        &self,
        request: Request<ReportInstallRequest>,
    ) -> Result<Response<ReportInstallResponse>, Status> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "rpc",
            rpc = "ReportInstall",
            batch = tracing::field::Empty,
            device = tracing::field::Empty
        );
        let result = self.report(request).instrument(span).await;
        observe("ReportInstall", started, &result);
        result.map(Response::new)
    }
}
