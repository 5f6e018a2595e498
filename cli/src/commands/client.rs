//! Connecting the CLI to a broker: the connection flags of `flashgate admin` (broker URL, an admin
//! identity taken from a PKI directory or explicit PEM files, TLS server name), opening mutual-TLS
//! gRPC channels, and turning gRPC statuses into one-line errors an operator can act on
//! (`refused (QUOTA_EXHAUSTED): …`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use flashgate_common::pki::{self, Identity};
use flashgate_proto::errors::describe_status;
use flashgate_proto::transport::{self, TlsFiles};
use tonic::transport::Channel;

/// Broker URL used when neither `--broker` nor `FLASHGATE_BROKER` is given.
pub const DEFAULT_BROKER: &str = "https://127.0.0.1:7443";

/// Largest response message the CLI accepts from a broker (device histories, image lists).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// How to reach a broker and who to be: `--broker`, then either `--pki DIR [--name NAME]` or
/// `--cert/--key/--ca`, and optionally `--server-name`.
///
/// `--broker`, `--pki`, `--name` and `--server-name` may appear anywhere on the command line;
/// `--cert`, `--key` and `--ca` belong to `flashgate admin` itself (before the subcommand), because
/// `admin key import --key` names a firmware key file.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Broker URL (always mutual TLS).
    #[arg(long, global = true, env = "FLASHGATE_BROKER", default_value = DEFAULT_BROKER, value_name = "URL",
          value_parser = parse_broker)]
    pub broker: String,
    /// PKI directory written by `flashgate pki init`: uses DIR/admins/NAME.pem, DIR/admins/NAME.key
    /// and DIR/ca.pem (identity spiffe://TRUST_DOMAIN/admin/NAME, the trust domain read from DIR/ca.pem).
    #[arg(long, global = true, value_name = "DIR")]
    pub pki: Option<PathBuf>,
    /// Admin name inside --pki.
    #[arg(long, global = true, value_name = "NAME", default_value = "admin")]
    pub name: String,
    /// Client certificate (PEM), instead of --pki. Give it before the admin subcommand.
    #[arg(long, env = "FLASHGATE_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM), with --cert. Give it before the admin subcommand.
    #[arg(long, env = "FLASHGATE_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// CA certificate (PEM) the broker must chain to, with --cert. Give it before the admin subcommand.
    #[arg(long, env = "FLASHGATE_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Name the broker certificate must carry (default: the host of --broker).
    #[arg(long, global = true, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Wait up to this long (`30s`) for a broker that is still starting: a refused connection is
    /// tried again until then. Without it, a broker not listening is an error at once.
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_wait)]
    pub wait: Option<Duration>,
}

/// Longest `--wait` accepted.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Pause between connection attempts under `--wait`.
const WAIT_RETRY: Duration = Duration::from_millis(200);

/// A `--wait` duration: a human duration (`30s`, `2m`) of at most [`MAX_WAIT`].
fn parse_wait(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration such as 30s: {e}"))?;
    if d > MAX_WAIT {
        return Err(format!("{s:?} is longer than the longest wait, {}", humantime::format_duration(MAX_WAIT)));
    }
    Ok(d)
}

/// A broker URL on the command line (`--broker`, `FLASHGATE_BROKER`), checked by
/// [`transport::BrokerUrl`] as every client's is; clap names the value, the error says what is wrong.
pub fn parse_broker(s: &str) -> Result<String, String> {
    match transport::BrokerUrl::parse(s) {
        Ok(_) => Ok(s.to_string()),
        Err(transport::TransportError::Endpoint { reason, .. }) => Err(reason),
        Err(other) => Err(other.to_string()),
    }
}

/// Where the TLS files come from, decided from the flags alone (no file is read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// An admin of a PKI directory: the trust domain still has to be read from its CA.
    Pki {
        /// The PKI directory.
        dir: PathBuf,
        /// The admin name.
        name: String,
    },
    /// Explicit PEM files.
    Files(TlsFiles),
}

/// Decide between `--pki` and `--cert/--key/--ca`: exactly one way must be complete.
pub fn credentials(
    pki_dir: Option<&Path>,
    name: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
) -> Result<Credentials> {
    let explicit = [("--cert", cert), ("--key", key), ("--ca", ca)];
    let given: Vec<&str> = explicit.iter().filter(|(_, p)| p.is_some()).map(|(n, _)| *n).collect();
    match (pki_dir, cert, key, ca) {
        (Some(dir), None, None, None) => Ok(Credentials::Pki { dir: dir.to_path_buf(), name: name.to_string() }),
        (Some(dir), ..) => bail!(
            "give either --pki {} or {}, not both (unset FLASHGATE_CERT/FLASHGATE_KEY/FLASHGATE_CA to use --pki)",
            dir.display(),
            given.join(" ")
        ),
        (None, Some(cert), Some(key), Some(ca)) => Ok(Credentials::Files(TlsFiles::new(cert, key, ca))),
        (None, None, None, None) => {
            bail!("no client identity: give --pki DIR [--name NAME], or --cert, --key and --ca (before the subcommand)")
        }
        (None, ..) => {
            let missing: Vec<&str> = explicit.iter().filter(|(_, p)| p.is_none()).map(|(n, _)| *n).collect();
            bail!("{} given without {} (all three are needed)", given.join(" "), missing.join(" "))
        }
    }
}

impl ConnectArgs {
    /// The TLS files of the admin identity these flags name.
    pub fn tls_files(&self) -> Result<TlsFiles> {
        match credentials(
            self.pki.as_deref(),
            &self.name,
            self.cert.as_deref(),
            self.key.as_deref(),
            self.ca.as_deref(),
        )? {
            Credentials::Files(files) => Ok(files),
            Credentials::Pki { dir, name } => admin_files(&dir, &name),
        }
    }

    /// A mutual-TLS channel to the broker; with `--wait`, a refused connection is tried again until
    /// the wait is over (any other failure, a TLS refusal say, ends it at once).
    pub async fn channel(&self) -> Result<Channel> {
        let files = self.tls_files()?;
        let deadline = self.wait.map(|w| tokio::time::Instant::now() + w);
        loop {
            match channel(&self.broker, &files, self.server_name.as_deref()).await {
                Err(e) if deadline.is_some_and(|d| tokio::time::Instant::now() + WAIT_RETRY < d) && refused(&e) => {
                    tokio::time::sleep(WAIT_RETRY).await;
                }
                other => return other,
            }
        }
    }
}

/// The TLS files of `spiffe://TD/admin/NAME` in a PKI directory, TD read from its CA.
pub fn admin_files(dir: &Path, name: &str) -> Result<TlsFiles> {
    let td = pki::ca_trust_domain(dir).with_context(|| format!("reading the trust domain of PKI {}", dir.display()))?;
    let identity = Identity::admin(&td, name).with_context(|| format!("admin name {name:?}"))?;
    let files = TlsFiles::for_identity(dir, &identity);
    if !files.cert.exists() {
        bail!(
            "{}: no certificate for {} (issue one with `flashgate pki issue --dir {} --admin {name}`)",
            files.cert.display(),
            identity.to_uri(),
            dir.display()
        );
    }
    Ok(files)
}

/// Connect to `broker` over mutual TLS with `files`; errors name the URL and the certificate.
pub async fn channel(broker: &str, files: &TlsFiles, server_name: Option<&str>) -> Result<Channel> {
    let tls = transport::client_config(files).context("loading the client TLS files")?;
    transport::connect(broker, tls, server_name)
        .await
        .with_context(|| format!("connecting to broker {broker} as {}", files.cert.display()))
}

/// Whether connecting failed because nothing listens at the address (yet).
fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            || c.to_string().contains("Connection refused")
    })
}

/// One line for a failed RPC: the Flashgate refusal (`refused (REASON): message`) or the gRPC code
/// and message, followed by the transport cause when there is one.
pub fn status_text(status: &tonic::Status) -> String {
    let mut text = describe_status(status);
    if flashgate_proto::tls_alert::auth_failure(status).is_some() {
        // Already in words; the transport chain only repeats it in Rust's syntax.
        return text;
    }
    if let Some(source) = std::error::Error::source(status) {
        let chain = transport::error_chain(source);
        if !text.contains(&chain) {
            text.push_str(": ");
            text.push_str(&chain);
        }
    }
    text
}

/// `Result<Response<T>, Status>` → `anyhow::Result<T>` with the RPC named in the error.
pub trait RpcResultExt<T> {
    /// The response message, or an error `WHAT: refused (REASON): …`.
    fn rpc(self, what: &str) -> Result<T>;
}

impl<T> RpcResultExt<T> for Result<tonic::Response<T>, tonic::Status> {
    fn rpc(self, what: &str) -> Result<T> {
        self.map(tonic::Response::into_inner)
            .map_err(|s| crate::exit::with(crate::exit::from_status(&s), anyhow!("{what}: {}", status_text(&s))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<&Path> {
        Some(Path::new(s))
    }

    #[test]
    fn credentials_come_from_one_place() {
        assert_eq!(
            credentials(p("pki"), "ops", None, None, None).unwrap(),
            Credentials::Pki { dir: "pki".into(), name: "ops".into() }
        );
        assert_eq!(
            credentials(None, "admin", p("c.pem"), p("c.key"), p("ca.pem")).unwrap(),
            Credentials::Files(TlsFiles::new("c.pem", "c.key", "ca.pem"))
        );
        let both = credentials(p("pki"), "admin", p("c.pem"), None, None).unwrap_err().to_string();
        assert!(both.contains("--pki pki") && both.contains("--cert"), "{both}");
        let partial = credentials(None, "admin", p("c.pem"), None, p("ca.pem")).unwrap_err().to_string();
        assert_eq!(partial, "--cert --ca given without --key (all three are needed)");
        let none = credentials(None, "admin", None, None, None).unwrap_err().to_string();
        assert!(none.contains("--pki DIR"), "{none}");
    }

    #[test]
    fn broker_urls_are_checked_before_connecting() {
        assert_eq!(parse_broker("https://127.0.0.1:7443").unwrap(), "https://127.0.0.1:7443");
        assert_eq!(parse_broker(DEFAULT_BROKER).unwrap(), DEFAULT_BROKER);
        assert_eq!(
            parse_broker("https://127.0.0.1:35359.").unwrap_err(),
            "port \"35359.\" is not a number from 1 to 65535"
        );
        assert!(parse_broker("https://broker:7443/admin").unwrap_err().contains("path \"/admin\""));
        assert!(parse_broker("broker:7443").unwrap_err().contains("missing scheme"));
    }

    #[test]
    fn waits_are_bounded_durations() {
        assert_eq!(parse_wait("30s").unwrap(), Duration::from_secs(30));
        assert!(parse_wait("soon").unwrap_err().contains("30s"));
        assert!(parse_wait("2h").unwrap_err().contains("longest wait, 1h"));
        assert_eq!(parse_wait("1h").unwrap(), MAX_WAIT);
    }

    /// `--wait`: a broker that starts listening a moment later is reached; without it the refusal
    /// is an error at once.
    #[tokio::test]
    async fn wait_retries_a_refused_connection() {
        let dir = tempfile::tempdir().unwrap();
        pki::init_dev_pki(dir.path(), &pki::PkiInit::default()).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut args = ConnectArgs {
            broker: format!("https://127.0.0.1:{port}"),
            pki: Some(dir.path().to_path_buf()),
            name: "admin".into(),
            cert: None,
            key: None,
            ca: None,
            server_name: None,
            wait: None,
        };
        let e = args.channel().await.unwrap_err();
        assert!(refused(&e), "{e:#}");
        // Something starts listening after 600 ms: with --wait the connection gets there (the TLS
        // handshake then fails against a plain listener, which ends the wait at once).
        args.wait = Some(Duration::from_secs(20));
        let started = std::time::Instant::now();
        let listener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            let (sock, _) = l.accept().await.unwrap();
            drop(sock);
        });
        let e = args.channel().await.unwrap_err();
        assert!(!refused(&e), "reached the listener: {e:#}");
        assert!(started.elapsed() >= Duration::from_millis(500) && started.elapsed() < Duration::from_secs(15));
        listener.await.unwrap();
    }

    #[test]
    fn statuses_become_one_line() {
        let s = flashgate_proto::errors::refusal(tonic::Code::ResourceExhausted, "QUOTA_EXHAUSTED", "8 of 8", []);
        let r: Result<tonic::Response<()>, tonic::Status> = Err(s);
        assert_eq!(r.rpc("issuing").unwrap_err().to_string(), "issuing: refused (QUOTA_EXHAUSTED): 8 of 8");
        assert_eq!(status_text(&tonic::Status::unavailable("down")), "Unavailable: down");
    }
}
