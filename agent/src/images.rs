//! The station's on-disk cache of encrypted images, keyed by content hash.
//!
//! Owns the cache directory: `DIR/<sha256>.sfi` (complete, verified images) and
//! `DIR/<sha256>.partial` (a download in progress, a prefix of the image). Images are fetched with
//! `ImageService.GetImage`, resumed from the partial file's length after a broken stream, checked
//! against their SHA-256 as a whole, `fsync`ed and renamed into place atomically. Only ciphertext
//! (the `.sfi` as the broker serves it) is ever written. A cached image is re-hashed once per
//! process before first use; one that no longer matches its name is deleted and fetched again.
//! Concurrent fetches of one image wait for each other (one download per image at a time).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flashgate_proto::errors::{Refusal, describe_status};
use flashgate_proto::v1::image_service_client::ImageServiceClient;
use flashgate_proto::v1::{GetImageRequest, ImageInfo, get_image_response};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::broker_client::{Failure, RetryPolicy, classify};

/// A failure of the image cache. Messages name the image (SHA-256) and the file or status.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The requested content hash is not 64 hex digits.
    #[error("image hash {sha256:?} is not 64 hex digits")]
    InvalidSha {
        /// The hash as given.
        sha256: String,
    },
    /// A file operation on the cache failed.
    #[error("image {sha256}: {op} {path}: {source}")]
    Io {
        /// The image.
        sha256: String,
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The broker refused to serve the image (e.g. `SITE_NOT_ALLOWED`).
    #[error("image {sha256}: GetImage from offset {offset}: {refusal}")]
    Refused {
        /// The image.
        sha256: String,
        /// The offset asked for.
        offset: u64,
        /// The refusal.
        refusal: Box<Refusal>,
    },
    /// `GetImage` failed before any data (e.g. `NOT_FOUND`, `UNAVAILABLE`).
    #[error("image {sha256}: GetImage from offset {offset}: {}", describe_status(.status))]
    Rpc {
        /// The image.
        sha256: String,
        /// The offset asked for.
        offset: u64,
        /// The status.
        status: Box<Status>,
    },
    /// The stream broke part way; the partial file keeps what arrived, for a resume.
    #[error("image {sha256}: stream broke after {received} of {size} bytes: {}", describe_status(.status))]
    Stream {
        /// The image.
        sha256: String,
        /// Bytes on disk now.
        received: u64,
        /// Size of the whole image.
        size: u64,
        /// The status the stream ended with.
        status: Box<Status>,
    },
    /// The stream ended cleanly before the whole image arrived; the partial file is kept.
    #[error("image {sha256}: stream ended after {received} of {size} bytes")]
    Truncated {
        /// The image.
        sha256: String,
        /// Bytes on disk now.
        received: u64,
        /// Size of the whole image.
        size: u64,
    },
    /// The broker's stream broke the protocol (no `ImageInfo` first, another image, too much data).
    #[error("image {sha256}: bad GetImage stream: {reason}")]
    Protocol {
        /// The image.
        sha256: String,
        /// What was wrong.
        reason: String,
    },
    /// The downloaded file does not hash to its name; the partial file was deleted.
    #[error("image {expected}: downloaded file {path} has SHA-256 {actual}; deleted it")]
    Mismatch {
        /// The hash asked for.
        expected: String,
        /// The hash of what arrived.
        actual: String,
        /// The deleted partial file.
        path: PathBuf,
        /// True when the download resumed an earlier partial file (whose bytes may be the bad ones).
        resumed: bool,
    },
    /// The broker announced a size other than the licence response's, or above the family's bound.
    #[error("image {sha256}: the broker announces {announced} bytes but {reason}")]
    Size {
        /// The image.
        sha256: String,
        /// The size in the stream's `ImageInfo`.
        announced: u64,
        /// What it was checked against, in words.
        reason: String,
    },
    /// Not enough free space in the cache directory for the rest of the image.
    #[error("image {sha256}: {needed} more bytes needed in {} but only {available} are free", path.display())]
    NoSpace {
        /// The image.
        sha256: String,
        /// The cache directory.
        path: PathBuf,
        /// Bytes still to download.
        needed: u64,
        /// Bytes available to this process.
        available: u64,
    },
    /// A blocking task (hashing) failed.
    #[error("image {sha256}: hashing task failed: {reason}")]
    Task {
        /// The image.
        sha256: String,
        /// Why.
        reason: String,
    },
}

impl ImageError {
    /// True when fetching again (resuming) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ImageError::Rpc { status, .. } | ImageError::Stream { status, .. } => {
                matches!(classify(status), Failure::Connection | Failure::Shed)
            }
            ImageError::Truncated { .. } | ImageError::Protocol { .. } => true,
            ImageError::Mismatch { resumed, .. } => *resumed,
            _ => false,
        }
    }

    /// True when the failure was at the connection level (another broker may do better).
    pub fn is_connection_failure(&self) -> bool {
        match self {
            ImageError::Rpc { status, .. } | ImageError::Stream { status, .. } => {
                classify(status) == Failure::Connection
            }
            ImageError::Truncated { .. } => true,
            _ => false,
        }
    }
}

/// The encrypted-image cache in one directory. Share it as `Arc<ImageCache>`.
#[derive(Debug)]
pub struct ImageCache {
    dir: PathBuf,
    /// Images hashed and found good by this process.
    verified: Mutex<HashSet<String>>,
    /// One lock per image, held while it is checked or downloaded.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Images whose structure was checked against a family by this process: ciphertext bytes.
    structure: Mutex<HashMap<(String, flashgate_common::family::Family), u64>>,
}

/// The hash in canonical form (lower-case hex), or an error if it is not 64 hex digits. The hash
/// becomes a file name, so this also keeps paths inside the cache directory.
fn canonical_sha(sha256: &str) -> Result<String, ImageError> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha256.to_ascii_lowercase())
    } else {
        Err(ImageError::InvalidSha { sha256: sha256.to_owned() })
    }
}

/// SHA-256 (hex) of the file at `path`, read on the blocking pool.
async fn hash_file(sha256: &str, path: &Path) -> Result<String, ImageError> {
    let p = path.to_path_buf();
    let io = |source| ImageError::Io { sha256: sha256.to_owned(), op: "hashing", path: path.to_path_buf(), source };
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut f = std::fs::File::open(&p)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(hex::encode(h.finalize()));
            }
            h.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| ImageError::Task { sha256: sha256.to_owned(), reason: e.to_string() })?
    .map_err(io)
}

impl ImageCache {
    /// A cache in `dir`, created if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| ImageError::Io {
            sha256: "-".into(),
            op: "creating directory",
            path: dir.clone(),
            source,
        })?;
        Ok(ImageCache {
            dir,
            verified: Mutex::new(HashSet::new()),
            locks: Mutex::new(HashMap::new()),
            structure: Mutex::new(HashMap::new()),
        })
    }

    /// The ciphertext length of image `sha256` if its structure was already checked against
    /// `family` by this process (see [`ImageCache::note_checked`]): a cached image is immutable.
    pub fn checked(&self, sha256: &str, family: flashgate_common::family::Family) -> Option<u64> {
        let key = (sha256.to_ascii_lowercase(), family);
        self.structure.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied()
    }

    /// Remember that image `sha256` passed the structure check against `family`.
    pub fn note_checked(&self, sha256: &str, family: flashgate_common::family::Family, ciphertext: u64) {
        let key = (sha256.to_ascii_lowercase(), family);
        self.structure.lock().unwrap_or_else(|e| e.into_inner()).insert(key, ciphertext);
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the complete image `sha256` lives (whether or not it is cached).
    pub fn path_of(&self, sha256: &str) -> Result<PathBuf, ImageError> {
        Ok(self.dir.join(format!("{}.sfi", canonical_sha(sha256)?)))
    }

    fn partial_path(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.partial"))
    }

    fn lock_for(&self, sha: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(sha.to_owned()).or_default())
    }

    fn io(&self, sha: &str, op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
        let (sha, path) = (sha.to_owned(), path.to_path_buf());
        move |source| ImageError::Io { sha256: sha, op, path, source }
    }

    /// The path of image `sha256` if it is cached and good (hashed once per process), without
    /// asking any broker. A cached file that does not match its hash is deleted.
    pub async fn cached(&self, sha256: &str) -> Result<Option<PathBuf>, ImageError> {
        let sha = canonical_sha(sha256)?;
        let lock = self.lock_for(&sha);
        let _guard = lock.lock().await;
        self.check_cached(&sha).await
    }

    async fn check_cached(&self, sha: &str) -> Result<Option<PathBuf>, ImageError> {
        let path = self.dir.join(format!("{sha}.sfi"));
        match tokio::fs::metadata(&path).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(sha, "checking", &path)(e)),
        }
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(sha) {
            return Ok(Some(path));
        }
        let actual = hash_file(sha, &path).await?;
        if actual == sha {
            self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(sha.to_owned());
            return Ok(Some(path));
        }
        tracing::warn!(image = %sha, path = %path.display(), actual = %actual, "cached image does not match its hash; deleting it and fetching again");
        tokio::fs::remove_file(&path).await.map_err(self.io(sha, "deleting", &path))?;
        Ok(None)
    }

    /// The path of image `sha256`: from the cache, or fetched through `client` (resuming an
    /// earlier partial download) and verified. A broken stream leaves the partial file for the
    /// next attempt; a hash mismatch deletes it.
    pub async fn fetch(&self, client: &mut ImageServiceClient<Channel>, sha256: &str) -> Result<PathBuf, ImageError> {
        self.fetch_expecting(client, sha256, Expect::any()).await
    }

    /// [`ImageCache::fetch`], refusing a stream whose announced size differs from `expect`'s or
    /// exceeds its bound (a broker that announces 2^64−1 bytes gets nothing written).
    pub async fn fetch_expecting(
        &self,
        client: &mut ImageServiceClient<Channel>,
        sha256: &str,
        expect: Expect,
    ) -> Result<PathBuf, ImageError> {
        let sha = canonical_sha(sha256)?;
        let lock = self.lock_for(&sha);
        let _guard = lock.lock().await;
        if let Some(path) = self.check_cached(&sha).await? {
            return Ok(path);
        }
        self.download(client, &sha, expect).await
    }

    /// [`ImageCache::fetch`] retried (resuming) up to `policy.attempts` times with backoff while the
    /// failure is retryable ([`ImageError::is_retryable`]).
    pub async fn fetch_with_retries(
        &self,
        client: &mut ImageServiceClient<Channel>,
        sha256: &str,
        policy: &RetryPolicy,
    ) -> Result<PathBuf, ImageError> {
        let attempts = policy.attempts.max(1);
        let mut attempt = 0;
        loop {
            match self.fetch(client, sha256).await {
                Ok(path) => return Ok(path),
                Err(e) if e.is_retryable() && attempt + 1 < attempts => {
                    tracing::warn!(image = %sha256, attempt, error = %e, "image fetch failed; resuming");
                    tokio::time::sleep(policy.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Open `GetImage` from the partial file's length (from 0 if the broker says it is too long).
    async fn open_stream(
        &self,
        client: &mut ImageServiceClient<Channel>,
        sha: &str,
        partial: &Path,
    ) -> Result<(u64, tonic::Streaming<flashgate_proto::v1::GetImageResponse>), ImageError> {
        let mut offset = match tokio::fs::metadata(partial).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(self.io(sha, "checking", partial)(e)),
        };
        loop {
            let req = GetImageRequest { image_sha256: sha.to_owned(), offset };
            match client.get_image(req).await {
                Ok(r) => return Ok((offset, r.into_inner())),
                Err(status) if status.code() == Code::OutOfRange && offset > 0 => {
                    tracing::warn!(image = %sha, offset, "partial download is longer than the image; starting over");
                    tokio::fs::remove_file(partial).await.map_err(self.io(sha, "deleting", partial))?;
                    offset = 0;
                }
                Err(status) => {
                    return Err(match Refusal::from_status(&status) {
                        Some(refusal) => {
                            ImageError::Refused { sha256: sha.to_owned(), offset, refusal: Box::new(refusal) }
                        }
                        None => ImageError::Rpc { sha256: sha.to_owned(), offset, status: Box::new(status) },
                    });
                }
            }
        }
    }

    async fn download(
        &self,
        client: &mut ImageServiceClient<Channel>,
        sha: &str,
        expect: Expect,
    ) -> Result<PathBuf, ImageError> {
        let partial = self.partial_path(sha);
        let final_path = self.dir.join(format!("{sha}.sfi"));
        let protocol = |reason: String| ImageError::Protocol { sha256: sha.to_owned(), reason };
        let (offset, mut stream) = self.open_stream(client, sha, &partial).await?;
        let info: ImageInfo = match stream.message().await {
            Ok(Some(msg)) => match msg.item {
                Some(get_image_response::Item::Info(info)) => info,
                _ => return Err(protocol("the first message is not an ImageInfo".into())),
            },
            Ok(None) => return Err(protocol("the stream ended before its ImageInfo".into())),
            Err(status) => return Err(ImageError::Rpc { sha256: sha.to_owned(), offset, status: Box::new(status) }),
        };
        if !info.image_sha256.eq_ignore_ascii_case(sha) {
            return Err(protocol(format!("ImageInfo names image {:?}", info.image_sha256)));
        }
        let size = info.size;
        let bad_size = |reason: String| ImageError::Size { sha256: sha.to_owned(), announced: size, reason };
        if let Some(want) = expect.size
            && want != size
        {
            return Err(bad_size(format!("the licence response said {want}")));
        }
        if size > expect.max {
            return Err(bad_size(format!("no image for this family can exceed {} bytes", expect.max)));
        }
        if offset > size {
            tokio::fs::remove_file(&partial).await.map_err(self.io(sha, "deleting", &partial))?;
            return Err(protocol(format!("partial file of {offset} bytes is longer than the image ({size} bytes)")));
        }
        self.check_space(sha, size - offset)?;
        tracing::debug!(image = %sha, offset, size, "fetching image");
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .await
            .map_err(self.io(sha, "opening", &partial))?;
        let mut received = offset;
        let outcome: Result<(), ImageError> = loop {
            match stream.message().await {
                Ok(Some(msg)) => match msg.item {
                    Some(get_image_response::Item::Chunk(bytes)) => {
                        let len = bytes.len() as u64;
                        if received + len > size {
                            // What is on disk is still a good prefix; drop the excess only.
                            break Err(protocol(format!("{} bytes past the image size {size}", received + len - size)));
                        }
                        if let Err(e) = file.write_all(&bytes).await {
                            break Err(self.io(sha, "writing", &partial)(e));
                        }
                        received += len;
                        metrics::counter!("flashgate_agent_image_bytes_total").increment(len);
                    }
                    _ => break Err(protocol(format!("a message other than a chunk after {received} bytes"))),
                },
                Ok(None) if received == size => break Ok(()),
                Ok(None) => break Err(ImageError::Truncated { sha256: sha.to_owned(), received, size }),
                Err(status) => {
                    break Err(ImageError::Stream { sha256: sha.to_owned(), received, size, status: Box::new(status) });
                }
            }
        };
        // Make what arrived durable either way: it is the prefix the next attempt resumes from.
        let synced = async {
            file.flush().await?;
            file.sync_all().await
        }
        .await
        .map_err(self.io(sha, "syncing", &partial));
        drop(file);
        outcome?;
        synced?;
        let actual = hash_file(sha, &partial).await?;
        if actual != sha {
            tokio::fs::remove_file(&partial).await.map_err(self.io(sha, "deleting", &partial))?;
            return Err(ImageError::Mismatch {
                expected: sha.to_owned(),
                actual,
                path: partial.clone(),
                resumed: offset > 0,
            });
        }
        tokio::fs::rename(&partial, &final_path).await.map_err(self.io(sha, "renaming into place", &final_path))?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
            .await
            .map_err(|e| ImageError::Task { sha256: sha.to_owned(), reason: e.to_string() })?
            .map_err(self.io(sha, "syncing directory", &self.dir))?;
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(sha.to_owned());
        tracing::info!(image = %sha, size, resumed_from = offset, path = %final_path.display(), "image cached");
        Ok(final_path)
    }
}

/// What a download must announce: the exact size when the licence response named it, and a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// The size the licence response names, when known.
    pub size: Option<u64>,
    /// The largest size accepted (see [`flashgate_common::sfi::max_image_file`]).
    pub max: u64,
}

impl Expect {
    /// Any size up to [`flashgate_common::sfi::MAX_IMAGE_FILE`].
    pub fn any() -> Self {
        Self { size: None, max: flashgate_common::sfi::MAX_IMAGE_FILE }
    }
}

/// Free space kept beyond an image when checking the disk before a download (the journal and the
/// state files live on the same filesystem, typically).
pub const DISK_RESERVE: u64 = 16 << 20;

impl ImageCache {
    fn check_space(&self, sha: &str, needed: u64) -> Result<(), ImageError> {
        let stat = nix::sys::statvfs::statvfs(&self.dir)
            .map_err(|e| self.io(sha, "checking free space in", &self.dir)(std::io::Error::from(e)))?;
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        let available = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        if needed.saturating_add(DISK_RESERVE) > available {
            return Err(ImageError::NoSpace { sha256: sha.to_owned(), path: self.dir.clone(), needed, available });
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::time::Duration;

    use flashgate_proto::v1::GetImageResponse;
    use flashgate_proto::v1::image_service_server::{ImageService, ImageServiceServer};
    use tokio::net::TcpListener;
    use tokio_stream::Stream;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::{Endpoint, Server};
    use tonic::{Request, Response};

    use super::*;

    const CHUNK: usize = 16 * 1024;

    /// A 200 000-byte image and its hash.
    pub(crate) fn fixed_image() -> (String, Vec<u8>) {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(7) ^ (i >> 8)) as u8).collect();
        (hex::encode(Sha256::digest(&data)), data)
    }

    pub(crate) struct FakeImagesInner {
        images: Mutex<HashMap<String, Vec<u8>>>,
        /// Offsets asked for, in order.
        offsets: Mutex<Vec<u64>>,
        /// Break the next stream with UNAVAILABLE once this image offset is reached.
        break_at: Mutex<Option<u64>>,
        /// A lying broker: announce this size in `ImageInfo` whatever the image's.
        announce: Mutex<Option<u64>>,
    }

    /// An in-process `ImageService` serving [`fixed_image`] and whatever tests add.
    #[derive(Clone)]
    pub(crate) struct FakeImages(Arc<FakeImagesInner>);

    impl Default for FakeImages {
        fn default() -> Self {
            let (sha, data) = fixed_image();
            FakeImages(Arc::new(FakeImagesInner {
                images: Mutex::new(HashMap::from([(sha, data)])),
                offsets: Mutex::default(),
                break_at: Mutex::default(),
                announce: Mutex::default(),
            }))
        }
    }

    type ImageStream = Pin<Box<dyn Stream<Item = Result<GetImageResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl ImageService for FakeImages {
        type GetImageStream = ImageStream;

        async fn get_image(&self, request: Request<GetImageRequest>) -> Result<Response<ImageStream>, Status> {
            let r = request.into_inner();
            self.0.offsets.lock().unwrap().push(r.offset);
            let data = self
                .0
                .images
                .lock()
                .unwrap()
                .get(&r.image_sha256)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("no image {}", r.image_sha256)))?;
            let size = data.len() as u64;
            if r.offset > size {
                return Err(Status::out_of_range(format!("offset {} is beyond the image size {size}", r.offset)));
            }
            let announced = self.0.announce.lock().unwrap().unwrap_or(size);
            let info = ImageInfo { image_sha256: r.image_sha256, size: announced, ..Default::default() };
            let mut items = vec![Ok(GetImageResponse { item: Some(get_image_response::Item::Info(info)) })];
            let stop = self.0.break_at.lock().unwrap().take();
            let end = stop.map_or(size, |s| s.clamp(r.offset, size)) as usize;
            let mut pos = r.offset as usize;
            while pos < end {
                let n = CHUNK.min(end - pos);
                items.push(Ok(GetImageResponse {
                    item: Some(get_image_response::Item::Chunk(data[pos..pos + n].to_vec())),
                }));
                pos += n;
            }
            if stop.is_some() {
                items.push(Err(Status::unavailable("connection reset by peer")));
            }
            Ok(Response::new(Box::pin(tokio_stream::iter(items))))
        }
    }

    async fn serve(fake: FakeImages) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            Server::builder()
                .add_service(ImageServiceServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        addr
    }

    fn client(addr: SocketAddr) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy())
    }

    /// Issue 10 item 9: a server holding a broker certificate announces an image of 2^64−1 bytes.
    /// The size must equal the licence response's and stay under the family's bound: refused before a
    /// byte is written, naming both sizes.
    #[tokio::test]
    async fn an_announced_size_other_than_the_licence_s_is_refused_before_writing() {
        let fake = FakeImages::default();
        *fake.0.announce.lock().unwrap() = Some(u64::MAX);
        let addr = serve(fake.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path()).unwrap();
        let (sha, data) = fixed_image();
        let mut c = client(addr);
        let expect = Expect { size: Some(data.len() as u64), max: 4 << 20 };
        let err = cache.fetch_expecting(&mut c, &sha, expect).await.unwrap_err();
        assert!(matches!(err, ImageError::Size { announced: u64::MAX, .. }), "{err:?}");
        assert!(err.to_string().contains("the licence response said 200000"), "{err}");
        let err = cache.fetch_expecting(&mut c, &sha, Expect { size: None, max: 4 << 20 }).await.unwrap_err();
        assert!(err.to_string().contains("no image for this family can exceed 4194304 bytes"), "{err}");
        let partial_len = std::fs::metadata(cache.partial_path(&sha)).map(|m| m.len()).unwrap_or(0);
        assert_eq!(partial_len, 0, "nothing was downloaded");
        // The honest size passes.
        *fake.0.announce.lock().unwrap() = None;
        assert!(cache.fetch_expecting(&mut c, &sha, expect).await.is_ok());
    }

    #[tokio::test]
    async fn miss_then_hit_then_hit_in_a_new_process() {
        let fake = FakeImages::default();
        let mut c = client(serve(fake.clone()).await);
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path().join("images")).unwrap();
        let (sha, data) = fixed_image();
        assert_eq!(cache.cached(&sha).await.unwrap(), None);
        let path = cache.fetch(&mut c, &sha.to_ascii_uppercase()).await.unwrap();
        assert_eq!(path, dir.path().join("images").join(format!("{sha}.sfi")));
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(!cache.partial_path(&sha).exists());
        assert_eq!(cache.fetch(&mut c, &sha).await.unwrap(), path);
        assert_eq!(*fake.0.offsets.lock().unwrap(), vec![0]);

        // A new process re-hashes the file once, without asking the broker.
        let cache = ImageCache::new(dir.path().join("images")).unwrap();
        assert_eq!(cache.cached(&sha).await.unwrap(), Some(path.clone()));
        assert_eq!(cache.fetch(&mut c, &sha).await.unwrap(), path);
        assert_eq!(fake.0.offsets.lock().unwrap().len(), 1);

        // A cached file that went bad is deleted and fetched again.
        let cache = ImageCache::new(dir.path().join("images")).unwrap();
        let mut bad = data.clone();
        bad[1000] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(cache.fetch(&mut c, &sha).await.unwrap(), path);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(*fake.0.offsets.lock().unwrap(), vec![0, 0]);
    }

    #[tokio::test]
    async fn a_broken_stream_resumes_from_the_partial_file() {
        let fake = FakeImages::default();
        *fake.0.break_at.lock().unwrap() = Some(100_000);
        let mut c = client(serve(fake.clone()).await);
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path()).unwrap();
        let (sha, data) = fixed_image();

        let err = cache.fetch(&mut c, &sha).await.unwrap_err();
        assert!(matches!(err, ImageError::Stream { received: 100_000, size: 200_000, .. }), "{err:?}");
        assert!(err.is_retryable() && err.is_connection_failure());
        let msg = err.to_string();
        assert!(msg.contains(&sha) && msg.contains("100000 of 200000") && msg.contains("connection reset"), "{msg}");
        let partial = std::fs::read(cache.partial_path(&sha)).unwrap();
        assert_eq!(partial, data[..100_000]);
        assert!(!cache.path_of(&sha).unwrap().exists());

        let path = cache.fetch(&mut c, &sha).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), data);
        assert_eq!(*fake.0.offsets.lock().unwrap(), vec![0, 100_000]);
        assert!(!cache.partial_path(&sha).exists());
    }

    #[tokio::test]
    async fn fetch_with_retries_resumes_in_one_call() {
        let fake = FakeImages::default();
        *fake.0.break_at.lock().unwrap() = Some(54_321);
        let mut c = client(serve(fake.clone()).await);
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path()).unwrap();
        let (sha, data) = fixed_image();
        let policy = RetryPolicy { attempts: 3, initial: Duration::from_millis(1), max: Duration::from_millis(5) };
        let path = cache.fetch_with_retries(&mut c, &sha, &policy).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), data);
        assert_eq!(*fake.0.offsets.lock().unwrap(), vec![0, 54_321]);
    }

    #[tokio::test]
    async fn a_mismatching_image_is_deleted_and_names_both_hashes() {
        let fake = FakeImages::default();
        let wrong_name = "ab".repeat(32);
        let data = b"not the image you are looking for".to_vec();
        let actual = hex::encode(Sha256::digest(&data));
        fake.0.images.lock().unwrap().insert(wrong_name.clone(), data);
        let mut c = client(serve(fake.clone()).await);
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path()).unwrap();
        let err = cache.fetch(&mut c, &wrong_name).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&wrong_name) && msg.contains(&actual), "{msg}");
        assert!(!err.is_retryable());
        assert!(!cache.partial_path(&wrong_name).exists());
        assert!(!cache.path_of(&wrong_name).unwrap().exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn concurrent_fetches_download_once() {
        let fake = FakeImages::default();
        let addr = serve(fake.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ImageCache::new(dir.path()).unwrap());
        let (sha, data) = fixed_image();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (cache, sha) = (Arc::clone(&cache), sha.clone());
            tasks.push(tokio::spawn(async move { cache.fetch(&mut client(addr), &sha).await.unwrap() }));
        }
        for t in tasks {
            assert_eq!(std::fs::read(t.await.unwrap()).unwrap(), data);
        }
        assert_eq!(*fake.0.offsets.lock().unwrap(), vec![0]);
    }

    #[tokio::test]
    async fn a_partial_longer_than_the_image_starts_over() {
        let fake = FakeImages::default();
        let mut c = client(serve(fake.clone()).await);
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path()).unwrap();
        let (sha, data) = fixed_image();
        std::fs::write(cache.partial_path(&sha), vec![0u8; 300_000]).unwrap();
        let path = cache.fetch(&mut c, &sha).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), data);
        assert_eq!(*fake.0.offsets.lock().unwrap(), vec![300_000, 0]);
    }

    #[tokio::test]
    async fn bad_hashes_and_unknown_images() {
        let mut c = client(serve(FakeImages::default()).await);
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path()).unwrap();
        for bad in ["../../etc/passwd", "", &"g".repeat(64), &"a".repeat(63)] {
            let msg = cache.fetch(&mut c, bad).await.unwrap_err().to_string();
            assert!(msg.contains("not 64 hex digits") && msg.contains(&format!("{bad:?}")), "{msg}");
        }
        let unknown = "cd".repeat(32);
        let err = cache.fetch(&mut c, &unknown).await.unwrap_err();
        assert!(matches!(&err, ImageError::Rpc { status, offset: 0, .. } if status.code() == Code::NotFound));
        assert!(!err.is_retryable());
        assert!(err.to_string().contains(&unknown), "{err}");
    }
}
