//! Who is calling: the SPIFFE identity of the verified client certificate (put into every request by
//! the mutual-TLS transport as a [`PeerConn`]), checked against the broker's trust domain, the RPC's
//! role and the revocation list. Stations reach only station RPCs, admins only admin RPCs; nothing
//! in a request body can change who the caller is.

use flashgate_common::pki::{Identity, Role};
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
}

/// A verified admin caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCaller {
    /// `spiffe://TD/admin/NAME`, the audit actor.
    pub uri: String,
    /// Its certificate's serial.
    pub serial: String,
}

/// The caller's identity and serial, refused if revoked since the connection was made or from
/// another trust domain.
fn identify<T>(state: &BrokerState, req: &Request<T>) -> Result<(Identity, String), Status> {
    let peer = PeerConn::from_request(req)?;
    let identity = peer.peer.identity.clone();
    let uri = identity.to_uri();
    if identity.trust_domain() != state.trust_domain() {
        tracing::warn!(peer = %peer.remote_addr, identity = %uri, "refused: foreign trust domain");
        return Err(refused(
            RefusalReason::NotAuthorised,
            format!("identity {uri} is not in trust domain {}", state.trust_domain()),
            "",
            "",
        ));
    }
    if state.revoked().is_revoked(&peer.peer.serial_hex) {
        tracing::warn!(peer = %peer.remote_addr, identity = %uri, serial = %peer.peer.serial_hex,
            "refused: certificate revoked");
        return Err(refused(
            RefusalReason::StationRevoked,
            format!("certificate serial {} of {uri} is revoked", peer.peer.serial_hex),
            "",
            "",
        ));
    }
    Ok((identity, peer.peer.serial_hex.clone()))
}

fn wrong_role(uri: &str, role: Role, wanted: Role) -> Status {
    tracing::warn!(identity = uri, %role, %wanted, "refused: wrong role for this RPC");
    refused(RefusalReason::NotAuthorised, format!("{uri} is a {role}; this RPC is for {wanted}s"), "", "")
}

/// The station calling `req`, or `PERMISSION_DENIED` (`NOT_AUTHORISED` / `STATION_REVOKED`).
pub fn station<T>(state: &BrokerState, req: &Request<T>) -> Result<StationCaller, Status> {
    let (identity, serial) = identify(state, req)?;
    match identity {
        Identity::Station { ref site, .. } => Ok(StationCaller { uri: identity.to_uri(), site: site.clone(), serial }),
        other => Err(wrong_role(&other.to_uri(), other.role(), Role::Station)),
    }
}

/// The admin calling `req`, or `PERMISSION_DENIED` (`NOT_AUTHORISED`).
pub fn admin<T>(state: &BrokerState, req: &Request<T>) -> Result<AdminCaller, Status> {
    let (identity, serial) = identify(state, req)?;
    match identity {
        Identity::Admin { .. } => Ok(AdminCaller { uri: identity.to_uri(), serial }),
        other => Err(wrong_role(&other.to_uri(), other.role(), Role::Admin)),
    }
}
