//! `flashgate broker --config broker.toml`: runs the licence service until SIGINT or SIGTERM, then
//! shuts down gracefully (in-flight requests finish). `--check` validates the configuration and
//! exits. The daemon itself lives in `flashgate_broker::server`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use flashgate_broker::config::BrokerConfig;
use flashgate_broker::ledger::redact_url;

/// Arguments of `flashgate broker`.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// The configuration file (see deploy/config/broker.toml); `FLASHGATE_*` variables override it.
    #[arg(long, short, env = "FLASHGATE_CONFIG")]
    pub config: PathBuf,
    /// Validate the configuration (file, overrides, secrets present) and exit.
    #[arg(long)]
    pub check: bool,
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Runs `flashgate broker`.
pub async fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let cfg = BrokerConfig::load(&args.config)?;
    let base = args.config.parent().map(PathBuf::from).unwrap_or_default();
    let env = |k: &str| std::env::var(k).ok();
    if args.check {
        // Secrets must be present too: open nothing, but read them.
        for m in &cfg.hsm.members {
            match m {
                flashgate_broker::config::HsmMemberConfig::Soft { passphrase_file, .. } => {
                    let f = passphrase_file.as_ref().map(|f| base.join(f));
                    flashgate_broker::config::read_secret("soft keystore passphrase", f.as_deref(), None, &env)?;
                }
                flashgate_broker::config::HsmMemberConfig::Pkcs11 { pin_env, pin_file, token_label, .. } => {
                    let f = pin_file.as_ref().map(|f| base.join(f));
                    flashgate_broker::config::read_secret(
                        &format!("PIN of {token_label}"),
                        f.as_deref(),
                        pin_env.as_deref(),
                        &env,
                    )?;
                }
            }
        }
        println!(
            "{}: configuration OK (broker {}, ledger {})",
            args.config.display(),
            cfg.name,
            redact_url(&cfg.ledger.url)
        );
        return Ok(());
    }
    let broker = flashgate_broker::server::start(&cfg, &base, &env)
        .await
        .with_context(|| format!("starting broker {} from {}", cfg.name, args.config.display()))?;
    println!("broker {} serving gRPC on {} (ledger {})", cfg.name, broker.addr(), redact_url(&cfg.ledger.url));
    broker.run_until(shutdown_signal()).await?;
    println!("broker {} stopped", cfg.name);
    Ok(())
}
