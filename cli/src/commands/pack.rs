//! `flashgate pack`: firmware (ELF, Intel HEX, raw binary) → encrypted `.sfi` image. `--json` prints
//! one object describing the image instead of the summary (docs/json-output.md).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use flashgate_common::family::Family;
use flashgate_common::{firmware, keyfile, sfi};

use crate::output::{OutFile, human_bytes};

/// Arguments of `flashgate pack`.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// Target family: stm32l4, stm32h7, stm32l5 or stm32wl.
    #[arg(long)]
    pub family: Family,
    /// Firmware input: an ELF file, an Intel HEX file, or `file.bin@0xADDRESS`. Repeatable.
    #[arg(long = "firmware", required = true, value_name = "FILE")]
    pub firmware: Vec<String>,
    /// Option bytes as CSV lines `id_or_name,value` (becomes the image's `C` area).
    #[arg(long, value_name = "CSV")]
    pub option_bytes: Option<PathBuf>,
    /// Firmware key: a file of exactly 16 raw bytes. Without `--nonce`, a fresh nonce is drawn and
    /// written to `--nonce-out`.
    #[arg(long, value_name = "KEY_BIN", required_unless_present = "generate_key")]
    pub key: Option<PathBuf>,
    /// Image nonce: a file of exactly 12 raw bytes. A nonce already used with this key (recorded in
    /// `KEY_BIN.nonces` by every packing) is refused: two images under one (key, nonce) reveal each
    /// other's plaintext.
    #[arg(long, value_name = "NONCE_BIN", requires = "key")]
    pub nonce: Option<PathBuf>,
    /// Where the freshly drawn nonce goes (mode 0600; default: OUT.nonce beside the image).
    #[arg(long, value_name = "FILE", conflicts_with = "nonce")]
    pub nonce_out: Option<PathBuf>,
    /// Pack with a nonce already used with this key, although that exposes both images' plaintext
    /// to anyone holding the two.
    #[arg(long)]
    pub reuse_nonce_exposing_both_images: bool,
    /// Accept option bytes that set RDP level 2, which on a real chip is permanent: no debug access
    /// and no bootloader, ever again.
    #[arg(long)]
    pub allow_permanent_rdp_level_2: bool,
    /// Draw a fresh key and nonce and write DIR/key.bin and DIR/nonce.bin (mode 0600).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["key", "nonce"])]
    pub generate_key: Option<PathBuf>,
    /// Split areas larger than this (bytes; `0x…`, `K`, `M` accepted).
    #[arg(long, default_value = "64K", value_parser = super::parse_size)]
    pub max_area: u32,
    /// Output `.sfi` file, written whole or not at all; `-` for standard output. A device or FIFO
    /// given here is written in place, never replaced.
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object describing the image (and nothing else on stdout) instead of the
    /// summary; not with `--out -`.
    #[arg(long)]
    pub json: bool,
}

/// Whether the option bytes among `areas` set RDP level 2 (pairs: record 0 = 0xCC; positional:
/// OPTSR bits 15:8 = 0xCC).
fn sets_rdp_level_2(areas: &[sfi::PlainArea], profile: &flashgate_common::family::FamilyProfile) -> bool {
    areas.iter().filter(|a| a.area_type == sfi::AreaType::Config).any(|a| {
        profile.config_layout.records(&a.data).is_some_and(|r| {
            r.iter().any(|&(id, v)| {
                id == flashgate_common::family::OPTION_RDP && v == u32::from(flashgate_common::family::RDP_LEVEL2)
            })
        })
    })
}

/// Run `flashgate pack`.
pub fn run(args: PackArgs) -> Result<()> {
    let profile = args.family.profile();
    if args.json && args.out.as_os_str() == "-" {
        return Err(crate::exit::with(
            crate::exit::Exit::Usage,
            anyhow::anyhow!("--json needs --out FILE: with --out - the image itself is standard output"),
        ));
    }
    // What a person reads goes to stderr when stdout holds the image or the JSON.
    let note = |text: String| {
        if args.json || args.out.as_os_str() == "-" { eprintln!("{text}") } else { println!("{text}") }
    };
    let mut nonce_path: Option<PathBuf> = args.nonce.clone();
    if args.max_area == 0 || args.max_area > sfi::MAX_AREA_SIZE {
        bail!("--max-area {} must be between 1 and {} bytes", args.max_area, sfi::MAX_AREA_SIZE);
    }
    let mut segments = Vec::new();
    for spec in &args.firmware {
        segments.extend(firmware::load_input(spec).with_context(|| format!("reading firmware {spec}"))?);
    }
    let mut areas = firmware::layout(segments, profile, args.max_area)?;
    if let Some(csv) = &args.option_bytes {
        let text = std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
        areas.push(
            firmware::parse_option_bytes_csv(&text, profile)
                .with_context(|| format!("option bytes {}", csv.display()))?,
        );
    }
    let (key, nonce) = match (&args.generate_key, &args.key, &args.nonce) {
        (Some(dir), _, _) => {
            let (key, nonce, kp, np) = keyfile::generate_key_files(dir)?;
            note(format!("generated key {} and nonce {} (mode 0600)", kp.display(), np.display()));
            nonce_path = Some(np);
            (key, nonce)
        }
        (None, Some(k), Some(n)) => {
            let nonce = keyfile::read_nonce_file(n)?;
            if keyfile::nonce_used(k, &nonce)? && !args.reuse_nonce_exposing_both_images {
                return Err(crate::exit::with(
                    crate::exit::Exit::Data,
                    anyhow::anyhow!(
                        "nonce {} was already used with key {} (recorded in {}.nonces): two images under one \
                         (key, nonce) reveal each other's plaintext; leave out --nonce to draw a fresh one, or \
                         give --reuse-nonce-exposing-both-images",
                        n.display(),
                        k.display(),
                        k.display()
                    ),
                ));
            }
            (keyfile::read_key_file(k)?, nonce)
        }
        (None, Some(k), None) => {
            let nonce = keyfile::fresh_nonce();
            let path = match (&args.nonce_out, args.out.as_os_str() == "-") {
                (Some(p), _) => p.clone(),
                (None, true) => bail!("with --out - give --nonce-out FILE for the fresh nonce"),
                (None, false) => {
                    let mut name = args.out.as_os_str().to_owned();
                    name.push(".nonce");
                    PathBuf::from(name)
                }
            };
            flashgate_common::atomic_file::write(&path, &nonce.0, flashgate_common::atomic_file::PRIVATE_MODE)?;
            note(format!("fresh nonce {} (mode 0600)", path.display()));
            nonce_path = Some(path);
            (keyfile::read_key_file(k)?, nonce)
        }
        _ => bail!("give --key (and optionally --nonce), or --generate-key DIR"),
    };
    if sets_rdp_level_2(&areas, profile) && !args.allow_permanent_rdp_level_2 {
        return Err(crate::exit::with(
            crate::exit::Exit::Data,
            anyhow::anyhow!(
                "the option bytes set RDP level 2, which is permanent on a real chip (no debug access and no \
                 bootloader, ever again); give --allow-permanent-rdp-level-2 if that is what you want"
            ),
        ));
    }

    let mut out = OutFile::create(&args.out, flashgate_common::atomic_file::PUBLIC_MODE)?;
    let size = sfi::write_image(&key, &nonce, &areas, &mut out)?;
    let target = out.name().to_string();
    let to_stdout = out.is_stdout();
    out.commit()?;
    let key_path = args.key.clone().or_else(|| args.generate_key.as_ref().map(|d| d.join(keyfile::KEY_FILE)));
    if let Some(k) = &key_path {
        keyfile::record_nonce(k, &nonce)?;
    }
    let expected_crc = sfi::expected_flash_crc(profile, &areas);
    if args.json {
        let list: Vec<_> = areas
            .iter()
            .enumerate()
            .map(|(i, a)| {
                serde_json::json!({
                    "index": i + 1,
                    "type": (a.area_type.as_byte() as char).to_string(),
                    "address": a.address,
                    "size": a.data.len(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "image": target,
                "size": size,
                "family": args.family.name(),
                "areas": list,
                "expected_flash_crc": expected_crc,
                "key": key_path.as_ref().map(|p| p.display().to_string()),
                "nonce": nonce_path.as_ref().map(|p| p.display().to_string()),
                "fresh_nonce": args.nonce.is_none(),
                "generated_key": args.generate_key.is_some(),
            })
        );
        return Ok(());
    }

    let mut summary = format!("{target} ({}, {} areas, family {})\n", human_bytes(size), areas.len(), args.family);
    summary.push_str(&format!("  {:>3} {:>4} {:>10} {:>10}\n", "#", "type", "address", "size"));
    for (i, a) in areas.iter().enumerate() {
        summary.push_str(&format!(
            "  {:>3} {:>4} 0x{:08X} {:>10}\n",
            i + 1,
            a.area_type.as_byte() as char,
            a.address,
            a.data.len()
        ));
    }
    summary.push_str(&format!("expected flash CRC-32 after install: 0x{expected_crc:08X}"));
    // With the image on standard output, what a person reads goes to standard error.
    if to_stdout {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
    }
    Ok(())
}
