//! `flashgate console`: starts the live web console (`flashgate-console`) on 127.0.0.1 as the admin
//! the connection flags name (the same flags and connection code as `flashgate admin`), and prints
//! its URLs with their tokens.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use clap::Args;
use flashgate_console::{Admin, Console, ConsoleInfo, Tokens};

use super::client::ConnectArgs;

/// Arguments of `flashgate console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// Port on 127.0.0.1 to serve the console on; 0 picks a free one (the URL printed says which).
    #[arg(long, default_value_t = flashgate_console::DEFAULT_PORT, value_name = "PORT")]
    pub port: u16,
    /// Also print a read-only wallboard URL (its own token: every page, no action).
    #[arg(long)]
    pub wallboard: bool,
}

/// Runs the console until Ctrl-C or SIGTERM.
pub async fn run(args: ConsoleArgs) -> Result<()> {
    let channel = args.conn.channel().await?;
    let files = args.conn.tls_files()?;
    let tokens = Tokens::generate(args.wallboard);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening for the console on {addr}"))?;
    let bound = listener.local_addr().context("the console's address")?;
    let info = ConsoleInfo { broker: args.conn.broker.clone(), admin: files.cert.display().to_string() };
    let console = Console::start(Admin::new(channel), tokens.clone(), info);
    let (admin_url, wall_url) = flashgate_console::urls(bound, &tokens);
    println!("console (admin): {admin_url}");
    if let Some(w) = wall_url {
        println!("console (wallboard, read-only): {w}");
    }
    println!("stop with Ctrl-C");
    flashgate_console::serve(listener, console, super::broker::shutdown_signal()).await.context("serving the console")
}
