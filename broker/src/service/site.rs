//! `SiteService`: what a central broker offers its site brokers (issue 14) — quota leases granted against
//! the batch quota (`crate::ledger::leases`) and units handed back. Callers are broker identities named
//! in `[site_brokers]`, each bound to one site; a lease is always for the caller's site, and only its
//! holder returns its units.

use std::time::{Duration, Instant};

use flashgate_proto::v1 as pb;
use flashgate_proto::v1::site_service_server::SiteService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::licence::observe;
use super::status::ledger_status;
use super::{BrokerState, auth, validate};
use crate::ledger::leases::{Lease, LeaseRequest};

/// Length of a lease id (hex digits).
pub const LEASE_ID_LEN: usize = 32;

/// A lease id: [`LEASE_ID_LEN`] hex digits.
fn lease_id(id: &str) -> Result<(), Status> {
    if id.len() != LEASE_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(validate::invalid("lease_id", format!("must be {LEASE_ID_LEN} hex digits")));
    }
    Ok(())
}

/// The service.
#[derive(Debug, Clone)]
pub struct Sites {
    state: BrokerState,
}

impl Sites {
    /// The service over `state`.
    pub fn new(state: BrokerState) -> Self {
        Self { state }
    }
}

/// A lease as the API shows it.
pub fn lease_info(l: Lease) -> pb::LeaseInfo {
    pb::LeaseInfo {
        outstanding: l.outstanding(),
        id: l.id,
        batch_id: l.batch_id,
        site: l.site,
        holder: l.holder,
        granted: l.granted,
        used: l.used,
        returned: l.returned,
        state: l.state.as_str().into(),
        granted_at_ms: l.granted_at,
        expires_at_ms: l.expires_at,
        settled_at_ms: l.settled_at,
    }
}

macro_rules! site_rpc {
    ($name:literal, $self:ident, $req:ident, |$caller:ident, $body:ident| $block:block) => {{
        let started = Instant::now();
        let span = tracing::info_span!("rpc", rpc = $name, site_broker = tracing::field::Empty);
        let result = async {
            let $caller = auth::site_broker(&$self.state, &$req)?;
            tracing::Span::current().record("site_broker", $caller.uri.as_str());
            let $body = $req.into_inner();
            $block
        }
        .instrument(span)
        .await;
        observe($name, started, &result);
        result.map(Response::new)
    }};
}

#[tonic::async_trait]
impl SiteService for Sites {
    async fn acquire_lease(&self, req: Request<pb::AcquireLeaseRequest>) -> Result<Response<pb::LeaseGrant>, Status> {
        site_rpc!("AcquireLease", self, req, |caller, body| {
            validate::batch_id("batch_id", &body.batch_id)?;
            let lease = self
                .state
                .ledger()
                .grant_lease(
                    &LeaseRequest {
                        batch_id: body.batch_id.clone(),
                        site: caller.site.clone(),
                        holder: caller.uri.clone(),
                        units: body.units,
                        ttl: Duration::from_millis(body.ttl_ms),
                    },
                    &caller.uri,
                )
                .await
                .map_err(|e| ledger_status(e, &body.batch_id, ""))?;
            tracing::info!(lease = %lease.id, batch = %lease.batch_id, site = %lease.site, granted = lease.granted,
                asked = body.units, "quota lease granted");
            let s = self
                .state
                .ledger()
                .batch_status(&body.batch_id)
                .await
                .map_err(|e| ledger_status(e, &body.batch_id, ""))?;
            Ok(pb::LeaseGrant {
                lease: Some(lease_info(lease)),
                batch: Some(super::admin::batch_info(&s.batch, Some(&s))),
            })
        })
    }

    async fn renew_lease(&self, req: Request<pb::RenewLeaseRequest>) -> Result<Response<pb::LeaseInfo>, Status> {
        site_rpc!("RenewLease", self, req, |caller, body| {
            lease_id(&body.lease_id)?;
            let lease = self
                .state
                .ledger()
                .renew_lease(&body.lease_id, &caller.uri, Duration::from_millis(body.ttl_ms), &caller.uri)
                .await
                .map_err(|e| ledger_status(e, "", ""))?;
            tracing::debug!(lease = %lease.id, expires_at = lease.expires_at, "lease renewed");
            Ok(lease_info(lease))
        })
    }

    async fn return_lease(&self, req: Request<pb::ReturnLeaseRequest>) -> Result<Response<pb::LeaseInfo>, Status> {
        site_rpc!("ReturnLease", self, req, |caller, body| {
            lease_id(&body.lease_id)?;
            let lease = self
                .state
                .ledger()
                .return_lease(&body.lease_id, &caller.uri, body.units, &caller.uri)
                .await
                .map_err(|e| ledger_status(e, "", ""))?;
            tracing::info!(lease = %lease.id, units = body.units, outstanding = lease.outstanding(), "lease units returned");
            Ok(lease_info(lease))
        })
    }

    // Built by the replication work of issue 14 (central side); refused plainly until then.
    async fn sync_site(&self, _req: Request<pb::SyncSiteRequest>) -> Result<Response<pb::SyncSiteResponse>, Status> {
        Err(Status::unimplemented("SyncSite is not built yet"))
    }

    type GetSiteImageStream = tokio_stream::wrappers::ReceiverStream<Result<pb::SiteImageChunk, Status>>;

    async fn get_site_image(
        &self,
        _req: Request<pb::GetSiteImageRequest>,
    ) -> Result<Response<Self::GetSiteImageStream>, Status> {
        Err(Status::unimplemented("GetSiteImage is not built yet"))
    }

    async fn claim_device(
        &self,
        _req: Request<pb::ClaimDeviceRequest>,
    ) -> Result<Response<pb::ClaimDeviceResponse>, Status> {
        Err(Status::unimplemented("ClaimDevice is not built yet"))
    }

    async fn replicate(&self, _req: Request<pb::ReplicateRequest>) -> Result<Response<pb::ReplicateResponse>, Status> {
        Err(Status::unimplemented("Replicate is not built yet"))
    }
}
