//! `flashgate pack`: firmware (ELF, Intel HEX, raw binary) → encrypted `.sfi` image.

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
    /// Firmware key: a file of exactly 16 raw bytes.
    #[arg(long, value_name = "KEY_BIN", required_unless_present = "generate_key", requires = "nonce")]
    pub key: Option<PathBuf>,
    /// Image nonce: a file of exactly 12 raw bytes. Never pack two images with one (key, nonce).
    #[arg(long, value_name = "NONCE_BIN", requires = "key")]
    pub nonce: Option<PathBuf>,
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
}

/// Run `flashgate pack`.
pub fn run(args: PackArgs) -> Result<()> {
    let profile = args.family.profile();
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
            let note = format!("generated key {} and nonce {} (mode 0600)", kp.display(), np.display());
            if args.out.as_os_str() == "-" {
                eprintln!("{note}")
            } else {
                println!("{note}")
            }
            (key, nonce)
        }
        (None, Some(k), Some(n)) => (keyfile::read_key_file(k)?, keyfile::read_nonce_file(n)?),
        _ => bail!("give --key and --nonce, or --generate-key DIR"),
    };

    let mut out = OutFile::create(&args.out, flashgate_common::atomic_file::PUBLIC_MODE)?;
    let size = sfi::write_image(&key, &nonce, &areas, &mut out)?;
    let target = out.name().to_string();
    let to_stdout = out.is_stdout();
    out.commit()?;

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
    summary
        .push_str(&format!("expected flash CRC-32 after install: 0x{:08X}", sfi::expected_flash_crc(profile, &areas)));
    // With the image on standard output, what a person reads goes to standard error.
    if to_stdout {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
    }
    Ok(())
}
