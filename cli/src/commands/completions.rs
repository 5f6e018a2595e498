//! `flashgate completions SHELL`: the shell completion script for `flashgate` (clap_complete),
//! written to standard output or a file. Owns only the argument and the writing; the script is
//! generated from the same command definition the binary parses with.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use clap_complete::Shell;

use crate::output::OutFile;

/// Arguments of `flashgate completions`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    flashgate completions bash > ~/.local/share/bash-completion/completions/flashgate\n  \
    flashgate completions zsh --out ~/.zfunc/_flashgate\n  \
    flashgate completions fish > ~/.config/fish/completions/flashgate.fish")]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish (also elvish, powershell).
    #[arg(value_enum)]
    pub shell: Shell,
    /// Write the script to this file instead of standard output (`-`: standard output).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// The completion script of `command` for `shell`.
pub fn script(shell: Shell, command: &mut clap::Command) -> Vec<u8> {
    let mut buf = Vec::new();
    let name = command.get_name().to_string();
    clap_complete::generate(shell, command, name, &mut buf);
    buf
}

/// Run `flashgate completions`; `command` is the whole `flashgate` command line definition.
pub fn run(args: CompletionsArgs, mut command: clap::Command) -> Result<()> {
    let bytes = script(args.shell, &mut command);
    let mut out = match &args.out {
        Some(path) => OutFile::create(path, flashgate_common::atomic_file::PUBLIC_MODE)?,
        None => OutFile::stdout(),
    };
    out.write_all(&bytes).with_context(|| format!("writing the {} completion script to {}", args.shell, out.name()))?;
    out.commit()
}
