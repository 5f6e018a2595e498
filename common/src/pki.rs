//! Flashgate's X.509 identities and development PKI: SPIFFE-style identities
//! (`spiffe://TRUST_DOMAIN/site/SITE/station/N`, `…/admin/NAME`, `…/broker/NAME`) with a strict
//! parser, a development certificate authority generated with rcgen (`init_dev_pki`,
//! `issue_cert`), and `peer_identity`, which reads the identity, serial and expiry out of a peer's
//! end-entity certificate with x509-parser.
//!
//! Directory layout written by [`init_dev_pki`] (private keys are PKCS#8 PEM, P-256, mode 0600):
//!
//! ```text
//! DIR/ca.pem  DIR/ca.key
//! DIR/brokers/NAME.pem   DIR/brokers/NAME.key
//! DIR/admins/NAME.pem    DIR/admins/NAME.key
//! DIR/stations/SITE-N.pem DIR/stations/SITE-N.key
//! ```
//!
//! Certificates: the CA has `basicConstraints CA:true, pathlen:0` and `keyCertSign`; every leaf
//! carries exactly one SPIFFE URI SAN, a random 16-byte serial, the `clientAuth` extended key
//! usage, and brokers additionally `serverAuth` with their DNS and IP SANs. Private keys only ever
//! live in zeroizing buffers and are never logged or printed.

use std::fmt;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

/// URI scheme of every Flashgate identity.
pub const SPIFFE_SCHEME: &str = "spiffe";
/// Default trust domain of a development PKI.
pub const DEFAULT_TRUST_DOMAIN: &str = "factory.test";
/// File name of the CA certificate inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Longest accepted trust domain, in bytes (the SPIFFE limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest accepted site, admin or broker name, in bytes.
pub const MAX_NAME_LEN: usize = 63;
/// How far in the past `not_before` is put, to tolerate clock skew between machines.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Validity of a development CA: ten years, or the leaf validity if that is longer.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Something the PKI code refused or failed to do. Every message names the value or file involved.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// An identity URI that is not a valid Flashgate SPIFFE identity.
    #[error("identity URI {uri:?}: {part}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// The offending part: `scheme`, `trust domain`, `path`, `site name`, `station number`, …
        part: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A name (site, admin, broker, trust domain, DNS name) that cannot be used.
    #[error("{what} {value:?}: {reason}")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The name as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be written whole.
    #[error(transparent)]
    Write(#[from] crate::atomic_file::WriteError),
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// `init_dev_pki` refuses to replace an existing certificate authority.
    #[error("{path}: a CA already exists here; refusing to overwrite it (use `pki issue` to add certificates)")]
    CaExists {
        /// The existing `ca.pem` or `ca.key`.
        path: PathBuf,
    },
    /// A PEM file does not hold what it should.
    #[error("{path}: {reason}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Key generation or certificate signing failed inside rcgen.
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being done, e.g. `signing the certificate of spiffe://…`.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A validity window that cannot be used.
    #[error("validity: {reason}")]
    Validity {
        /// What is wrong with the window.
        reason: String,
    },
    /// A DER certificate that could not be parsed.
    #[error("certificate: cannot parse DER: {reason}")]
    CertificateParse {
        /// x509-parser's complaint.
        reason: String,
    },
    /// A certificate without a SPIFFE URI SAN.
    #[error("certificate {subject:?}: no spiffe:// URI subject alternative name (exactly one is required)")]
    MissingIdentity {
        /// The certificate's subject DN.
        subject: String,
    },
    /// A certificate with more than one SPIFFE URI SAN.
    #[error("certificate {subject:?}: {} spiffe:// URI subject alternative names {uris:?} (exactly one is required)", uris.len())]
    AmbiguousIdentity {
        /// The certificate's subject DN.
        subject: String,
        /// Every SPIFFE URI found.
        uris: Vec<String>,
    },
    /// A CA certificate presented where an end-entity certificate is required.
    #[error("certificate {subject:?}: is a CA certificate (basicConstraints CA:true), not an end-entity certificate")]
    CaAsEndEntity {
        /// The certificate's subject DN.
        subject: String,
    },
    /// DNS or IP SANs requested for an identity that is not a broker.
    #[error("{identity}: DNS/IP subject alternative names are only issued to brokers (they alone get serverAuth)")]
    SansNotAllowed {
        /// The identity URI.
        identity: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

// ---------------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------------

/// Who a certificate belongs to, as carried in its single SPIFFE URI SAN.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A programming station PC running the agent: `spiffe://TD/site/SITE/station/N`.
    Station {
        /// Trust domain, e.g. `factory.test`.
        trust_domain: String,
        /// Site name, e.g. `berlin`.
        site: String,
        /// Station number within the site, from 1.
        station: u32,
    },
    /// An operator: `spiffe://TD/admin/NAME`.
    Admin {
        /// Trust domain.
        trust_domain: String,
        /// Operator name.
        name: String,
    },
    /// A licence service instance: `spiffe://TD/broker/NAME`.
    Broker {
        /// Trust domain.
        trust_domain: String,
        /// Broker instance name.
        name: String,
    },
}

/// The role an [`Identity`] plays, without its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A station PC.
    Station,
    /// An operator.
    Admin,
    /// A licence service.
    Broker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Station => "station",
            Role::Admin => "admin",
            Role::Broker => "broker",
        })
    }
}

/// Check a trust domain: 1..=255 bytes of `a-z 0-9 . - _`, not starting or ending with a dot.
fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("is empty".into());
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!("is {} bytes long, at most {MAX_TRUST_DOMAIN_LEN} allowed", td.len()));
    }
    if let Some(c) = td.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')) {
        return Err(format!("character {c:?} not allowed (only a-z 0-9 . - _)"));
    }
    if td.starts_with('.') || td.ends_with('.') || td.contains("..") {
        return Err("empty DNS label (leading, trailing or doubled dot)".into());
    }
    Ok(())
}

/// Check a site/admin/broker name: `[a-z0-9._-]{1,63}`, and not `.` or `..`.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is {} bytes long, at most {MAX_NAME_LEN} allowed", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')) {
        return Err(format!("character {c:?} not allowed (only a-z 0-9 . - _)"));
    }
    if name == "." || name == ".." {
        return Err("dot segments are not names".into());
    }
    Ok(())
}

/// Parse a station number: canonical decimal (no sign, no leading zero), 1..=u32::MAX.
fn parse_station_number(s: &str) -> Result<u32, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be a decimal number".into());
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err("leading zeros are not allowed".into());
    }
    let n: u32 = s.parse().map_err(|_| format!("does not fit in 32 bits (max {})", u32::MAX))?;
    if n == 0 {
        return Err("stations are numbered from 1".into());
    }
    Ok(n)
}

impl Identity {
    /// A station identity, validated.
    pub fn station(trust_domain: &str, site: &str, station: u32) -> Result<Self, PkiError> {
        let id = Identity::Station { trust_domain: trust_domain.into(), site: site.into(), station };
        id.validate()?;
        Ok(id)
    }

    /// An admin identity, validated.
    pub fn admin(trust_domain: &str, name: &str) -> Result<Self, PkiError> {
        let id = Identity::Admin { trust_domain: trust_domain.into(), name: name.into() };
        id.validate()?;
        Ok(id)
    }

    /// A broker identity, validated.
    pub fn broker(trust_domain: &str, name: &str) -> Result<Self, PkiError> {
        let id = Identity::Broker { trust_domain: trust_domain.into(), name: name.into() };
        id.validate()?;
        Ok(id)
    }

    /// Check every field against the same rules [`Identity::parse_uri`] applies.
    pub fn validate(&self) -> Result<(), PkiError> {
        let bad = |what: &'static str, value: &str, reason: String| PkiError::InvalidName {
            what,
            value: value.to_string(),
            reason,
        };
        check_trust_domain(self.trust_domain()).map_err(|r| bad("trust domain", self.trust_domain(), r))?;
        match self {
            Identity::Station { site, station, .. } => {
                check_name(site).map_err(|r| bad("site name", site, r))?;
                if *station == 0 {
                    return Err(bad("station number", "0", "stations are numbered from 1".into()));
                }
            }
            Identity::Admin { name, .. } => check_name(name).map_err(|r| bad("admin name", name, r))?,
            Identity::Broker { name, .. } => check_name(name).map_err(|r| bad("broker name", name, r))?,
        }
        Ok(())
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        match self {
            Identity::Station { trust_domain, .. }
            | Identity::Admin { trust_domain, .. }
            | Identity::Broker { trust_domain, .. } => trust_domain,
        }
    }

    /// The role, without names.
    pub fn role(&self) -> Role {
        match self {
            Identity::Station { .. } => Role::Station,
            Identity::Admin { .. } => Role::Admin,
            Identity::Broker { .. } => Role::Broker,
        }
    }

    /// The identity as a URI, e.g. `spiffe://factory.test/site/berlin/station/1`.
    pub fn to_uri(&self) -> String {
        match self {
            Identity::Station { trust_domain, site, station } => {
                format!("{SPIFFE_SCHEME}://{trust_domain}/site/{site}/station/{station}")
            }
            Identity::Admin { trust_domain, name } => format!("{SPIFFE_SCHEME}://{trust_domain}/admin/{name}"),
            Identity::Broker { trust_domain, name } => format!("{SPIFFE_SCHEME}://{trust_domain}/broker/{name}"),
        }
    }

    /// Parse an identity URI strictly: scheme exactly `spiffe://`, a trust domain of
    /// `a-z 0-9 . - _`, one of the three path shapes, names `[a-z0-9._-]{1,63}`, station numbers in
    /// canonical decimal from 1. No port, user info, query, fragment, percent-encoding or empty
    /// segments. Errors name the offending part.
    pub fn parse_uri(uri: &str) -> Result<Identity, PkiError> {
        let err = |part: &'static str, reason: String| PkiError::InvalidUri { uri: uri.to_string(), part, reason };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("scheme", "must start with \"spiffe://\" (lowercase)".into()))?;
        if let Some(c) = rest.chars().find(|c| matches!(c, '?' | '#' | '%')) {
            let what = match c {
                '?' => "query",
                '#' => "fragment",
                _ => "percent-encoding",
            };
            return Err(err("path", format!("{what} ({c:?}) not allowed")));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.contains(':') {
            return Err(err("trust domain", format!("{td:?}: a port is not allowed")));
        }
        if td.contains('@') {
            return Err(err("trust domain", format!("{td:?}: user info is not allowed")));
        }
        check_trust_domain(td).map_err(|r| err("trust domain", format!("{td:?} {r}")))?;
        if path.is_empty() || path == "/" {
            return Err(err("path", "missing (expected /site/SITE/station/N, /admin/NAME or /broker/NAME)".into()));
        }
        let segments: Vec<&str> = path[1..].split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(err("path", format!("{path:?} has an empty segment (doubled or trailing '/')")));
        }
        let name = |part: &'static str, s: &str| check_name(s).map_err(|r| err(part, format!("{s:?} {r}")));
        match segments.as_slice() {
            ["site", site, "station", n] => {
                name("site name", site)?;
                let station = parse_station_number(n).map_err(|r| err("station number", format!("{n:?} {r}")))?;
                Ok(Identity::Station { trust_domain: td.into(), site: (*site).into(), station })
            }
            ["admin", n] => {
                name("admin name", n)?;
                Ok(Identity::Admin { trust_domain: td.into(), name: (*n).into() })
            }
            ["broker", n] => {
                name("broker name", n)?;
                Ok(Identity::Broker { trust_domain: td.into(), name: (*n).into() })
            }
            _ => Err(err("path", format!("{path:?} is not /site/SITE/station/N, /admin/NAME or /broker/NAME"))),
        }
    }

    /// Subdirectory of a PKI directory holding this identity's files: `stations`, `admins`, `brokers`.
    pub fn subdir(&self) -> &'static str {
        match self {
            Identity::Station { .. } => "stations",
            Identity::Admin { .. } => "admins",
            Identity::Broker { .. } => "brokers",
        }
    }

    /// File stem of this identity's files: `SITE-N` for stations, the name otherwise.
    pub fn file_stem(&self) -> String {
        match self {
            Identity::Station { site, station, .. } => format!("{site}-{station}"),
            Identity::Admin { name, .. } | Identity::Broker { name, .. } => name.clone(),
        }
    }

    /// Short human name used as the certificate's common name: `station berlin/1`, `admin NAME`, `broker NAME`.
    pub fn common_name(&self) -> String {
        match self {
            Identity::Station { site, station, .. } => format!("station {site}/{station}"),
            Identity::Admin { name, .. } => format!("admin {name}"),
            Identity::Broker { name, .. } => format!("broker {name}"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}

impl FromStr for Identity {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse_uri(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// `DIR/ca.pem`.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join(CA_CERT_FILE)
}

/// `DIR/ca.key`.
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join(CA_KEY_FILE)
}

/// Where an identity's certificate and key live in a PKI directory: `(DIR/SUB/STEM.pem, DIR/SUB/STEM.key)`.
pub fn identity_paths(dir: &Path, identity: &Identity) -> (PathBuf, PathBuf) {
    let base = dir.join(identity.subdir());
    let stem = identity.file_stem();
    (base.join(format!("{stem}.pem")), base.join(format!("{stem}.key")))
}

// ---------------------------------------------------------------------------------------------
// Validity
// ---------------------------------------------------------------------------------------------

/// The `notBefore`/`notAfter` of a certificate to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidityWindow {
    /// First instant the certificate is valid.
    pub not_before: SystemTime,
    /// Last instant the certificate is valid.
    pub not_after: SystemTime,
}

impl ValidityWindow {
    /// From [`CLOCK_SKEW`] ago until `validity` from now.
    pub fn from_now(validity: Duration) -> Result<Self, PkiError> {
        let now = SystemTime::now();
        let not_after = now.checked_add(validity).ok_or_else(|| PkiError::Validity {
            reason: format!("{} days from now is out of range", validity.as_secs() / 86_400),
        })?;
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH);
        Ok(ValidityWindow { not_before, not_after })
    }

    /// An explicit window (tests use one in the past to make expired certificates).
    pub fn explicit(not_before: SystemTime, not_after: SystemTime) -> Self {
        ValidityWindow { not_before, not_after }
    }

    fn to_offsets(self) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
        if self.not_after <= self.not_before {
            return Err(PkiError::Validity {
                reason: format!(
                    "not_after ({}) must be after not_before ({})",
                    unix_secs(self.not_after),
                    unix_secs(self.not_before)
                ),
            });
        }
        Ok((OffsetDateTime::from(self.not_before), OffsetDateTime::from(self.not_after)))
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn system_time_from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Format a time as RFC 3339 UTC seconds, e.g. `2027-05-01T12:00:00Z` (for tables and logs).
pub fn format_time(t: SystemTime) -> String {
    let odt = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        odt.year(),
        u8::from(odt.month()),
        odt.day(),
        odt.hour(),
        odt.minute(),
        odt.second()
    )
}

// ---------------------------------------------------------------------------------------------
// Issuing
// ---------------------------------------------------------------------------------------------

/// What [`init_dev_pki`] generates.
#[derive(Debug, Clone)]
pub struct PkiInit {
    /// Trust domain of every identity, e.g. `factory.test`.
    pub trust_domain: String,
    /// Sites; each gets `stations_per_site` station certificates numbered from 1.
    pub sites: Vec<String>,
    /// Stations per site.
    pub stations_per_site: u32,
    /// Operator names (default `["admin"]`).
    pub admins: Vec<String>,
    /// Broker instance names (default `["broker-1"]`).
    pub brokers: Vec<String>,
    /// DNS SANs of every broker certificate (default `["localhost"]`).
    pub broker_dns: Vec<String>,
    /// IP SANs of every broker certificate (default `[127.0.0.1]`).
    pub broker_ips: Vec<IpAddr>,
    /// Validity of the leaf certificates (the CA gets [`CA_VALIDITY`] or this, whichever is longer).
    pub validity: Duration,
}

impl Default for PkiInit {
    fn default() -> Self {
        PkiInit {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            sites: Vec::new(),
            stations_per_site: 0,
            admins: vec!["admin".into()],
            brokers: vec!["broker-1".into()],
            broker_dns: vec!["localhost".into()],
            broker_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            validity: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// One certificate written to a PKI directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The identity in the certificate's URI SAN; `None` for the CA.
    pub identity: Option<Identity>,
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
    /// Serial number, lowercase hex (see [`serial_hex`]).
    pub serial_hex: String,
    /// Expiry.
    pub not_after: SystemTime,
}

/// Everything [`init_dev_pki`] wrote.
#[derive(Debug, Clone)]
pub struct PkiLayout {
    /// The PKI directory.
    pub dir: PathBuf,
    /// The CA certificate and key.
    pub ca: IssuedCert,
    /// Every leaf: brokers, then admins, then stations by site.
    pub leaves: Vec<IssuedCert>,
}

impl PkiLayout {
    /// The CA followed by every leaf.
    pub fn files(&self) -> impl Iterator<Item = &IssuedCert> {
        std::iter::once(&self.ca).chain(self.leaves.iter())
    }

    /// The leaf of one identity.
    pub fn find(&self, identity: &Identity) -> Option<&IssuedCert> {
        self.leaves.iter().find(|l| l.identity.as_ref() == Some(identity))
    }
}

/// Lowercase hex of a DER INTEGER's content bytes with leading zero bytes removed (at least one
/// byte kept): the canonical serial form used by revocation lists.
pub fn serial_hex(raw: &[u8]) -> String {
    let first = raw.iter().position(|&b| b != 0).unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[first.min(raw.len())..])
}

/// 16 random bytes with the top bit clear and the first byte non-zero, so the DER INTEGER is
/// positive and exactly these 16 bytes.
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

fn generate_key(what: &str) -> Result<Zeroizing<KeyPair>, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map(Zeroizing::new)
        .map_err(|source| PkiError::Rcgen { what: format!("generating the P-256 key of {what}"), source })
}

fn check_dns_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason: &str| PkiError::InvalidName { what: "DNS name", value: name.into(), reason: reason.into() };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1 to 253 characters long"));
    }
    if !name.split('.').all(|l| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
    }) {
        return Err(bad("labels of 1 to 63 characters a-z A-Z 0-9 - (a leading * label for wildcards)"));
    }
    Ok(())
}

/// Write a file atomically ([`crate::atomic_file`]), creating its directory; with `exclusive`, refuse
/// if `path` already exists.
fn write_file(path: &Path, bytes: &[u8], mode: u32, exclusive: bool) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    if exclusive && path.exists() {
        return Err(PkiError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists; refusing to overwrite"),
        });
    }
    Ok(crate::atomic_file::write(path, bytes, mode)?)
}

use crate::atomic_file::{PRIVATE_MODE, PUBLIC_MODE};

/// The loaded CA: its certificate PEM, its key, and its expiry.
struct LoadedCa {
    cert_pem: String,
    key: Zeroizing<KeyPair>,
    not_after: SystemTime,
}

fn load_ca(dir: &Path) -> Result<LoadedCa, PkiError> {
    let cert_path = ca_cert_path(dir);
    let key_path = ca_key_path(dir);
    let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    let key_pem = Zeroizing::new(fs::read_to_string(&key_path).map_err(io_err(&key_path))?);
    let key = KeyPair::from_pem(&key_pem)
        .map(Zeroizing::new)
        .map_err(|e| PkiError::BadPem { path: key_path.clone(), reason: format!("not a PKCS#8 private key: {e}") })?;
    let bad_cert = |reason: String| PkiError::BadPem { path: cert_path.clone(), reason };
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| bad_cert(format!("no PEM certificate: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| bad_cert(format!("not an X.509 certificate: {e}")))?;
    if !cert.is_ca() {
        return Err(bad_cert("not a CA certificate (basicConstraints CA:true missing)".into()));
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(PkiError::BadPem {
            path: key_path,
            reason: format!("this key does not belong to the CA certificate {}", cert_path.display()),
        });
    }
    let not_after = system_time_from_unix(cert.validity().not_after.timestamp());
    Ok(LoadedCa { cert_pem, key, not_after })
}

/// The trust domain of the CA in `dir` (the organization of its subject, as [`init_dev_pki`] writes it).
pub fn ca_trust_domain(dir: &Path) -> Result<String, PkiError> {
    let path = ca_cert_path(dir);
    let pem = fs::read(&path).map_err(io_err(&path))?;
    let bad = |reason: String| PkiError::BadPem { path: path.clone(), reason };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| bad(format!("no PEM certificate: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    let td = cert
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .ok_or_else(|| bad("the CA subject has no organization (O=trust domain)".into()))?
        .to_string();
    check_trust_domain(&td).map_err(|reason| PkiError::InvalidName {
        what: "trust domain",
        value: td.clone(),
        reason,
    })?;
    Ok(td)
}

fn leaf_params(
    identity: &Identity,
    dns: &[String],
    ips: &[IpAddr],
    window: ValidityWindow,
) -> Result<(CertificateParams, [u8; 16]), PkiError> {
    identity.validate()?;
    let uri = identity.to_uri();
    if identity.role() != Role::Broker && !(dns.is_empty() && ips.is_empty()) {
        return Err(PkiError::SansNotAllowed { identity: uri });
    }
    let (not_before, not_after) = window.to_offsets()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, identity.trust_domain());
    params.distinguished_name.push(DnType::CommonName, identity.common_name());
    let rcgen_err = |source| PkiError::Rcgen { what: format!("encoding the URI SAN {uri}"), source };
    let ia5 = rcgen::string::Ia5String::try_from(uri.as_str()).map_err(rcgen_err)?;
    params.subject_alt_names.push(SanType::URI(ia5));
    for name in dns {
        check_dns_name(name)?;
        let ia5 = rcgen::string::Ia5String::try_from(name.as_str())
            .map_err(|source| PkiError::Rcgen { what: format!("encoding the DNS SAN {name}"), source })?;
        params.subject_alt_names.push(SanType::DnsName(ia5));
    }
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if identity.role() == Role::Broker {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let serial = random_serial();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok((params, serial))
}

fn issue_with_ca(
    dir: &Path,
    ca: &LoadedCa,
    identity: &Identity,
    dns: &[String],
    ips: &[IpAddr],
    window: ValidityWindow,
) -> Result<IssuedCert, PkiError> {
    let (params, serial) = leaf_params(identity, dns, ips, window)?;
    if window.not_after > ca.not_after {
        return Err(PkiError::Validity {
            reason: format!(
                "certificate for {identity} would expire at {}, after its CA ({})",
                format_time(window.not_after),
                format_time(ca.not_after)
            ),
        });
    }
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, &*ca.key).map_err(|source| PkiError::Rcgen {
        what: format!("reading the CA certificate {}", ca_cert_path(dir).display()),
        source,
    })?;
    let key = generate_key(&identity.to_uri())?;
    let cert = params
        .signed_by(&*key, &issuer)
        .map_err(|source| PkiError::Rcgen { what: format!("signing the certificate of {identity}"), source })?;
    let (cert_path, key_path) = identity_paths(dir, identity);
    let key_pem = Zeroizing::new(key.serialize_pem());
    // Key first: a certificate file never exists without its key.
    write_file(&key_path, key_pem.as_bytes(), PRIVATE_MODE, false)?;
    write_file(&cert_path, cert.pem().as_bytes(), PUBLIC_MODE, false)?;
    Ok(IssuedCert {
        identity: Some(identity.clone()),
        cert: cert_path,
        key: key_path,
        serial_hex: serial_hex(&serial),
        not_after: window.not_after,
    })
}

/// Create a development PKI in `dir`: a CA and one certificate per broker, admin and station
/// (see the module docs for the layout). Refuses if `dir/ca.pem` or `dir/ca.key` exists.
pub fn init_dev_pki(dir: &Path, init: &PkiInit) -> Result<PkiLayout, PkiError> {
    check_trust_domain(&init.trust_domain).map_err(|reason| PkiError::InvalidName {
        what: "trust domain",
        value: init.trust_domain.clone(),
        reason,
    })?;
    // Build and validate every identity before touching the disk.
    let mut identities = Vec::new();
    for b in &init.brokers {
        identities.push(Identity::broker(&init.trust_domain, b)?);
    }
    for a in &init.admins {
        identities.push(Identity::admin(&init.trust_domain, a)?);
    }
    for site in &init.sites {
        for n in 1..=init.stations_per_site {
            identities.push(Identity::station(&init.trust_domain, site, n)?);
        }
    }
    let mut seen = std::collections::HashSet::new();
    for id in &identities {
        if !seen.insert(id) {
            return Err(PkiError::InvalidName { what: "identity", value: id.to_uri(), reason: "listed twice".into() });
        }
    }
    for name in &init.broker_dns {
        check_dns_name(name)?;
    }
    let leaf_window = ValidityWindow::from_now(init.validity)?;
    let ca_window = ValidityWindow::from_now(init.validity.max(CA_VALIDITY))?;

    let (ca_cert_file, ca_key_file) = (ca_cert_path(dir), ca_key_path(dir));
    for p in [&ca_cert_file, &ca_key_file] {
        if p.exists() {
            return Err(PkiError::CaExists { path: p.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;

    // The CA.
    let (ca_not_before, ca_not_after) = ca_window.to_offsets()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, init.trust_domain.as_str());
    let ca_serial = random_serial();
    // The serial's first bytes in the name keep two development CAs of one trust domain apart:
    // verifiers then report "unknown issuer" rather than "bad signature" for the other CA's leaves.
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Flashgate development CA {} ({})", hex::encode(&ca_serial[..4]), init.trust_domain),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = ca_not_before;
    params.not_after = ca_not_after;
    params.serial_number = Some(SerialNumber::from_slice(&ca_serial));
    let ca_key = generate_key("the CA")?;
    let ca_cert = params
        .self_signed(&*ca_key)
        .map_err(|source| PkiError::Rcgen { what: "self-signing the CA certificate".into(), source })?;
    let ca_key_pem = Zeroizing::new(ca_key.serialize_pem());
    // Exclusive: if another process created the CA meanwhile, one of us fails here.
    write_file(&ca_key_file, ca_key_pem.as_bytes(), PRIVATE_MODE, true)
        .map_err(|_| PkiError::CaExists { path: ca_key_file.clone() })?;
    write_file(&ca_cert_file, ca_cert.pem().as_bytes(), PUBLIC_MODE, true)?;
    let loaded = LoadedCa { cert_pem: ca_cert.pem(), key: ca_key, not_after: ca_window.not_after };

    let mut leaves = Vec::with_capacity(identities.len());
    for id in &identities {
        let (dns, ips): (&[String], &[IpAddr]) =
            if id.role() == Role::Broker { (&init.broker_dns, &init.broker_ips) } else { (&[], &[]) };
        leaves.push(issue_with_ca(dir, &loaded, id, dns, ips, leaf_window)?);
    }
    Ok(PkiLayout {
        dir: dir.to_path_buf(),
        ca: IssuedCert {
            identity: None,
            cert: ca_cert_file,
            key: ca_key_file,
            serial_hex: serial_hex(&ca_serial),
            not_after: ca_window.not_after,
        },
        leaves,
    })
}

/// Sign one more leaf with the CA in `dir`, valid from now for `validity`, and write it to the
/// identity's usual paths (replacing an existing certificate and key atomically: rotation).
pub fn issue_cert(
    dir: &Path,
    identity: &Identity,
    dns: &[String],
    ips: &[IpAddr],
    validity: Duration,
) -> Result<IssuedCert, PkiError> {
    issue_cert_window(dir, identity, dns, ips, ValidityWindow::from_now(validity)?)
}

/// [`issue_cert`] with an explicit validity window (tests use a window in the past to get an
/// expired certificate). `not_after` must not be later than the CA's.
pub fn issue_cert_window(
    dir: &Path,
    identity: &Identity,
    dns: &[String],
    ips: &[IpAddr],
    window: ValidityWindow,
) -> Result<IssuedCert, PkiError> {
    let ca = load_ca(dir)?;
    issue_with_ca(dir, &ca, identity, dns, ips, window)
}

// ---------------------------------------------------------------------------------------------
// Reading peer certificates
// ---------------------------------------------------------------------------------------------

/// What a verified peer certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The identity from the single SPIFFE URI SAN.
    pub identity: Identity,
    /// Serial number, lowercase hex (see [`serial_hex`]).
    pub serial_hex: String,
    /// Subject distinguished name, for logs.
    pub subject: String,
    /// Expiry.
    pub not_after: SystemTime,
}

fn parse_der(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::CertificateParse { reason: e.to_string() })?;
    if !rest.is_empty() {
        return Err(PkiError::CertificateParse {
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        });
    }
    Ok(cert)
}

fn spiffe_uris<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, PkiError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::CertificateParse { reason: format!("subjectAltName: {e}") })?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) if u.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("spiffe:")) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Read the identity, serial and expiry of a peer's end-entity certificate (DER). Exactly one
/// `spiffe:` URI SAN is required and it must parse with [`Identity::parse_uri`]; CA certificates
/// are refused. This does not verify the chain: call it on certificates rustls has verified.
pub fn peer_identity(end_entity_der: &[u8]) -> Result<PeerInfo, PkiError> {
    let cert = parse_der(end_entity_der)?;
    let subject = cert.subject().to_string();
    if cert.is_ca() {
        return Err(PkiError::CaAsEndEntity { subject });
    }
    let uris = spiffe_uris(&cert)?;
    let identity = match uris.as_slice() {
        [] => return Err(PkiError::MissingIdentity { subject }),
        [one] => Identity::parse_uri(one)?,
        many => {
            return Err(PkiError::AmbiguousIdentity { subject, uris: many.iter().map(|s| s.to_string()).collect() });
        }
    };
    Ok(PeerInfo {
        identity,
        serial_hex: serial_hex(cert.raw_serial()),
        subject,
        not_after: system_time_from_unix(cert.validity().not_after.timestamp()),
    })
}

/// One-line description of any certificate for logs, never failing:
/// `subject "CN=…", uri spiffe://…, serial 4a…` (or `unparseable certificate (N bytes)`).
pub fn describe_certificate(der: &[u8]) -> String {
    match parse_der(der) {
        Ok(cert) => {
            let uris = spiffe_uris(&cert).unwrap_or_default();
            let uri = if uris.is_empty() { "none".to_string() } else { uris.join(",") };
            format!("subject {:?}, uri {uri}, serial {}", cert.subject().to_string(), serial_hex(cert.raw_serial()))
        }
        Err(_) => format!("unparseable certificate ({} bytes)", der.len()),
    }
}

/// Read the first certificate of a PEM file and describe it as [`peer_identity`] does.
pub fn read_cert_info(path: &Path) -> Result<PeerInfo, PkiError> {
    let pem = fs::read(path).map_err(io_err(path))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| PkiError::BadPem { path: path.to_path_buf(), reason: format!("no PEM certificate: {e}") })?;
    peer_identity(&pem.contents).map_err(|e| PkiError::BadPem { path: path.to_path_buf(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<Identity, PkiError> {
        Identity::parse_uri(s)
    }

    fn part_of(e: PkiError) -> &'static str {
        match e {
            PkiError::InvalidUri { part, .. } => part,
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn uri_shapes() {
        assert_eq!(
            parse("spiffe://factory.test/site/berlin/station/1").unwrap(),
            Identity::Station { trust_domain: "factory.test".into(), site: "berlin".into(), station: 1 }
        );
        assert_eq!(
            parse("spiffe://factory.test/admin/alice").unwrap(),
            Identity::Admin { trust_domain: "factory.test".into(), name: "alice".into() }
        );
        assert_eq!(
            parse("spiffe://factory.test/broker/broker-1").unwrap(),
            Identity::Broker { trust_domain: "factory.test".into(), name: "broker-1".into() }
        );
        assert_eq!(
            Identity::station("factory.test", "berlin", 1).unwrap().to_uri(),
            "spiffe://factory.test/site/berlin/station/1"
        );
        assert_eq!(Identity::admin("factory.test", "bob").unwrap().to_string(), "spiffe://factory.test/admin/bob");
        assert_eq!(
            "spiffe://factory.test/broker/b".parse::<Identity>().unwrap().to_uri(),
            "spiffe://factory.test/broker/b"
        );
    }

    #[test]
    fn uri_errors_name_the_part() {
        let cases = [
            ("https://factory.test/admin/a", "scheme"),
            ("SPIFFE://factory.test/admin/a", "scheme"),
            ("spiffe:/factory.test/admin/a", "scheme"),
            ("spiffe://Factory.test/admin/a", "trust domain"),
            ("spiffe://factory.test:443/admin/a", "trust domain"),
            ("spiffe://user@factory.test/admin/a", "trust domain"),
            ("spiffe:///admin/a", "trust domain"),
            ("spiffe://.factory/admin/a", "trust domain"),
            ("spiffe://factory.test", "path"),
            ("spiffe://factory.test/", "path"),
            ("spiffe://factory.test/admin/a/", "path"),
            ("spiffe://factory.test//admin/a", "path"),
            ("spiffe://factory.test/admin/a?x=1", "path"),
            ("spiffe://factory.test/admin/a#f", "path"),
            ("spiffe://factory.test/admin/%61", "path"),
            ("spiffe://factory.test/user/a", "path"),
            ("spiffe://factory.test/site/berlin", "path"),
            ("spiffe://factory.test/site/berlin/station/1/x", "path"),
            ("spiffe://factory.test/admin/Alice", "admin name"),
            ("spiffe://factory.test/admin/..", "admin name"),
            ("spiffe://factory.test/broker/b c", "broker name"),
            ("spiffe://factory.test/site/BER/station/1", "site name"),
            ("spiffe://factory.test/site/berlin/station/0", "station number"),
            ("spiffe://factory.test/site/berlin/station/01", "station number"),
            ("spiffe://factory.test/site/berlin/station/+1", "station number"),
            ("spiffe://factory.test/site/berlin/station/4294967296", "station number"),
            ("spiffe://factory.test/site/berlin/station/x", "station number"),
        ];
        for (uri, part) in cases {
            let e = parse(uri).expect_err(uri);
            let msg = e.to_string();
            assert!(msg.contains(uri), "{msg}");
            assert_eq!(part_of(e), part, "{uri}");
        }
        let long = format!("spiffe://factory.test/admin/{}", "a".repeat(64));
        assert_eq!(part_of(parse(&long).unwrap_err()), "admin name");
        assert!(parse(&format!("spiffe://factory.test/admin/{}", "a".repeat(63))).is_ok());
        let long_td = format!("spiffe://{}/admin/a", "a".repeat(256));
        assert_eq!(part_of(parse(&long_td).unwrap_err()), "trust domain");
        let msg = parse("spiffe://factory.test/admin/Alice").unwrap_err().to_string();
        assert!(msg.contains("'A'"), "{msg}");
    }

    #[test]
    fn constructors_validate() {
        assert!(Identity::station("factory.test", "berlin", 0).is_err());
        assert!(Identity::admin("factory.test", "").is_err());
        assert!(Identity::broker("Factory", "b").is_err());
        let e = Identity::admin("factory.test", "Al").unwrap_err().to_string();
        assert!(e.contains("admin name") && e.contains("\"Al\""), "{e}");
    }

    #[test]
    fn serial_hex_canonical() {
        assert_eq!(serial_hex(&[0x00, 0x80, 0x01]), "8001");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[0x4a, 0x00]), "4a00");
        assert_eq!(serial_hex(&[]), "");
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,63}".prop_filter("dot segments", |s| s != "." && s != "..")
    }

    fn td_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{1,20}(\\.[a-z0-9_-]{1,20}){0,3}"
    }

    fn identity_strategy() -> impl Strategy<Value = Identity> {
        prop_oneof![
            (td_strategy(), name_strategy(), 1..=u32::MAX)
                .prop_map(|(trust_domain, site, station)| Identity::Station { trust_domain, site, station }),
            (td_strategy(), name_strategy()).prop_map(|(trust_domain, name)| Identity::Admin { trust_domain, name }),
            (td_strategy(), name_strategy()).prop_map(|(trust_domain, name)| Identity::Broker { trust_domain, name }),
        ]
    }

    proptest! {
        #[test]
        fn identity_uri_round_trip(id in identity_strategy()) {
            id.validate().unwrap();
            let uri = id.to_uri();
            prop_assert_eq!(Identity::parse_uri(&uri).unwrap(), id);
        }

        #[test]
        fn parse_never_panics_and_round_trips(s in "spiffe://[a-z./0-9A-Z%?#:@_-]{0,40}") {
            if let Ok(id) = Identity::parse_uri(&s) {
                prop_assert_eq!(id.to_uri(), s);
            }
        }
    }

    fn small_init() -> PkiInit {
        PkiInit { sites: vec!["berlin".into(), "austin".into()], stations_per_site: 2, ..PkiInit::default() }
    }

    #[test]
    fn dev_pki_layout_and_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let layout = init_dev_pki(dir.path(), &small_init()).unwrap();
        assert_eq!(layout.leaves.len(), 1 + 1 + 4);
        assert_eq!(layout.files().count(), 7);
        for f in layout.files() {
            assert!(f.cert.exists() && f.key.exists(), "{}", f.cert.display());
            assert_eq!(f.serial_hex.len(), 32);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = fs::metadata(&f.key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", f.key.display());
            }
            let key = fs::read_to_string(&f.key).unwrap();
            assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM");
        }
        assert!(dir.path().join("stations/austin-2.pem").exists());
        assert!(dir.path().join("brokers/broker-1.key").exists());
        assert!(dir.path().join("admins/admin.pem").exists());

        // Leaves carry their identity and serial.
        for leaf in &layout.leaves {
            let info = read_cert_info(&leaf.cert).unwrap();
            assert_eq!(Some(&info.identity), leaf.identity.as_ref());
            assert_eq!(info.serial_hex, leaf.serial_hex);
        }
        let ca_pem = fs::read(&layout.ca.cert).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&ca_pem).unwrap();
        let ca = pem.parse_x509().unwrap();
        let bc = ca.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        assert!(ca.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(serial_hex(ca.raw_serial()), layout.ca.serial_hex);

        // Broker EKUs and SANs; station EKU.
        let broker = fs::read(dir.path().join("brokers/broker-1.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&broker).unwrap();
        let cert = pem.parse_x509().unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let sans = &cert.subject_alternative_name().unwrap().unwrap().value.general_names;
        assert!(sans.iter().any(|g| matches!(g, GeneralName::DNSName("localhost"))));
        assert!(sans.iter().any(|g| matches!(g, GeneralName::IPAddress([127, 0, 0, 1]))));
        assert!(peer_identity(&pem.contents).is_ok());
        let station = fs::read(dir.path().join("stations/berlin-1.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&station).unwrap();
        let cert = pem.parse_x509().unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);

        // The CA is refused as an end entity.
        let (_, pem) = x509_parser::pem::parse_x509_pem(&ca_pem).unwrap();
        assert!(matches!(peer_identity(&pem.contents), Err(PkiError::CaAsEndEntity { .. })));

        // No overwriting an existing CA.
        let again = init_dev_pki(dir.path(), &small_init()).unwrap_err();
        assert!(matches!(again, PkiError::CaExists { .. }), "{again}");
    }

    #[test]
    fn issue_more_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let layout = init_dev_pki(dir.path(), &small_init()).unwrap();
        assert_eq!(ca_trust_domain(dir.path()).unwrap(), "factory.test");
        let id = Identity::station("factory.test", "berlin", 7).unwrap();
        let issued = issue_cert(dir.path(), &id, &[], &[], Duration::from_secs(3600)).unwrap();
        assert_eq!(issued.cert, dir.path().join("stations/berlin-7.pem"));
        assert_eq!(read_cert_info(&issued.cert).unwrap().identity, id);

        // Rotation replaces the files with a new serial.
        let old = layout.find(&Identity::admin("factory.test", "admin").unwrap()).unwrap().clone();
        let new = issue_cert(dir.path(), old.identity.as_ref().unwrap(), &[], &[], Duration::from_secs(60)).unwrap();
        assert_eq!(new.cert, old.cert);
        assert_ne!(new.serial_hex, old.serial_hex);
        assert_eq!(read_cert_info(&new.cert).unwrap().serial_hex, new.serial_hex);

        // DNS SANs only for brokers; windows must be sane and inside the CA's.
        assert!(matches!(
            issue_cert(dir.path(), &id, &["x.test".into()], &[], Duration::from_secs(60)),
            Err(PkiError::SansNotAllowed { .. })
        ));
        let now = SystemTime::now();
        let backwards = ValidityWindow::explicit(now, now - Duration::from_secs(1));
        assert!(matches!(issue_cert_window(dir.path(), &id, &[], &[], backwards), Err(PkiError::Validity { .. })));
        let too_long = issue_cert(dir.path(), &id, &[], &[], Duration::from_secs(20 * 365 * 86_400)).unwrap_err();
        assert!(too_long.to_string().contains("after its CA"), "{too_long}");

        // An expired window is accepted (tests need it) and shows in the certificate.
        let expired = ValidityWindow::explicit(now - Duration::from_secs(172_800), now - Duration::from_secs(86_400));
        let e = issue_cert_window(dir.path(), &id, &[], &[], expired).unwrap();
        assert!(read_cert_info(&e.cert).unwrap().not_after < now);

        // Missing CA.
        let empty = tempfile::tempdir().unwrap();
        let err = issue_cert(empty.path(), &id, &[], &[], Duration::from_secs(60)).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn init_validates_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let bad = PkiInit { sites: vec!["Berlin".into()], stations_per_site: 1, ..PkiInit::default() };
        let e = init_dev_pki(dir.path(), &bad).unwrap_err();
        assert!(e.to_string().contains("site name"), "{e}");
        assert!(!dir.path().join("ca.pem").exists());
        let dup = PkiInit { admins: vec!["a".into(), "a".into()], ..PkiInit::default() };
        assert!(init_dev_pki(dir.path(), &dup).unwrap_err().to_string().contains("listed twice"));
        let bad_dns = PkiInit { broker_dns: vec!["bad name".into()], ..PkiInit::default() };
        assert!(init_dev_pki(dir.path(), &bad_dns).unwrap_err().to_string().contains("DNS name"));
    }

    #[test]
    fn peer_identity_requires_exactly_one_spiffe_uri() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert!(matches!(peer_identity(&der), Err(PkiError::MissingIdentity { .. })));
        for u in ["spiffe://factory.test/admin/a", "spiffe://factory.test/admin/b"] {
            params.subject_alt_names.push(SanType::URI(rcgen::string::Ia5String::try_from(u).unwrap()));
        }
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let e = peer_identity(&der).unwrap_err();
        assert!(matches!(e, PkiError::AmbiguousIdentity { ref uris, .. } if uris.len() == 2), "{e}");
        params.subject_alt_names.truncate(1);
        params.subject_alt_names.push(SanType::URI(rcgen::string::Ia5String::try_from("https://x.test/").unwrap()));
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let info = peer_identity(&der).unwrap();
        assert_eq!(info.identity.to_uri(), "spiffe://factory.test/admin/a");
        assert!(describe_certificate(&der).contains("spiffe://factory.test/admin/a"));
        params.subject_alt_names =
            vec![SanType::URI(rcgen::string::Ia5String::try_from("spiffe://factory.test/admin/A").unwrap())];
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert!(matches!(peer_identity(&der), Err(PkiError::InvalidUri { part: "admin name", .. })));
        assert!(matches!(peer_identity(b"garbage"), Err(PkiError::CertificateParse { .. })));
        assert!(describe_certificate(b"garbage").contains("unparseable"));
    }
}
