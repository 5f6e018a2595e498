//! `flashgate broker --config broker.toml`: runs the licence service until SIGINT or SIGTERM, then
//! shuts down gracefully (in-flight requests finish). `--check` validates the configuration and
//! exits. The daemon itself lives in `flashgate_broker::server`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use flashgate_broker::config::BrokerConfig;
use flashgate_broker::ledger::redact_url;
use zeroize::Zeroizing;

/// Arguments of `flashgate broker`.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// The configuration file (see deploy/config/broker.toml); `FLASHGATE_*` variables override it.
    #[arg(long, short, env = "FLASHGATE_CONFIG")]
    pub config: PathBuf,
    /// Check the configuration and exit (78 naming each problem): the file and its overrides, the TLS
    /// files, the vendor CA keys, the secrets, an existing keystore, the ledger. Creates nothing.
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

/// The secret environment variables of a broker configuration (the keystore passphrase, the PKCS#11
/// PIN variables), taken out of the process environment so that they do not stay readable there
/// (`/proc/PID/environ`, child processes) for the broker's whole life.
pub struct SecretEnv(HashMap<String, Zeroizing<String>>);

impl SecretEnv {
    /// Read and remove the secret variables `args`' configuration names. Must run before any other
    /// thread exists (it changes the process environment): `main` calls it before the runtime starts.
    /// A configuration that does not load leaves the environment alone (the error comes from `run`).
    pub fn take(args: &BrokerArgs) -> Self {
        let mut names = vec![flashgate_broker::config::PASSPHRASE_ENV.to_owned()];
        if let Ok(cfg) = BrokerConfig::load(&args.config) {
            for m in &cfg.hsm.members {
                if let flashgate_broker::config::HsmMemberConfig::Pkcs11 { pin_env: Some(v), .. } = m {
                    names.push(v.clone());
                }
            }
        }
        let mut taken = HashMap::new();
        for name in names {
            if let Some(value) = std::env::var_os(&name) {
                taken.insert(name.clone(), Zeroizing::new(value.to_string_lossy().into_owned()));
                // SAFETY: called from `main` before the tokio runtime or any other thread starts, so
                // nothing reads the environment concurrently.
                #[allow(unsafe_code)]
                unsafe {
                    std::env::remove_var(&name)
                };
            }
        }
        Self(taken)
    }

    /// No secrets (the environment was not read).
    pub fn empty() -> Self {
        Self(HashMap::new())
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|v| v.to_string())
    }
}

/// Runs `flashgate broker`.
pub async fn run(args: BrokerArgs, secrets: SecretEnv) -> anyhow::Result<()> {
    let cfg = BrokerConfig::load(&args.config)?;
    let base = args.config.parent().map(PathBuf::from).unwrap_or_default();
    let env = |k: &str| secrets.get(k);
    if args.check {
        // Every file, secret and the ledger connection; nothing is created.
        let problems = flashgate_broker::server::check(&cfg, &base, &env).await;
        if !problems.is_empty() {
            for p in &problems {
                eprintln!("{}: {p}", args.config.display());
            }
            return Err(crate::exit::with(
                crate::exit::Exit::Config,
                anyhow::anyhow!("{}: {} problem(s); the broker would not start", args.config.display(), problems.len()),
            ));
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
