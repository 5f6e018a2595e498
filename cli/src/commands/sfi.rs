//! `flashgate sfi inspect`: print an image's header and areas; with the key, verify every tag.
//! `--json` prints the same as one object once the whole image was read (nothing on stdout when it
//! does not verify; docs/json-output.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use flashgate_common::family::Family;
use flashgate_common::keyfile;
use flashgate_common::sfi::{self, ImageReader, PlainArea, ReaderOptions};

/// `flashgate sfi …`
#[derive(Debug, Subcommand)]
pub enum SfiCommand {
    /// Print header and areas; given the key and nonce, verify every tag.
    Inspect(InspectArgs),
}

/// Arguments of `flashgate sfi inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The `.sfi` image.
    pub image: PathBuf,
    /// Firmware key file (16 bytes); with --nonce, verifies the header and every area.
    #[arg(long, requires = "nonce")]
    pub key: Option<PathBuf>,
    /// Image nonce file (12 bytes).
    #[arg(long, requires = "key")]
    pub nonce: Option<PathBuf>,
    /// Check addresses against this family's memory map (and print the expected flash CRC with --key).
    #[arg(long)]
    pub family: Option<Family>,
    /// Print one JSON object (and nothing else on stdout) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Run `flashgate sfi …`.
pub fn run(cmd: SfiCommand) -> Result<()> {
    let SfiCommand::Inspect(args) = cmd;
    let file = std::fs::File::open(&args.image).with_context(|| format!("opening {}", args.image.display()))?;
    let len = file.metadata()?.len();
    let opts = ReaderOptions { file_len: Some(len), memory_map: args.family.map(Family::profile) };
    let mut reader = ImageReader::new(std::io::BufReader::new(file), opts)
        .with_context(|| format!("reading {}", args.image.display()))?;
    let header = reader.header().clone();
    let secrets = match (&args.key, &args.nonce) {
        (Some(k), Some(n)) => Some((keyfile::read_key_file(k)?, keyfile::read_nonce_file(n)?)),
        _ => None,
    };
    // Lines for a person, printed as they come; with --json nothing until the whole image was read.
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    say(format!(
        "{}: {} bytes, .sfi version {}, {} areas",
        args.image.display(),
        len,
        header.version,
        header.area_count
    ));
    say(format!("header tag {}", hex::encode(header.tag)));
    if let Some((key, nonce)) = &secrets {
        sfi::verify_header(key, nonce, &header)?;
        say("header tag verified".to_owned());
    }
    say(format!("  {:>4} {:>4} {:>10} {:>10} {:>10}  tag", "#", "type", "address", "size", "offset"));
    let mut plain = Vec::new();
    let mut listed = Vec::new();
    while let Some(area) = reader.next_area()? {
        let d = area.descriptor.clone();
        let offset = area.offset;
        let verdict = match &secrets {
            Some((key, nonce)) => {
                let data = area.into_plaintext(key, nonce)?;
                // Plaintext is kept only to compute the expected flash CRC.
                if args.family.is_some() {
                    plain.push(PlainArea { area_type: d.area_type, address: d.address, data });
                }
                "verified"
            }
            None => "",
        };
        say(format!(
            "  {:>4} {:>4} 0x{:08X} {:>10} {:>10}  {} {}",
            d.index,
            d.area_type.as_byte() as char,
            d.address,
            d.size,
            offset,
            hex::encode(d.tag),
            verdict
        ));
        listed.push(serde_json::json!({
            "index": d.index,
            "type": (d.area_type.as_byte() as char).to_string(),
            "address": d.address,
            "size": d.size,
            "offset": offset,
            "tag": hex::encode(d.tag),
            "verified": secrets.is_some(),
        }));
    }
    let expected_crc = match (&secrets, args.family) {
        (Some(_), Some(family)) => Some(sfi::expected_flash_crc(family.profile(), &plain)),
        _ => None,
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "image": args.image.display().to_string(),
                "size": len,
                "version": header.version,
                "area_count": header.area_count,
                "header_tag": hex::encode(header.tag),
                "verified": secrets.is_some(),
                "family": args.family.map(Family::name),
                "areas": listed,
                "expected_flash_crc": expected_crc,
            })
        );
        return Ok(());
    }
    if secrets.is_some() {
        println!("every tag verified");
        if let (Some(family), Some(crc)) = (args.family, expected_crc) {
            println!("expected flash CRC-32 after install on {family}: 0x{crc:08X}");
        }
    }
    Ok(())
}
