//! Who is calling: the SPIFFE identity of the verified client certificate (put into every request by
//! the mutual-TLS transport as a [`PeerConn`]), checked against the broker's trust domain, the RPC's
//! role, the revocation list and the certificate's expiry (on every request). Stations reach only station RPCs, admins only admin RPCs; nothing
//! in a request body can change who the caller is.

use std::net::SocketAddr;
use std::time::SystemTime;

use flashgate_common::pki::{self, Identity, Role};
use flashgate_proto::transport::{PeerConn, RevocationList};
use tonic::{Request, Status};

use super::BrokerState;
use super::status::refused;
use crate::ledger::RefusalReason;

/// A verified station caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StationCaller {
    /// `spiffe://TD/site/SITE/station/N`.
    pub uri: String,
    /// The station's site.
    pub site: String,
    /// Its certificate's serial (lowercase hex).
    pub serial: String,
    /// Its certificate's expiry: requests and `Attach` streams end then.
    pub not_after: SystemTime,
}

/// A verified admin caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCaller {
    /// `spiffe://TD/admin/NAME`, the audit actor.
    pub uri: String,
    /// Its certificate's serial.
    pub serial: String,
}

/// The caller's identity, serial and certificate expiry, refused if from another trust domain, revoked
/// since the connection was made, or expired since (connections stay open with keep-alive, so validity is
/// checked on every request, not only at the handshake). Refusals are logged with the peer address,
/// identity and certificate serial.
fn identify<T>(state: &BrokerState, req: &Request<T>) -> Result<Caller, Status> {
    let peer = PeerConn::from_request(req)?;
    let identity = peer.peer.identity.clone();
    let uri = identity.to_uri();
    let serial = &peer.peer.serial_hex;
    if identity.trust_domain() != state.trust_domain() {
        tracing::warn!(peer = %peer.remote_addr, identity = %uri, serial = %serial, "refused: foreign trust domain");
        return Err(refused(
            RefusalReason::NotAuthorised,
            format!("identity {uri} is not in trust domain {}", state.trust_domain()),
            "",
            "",
        ));
    }
    if state.revoked().is_revoked(serial) {
        tracing::warn!(peer = %peer.remote_addr, identity = %uri, serial = %serial, "refused: certificate revoked");
        return Err(refused(
            RefusalReason::StationRevoked,
            format!("certificate serial {serial} of {uri} is revoked"),
            "",
            "",
        ));
    }
    if SystemTime::now() >= peer.peer.not_after {
        let at = pki::format_time(peer.peer.not_after);
        tracing::warn!(peer = %peer.remote_addr, identity = %uri, serial = %serial, not_after = %at,
            "refused: certificate expired on an open connection");
        return Err(expired(&uri, serial, peer.peer.not_after));
    }
    Ok(Caller { identity, serial: serial.clone(), not_after: peer.peer.not_after, remote: peer.remote_addr })
}

/// The refusal of a caller whose certificate `serial` expired at `not_after`.
pub fn expired(uri: &str, serial: &str, not_after: SystemTime) -> Status {
    refused(
        RefusalReason::CertificateExpired,
        format!("certificate serial {serial} of {uri} expired at {}", pki::format_time(not_after)),
        "",
        "",
    )
}

struct Caller {
    identity: Identity,
    serial: String,
    not_after: SystemTime,
    remote: SocketAddr,
}

fn wrong_role(c: &Caller, wanted: Role) -> Status {
    let (uri, role) = (c.identity.to_uri(), c.identity.role());
    tracing::warn!(peer = %c.remote, identity = %uri, serial = %c.serial, %role, %wanted,
        "refused: wrong role for this RPC");
    refused(RefusalReason::NotAuthorised, format!("{uri} is a {role}; this RPC is for {wanted}s"), "", "")
}

/// The station calling `req`, or `PERMISSION_DENIED` (`NOT_AUTHORISED` / `STATION_REVOKED`).
pub fn station<T>(state: &BrokerState, req: &Request<T>) -> Result<StationCaller, Status> {
    let c = identify(state, req)?;
    match &c.identity {
        Identity::Station { site, .. } => {
            Ok(StationCaller { uri: c.identity.to_uri(), site: site.clone(), serial: c.serial, not_after: c.not_after })
        }
        _ => Err(wrong_role(&c, Role::Station)),
    }
}

/// A site broker calling a central broker: its identity and the site `[site_brokers]` maps it to.
#[derive(Debug, Clone)]
pub struct SiteBrokerCaller {
    /// `spiffe://TD/broker/NAME`.
    pub uri: String,
    /// The site it serves.
    pub site: String,
}

/// The site broker calling `req`, or `PERMISSION_DENIED` (`NOT_AUTHORISED`): a broker identity this
/// broker's `[site_brokers]` names.
pub fn site_broker<T>(state: &BrokerState, req: &Request<T>) -> Result<SiteBrokerCaller, Status> {
    let c = identify(state, req)?;
    match &c.identity {
        Identity::Broker { name, .. } => match state.site_of_broker(name) {
            Some(site) => Ok(SiteBrokerCaller { uri: c.identity.to_uri(), site }),
            None => {
                let uri = c.identity.to_uri();
                tracing::warn!(peer = %c.remote, identity = %uri, "refused: a broker not listed in [site_brokers]");
                Err(refused(
                    RefusalReason::NotAuthorised,
                    format!("{uri} is not a site broker of this broker (its [site_brokers] does not name {name:?})"),
                    "",
                    "",
                ))
            }
        },
        _ => Err(wrong_role(&c, Role::Broker)),
    }
}

/// The admin calling `req`, or `PERMISSION_DENIED` (`NOT_AUTHORISED`).
pub fn admin<T>(state: &BrokerState, req: &Request<T>) -> Result<AdminCaller, Status> {
    let c = identify(state, req)?;
    match &c.identity {
        Identity::Admin { .. } => Ok(AdminCaller { uri: c.identity.to_uri(), serial: c.serial }),
        _ => Err(wrong_role(&c, Role::Admin)),
    }
}
