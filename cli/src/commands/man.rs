//! `flashgate man --out DIR`: manual pages (roff, section 1) for `flashgate` and every subcommand
//! (clap_mangen), one file per command: `flashgate.1`, `flashgate-admin.1`,
//! `flashgate-admin-batch-create.1`, … Owns the walk over the command tree and writing the pages.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

/// Arguments of `flashgate man`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  flashgate man --out target/man && man -l target/man/flashgate-admin.1")]
pub struct ManArgs {
    /// Directory to write the pages to (created if missing; existing pages are replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Every page of `command` and its subcommands (hidden ones and `help` left out), as
/// (file name, roff text), the top-level command first.
pub fn pages(command: clap::Command) -> Result<Vec<(String, Vec<u8>)>> {
    fn walk(cmd: clap::Command, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
        let man = clap_mangen::Man::new(cmd.clone());
        let name = man.get_filename();
        let mut roff = Vec::new();
        man.render(&mut roff).with_context(|| format!("rendering manual page {name}"))?;
        out.push((name, roff));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub.clone(), out)?;
        }
        Ok(())
    }
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let mut out = Vec::new();
    walk(command, &mut out)?;
    Ok(out)
}

/// Run `flashgate man`; `command` is the whole `flashgate` command line definition.
pub fn run(args: ManArgs, command: clap::Command) -> Result<()> {
    let pages = pages(command)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating the manual page directory {}", args.out.display()))?;
    for (name, roff) in &pages {
        crate::output::write_out(&args.out.join(name), roff)?;
    }
    eprintln!("wrote {} manual pages to {}", pages.len(), args.out.display());
    Ok(())
}
