//! `LicenceService`: issue one licence per (batch, device) and record install results, for stations.
//!
//! IssueLicence, in order: the caller must be a station of the trust domain, not revoked; the chip
//! certificate must parse and verify against a trusted vendor CA key (else `CERT_UNVERIFIED`, audited);
//! the ledger's precheck returns an existing licence (a retry: byte-identical, nothing consumed) or the
//! batch if it is open for the station's site and the chip's product with quota left; the HSM pool
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

use super::status::{hsm_status, ledger_status, refused};
use super::{BrokerState, auth, metric};
use crate::ledger::{
    ImageMeta, InstallOutcome, InstallReport, IssueOutcome, IssueRecord, Precheck, PrecheckRequest, RefusalReason,
    RefusalRecord,
};

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
        let batch_id = body.batch_id;
        if batch_id.is_empty() {
            return Err(Status::invalid_argument("batch_id is empty"));
        }
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
        let pre = st
            .ledger()
            .precheck(&PrecheckRequest {
                batch_id: batch_id.clone(),
                device_id: device_id.clone(),
                product_id: product_id.clone(),
                station: caller.uri.clone(),
                site: caller.site.clone(),
                actor: caller.uri.clone(),
            })
            .await
            .map_err(|e| refusal_metric(ledger_status(e, &batch_id, &device_id)))?;
        let (outcome, image_sha) = match pre {
            Precheck::Existing(bytes) => {
                let batch = st.ledger().batch(&batch_id).await.map_err(|e| ledger_status(e, &batch_id, &device_id))?;
                (IssueOutcome::Existing(bytes), batch.image_sha256)
            }
            Precheck::Proceed(batch) => {
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
                    })
                    .await
                    .map_err(|e| refusal_metric(ledger_status(e, &batch_id, &device_id)))?;
                (outcome, batch.image_sha256)
            }
        };
        let image: ImageMeta = st.image_meta(&image_sha).await.map_err(|e| ledger_status(e, &batch_id, ""))?;
        let reissued = matches!(outcome, IssueOutcome::Existing(_));
        metrics::counter!(metric::LICENCES, "outcome" => if reissued { "reissued" } else { "issued" }).increment(1);
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
        })
    }

    async fn report(&self, req: Request<ReportInstallRequest>) -> Result<ReportInstallResponse, Status> {
        let st = &self.state;
        let caller = auth::station(st, &req)?;
        st.note_station(&caller.uri, &caller.site, &caller.serial).await;
        let r = req.into_inner();
        let span = tracing::Span::current();
        span.record("batch", r.batch_id.as_str());
        span.record("device", r.device_id.as_str());
        if r.result_id.is_empty() {
            return Err(Status::invalid_argument("result_id is empty (the idempotency key of the report)"));
        }
        if r.device_id.len() != 32 || !r.device_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "device_id {:?} is not 32 hex characters (hex(SHA-256(chip_pub))[0..32])",
                r.device_id
            )));
        }
        let status_code = u16::try_from(r.status_code).map_err(|_| {
            Status::invalid_argument(format!("status_code {:#x} does not fit in 16 bits", r.status_code))
        })?;
        // A station may report only on batches its site may use.
        let batch = st.ledger().batch(&r.batch_id).await.map_err(|e| ledger_status(e, &r.batch_id, &r.device_id))?;
        if !batch.allowed_sites.iter().any(|s| s == crate::ledger::ANY_SITE || *s == caller.site) {
            return Err(refused(
                RefusalReason::SiteNotAllowed,
                format!(
                    "site {:?} is not in batch {:?} allowed sites {:?}",
                    caller.site, batch.id, batch.allowed_sites
                ),
                &r.batch_id,
                &r.device_id,
            ));
        }
        // Installs are counted for licensed devices only: a report for a device the batch never
        // licensed is refused (the station's reporter marks it rejected and moves on).
        if st
            .ledger()
            .licence(&r.batch_id, &r.device_id)
            .await
            .map_err(|e| ledger_status(e, &r.batch_id, &r.device_id))?
            .is_none()
        {
            return Err(Status::failed_precondition(format!(
                "device {} holds no licence of batch {:?}: there is no install to report",
                r.device_id, r.batch_id
            )));
        }
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
                message: r.message.clone(),
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
