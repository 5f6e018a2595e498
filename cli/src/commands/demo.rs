//! `flashgate demo`: the lab flow end to end on this machine, with no hardware and no broker:
//! a test vendor CA, simulated STM32 targets on loopback TCP, a packed demo firmware, a licence per
//! verified chip, parallel installs with progress bars, and the refusals that make SFI worth having
//! (a licence for another chip, a tampered image, a forged certificate). Also hosts
//! `flashgate bench install`, which uses the same single-device flow.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use flashgate_agent::bootloader::{
    self, Bootloader, ClientConfig, InstallProgress, InstallReport, InstallStage, MemoryImage, NoProgress, Progress,
    TargetAddr,
};
use flashgate_common::cert::{ChipCertificate, ChipKey, VendorCa, VendorCaPublicKey};
use flashgate_common::family::Family;
use flashgate_common::licence::{KeyId, Licence, SoftIssuer};
use flashgate_common::protocol::{SfiState, SfiStatus};
use flashgate_common::sfi::{self, AreaType, FirmwareKey, ImageNonce, PlainArea};
use flashgate_common::{firmware, keyfile};
use flashgate_sim::{SimConfig, Simulator};
use indicatif::{MultiProgress, ProgressBar};

use crate::output::{byte_bar, human_bytes};

/// Arguments of `flashgate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of simulated devices to install.
    #[arg(long, default_value_t = 4)]
    pub devices: usize,
    /// Speed factor of the simulated link and flash (1 = real time at 115200 baud).
    #[arg(long, default_value_t = 20.0)]
    pub speed: f64,
    /// Family of the simulated targets.
    #[arg(long, default_value = "stm32l4")]
    pub family: Family,
    /// Keep the simulated targets running after the demo (Ctrl-C to stop).
    #[arg(long)]
    pub keep: bool,
}

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
    device_id: String,
    report: InstallReport,
    elapsed: Duration,
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
    Ok(Outcome { device_id: cert.device_id().to_string(), report, elapsed: started.elapsed() })
}

/// A progress bar per device.
struct BarProgress(ProgressBar);

impl InstallProgress for BarProgress {
    fn report(&mut self, p: &Progress) {
        if let Some(total) = p.total {
            self.0.set_length(total);
        }
        self.0.set_position(p.done);
        let msg = match p.stage {
            InstallStage::SetLicence => "licence".to_string(),
            InstallStage::SetImageHeader => "header".to_string(),
            InstallStage::WriteArea { index, area_type } => format!("area {index} ({area_type})"),
            InstallStage::Install => "install".to_string(),
            InstallStage::Verify => "verify".to_string(),
            InstallStage::Finished => "installed".to_string(),
        };
        self.0.set_message(msg);
    }
}

/// A deterministic demo firmware: an application at the start of flash and a data blob higher up.
fn write_demo_firmware(dir: &Path, family: Family) -> Result<Vec<String>> {
    let base = family.profile().flash_base;
    std::fs::create_dir_all(dir)?;
    let app: Vec<u8> = (0..48 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let blob: Vec<u8> = b"flashgate demo calibration table\n".iter().copied().cycle().take(4096).collect();
    let app_path = dir.join("app.bin");
    let blob_path = dir.join("calibration.bin");
    std::fs::write(&app_path, app)?;
    std::fs::write(&blob_path, blob)?;
    std::fs::write(dir.join("option-bytes.csv"), "# id or name, value\nRDP,0xAA\nFLASH_OPTR,0xFFEFF8AA\n")?;
    Ok(vec![
        format!("{}@0x{base:08X}", app_path.display()),
        format!("{}@0x{:08X}", blob_path.display(), base + 0x4_0000),
    ])
}

fn demo_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("flashgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Run `flashgate demo`.
pub async fn run(args: DemoArgs) -> Result<()> {
    if args.devices == 0 || args.devices > 64 {
        bail!("--devices {} must be between 1 and 64", args.devices);
    }
    let family = args.family;
    let profile = family.profile();
    let dir = demo_dir()?;
    println!(
        "Flashgate demo (lab flow, no broker yet): {} simulated {} targets, files in {}",
        args.devices,
        family,
        dir.display()
    );

    // 1. The silicon vendor's CA (test only) and the OEM's firmware, packed with a fresh key.
    let (ca_key, ca_pub) = flashgate_sim::write_vendor_ca(&dir.join("vendor-ca"))?;
    let vendor_ca = flashgate_sim::load_vendor_ca(&ca_key)?;
    let trusted = vec![VendorCaPublicKey::from_pem(&std::fs::read_to_string(&ca_pub)?)?];
    let inputs = write_demo_firmware(&dir.join("firmware"), family)?;
    let mut segments = Vec::new();
    for spec in &inputs {
        segments.extend(firmware::load_input(spec)?);
    }
    let mut areas = firmware::layout(segments, profile, 16 * 1024)?;
    areas.push(firmware::parse_option_bytes_csv(
        &std::fs::read_to_string(dir.join("firmware/option-bytes.csv"))?,
        profile,
    )?);
    let (key, nonce, key_path, _) = keyfile::generate_key_files(&dir.join("keys"))?;
    let image = sfi::image_to_vec(&key, &nonce, &areas)?;
    let image_path = dir.join("firmware.sfi");
    std::fs::write(&image_path, &image)?;
    let expected_crc = sfi::expected_flash_crc(profile, &areas);
    println!(
        "1. packed {} ({} areas, {}) with a fresh key {} ; expected flash CRC-32 0x{expected_crc:08X}",
        image_path.display(),
        areas.len(),
        human_bytes(image.len() as u64),
        key_path.display()
    );

    // 2. Simulated targets on loopback TCP; one extra target for the refusal demonstrations.
    let mut cfg = SimConfig::new(family, args.devices + 1, "127.0.0.1:0".parse()?, vendor_ca);
    cfg.state_dir = Some(dir.join("sim-state"));
    cfg.speed = args.speed;
    cfg.seed = rand::random();
    let sim = Simulator::start(cfg).await?;
    let targets: Vec<TargetAddr> =
        sim.tcp_addrs().iter().map(|a| format!("tcp://{a}").parse()).collect::<Result<_, _>>()?;
    println!("2. started {} simulated targets at speed {}x (115200 baud modelled)", targets.len(), args.speed);

    // 3. Install every device in parallel, each with its own licence.
    let key_id = keyfile::default_key_id(&key);
    let job = Arc::new(Job {
        image,
        family,
        issuer: SoftIssuer::new(key_id, FirmwareKey::new(*key.as_bytes()), ImageNonce(nonce.0)),
        trusted: trusted.clone(),
    });
    println!("3. installing: GET_CERTIFICATE → verify → licence → SET_LICENCE → header → areas → INSTALL");
    let multi = MultiProgress::new();
    let mut tasks = Vec::new();
    for (i, target) in targets.iter().take(args.devices).enumerate() {
        let bar = multi.add(byte_bar(0, &format!("target {i}")));
        let (job, target) = (job.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let mut progress = BarProgress(bar.clone());
            let r = install_one(&target, &job, Some(expected_crc), &mut progress).await;
            bar.finish();
            r
        }));
    }
    let mut rows = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        rows.push((i, task.await.context("install task panicked")?));
    }
    let _ = multi.clear();
    println!();
    println!(
        "  {:<7} {:<32} {:<10} {:>10} {:>8} {:>8}",
        "target", "device id", "result", "flash CRC", "time", "retries"
    );
    let mut failures = 0;
    for (i, row) in &rows {
        match row {
            Ok(o) => println!(
                "  {:<7} {:<32} {:<10} {:>10} {:>7.1}s {:>8}",
                i,
                o.device_id,
                "installed",
                o.report.crc.map(|c| format!("{c:08X}")).unwrap_or_else(|| "?".into()),
                o.elapsed.as_secs_f64(),
                o.report.link.retries
            ),
            Err(e) => {
                failures += 1;
                println!("  {i:<7} {:<32} FAILED: {e:#}", "?");
            }
        }
    }

    // 4. What SFI refuses.
    println!("4. refusals:");
    let spare = &targets[args.devices];
    let spare_handle = sim.target(args.devices).context("spare target")?;
    refusals(spare, spare_handle.certificate(), &job, &key, &nonce, &areas, family, &trusted).await?;
    let flash_erased = spare_handle.flash_image().iter().all(|b| *b == 0xFF);
    println!(
        "   spare target's flash after the refusals: {}",
        if flash_erased { "all erased (no plaintext)" } else { "NOT ERASED" }
    );
    if !flash_erased {
        failures += 1;
    }

    println!();
    println!(
        "{} of {} devices installed and verified (CRC 0x{expected_crc:08X}); files in {}",
        rows.iter().filter(|r| r.1.is_ok()).count(),
        args.devices,
        dir.display()
    );
    if args.keep {
        for line in sim.describe() {
            println!("  {line}");
        }
        println!("targets keep running (try `flashgate cert --target {}`); Ctrl-C to stop", targets[0]);
        let _ = tokio::signal::ctrl_c().await;
    }
    sim.shutdown().await?;
    if failures > 0 {
        bail!("{failures} step(s) of the demo failed");
    }
    Ok(())
}

/// Show the three refusals on the spare target: a licence made for another chip, an image whose
/// second area was tampered with, and a certificate signed by a CA nobody trusts.
#[allow(clippy::too_many_arguments)]
async fn refusals(
    target: &TargetAddr,
    spare_cert: ChipCertificate,
    job: &Job,
    key: &FirmwareKey,
    nonce: &ImageNonce,
    areas: &[PlainArea],
    family: Family,
    trusted: &[VendorCaPublicKey],
) -> Result<()> {
    let io = bootloader::connect(target).await?;
    let mut bl = Bootloader::new(io, ClientConfig::default());
    bl.sync().await?;

    // a) A licence issued for a different chip of the same product.
    let other = ChipKey::generate(&mut rand::rngs::OsRng);
    let stranger_ca = VendorCa::generate(&mut rand::rngs::OsRng);
    let other_cert = stranger_ca.sign_certificate(family.profile().product_id, other.public_xy());
    let foreign = job.issuer.issue(&other_cert, &mut rand::rngs::OsRng)?;
    expect_refusal(&mut bl, &foreign, &job.image, SfiStatus::LicenceInvalid, "a licence for another chip").await?;

    // b) The right licence, but one ciphertext byte of area 2 flipped in transit.
    let own = job.issuer.issue(&spare_cert, &mut rand::rngs::OsRng)?;
    let mut tampered = sfi::image_to_vec(key, nonce, areas)?;
    let area2_payload = sfi::HEADER_LEN + sfi::DESCRIPTOR_LEN + areas[0].data.len() + sfi::DESCRIPTOR_LEN;
    tampered[area2_payload + 7] ^= 0x01;
    expect_refusal(&mut bl, &own, &tampered, SfiStatus::AreaNotAuthentic, "an image with area 2 tampered").await?;

    // c) A certificate signed by a CA the issuer does not trust: no licence at all.
    match other_cert.verify(trusted) {
        Err(e) => println!("   ✓ a forged chip certificate: no licence issued ({e})"),
        Ok(()) => bail!("a certificate from an untrusted CA verified"),
    }
    let (state, _) = bl.get_state().await?;
    if state != SfiState::Failed {
        bail!("spare target is {state}, expected failed after the refusals");
    }
    Ok(())
}

async fn expect_refusal(
    bl: &mut Bootloader<Box<dyn bootloader::Transport>>,
    licence: &Licence,
    image: &[u8],
    expected: SfiStatus,
    what: &str,
) -> Result<()> {
    let mut img = MemoryImage::from_bytes(image, None)?;
    match bl.install_image(&mut img, &licence.to_bytes(), &mut NoProgress).await {
        Err(e) if e.device_status() == Some(expected) => {
            println!("   ✓ {what}: refused by the device: {}", expected.message());
            Ok(())
        }
        Err(e) => bail!("{what}: expected the device to answer {expected}, got: {e}"),
        Ok(_) => bail!("{what}: the device installed it"),
    }
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
