//! `flashgate sfi inspect`: print an image's header and areas; with the key, verify every tag.

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
    println!("{}: {} bytes, .sfi version {}, {} areas", args.image.display(), len, header.version, header.area_count);
    println!("header tag {}", hex::encode(header.tag));
    if let Some((key, nonce)) = &secrets {
        sfi::verify_header(key, nonce, &header)?;
        println!("header tag verified");
    }
    println!("  {:>4} {:>4} {:>10} {:>10} {:>10}  tag", "#", "type", "address", "size", "offset");
    let mut plain = Vec::new();
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
        println!(
            "  {:>4} {:>4} 0x{:08X} {:>10} {:>10}  {} {}",
            d.index,
            d.area_type.as_byte() as char,
            d.address,
            d.size,
            offset,
            hex::encode(d.tag),
            verdict
        );
    }
    if secrets.is_some() {
        println!("every tag verified");
        if let Some(family) = args.family {
            println!(
                "expected flash CRC-32 after install on {family}: 0x{:08X}",
                sfi::expected_flash_crc(family.profile(), &plain)
            );
        }
    }
    Ok(())
}
