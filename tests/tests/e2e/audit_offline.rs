//! Signed audit checkpoints and offline verification (issue 13), against a real broker (soft keystore
//! holding its audit-signing key, SQLite ledger) whose ledger is then rewritten by direct SQL, as
//! someone with write access to the database would: the export (`ExportAuditBundle`) verified with
//! `flashgate_common::audit_export::verify` and nothing else — the intact export verifies; (a) the
//! last 3 records deleted and the head moved back is named by the checkpoint beyond the new head;
//! (b) one record edited and the 126 records from it re-chained is named by the first checkpoint after
//! it (with the last one that still agrees), and forged checkpoint bytes fail their signature; (c) with
//! the checkpoints after the rewrite deleted too, only the station's witness — the checkpoint its
//! licence response carried, kept in its journal directory — names it; (d) a truncated export is named.
//! Also when the broker signs: after N records of its writer, on its timer for records written outside
//! it, and at shutdown (the file sink receiving each), and that licence responses carry the newest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flashgate_agent::witness::{self, Noted, Witnesses};
use flashgate_broker::checkpoint::{self, CheckpointSettings, Sink};
use flashgate_broker::hsm::AuditPublicKey;
use flashgate_broker::ledger::audit::AuditRecord;
use flashgate_common::audit_export::{self, Report, VerifyError};
use flashgate_common::checkpoint::{SignedCheckpoint, WitnessError};
use flashgate_proto::v1 as pb;
use flashgate_tests::broker::{BrokerSpec, TestBroker, World};
use sqlx::Connection;
use tokio_stream::StreamExt;

/// A broker that signs only when told (and at start and on export), appending to `sinks`.
fn spec(sinks: Vec<std::path::PathBuf>) -> BrokerSpec {
    BrokerSpec {
        checkpoints: CheckpointSettings {
            every_records: 1_000_000,
            interval: std::time::Duration::from_secs(3600),
            sinks: sinks.into_iter().map(Sink::File).collect(),
        },
        ..BrokerSpec::default()
    }
}

async fn fill_to(broker: &TestBroker, seq: i64) {
    let ledger = broker.running().state().ledger();
    let (mut head, _) = ledger.audit_head().await.unwrap();
    while head < seq {
        ledger
            .record_event("admin", "test.filler", format!("filler/{head}"), serde_json::json!({"n": head}))
            .await
            .unwrap();
        head += 1;
    }
}

async fn sign(broker: &TestBroker) -> SignedCheckpoint {
    checkpoint::sign_now(broker.running().state(), "test").await.unwrap()
}

/// The scenario's ledger: 6 licences, checkpoints at seq 0 (start), 60, 120 and 200, each also appended
/// to the file sink `dir/sink.hex`, and the station berlin/1 holding (as its witness, in `dir`) the
/// checkpoint at seq 120 its last licence carried.
async fn scenario(world: &std::sync::Arc<World>, dir: &std::path::Path) -> TestBroker {
    let broker = world.start_broker(spec(vec![dir.join("sink.hex")])).await;
    broker.seed_batch("lot", 20, &["berlin"]).await;
    let st = broker.station("berlin", 1).await;
    for _ in 0..5 {
        st.issue("lot", &world.chip()).await.unwrap();
    }
    fill_to(&broker, 60).await;
    assert_eq!(sign(&broker).await.head.seq, 60);
    fill_to(&broker, 120).await;
    let at_120 = sign(&broker).await;
    assert_eq!(at_120.head.seq, 120);
    // The station's next licence carries the newest checkpoint; it keeps it beside its journal.
    let r = st.issue("lot", &world.chip()).await.unwrap();
    assert_eq!(r.checkpoint, at_120.to_bytes().unwrap().to_vec(), "the licence response carries the newest checkpoint");
    assert_eq!(Witnesses::open(dir).unwrap().note(&r.checkpoint).unwrap(), Some(Noted::Kept));
    fill_to(&broker, 200).await;
    assert_eq!(sign(&broker).await.head.seq, 200);
    broker
}

fn trusted(broker: &TestBroker) -> Vec<AuditPublicKey> {
    let keys: Vec<AuditPublicKey> = broker.running().state().pool().audit_keys().into_iter().map(|(_, k)| k).collect();
    assert_eq!(keys.len(), 1, "the soft keystore holds one audit-signing key");
    keys
}

async fn export(broker: &TestBroker) -> Vec<u8> {
    let mut admin = broker.admin().await;
    let chunks: Vec<pb::AuditBundleChunk> = admin
        .export_audit_bundle(pb::ExportAuditBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    chunks.into_iter().flat_map(|c| c.data).collect()
}

fn verify(
    bytes: &[u8],
    keys: &[AuditPublicKey],
    witnesses: &[(String, SignedCheckpoint)],
) -> Result<Report, VerifyError> {
    audit_export::verify(bytes, keys, witnesses)
}

/// The station's witness file, read as `flashgate audit verify --witness` reads it.
fn station_witnesses(dir: &std::path::Path) -> Vec<(String, SignedCheckpoint)> {
    let path = dir.join(witness::CHECKPOINT_FILE);
    audit_export::read_witnesses("station berlin/1 checkpoints.hex", &std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The broker's file sink, read as `flashgate audit verify --witness` reads it.
fn sink_witnesses(dir: &std::path::Path) -> Vec<(String, SignedCheckpoint)> {
    audit_export::read_witnesses("sink.hex", &std::fs::read_to_string(dir.join("sink.hex")).unwrap()).unwrap()
}

async fn raw_sql(broker: &TestBroker, statements: &[String]) {
    let mut conn = sqlx::SqliteConnection::connect(broker.ledger_url()).await.unwrap();
    for s in statements {
        sqlx::raw_sql(s).execute(&mut conn).await.unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intact_export_verifies_offline_and_a_truncated_one_is_named() {
    let world = World::new();
    let dir = tempfile::tempdir().unwrap();
    let broker = scenario(&world, dir.path()).await;
    let keys = trusted(&broker);
    let bytes = export(&broker).await;
    let r = verify(&bytes, &keys, &station_witnesses(dir.path())).unwrap();
    assert_eq!(r.records, 200);
    assert_eq!(r.ledger_id, hex::encode(broker.running().state().ledger().ledger_id()));
    assert_eq!(r.licences, 6);
    assert_eq!(r.batches, 1);
    assert!(r.checkpoints >= 3, "{r:?}");
    assert_eq!(r.witnesses, 1);
    assert_eq!(r.newest_checkpoint, 200);
    assert_eq!(r.unsigned_tail(), 0, "the export signs the head first");
    // The file sink holds every checkpoint signed, in the witness format.
    let sink = sink_witnesses(dir.path());
    assert_eq!(sink.iter().map(|(_, c)| c.head.seq).collect::<Vec<_>>()[..4], [0, 60, 120, 200]);
    assert_eq!(verify(&bytes, &keys, &sink).unwrap().witnesses, sink.len() as u64);

    // (d) Cut anywhere — between lines or inside one — the export is named truncated.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let whole_lines = lines[..lines.len() - 1].join("\n") + "\n";
    for cut in [&bytes[..bytes.len() / 2], whole_lines.as_bytes(), &bytes[..bytes.len() - 1]] {
        let e = verify(cut, &keys, &[]).unwrap_err();
        assert!(matches!(e, VerifyError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    // Another broker's key verifies nothing.
    let other = world.start_broker(spec(Vec::new())).await;
    let e = verify(&bytes, &trusted(&other), &[]).unwrap_err();
    assert!(matches!(e, VerifyError::Checkpoint { .. }), "{e}");
    assert!(e.to_string().contains("does not verify under any trusted key"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_last_3_records_and_moving_the_head_back_is_named_by_a_checkpoint() {
    let world = World::new();
    let dir = tempfile::tempdir().unwrap();
    let broker = scenario(&world, dir.path()).await;
    raw_sql(
        &broker,
        &[
            "DELETE FROM audit WHERE seq > 197".into(),
            "UPDATE audit_head SET seq = 197, hash = (SELECT hash FROM audit WHERE seq = 197) WHERE id = 1".into(),
        ],
    )
    .await;
    // The chain and head agree with themselves, but the stored checkpoint at seq 200 does not (online too).
    let online = broker.running().state().ledger().verify_audit().await.unwrap_err();
    assert!(online.to_string().contains("checkpoint seq 200") && online.to_string().contains("198"), "{online}");
    let e = verify(&export(&broker).await, &trusted(&broker), &[]).unwrap_err();
    match &e {
        VerifyError::Witness {
            error: WitnessError::ChainTooShort { witness, seq, chain_end, first_missing }, ..
        } => {
            assert_eq!((*seq, *chain_end, *first_missing), (200, 197, 198));
            assert!(witness.contains("checkpoint seq 200 signed by broker-1"), "{witness}");
        }
        other => panic!("expected the checkpoint at seq 200 to name the truncation, got {other}"),
    }
    assert!(e.to_string().contains("first missing seq 198"), "{e}");
}

/// `UPDATE`s that edit the record at `edit`, re-chain it and every later record, and move the head.
fn rechain_from(records: &mut [AuditRecord], edit: usize) -> Vec<String> {
    records[edit].details = r#"{"n":74,"quota":999}"#.into();
    let mut out = Vec::new();
    for i in edit..records.len() {
        records[i].prev_hash = records[i - 1].hash.clone();
        records[i].hash = records[i].compute_hash().to_vec();
        let r = &records[i];
        out.push(format!(
            "UPDATE audit SET details = '{}', prev_hash = x'{}', hash = x'{}' WHERE seq = {}",
            r.details,
            hex::encode(&r.prev_hash),
            hex::encode(&r.hash),
            r.seq
        ));
    }
    let last = records.last().unwrap();
    out.push(format!("UPDATE audit_head SET hash = x'{}' WHERE id = 1", hex::encode(&last.hash)));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rechaining_126_records_after_an_edit_is_named_by_the_signed_checkpoints() {
    let world = World::new();
    let dir = tempfile::tempdir().unwrap();
    let broker = scenario(&world, dir.path()).await;
    let ledger = broker.running().state().ledger();
    let mut records = ledger.audit_page(0, 1000).await.unwrap();
    assert_eq!(records[74].event, "test.filler");
    let statements = rechain_from(&mut records, 74);
    assert_eq!(statements.len() - 1, 126, "seq 75 to 200 re-chained");
    raw_sql(&broker, &statements).await;
    // Online, the stored checkpoints the rewrite left in place name it too.
    let online = ledger.verify_audit().await.unwrap_err();
    assert!(
        online.to_string().contains("checkpoint seq 120") && online.to_string().contains("after seq 60"),
        "{online}"
    );

    let keys = trusted(&broker);
    let bytes = export(&broker).await;
    let e = verify(&bytes, &keys, &[]).unwrap_err();
    match &e {
        VerifyError::Witness { error: WitnessError::HashDiffers { witness, seq }, after } => {
            assert_eq!(*seq, 120, "the first checkpoint after the edit");
            assert!(witness.contains("checkpoint seq 120"), "{witness}");
            assert_eq!(
                after.as_ref().map(|(s, _)| *s),
                Some(60),
                "the rewrite lies after the last agreeing checkpoint"
            );
        }
        other => panic!("expected the checkpoint at seq 120 to name the rewrite, got {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("at or before seq 120") && msg.contains("after seq 60"), "{msg}");

    // The rewriter also puts the new hashes into the stored checkpoints: their signatures fail.
    let mut forged = Vec::new();
    for cp in ledger.checkpoints(100).await.unwrap() {
        let Some(r) = records.iter().find(|r| r.seq == cp.seq) else { continue };
        let mut b = cp.bytes.clone();
        b[48..80].copy_from_slice(&r.hash);
        forged.push(format!(
            "UPDATE audit_checkpoints SET bytes = x'{}', hash = x'{}' WHERE broker = '{}' AND seq = {} AND at = {}",
            hex::encode(&b),
            hex::encode(&r.hash),
            cp.broker,
            cp.seq,
            cp.at
        ));
    }
    raw_sql(&broker, &forged).await;
    let e = verify(&export(&broker).await, &keys, &[]).unwrap_err();
    assert!(matches!(e, VerifyError::Checkpoint { .. }), "{e}");
    assert!(e.to_string().contains("does not verify under any trusted key"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_checkpoints_are_caught_by_the_stations_witness() {
    let world = World::new();
    let dir = tempfile::tempdir().unwrap();
    let broker = scenario(&world, dir.path()).await;
    let ledger = broker.running().state().ledger();
    // Everything after seq 100 goes — records, the licence issued at seq 121 and its unit of quota,
    // and every checkpoint beyond the new head: the export is self-consistent.
    let issued_121 = ledger.audit_page(120, 1).await.unwrap().pop().unwrap();
    assert_eq!(issued_121.event, "licence.issued");
    let device = issued_121.subject.rsplit('/').next().unwrap().to_owned();
    raw_sql(
        &broker,
        &[
            "DELETE FROM audit WHERE seq > 100".into(),
            "UPDATE audit_head SET seq = 100, hash = (SELECT hash FROM audit WHERE seq = 100) WHERE id = 1".into(),
            format!("DELETE FROM licences WHERE batch_id = 'lot' AND device_id = '{device}'"),
            "UPDATE batches SET issued = issued - 1 WHERE id = 'lot'".into(),
            "DELETE FROM audit_checkpoints WHERE seq > 100".into(),
        ],
    )
    .await;
    let keys = trusted(&broker);
    let bytes = export(&broker).await;
    ledger.verify_audit().await.expect("with its checkpoints deleted the database agrees with itself");
    let r = verify(&bytes, &keys, &[]).expect("without a witness the shortened history is undetectable");
    assert_eq!((r.records, r.licences), (100, 5));
    // The station still holds the checkpoint at seq 120 its licence response carried.
    let witnesses = station_witnesses(dir.path());
    assert_eq!(witnesses[0].1.head.seq, 120);
    let e = verify(&bytes, &keys, &witnesses).unwrap_err();
    match &e {
        VerifyError::Witness { error: WitnessError::ChainTooShort { witness, seq, first_missing, .. }, .. } => {
            assert_eq!((*seq, *first_missing), (120, 101));
            assert!(witness.contains("station berlin/1 checkpoints.hex:2"), "{witness}");
        }
        other => panic!("expected the station's witness to name the deletion, got {other}"),
    }
    // The broker's file sink, outside the database too, names it as well.
    let e = verify(&bytes, &keys, &sink_witnesses(dir.path())).unwrap_err();
    assert!(matches!(e, VerifyError::Witness { error: WitnessError::ChainTooShort { .. }, .. }), "{e}");
    assert!(e.to_string().contains("sink.hex:"), "{e}");
}

/// Waits up to 5 s for the newest stored checkpoint to reach `seq`.
async fn newest_reaches(broker: &TestBroker, seq: i64) -> i64 {
    let ledger = broker.running().state().ledger();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let got = ledger.latest_checkpoint().await.unwrap().map_or(-1, |c| c.seq);
        if got >= seq || std::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_signs_every_n_records_every_interval_and_at_shutdown() {
    let world = World::new();
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("sink.hex");
    let hour = std::time::Duration::from_secs(3600);
    let mut broker = world
        .start_broker(BrokerSpec {
            checkpoints: CheckpointSettings { every_records: 5, interval: hour, sinks: vec![Sink::File(sink.clone())] },
            ..BrokerSpec::default()
        })
        .await;
    broker.seed_batch("lot", 20, &["berlin"]).await;
    let st = broker.station("berlin", 1).await;
    // Five licences through the group-commit writer wake the signer (its timer is an hour away).
    for _ in 0..5 {
        st.issue("lot", &world.chip()).await.unwrap();
    }
    let (head, _) = broker.running().state().ledger().audit_head().await.unwrap();
    assert_eq!(newest_reaches(&broker, head).await, head, "a checkpoint after 5 records");
    // The next licence response carries it.
    let r = st.issue("lot", &world.chip()).await.unwrap();
    assert_eq!(SignedCheckpoint::parse(&r.checkpoint).unwrap().head.seq, head as u64);
    // At shutdown the last records are signed before the ledger closes.
    fill_to(&broker, head + 3).await;
    let url = broker.ledger_url().to_owned();
    broker.shutdown().await;
    let ledger = flashgate_broker::ledger::Ledger::open(&url).await.unwrap();
    let last = ledger.latest_checkpoint().await.unwrap().unwrap();
    assert_eq!(last.seq, head + 3, "the shutdown checkpoint covers the last record");
    let sunk = audit_export::read_witnesses("sink", &std::fs::read_to_string(&sink).unwrap()).unwrap();
    assert_eq!(sunk.last().unwrap().1.head.seq, (head + 3) as u64, "the sink got it too");

    // Another broker, signing on its 1 s timer only: a record outside the writer is signed within it.
    let timed = world
        .start_broker(BrokerSpec {
            checkpoints: CheckpointSettings {
                every_records: 1_000_000,
                interval: std::time::Duration::from_secs(1),
                sinks: Vec::new(),
            },
            ..BrokerSpec::default()
        })
        .await;
    fill_to(&timed, 3).await;
    assert_eq!(newest_reaches(&timed, 3).await, 3, "a checkpoint within the interval");
}
