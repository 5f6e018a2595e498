//! `flashgate pki init` and `flashgate pki issue`: the development PKI of the networked
//! components (CA, broker, admin and station certificates with SPIFFE identities). Argument
//! definitions and the table output; the work is done by `flashgate_common::pki`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args, Subcommand};
use flashgate_common::pki::{self, Identity, IssuedCert, PkiInit};

/// `flashgate pki …`
#[derive(Debug, Args)]
pub struct PkiArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PkiCommand,
}

/// The `pki` subcommands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a development CA and certificates for brokers, admins and stations.
    Init(InitArgs),
    /// Sign one more certificate with an existing CA (new station, rotation).
    Issue(IssueArgs),
}

/// Arguments of `flashgate pki init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write into (created if missing; refused if it already holds a CA).
    #[arg(long)]
    pub dir: PathBuf,
    /// Trust domain of every identity.
    #[arg(long, default_value = pki::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// A site name (`[a-z0-9._-]`); repeatable. Each site gets --stations station certificates.
    #[arg(long = "site", value_name = "SITE")]
    pub sites: Vec<String>,
    /// Station certificates per site, numbered from 1.
    #[arg(long, default_value_t = 1)]
    pub stations: u32,
    /// An operator name; repeatable (default: admin).
    #[arg(long = "admin", value_name = "NAME")]
    pub admins: Vec<String>,
    /// A broker instance name; repeatable (default: broker-1).
    #[arg(long = "broker", value_name = "NAME")]
    pub brokers: Vec<String>,
    /// DNS name in every broker certificate; repeatable (default: localhost).
    #[arg(long = "broker-dns", value_name = "NAME")]
    pub broker_dns: Vec<String>,
    /// IP address in every broker certificate; repeatable (default: 127.0.0.1).
    #[arg(long = "broker-ip", value_name = "IP")]
    pub broker_ips: Vec<IpAddr>,
    /// Validity of the leaf certificates in days (the CA lives at least ten years).
    #[arg(long, default_value_t = 365, value_parser = super::number_between(1u32, 36_500))]
    pub validity_days: u32,
}

/// Arguments of `flashgate pki issue`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("who").required(true).args(["station", "admin", "broker"])))]
pub struct IssueArgs {
    /// The PKI directory holding `ca.pem` and `ca.key`.
    #[arg(long)]
    pub dir: PathBuf,
    /// A station certificate: `SITE/N`, e.g. `berlin/3`.
    #[arg(long, value_name = "SITE/N", value_parser = parse_station)]
    pub station: Option<(String, u32)>,
    /// An operator certificate.
    #[arg(long, value_name = "NAME")]
    pub admin: Option<String>,
    /// A broker certificate.
    #[arg(long, value_name = "NAME")]
    pub broker: Option<String>,
    /// DNS name in the broker certificate; repeatable (default: localhost).
    #[arg(long = "broker-dns", value_name = "NAME")]
    pub broker_dns: Vec<String>,
    /// IP address in the broker certificate; repeatable (default: 127.0.0.1).
    #[arg(long = "broker-ip", value_name = "IP")]
    pub broker_ips: Vec<IpAddr>,
    /// Trust domain (default: the CA's).
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 365, value_parser = super::number_between(1u32, 36_500))]
    pub validity_days: u32,
}

/// Parse `SITE/N`.
fn parse_station(s: &str) -> Result<(String, u32), String> {
    let (site, n) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected SITE/N, e.g. berlin/3"))?;
    let n: u32 = n.parse().map_err(|_| format!("{s:?}: station number {n:?} is not a number"))?;
    Ok((site.to_string(), n))
}

fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 86_400)
}

/// Run `flashgate pki …`.
pub fn run(args: PkiArgs) -> Result<()> {
    match args.command {
        PkiCommand::Init(a) => init(a),
        PkiCommand::Issue(a) => issue(a),
    }
}

fn or_default<T: Clone>(given: Vec<T>, default: &[T]) -> Vec<T> {
    if given.is_empty() { default.to_vec() } else { given }
}

fn init(a: InitArgs) -> Result<()> {
    let defaults = PkiInit::default();
    let init = PkiInit {
        trust_domain: a.trust_domain,
        sites: a.sites,
        stations_per_site: a.stations,
        admins: or_default(a.admins, &defaults.admins),
        brokers: or_default(a.brokers, &defaults.brokers),
        broker_dns: or_default(a.broker_dns, &defaults.broker_dns),
        broker_ips: or_default(a.broker_ips, &defaults.broker_ips),
        validity: days(a.validity_days),
    };
    let layout = pki::init_dev_pki(&a.dir, &init)
        .with_context(|| format!("creating a development PKI in {}", a.dir.display()))?;
    println!("development PKI for trust domain {} in {}", init.trust_domain, a.dir.display());
    print_table(&a.dir, layout.files());
    println!("private keys (*.key) are PKCS#8 PEM, mode 0600; keep ca.key off the stations");
    Ok(())
}

fn issue(a: IssueArgs) -> Result<()> {
    let trust_domain = match a.trust_domain {
        Some(td) => td,
        None => pki::ca_trust_domain(&a.dir).context("reading the trust domain of the CA (or give --trust-domain)")?,
    };
    if a.broker.is_none() && !(a.broker_dns.is_empty() && a.broker_ips.is_empty()) {
        bail!("--broker-dns and --broker-ip only go with --broker (only brokers serve)");
    }
    let (identity, dns, ips) = match (a.station, a.admin, a.broker) {
        (Some((site, n)), None, None) => (Identity::station(&trust_domain, &site, n)?, Vec::new(), Vec::new()),
        (None, Some(name), None) => (Identity::admin(&trust_domain, &name)?, Vec::new(), Vec::new()),
        (None, None, Some(name)) => {
            let defaults = PkiInit::default();
            (
                Identity::broker(&trust_domain, &name)?,
                or_default(a.broker_dns, &defaults.broker_dns),
                or_default(a.broker_ips, &defaults.broker_ips),
            )
        }
        _ => bail!("give exactly one of --station SITE/N, --admin NAME, --broker NAME"),
    };
    let issued = pki::issue_cert(&a.dir, &identity, &dns, &ips, days(a.validity_days))
        .with_context(|| format!("issuing a certificate for {identity} with the CA in {}", a.dir.display()))?;
    print_table(&a.dir, std::iter::once(&issued));
    println!("key: {} (mode 0600)", issued.key.display());
    Ok(())
}

fn print_table<'a>(dir: &Path, rows: impl Iterator<Item = &'a IssuedCert>) {
    let rows: Vec<(String, String, &str, String)> = rows
        .map(|c| {
            let file = c.cert.strip_prefix(dir).unwrap_or(&c.cert).display().to_string();
            let who = c.identity.as_ref().map_or_else(|| "(certificate authority)".to_string(), Identity::to_uri);
            (file, who, c.serial_hex.as_str(), pki::format_time(c.not_after))
        })
        .collect();
    let wf = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(4);
    let wi = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(8);
    println!("  {:<wf$}  {:<wi$}  {:<32}  expires", "file", "identity", "serial");
    for (file, who, serial, expiry) in &rows {
        println!("  {file:<wf$}  {who:<wi$}  {serial:<32}  {expiry}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Debug, Subcommand)]
    enum Top {
        Pki(PkiArgs),
    }

    fn parse(args: &[&str]) -> Result<PkiArgs, clap::Error> {
        let mut full = vec!["flashgate", "pki"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).map(|c| match c.cmd {
            Top::Pki(p) => p,
        })
    }

    #[test]
    fn init_then_issue() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let args = parse(&["init", "--dir", d, "--site", "berlin", "--site", "austin", "--stations", "2"]).unwrap();
        run(args).unwrap();
        assert!(dir.path().join("stations/austin-2.pem").exists());
        assert!(dir.path().join("admins/admin.key").exists());
        assert!(run(parse(&["init", "--dir", d]).unwrap()).is_err(), "refuses an existing CA");

        run(parse(&["issue", "--dir", d, "--station", "berlin/3"]).unwrap()).unwrap();
        assert!(dir.path().join("stations/berlin-3.pem").exists());
        run(parse(&["issue", "--dir", d, "--broker", "broker-2", "--broker-dns", "broker.test"]).unwrap()).unwrap();
        assert!(dir.path().join("brokers/broker-2.pem").exists());
        assert!(parse(&["issue", "--dir", d]).is_err(), "one of --station/--admin/--broker");
        assert!(parse(&["issue", "--dir", d, "--admin", "a", "--broker", "b"]).is_err());
        let e = run(parse(&["issue", "--dir", d, "--admin", "a", "--broker-dns", "x"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("only go with --broker"), "{e}");
        assert!(parse(&["issue", "--dir", d, "--station", "berlin"]).is_err());
        let e = run(parse(&["issue", "--dir", d, "--station", "Berlin/1"]).unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("site name"), "{e:#}");
    }
}
