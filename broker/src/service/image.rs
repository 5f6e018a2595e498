//! `ImageService`: streams encrypted `.sfi` images to stations — an `ImageInfo` first, then chunks of at
//! most [`STREAM_CHUNK`] bytes from the requested offset, read from the ledger one stored chunk at a time
//! (memory per stream stays at one stored chunk). A station may fetch only images of batches its site
//! may use and that are not closed.

use std::pin::Pin;
use std::time::Instant;

use flashgate_proto::v1::image_service_server::ImageService;
use flashgate_proto::v1::{GetImageRequest, GetImageResponse, ImageInfo, get_image_response};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::licence::observe;
use super::status::{ledger_status, refused};
use super::{BrokerState, auth, metric, validate};
use crate::ledger::{ANY_SITE, BatchState, IMAGE_CHUNK, RefusalReason};

/// Largest chunk sent in one message.
pub const STREAM_CHUNK: usize = 64 * 1024;

/// The `ImageService` implementation.
#[derive(Debug, Clone)]
pub struct Images {
    state: BrokerState,
}

impl Images {
    /// The service over `state`.
    pub fn new(state: BrokerState) -> Self {
        Self { state }
    }
}

type ImageStream = Pin<Box<dyn Stream<Item = Result<GetImageResponse, Status>> + Send + 'static>>;

impl Images {
    async fn open(&self, req: Request<GetImageRequest>) -> Result<ImageStream, Status> {
        let st = self.state.clone();
        let caller = auth::station(&st, &req)?;
        let r = req.into_inner();
        validate::image_sha256("image_sha256", &r.image_sha256)?;
        let meta = st.image_meta(&r.image_sha256).await.map_err(|e| ledger_status(e, "", ""))?;
        let batches = st.ledger().batches().await.map_err(|e| ledger_status(e, "", ""))?;
        let allowed = batches.iter().any(|b| {
            b.image_sha256 == meta.sha256
                && b.state != BatchState::Closed
                && b.allowed_sites.iter().any(|s| s == ANY_SITE || *s == caller.site)
        });
        if !allowed {
            return Err(refused(
                RefusalReason::SiteNotAllowed,
                format!("image {} is in no open or paused batch of site {:?}", meta.sha256, caller.site),
                "",
                "",
            ));
        }
        let size = u64::try_from(meta.size).unwrap_or(0);
        if r.offset > size {
            return Err(Status::out_of_range(format!("offset {} is beyond the image size {size}", r.offset)));
        }
        let (tx, rx) = mpsc::channel(4);
        let info = ImageInfo {
            image_sha256: meta.sha256.clone(),
            size,
            family: meta.family.clone(),
            product_id: meta.product_id.clone(),
            key_id: meta.key_id.clone(),
        };
        let span = tracing::info_span!("image_stream", station = %caller.uri, image = %meta.sha256, offset = r.offset);
        tokio::spawn(
            async move {
                if tx.send(Ok(GetImageResponse { item: Some(get_image_response::Item::Info(info)) })).await.is_err() {
                    return;
                }
                let mut pos = r.offset;
                while pos < size {
                    let idx = pos / IMAGE_CHUNK as u64;
                    let chunk = match st.ledger().image_chunk(&meta.sha256, idx as i64).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = tx.send(Err(ledger_status(e, "", ""))).await;
                            return;
                        }
                    };
                    let start = (pos - idx * IMAGE_CHUNK as u64) as usize;
                    if start >= chunk.len() {
                        let _ = tx
                            .send(Err(Status::data_loss(format!("image {} chunk {idx} is short", meta.sha256))))
                            .await;
                        return;
                    }
                    for piece in chunk[start..].chunks(STREAM_CHUNK) {
                        let msg = GetImageResponse { item: Some(get_image_response::Item::Chunk(piece.to_vec())) };
                        if tx.send(Ok(msg)).await.is_err() {
                            tracing::debug!(pos, "station closed the image stream");
                            return;
                        }
                        pos += piece.len() as u64;
                        metrics::counter!(metric::IMAGE_BYTES).increment(piece.len() as u64);
                    }
                }
                tracing::debug!("image stream complete");
            }
            .instrument(span),
        );
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl ImageService for Images {
    type GetImageStream = ImageStream;

    async fn get_image(&self, request: Request<GetImageRequest>) -> Result<Response<Self::GetImageStream>, Status> {
        let started = Instant::now();
        let result = self.open(request).instrument(tracing::info_span!("rpc", rpc = "GetImage")).await;
        observe("GetImage", started, &result);
        result.map(Response::new)
    }
}
