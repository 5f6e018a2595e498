//! Brokers started in-process for end-to-end scenarios, and everything around them:
//!
//! - [`World`]: one development PKI (trust domain [`TRUST_DOMAIN`], sites `berlin` and `austin` with
//!   [`STATIONS_PER_SITE`] stations each, an `admin` and a `broker-1` identity, as
//!   `flashgate pki init` writes it) and one test vendor CA that certifies test chips ([`TestChip`]).
//!   Several brokers may share a world (they then trust the same CA and vendor keys).
//! - [`BrokerSpec`] / [`World::start_broker`]: a real broker (`flashgate_broker::server::serve`) on
//!   127.0.0.1:0 with a chosen HSM pool (default: one fresh soft keystore with cheap KDF parameters)
//!   and ledger (default: a fresh SQLite file), served over mutual TLS.
//! - [`Station`] and [`TestBroker::admin`]: tonic clients over mutual TLS with the PKI's identities,
//!   one new connection per call.
//! - [`TestBroker::seed_batch`] and its parts: a firmware key (generated or imported through
//!   `AdminService`), a small stm32l4 image packed inside the HSM (`PackImage`), and a batch.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flashgate_broker::checkpoint::CheckpointSettings;
use flashgate_broker::config::LimitsConfig;
use flashgate_broker::hsm::{HsmBackend, HsmPool, KdfParams, PoolConfig, SoftHsm};
use flashgate_broker::ledger::Ledger;
use flashgate_broker::server::{RunningBroker, ServeSpec, serve};
use flashgate_common::cert::{ChipCertificate, ChipKey, VendorCa, VendorCaPublicKey};
use flashgate_common::family::Family;
use flashgate_common::licence::{Licence, LicenceError, open_licence};
use flashgate_common::pki::{self, Identity, PkiInit, PkiLayout};
use flashgate_common::sfi::{AreaType, FirmwareKey, ImageNonce, PlainArea};
use flashgate_proto::errors::Refusal;
use flashgate_proto::transport::{self, TlsFiles};
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::admin_service_client::AdminServiceClient;
use flashgate_proto::v1::image_service_client::ImageServiceClient;
use flashgate_proto::v1::licence_service_client::LicenceServiceClient;
use rand::SeedableRng;
use rand::rngs::StdRng;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::transport::Channel;
use zeroize::Zeroizing;

/// Trust domain of the test PKI.
pub const TRUST_DOMAIN: &str = "factory.test";
/// Sites of the test PKI.
pub const SITES: [&str; 2] = ["berlin", "austin"];
/// Station certificates per site (numbered from 1).
pub const STATIONS_PER_SITE: u32 = 8;
/// Product id of the stm32l4 family (the batches' product).
pub const L4_PRODUCT: &str = "46201002";
/// Product id of the stm32l4 family as bytes (what chips carry).
pub const L4_PRODUCT_BYTES: [u8; 8] = *b"46201002";
/// Flash base of the stm32l4 family.
pub const L4_FLASH_BASE: u32 = 0x0800_0000;

/// Cheap argon2id parameters so soft keystores open in microseconds (production uses the defaults).
pub fn fast_kdf() -> KdfParams {
    KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 }
}

/// The Flashgate refusal reason a status carries (`QUOTA_EXHAUSTED`, …), if any.
pub fn reason(status: &Status) -> Option<String> {
    Refusal::from_status(status).map(|r| r.reason)
}

/// Deterministic firmware bytes of length `len` (differs per `salt`).
pub fn firmware(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(31).wrapping_add((i / 7) as u32) as u8 ^ salt).collect()
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// ---- PKI ----------------------------------------------------------------------------------------

/// A development PKI in a temporary directory.
pub struct TestPki {
    dir: tempfile::TempDir,
    layout: PkiLayout,
}

impl TestPki {
    /// A fresh CA with broker `broker-1`, admin `admin` and stations 1..=[`STATIONS_PER_SITE`] of
    /// every site in [`SITES`].
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let init = PkiInit {
            trust_domain: TRUST_DOMAIN.into(),
            sites: SITES.iter().map(|s| s.to_string()).collect(),
            stations_per_site: STATIONS_PER_SITE,
            brokers: ["broker-1".to_owned()].into_iter().chain(SITES.iter().map(|s| format!("site-{s}"))).collect(),
            ..PkiInit::default()
        };
        let layout = pki::init_dev_pki(dir.path(), &init).expect("init dev PKI");
        Self { dir, layout }
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What `init_dev_pki` wrote.
    pub fn layout(&self) -> &PkiLayout {
        &self.layout
    }

    /// The CA certificate file.
    pub fn ca_cert(&self) -> PathBuf {
        pki::ca_cert_path(self.dir())
    }

    /// Station `n` of `site`.
    pub fn station(site: &str, n: u32) -> Identity {
        Identity::station(TRUST_DOMAIN, site, n).expect("station identity")
    }

    /// The admin identity.
    pub fn admin() -> Identity {
        Identity::admin(TRUST_DOMAIN, "admin").expect("admin identity")
    }

    /// The site broker identity of `site` (`site-SITE`, one of [`SITES`]).
    pub fn site_broker(site: &str) -> Identity {
        Identity::broker(TRUST_DOMAIN, &format!("site-{site}")).expect("site broker identity")
    }

    /// The broker identity.
    pub fn broker() -> Identity {
        Identity::broker(TRUST_DOMAIN, "broker-1").expect("broker identity")
    }

    /// Certificate serial (lowercase hex) of `id`.
    pub fn serial(&self, id: &Identity) -> String {
        self.layout.find(id).unwrap_or_else(|| panic!("{} is not in the PKI", id.to_uri())).serial_hex.clone()
    }

    /// The certificate and key files of `id`, trusting this CA.
    pub fn files(&self, id: &Identity) -> TlsFiles {
        TlsFiles::for_identity(self.dir(), id)
    }

    /// Client TLS configuration of `id`.
    pub fn client_tls(&self, id: &Identity) -> Arc<rustls::ClientConfig> {
        transport::client_config(&self.files(id)).expect("client TLS config")
    }

    /// A client that trusts this CA but presents no certificate at all.
    pub fn client_tls_without_certificate(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(self.ca_cert()).expect("read CA");
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.expect("CA PEM")).expect("CA root");
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(transport::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

// ---- chips --------------------------------------------------------------------------------------

/// A chip key and its vendor certificate.
#[derive(Clone)]
pub struct TestChip {
    /// The chip's private key (only the chip has it).
    pub key: ChipKey,
    /// Its certificate.
    pub cert: ChipCertificate,
}

impl TestChip {
    /// A chip of `product` certified by `ca`, from a seed.
    pub fn new(ca: &VendorCa, product: [u8; 8], seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let key = ChipKey::generate(&mut rng);
        let cert = ca.sign_certificate(product, key.public_xy());
        Self { key, cert }
    }

    /// The 136 certificate bytes a station sends.
    pub fn cert_bytes(&self) -> Vec<u8> {
        self.cert.to_bytes().to_vec()
    }

    /// `hex(SHA-256(chip_pub))[0..32]`.
    pub fn device_id(&self) -> String {
        self.cert.device_id().to_string()
    }

    /// Opens a licence as the chip would (its own product id).
    pub fn open(&self, licence: &[u8]) -> Result<(FirmwareKey, ImageNonce), LicenceError> {
        let lic = Licence::parse(licence)?;
        open_licence(&lic, &self.key, &self.product())
    }

    /// The product id in the certificate.
    pub fn product(&self) -> [u8; 8] {
        self.cert.product_id
    }
}

// ---- the world ----------------------------------------------------------------------------------

/// A PKI and a vendor CA shared by the brokers, stations and chips of one test.
pub struct World {
    /// The development PKI.
    pub pki: TestPki,
    /// The vendor CA that certifies chips.
    pub vendor: VendorCa,
    seeds: AtomicU64,
}

impl World {
    /// A fresh PKI and vendor CA.
    pub fn new() -> Arc<Self> {
        Self::with_vendor(VendorCa::generate(&mut rand::rngs::OsRng))
    }

    /// A fresh PKI with the given vendor CA (e.g. the simulator's).
    pub fn with_vendor(vendor: VendorCa) -> Arc<Self> {
        let seed = rand::random::<u64>() >> 16;
        Arc::new(Self { pki: TestPki::new(), vendor, seeds: AtomicU64::new(seed) })
    }

    /// The vendor CA's public key, as brokers are configured with.
    pub fn vendor_key(&self) -> VendorCaPublicKey {
        self.vendor.public_key()
    }

    /// A new stm32l4 chip certified by the world's vendor CA.
    pub fn chip(&self) -> TestChip {
        self.chip_of(L4_PRODUCT_BYTES)
    }

    /// A new chip of `product` certified by the world's vendor CA.
    pub fn chip_of(&self, product: [u8; 8]) -> TestChip {
        TestChip::new(&self.vendor, product, self.seeds.fetch_add(1, Ordering::Relaxed))
    }

    /// A new stm32l4 chip whose certificate is signed by another (untrusted) vendor CA.
    pub fn forged_chip(&self) -> TestChip {
        let other = VendorCa::generate(&mut StdRng::seed_from_u64(self.seeds.fetch_add(1, Ordering::Relaxed)));
        TestChip::new(&other, L4_PRODUCT_BYTES, self.seeds.fetch_add(1, Ordering::Relaxed))
    }

    /// Starts a broker of this world.
    pub async fn start_broker(self: &Arc<Self>, spec: BrokerSpec) -> TestBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger_url =
            spec.ledger_url.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("ledger.db").display()));
        let ledger = Ledger::open(&ledger_url).await.unwrap_or_else(|e| panic!("open ledger {ledger_url}: {e}"));
        let members = match spec.members {
            Some(m) => m,
            None => {
                let soft = SoftHsm::create(&dir.path().join("keys.fgks"), &Zeroizing::new("e2e".into()), fast_kdf())
                    .expect("soft keystore");
                vec![Arc::new(soft) as Arc<dyn HsmBackend>]
            }
        };
        let pool = HsmPool::new(members, spec.pool).expect("HSM pool");
        let running = serve(ServeSpec {
            name: spec.name,
            trust_domain: TRUST_DOMAIN.into(),
            listen: spec.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            tls: self.pki.files(&spec.identity.unwrap_or_else(TestPki::broker)),
            vendor_keys: spec.vendor_keys.unwrap_or_else(|| vec![self.vendor_key()]),
            ledger,
            pool,
            limits: spec.limits,
            checkpoints: spec.checkpoints,
            site_brokers: spec.site_brokers,
            upstream: spec.upstream,
        })
        .await
        .expect("serve broker");
        let addr = running.addr();
        TestBroker { world: self.clone(), running: Some(running), addr, ledger_url, dir }
    }
}

/// How to start a broker; `Default` is one soft keystore, a fresh SQLite ledger, default pool and
/// limits, and the world's vendor CA.
pub struct BrokerSpec {
    /// Broker name (reported by `HsmStatus`).
    pub name: String,
    /// Ledger URL; `None`: a fresh SQLite file in the broker's temporary directory.
    pub ledger_url: Option<String>,
    /// HSM pool members; `None`: one fresh soft keystore.
    pub members: Option<Vec<Arc<dyn HsmBackend>>>,
    /// Pool tuning.
    pub pool: PoolConfig,
    /// Server limits.
    pub limits: LimitsConfig,
    /// Trusted vendor CA keys; `None`: the world's vendor CA.
    pub vendor_keys: Option<Vec<VendorCaPublicKey>>,
    /// Address to listen on; `None`: an ephemeral port on 127.0.0.1.
    pub listen: Option<SocketAddr>,
    /// When to sign audit checkpoints.
    pub checkpoints: CheckpointSettings,
    /// Site brokers it leases quota to: broker name → site.
    pub site_brokers: std::collections::BTreeMap<String, String>,
    /// The certificate it serves and calls central with; `None`: [`TestPki::broker`].
    pub identity: Option<Identity>,
    /// Makes it a site broker of these central brokers.
    pub upstream: Option<flashgate_broker::config::UpstreamSection>,
}

impl Default for BrokerSpec {
    fn default() -> Self {
        Self {
            name: "broker-1".into(),
            ledger_url: None,
            members: None,
            pool: PoolConfig::default(),
            limits: LimitsConfig::default(),
            vendor_keys: None,
            listen: None,
            checkpoints: CheckpointSettings::default(),
            site_brokers: std::collections::BTreeMap::new(),
            identity: None,
            upstream: None,
        }
    }
}

// ---- a running broker ---------------------------------------------------------------------------

/// A broker serving on 127.0.0.1, with its world.
pub struct TestBroker {
    /// The PKI, vendor CA and chips.
    pub world: Arc<World>,
    running: Option<RunningBroker>,
    /// Where it served (kept after shutdown, for a successor on the same port).
    addr: SocketAddr,
    ledger_url: String,
    dir: tempfile::TempDir,
}

/// What [`TestBroker::seed_batch`] created.
#[derive(Debug, Clone)]
pub struct Seeded {
    /// Hex key id.
    pub key_id: String,
    /// The packed image.
    pub image: pb::ImageSummary,
    /// The plaintext areas packed into it.
    pub areas: Vec<PlainArea>,
    /// The batch.
    pub batch: pb::BatchInfo,
}

impl TestBroker {
    /// The running broker.
    pub fn running(&self) -> &RunningBroker {
        self.running.as_ref().expect("broker running")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.running().url()
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.running().addr()
    }

    /// The ledger URL (`sqlite://…` or `postgres://…`).
    pub fn ledger_url(&self) -> &str {
        &self.ledger_url
    }

    /// The broker's temporary directory (ledger file, soft keystore).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The soft keystore of a broker started with the default HSM pool (`members: None`).
    pub fn keystore_path(&self) -> PathBuf {
        self.dir().join("keys.fgks")
    }

    /// The spec of a broker that takes over from this one after [`TestBroker::shutdown`]: the same
    /// ledger, the same soft keystore (reopened; only for brokers started with the default pool)
    /// and the same address, so stations keep their endpoint.
    pub fn successor_spec(&self, name: &str) -> BrokerSpec {
        let keystore = self.keystore_path();
        let soft = SoftHsm::open(&keystore, &Zeroizing::new("e2e".into()))
            .unwrap_or_else(|e| panic!("reopen soft keystore {}: {e}", keystore.display()));
        BrokerSpec {
            name: name.into(),
            ledger_url: Some(self.ledger_url.clone()),
            members: Some(vec![Arc::new(soft) as Arc<dyn HsmBackend>]),
            listen: Some(self.addr),
            ..BrokerSpec::default()
        }
    }

    /// Stops the broker gracefully (in-flight requests finish); the directory stays until drop.
    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("graceful shutdown");
        }
    }

    /// A tonic channel over a new mutual-TLS connection as `id`.
    pub async fn channel(&self, id: &Identity) -> Channel {
        transport::connect(&self.url(), self.world.pki.client_tls(id), None)
            .await
            .unwrap_or_else(|e| panic!("connect as {}: {e}", id.to_uri()))
    }

    /// Station `n` of `site`, on a new connection.
    pub async fn station(&self, site: &str, n: u32) -> Station {
        let id = TestPki::station(site, n);
        Station::new(self.channel(&id).await, id)
    }

    /// An `AdminService` client as the admin, on a new connection.
    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel(&TestPki::admin()).await)
    }

    /// `GenerateKey` (single-member pools).
    pub async fn generate_key(&self, label: &str) -> pb::KeyInfo {
        self.admin()
            .await
            .generate_key(pb::GenerateKeyRequest { label: label.into() })
            .await
            .expect("GenerateKey")
            .into_inner()
    }

    /// `ImportKey` into every pool member, under `key_id` (hex) or a random id.
    pub async fn import_key(&self, label: &str, key: [u8; 16], key_id: Option<&str>) -> pb::KeyInfo {
        self.admin()
            .await
            .import_key(pb::ImportKeyRequest {
                label: label.into(),
                key: key.to_vec(),
                key_id: key_id.unwrap_or_default().into(),
            })
            .await
            .expect("ImportKey")
            .into_inner()
    }

    /// `PackImage`: one firmware area of `len` bytes at the stm32l4 flash base.
    pub async fn pack_image(&self, key_id: &str, len: usize, salt: u8) -> (pb::ImageSummary, Vec<PlainArea>) {
        let areas =
            vec![PlainArea { area_type: AreaType::Firmware, address: L4_FLASH_BASE, data: firmware(len, salt) }];
        let summary = self
            .admin()
            .await
            .pack_image(pb::PackImageRequest {
                key_id: key_id.into(),
                family: Family::Stm32L4.name().into(),
                product_id: L4_PRODUCT.into(),
                areas: areas
                    .iter()
                    .map(|a| pb::PlainArea { kind: "F".into(), address: a.address, data: a.data.clone() })
                    .collect(),
            })
            .await
            .expect("PackImage")
            .into_inner();
        (summary, areas)
    }

    /// `CreateBatch` for stm32l4.
    pub async fn create_batch(&self, id: &str, image_sha256: &str, quota: i64, sites: &[&str]) -> pb::BatchInfo {
        self.admin()
            .await
            .create_batch(pb::CreateBatchRequest {
                id: id.into(),
                product_id: L4_PRODUCT.into(),
                image_sha256: image_sha256.into(),
                quota,
                allowed_sites: sites.iter().map(|s| s.to_string()).collect(),
                not_before_ms: None,
                not_after_ms: None,
            })
            .await
            .expect("CreateBatch")
            .into_inner()
    }

    /// A key generated in the HSM (single-member pools), a 4 KiB image packed in it and batch `id`.
    pub async fn seed_batch(&self, id: &str, quota: i64, sites: &[&str]) -> Seeded {
        let key = self.generate_key(&format!("fw-{id}")).await;
        self.seed_batch_with_key(id, &key.key_id, quota, sites).await
    }

    /// A 4 KiB image packed under `key_id` and batch `id`.
    pub async fn seed_batch_with_key(&self, id: &str, key_id: &str, quota: i64, sites: &[&str]) -> Seeded {
        let (image, areas) = self.pack_image(key_id, 4096, 0).await;
        let batch = self.create_batch(id, &image.sha256, quota, sites).await;
        Seeded { key_id: key_id.into(), image, areas, batch }
    }

    /// `BatchStatus`.
    pub async fn batch_status(&self, id: &str) -> pb::BatchInfo {
        self.admin()
            .await
            .batch_status(pb::BatchStatusRequest { id: id.into() })
            .await
            .expect("BatchStatus")
            .into_inner()
    }
}

// ---- stations -----------------------------------------------------------------------------------

/// A station's clients over one mutual-TLS connection.
#[derive(Clone)]
pub struct Station {
    /// Who the station is.
    pub identity: Identity,
    /// `LicenceService`.
    pub licences: LicenceServiceClient<Channel>,
    /// `ImageService`.
    pub images: ImageServiceClient<Channel>,
    /// `AdminService` on the same connection (for authorisation tests: a station must be refused).
    pub admin: AdminServiceClient<Channel>,
}

impl Station {
    /// Clients over `channel`.
    pub fn new(channel: Channel, identity: Identity) -> Self {
        Self {
            identity,
            licences: LicenceServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel.clone()),
            admin: AdminServiceClient::new(channel),
        }
    }

    /// `IssueLicence` for `chip` in `batch`.
    pub async fn issue(&self, batch: &str, chip: &TestChip) -> Result<pb::IssueLicenceResponse, Status> {
        self.issue_raw(batch, chip.cert_bytes()).await
    }

    /// `IssueLicence` with raw certificate bytes.
    pub async fn issue_raw(&self, batch: &str, cert: Vec<u8>) -> Result<pb::IssueLicenceResponse, Status> {
        self.licences
            .clone()
            .issue_licence(pb::IssueLicenceRequest { batch_id: batch.into(), chip_certificate: cert, probe: None })
            .await
            .map(tonic::Response::into_inner)
    }

    /// `GetImage` from `offset`: the leading `ImageInfo` and the concatenated chunks. Fails if the
    /// stream does not start with exactly one `ImageInfo` or carries one later.
    pub async fn fetch_image(&self, sha256: &str, offset: u64) -> Result<(pb::ImageInfo, Vec<u8>), Status> {
        let mut stream = self
            .images
            .clone()
            .get_image(pb::GetImageRequest { image_sha256: sha256.into(), offset })
            .await?
            .into_inner();
        let first = stream.next().await.ok_or_else(|| Status::data_loss("empty image stream"))??;
        let Some(pb::get_image_response::Item::Info(info)) = first.item else {
            return Err(Status::data_loss("the image stream does not start with ImageInfo"));
        };
        let mut bytes = Vec::new();
        while let Some(msg) = stream.next().await {
            match msg?.item {
                Some(pb::get_image_response::Item::Chunk(c)) => {
                    if c.is_empty() || c.len() > 64 * 1024 {
                        return Err(Status::data_loss(format!("chunk of {} bytes", c.len())));
                    }
                    bytes.extend_from_slice(&c);
                }
                other => return Err(Status::data_loss(format!("unexpected item after ImageInfo: {other:?}"))),
            }
        }
        Ok((info, bytes))
    }
}
