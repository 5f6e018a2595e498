//! `flashgate config example broker|agent`: prints the commented example configurations of
//! `deploy/config/` (built into the binary, so an installed `flashgate` can start a working directory
//! without the source tree). Owns only the choice and the writing; the files themselves are the ones
//! in `deploy/config/`, tested there to load.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::output::OutFile;

/// `deploy/config/broker.toml`, as built into this binary.
pub const BROKER_EXAMPLE: &str = include_str!("../../../deploy/config/broker.toml");
/// `deploy/config/agent.toml`, as built into this binary.
pub const AGENT_EXAMPLE: &str = include_str!("../../../deploy/config/agent.toml");

/// `flashgate config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print a commented example configuration (the files of deploy/config/), to edit and use.
    #[command(after_help = "Examples:\n  \
        flashgate config example broker > broker.toml\n  \
        flashgate config example agent --out /etc/flashgate/agent.toml")]
    Example(ExampleArgs),
}

/// Which daemon's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Daemon {
    /// `flashgate broker --config broker.toml`.
    Broker,
    /// `flashgate agent serve|run --config agent.toml`.
    Agent,
}

/// Arguments of `flashgate config example`.
#[derive(Debug, Args)]
pub struct ExampleArgs {
    /// The configuration: broker or agent.
    #[arg(value_enum)]
    pub daemon: Daemon,
    /// Write it to this file instead of standard output (`-`: standard output).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// The example text of `daemon`.
pub fn example(daemon: Daemon) -> &'static str {
    match daemon {
        Daemon::Broker => BROKER_EXAMPLE,
        Daemon::Agent => AGENT_EXAMPLE,
    }
}

/// Run `flashgate config …`.
pub fn run(cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Example(args) => {
            let mut out = match &args.out {
                Some(path) => OutFile::create(path, flashgate_common::atomic_file::PUBLIC_MODE)?,
                None => OutFile::stdout(),
            };
            out.write_all(example(args.daemon).as_bytes())
                .with_context(|| format!("writing the example configuration to {}", out.name()))?;
            out.commit()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_built_in_examples_are_the_deploy_files_and_load() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        assert_eq!(example(Daemon::Broker), std::fs::read_to_string(root.join("deploy/config/broker.toml")).unwrap());
        assert_eq!(example(Daemon::Agent), std::fs::read_to_string(root.join("deploy/config/agent.toml")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("broker.toml");
        run(ConfigCommand::Example(ExampleArgs { daemon: Daemon::Broker, out: Some(out.clone()) })).unwrap();
        flashgate_broker::config::BrokerConfig::load_from(&out, std::iter::empty()).unwrap();
        let out = dir.path().join("agent.toml");
        run(ConfigCommand::Example(ExampleArgs { daemon: Daemon::Agent, out: Some(out.clone()) })).unwrap();
        flashgate_agent::config::AgentConfig::load_from(&out, std::iter::empty()).unwrap();
    }
}
