//! The traceability side of the admin API: the per-device record (`DeviceHistory.records_json`), the
//! per-device export (`ExportDevices`), the yield report (`BatchReport`) and the certificate of
//! conformance (`BatchCertificate`). Each reads one ledger snapshot through
//! [`crate::ledger::Ledger::for_each_device`]; exports stream whole lines in chunks of at most
//! [`EXPORT_CHUNK`] bytes, and a stream that fails ends with the error, never with a short "complete"
//! export.

use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use flashgate_common::batch_report::ReportBuilder;
use flashgate_common::cert::ChipCertificate;
use flashgate_common::conformance::{CONFORMANCE_FORMAT, Certificate, CertificateBody};
use flashgate_proto::v1 as pb;
use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::EncodePublicKey as _;
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::BrokerState;
use super::status::{hsm_status, ledger_status};
use crate::ledger::{DevicesExported, LedgerError};

/// Largest chunk of an export sent in one message (whole lines; a longer line goes alone).
pub const EXPORT_CHUNK: usize = 64 * 1024;
/// Lines buffered between the ledger reader and the gRPC stream.
const LINE_BUFFER: usize = 256;

/// A server stream of `T`.
pub type ChunkStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn lst(e: LedgerError) -> Status {
    ledger_status(e, "", "")
}

/// Sends the lines of `lines` to `tx` as chunks made by `wrap`, all but the last; returns the last
/// chunk (possibly empty), or `None` when the client went away. The caller sends it only when the
/// producer succeeded.
pub async fn forward_lines<T>(
    lines: &mut mpsc::Receiver<String>,
    tx: &mpsc::Sender<Result<T, Status>>,
    wrap: impl Fn(Vec<u8>) -> T,
) -> Option<Vec<u8>> {
    let mut chunk: Vec<u8> = Vec::with_capacity(EXPORT_CHUNK);
    while let Some(line) = lines.recv().await {
        if !chunk.is_empty() && chunk.len() + line.len() > EXPORT_CHUNK {
            let data = std::mem::replace(&mut chunk, Vec::with_capacity(EXPORT_CHUNK));
            tx.send(Ok(wrap(data))).await.ok()?;
        }
        chunk.extend_from_slice(line.as_bytes());
    }
    Some(chunk)
}

/// The producer's result as a status.
pub async fn joined<R>(producer: JoinHandle<Result<R, LedgerError>>, what: &str) -> Result<R, Status> {
    match producer.await {
        Ok(r) => r.map_err(lst),
        Err(e) => Err(Status::internal(format!("{what} task failed: {e}"))),
    }
}

/// Starts reading the devices of `batch_id` into a line channel.
fn start_export(
    state: &BrokerState,
    batch_id: &str,
) -> (mpsc::Receiver<String>, JoinHandle<Result<DevicesExported, LedgerError>>) {
    let (lines_tx, lines) = mpsc::channel::<String>(LINE_BUFFER);
    let (state, batch) = (state.clone(), batch_id.to_owned());
    let producer = tokio::spawn(async move { state.ledger().export_devices(&batch, &lines_tx).await });
    (lines, producer)
}

/// `ExportDevices`: the batch's device lines.
pub fn export_devices(state: &BrokerState, batch_id: &str) -> ChunkStream<pb::DevicesChunk> {
    let (tx, rx) = mpsc::channel::<Result<pb::DevicesChunk, Status>>(16);
    let (mut lines, producer) = start_export(state, batch_id);
    tokio::spawn(async move {
        let Some(rest) = forward_lines(&mut lines, &tx, |data| pb::DevicesChunk { data }).await else { return };
        match joined(producer, "device export").await {
            Ok(done) => {
                if !rest.is_empty() {
                    let _ = tx.send(Ok(pb::DevicesChunk { data: rest })).await;
                }
                tracing::info!(batch = %done.batch.id, devices = done.counts.devices, bytes = done.bytes, "device export streamed");
            }
            Err(status) => {
                let _ = tx.send(Err(status)).await;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// `BatchReport`: the yield report as JSON.
pub async fn batch_report(state: &BrokerState, batch_id: &str) -> Result<pb::BatchReportResponse, Status> {
    let mut builder = ReportBuilder::new(batch_id);
    state
        .ledger()
        .for_each_device(batch_id, |row| {
            builder.add(&row);
            async { Ok(()) }
        })
        .await
        .map_err(lst)?;
    let report = builder.finish();
    let report_json =
        serde_json::to_string(&report).map_err(|e| Status::internal(format!("batch report does not encode: {e}")))?;
    Ok(pb::BatchReportResponse { report_json })
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// Signs the certificate of what `done` covered: a checkpoint of its snapshot's head first, then the body.
async fn certify(state: &BrokerState, done: &DevicesExported) -> Result<Certificate, Status> {
    let cp = crate::checkpoint::sign_head(state, done.head_seq, done.head_hash.clone(), "certificate of conformance")
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let cp_bytes = cp.to_bytes().map_err(|e| Status::internal(format!("checkpoint does not encode: {e}")))?;
    let b = &done.batch;
    let body = CertificateBody {
        format: CONFORMANCE_FORMAT.into(),
        ledger_id: hex::encode(state.ledger().ledger_id()),
        broker: state.name().to_owned(),
        issued_at_ms: now_ms(),
        batch_id: b.id.clone(),
        product_id: b.product_id.clone(),
        image_sha256: b.image_sha256.clone(),
        key_id: b.key_id.clone(),
        quota: b.quota,
        state: b.state.as_str().into(),
        counts: done.counts,
        attempts: done.attempts,
        devices_sha256: done.sha256.clone(),
        devices_bytes: done.bytes,
        checkpoint: hex::encode(cp_bytes),
    };
    let message = body.signed_bytes();
    let (signature, key) = state.pool().sign_audit(message.clone()).await.map_err(hsm_status)?;
    let sig = p256::ecdsa::Signature::from_slice(&signature)
        .map_err(|_| Status::internal("the HSM returned a malformed audit signature"))?;
    key.verify(&message, &sig)
        .map_err(|_| Status::internal("the HSM's audit signature does not verify under its own public key"))?;
    let spki = key.to_public_key_der().map_err(|e| Status::internal(format!("audit key does not encode: {e}")))?;
    Ok(Certificate {
        body,
        signature: hex::encode(signature),
        key_fingerprint: hex::encode(sha2::Sha256::digest(spki.as_bytes())),
    })
}

/// `BatchCertificate`: the device lines, then the certificate over them.
pub fn certificate(state: &BrokerState, batch_id: &str) -> ChunkStream<pb::CertificateChunk> {
    use pb::certificate_chunk::Part;
    let (tx, rx) = mpsc::channel::<Result<pb::CertificateChunk, Status>>(16);
    let (mut lines, producer) = start_export(state, batch_id);
    let state = state.clone();
    tokio::spawn(async move {
        let wrap = |data| pb::CertificateChunk { part: Some(Part::Devices(data)) };
        let Some(rest) = forward_lines(&mut lines, &tx, wrap).await else { return };
        let result = match joined(producer, "certificate export").await {
            Ok(done) => certify(&state, &done).await.map(|c| (c, rest)),
            Err(status) => Err(status),
        };
        match result {
            Ok((cert, rest)) => {
                if !rest.is_empty() && tx.send(Ok(wrap(rest))).await.is_err() {
                    return;
                }
                tracing::info!(
                    batch = %cert.body.batch_id,
                    devices = cert.body.counts.devices,
                    installed = cert.body.counts.installed,
                    checkpoint_seq = done_seq(&cert),
                    "certificate of conformance signed"
                );
                let _ = tx.send(Ok(pb::CertificateChunk { part: Some(Part::CertificateJson(cert.to_text())) })).await;
            }
            Err(status) => {
                let _ = tx.send(Err(status)).await;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn done_seq(cert: &Certificate) -> u64 {
    cert.body.signed_checkpoint().map(|c| c.head.seq).unwrap_or(0)
}

/// The device's records (`flashgate-devices-v1` lines without their newline), one per batch, and for each
/// the fingerprint of the vendor CA key that verifies its chip certificate ("" when none does).
pub async fn device_records(state: &BrokerState, device_id: &str) -> Result<(Vec<String>, Vec<String>), Status> {
    let rows = state.ledger().device_rows(device_id).await.map_err(lst)?;
    let vendor = |cert_hex: &str| -> String {
        let Some(cert) = hex::decode(cert_hex).ok().and_then(|b| ChipCertificate::parse(&b).ok()) else {
            return String::new();
        };
        state
            .vendor_keys()
            .iter()
            .find(|k| cert.verify(std::slice::from_ref(*k)).is_ok())
            .map(|k| hex::encode(&sha2::Sha256::digest(k.to_xy())[..16]))
            .unwrap_or_default()
    };
    Ok(rows.iter().map(|r| (r.to_line().trim_end().to_owned(), vendor(&r.certificate))).unzip())
}
