//! Who and what the broker refuses, end to end over mutual TLS: clients with a certificate from
//! another CA or with no certificate never reach an RPC; a revoked station is refused on a new
//! connection (at the handshake) and with `STATION_REVOKED` on a connection it already had open;
//! forged chip certificates (`CERT_UNVERIFIED`, nothing consumed), chips of another product
//! (`PRODUCT_MISMATCH`), stations of a site the batch does not allow (`SITE_NOT_ALLOWED`), paused
//! batches (`BATCH_PAUSED`), unknown batches, and callers of the wrong role (`NOT_AUTHORISED`)
//! — each with its documented gRPC code and the batch named in the refusal's metadata. And what a
//! hostile station tried: oversized and malformed fields (refused before any audit record), reissues
//! across sites and states, and install reports for another site's devices and with a wrong CRC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flashgate_common::pki;
use flashgate_proto::errors::Refusal;
use flashgate_proto::transport::{self, TlsFiles};
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::licence_service_client::LicenceServiceClient;
use flashgate_tests::broker::{BrokerSpec, TestBroker, TestPki, World, reason};
use tonic::{Code, Status};

// ---- log capture: handshake refusals are only visible in the broker's log -------------------------

#[derive(Clone)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = LogBuf(buf.clone());
        tracing_subscriber::fmt()
            .with_env_filter("flashgate_proto=warn")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buf
    })
}

/// Waits up to 5 s for a broker log line containing every needle.
async fn wait_for_log(needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
        if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "no log line with {needles:?} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One `IssueLicence` over a fresh connection with `tls`; any failure (connect or RPC) as text,
/// starting `refusal=REASON;` (or `refusal=none;`) when the RPC itself failed.
async fn issue_over(
    broker: &TestBroker,
    tls: Arc<rustls::ClientConfig>,
    batch: &str,
    cert: Vec<u8>,
) -> Result<pb::IssueLicenceResponse, String> {
    let call = async {
        let channel = transport::connect(&broker.url(), tls, None).await.map_err(|e| e.to_string())?;
        LicenceServiceClient::new(channel)
            .issue_licence(pb::IssueLicenceRequest { batch_id: batch.into(), chip_certificate: cert, probe: None })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("refusal={}; {s:?}", reason(&s).unwrap_or_else(|| "none".into())))
    };
    tokio::time::timeout(Duration::from_secs(15), call).await.map_err(|_| "timed out".to_string())?
}

fn refusal(s: &Status) -> Refusal {
    Refusal::from_status(s).unwrap_or_else(|| panic!("not a Flashgate refusal: {s:?}"))
}

async fn stations_seen(broker: &TestBroker) -> Vec<pb::StationInfo> {
    broker.admin().await.list_stations(pb::ListStationsRequest {}).await.unwrap().into_inner().stations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_are_refused_at_the_handshake() {
    logs();
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    broker.seed_batch("b-tls", 4, &["*"]).await;

    // A station certificate of the same identity from another CA (trusting ours, so the client
    // itself accepts the broker).
    let other = TestPki::new();
    let id = TestPki::station("berlin", 1);
    let foreign = other.files(&id);
    let tls = transport::client_config(&TlsFiles::new(foreign.cert, foreign.key, world.pki.ca_cert())).unwrap();
    let e = issue_over(&broker, tls, "b-tls", world.chip().cert_bytes()).await.unwrap_err();
    eprintln!("foreign CA client saw: {e}");
    assert!(!e.starts_with("refusal=") || e.starts_with("refusal=none;"), "must be refused before any RPC: {e}");
    let line = wait_for_log(&["refused connection", &other.serial(&id), "unknown issuer"]).await;
    assert!(line.contains(&id.to_uri()), "{line}");

    // No client certificate at all.
    let e = issue_over(&broker, world.pki.client_tls_without_certificate(), "b-tls", world.chip().cert_bytes())
        .await
        .unwrap_err();
    eprintln!("certificate-less client saw: {e}");
    assert!(!e.starts_with("refusal=") || e.starts_with("refusal=none;"), "must be refused before any RPC: {e}");
    wait_for_log(&["refused connection", "no client certificate presented"]).await;

    // Neither reached the service: nothing issued, no station recorded.
    assert_eq!(broker.batch_status("b-tls").await.issued, 0);
    assert!(stations_seen(&broker).await.is_empty());

    // The genuine station gets in.
    let st = broker.station("berlin", 1).await;
    st.issue("b-tls", &world.chip()).await.unwrap();
    let seen = stations_seen(&broker).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].certificates[0].serial, world.pki.serial(&id));
    assert_ne!(seen[0].certificates[0].serial, other.serial(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_station_is_refused_on_new_and_open_connections() {
    logs();
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    broker.seed_batch("b-rev", 10, &["berlin"]).await;
    let id = TestPki::station("berlin", 2);
    let st = broker.station("berlin", 2).await;
    st.issue("b-rev", &world.chip()).await.unwrap();
    let bystander = broker.station("berlin", 1).await;

    // Revoke by the serial read from the certificate file, in the colon form people copy.
    let (cert_path, _) = pki::identity_paths(world.pki.dir(), &id);
    let serial = pki::read_cert_info(&cert_path).unwrap().serial_hex;
    assert_eq!(serial, world.pki.serial(&id));
    let colon: Vec<String> = serial.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).to_uppercase()).collect();
    let revoked = broker
        .admin()
        .await
        .revoke_station(pb::RevokeStationRequest {
            serial: colon.join(":"),
            identity: String::new(),
            reason: "station stolen".into(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.serials, vec![serial.clone()]);

    // The connection it already had open: STATION_REVOKED, nothing consumed.
    let before = broker.batch_status("b-rev").await.issued;
    let s = st.issue("b-rev", &world.chip()).await.unwrap_err();
    let r = refusal(&s);
    assert_eq!(r.reason, "STATION_REVOKED");
    assert_eq!(r.code, Code::PermissionDenied);
    assert!(r.message.contains(&serial), "{}", r.message);
    // Images too.
    let s = st.fetch_image(&broker.batch_status("b-rev").await.image_sha256, 0).await.unwrap_err();
    assert_eq!(reason(&s).as_deref(), Some("STATION_REVOKED"));

    // A new connection: refused at the handshake, the RPC never runs.
    let e = issue_over(&broker, world.pki.client_tls(&id), "b-rev", world.chip().cert_bytes()).await.unwrap_err();
    eprintln!("revoked station on a new connection saw: {e}");
    assert!(!e.starts_with("refusal=") || e.starts_with("refusal=none;"), "must be refused before any RPC: {e}");
    wait_for_log(&["refused connection", &serial, "revoked"]).await;
    assert_eq!(broker.batch_status("b-rev").await.issued, before);

    // Other stations are unaffected; the ledger lists the certificate as revoked.
    bystander.issue("b-rev", &world.chip()).await.unwrap();
    let seen = stations_seen(&broker).await;
    let entry = seen.iter().find(|s| s.identity == id.to_uri()).expect("revoked station listed");
    assert!(entry.certificates.iter().any(|c| c.serial == serial && c.revoked && c.revoked_reason == "station stolen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chip_batch_and_site_refusals_carry_their_reason_and_consume_nothing() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    let seeded = broker.seed_batch("b-ref", 5, &["berlin"]).await;
    let berlin = broker.station("berlin", 1).await;
    let austin = broker.station("austin", 1).await;

    // A chip certificate signed by another vendor CA.
    let forged = world.forged_chip();
    let r = refusal(&berlin.issue("b-ref", &forged).await.unwrap_err());
    assert_eq!((r.reason.as_str(), r.code), ("CERT_UNVERIFIED", Code::InvalidArgument));
    assert_eq!(r.metadata.get("batch_id").map(String::as_str), Some("b-ref"));
    assert_eq!(r.metadata.get("device_id"), Some(&forged.device_id()));
    // Garbage that is not a certificate at all.
    let r = refusal(&berlin.issue_raw("b-ref", vec![0x42; 100]).await.unwrap_err());
    assert_eq!(r.reason, "CERT_UNVERIFIED");
    // A genuine chip whose certificate was altered (product id flipped after signing).
    let mut altered = world.chip().cert_bytes();
    altered[0] ^= 1;
    assert_eq!(reason(&berlin.issue_raw("b-ref", altered).await.unwrap_err()).as_deref(), Some("CERT_UNVERIFIED"));

    // A genuine chip of another product (stm32f4's product id).
    let f4 = world.chip_of(*b"45002001");
    let r = refusal(&berlin.issue("b-ref", &f4).await.unwrap_err());
    assert_eq!((r.reason.as_str(), r.code), ("PRODUCT_MISMATCH", Code::FailedPrecondition));
    assert_eq!(r.metadata.get("device_id"), Some(&f4.device_id()));

    // A station of a site the batch does not allow.
    let r = refusal(&austin.issue("b-ref", &world.chip()).await.unwrap_err());
    assert_eq!((r.reason.as_str(), r.code), ("SITE_NOT_ALLOWED", Code::PermissionDenied));
    // Nor may it fetch the batch's image.
    let s = austin.fetch_image(&seeded.image.sha256, 0).await.unwrap_err();
    assert_eq!(reason(&s).as_deref(), Some("SITE_NOT_ALLOWED"));

    // An unknown batch.
    let r = refusal(&berlin.issue("no-such-batch", &world.chip()).await.unwrap_err());
    assert_eq!((r.reason.as_str(), r.code), ("UNKNOWN_BATCH", Code::NotFound));

    // A paused batch, then open again.
    let mut admin = broker.admin().await;
    let paused = admin
        .set_batch_state(pb::SetBatchStateRequest { id: "b-ref".into(), state: pb::BatchState::Paused as i32 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state, pb::BatchState::Paused as i32);
    let chip = world.chip();
    let r = refusal(&berlin.issue("b-ref", &chip).await.unwrap_err());
    assert_eq!((r.reason.as_str(), r.code), ("BATCH_PAUSED", Code::FailedPrecondition));
    admin
        .set_batch_state(pb::SetBatchStateRequest { id: "b-ref".into(), state: pb::BatchState::Open as i32 })
        .await
        .unwrap();

    // Nothing of the above consumed quota.
    let status = broker.batch_status("b-ref").await;
    assert_eq!((status.issued, status.remaining), (0, 5));
    let ok = berlin.issue("b-ref", &chip).await.unwrap();
    assert!(!ok.reissued);
    chip.open(&ok.licence).unwrap();
    assert_eq!(broker.batch_status("b-ref").await.issued, 1);

    // A closed batch stays closed.
    admin
        .set_batch_state(pb::SetBatchStateRequest { id: "b-ref".into(), state: pb::BatchState::Closed as i32 })
        .await
        .unwrap();
    let r = refusal(&berlin.issue("b-ref", &world.chip()).await.unwrap_err());
    assert_eq!(r.reason, "BATCH_CLOSED");
    // A reissue obeys the same rules: a closed batch gives nothing, not even a licence already issued.
    let r = refusal(&berlin.issue("b-ref", &chip).await.unwrap_err());
    assert_eq!(r.reason, "BATCH_CLOSED");
    assert_eq!(broker.batch_status("b-ref").await.issued, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_role_is_not_authorised() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    broker.seed_batch("b-role", 5, &["*"]).await;

    // A station calling AdminService RPCs.
    let st = broker.station("berlin", 1).await;
    let mut station_admin = st.admin.clone();
    let s = station_admin.batch_status(pb::BatchStatusRequest { id: "b-role".into() }).await.unwrap_err();
    let r = refusal(&s);
    assert_eq!((r.reason.as_str(), r.code), ("NOT_AUTHORISED", Code::PermissionDenied));
    let s = station_admin
        .create_batch(pb::CreateBatchRequest {
            id: "b-evil".into(),
            product_id: "46201002".into(),
            image_sha256: String::new(),
            quota: 1_000_000,
            allowed_sites: vec!["*".into()],
            not_before_ms: None,
            not_after_ms: None,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&s).as_deref(), Some("NOT_AUTHORISED"));
    let s = station_admin
        .revoke_station(pb::RevokeStationRequest {
            serial: world.pki.serial(&TestPki::station("berlin", 2)),
            identity: String::new(),
            reason: "x".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&s).as_deref(), Some("NOT_AUTHORISED"));

    // An admin calling IssueLicence and GetImage.
    let admin_station =
        flashgate_tests::broker::Station::new(broker.channel(&TestPki::admin()).await, TestPki::admin());
    let r = refusal(&admin_station.issue("b-role", &world.chip()).await.unwrap_err());
    assert_eq!((r.reason.as_str(), r.code), ("NOT_AUTHORISED", Code::PermissionDenied));
    let sha = broker.batch_status("b-role").await.image_sha256;
    assert_eq!(reason(&admin_station.fetch_image(&sha, 0).await.unwrap_err()).as_deref(), Some("NOT_AUTHORISED"));

    // The broker's own identity is neither.
    let as_broker = flashgate_tests::broker::Station::new(broker.channel(&TestPki::broker()).await, TestPki::broker());
    assert_eq!(reason(&as_broker.issue("b-role", &world.chip()).await.unwrap_err()).as_deref(), Some("NOT_AUTHORISED"));

    let status = broker.batch_status("b-role").await;
    assert_eq!(status.issued, 0);
    let batches = broker.admin().await.list_batches(pb::ListBatchesRequest {}).await.unwrap().into_inner();
    assert_eq!(batches.batches.len(), 1, "the station must not have created a batch");
}

// ---- hostile stations (the review's findings) ---------------------------------------------------

async fn audit_len(broker: &TestBroker) -> usize {
    broker.running().state().ledger().audit_page(0, 1_000_000).await.unwrap().len()
}

async fn audit_events(broker: &TestBroker, event: &str) -> usize {
    let page = broker.running().state().ledger().audit_page(0, 1_000_000).await.unwrap();
    page.iter().filter(|r| r.event == event).count()
}

fn report(batch: &str, device: &str, result_id: &str, crc: Option<u32>) -> pb::ReportInstallRequest {
    pb::ReportInstallRequest {
        batch_id: batch.into(),
        device_id: device.into(),
        status_code: 0,
        message: "installed".into(),
        timings: vec![],
        flash_crc: crc,
        attempt: 1,
        probe: None,
        result_id: result_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_fields_are_refused_before_any_audit_or_work() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    broker.seed_batch("b-big", 4, &["berlin"]).await;
    let st = broker.station("berlin", 1).await;
    let before = audit_len(&broker).await;

    // An 8 MB batch id never gets past the station services' 16 KiB decode limit.
    let s = st.issue(&"x".repeat(8 << 20), &world.chip()).await.unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    // Under the decode limit, the field rule: named, with its limit, not echoed.
    let s = st.issue(&"y".repeat(10_000), &world.chip()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(s.message(), "batch_id: is 10000 bytes long, the limit is 64");
    // A NUL (which PostgreSQL cannot store) and other control characters.
    let s = st.issue("lot\0-7", &world.chip()).await.unwrap_err();
    assert_eq!(s.message(), "batch_id: contains control characters");
    let s = st.issue("lot/7", &world.chip()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    let mut lic = st.licences.clone();
    let device = world.chip().device_id();
    for (req, want) in [
        (report("b-big", &device, &"r".repeat(129), None), "result_id: is 129 bytes long, the limit is 128"),
        (
            pb::ReportInstallRequest { message: "m".repeat(1025), ..report("b-big", &device, "r1", None) },
            "message: is 1025 bytes long, the limit is 1024",
        ),
        (
            pb::ReportInstallRequest {
                timings: (0..33).map(|i| pb::StageTiming { stage: format!("s{i}"), micros: 1 }).collect(),
                ..report("b-big", &device, "r2", None)
            },
            "timings: has 33 entries, the limit is 32",
        ),
        (
            pb::ReportInstallRequest {
                probe: Some(pb::ProbeInfo { probe_id: "p".repeat(129), kind: "tcp".into(), port: "x".into() }),
                ..report("b-big", &device, "r3", None)
            },
            "probe.probe_id: is 129 bytes long, the limit is 128",
        ),
        (report("b-big", "not-a-device", "r4", None), "device_id: must be 32 lowercase hex digits"),
    ] {
        let s = lic.report_install(req).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with(want), "{} (wanted {want})", s.message());
    }
    let s = st.fetch_image(&"z".repeat(64), 0).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    // None of it reached the audit chain.
    assert_eq!(audit_len(&broker).await, before);
    let summary = broker.running().state().ledger().verify_audit().await.unwrap();
    assert_eq!(summary.records as usize, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reissue_obeys_site_and_state_and_another_station_is_audited_once() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    broker.seed_batch("b-south", 4, &["austin"]).await;
    broker.seed_batch("b-two", 4, &["berlin", "austin"]).await;
    let austin = broker.station("austin", 1).await;
    let berlin1 = broker.station("berlin", 1).await;
    let berlin2 = broker.station("berlin", 2).await;

    // A berlin station asking for a chip licensed on an austin-only batch gets nothing.
    let chip = world.chip();
    austin.issue("b-south", &chip).await.unwrap();
    let r = refusal(&berlin1.issue("b-south", &chip).await.unwrap_err());
    assert_eq!(r.reason, "SITE_NOT_ALLOWED");
    // The refusal does not tell which sites the batch does allow.
    assert!(!r.message.contains("austin"), "{}", r.message);

    // Another station of an allowed site: the same bytes, audited as a reissue once.
    let chip2 = world.chip();
    let first = berlin1.issue("b-two", &chip2).await.unwrap();
    assert_eq!(audit_events(&broker, "licence.reissued").await, 0);
    let same_station = berlin1.issue("b-two", &chip2).await.unwrap();
    assert!(same_station.reissued);
    assert_eq!(audit_events(&broker, "licence.reissued").await, 0, "same-station retries are not audited");
    for _ in 0..3 {
        let other = berlin2.issue("b-two", &chip2).await.unwrap();
        assert!(other.reissued);
        assert_eq!(other.licence, first.licence);
    }
    assert_eq!(audit_events(&broker, "licence.reissued").await, 1);
    assert_eq!(broker.batch_status("b-two").await.issued, 1);

    // Paused: boards on fixtures still get their licence back; new ones do not.
    let mut admin = broker.admin().await;
    let state = |s: pb::BatchState| pb::SetBatchStateRequest { id: "b-two".into(), state: s as i32 };
    admin.set_batch_state(state(pb::BatchState::Paused)).await.unwrap();
    assert!(berlin1.issue("b-two", &chip2).await.unwrap().reissued);
    assert_eq!(reason(&berlin1.issue("b-two", &world.chip()).await.unwrap_err()).as_deref(), Some("BATCH_PAUSED"));
    // Closed: nothing.
    admin.set_batch_state(state(pb::BatchState::Closed)).await.unwrap();
    assert_eq!(reason(&berlin1.issue("b-two", &chip2).await.unwrap_err()).as_deref(), Some("BATCH_CLOSED"));
    broker.running().state().ledger().verify_audit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_reports_come_from_the_licence_holders_site_with_the_images_crc() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    broker.seed_batch("b-rep", 4, &["berlin", "austin"]).await;
    let berlin1 = broker.station("berlin", 1).await;
    let berlin2 = broker.station("berlin", 2).await;
    let austin = broker.station("austin", 1).await;
    let chip = world.chip();
    let lic = berlin1.issue("b-rep", &chip).await.unwrap();
    let crc = lic.expected_flash_crc;

    // Another site cannot make berlin's device "installed".
    let s = austin.licences.clone().report_install(report("b-rep", &chip.device_id(), "a1", crc)).await.unwrap_err();
    let r = refusal(&s);
    assert_eq!((r.reason.as_str(), r.code), ("NOT_LICENCE_HOLDER", Code::PermissionDenied));
    // A device nobody licensed: refused with its own reason.
    let nobody = world.chip();
    let s = berlin1.licences.clone().report_install(report("b-rep", &nobody.device_id(), "n1", crc)).await.unwrap_err();
    let r = refusal(&s);
    assert_eq!((r.reason.as_str(), r.code), ("NOT_LICENSED", Code::FailedPrecondition));
    assert_eq!(broker.batch_status("b-rep").await.installed, 0);

    // A station of the same site (a board moved between fixtures) may report; a success whose CRC is
    // not the image's is recorded as a failure.
    let wrong = crc.map(|c| c ^ 1).or(Some(1));
    let rec = berlin2.licences.clone().report_install(report("b-rep", &chip.device_id(), "b1", wrong)).await.unwrap();
    assert!(rec.into_inner().recorded);
    let status = broker.batch_status("b-rep").await;
    assert_eq!((status.installed, status.failed), (0, 1));
    let history = broker.running().state().ledger().device_history(&chip.device_id()).await.unwrap();
    assert!(history.installs[0].message.starts_with("CRC mismatch"), "{:?}", history.installs[0]);
    assert_ne!(history.installs[0].status_code, 0);
    // The right CRC from the licensed station counts.
    berlin1.licences.clone().report_install(report("b-rep", &chip.device_id(), "b2", crc)).await.unwrap();
    assert_eq!(broker.batch_status("b-rep").await.installed, 1);
    // A success without a CRC (a station that recovered an install whose INSTALL answer was lost) counts as
    // installed and says so; it is not a mismatch.
    assert!(crc.is_some(), "the test image must have an expected CRC");
    let recovered = world.chip();
    berlin1.issue("b-rep", &recovered).await.unwrap();
    berlin1.licences.clone().report_install(report("b-rep", &recovered.device_id(), "r1", None)).await.unwrap();
    let status = broker.batch_status("b-rep").await;
    assert_eq!(
        (status.installed, status.failed),
        (2, 0),
        "counts are per device: the first one's failure was superseded"
    );
    let history = broker.running().state().ledger().device_history(&recovered.device_id()).await.unwrap();
    assert_eq!(history.installs[0].status_code, 0);
    assert!(history.installs[0].message.contains("flash CRC not seen"), "{:?}", history.installs[0]);
}
