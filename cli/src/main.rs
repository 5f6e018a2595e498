//! The `flashgate` command: one binary with a subcommand per role, in the style of Vault or Nomad.
//! Each subcommand is a thin adapter from arguments to the libraries (`flashgate-common`,
//! `flashgate-sim`, `flashgate-agent`) or to a broker's gRPC API (`flashgate-proto`); this crate
//! owns argument parsing, terminal output and process exit codes only.

mod commands;
mod exit;
mod output;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// mimalloc instead of the system allocator: the broker's licence path allocates many small,
/// short-lived buffers across threads (protobuf fields, HTTP/2 frames, audit details), where glibc's
/// malloc showed as 7% of the broker's time (BENCHMARKS.md, "Where the broker's CPU time per licence goes").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Flashgate: networked Secure Firmware Installation for STM32 production.
#[derive(Debug, Parser)]
#[command(name = "flashgate", version, about, propagate_version = true)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `flashgate_sim=debug`. Default: `info`
    /// for the daemons (`broker`; `agent serve`'s assignments and broker link), `warn` for everything else.
    #[arg(long, global = true, env = "FLASHGATE_LOG")]
    log: Option<String>,

    /// Log line format on stderr: `text` or `json` (one JSON object per event, for log shippers).
    #[arg(long, global = true, env = "FLASHGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pack firmware into an encrypted `.sfi` image (the Trusted Package Creator equivalent).
    Pack(commands::pack::PackArgs),
    /// Inspect `.sfi` images.
    #[command(subcommand)]
    Sfi(commands::sfi::SfiCommand),
    /// Run simulated STM32 targets, or manage their vendor CA and state.
    Sim(commands::sim::SimArgs),
    /// Read a target's chip certificate over its bootloader.
    Cert(commands::lab::CertArgs),
    /// Issue licences without a broker (lab flow).
    #[command(subcommand)]
    Licence(commands::lab::LicenceCommand),
    /// Install an encrypted image into a target with a licence (lab flow).
    Flash(commands::lab::FlashArgs),
    /// Development PKI: a CA and SPIFFE-identified certificates for brokers, admins and stations.
    Pki(commands::pki::PkiArgs),
    /// Run the whole flow on this machine against simulated targets.
    Demo(commands::demo::DemoArgs),
    /// Operate a broker: firmware keys, images, batches, devices, stations, audit, HSM status.
    Admin(commands::admin::AdminArgs),
    /// Serve the live web console of the line on 127.0.0.1, as an admin of the broker.
    Console(commands::console::ConsoleArgs),
    /// The station agent: install batches on the probes of this station.
    #[command(subcommand)]
    Agent(commands::agent::AgentCommand),
    /// Run the licence broker (gRPC over mutual TLS) from a configuration file.
    Broker(commands::broker::BrokerArgs),
    /// Example configurations of the broker and the station agent.
    #[command(subcommand)]
    Config(commands::config::ConfigCommand),
    /// Verify an audit export offline (no broker, no database).
    #[command(subcommand)]
    Audit(commands::audit::AuditCommand),
    /// Measure throughput (used by `make bench`).
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    /// Print the shell completion script (bash, zsh, fish).
    Completions(commands::completions::CompletionsArgs),
    /// Write manual pages for flashgate and every subcommand into a directory.
    Man(commands::man::ManArgs),
}

/// The whole command line definition, with the exit codes after the help text.
fn cli_command() -> clap::Command {
    Cli::command().after_help(exit::help())
}

fn main() -> std::process::ExitCode {
    // Usage errors exit 64 (sysexits); the exit codes are listed under `flashgate --help`.
    let parsed = cli_command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.exit_code() == 0 { 0 } else { exit::Exit::Usage as u8 });
        }
    };
    let default_filter = match cli.command {
        Command::Broker(_) => "info,sqlx=warn",
        Command::Console(_) => "warn,flashgate_console=info",
        // The station daemon says what it was assigned, when the broker link drops or returns, and
        // when its calls fail over to another broker or reporting resumes.
        Command::Agent(commands::agent::AgentCommand::Serve(_)) => {
            "warn,flashgate_agent::daemon=info,flashgate_agent::station=info,flashgate_agent::broker_client=info"
        }
        // The demo creates its batch before its stations first connect, as designed: the broker's
        // warning about sites without stations would only clutter its screen.
        Command::Demo(_) => "warn,flashgate_broker::service::admin=error",
        _ => "warn",
    };
    output::init_tracing(cli.log.as_deref().unwrap_or(default_filter), cli.log_format == "json");
    // A closed pipe (`flashgate demo | head`) ends a command quietly, as a Unix tool killed by SIGPIPE
    // would (status 141), instead of a panic on the next print. (SIGPIPE itself stays ignored: the
    // commands talk to sockets, where EPIPE must remain an error.)
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    // Secrets leave the environment before any thread exists.
    let broker_secrets = match &cli.command {
        Command::Broker(args) => Some(commands::broker::SecretEnv::take(args)),
        _ => None,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(exit::Exit::Software as u8);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Pack(args) => commands::pack::run(args),
            Command::Sfi(cmd) => commands::sfi::run(cmd),
            Command::Sim(args) => commands::sim::run(args).await,
            Command::Cert(args) => commands::lab::cert(args).await,
            Command::Licence(cmd) => commands::lab::licence(cmd),
            Command::Flash(args) => commands::lab::flash(args).await,
            Command::Pki(args) => commands::pki::run(args),
            Command::Demo(args) => commands::demo::run(args).await,
            Command::Admin(args) => commands::admin::run(args).await,
            Command::Console(args) => commands::console::run(args).await,
            Command::Broker(args) => {
                // Set above for exactly this command.
                let secrets = broker_secrets.unwrap_or_else(commands::broker::SecretEnv::empty);
                commands::broker::run(args, secrets).await
            }
            Command::Agent(cmd) => commands::agent::run(cmd).await,
            Command::Config(cmd) => commands::config::run(cmd),
            Command::Audit(cmd) => commands::audit::run(cmd),
            Command::Bench(cmd) => commands::bench::run(cmd).await,
            Command::Completions(args) => commands::completions::run(args, cli_command()),
            Command::Man(args) => commands::man::run(args, cli_command()),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", output::error_text(&e));
            std::process::ExitCode::from(exit::classify(&e) as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
