//! The admin guards, end to end over mutual TLS: revoking a serial the ledger has never seen is
//! refused (`UNKNOWN_SERIAL`, naming the serials it knows, nothing revoked) unless forced, and a
//! forced pre-revocation keeps that certificate out when it first connects; a serial given with the
//! wrong station is refused; a batch whose validity window is already over is refused
//! (`WINDOW_OVER`, not created); a batch for a site no station has, and an assignment to a station
//! that never connected, are accepted with warnings naming the known sites and stations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flashgate_proto::errors::Refusal;
use flashgate_proto::transport;
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::licence_service_client::LicenceServiceClient;
use flashgate_tests::broker::{BrokerSpec, L4_PRODUCT, TestPki, World};
use tonic::Code;

fn uri(site: &str, n: u32) -> String {
    TestPki::station(site, n).to_uri()
}

fn revoke(serial: &str, identity: &str, force: bool) -> pb::RevokeStationRequest {
    pb::RevokeStationRequest { serial: serial.into(), identity: identity.into(), reason: "guard test".into(), force }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_that_cannot_take_effect_are_refused_or_warned() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    let seeded = broker.seed_batch("lot-1", 10, &["berlin"]).await;
    // No station has connected yet: the site is named, and that none has.
    assert_eq!(seeded.batch.warnings.len(), 1, "{:?}", seeded.batch.warnings);
    assert!(seeded.batch.warnings[0].contains("\"berlin\"") && seeded.batch.warnings[0].ends_with("none"));

    // berlin/1 connects (its certificate is now known to the ledger).
    broker.station("berlin", 1).await.issue("lot-1", &world.chip()).await.unwrap();
    let seen = world.pki.serial(&TestPki::station("berlin", 1));
    let mut admin = broker.admin().await;

    // A site typo warns, naming the sites that have stations; `*` and a known site do not.
    let mut create = pb::CreateBatchRequest {
        id: "lot-2".into(),
        product_id: L4_PRODUCT.into(),
        image_sha256: seeded.image.sha256.clone(),
        quota: 5,
        allowed_sites: vec!["berln".into(), "berlin".into(), "*".into()],
        not_before_ms: None,
        not_after_ms: None,
    };
    let lot2 = admin.create_batch(create.clone()).await.unwrap().into_inner();
    assert_eq!(lot2.warnings.len(), 1, "{:?}", lot2.warnings);
    assert!(lot2.warnings[0].contains("\"berln\"") && lot2.warnings[0].ends_with("sites with stations: berlin"));

    // A validity window already over: refused, nothing created.
    create.id = "lot-old".into();
    create.allowed_sites = vec!["berlin".into()];
    create.not_after_ms = Some(1_577_836_800_000); // 2020-01-01
    let s = admin.create_batch(create.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let r = Refusal::from_status(&s).unwrap();
    assert_eq!(r.reason, "WINDOW_OVER");
    assert!(r.message.contains("lot-old") && r.message.contains("2020-01-01T00:00:00Z"), "{}", r.message);
    let batches = admin.list_batches(pb::ListBatchesRequest {}).await.unwrap().into_inner().batches;
    assert!(!batches.iter().any(|b| b.id == "lot-old"));
    // A window that ends later is fine.
    create.id = "lot-later".into();
    create.not_after_ms = Some(4_102_444_800_000); // 2100-01-01
    assert!(admin.create_batch(create).await.unwrap().into_inner().warnings.is_empty());

    // Assigning to a station that never connected: done, with a warning naming the site's stations.
    let ghost = admin
        .assign_station(pb::AssignStationRequest { station: uri("berlin", 9), batch_id: "lot-2".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ghost.assigned_batch, "lot-2");
    assert_eq!(ghost.warnings.len(), 1, "{:?}", ghost.warnings);
    assert!(ghost.warnings[0].contains(&uri("berlin", 9)), "{}", ghost.warnings[0]);
    assert!(ghost.warnings[0].ends_with("known stations of site \"berlin\": berlin/1"), "{}", ghost.warnings[0]);
    let other_site = admin
        .assign_station(pb::AssignStationRequest { station: uri("austin", 2), batch_id: "lot-2".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(other_site.warnings[0].ends_with("no station of site \"austin\" has; known stations: berlin/1"));
    let known = admin
        .assign_station(pb::AssignStationRequest { station: uri("berlin", 1), batch_id: "lot-2".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(known.warnings.is_empty(), "{:?}", known.warnings);

    // An unknown serial: refused, naming the serials the ledger knows; nothing revoked.
    let s = admin.revoke_station(revoke("DE:AD:BE:EF", "", false)).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    let r = Refusal::from_status(&s).unwrap();
    assert_eq!(r.reason, "UNKNOWN_SERIAL");
    assert!(r.message.contains("deadbeef") && r.message.contains(&format!("berlin/1: {seen}")), "{}", r.message);
    let s = admin.revoke_station(revoke("deadbeef", &uri("berlin", 1), false)).await.unwrap_err();
    assert!(s.message().contains(&format!("its known serials: berlin/1: {seen}")), "{}", s.message());
    let s = admin.revoke_station(revoke("deadbeef", &uri("berlin", 2), false)).await.unwrap_err();
    assert!(s.message().contains("its known serials: none"), "{}", s.message());
    assert!(
        admin
            .list_stations(pb::ListStationsRequest {})
            .await
            .unwrap()
            .into_inner()
            .stations
            .iter()
            .all(|st| st.certificates.iter().all(|c| !c.revoked))
    );
    broker.station("berlin", 1).await.issue("lot-1", &world.chip()).await.expect("berlin/1 still works");

    // A known serial named with the wrong station.
    let s = admin.revoke_station(revoke(&seen, &uri("berlin", 2), false)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("belongs to") && s.message().contains(&uri("berlin", 1)), "{}", s.message());

    // Forced: the certificate of berlin/2, issued but never used, is revoked before it connects.
    let unused = world.pki.serial(&TestPki::station("berlin", 2));
    let r = admin.revoke_station(revoke(&unused, &uri("berlin", 2), true)).await.unwrap().into_inner();
    assert_eq!(r.serials, vec![unused.clone()]);
    assert!(r.warnings[0].contains("revoked in advance for"), "{:?}", r.warnings);
    // Its first connection is refused (at the handshake, or by the first RPC: TLS 1.3 checks the client late).
    let tls = world.pki.client_tls(&TestPki::station("berlin", 2));
    let refused = match transport::connect(&broker.url(), tls, None).await {
        Err(_) => true,
        Ok(ch) => LicenceServiceClient::new(ch)
            .issue_licence(pb::IssueLicenceRequest {
                batch_id: "lot-1".into(),
                chip_certificate: world.chip().cert_bytes(),
                probe: None,
            })
            .await
            .is_err(),
    };
    assert!(refused, "a pre-revoked certificate got a licence");
    let again = admin.revoke_station(revoke(&unused, "", true)).await.unwrap().into_inner();
    assert!(again.warnings.iter().any(|w| w.contains("already revoked")), "{:?}", again.warnings);
}
