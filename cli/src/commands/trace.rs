//! The traceability commands of `flashgate admin`: `device ID` (one device's whole story), `export devices`
//! (every field of every device of a batch, JSON lines or CSV, streamed), `batch report` (yield per site,
//! station and probe) and `batch certificate` (the signed certificate of conformance and the device export
//! it covers). Owns their rendering; the formats are `flashgate_common::{device_export, batch_report,
//! conformance}`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use flashgate_common::batch_report::{BatchReport, GroupReport};
use flashgate_common::cert::ChipCertificate;
use flashgate_common::device_export::{self, DeviceRow, MAX_DEVICE_LINE};
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::admin_service_client::AdminServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::client::RpcResultExt as _;
use crate::output::{OutFile, Table, ms_time};

type Client = AdminServiceClient<Channel>;

/// Output format of `admin export devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DevicesFormat {
    /// flashgate-devices-v1 JSON lines, byte for byte as the broker wrote them (what a certificate hashes).
    Jsonl,
    /// One row per device: licence and latest attempt in columns, every attempt and refusal as JSON.
    Csv,
}

/// `flashgate admin export devices`.
#[derive(Debug, Args)]
pub struct ExportDevicesArgs {
    /// Batch id.
    #[arg(long)]
    pub batch: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: DevicesFormat,
    /// Output file, written whole or not at all (default, or `-`: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Writes `out` (or standard output for `None` and `-`).
fn out_file(out: Option<&Path>) -> Result<OutFile> {
    match out {
        Some(p) if p != Path::new("-") => OutFile::create(p, flashgate_common::atomic_file::PUBLIC_MODE),
        _ => Ok(OutFile::stdout()),
    }
}

/// Splits chunks into whole lines (each at most [`MAX_DEVICE_LINE`] bytes) and hands each to `f`.
#[derive(Default)]
struct Lines {
    rest: Vec<u8>,
}

impl Lines {
    fn feed(&mut self, data: &[u8], mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.rest.extend_from_slice(data);
        let mut start = 0;
        while let Some(n) = self.rest[start..].iter().position(|b| *b == b'\n') {
            f(&self.rest[start..start + n + 1])?;
            start += n + 1;
        }
        self.rest.drain(..start);
        if self.rest.len() > MAX_DEVICE_LINE {
            bail!("the broker sent a device line longer than {MAX_DEVICE_LINE} bytes");
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if !self.rest.is_empty() {
            bail!("the device export ends inside a line ({} bytes after the last newline)", self.rest.len());
        }
        Ok(())
    }
}

/// `admin export devices`.
pub async fn export_devices(client: &mut Client, a: ExportDevicesArgs) -> Result<()> {
    let mut stream = client
        .export_devices(pb::ExportDevicesRequest { batch_id: a.batch.clone() })
        .await
        .rpc(&format!("exporting the devices of batch {}", a.batch))?;
    let writer = out_file(a.out.as_deref())?;
    let target = writer.name().to_string();
    let (mut bytes, mut devices) = (0u64, 0u64);
    let mut lines = Lines::default();
    let (mut raw, mut csv) = match a.format {
        DevicesFormat::Jsonl => (Some(writer), None),
        DevicesFormat::Csv => (None, Some(csv::Writer::from_writer(writer))),
    };
    if let Some(w) = csv.as_mut() {
        device_export::write_csv_header(w)?;
    }
    loop {
        let chunk = match stream.message().await {
            Ok(Some(c)) => c.data,
            Ok(None) => break,
            // The file is not committed: a cut export never replaces a whole one.
            Err(s) => bail!(
                "exporting the devices of batch {}: stream broke after {bytes} bytes: {}",
                a.batch,
                super::client::status_text(&s)
            ),
        };
        bytes += chunk.len() as u64;
        lines.feed(&chunk, |line| {
            if let Some(w) = csv.as_mut() {
                let row: DeviceRow =
                    serde_json::from_slice(line).context("the broker sent a line that is not a device row")?;
                device_export::write_csv_row(w, &row)?;
            }
            devices += 1;
            Ok(())
        })?;
        if let Some(w) = raw.as_mut() {
            w.write_all(&chunk).with_context(|| format!("writing to {target}"))?;
        }
    }
    lines.finish()?;
    let writer = match (raw, csv) {
        (Some(w), _) => w,
        (None, Some(w)) => w.into_inner().map_err(|e| anyhow::anyhow!("writing to {target}: {}", e.error()))?,
        (None, None) => bail!("no output"),
    };
    writer.commit()?;
    eprintln!("{devices} devices of batch {} ({bytes} bytes of flashgate-devices-v1) written to {target}", a.batch);
    Ok(())
}

/// `admin batch certificate B --out DIR`: writes `DIR/B.devices.jsonl`, then `DIR/B.conformance.json`.
pub async fn certificate(client: &mut Client, batch: &str, dir: &Path, json: bool) -> Result<()> {
    use pb::certificate_chunk::Part;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let devices_path = dir.join(format!("{batch}.devices.jsonl"));
    let cert_path = dir.join(format!("{batch}.conformance.json"));
    let mut stream = client
        .batch_certificate(pb::BatchCertificateRequest { batch_id: batch.to_owned() })
        .await
        .rpc(&format!("certificate of conformance of batch {batch}"))?;
    let mut devices = OutFile::create(&devices_path, flashgate_common::atomic_file::PUBLIC_MODE)?;
    let mut cert_text = None;
    let mut bytes = 0u64;
    loop {
        match stream.message().await {
            Ok(Some(pb::CertificateChunk { part: Some(Part::Devices(data)) })) if cert_text.is_none() => {
                bytes += data.len() as u64;
                devices.write_all(&data).with_context(|| format!("writing {}", devices_path.display()))?;
            }
            Ok(Some(pb::CertificateChunk { part: Some(Part::CertificateJson(text)) })) if cert_text.is_none() => {
                cert_text = Some(text);
            }
            Ok(Some(_)) => bail!("the broker sent data after the certificate, or an empty message"),
            Ok(None) => break,
            Err(s) => bail!(
                "certificate of conformance of batch {batch}: stream broke after {bytes} bytes: {}",
                super::client::status_text(&s)
            ),
        }
    }
    let Some(text) = cert_text else { bail!("the broker ended the stream without the certificate") };
    let cert = flashgate_common::conformance::Certificate::parse(text.as_bytes())?;
    if cert.body.devices_bytes != bytes {
        bail!("the certificate covers {} bytes of devices, {bytes} arrived", cert.body.devices_bytes);
    }
    devices.commit()?;
    let mut f = OutFile::create(&cert_path, flashgate_common::atomic_file::PUBLIC_MODE)?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", cert_path.display()))?;
    f.commit()?;
    let c = &cert.body.counts;
    let seq = cert.body.signed_checkpoint().map(|cp| cp.head.seq).unwrap_or(0);
    if json {
        println!(
            "{}",
            json!({
                "batch_id": batch,
                "certificate": cert_path,
                "devices": devices_path,
                "counts": c,
                "devices_sha256": cert.body.devices_sha256,
                "checkpoint_seq": seq,
            })
        );
    } else {
        println!(
            "certificate of conformance of batch {batch}: {} devices, {} licensed, {} installed, {} failed, {} not reported, {} refusals; covers audit seq {seq}",
            c.devices, c.issued, c.installed, c.failed, c.not_reported, c.refusals
        );
        println!(
            "  {}\n  {} ({bytes} bytes, SHA-256 {})",
            cert_path.display(),
            devices_path.display(),
            cert.body.devices_sha256
        );
        println!(
            "verify offline: flashgate audit verify EXPORT --trust KEYS --certificate {} --devices {}",
            cert_path.display(),
            devices_path.display()
        );
    }
    Ok(())
}

/// `admin batch report B`.
pub async fn report(client: &mut Client, batch: &str, json: bool) -> Result<()> {
    let r = client
        .batch_report(pb::BatchReportRequest { batch_id: batch.to_owned() })
        .await
        .rpc(&format!("report of batch {batch}"))?;
    if json {
        println!("{}", r.report_json);
        return Ok(());
    }
    let report: BatchReport =
        serde_json::from_str(&r.report_json).context("the broker's batch report is not readable")?;
    print!("{}", report_text(&report));
    Ok(())
}

fn pct(v: Option<f64>) -> String {
    v.map(|y| format!("{:.1}%", y * 100.0)).unwrap_or_else(|| "-".into())
}

fn counts(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join("; ")
}

fn stages(g: &GroupReport) -> String {
    g.stages
        .iter()
        .map(|(k, s)| format!("{k} {:.1}/{:.1} ms", s.mean_us / 1000.0, s.p95_us as f64 / 1000.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as tables.
pub fn report_text(r: &BatchReport) -> String {
    let mut out = format!(
        "batch {}: {} devices, {} licensed, {} installed; first-pass yield {}, {} devices/hour\n",
        r.batch_id,
        r.devices,
        r.licensed,
        r.installed,
        pct(r.total.first_pass_yield),
        r.total.devices_per_hour.map(|d| format!("{d:.0}")).unwrap_or_else(|| "-".into()),
    );
    for (title, rows) in [("sites", &r.sites), ("stations", &r.stations), ("probes", &r.probes)] {
        if rows.is_empty() {
            continue;
        }
        let mut t = Table::new([
            "",
            "attempts",
            "installed",
            "first pass",
            "per hour",
            "failed",
            "refused",
            "mean/p95 per stage",
        ])
        .right(&[1, 2, 3, 4]);
        for g in rows.iter() {
            let name = match title {
                "sites" => g.site.clone(),
                "stations" => g.station.clone(),
                _ => format!("{} {}", g.station, g.probe),
            };
            t.row([
                name,
                g.attempts.to_string(),
                g.installed.to_string(),
                pct(g.first_pass_yield),
                g.devices_per_hour.map(|d| format!("{d:.0}")).unwrap_or_else(|| "-".into()),
                counts(&g.failed),
                counts(&g.refused),
                stages(g),
            ]);
        }
        out.push_str(&format!("\n{title}\n{t}"));
    }
    out
}

/// The device record lines of a `DeviceHistory` answer.
fn records(r: &pb::DeviceHistoryResponse) -> Result<Vec<DeviceRow>> {
    r.records_json
        .iter()
        .map(|l| serde_json::from_str(l).context("the broker sent a device record that is not readable"))
        .collect()
}

/// `admin device ID --json`: the records (flashgate-devices-v1 rows, one per batch) with the vendor key
/// of each, and, as before them, the flat `licences` and `installs` lists scripts read.
pub fn device_json(r: &pb::DeviceHistoryResponse) -> Result<Value> {
    let rows = records(r)?;
    let licences: Vec<Value> = r
        .licences
        .iter()
        .map(|l| {
            json!({
                "batch_id": l.batch_id,
                "station": l.station,
                "site": l.site,
                "issued_at_ms": l.issued_at_ms,
                "licence": hex::encode(&l.licence),
            })
        })
        .collect();
    let installs: Vec<Value> = r
        .installs
        .iter()
        .map(|i| {
            json!({
                "batch_id": i.batch_id,
                "station": i.station,
                "result_id": i.result_id,
                "status_code": i.status_code,
                "message": i.message,
                "flash_crc": i.flash_crc,
                "attempt": i.attempt,
                "reported_at_ms": i.reported_at_ms,
            })
        })
        .collect();
    Ok(json!({
        "device_id": r.device_id,
        "records": rows,
        "vendor_keys": r.vendor_keys,
        "licences": licences,
        "installs": installs,
    }))
}

/// `admin device ID`: the story in order, per batch.
pub fn device_text(r: &pb::DeviceHistoryResponse) -> Result<String> {
    let rows = records(r)?;
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str(&format!(
            "device {}: not known to this ledger (never licensed, reported or refused)\n",
            r.device_id
        ));
        return Ok(out);
    }
    for (i, row) in rows.iter().enumerate() {
        let vendor = r.vendor_keys.get(i).filter(|v| !v.is_empty());
        out.push_str(&format!("device {}  batch {}: {}\n", row.device_id, row.batch_id, row.verdict.as_str()));
        match hex::decode(&row.certificate).ok().and_then(|b| ChipCertificate::parse(&b).ok()) {
            Some(c) => out.push_str(&format!(
                "  certificate  product {}, chip key {}…, vendor key {}\n",
                c.product_id_str(),
                hex::encode(&c.chip_pub[..8]),
                vendor
                    .map(|v| format!("{v} (verifies)"))
                    .unwrap_or_else(|| "none of the broker's verifies it now".into())
            )),
            None => out.push_str("  certificate  none recorded (never licensed)\n"),
        }
        match &row.licence {
            Some(l) => {
                out.push_str(&format!(
                    "  licence      {} to {} (site {}), key {}, image {}…, licence SHA-256 {}…\n",
                    ms_time(l.issued_at_ms),
                    l.station,
                    l.site,
                    l.key_id,
                    &l.image_sha256[..l.image_sha256.len().min(16)],
                    &l.licence_sha256[..l.licence_sha256.len().min(16)],
                ));
                if !l.reissued_to.is_empty() {
                    out.push_str(&format!("               also handed to {}\n", l.reissued_to.join(", ")));
                }
            }
            None => out.push_str("  licence      none\n"),
        }
        if row.attempts.is_empty() {
            out.push_str("  attempts     none reported\n");
        } else {
            let shown = if row.attempts_total > row.attempts.len() as u64 {
                format!(" (the newest {} of {})", row.attempts.len(), row.attempts_total)
            } else {
                String::new()
            };
            out.push_str(&format!("  attempts     {}{shown}\n", row.attempts_total));
            let mut t =
                Table::new(["#", "reported", "station", "probe", "status", "flash crc", "time per stage", "message"])
                    .right(&[0]);
            for a in &row.attempts {
                t.row([
                    a.attempt.to_string(),
                    ms_time(a.reported_at_ms),
                    a.station.clone(),
                    if a.probe_id.is_empty() { "-".into() } else { format!("{} ({})", a.probe_id, a.probe_kind) },
                    format!("{} (0x{:04X})", a.status, a.status_code),
                    a.flash_crc.map(|c| format!("0x{c:08X}")).unwrap_or_else(|| "-".into()),
                    a.timings_us
                        .iter()
                        .map(|(k, v)| format!("{k} {:.1} ms", *v as f64 / 1000.0))
                        .collect::<Vec<_>>()
                        .join(", "),
                    a.message.clone(),
                ]);
            }
            for line in t.to_string().lines() {
                out.push_str(&format!("    {line}\n"));
            }
        }
        for f in &row.refusals {
            out.push_str(&format!(
                "  refused      {} ×{} at {} (site {}), {} – {}: {}\n",
                f.reason,
                f.count,
                f.station,
                f.site,
                ms_time(f.first_at_ms),
                ms_time(f.last_at_ms),
                f.detail
            ));
        }
        out.push_str(&format!("  verdict      {}\n", row.verdict.as_str()));
    }
    Ok(out)
}
