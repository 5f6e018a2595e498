//! Two `flashgate broker` processes sharing one PostgreSQL ledger, driven as an operator would: a
//! development PKI from `flashgate pki init`, the same firmware key imported into both brokers' soft
//! keystores under one key id with `flashgate admin key import`, an image packed and a batch of quota
//! 8 created through one broker, then 64 concurrent licence requests (distinct chips) split across the
//! two processes. Exactly 8 licences exist afterwards, whichever broker is asked; a retry through the
//! other broker returns the same bytes. Both brokers' audit keys (`admin audit key`) verify an export
//! (`admin audit export`) offline with `flashgate audit verify`; one key alone does not. The batch's
//! certificate of conformance, its device export (JSON lines and CSV) and its report come from either
//! broker; the certificate verifies offline with a later export, and one with a changed count does not.
//! Also
//! `broker --check` on the commented example's shape and graceful stop on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../broker/tests/integration/support/pg.rs"]
mod pg;

use crate::support::{BrokerProcess, admin, ok, run, write_config};
use flashgate_common::cert::{ChipKey, VendorCa};
use flashgate_proto::errors::Refusal;
use flashgate_proto::transport::{TlsFiles, client_config, connect};
use flashgate_proto::v1::IssueLicenceRequest;
use flashgate_proto::v1::licence_service_client::LicenceServiceClient;

#[test]
fn two_broker_processes_on_one_postgres_never_exceed_a_shared_quota() {
    let Some(cluster) = pg::PgCluster::start() else { return };
    let ledger_url = cluster.create_db("two_brokers");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(
        dir,
        &[
            "pki",
            "init",
            "--dir",
            "pki",
            "--trust-domain",
            "factory.test",
            "--site",
            "berlin",
            "--site",
            "austin",
            "--stations",
            "2",
            "--admin",
            "ops",
            "--broker",
            "broker-1",
            "--broker",
            "broker-2",
            "--broker-ip",
            "127.0.0.1",
        ],
    );
    ok(dir, &["sim", "vendor-ca", "--out", "vendor"]);
    let c1 = write_config(dir, "broker-1", &ledger_url);
    let c2 = write_config(dir, "broker-2", &ledger_url);
    let check = ok(dir, &["broker", "--config", c1.to_str().unwrap(), "--check"]);
    assert!(check.contains("configuration OK"), "{check}");

    let b1 = BrokerProcess::start(dir, &c1);
    let b2 = BrokerProcess::start(dir, &c2);

    // The key ceremony from key files: one key.bin into both keystores under one key id.
    std::fs::write(dir.join("key.bin"), rand::random::<[u8; 16]>()).unwrap();
    let k1 = admin(dir, &b1.url, &["key", "import", "--label", "fw-1", "--key", "key.bin"]);
    let key_id = k1["key_id"].as_str().unwrap().to_owned();
    let k2 = admin(dir, &b2.url, &["key", "import", "--label", "fw-1", "--key", "key.bin", "--key-id", &key_id]);
    assert_eq!(k2["key_id"], k1["key_id"]);

    std::fs::write(dir.join("fw.bin"), vec![0x5Au8; 4096]).unwrap();
    let img = admin(
        dir,
        &b1.url,
        &["image", "pack", "--key-id", &key_id, "--family", "stm32l4", "--product", "46201002", "fw.bin@0x08000000"],
    );
    let sha = img["sha256"].as_str().unwrap().to_owned();
    admin(
        dir,
        &b2.url,
        &["batch", "create", "lot-7", "--product", "46201002", "--image", &sha, "--quota", "8", "--site", "berlin"],
    );

    // 64 distinct chips, requests alternating between the two broker processes.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let vendor = flashgate_sim::load_vendor_ca(&dir.join("vendor/vendor-ca.key")).unwrap();
    let (issued, refused, retry_same) = rt.block_on(async {
        let station = flashgate_common::pki::Identity::station("factory.test", "berlin", 1).unwrap();
        let tls = client_config(&TlsFiles::for_identity(&dir.join("pki"), &station)).unwrap();
        let clients = [
            LicenceServiceClient::new(connect(&b1.url, tls.clone(), None).await.unwrap()),
            LicenceServiceClient::new(connect(&b2.url, tls.clone(), None).await.unwrap()),
        ];
        let certs: Vec<Vec<u8>> = (0..64).map(|_| chip_cert(&vendor)).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, cert) in certs.iter().cloned().enumerate() {
            let mut c = clients[i % 2].clone();
            tasks.spawn(async move {
                let r = c
                    .issue_licence(IssueLicenceRequest {
                        batch_id: "lot-7".into(),
                        chip_certificate: cert.clone(),
                        probe: None,
                    })
                    .await;
                (cert, r)
            });
        }
        let (mut issued, mut refused) = (Vec::new(), 0);
        while let Some(j) = tasks.join_next().await {
            match j.unwrap() {
                (cert, Ok(resp)) => issued.push((cert, resp.into_inner().licence)),
                (_, Err(status)) => {
                    let r = Refusal::from_status(&status).unwrap_or_else(|| panic!("not a refusal: {status:?}"));
                    assert_eq!(r.reason, "QUOTA_EXHAUSTED", "{status:?}");
                    refused += 1;
                }
            }
        }
        // A retry through the other broker returns the same licence and consumes nothing.
        let (cert, licence) = issued[0].clone();
        let mut again = 0;
        for c in &clients {
            let r = c
                .clone()
                .issue_licence(IssueLicenceRequest {
                    batch_id: "lot-7".into(),
                    chip_certificate: cert.clone(),
                    probe: None,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(r.reissued);
            if r.licence == licence {
                again += 1;
            }
        }
        (issued.len(), refused, again)
    });
    assert_eq!(issued, 8, "exactly the quota is issued across both brokers");
    assert_eq!(refused, 56);
    assert_eq!(retry_same, 2);

    for b in [&b1, &b2] {
        let status = admin(dir, &b.url, &["batch", "status", "lot-7"]);
        assert_eq!(status["issued"].as_i64(), Some(8), "{status}");
        assert_eq!(status["remaining"].as_i64(), Some(0), "{status}");
    }
    let verify = admin(dir, &b2.url, &["audit", "verify"]);
    assert_eq!(verify["ok"], serde_json::Value::Bool(true), "{verify}");

    // Offline verification (issue 13): each broker's audit key from its HSM, one export holding the
    // checkpoints both signed, verified with no broker and no database.
    let adm = |url: &str, args: &[&str]| {
        let mut full = vec!["admin", "--broker", url, "--pki", "pki", "--name", "ops"];
        full.extend_from_slice(args);
        ok(dir, &full)
    };
    let hsm = admin(dir, &b1.url, &["hsm"]);
    assert_eq!(hsm["members"][0]["audit_key_fingerprint"].as_str().map(str::len), Some(64), "{hsm}");
    adm(&b1.url, &["audit", "key", "--out", "keys-1.pem"]);
    adm(&b2.url, &["audit", "key", "--out", "keys-2.pem"]);
    let cp = adm(&b1.url, &["audit", "checkpoint"]);
    assert!(cp.contains("signed by broker-1"), "{cp}");
    adm(&b2.url, &["audit", "export", "--out", "audit.jsonl"]);
    let out = ok(dir, &["audit", "verify", "audit.jsonl", "--trust", "keys-1.pem", "--trust", "keys-2.pem"]);
    assert!(out.contains("audit export ok"), "{out}");
    assert!(out.contains("8 licences and 1 batches reconciled"), "{out}");
    let one = run(dir, &["audit", "verify", "audit.jsonl", "--trust", "keys-1.pem"]);
    assert!(!one.status.success(), "broker-2's checkpoints do not verify under broker-1's key alone");
    let err = String::from_utf8_lossy(&one.stderr);
    assert!(err.contains("does not verify under any trusted key"), "{err}");

    // Traceability (issue 13 items 4-5) on the shared PostgreSQL ledger: the certificate of conformance
    // from one broker, the device export and the report from the other, verified offline with an export
    // taken after the certificate.
    let out = adm(&b1.url, &["batch", "certificate", "lot-7", "--out", "cert"]);
    // 64 chips asked: 8 licensed, 56 refused once each (QUOTA_EXHAUSTED), none reported.
    assert!(out.contains("64 devices, 8 licensed, 0 installed, 0 failed, 8 not reported, 56 refusals"), "{out}");
    adm(&b2.url, &["export", "devices", "--batch", "lot-7", "--format", "csv", "--out", "lot-7.csv"]);
    let csv = std::fs::read_to_string(dir.join("lot-7.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 64, "a header and one row per device: {csv}");
    adm(&b2.url, &["export", "devices", "--batch", "lot-7", "--out", "lot-7.jsonl"]);
    assert_eq!(
        std::fs::read(dir.join("lot-7.jsonl")).unwrap(),
        std::fs::read(dir.join("cert/lot-7.devices.jsonl")).unwrap(),
        "both brokers export the same bytes of the shared ledger"
    );
    let report = admin(dir, &b2.url, &["batch", "report", "lot-7"]);
    assert_eq!((report["devices"].as_u64(), report["licensed"].as_u64()), (Some(64), Some(8)), "{report}");
    assert_eq!(report["total"]["refused"]["QUOTA_EXHAUSTED"].as_u64(), Some(56), "{report}");
    adm(&b2.url, &["audit", "export", "--out", "audit-2.jsonl"]);
    let cert_args = ["--certificate", "cert/lot-7.conformance.json", "--devices", "cert/lot-7.devices.jsonl"];
    let mut args = vec!["audit", "verify", "audit-2.jsonl", "--trust", "keys-1.pem", "--trust", "keys-2.pem"];
    args.extend_from_slice(&cert_args);
    let out = ok(dir, &args);
    assert!(out.contains("certificate of conformance ok: batch lot-7 by broker-1: 64 devices, 8 licensed"), "{out}");
    let text = std::fs::read_to_string(dir.join("cert/lot-7.conformance.json")).unwrap();
    std::fs::write(dir.join("cert/forged.json"), text.replace("\"issued\": 8", "\"issued\": 7")).unwrap();
    let mut args = vec!["audit", "verify", "audit-2.jsonl", "--trust", "keys-1.pem", "--trust", "keys-2.pem"];
    args.extend_from_slice(&["--certificate", "cert/forged.json", "--devices", "cert/lot-7.devices.jsonl"]);
    let forged = run(dir, &args);
    assert!(!forged.status.success(), "a certificate with a changed count does not verify");
    let err = String::from_utf8_lossy(&forged.stderr);
    assert!(err.contains("signature does not verify"), "{err}");

    assert!(b1.stop().success(), "broker-1 exits 0 on SIGTERM");
    assert!(b2.stop().success(), "broker-2 exits 0 on SIGTERM");
}

fn chip_cert(vendor: &VendorCa) -> Vec<u8> {
    let chip = ChipKey::generate(&mut rand::rngs::OsRng);
    vendor.sign_certificate(*b"46201002", chip.public_xy()).to_bytes().to_vec()
}
