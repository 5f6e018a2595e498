//! `flashgate bench install`: one device installed into a simulated target over loopback TCP in real
//! time, and the link efficiency it reached (effective payload rate against baud / 11). The licence
//! comes from an in-memory issuer: this measures the bootloader link, not the broker.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use flashgate_agent::bootloader::{
    self, Bootloader, ClientConfig, InstallProgress, InstallReport, MemoryImage, NoProgress, TargetAddr,
};
use flashgate_common::cert::{ChipCertificate, VendorCa, VendorCaPublicKey};
use flashgate_common::family::Family;
use flashgate_common::keyfile;
use flashgate_common::licence::{KeyId, SoftIssuer};
use flashgate_common::sfi::{self, AreaType, FirmwareKey, PlainArea};
use flashgate_sim::{SimConfig, Simulator};

/// Arguments of `flashgate bench install`.
#[derive(Debug, Args)]
pub struct InstallBenchArgs {
    /// Family of the simulated target.
    #[arg(long, default_value = "stm32l4")]
    pub family: Family,
    /// Firmware size.
    #[arg(long, default_value = "256K", value_parser = super::parse_size)]
    pub size: u32,
    /// Modelled baud rate.
    #[arg(long, default_value_t = 115_200)]
    pub baud: u32,
    /// Speed factor (1 = real time; the efficiency figure is only meaningful at 1).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
}

/// Everything one install needs besides the target.
struct Job {
    image: Vec<u8>,
    family: Family,
    issuer: SoftIssuer,
    trusted: Vec<VendorCaPublicKey>,
}

/// Result of one device's lab install.
struct Outcome {
    report: InstallReport,
}

/// The lab flow for one target: sync, Get ID and family check, GET_CERTIFICATE, verify, issue the
/// licence, install, and check the flash CRC against `expected_crc`.
async fn install_one(
    target: &TargetAddr,
    job: &Job,
    expected_crc: Option<u32>,
    progress: &mut dyn InstallProgress,
) -> Result<Outcome> {
    let started = Instant::now();
    let io = bootloader::connect(target).await.with_context(|| format!("connecting to {target}"))?;
    let mut bl = Bootloader::new(io, ClientConfig::default());
    bl.sync().await.with_context(|| format!("no bootloader answers on {target}"))?;
    let pid = bl.get_id().await?;
    if pid != job.family.profile().pid {
        bail!("{target} answers PID 0x{pid:03X}, not a {} (0x{:03X})", job.family, job.family.profile().pid);
    }
    let cert = ChipCertificate::parse(&bl.get_certificate().await?)?;
    cert.verify(&job.trusted).context("chip certificate refused")?;
    let licence = job.issuer.issue(&cert, &mut rand::rngs::OsRng)?;
    let mut image = MemoryImage::from_bytes(&job.image, Some(job.family.profile()))?;
    let report = bl.install_image(&mut image, &licence.to_bytes(), progress).await?;
    if let (Some(expected), Some(got)) = (expected_crc, report.crc)
        && expected != got
    {
        bail!("device reports flash CRC-32 0x{got:08X}, expected 0x{expected:08X}");
    }
    tracing::debug!(device = %cert.device_id(), elapsed = ?started.elapsed(), "installed");
    Ok(Outcome { report })
}

/// Run `flashgate bench install`.
pub async fn install_bench(args: InstallBenchArgs) -> Result<()> {
    let family = args.family;
    let profile = family.profile();
    if args.size == 0 || args.size > profile.flash_size {
        bail!("--size {} must fit in {}'s {} bytes of flash", args.size, family, profile.flash_size);
    }
    let vendor_ca = VendorCa::generate(&mut rand::rngs::OsRng);
    let trusted = vec![vendor_ca.public_key()];
    let data: Vec<u8> = (0..args.size).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let areas = vec![PlainArea { area_type: AreaType::Firmware, address: profile.flash_base, data }];
    let key = FirmwareKey::generate(&mut rand::rngs::OsRng);
    let nonce = keyfile::fresh_nonce();
    let image = sfi::image_to_vec(&key, &nonce, &areas)?;
    let expected_crc = sfi::expected_flash_crc(profile, &areas);
    let mut cfg = SimConfig::new(family, 1, "127.0.0.1:0".parse()?, vendor_ca);
    cfg.speed = args.speed;
    cfg.baud = args.baud;
    let sim = Simulator::start(cfg).await?;
    let target: TargetAddr = format!("tcp://{}", sim.tcp_addrs()[0]).parse()?;
    let job = Job { image, family, issuer: SoftIssuer::new(KeyId([7; 16]), key, nonce), trusted };
    let outcome = install_one(&target, &job, Some(expected_crc), &mut NoProgress).await?;
    sim.shutdown().await?;

    let payload = outcome.report.bytes as f64;
    let secs = outcome.report.duration.as_secs_f64();
    let capacity = f64::from(args.baud) / 11.0 * args.speed.max(f64::MIN_POSITIVE);
    println!("| quantity | value |");
    println!("|---|---:|");
    println!("| family | {family} |");
    println!("| ciphertext installed | {} bytes |", outcome.report.bytes);
    println!("| install time (SET_LICENCE → GET_STATE installed) | {secs:.2} s |");
    println!("| effective rate | {:.0} B/s |", payload / secs);
    println!("| link payload capacity (baud / 11 × speed) | {capacity:.0} B/s |");
    println!("| efficiency | {:.1}% |", 100.0 * payload / secs / capacity);
    println!("| frame retries | {} |", outcome.report.link.retries);
    Ok(())
}
