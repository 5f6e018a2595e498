//! `flashgate bench ledger`: traceability at scale (issue 13 item 6), on a SQLite ledger (WAL,
//! `synchronous=FULL`, group commit) filled through the ledger's own write path — precheck and commit of
//! every licence by concurrent callers, then an install report per device — to `--devices` devices.
//! Measured in one run: licence issuance rate on the empty ledger and on the full one (the same callers
//! and sample size), the per-device export (`flashgate-devices-v1`) time and the process's peak resident
//! memory while it runs (peak reset first through `/proc/self/clear_refs`), and offline verification
//! throughput of the audit export and of the devices file against raw SHA-256 over the same bytes in
//! memory. Checkpoints are signed with a key made for the run (no HSM in this measurement).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use flashgate_broker::ledger::{
    InstallReport, IssueRecord, KeyRecord, Ledger, NewBatch, NewImage, Precheck, PrecheckRequest, StoredCheckpoint,
};
use flashgate_common::audit_export;
use flashgate_common::checkpoint::CheckpointHead;
use flashgate_common::device_export;
use sha2::{Digest, Sha256};

use super::bench_proc::{process_memory, reset_peak_memory};

/// Arguments of `flashgate bench ledger`.
#[derive(Debug, Args)]
pub struct LedgerBenchArgs {
    /// Devices on the ledger when the export and the second issuance sample run (each licensed and
    /// reported installed).
    #[arg(long, default_value_t = 1_000_000, value_parser = super::number_at_least(1000usize))]
    pub devices: usize,
    /// Licences timed on the empty ledger and again on the full one.
    #[arg(long, default_value_t = 20_000, value_parser = super::number_at_least(100usize))]
    pub sample: usize,
    /// Concurrent callers of the ledger.
    #[arg(long, default_value_t = 64, value_parser = super::number_at_least(1usize))]
    pub callers: usize,
    /// Directory for the ledger, the export files and the key that verifies them (`trust.pem`); default:
    /// a temporary directory, removed after.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const PRODUCT: &str = "46201002";
const BATCH: &str = "bench";
const STATION: &str = "spiffe://bench.test/site/lyon/station/1";

fn device(i: usize) -> String {
    format!("{i:032x}")
}

/// Licence-sized bytes that differ per device (the ledger stores them; nothing opens them here).
fn licence_bytes(i: usize) -> Vec<u8> {
    let d = Sha256::digest(i.to_be_bytes());
    d.iter().cycle().take(132).copied().collect()
}

/// Issues licences for devices `range` through precheck and commit with `callers` concurrent callers.
async fn issue(l: &Ledger, range: std::ops::Range<usize>, callers: usize) -> Result<Duration> {
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (l, next, end) = (l.clone(), next.clone(), range.end);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, anyhow::Error>(());
                }
                let req = PrecheckRequest {
                    batch_id: BATCH.into(),
                    device_id: device(i),
                    product_id: PRODUCT.into(),
                    station: STATION.into(),
                    site: "lyon".into(),
                    actor: STATION.into(),
                    lease_wait: false,
                };
                match l.precheck(&req).await? {
                    Precheck::Existing(_) => bail!("device {i} already licensed"),
                    Precheck::Proceed(_) => {}
                }
                l.commit_issue(IssueRecord {
                    batch_id: BATCH.into(),
                    device_id: device(i),
                    product_id: PRODUCT.into(),
                    licence: licence_bytes(i),
                    certificate: vec![0xC5; 136],
                    station: STATION.into(),
                    site: "lyon".into(),
                    actor: STATION.into(),
                    lease_wait: false,
                })
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await.context("issuing task")??;
    }
    Ok(start.elapsed())
}

/// Reports every device of `range` installed (one report each, with timings and a probe).
async fn report(l: &Ledger, range: std::ops::Range<usize>, callers: usize) -> Result<()> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (l, next, end) = (l.clone(), next.clone(), range.end);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, anyhow::Error>(());
                }
                l.report_install(InstallReport {
                    station: STATION.into(),
                    result_id: i.to_string(),
                    batch_id: BATCH.into(),
                    device_id: device(i),
                    status_code: 0,
                    message: "installed".into(),
                    flash_crc: Some(0x1234_5678),
                    attempt: 1,
                    timings_json: format!(
                        r#"{{"connect_us":{},"licence_us":2100,"install_us":{},"probe":{{"id":"p{}","kind":"sim","port":"sim://{}"}}}}"#,
                        1000 + i % 500,
                        250_000 + i % 10_000,
                        i % 64,
                        i % 64
                    ),
                    actor: STATION.into(),
                })
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await.context("reporting task")??;
    }
    Ok(())
}

/// A line channel whose lines a blocking task writes to `path`.
fn file_writer(path: PathBuf) -> (tokio::sync::mpsc::Sender<String>, tokio::task::JoinHandle<Result<()>>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    let task = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        while let Some(line) = rx.blocking_recv() {
            w.write_all(line.as_bytes())?;
        }
        w.flush()?;
        Ok(())
    });
    (tx, task)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Best of `runs` timings of `f`.
fn best<T>(runs: u32, mut f: impl FnMut() -> Result<T>) -> Result<(Duration, T)> {
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f()?;
        let d = t.elapsed();
        if out.as_ref().is_none_or(|(b, _)| d < *b) {
            out = Some((d, v));
        }
    }
    out.context("no runs")
}

/// Run `flashgate bench ledger`.
pub async fn run(a: LedgerBenchArgs) -> Result<()> {
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let url = format!("sqlite://{}", dir.join("ledger.db").display());
    let l = Ledger::open(&url).await?;
    let key = KeyRecord {
        key_id: "00112233445566778899aabbccddeeff".into(),
        label: "bench".into(),
        backend: "soft".into(),
        backend_ref: "bench".into(),
    };
    l.add_key(&key, "bench").await?;
    let image = NewImage {
        key_id: key.key_id.clone(),
        nonce: [7; 12],
        family: "stm32l4".into(),
        product_id: PRODUCT.into(),
        area_count: 1,
        expected_crc: None,
    };
    let meta = l.put_image(&image, b"bench image", "bench").await?;
    l.create_batch(
        &NewBatch {
            id: BATCH.into(),
            product_id: PRODUCT.into(),
            image_sha256: meta.sha256,
            quota: i64::try_from(a.devices + a.sample).unwrap_or(i64::MAX),
            allowed_sites: vec!["lyon".into()],
            not_before: None,
            not_after: None,
        },
        "bench",
    )
    .await?;

    // Issuance on the empty ledger, then fill it to --devices, then issuance again.
    let empty = issue(&l, 0..a.sample, a.callers).await?;
    let fill_start = Instant::now();
    let step = 100_000;
    let mut done = a.sample;
    while done < a.devices {
        let end = (done + step).min(a.devices);
        issue(&l, done..end, a.callers).await?;
        done = end;
        eprintln!(
            "ledger bench: {done} of {} devices licensed ({:.0} s)",
            a.devices,
            fill_start.elapsed().as_secs_f64()
        );
    }
    let mut done = 0;
    while done < a.devices {
        let end = (done + step).min(a.devices);
        report(&l, done..end, a.callers).await?;
        done = end;
        eprintln!(
            "ledger bench: {done} of {} devices reported ({:.0} s)",
            a.devices,
            fill_start.elapsed().as_secs_f64()
        );
    }
    let full = issue(&l, a.devices..a.devices + a.sample, a.callers).await?;
    let rate = |d: Duration| a.sample as f64 / d.as_secs_f64();

    // A checkpoint of the head, signed with a key made for the run, so the export verifies.
    let signing = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    // With --dir the files stay, with the key that verifies them: `flashgate audit verify DIR/audit.jsonl
    // --trust DIR/trust.pem` reruns the verification on its own.
    {
        use p256::pkcs8::EncodePublicKey as _;
        let pem = signing.verifying_key().to_public_key_pem(p256::pkcs8::LineEnding::LF)?;
        std::fs::write(dir.join("trust.pem"), pem).context("writing trust.pem")?;
    }
    let (seq, hash) = l.audit_head().await?;
    let hash32: [u8; 32] = hash.as_slice().try_into().context("audit head hash")?;
    let cp = CheckpointHead {
        ledger_id: l.ledger_id(),
        seq: u64::try_from(seq)?,
        hash: hash32,
        at: 0,
        broker: "bench".into(),
    }
    .sign(&signing)?;
    l.store_checkpoint(&StoredCheckpoint { broker: "bench".into(), seq, at: 0, hash, bytes: cp.to_bytes()?.to_vec() })
        .await?;

    // The per-device export, to a file, with the peak RSS of this process reset first.
    let pid = std::process::id();
    reset_peak_memory(pid)?;
    let before = process_memory(pid)?;
    let devices_path = dir.join("devices.jsonl");
    let t = Instant::now();
    let (tx, writer) = file_writer(devices_path.clone());
    let exported = l.export_devices(BATCH, &tx).await?;
    drop(tx);
    writer.await??;
    let export_time = t.elapsed();
    let peak = process_memory(pid)?;

    // The audit export, then both files verified in memory against raw SHA-256 over their bytes.
    let audit_path = dir.join("audit.jsonl");
    let (tx, writer) = file_writer(audit_path.clone());
    l.export_bundle("bench", &tx).await?;
    drop(tx);
    writer.await??;
    l.close().await;

    let audit = std::fs::read(&audit_path).with_context(|| format!("reading {}", audit_path.display()))?;
    let devices = std::fs::read(&devices_path).with_context(|| format!("reading {}", devices_path.display()))?;
    let trusted = [*signing.verifying_key()];
    let (sha_audit, _) = best(3, || Ok(Sha256::digest(&audit)))?;
    let (verify_audit, report) = best(2, || Ok(audit_export::verify(&audit[..], &trusted, &[])?))?;
    let (sha_devices, _) = best(3, || Ok(Sha256::digest(&devices)))?;
    let (verify_devices, summary) = best(2, || Ok(device_export::summarise(&devices[..])?))?;
    if summary.sha256 != exported.sha256 || summary.counts.devices != exported.counts.devices {
        bail!("the devices file read back differs from what the export hashed");
    }
    let tput = |bytes: usize, d: Duration| mb(bytes as u64) / d.as_secs_f64();

    println!(
        "ledger of {} devices (SQLite, WAL, synchronous=FULL), {} callers; filled in {:.0} s",
        report.licences,
        a.callers,
        fill_start.elapsed().as_secs_f64()
    );
    println!();
    println!("| quantity | value |");
    println!("|---|---:|");
    println!("| licences/s on the empty ledger ({} licences) | {:.0} |", a.sample, rate(empty));
    println!("| licences/s at {} devices ({} licences) | {:.0} |", a.devices, a.sample, rate(full));
    println!("| issuance at {} devices vs empty | {:.1}% |", a.devices, 100.0 * rate(full) / rate(empty));
    println!("| device export: devices | {} |", exported.counts.devices);
    println!("| device export: bytes | {:.1} MB |", mb(exported.bytes));
    println!(
        "| device export: time | {:.1} s ({:.0} devices/s) |",
        export_time.as_secs_f64(),
        exported.counts.devices as f64 / export_time.as_secs_f64()
    );
    println!("| device export: peak RSS of the process (before: {:.0} MB) | {:.0} MB |", mb(before.rss), mb(peak.hwm));
    println!("| audit export: records, bytes | {}, {:.1} MB |", report.records, mb(audit.len() as u64));
    println!("| raw SHA-256 over the audit export | {:.0} MB/s |", tput(audit.len(), sha_audit));
    println!("| `audit verify` of the audit export | {:.0} MB/s |", tput(audit.len(), verify_audit));
    println!(
        "| audit verification vs raw SHA-256 | {:.0}% |",
        100.0 * sha_audit.as_secs_f64() / verify_audit.as_secs_f64()
    );
    println!("| raw SHA-256 over the devices file | {:.0} MB/s |", tput(devices.len(), sha_devices));
    println!("| devices file read and checked (`--devices`) | {:.0} MB/s |", tput(devices.len(), verify_devices));
    println!(
        "| devices check vs raw SHA-256 | {:.0}% |",
        100.0 * sha_devices.as_secs_f64() / verify_devices.as_secs_f64()
    );
    Ok(())
}
