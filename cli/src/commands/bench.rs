//! `flashgate bench`: throughput measurements recorded by `make bench` in BENCHMARKS.md.
//! `bench sfi` compares `.sfi` pack and parse throughput with raw AES-128-GCM in the same run;
//! `bench install` installs an image into a simulated target over loopback TCP at a modelled baud
//! rate and compares the effective rate with the link's payload capacity; `bench licences` loads a
//! running broker's licence service (see `bench_licences`); `bench flood` measures licence latency with
//! and without a connection flood (see `bench_flood`); `bench attach-flood` a broker's memory under a
//! flood of station streams (see `bench_attach`); `bench ledger` traceability on a ledger of a million
//! devices (see `bench_ledger`).

use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use flashgate_common::sfi::{self, AreaType, FirmwareKey, ImageNonce, ImageReader, PlainArea, ReaderOptions};

/// `flashgate bench …`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// `.sfi` pack and parse throughput against raw AES-128-GCM.
    Sfi(SfiBenchArgs),
    /// Install an image into a simulated target and measure link efficiency.
    Install(super::bench_install::InstallBenchArgs),
    /// Load a running broker with concurrent virtual stations issuing licences; prints licences/s,
    /// errors by reason and latency percentiles. Exits non-zero when more than 1% of requests fail.
    Licences(super::bench_licences::LicenceBenchArgs),
    /// Licence latency (p50/p99) with and without a flood of idle TCP connections and stalled TLS
    /// handshakes from one source address, measured in one run.
    Flood(super::bench_flood::FloodBenchArgs),
    /// A broker process's resident memory under a flood of `Attach` streams full of probe state,
    /// against its idle RSS.
    AttachFlood(super::bench_attach::AttachFloodArgs),
    /// A ledger filled to a million devices: licence issuance against the empty ledger, the per-device
    /// export's time and peak memory, offline verification against raw SHA-256.
    Ledger(super::bench_ledger::LedgerBenchArgs),
}

/// Arguments of `flashgate bench sfi`.
#[derive(Debug, Args)]
pub struct SfiBenchArgs {
    /// Plaintext bytes per run.
    #[arg(long, default_value = "64M", value_parser = super::parse_size)]
    pub size: u32,
    /// Bytes per area.
    #[arg(long, default_value = "1M", value_parser = super::parse_size)]
    pub area: u32,
    /// Runs of each measurement; the best is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
}

/// Run `flashgate bench …`.
pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Sfi(args) => sfi_bench(&args),
        BenchCommand::Install(args) => super::bench_install::install_bench(args).await,
        BenchCommand::Licences(args) => super::bench_licences::run(args).await,
        BenchCommand::Flood(args) => super::bench_flood::run(args).await,
        BenchCommand::AttachFlood(args) => super::bench_attach::run(args).await,
        BenchCommand::Ledger(args) => super::bench_ledger::run(args).await,
    }
}

fn best_of(runs: u32, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-12)
}

fn sfi_bench(args: &SfiBenchArgs) -> Result<()> {
    if args.area == 0 || args.area > sfi::MAX_AREA_SIZE || args.size < args.area {
        bail!("--area must be from 1 byte to 16 MiB and no larger than --size");
    }
    let key = FirmwareKey::new(*b"bench-key-16-byt");
    let nonce = ImageNonce(*b"bench-nonce1");
    let count = (args.size / args.area) as usize;
    let total = count as u64 * u64::from(args.area);
    let areas: Vec<PlainArea> = (0..count)
        .map(|i| PlainArea {
            area_type: AreaType::Firmware,
            address: 0x0800_0000u32.wrapping_add(i as u32 * args.area),
            data: (0..args.area).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8)).collect(),
        })
        .collect();

    // Raw AES-128-GCM over the same bytes, area by area, in place (no copies beyond the buffer).
    let cipher = Aes128Gcm::new_from_slice(key.as_bytes())?;
    let mut buffers: Vec<Vec<u8>> = areas.iter().map(|a| a.data.clone()).collect();
    let raw = best_of(args.runs, || {
        for (i, b) in buffers.iter_mut().enumerate() {
            let iv = sfi::area_iv(&nonce, (i + 1) as u16);
            cipher
                .encrypt_in_place_detached(Nonce::from_slice(&iv), b"aad-of-14-byte", b)
                .map_err(|_| anyhow::anyhow!("AES-GCM failed"))?;
        }
        Ok(())
    })?;

    let mut image = Vec::with_capacity(total as usize + 64 * count + 64);
    let pack = best_of(args.runs, || {
        image.clear();
        sfi::write_image(&key, &nonce, &areas, &mut image)?;
        Ok(())
    })?;

    let parse = best_of(args.runs, || {
        let opts = ReaderOptions { file_len: Some(image.len() as u64), memory_map: None };
        let mut reader = ImageReader::new(std::io::Cursor::new(&image), opts)?;
        sfi::verify_header(&key, &nonce, reader.header())?;
        while let Some(area) = reader.next_area()? {
            std::hint::black_box(area.into_plaintext(&key, &nonce)?);
        }
        Ok(())
    })?;

    let raw_rate = mb_per_s(total, raw);
    let pack_rate = mb_per_s(total, pack);
    let parse_rate = mb_per_s(total, parse);
    println!(
        "sfi throughput, {} MiB in {} areas of {} KiB, best of {} runs",
        total >> 20,
        count,
        args.area >> 10,
        args.runs
    );
    println!("| operation | MB/s | vs raw AES-128-GCM |");
    println!("|---|---:|---:|");
    println!("| raw AES-128-GCM encrypt (aes-gcm, in place) | {raw_rate:.0} | 100% |");
    println!("| `.sfi` pack (encrypt + write) | {pack_rate:.0} | {:.0}% |", 100.0 * pack_rate / raw_rate);
    println!("| `.sfi` parse (stream + verify + decrypt) | {parse_rate:.0} | {:.0}% |", 100.0 * parse_rate / raw_rate);
    Ok(())
}
