//! The per-device record, the yield report and the certificate of conformance (issue 13, items 4–5),
//! against a real broker over mTLS: five chips of one batch — installed first time, installed on the
//! second attempt, failed, licensed and never reported, refused (quota, and a site not allowed). Checks
//! `DeviceHistory`'s whole record, `ExportDevices`, `BatchReport`, and a `BatchCertificate` verified
//! the way `flashgate audit verify --certificate --devices` does it, offline: it verifies; with a count
//! changed it does not; a truncated devices file is named; and a certificate signed after the
//! `installs` table was edited in the database (a failure turned into an install) is refused against
//! the chain, whose `install.reported` record still says the failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flashgate_broker::checkpoint::CheckpointSettings;
use flashgate_broker::hsm::AuditPublicKey;
use flashgate_common::audit_export::{self, BatchTally};
use flashgate_common::batch_report::BatchReport;
use flashgate_common::conformance::{self, Certificate, CertificateError};
use flashgate_common::device_export::{self, DeviceRow, Verdict};
use flashgate_proto::v1 as pb;
use flashgate_tests::broker::{BrokerSpec, Station, TestBroker, TestChip, World};
use sqlx::Connection;
use tokio_stream::StreamExt;

const FAILED: u32 = 0x0009;

fn report(device: &str, result_id: &str, attempt: u32, status_code: u32, probe: &str) -> pb::ReportInstallRequest {
    pb::ReportInstallRequest {
        batch_id: "lot".into(),
        device_id: device.into(),
        status_code,
        message: if status_code == 0 { "installed".into() } else { "install failed".into() },
        timings: vec![
            pb::StageTiming { stage: "licence".into(), micros: 1_500 },
            pb::StageTiming { stage: "install".into(), micros: 250_000 },
        ],
        flash_crc: None,
        attempt,
        probe: Some(pb::ProbeInfo { probe_id: probe.into(), kind: "sim".into(), port: "sim://0".into() }),
        result_id: result_id.into(),
    }
}

async fn send(st: &Station, r: pb::ReportInstallRequest) {
    assert!(st.licences.clone().report_install(r).await.unwrap().into_inner().recorded);
}

struct Scene {
    broker: TestBroker,
    chips: Vec<TestChip>,
}

async fn scene(world: &std::sync::Arc<World>) -> Scene {
    let broker = world
        .start_broker(BrokerSpec {
            checkpoints: CheckpointSettings {
                every_records: 1_000_000,
                interval: std::time::Duration::from_secs(3600),
                sinks: Vec::new(),
            },
            ..BrokerSpec::default()
        })
        .await;
    broker.seed_batch("lot", 4, &["berlin"]).await;
    let (b1, b2, austin) =
        (broker.station("berlin", 1).await, broker.station("berlin", 2).await, broker.station("austin", 1).await);
    let chips: Vec<TestChip> = (0..5).map(|_| world.chip()).collect();
    for c in &chips[..4] {
        b1.issue("lot", c).await.unwrap();
    }
    let id = |i: usize| chips[i].device_id();
    send(&b1, report(&id(0), "1", 1, 0, "p0")).await;
    send(&b1, report(&id(1), "2", 1, FAILED, "p1")).await;
    send(&b1, report(&id(1), "3", 2, 0, "p0")).await;
    send(&b1, report(&id(2), "4", 1, FAILED, "p1")).await;
    // Quota 4 is spent: the fifth chip is refused at berlin/2, and austin may not license at all.
    assert!(b2.issue("lot", &chips[4]).await.is_err());
    assert!(b2.issue("lot", &chips[4]).await.is_err());
    assert!(austin.issue("lot", &chips[4]).await.is_err());
    Scene { broker, chips }
}

async fn device_rows(broker: &TestBroker, device: &str) -> (Vec<DeviceRow>, Vec<String>) {
    let r = broker
        .admin()
        .await
        .device_history(pb::DeviceHistoryRequest { device_id: device.into() })
        .await
        .unwrap()
        .into_inner();
    (r.records_json.iter().map(|l| serde_json::from_str(l).unwrap()).collect(), r.vendor_keys)
}

async fn export_devices(broker: &TestBroker) -> Vec<u8> {
    let chunks: Vec<pb::DevicesChunk> = broker
        .admin()
        .await
        .export_devices(pb::ExportDevicesRequest { batch_id: "lot".into() })
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    chunks.into_iter().flat_map(|c| c.data).collect()
}

async fn certificate(broker: &TestBroker) -> (Vec<u8>, Certificate) {
    use pb::certificate_chunk::Part;
    let parts: Vec<pb::CertificateChunk> = broker
        .admin()
        .await
        .batch_certificate(pb::BatchCertificateRequest { batch_id: "lot".into() })
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    let (mut devices, mut cert) = (Vec::new(), None);
    for p in parts {
        match p.part.unwrap() {
            Part::Devices(d) => devices.extend(d),
            Part::CertificateJson(t) => cert = Some(Certificate::parse(t.as_bytes()).unwrap()),
        }
    }
    (devices, cert.expect("the stream ends with the certificate"))
}

async fn audit_export(broker: &TestBroker) -> Vec<u8> {
    let chunks: Vec<pb::AuditBundleChunk> = broker
        .admin()
        .await
        .export_audit_bundle(pb::ExportAuditBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    chunks.into_iter().flat_map(|c| c.data).collect()
}

fn trusted(broker: &TestBroker) -> Vec<AuditPublicKey> {
    broker.running().state().pool().audit_keys().into_iter().map(|(_, k)| k).collect()
}

/// What `flashgate audit verify EXPORT --trust K --certificate C --devices D` checks, in its order.
fn verify_offline(export: &[u8], keys: &[AuditPublicKey], cert: &Certificate, devices: &[u8]) -> Result<(), String> {
    let cp = cert.verify_signature(keys).map_err(|e| e.to_string())?;
    let summary = device_export::summarise(devices).map_err(|e| e.to_string())?;
    conformance::check_devices(cert, &summary, devices.len() as u64).map_err(|e| e.to_string())?;
    let mut tally = BatchTally::new(&cert.body.batch_id, cp.head.seq);
    audit_export::verify_tallying(export, keys, &[("certificate".into(), cp)], Some(&mut tally))
        .map_err(|e| e.to_string())?;
    conformance::check_chain(cert, &summary, &tally).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_has_its_whole_record_and_the_batch_its_report() {
    let world = World::new();
    let Scene { broker, chips } = scene(&world).await;
    let (rows, vendors) = device_rows(&broker, &chips[1].device_id()).await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.verdict, Verdict::Installed);
    assert_eq!(r.product_id, String::from_utf8(chips[1].product().to_vec()).unwrap());
    assert_eq!(hex::decode(&r.certificate).unwrap(), chips[1].cert_bytes());
    assert!(!vendors[0].is_empty(), "the world's vendor key verifies the certificate");
    let lic = r.licence.as_ref().unwrap();
    assert!(lic.station.ends_with("/site/berlin/station/1") && lic.site == "berlin", "{lic:?}");
    assert_eq!(lic.image_sha256.len(), 64);
    assert_eq!(lic.key_id.len(), 32);
    assert_eq!(r.attempts.len(), 2);
    assert_eq!((r.attempts[0].status_code, r.attempts[0].probe_id.as_str()), (FAILED as u16, "p1"));
    assert_eq!(r.attempts[0].status, device_export::status_words(FAILED as u16));
    assert_eq!((r.attempts[1].status_code, r.attempts[1].status.as_str()), (0, "installed"));
    assert_eq!(r.attempts[1].timings_us.get("install"), Some(&250_000));
    assert_eq!(r.attempts[1].probe_kind, "sim");

    let (refused, _) = device_rows(&broker, &chips[4].device_id()).await;
    assert_eq!(refused[0].verdict, Verdict::Refused);
    assert!(refused[0].licence.is_none());
    let reasons: Vec<(&str, u64)> = refused[0].refusals.iter().map(|f| (f.reason.as_str(), f.count)).collect();
    assert!(reasons.contains(&("QUOTA_EXHAUSTED", 2)), "{reasons:?}");
    assert!(reasons.iter().any(|(r, _)| *r == "SITE_NOT_ALLOWED"), "{reasons:?}");

    let bytes = export_devices(&broker).await;
    let s = device_export::summarise(&bytes[..]).unwrap();
    let c = s.counts;
    assert_eq!(
        (c.devices, c.issued, c.installed, c.failed, c.not_reported, c.refusals, c.first_pass, c.attempted),
        (5, 4, 2, 1, 1, 3, 1, 3)
    );
    assert_eq!(s.attempts_total, 4);

    let rep = broker.admin().await.batch_report(pb::BatchReportRequest { batch_id: "lot".into() }).await.unwrap();
    let rep: BatchReport = serde_json::from_str(&rep.into_inner().report_json).unwrap();
    assert_eq!((rep.devices, rep.licensed, rep.installed), (5, 4, 2));
    assert_eq!((rep.total.attempts, rep.total.installed, rep.total.first_attempts, rep.total.first_pass), (4, 2, 3, 1));
    assert_eq!(rep.total.failed.values().sum::<u64>(), 2);
    assert_eq!(rep.total.refused.values().sum::<u64>(), 3);
    assert_eq!(rep.total.stages["install"].p95_us / 1000, 250);
    let p1 = rep.probes.iter().find(|p| p.probe == "p1").unwrap();
    assert_eq!((p1.attempts, p1.installed, p1.first_pass_yield), (2, 0, Some(0.0)));
    assert!(rep.sites.iter().any(|s| s.site == "austin" && s.refused.contains_key("SITE_NOT_ALLOWED")));

    // Bad input is named: an unknown batch, a malformed device id.
    let mut admin = broker.admin().await;
    let e = admin.batch_report(pb::BatchReportRequest { batch_id: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = admin.device_history(pb::DeviceHistoryRequest { device_id: "XYZ".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = admin.export_devices(pb::ExportDevicesRequest { batch_id: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "refused before the stream starts: {e}");
    let e = admin.batch_certificate(pb::BatchCertificateRequest { batch_id: "a/b".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_conformance_verifies_offline_and_a_changed_one_does_not() {
    let world = World::new();
    let Scene { broker, chips } = scene(&world).await;
    let keys = trusted(&broker);
    let (devices, cert) = certificate(&broker).await;
    assert_eq!(devices, export_devices(&broker).await, "the certificate covers the device export byte for byte");
    assert_eq!((cert.body.counts.devices, cert.body.counts.installed, cert.body.attempts), (5, 2, 4));
    // Production goes on after the certificate; the export taken later still verifies it.
    let b1 = broker.station("berlin", 1).await;
    send(&b1, report(&chips[3].device_id(), "5", 1, 0, "p0")).await;
    let export = audit_export(&broker).await;
    verify_offline(&export, &keys, &cert, &devices).unwrap();

    // A count changed after signing.
    let text = cert.to_text().replace("\"installed\": 2", "\"installed\": 3");
    let forged = Certificate::parse(text.as_bytes()).unwrap();
    assert!(matches!(forged.verify_signature(&keys), Err(CertificateError::BadSignature)));
    assert!(verify_offline(&export, &keys, &forged, &devices).unwrap_err().contains("signature does not verify"));

    // The devices file truncated: a line cut, or the last device dropped.
    let cut = &devices[..devices.len() - 10];
    assert!(verify_offline(&export, &keys, &cert, cut).unwrap_err().contains("truncated"), "cut line");
    let last_nl = devices[..devices.len() - 1].iter().rposition(|b| *b == b'\n').unwrap();
    let short = &devices[..last_nl + 1];
    let e = verify_offline(&export, &keys, &cert, short).unwrap_err();
    assert!(e.contains("different or truncated export"), "{e}");

    // Someone with write access to the database turns the failure of chip 2 into an install; the broker
    // then certifies what its tables say, but the chain's install.reported record says the failure.
    let mut conn = sqlx::SqliteConnection::connect(broker.ledger_url()).await.unwrap();
    sqlx::query("UPDATE installs SET status_code = 0 WHERE device_id = $1")
        .bind(chips[2].device_id())
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let (devices2, cert2) = certificate(&broker).await;
    assert_eq!(cert2.body.counts.installed, 4, "the edited table claims 4 installs");
    let export2 = audit_export(&broker).await;
    let e = verify_offline(&export2, &keys, &cert2, &devices2).unwrap_err();
    assert!(e.contains("not the 5 install.reported records of the chain"), "{e}");
}
