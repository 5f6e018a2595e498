//! `flashgate sim`: serve simulated STM32 targets over TCP and pseudo-terminals; `sim vendor-ca`
//! makes the simulator's test vendor CA; `sim dump` writes a target's flash to a file.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use flashgate_common::family::Family;
use flashgate_sim::{SimConfig, Simulator};

/// Arguments of `flashgate sim`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    #[command(subcommand)]
    command: Option<SimCommand>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum SimCommand {
    /// Write a fresh test vendor CA: DIR/vendor-ca.key (PKCS#8 PEM, mode 0600) and DIR/vendor-ca.pub.
    VendorCa {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a target's whole flash from its state directory.
    Dump {
        /// The simulator's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Target number (0-based).
        #[arg(long)]
        target: usize,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Family of every target.
    #[arg(long, default_value = "stm32l4")]
    family: Family,
    /// Number of targets; target i listens on port `listen + i`.
    #[arg(long, default_value_t = 1)]
    targets: usize,
    /// Address of target 0.
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// The vendor CA private key (PEM) that signs the targets' certificates.
    #[arg(long, value_name = "KEY_PEM")]
    vendor_ca: Option<PathBuf>,
    /// Persist every target's identity, flash, option bytes and RDP here across restarts.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Speed factor for link and flash timing: 1 = real time, 10 = ten times faster, 0 = no delays.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Modelled UART baud rate.
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// Also serve each target on a pseudo-terminal and print its path.
    #[arg(long)]
    pty: bool,
    /// Probability per byte that the link drops it (fault injection).
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Probability per byte that the link corrupts it (fault injection).
    #[arg(long, default_value_t = 0.0)]
    corrupt_rate: f64,
    /// Seed for fault injection (random when absent).
    #[arg(long)]
    seed: Option<u64>,
}

/// Run `flashgate sim …`.
pub async fn run(args: SimArgs) -> Result<()> {
    match args.command {
        Some(SimCommand::VendorCa { out }) => {
            let (key, public) = flashgate_sim::write_vendor_ca(&out)?;
            println!("vendor CA private key {} (mode 0600)", key.display());
            println!("vendor CA public key  {}", public.display());
            Ok(())
        }
        Some(SimCommand::Dump { state_dir, target, out }) => {
            let flash = flashgate_sim::dump_flash(&state_dir, target)?;
            crate::output::write_out(&out, &flash)?;
            println!("{}: {} bytes of target {target}'s flash", out.display(), flash.len());
            Ok(())
        }
        None => serve(args.serve).await,
    }
}

async fn serve(a: ServeArgs) -> Result<()> {
    let Some(ca_path) = a.vendor_ca else {
        bail!("--vendor-ca KEY_PEM is required to serve targets (make one with `flashgate sim vendor-ca --out DIR`)");
    };
    if a.targets == 0 {
        bail!("--targets must be at least 1");
    }
    for (name, rate) in [("--drop-rate", a.drop_rate), ("--corrupt-rate", a.corrupt_rate)] {
        if !(0.0..=1.0).contains(&rate) {
            bail!("{name} {rate} must be a probability between 0 and 1");
        }
    }
    if !(a.speed >= 0.0 && a.speed.is_finite()) {
        bail!("--speed {} must be 0 (no delays) or a positive factor", a.speed);
    }
    let vendor_ca = flashgate_sim::load_vendor_ca(&ca_path)?;
    let mut config = SimConfig::new(a.family, a.targets, a.listen, vendor_ca);
    config.state_dir = a.state_dir;
    config.speed = a.speed;
    config.baud = a.baud;
    config.pty = a.pty;
    config.drop_rate = a.drop_rate;
    config.corrupt_rate = a.corrupt_rate;
    config.seed = a.seed.unwrap_or_else(rand::random);
    let sim = Simulator::start(config).await?;
    for line in sim.describe() {
        println!("{line}");
    }
    println!("serving {} {} target(s); Ctrl-C to stop", a.targets, a.family);
    wait_for_shutdown().await;
    sim.shutdown().await?;
    // Whoever started us may have stopped reading stdout; a closed pipe is not an error now.
    let _ = writeln!(std::io::stdout(), "state saved; stopped");
    Ok(())
}

async fn wait_for_shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
