//! Mutual-TLS transport for Flashgate's gRPC services, without tonic's built-in TLS, so that
//! Flashgate controls certificate verification and services can read who is calling.
//!
//! Owns: loading PEM files ([`TlsFiles`]), the rustls configurations (TLS 1.3 only, the ring
//! provider installed explicitly, our CA as the only trust anchor), the client-certificate
//! verifier that adds SPIFFE identity and revocation checks to rustls' WebPKI verifier, the
//! server accept loop ([`serve`]: never blocked, one task per TLS handshake under the deadlines and
//! caps of [`crate::admission`], peers refused before any RPC runs, with a `warn` log line naming
//! address, certificate and reason), the per-connection
//! [`PeerConn`] that services read from request extensions, and the client connector ([`connect`]).
//!
//! Server:
//! ```no_run
//! # async fn f(router: tonic::transport::server::Router) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use flashgate_proto::transport::{self, NoRevocations, TlsFiles};
//! let files = TlsFiles::new("pki/brokers/broker-1.pem", "pki/brokers/broker-1.key", "pki/ca.pem");
//! let tls = transport::server_config(&files, Arc::new(NoRevocations))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7443").await?;
//! transport::serve(router, listener, tls, std::future::pending()).await?;
//! # Ok(()) }
//! ```
//! In a service: `let peer = PeerConn::from_request(&request)?; peer.peer.identity …`.
//!
//! Client:
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use flashgate_proto::transport::{self, TlsFiles};
//! let files = TlsFiles::new("pki/stations/berlin-1.pem", "pki/stations/berlin-1.key", "pki/ca.pem");
//! let tls = transport::client_config(&files)?;
//! let channel = transport::connect("https://127.0.0.1:7443", tls, None).await?;
//! # Ok(()) }
//! ```
//!
//! Revocation and expiry are checked when a connection's handshake runs (session resumption is
//! off, so that is every connection); a connection accepted before its serial was revoked or its
//! certificate expired stays open, so services check `PeerConn::peer.serial_hex` / `not_after` on
//! every request as well (the broker does).

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use flashgate_common::pki::{self, Identity, PeerInfo, PkiError};

use crate::admission::{Accepted, IdentityConnections, PendingHandshakes, SourceGate};
use hyper_util::rt::TokioIo;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, Bytes, Service, StdError, http};
use tonic::service::Routes;
use tonic::transport::server::{Connected, Router};
use tonic::transport::{Channel, Endpoint, Uri};
use tower::Layer;
use zeroize::Zeroizing;

pub use crate::admission::{AdmissionCounts, AdmissionLimits, AdmissionStats, IdentityPermit};

/// How long a client-side TLS handshake may take by default ([`MtlsConnector`]).
pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect timeout of [`connect`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keep-alive PING interval of client channels ([`endpoint`]), also while idle.
pub const CLIENT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a keep-alive PING may go unanswered before the connection is closed: a peer that
/// vanished without closing it (a cable pulled, a host killed, a network cut) fails the calls on it
/// within about interval + timeout, instead of after their whole deadline.
pub const CLIENT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// ALPN protocol spoken over the TLS connection.
const ALPN_H2: &[u8] = b"h2";

/// A transport setup or connection failure. Every message names the file, address or value involved.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A PEM file could not be read.
    #[error("reading {what} {path}: {source}")]
    Read {
        /// `certificate`, `private key` or `CA certificate`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A PEM file does not hold what it should.
    #[error("{what} {path}: {reason}")]
    Pem {
        /// `certificate`, `private key` or `CA certificate`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Our own certificate does not carry a usable Flashgate identity.
    #[error("certificate {path}: {source}")]
    OwnIdentity {
        /// The certificate file.
        path: PathBuf,
        /// Why its identity is unusable.
        source: PkiError,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("building the {side} TLS configuration from {cert} and {key}: {source}")]
    Config {
        /// `server` or `client`.
        side: &'static str,
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' complaint.
        source: Box<rustls::Error>,
    },
    /// The client-certificate verifier could not be built from the CA file.
    #[error("client certificate verifier for CA {ca}: {reason}")]
    Verifier {
        /// The CA file.
        ca: PathBuf,
        /// rustls' complaint.
        reason: String,
    },
    /// An endpoint URI that cannot be used.
    #[error("endpoint {uri:?}: {reason}")]
    Endpoint {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TLS server name that cannot be used.
    #[error("server name {name:?}: {reason}")]
    ServerName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP connection could not be opened.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TLS handshake with a server failed or timed out.
    #[error("TLS handshake with {addr} (server name {server_name}): {reason}")]
    Handshake {
        /// `host:port`.
        addr: String,
        /// The name the server certificate was checked against.
        server_name: String,
        /// What went wrong.
        reason: String,
        /// The authorisation failure, when that is what it was.
        auth: Option<Box<crate::tls_alert::AuthFailure>>,
    },
    /// tonic could not set up the channel.
    #[error("gRPC channel to {uri}: {reason}")]
    Channel {
        /// The endpoint URI.
        uri: String,
        /// tonic's error with its causes.
        reason: String,
    },
    /// The server failed.
    #[error("gRPC server on {addr}: {reason}")]
    Serve {
        /// The listening address.
        addr: String,
        /// What went wrong, with causes.
        reason: String,
    },
}

/// An error and its chain of causes on one line, `outer: cause: root cause`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The ring crypto provider, the only one Flashgate uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// The three PEM files of one party: its certificate, its private key and the CA it trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Our certificate (PEM; the first certificate is the end entity, any others are sent as chain).
    pub cert: PathBuf,
    /// Our private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key: PathBuf,
    /// The CA certificate(s) that peers must chain to (PEM).
    pub ca: PathBuf,
}

impl TlsFiles {
    /// From three paths.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> Self {
        TlsFiles { cert: cert.into(), key: key.into(), ca: ca.into() }
    }

    /// The files of `identity` in a PKI directory written by `flashgate pki init`.
    pub fn for_identity(pki_dir: &Path, identity: &Identity) -> Self {
        let (cert, key) = pki::identity_paths(pki_dir, identity);
        TlsFiles { cert, key, ca: pki::ca_cert_path(pki_dir) }
    }
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bytes = std::fs::read(path).map_err(|source| TransportError::Read { what, path: path.into(), source })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::Pem { what, path: path.into(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TransportError::Pem { what, path: path.into(), reason: "no CERTIFICATE block found".into() });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    const WHAT: &str = "private key";
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| TransportError::Read {
        what: WHAT,
        path: path.into(),
        source,
    })?);
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TransportError::Pem {
        what: WHAT,
        path: path.into(),
        reason: format!("no usable PRIVATE KEY block ({e})"),
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TransportError> {
    const WHAT: &str = "CA certificate";
    let mut roots = RootCertStore::empty();
    for cert in load_certs(WHAT, path)? {
        roots.add(cert).map_err(|e| TransportError::Pem {
            what: WHAT,
            path: path.into(),
            reason: format!("not a trust anchor: {e}"),
        })?;
    }
    Ok(roots)
}

fn check_own_identity(path: &Path, cert: &CertificateDer<'_>) -> Result<PeerInfo, TransportError> {
    pki::peer_identity(cert).map_err(|source| TransportError::OwnIdentity { path: path.into(), source })
}

// ---------------------------------------------------------------------------------------------
// Revocation
// ---------------------------------------------------------------------------------------------

/// Serial numbers whose certificates must be refused at the handshake.
pub trait RevocationList: Send + Sync {
    /// Whether the certificate with this serial (lowercase hex without leading zero bytes, as in
    /// [`PeerInfo::serial_hex`]) is revoked.
    fn is_revoked(&self, serial_hex: &str) -> bool;
}

/// Nothing is revoked.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRevocations;

impl RevocationList for NoRevocations {
    fn is_revoked(&self, _serial_hex: &str) -> bool {
        false
    }
}

/// Canonical form of a serial written by a person: lowercase, `:` and whitespace removed,
/// leading zero bytes removed.
pub fn normalize_serial(serial: &str) -> String {
    let mut s: String = serial.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    s.make_ascii_lowercase();
    if s.len() % 2 == 1 {
        s.insert(0, '0');
    }
    while s.len() > 2 && s.starts_with("00") {
        s.drain(..2);
    }
    s
}

/// An in-memory revocation list that can change while the server runs.
#[derive(Debug, Default)]
pub struct RevokedSerials {
    serials: RwLock<HashSet<String>>,
}

impl RevokedSerials {
    /// A list holding these serials (any case, `:` separators allowed).
    pub fn new<I, S>(serials: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        RevokedSerials { serials: RwLock::new(serials.into_iter().map(|s| normalize_serial(s.as_ref())).collect()) }
    }

    /// Revoke one more serial; new handshakes with it are refused from now on.
    pub fn revoke(&self, serial: &str) {
        self.serials.write().unwrap_or_else(|p| p.into_inner()).insert(normalize_serial(serial));
    }

    /// Remove a serial from the list.
    pub fn unrevoke(&self, serial: &str) {
        self.serials.write().unwrap_or_else(|p| p.into_inner()).remove(&normalize_serial(serial));
    }

    /// Number of revoked serials.
    pub fn len(&self) -> usize {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RevocationList for RevokedSerials {
    fn is_revoked(&self, serial_hex: &str) -> bool {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).contains(&normalize_serial(serial_hex))
    }
}

// ---------------------------------------------------------------------------------------------
// Server configuration and verifier
// ---------------------------------------------------------------------------------------------

tokio::task_local! {
    /// Set by the accept loop around each handshake: the verifier writes why it refused a
    /// certificate here, so the single log line can also name the peer address.
    static HANDSHAKE_NOTE: Arc<Mutex<Option<String>>>;
}

/// Words for a rustls certificate error, for logs.
fn certificate_reason(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::NoCertificatesPresented => "no client certificate presented".into(),
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "not issued by our CA (unknown issuer)".into(),
            CertificateError::Expired => "certificate expired".into(),
            CertificateError::ExpiredContext { time, not_after } => {
                format!("certificate expired (not after {}, now {})", unix_time_str(*not_after), unix_time_str(*time))
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate not valid yet".into()
            }
            CertificateError::Revoked => "certificate revoked".into(),
            CertificateError::BadSignature => "bad certificate signature (not issued by our CA?)".into(),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "certificate not valid for this purpose (extended key usage)".into()
            }
            CertificateError::Other(OtherError(inner)) => format!("unusable identity: {inner}"),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                crate::tls_alert::auth_failure(e)
                    .map_or_else(|| "not valid for the server name".into(), |a| a.to_string())
            }
            other => format!("invalid certificate: {other:?}"),
        },
        E::AlertReceived(alert) => format!("peer sent TLS alert {alert:?}"),
        other => other.to_string(),
    }
}

fn unix_time_str(t: UnixTime) -> String {
    pki::format_time(std::time::UNIX_EPOCH + Duration::from_secs(t.as_secs()))
}

/// rustls' WebPKI client verifier (our CA only, clientAuth EKU, validity), plus: exactly one valid
/// SPIFFE identity, and a serial not in the revocation list.
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<dyn RevocationList>,
}

impl fmt::Debug for IdentityVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityVerifier").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl IdentityVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(ClientCertVerified, String), rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let info = pki::peer_identity(end_entity)
            .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
        if self.revoked.is_revoked(&info.serial_hex) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok((ok, info.serial_hex))
    }
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, now) {
            Ok((ok, _serial)) => Ok(ok),
            Err(e) => {
                let reason = certificate_reason(&e);
                let cert = pki::describe_certificate(end_entity);
                let note = format!("{reason}; client certificate {cert}");
                let recorded = HANDSHAKE_NOTE.try_with(|slot| {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(note.clone());
                });
                if recorded.is_err() {
                    // Used outside `serve`: no peer address known here, log what we have.
                    tracing::warn!(certificate = %cert, reason = %reason, "client certificate refused: {note}");
                }
                Err(e)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server TLS configuration: TLS 1.3 only, ring, ALPN `h2`, our certificate, and a client
/// certificate REQUIRED that chains to `files.ca`, carries `clientAuth`, is within its validity,
/// has exactly one valid SPIFFE identity, and whose serial is not in `revoked`. Session
/// resumption is off, so every connection runs these checks.
pub fn server_config(files: &TlsFiles, revoked: Arc<dyn RevocationList>) -> Result<Arc<ServerConfig>, TransportError> {
    let provider = crypto_provider();
    let roots = Arc::new(load_roots(&files.ca)?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TransportError::Verifier { ca: files.ca.clone(), reason: e.to_string() })?;
    let verifier = Arc::new(IdentityVerifier { inner, revoked });
    let certs = load_certs("certificate", &files.cert)?;
    check_own_identity(&files.cert, &certs[0])?;
    let key = load_key(&files.key)?;
    let config_err = |e| TransportError::Config {
        side: "server",
        cert: files.cert.clone(),
        key: files.key.clone(),
        source: Box::new(e),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(config_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session resumption: a resumed TLS 1.3 session skips the client certificate verifier,
    // so a certificate revoked (or expired) since the first handshake would still get in.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// Who is on the other end of a server connection; tonic puts it into every request's
/// extensions: `request.extensions().get::<PeerConn>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConn {
    /// The client's TCP address.
    pub remote_addr: SocketAddr,
    /// The verified client certificate's identity, serial and expiry.
    pub peer: PeerInfo,
}

impl PeerConn {
    /// The peer of a request served by [`serve`], or `unauthenticated` if the request did not
    /// come through it (which would be a wiring bug).
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<&PeerConn, tonic::Status> {
        request
            .extensions()
            .get::<PeerConn>()
            .ok_or_else(|| tonic::Status::unauthenticated("no verified client certificate on this connection"))
    }
}

/// A server-side TLS connection whose client certificate was verified.
pub struct MtlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerConn,
    /// This connection's slot among its identity's open connections, freed when it closes.
    _permit: IdentityPermit,
}

impl fmt::Debug for MtlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsStream").field("info", &self.info).finish_non_exhaustive()
    }
}

impl MtlsStream {
    /// The verified peer.
    pub fn peer(&self) -> &PeerConn {
        &self.info
    }
}

impl Connected for MtlsStream {
    type ConnectInfo = PeerConn;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serve `router` over mutual TLS on `listener` until `shutdown` completes, with
/// [`AdmissionLimits::default`]. See [`serve_with_options`].
pub async fn serve<L, ResBody>(
    router: Router<L>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError>
where
    L: Layer<Routes>,
    L::Service: Service<http::Request<Body>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    <L::Service as Service<http::Request<Body>>>::Future: Send,
    <L::Service as Service<http::Request<Body>>>::Error: Into<StdError> + Send,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<StdError>,
{
    serve_with_options(router, listener, tls, AdmissionLimits::default(), Arc::default(), shutdown).await
}

/// Serve `router` over mutual TLS on `listener` until `shutdown` completes.
///
/// The accept loop never waits. A source address within its handshake rate (see
/// [`crate::admission::SourceGate`]) has each accepted connection start at once; beyond its rate a
/// connection waits unread at the gate. A started connection gets its own task, which drops the
/// connection when its first TLS bytes do not arrive within `limits.first_byte_timeout` of `accept` or its handshake
/// does not complete within `limits.handshake_timeout` after them. Handshakes in progress are capped per
/// source address and in total; a new connection beyond a cap sheds the oldest pending handshake (see
/// [`crate::admission`]). A verified connection beyond `limits.max_connections_per_identity` open
/// connections of its identity is closed. What was dropped is counted in `stats` and logged as one
/// summary line at most every [`crate::admission::SUMMARY_INTERVAL`]. Refused certificates (none, wrong
/// CA, expired, revoked, no valid identity) are logged at `warn` with the peer address, its certificate
/// and the reason, and never reach tonic. Verified connections reach tonic with a [`PeerConn`] as their
/// connect info.
pub async fn serve_with_options<L, ResBody>(
    router: Router<L>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    limits: AdmissionLimits,
    stats: Arc<AdmissionStats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError>
where
    L: Layer<Routes>,
    L::Service: Service<http::Request<Body>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    <L::Service as Service<http::Request<Body>>>::Future: Send,
    <L::Service as Service<http::Request<Body>>>::Error: Into<StdError> + Send,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<StdError>,
{
    let addr = listener.local_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
    let (tx, rx) = mpsc::channel::<MtlsStream>(limits.max_pending_handshakes.max(1));
    let accept = AbortOnDrop(tokio::spawn(accept_loop(listener, TlsAcceptor::from(tls), tx, limits, stats)));
    let incoming = ReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
    tracing::info!(%addr, "serving gRPC over mutual TLS");
    let result = router.serve_with_incoming_shutdown(incoming, shutdown).await;
    drop(accept);
    result.map_err(|e| TransportError::Serve { addr, reason: error_chain(&e) })
}

/// Aborts the accept loop when `serve` returns or its future is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<MtlsStream>,
    limits: AdmissionLimits,
    stats: Arc<AdmissionStats>,
) {
    let pending = Arc::new(PendingHandshakes::default());
    let identities = IdentityConnections::new(limits.max_connections_per_identity);
    let max_waiting = crate::admission::effective_max_waiting(limits.max_waiting);
    let mut gate = SourceGate::new(&limits, max_waiting);
    tracing::info!(
        rate = limits.handshake_rate_per_source,
        burst = limits.handshake_burst_per_source,
        max_waiting,
        "admission: handshakes per source address are rate-limited; connections beyond wait unread"
    );
    let mut summary = Summary::new(&stats);
    let mut admitted = Vec::new();
    // Dropping the set (when this loop ends or is aborted) aborts handshakes still running.
    let mut handshakes = JoinSet::new();
    loop {
        while handshakes.try_join_next().is_some() {}
        let release_at = gate.next_release(Instant::now());
        let wait_for_release = async move {
            match release_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let accepted = tokio::select! {
            _ = tx.closed() => break,
            _ = wait_for_release => None,
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => Some(Accepted { tcp, remote, at: Instant::now() }),
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning; pending handshakes time out and free
                    // descriptors.
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Some(conn) = accepted {
            let _ = conn.tcp.set_nodelay(true);
            admitted.extend(gate.offer(conn, &stats));
        }
        if release_at.is_some_and(|at| at <= Instant::now()) {
            gate.release(Instant::now(), &stats, &mut admitted);
        }
        for conn in admitted.drain(..) {
            let guard =
                pending.admit(conn.remote.ip(), limits.max_pending_handshakes, limits.max_pending_per_source, &stats);
            let id = guard.id();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let (stats2, identities) = (Arc::clone(&stats), Arc::clone(&identities));
            let task = handshakes.spawn(async move {
                let stream = handshake(acceptor, conn, limits, &stats2, &identities).await;
                // No longer pending, whether it succeeded or not: a completed connection is never shed.
                drop(guard);
                if let Some(stream) = stream {
                    // Fails only when the server is shutting down; the connection is then dropped.
                    let _ = tx.send(stream).await;
                }
            });
            pending.register(id, task);
        }
        summary.maybe_log(&stats, &pending, &gate);
    }
}

/// The periodic summary of dropped connections.
struct Summary {
    last: std::time::Instant,
    seen: AdmissionCounts,
}

impl Summary {
    fn new(stats: &AdmissionStats) -> Self {
        Summary { last: std::time::Instant::now(), seen: stats.snapshot() }
    }

    fn maybe_log(&mut self, stats: &AdmissionStats, pending: &PendingHandshakes, gate: &SourceGate) {
        if self.last.elapsed() < crate::admission::SUMMARY_INTERVAL {
            return;
        }
        let now = stats.snapshot();
        let d = now.since(&self.seen);
        if !d.is_zero() {
            tracing::warn!(
                first_byte_timeouts = d.first_byte_timeouts,
                handshake_timeouts = d.handshake_timeouts,
                shed_per_source = d.shed_per_source,
                shed_total = d.shed_total,
                identity_limit = d.identity_limit,
                waiting_timeouts = d.waiting_timeouts,
                waiting_full = d.waiting_full,
                pending = pending.len(None),
                waiting = gate.waiting(),
                "connections dropped by admission control in the last {:?}",
                self.last.elapsed()
            );
        }
        self.seen = now;
        self.last = std::time::Instant::now();
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(e.kind(), K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe)
}

async fn handshake(
    acceptor: TlsAcceptor,
    conn: Accepted,
    limits: AdmissionLimits,
    stats: &AdmissionStats,
    identities: &Arc<IdentityConnections>,
) -> Option<MtlsStream> {
    // 1. The first TLS bytes, within a short deadline: a socket that sends nothing costs one task for at
    //    most that long.
    //    The deadline counts from `accept`, time spent waiting at the source gate included.
    let Accepted { tcp, remote, at } = conn;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(at + limits.first_byte_timeout, tcp.peek(&mut first)).await {
        Err(_) => {
            AdmissionStats::bump(&stats.first_byte_timeouts);
            tracing::debug!(peer = %remote, "dropped connection from {remote}: no TLS bytes within {:?}",
                limits.first_byte_timeout);
            return None;
        }
        Ok(Ok(0)) | Ok(Err(_)) => {
            tracing::debug!(peer = %remote, "connection from {remote} closed before sending TLS bytes");
            return None;
        }
        Ok(Ok(_)) => {}
    }
    // 2. The whole handshake, within the second deadline.
    let note = Arc::new(Mutex::new(None::<String>));
    let result =
        HANDSHAKE_NOTE.scope(note.clone(), tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp))).await;
    let recorded = || note.lock().unwrap_or_else(|p| p.into_inner()).take();
    match result {
        Err(_) => {
            AdmissionStats::bump(&stats.handshake_timeouts);
            tracing::debug!(peer = %remote, "dropped connection from {remote}: TLS handshake not completed within {:?}",
                limits.handshake_timeout);
            None
        }
        Ok(Err(e)) => {
            let tls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
            match (recorded(), tls_error) {
                (Some(detail), _) => {
                    tracing::warn!(peer = %remote, "refused connection from {remote}: {detail}");
                }
                (None, Some(tls)) => {
                    let reason = certificate_reason(tls);
                    tracing::warn!(peer = %remote, reason = %reason, "refused connection from {remote}: {reason}");
                }
                (None, None) if is_disconnect(&e) => {
                    tracing::debug!(peer = %remote, error = %e, "connection from {remote} closed during the TLS handshake");
                }
                (None, None) => {
                    tracing::warn!(peer = %remote, error = %e, "refused connection from {remote}: TLS handshake failed: {e}");
                }
            }
            None
        }
        Ok(Ok(tls)) => {
            let (_, session) = tls.get_ref();
            let peer = match session.peer_certificates().and_then(|c| c.first()) {
                Some(cert) => pki::peer_identity(cert),
                // Unreachable with our verifier (client auth is mandatory); refuse anyway.
                None => {
                    tracing::warn!(peer = %remote, "refused connection from {remote}: no client certificate presented");
                    return None;
                }
            };
            match peer {
                Ok(peer) => {
                    let uri = peer.identity.to_uri();
                    let Some(permit) = identities.acquire(&uri) else {
                        AdmissionStats::bump(&stats.identity_limit);
                        tracing::warn!(peer = %remote, identity = %uri, serial = %peer.serial_hex,
                            limit = limits.max_connections_per_identity,
                            "refused connection from {remote}: {uri} already has the most open connections allowed");
                        return None;
                    };
                    tracing::debug!(peer = %remote, identity = %peer.identity, serial = %peer.serial_hex, "mTLS connection accepted");
                    Some(MtlsStream { inner: tls, info: PeerConn { remote_addr: remote, peer }, _permit: permit })
                }
                Err(e) => {
                    tracing::warn!(peer = %remote, "refused connection from {remote}: {e}");
                    None
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// Client TLS configuration: TLS 1.3 only, ring, ALPN `h2`, `files.ca` as the only trust anchor,
/// our certificate for client authentication, no session resumption.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TransportError> {
    let roots = load_roots(&files.ca)?;
    let certs = load_certs("certificate", &files.cert)?;
    check_own_identity(&files.cert, &certs[0])?;
    let key = load_key(&files.key)?;
    let config_err = |e| TransportError::Config {
        side: "client",
        cert: files.cert.clone(),
        key: files.key.clone(),
        source: Box::new(e),
    };
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(config_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Our servers never resume sessions (see `server_config`); don't offer to.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A tower connector for tonic's `Endpoint::connect_with_connector`: TCP to the URI's host and
/// port, then a rustls client handshake checked against `server_name` (default: the URI's host).
#[derive(Clone)]
pub struct MtlsConnector {
    tls: TlsConnector,
    server_name: Option<ServerName<'static>>,
    handshake_timeout: Duration,
}

impl fmt::Debug for MtlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsConnector")
            .field("server_name", &self.server_name)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl MtlsConnector {
    /// A connector using `tls`; `server_name` overrides the name the server certificate must
    /// match (a DNS name or an IP address).
    pub fn new(tls: Arc<ClientConfig>, server_name: Option<&str>) -> Result<Self, TransportError> {
        let server_name = server_name
            .map(|n| {
                ServerName::try_from(n.to_string())
                    .map_err(|e| TransportError::ServerName { name: n.to_string(), reason: e.to_string() })
            })
            .transpose()?;
        Ok(MtlsConnector { tls: TlsConnector::from(tls), server_name, handshake_timeout: CLIENT_HANDSHAKE_TIMEOUT })
    }

    /// Change the TLS handshake timeout.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }
}

/// The connection [`MtlsConnector`] produces.
pub type MtlsClientIo = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl Service<Uri> for MtlsConnector {
    type Response = MtlsClientIo;
    type Error = TransportError;
    type Future = Pin<Box<dyn Future<Output = Result<MtlsClientIo, TransportError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let fixed_name = self.server_name.clone();
        let timeout = self.handshake_timeout;
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| TransportError::Endpoint { uri: uri.to_string(), reason: "no host".into() })?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let addr = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
            let server_name = match fixed_name {
                Some(n) => n,
                None => ServerName::try_from(host.clone())
                    .map_err(|e| TransportError::ServerName { name: host.clone(), reason: e.to_string() })?,
            };
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|source| TransportError::Connect { addr: addr.clone(), source })?;
            let _ = tcp.set_nodelay(true);
            let name_text = server_name.to_str().into_owned();
            let handshake_err = |reason: String, auth| TransportError::Handshake {
                addr: addr.clone(),
                server_name: name_text.clone(),
                reason,
                auth,
            };
            let stream = tokio::time::timeout(timeout, tls.connect(server_name, tcp))
                .await
                .map_err(|_| handshake_err(format!("no answer within {timeout:?}"), None))?
                .map_err(|e| {
                    let auth = crate::tls_alert::auth_failure(&e).map(Box::new);
                    let reason = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                        Some(tls) => certificate_reason(tls),
                        None => e.to_string(),
                    };
                    handshake_err(reason, auth)
                })?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A broker address as given to every client (`flashgate admin --broker`, the agent's
/// `broker.endpoints`, the benches): `https://HOST:PORT`, checked before anything connects, so that
/// `https://127.0.0.1:35359.` (a trailing dot) is refused naming the URL rather than read as
/// port 443. HOST is a DNS name, an IPv4 address or a bracketed IPv6 address; the port is required
/// (brokers listen on 7443 by default, not 443); a trailing `/` is allowed, a path, query, fragment
/// or user name is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    host: String,
    port: u16,
}

impl BrokerUrl {
    /// Check `uri`; the error names it and says what is wrong.
    pub fn parse(uri: &str) -> Result<Self, TransportError> {
        let bad = |reason: String| TransportError::Endpoint { uri: uri.to_string(), reason };
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(bad("missing scheme, expected https://host:port".into()));
        };
        if !scheme.eq_ignore_ascii_case("https") {
            return Err(bad(format!("scheme {scheme:?}: only https is supported (always mutual TLS)")));
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if !tail.is_empty() && tail != "/" {
            let what = match tail.as_bytes()[0] {
                b'?' => "a query",
                b'#' => "a fragment",
                _ => "a path",
            };
            return Err(bad(format!("unexpected {what} {tail:?}: a broker URL is https://host:port")));
        }
        if authority.contains('@') {
            return Err(bad("a user name is not allowed (the client certificate says who you are)".into()));
        }
        if authority.is_empty() {
            return Err(bad("missing host, expected https://host:port".into()));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((addr, after)) = v6.split_once(']') else {
                return Err(bad(format!("IPv6 address {authority:?} lacks its closing ']'")));
            };
            addr.parse::<std::net::Ipv6Addr>().map_err(|_| bad(format!("{addr:?} is not an IPv6 address")))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p,
                None if after.is_empty() => return Err(bad(missing_port())),
                None => return Err(bad(format!("unexpected {after:?} after the IPv6 address"))),
            };
            (format!("[{addr}]"), port)
        } else {
            let Some((host, port)) = authority.rsplit_once(':') else {
                return Err(bad(missing_port()));
            };
            check_host(host).map_err(bad)?;
            (host.to_ascii_lowercase(), port)
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(bad(format!("port {port:?} is not a number from 1 to 65535"))),
        };
        Ok(BrokerUrl { host, port })
    }

    /// The host: a lowercase DNS name, an IPv4 address, or an IPv6 address in brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BrokerUrl::parse(s)
    }
}

fn missing_port() -> String {
    "missing port, expected https://host:port (brokers listen on 7443 by default)".into()
}

/// A host of a broker URL: an IPv4 address or a DNS name (labels of letters, digits and `-`).
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("missing host, expected https://host:port".into());
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host.parse::<std::net::Ipv4Addr>().map(|_| ()).map_err(|_| format!("{host:?} is not an IPv4 address"));
    }
    if host.len() > 253 {
        return Err(format!("host name of {} characters: at most 253 are allowed", host.len()));
    }
    if host.ends_with('.') {
        return Err(format!("host {host:?} ends with '.'"));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(format!("host {host:?} has an empty label (two dots in a row)"));
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} of host {host:?} is longer than 63 characters"));
        }
        if let Some(c) = label.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
            return Err(format!("host {host:?} contains {c:?}: only letters, digits, '-' and '.' are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} of host {host:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// A tonic [`Endpoint`] for `uri` (`https://host:port`) to use with [`MtlsConnector`].
///
/// tonic refuses `https` URIs when its own TLS is not configured, so the endpoint connects to
/// `http://host:port` (our connector does the TLS) while requests carry the `https` origin.
/// Connections time out after [`DEFAULT_CONNECT_TIMEOUT`] and are checked with HTTP/2 keep-alive
/// ([`CLIENT_KEEP_ALIVE_INTERVAL`], [`CLIENT_KEEP_ALIVE_TIMEOUT`]).
pub fn endpoint(uri: &str) -> Result<Endpoint, TransportError> {
    let bad = |reason: String| TransportError::Endpoint { uri: uri.to_string(), reason };
    let authority = BrokerUrl::parse(uri)?.authority();
    let dial = format!("http://{authority}");
    let origin: Uri = format!("https://{authority}").parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
    Endpoint::from_shared(dial)
        .map(|e| {
            e.origin(origin)
                .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
                .http2_keep_alive_interval(CLIENT_KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(CLIENT_KEEP_ALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
        })
        .map_err(|e| bad(error_chain(&e)))
}

/// Connect to `uri` (`https://host:port`) over mutual TLS and return a tonic channel.
/// `server_name` overrides the name the server certificate must match (default: the URI host).
///
/// With TLS 1.3 the server checks our certificate after our side of the handshake is done, so
/// a server that refuses us may show up as an error of the first RPC rather than of `connect`.
pub async fn connect(uri: &str, tls: Arc<ClientConfig>, server_name: Option<&str>) -> Result<Channel, TransportError> {
    let connector = MtlsConnector::new(tls, server_name)?;
    endpoint(uri)?
        .connect_with_connector(connector)
        .await
        .map_err(|e| TransportError::Channel { uri: uri.to_string(), reason: error_chain(&e) })
}

/// Like [`connect`], but the channel connects on first use (and reconnects as needed).
pub fn connect_lazy(uri: &str, tls: Arc<ClientConfig>, server_name: Option<&str>) -> Result<Channel, TransportError> {
    let connector = MtlsConnector::new(tls, server_name)?;
    Ok(endpoint(uri)?.connect_with_connector_lazy(connector))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn serials_normalize() {
        assert_eq!(normalize_serial("4A:0B:FF"), "4a0bff");
        assert_eq!(normalize_serial("00:80:01"), "8001");
        assert_eq!(normalize_serial(" abc "), "0abc");
        assert_eq!(normalize_serial("00"), "00");
        let list = RevokedSerials::new(["4A:0B"]);
        assert!(list.is_revoked("4a0b"));
        assert!(!list.is_revoked("4a0c"));
        list.revoke("004a0c");
        assert!(list.is_revoked("4a0c"));
        list.unrevoke("4A0C");
        assert_eq!(list.len(), 1);
        assert!(!NoRevocations.is_revoked("4a0b"));
    }

    #[test]
    fn endpoints() {
        let e = endpoint("https://127.0.0.1:7443").unwrap();
        assert_eq!(e.uri().to_string(), "http://127.0.0.1:7443/");
        assert!(endpoint("https://[::1]:7443").is_ok());
        for (uri, needle) in [
            ("http://127.0.0.1:7443", "only https"),
            ("127.0.0.1:7443", "scheme"),
            ("https://127.0.0.1:7443/path", "path"),
            ("https://", "https://"),
            ("https://127.0.0.1:35359.", "port \"35359.\" is not a number from 1 to 65535"),
            ("https://127.0.0.1", "missing port"),
            ("https://127.0.0.1:0", "from 1 to 65535"),
            ("https://127.0.0.1:65536", "from 1 to 65535"),
            ("https://127.0.0.1:+7443", "from 1 to 65535"),
            ("https://127.0.0.1:7443?x=1", "query"),
            ("https://127.0.0.1:7443#top", "fragment"),
            ("https://ops@broker:7443", "user name"),
            ("https://broker.:7443", "ends with '.'"),
            ("https://bro ker:7443", "contains ' '"),
            ("https://broker..test:7443", "empty label"),
            ("https://-broker:7443", "starts or ends with '-'"),
            ("https://127.0.0.256:7443", "not an IPv4 address"),
            ("https://[::1:7443", "closing ']'"),
            ("https://[::1]", "missing port"),
            ("https://[::g]:7443", "not an IPv6 address"),
        ] {
            let msg = endpoint(uri).unwrap_err().to_string();
            assert!(msg.contains(needle) && msg.contains(&format!("{uri:?}")), "{uri}: {msg}");
        }
        let u = BrokerUrl::parse("HTTPS://Broker-1.Factory.test:7443/").unwrap();
        assert_eq!((u.host(), u.port()), ("broker-1.factory.test", 7443));
        assert_eq!(u.to_string(), "https://broker-1.factory.test:7443");
        assert_eq!("https://[::1]:1".parse::<BrokerUrl>().unwrap().authority(), "[::1]:1");
        let long = format!("https://{}.test:7443", "a".repeat(64));
        assert!(BrokerUrl::parse(&long).unwrap_err().to_string().contains("longer than 63 characters"));
        let tls = Arc::new(
            ClientConfig::builder_with_provider(crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
        );
        let msg = MtlsConnector::new(tls, Some("not a name!")).unwrap_err().to_string();
        assert!(msg.contains("not a name!"), "{msg}");
    }

    #[test]
    fn reasons_in_words() {
        assert_eq!(certificate_reason(&rustls::Error::NoCertificatesPresented), "no client certificate presented");
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert!(certificate_reason(&unknown).contains("not issued by our CA"));
        let revoked = rustls::Error::InvalidCertificate(CertificateError::Revoked);
        assert_eq!(certificate_reason(&revoked), "certificate revoked");
        let e = std::io::Error::other(TransportError::Endpoint { uri: "x".into(), reason: "bad".into() });
        assert_eq!(error_chain(&e), "endpoint \"x\": bad");
    }

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles::new("/nonexistent/c.pem", "/nonexistent/c.key", "/nonexistent/ca.pem");
        let msg = client_config(&files).unwrap_err().to_string();
        assert!(msg.contains("CA certificate /nonexistent/ca.pem"), "{msg}");
        let msg = server_config(&files, Arc::new(NoRevocations)).unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/ca.pem"), "{msg}");
    }
}
