//! The lab flow without a broker: `flashgate cert`, `flashgate licence issue`, `flashgate flash`.
//! What a developer does at a desk with one board and key files. `flash --json` prints one object
//! about the install (docs/json-output.md).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use flashgate_agent::bootloader::{
    self, Bootloader, ClientConfig, InstallProgress, InstallStage, MemoryImage, Progress, TargetAddr,
};
use flashgate_common::cert::{ChipCertificate, VendorCaPublicKey};
use flashgate_common::family::Family;
use flashgate_common::keyfile;
use flashgate_common::licence::{KeyId, Licence, SoftIssuer};
use flashgate_common::protocol::SfiStatus;
use flashgate_common::sfi;

use crate::output::{byte_bar, human_bytes};

/// Arguments of `flashgate cert`.
#[derive(Debug, Args)]
pub struct CertArgs {
    /// The target: `tcp://host:port` or `serial:/dev/ttyUSB0?baud=115200`.
    #[arg(long)]
    pub target: TargetAddr,
    /// Where to write the 136-byte chip certificate.
    #[arg(long)]
    pub out: PathBuf,
}

/// `flashgate licence …`
#[derive(Debug, Subcommand)]
pub enum LicenceCommand {
    /// Issue a licence for one chip from key files (refuses a certificate that does not verify).
    Issue(IssueArgs),
}

/// Arguments of `flashgate licence issue`.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The chip certificate (136 bytes) read with `flashgate cert`.
    #[arg(long)]
    pub cert: PathBuf,
    /// The vendor CA public key (PEM) the certificate must verify against. Repeatable.
    #[arg(long = "vendor-ca-pub", required = true)]
    pub vendor_ca_pub: Vec<PathBuf>,
    /// Firmware key file (16 bytes).
    #[arg(long)]
    pub key: PathBuf,
    /// Image nonce file (12 bytes).
    #[arg(long)]
    pub nonce: PathBuf,
    /// Key id to name in the licence (32 hex digits); default derived from the key.
    #[arg(long)]
    pub key_id: Option<String>,
    /// Where to write the 132-byte licence.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `flashgate flash`.
#[derive(Debug, Args)]
pub struct FlashArgs {
    /// The target: `tcp://host:port` or `serial:/dev/ttyUSB0?baud=115200`.
    #[arg(long)]
    pub target: TargetAddr,
    /// The encrypted `.sfi` image.
    #[arg(long)]
    pub image: PathBuf,
    /// The chip's licence.
    #[arg(long)]
    pub licence: PathBuf,
    /// Fail unless the device reports this flash CRC-32 after install (as printed by `pack`).
    #[arg(long, value_parser = super::parse_size)]
    pub expect_crc: Option<u32>,
    /// Print one JSON object about the install (and nothing else on stdout) instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// Run `flashgate cert`.
pub async fn cert(args: CertArgs) -> Result<()> {
    let mut bl = open(&args.target).await?;
    let cert = bl.get_certificate().await.context("reading the chip certificate")?;
    let parsed = ChipCertificate::parse(&cert)?;
    crate::output::write_out(&args.out, &cert)?;
    println!(
        "{}: product {} device {}",
        args.out.display(),
        String::from_utf8_lossy(&parsed.product_id),
        parsed.device_id()
    );
    Ok(())
}

/// Run `flashgate licence …`.
pub fn licence(cmd: LicenceCommand) -> Result<()> {
    let LicenceCommand::Issue(args) = cmd;
    let bytes = std::fs::read(&args.cert).with_context(|| format!("reading {}", args.cert.display()))?;
    let cert = ChipCertificate::parse(&bytes).with_context(|| format!("parsing {}", args.cert.display()))?;
    let mut trusted = Vec::new();
    for p in &args.vendor_ca_pub {
        let pem = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        trusted.push(VendorCaPublicKey::from_pem(&pem).with_context(|| format!("parsing {}", p.display()))?);
    }
    cert.verify(&trusted)
        .with_context(|| format!("refusing to issue a licence: {} does not verify", args.cert.display()))?;
    let key = keyfile::read_key_file(&args.key)?;
    let nonce = keyfile::read_nonce_file(&args.nonce)?;
    let key_id = match &args.key_id {
        Some(h) => {
            let raw = hex::decode(h).with_context(|| format!("--key-id {h:?} is not hexadecimal"))?;
            KeyId(raw.try_into().map_err(|v: Vec<u8>| anyhow::anyhow!("--key-id must be 16 bytes, got {}", v.len()))?)
        }
        None => keyfile::default_key_id(&key),
    };
    let issuer = SoftIssuer::new(key_id, key, nonce);
    let licence = issuer.issue(&cert, &mut rand::rngs::OsRng)?;
    crate::output::write_out(&args.out, &licence.to_bytes())?;
    println!(
        "{}: licence for device {} (product {}, key id {})",
        args.out.display(),
        cert.device_id(),
        String::from_utf8_lossy(&cert.product_id),
        hex::encode(licence.key_id.0)
    );
    Ok(())
}

/// Run `flashgate flash`.
pub async fn flash(args: FlashArgs) -> Result<()> {
    let lic_bytes = std::fs::read(&args.licence).with_context(|| format!("reading {}", args.licence.display()))?;
    let licence = Licence::parse(&lic_bytes).with_context(|| format!("parsing {}", args.licence.display()))?;
    // The whole image is read and checked (structure, sizes, the family's memory map) before the
    // first byte goes to the chip: a short or damaged file never costs an erase.
    let len = std::fs::metadata(&args.image).with_context(|| format!("reading {}", args.image.display()))?.len();
    if len > sfi::MAX_IMAGE_FILE {
        bail!("{} is {len} bytes; an image file is at most {} bytes", args.image.display(), sfi::MAX_IMAGE_FILE);
    }
    let bytes = std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let family = Family::from_product_id(&licence.product_id);
    let mut reader = MemoryImage::from_bytes(&bytes, family.map(Family::profile))
        .with_context(|| format!("{} is not a valid image", args.image.display()))?;
    drop(bytes);

    let mut bl = open(&args.target).await?;
    let pid = bl.get_id().await.context("Get ID")?;
    if let Some(expected) = family
        && expected.profile().pid != pid
    {
        bail!(
            "the target answers PID 0x{pid:03X} but the licence is for {} (PID 0x{:03X})",
            expected,
            expected.profile().pid
        );
    }
    let bar = byte_bar(len, "installing");
    let mut progress = BarProgress { bar: bar.clone(), area: None };
    let started = Instant::now();
    let result = bl.install_image(&mut reader, &licence.to_bytes(), &mut progress).await;
    let result_status = result.as_ref().err().and_then(|e| e.device_status());
    let text = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    bar.finish_and_clear();
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            let code = crate::exit::classify(&anyhow::Error::new(e));
            let words = match (code, progress.area) {
                (_, Some(index)) if matches!(result_status, Some(SfiStatus::AreaNotAuthentic)) => {
                    format!("install failed: area {index} not authentic")
                }
                _ => format!("install failed: {text}"),
            };
            return Err(crate::exit::with(code, anyhow::anyhow!(words)));
        }
    };
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    if args.json {
        let matches = args.expect_crc.zip(report.crc).map(|(want, got)| want == got);
        println!(
            "{}",
            serde_json::json!({
                "target": args.target.to_string(),
                "image": args.image.display().to_string(),
                "installed": true,
                "areas": report.areas,
                "bytes": report.bytes,
                "seconds": secs,
                "bytes_per_second": (report.bytes as f64 / secs).round(),
                "retries": report.link.retries,
                "flash_crc": report.crc,
                "expected_crc": args.expect_crc,
                "crc_matches": matches,
            })
        );
    }
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    let crc = match report.crc {
        Some(crc) => format!("0x{crc:08X}"),
        None => "unknown (INSTALL's answer was lost; GET_STATE confirmed installed)".to_string(),
    };
    say(format!(
        "installed {} in {} areas in {secs:.1} s ({}/s, {} retries); device flash CRC-32 {crc}",
        human_bytes(report.bytes),
        report.areas,
        human_bytes((report.bytes as f64 / secs) as u64),
        report.link.retries,
    ));
    if let Some(expected) = args.expect_crc {
        match report.crc {
            Some(crc) if crc == expected => say("flash CRC-32 matches the expected value".to_owned()),
            Some(crc) => {
                return Err(crate::exit::with(
                    crate::exit::Exit::DeviceFailed,
                    anyhow::anyhow!("flash CRC-32 0x{crc:08X} differs from the expected 0x{expected:08X}"),
                ));
            }
            None => bail!("cannot confirm the expected flash CRC-32 0x{expected:08X}: INSTALL's answer was lost"),
        }
    }
    Ok(())
}

async fn open(target: &TargetAddr) -> Result<Bootloader<Box<dyn bootloader::Transport>>> {
    let io = bootloader::connect(target).await.with_context(|| format!("connecting to {target}"))?;
    let mut bl = Bootloader::new(io, ClientConfig::default());
    bl.sync().await.with_context(|| format!("no bootloader answers on {target}"))?;
    Ok(bl)
}

/// Drives the progress bar and remembers which area was being written, so a device refusal
/// can name it ("area 2 not authentic").
struct BarProgress {
    bar: indicatif::ProgressBar,
    area: Option<u16>,
}

impl InstallProgress for BarProgress {
    fn report(&mut self, progress: &Progress) {
        let stage = match progress.stage {
            InstallStage::SetLicence => "licence".to_string(),
            InstallStage::SetImageHeader => "header".to_string(),
            InstallStage::WriteArea { index, area_type } => {
                self.area = Some(index);
                format!("area {index} ({area_type})")
            }
            InstallStage::Install => "install".to_string(),
            InstallStage::Verify => "verify".to_string(),
            InstallStage::Finished => "done".to_string(),
        };
        self.bar.set_message(stage);
        self.bar.set_position(progress.done);
    }
}
