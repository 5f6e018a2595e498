//! Authorisation failures at the TLS layer, in words, as a client sees them. The broker refuses a
//! revoked, expired or foreign station certificate during the handshake with a TLS alert; the client
//! receives it buried in a gRPC `Unknown: transport error` (status → tonic → hyper → io → rustls).
//! [`auth_failure`] digs it out, so that a station says "refused by the broker: certificate revoked"
//! instead of "no broker reachable", and treats it as a refusal of the station, not as an outage. The
//! client's own verdict on the broker's certificate (a name mismatch, an unknown CA) is read the
//! same way, naming the names the broker's certificate does carry.

use std::error::Error;
use std::fmt;

use rustls::{AlertDescription, CertificateError};

/// Why a TLS connection to a broker was refused for authorisation reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// The broker refused our certificate: it is revoked.
    Revoked,
    /// The broker does not know the CA that issued our certificate.
    UnknownCa,
    /// The broker refused our certificate as expired or not yet valid (TLS has one alert for both).
    Expired,
    /// The broker asked for a client certificate and got none.
    NoCertificate,
    /// The broker refused our certificate for another reason (wrong identity or role, bad signature).
    BadCertificate,
    /// The broker's certificate is not valid for the name we connected to.
    NameMismatch {
        /// The name we expected.
        expected: String,
        /// The names the broker's certificate carries.
        presented: Vec<String>,
    },
    /// The broker's certificate is not issued by the CA we trust.
    BrokerUnknownCa,
    /// The broker's certificate is expired or not yet valid.
    BrokerExpired,
}

impl AuthFailure {
    /// True when the broker refused us (rather than we refusing the broker).
    pub fn refused_by_broker(&self) -> bool {
        matches!(self, Self::Revoked | Self::UnknownCa | Self::Expired | Self::NoCertificate | Self::BadCertificate)
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Revoked => f.write_str("refused by the broker: certificate revoked"),
            Self::UnknownCa => {
                f.write_str("refused by the broker: certificate not issued by a CA it trusts (unknown CA)")
            }
            Self::Expired => f.write_str("refused by the broker: certificate expired or not yet valid"),
            Self::NoCertificate => f.write_str("refused by the broker: no client certificate presented"),
            Self::BadCertificate => f.write_str("refused by the broker: certificate not acceptable (identity or role)"),
            Self::NameMismatch { expected, presented } => write!(
                f,
                "broker name mismatch: its certificate is not valid for {expected}; it names {}",
                if presented.is_empty() { "no names".to_owned() } else { presented.join(", ") }
            ),
            Self::BrokerUnknownCa => f.write_str("the broker's certificate is not issued by our CA (unknown issuer)"),
            Self::BrokerExpired => f.write_str("the broker's certificate is expired or not yet valid"),
        }
    }
}

fn from_rustls(e: &rustls::Error) -> Option<AuthFailure> {
    use rustls::Error as E;
    match e {
        E::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRevoked => Some(AuthFailure::Revoked),
            AlertDescription::UnknownCA => Some(AuthFailure::UnknownCa),
            AlertDescription::CertificateExpired => Some(AuthFailure::Expired),
            AlertDescription::CertificateRequired => Some(AuthFailure::NoCertificate),
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied => Some(AuthFailure::BadCertificate),
            _ => None,
        },
        E::InvalidCertificate(c) => match c {
            CertificateError::NotValidForName => {
                Some(AuthFailure::NameMismatch { expected: "the name asked for".into(), presented: vec![] })
            }
            CertificateError::NotValidForNameContext { expected, presented } => {
                Some(AuthFailure::NameMismatch { expected: server_name(expected), presented: presented.clone() })
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => Some(AuthFailure::BrokerUnknownCa),
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => Some(AuthFailure::BrokerExpired),
            _ => None,
        },
        _ => None,
    }
}

/// An alert as rustls writes it ("received fatal alert: CertificateRevoked").
fn from_alert_text(text: &str) -> Option<AuthFailure> {
    let name = text.strip_prefix("received fatal alert: ")?.trim();
    [
        AlertDescription::CertificateRevoked,
        AlertDescription::UnknownCA,
        AlertDescription::CertificateExpired,
        AlertDescription::CertificateRequired,
        AlertDescription::BadCertificate,
        AlertDescription::UnsupportedCertificate,
        AlertDescription::CertificateUnknown,
        AlertDescription::AccessDenied,
    ]
    .into_iter()
    .find(|a| format!("{a:?}") == name)
    .and_then(|a| from_rustls(&rustls::Error::AlertReceived(a)))
}

fn server_name(n: &rustls::pki_types::ServerName<'_>) -> String {
    match n {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_owned(),
        rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// The authorisation failure somewhere in `err`'s chain of causes, if there is one.
pub fn auth_failure(err: &(dyn Error + 'static)) -> Option<AuthFailure> {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return from_rustls(r);
        }
        if let Some(crate::transport::TransportError::Handshake { auth: Some(a), .. }) =
            e.downcast_ref::<crate::transport::TransportError>()
        {
            return Some((**a).clone());
        }
        // `io::Error::source` skips the error it wraps: look inside.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return from_rustls(r);
            }
            if let Some(found) = auth_failure(inner) {
                return Some(found);
            }
            // Past the handshake (TLS 1.3 checks the client's certificate after the client finished),
            // the alert reaches the client as text only.
            if let Some(found) = from_alert_text(&inner.to_string()) {
                return Some(found);
            }
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn alerts_inside_io_errors_are_found_and_named() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRevoked),
        );
        let f = auth_failure(&io).unwrap();
        assert_eq!(f, AuthFailure::Revoked);
        assert_eq!(f.to_string(), "refused by the broker: certificate revoked");
        assert!(f.refused_by_broker());
        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: rustls::pki_types::ServerName::try_from("broker.test").unwrap().to_owned(),
            presented: vec!["DnsName(\"localhost\")".into()],
        });
        let f = auth_failure(&name).unwrap();
        assert!(f.to_string().contains("not valid for broker.test; it names DnsName(\"localhost\")"), "{f}");
        assert!(!f.refused_by_broker());
        assert_eq!(auth_failure(&std::io::Error::other("plain")), None);
    }
}
