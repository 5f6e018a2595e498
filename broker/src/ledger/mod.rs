//! The broker's ledger: batches and quotas, one licence per (batch, device), install reports, keys, images,
//! station revocations and the hash-chained audit log, on SQLite (default; WAL, `synchronous=FULL`) or on a
//! PostgreSQL database shared by several brokers.
//!
//! Invariants (each tested in `broker/tests/integration/ledger_*.rs`):
//! - one licence per (batch, device): a retry returns the stored bytes and consumes nothing;
//! - `issued <= quota` under any concurrency: the unit is taken by a conditional row update in the same
//!   transaction that stores the licence and its audit record, and the caller gets the licence only after that
//!   transaction is durably committed;
//! - every security event is appended to the audit chain in the transaction that makes the change; if the
//!   audit record cannot be written nothing is committed (fail closed).
//!
//! Station assignments (a batch or a pause, audited) and station status (what attached stations report;
//! bookkeeping, not audited) let every broker on the ledger tell its attached stations what to run.
//!
//! Licence issues, refusals and install reports go through one group-commit writer task per ledger
//! ([`writer`]); administrative changes run in their own short transactions. On PostgreSQL every writing
//! transaction first locks the single `audit_head` row, which serialises writers across brokers.

pub mod audit;
pub mod checkpoints;
pub mod devices;
pub mod error;
pub mod leases;
pub mod model;
pub mod replica;
mod schema;
pub mod upstream;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Once};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{Any, AnyConnection, AnyPool, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

pub use audit::{AuditRecord, AuditSummary};
pub use error::{AuditFault, LedgerError, RefusalReason};
pub use model::{
    ANY_SITE, Assignment, Batch, BatchState, BatchStatus, DeviceHistory, ImageMeta, InstallOutcome, InstallReport,
    InstallRow, IssueOutcome, IssueRecord, KeyListing, KeyRecord, LicenceRow, NewBatch, NewImage, Precheck,
    PrecheckRequest, RefusalRecord, ReissueRecord, Revocation, STATION_ONLINE_WINDOW_MS, SiteUnits, StationCertSeen,
    StationProbe, StationStatus, StationSummary, now_ms,
};

use audit::{AuditEvent, Genesis, Head};
pub use checkpoints::{Appended, StoredCheckpoint};
pub use devices::DevicesExported;
use writer::{Outcome, Payload, WriteOp};

/// Size of the chunks an image is stored in.
pub const IMAGE_CHUNK: usize = 1 << 20;

/// Which SQL database the ledger runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite file (one broker).
    Sqlite,
    /// PostgreSQL (one or more brokers).
    Postgres,
}

impl Dialect {
    /// Dialect named by a connection URL (`sqlite:` or `postgres:`/`postgresql:`).
    pub fn from_url(url: &str) -> Result<Self, LedgerError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Self::Postgres)
        } else {
            Err(LedgerError::Invalid {
                field: "ledger url",
                value: redact_url(url),
                why: "expected sqlite://PATH or postgres://…",
            })
        }
    }
}

/// Removes a password from a URL before it appears in an error message.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// Connection and group-commit settings.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// `sqlite://PATH` (created if missing) or `postgres://user@host:port/db`.
    pub url: String,
    /// Most operations committed in one group transaction.
    pub max_group: usize,
    /// Depth of the writer queue (callers wait when it is full).
    pub queue_depth: usize,
    /// SQLite: connections of the read pool (the writer has its own single connection).
    pub read_connections: u32,
    /// PostgreSQL: connections of the (shared read/write) pool.
    pub pg_connections: u32,
    /// SQLite `busy_timeout`, and the pool acquire timeout.
    pub busy_timeout: Duration,
}

impl LedgerConfig {
    /// Defaults for `url`: groups of up to 256, queue of 4096, 4 read connections, 8 PostgreSQL connections.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_group: 256,
            queue_depth: 4096,
            read_connections: 4,
            pg_connections: 8,
            busy_timeout: Duration::from_secs(10),
        }
    }

    /// Defaults for an SQLite file at `path`.
    pub fn sqlite(path: &Path) -> Self {
        Self::new(format!("sqlite://{}", path.display()))
    }
}

/// How long [`Ledger::precheck_fast`] trusts a batch it read (state, window, sites, issued count). Staleness
/// never grants or refuses anything by itself: a fast precheck only ever answers "go ahead", and
/// [`Ledger::commit_issue`] re-checks everything in its transaction.
pub const BATCH_CACHE_TTL: Duration = Duration::from_secs(1);

/// Most batches [`Ledger::precheck_fast`] keeps (only batches that exist are cached; beyond this the cache
/// is cleared and refilled).
pub const MAX_CACHED_BATCHES: usize = 1024;

struct Inner {
    dialect: Dialect,
    /// The ledger's random id (`ledger_meta`), bound by the first audit record and signed in checkpoints.
    ledger_id: [u8; 16],
    /// How its audit chain starts.
    genesis: Genesis,
    read: AnyPool,
    write: AnyPool,
    ops: mpsc::Sender<WriteOp>,
    /// Batches as last read by a precheck, with when (see [`BATCH_CACHE_TTL`]).
    batches: std::sync::Mutex<HashMap<String, (Batch, std::time::Instant)>>,
    /// Records this process's writer appended (wakes the checkpoint signer).
    appended: Arc<Appended>,
}

/// Handle to the ledger; cheap to clone. The writer task stops when the last clone is dropped.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("dialect", &self.inner.dialect).finish_non_exhaustive()
    }
}

/// Starts a writing transaction and reads (on PostgreSQL: locks) the audit head.
pub(crate) async fn begin_write(
    pool: &AnyPool,
    dialect: Dialect,
) -> Result<(Transaction<'static, Any>, Head), sqlx::Error> {
    let mut tx = match dialect {
        // Take the write lock up front: no deferred-transaction upgrade failures.
        Dialect::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await?,
        Dialect::Postgres => pool.begin().await?,
    };
    let head = audit::lock_head(&mut tx, dialect).await?;
    Ok((tx, head))
}

/// Finishes a writing transaction: stores the audit head and commits.
async fn commit_write(mut tx: Transaction<'static, Any>, head: &Head, op: &'static str) -> Result<(), LedgerError> {
    audit::store_head(&mut tx, head).await.map_err(LedgerError::db(op))?;
    tx.commit().await.map_err(LedgerError::db(op))
}

const BATCH_COLUMNS: &str = "b.id, b.product_id, b.image_sha256, i.key_id, b.quota, b.issued, b.allowed_sites, \
     b.not_before, b.not_after, b.state, b.created_at, b.created_by, b.leased, b.lease_expires_at, b.drained_at";
/// How many columns [`BATCH_COLUMNS`] selects: a query's own columns follow them.
const BATCH_COLUMN_COUNT: usize = 15;

fn batch_from_row(r: &sqlx::any::AnyRow) -> Result<Batch, sqlx::Error> {
    let sites: String = r.try_get(6)?;
    let state: String = r.try_get(9)?;
    Ok(Batch {
        id: r.try_get(0)?,
        product_id: r.try_get(1)?,
        image_sha256: r.try_get(2)?,
        key_id: r.try_get(3)?,
        quota: r.try_get(4)?,
        issued: r.try_get(5)?,
        allowed_sites: serde_json::from_str(&sites).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        not_before: r.try_get(7)?,
        not_after: r.try_get(8)?,
        state: BatchState::parse(&state).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        created_at: r.try_get(10)?,
        created_by: r.try_get(11)?,
        leased: r.try_get(12)?,
        lease_expires_at: r.try_get(BATCH_COLUMN_COUNT - 2)?,
        drained_at: r.try_get(BATCH_COLUMN_COUNT - 1)?,
    })
}

/// Reads one batch (with its image's key id).
pub(crate) async fn load_batch(conn: &mut AnyConnection, id: &str) -> Result<Option<Batch>, sqlx::Error> {
    let sql =
        format!("SELECT {BATCH_COLUMNS} FROM batches b JOIN images i ON i.sha256 = b.image_sha256 WHERE b.id = $1");
    let row = sqlx::query(&sql).bind(id).fetch_optional(&mut *conn).await?;
    row.as_ref().map(batch_from_row).transpose()
}

const IMAGE_COLUMNS: &str =
    "sha256, key_id, family, product_id, size, nonce, area_count, expected_crc, created_at, created_by";

fn image_from_row(r: &sqlx::any::AnyRow) -> Result<ImageMeta, sqlx::Error> {
    let nonce_hex: String = r.try_get(5)?;
    let mut nonce = [0u8; 12];
    // Images stored before schema v2 have no nonce (''): they keep all zeros and cannot be licensed.
    if !nonce_hex.is_empty() {
        hex::decode_to_slice(&nonce_hex, &mut nonce).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    }
    let area_count: i64 = r.try_get(6)?;
    let crc: Option<i64> = r.try_get(7)?;
    Ok(ImageMeta {
        sha256: r.try_get(0)?,
        key_id: r.try_get(1)?,
        family: r.try_get(2)?,
        product_id: r.try_get(3)?,
        size: r.try_get(4)?,
        nonce,
        area_count: u32::try_from(area_count).unwrap_or(0),
        expected_crc: crc.and_then(|c| u32::try_from(c).ok()),
        created_at: r.try_get(8)?,
        created_by: r.try_get(9)?,
    })
}

/// Reads one image's metadata.
pub(crate) async fn load_image_meta(conn: &mut AnyConnection, sha256: &str) -> Result<Option<ImageMeta>, sqlx::Error> {
    let sql = format!("SELECT {IMAGE_COLUMNS} FROM images WHERE sha256 = $1");
    let row = sqlx::query(&sql).bind(sha256).fetch_optional(&mut *conn).await?;
    row.as_ref().map(image_from_row).transpose()
}

/// An integer 0/1 column as a flag.
fn flag(r: &sqlx::any::AnyRow, idx: usize) -> Result<bool, sqlx::Error> {
    Ok(r.try_get::<i64, _>(idx)? != 0)
}

/// The site of a station identity URI, or [`LedgerError::Invalid`] naming the URI.
fn station_site(identity: &str) -> Result<String, LedgerError> {
    match flashgate_common::pki::Identity::parse_uri(identity) {
        Ok(flashgate_common::pki::Identity::Station { site, .. }) => Ok(site),
        _ => Err(LedgerError::Invalid {
            field: "station identity",
            value: identity.to_owned(),
            why: "expected spiffe://TD/site/SITE/station/N",
        }),
    }
}

const ASSIGNMENT_COLUMNS: &str = "identity, batch_id, paused, reason, revision, updated_at, updated_by";

fn assignment_from_row(r: &sqlx::any::AnyRow) -> Result<Assignment, sqlx::Error> {
    Ok(Assignment {
        identity: r.try_get(0)?,
        batch_id: r.try_get(1)?,
        paused: flag(r, 2)?,
        reason: r.try_get(3)?,
        revision: r.try_get(4)?,
        updated_at: r.try_get(5)?,
        updated_by: r.try_get(6)?,
    })
}

async fn load_assignment(conn: &mut AnyConnection, identity: &str) -> Result<Option<Assignment>, sqlx::Error> {
    let sql = format!("SELECT {ASSIGNMENT_COLUMNS} FROM station_assignments WHERE identity = $1");
    let row = sqlx::query(&sql).bind(identity).fetch_optional(&mut *conn).await?;
    row.as_ref().map(assignment_from_row).transpose()
}

const STATUS_COLUMNS: &str = "identity, site, broker, session, attached, probes, current_batch, devices_ok, \
     devices_failed, running, updated_at";

fn status_from_row(r: &sqlx::any::AnyRow) -> Result<StationStatus, sqlx::Error> {
    let probes: String = r.try_get(5)?;
    let count = |idx: usize| -> Result<u64, sqlx::Error> { Ok(u64::try_from(r.try_get::<i64, _>(idx)?).unwrap_or(0)) };
    Ok(StationStatus {
        identity: r.try_get(0)?,
        site: r.try_get(1)?,
        broker: r.try_get(2)?,
        session: r.try_get(3)?,
        attached: flag(r, 4)?,
        probes: serde_json::from_str(&probes).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        current_batch: r.try_get(6)?,
        devices_ok: count(7)?,
        devices_failed: count(8)?,
        running: flag(r, 9)?,
        updated_at: r.try_get(10)?,
    })
}

/// `prefix` followed by `rows` groups of `cols` numbered placeholders: `($1, $2), ($3, $4)`.
pub(crate) fn multi_row_insert(prefix: &str, cols: usize, rows: usize) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(prefix.len() + rows * cols * 5);
    sql.push_str(prefix);
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            // Writing into a String cannot fail.
            let _ = write!(sql, "{}${}", if c == 0 { "" } else { ", " }, r * cols + c + 1);
        }
        sql.push(')');
    }
    sql
}

/// Mode of the SQLite ledger file (SQLite gives its `-wal` and `-shm` files the same mode).
pub const LEDGER_FILE_MODE: u32 = 0o600;

/// Creates the SQLite ledger file with [`LEDGER_FILE_MODE`] if it does not exist yet, and narrows the
/// mode of an existing one (and of its `-wal`/`-shm` files) to it, whatever the process umask.
fn restrict_sqlite_files(url: &str) -> Result<(), LedgerError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let Some(rest) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) else { return Ok(()) };
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() {
        return Ok(());
    }
    let io = |p: &str, source: std::io::Error| LedgerError::File {
        what: "set the mode of the ledger file",
        path: p.into(),
        source,
    };
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(LEDGER_FILE_MODE).open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(LedgerError::File { what: "create the ledger file", path: path.into(), source }),
    }
    for p in [path.to_owned(), format!("{path}-wal"), format!("{path}-shm")] {
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(LEDGER_FILE_MODE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p, e)),
        }
    }
    Ok(())
}

/// The file of an SQLite URL (`sqlite://PATH?query` → `PATH`), for messages.
fn sqlite_file(url: &str) -> &str {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    rest.split('?').next().unwrap_or(rest)
}

fn with_create_mode(url: &str) -> String {
    if url.contains("mode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

async fn sqlite_pool(url: &str, max: u32, busy: Duration) -> Result<AnyPool, LedgerError> {
    let busy_ms = busy.as_millis();
    AnyPoolOptions::new()
        .max_connections(max)
        .min_connections(1)
        .acquire_timeout(busy)
        // A connection to a local file does not go stale the way a network connection does; sqlx's
        // default ping before every acquire would cost one more round trip to the connection's worker
        // thread (two thread wake-ups) per query on the licence path.
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                // WAL for concurrent readers; FULL: a commit is on disk (WAL fsync) before it returns.
                for pragma in [
                    "PRAGMA journal_mode = WAL".to_owned(),
                    "PRAGMA synchronous = FULL".to_owned(),
                    "PRAGMA foreign_keys = ON".to_owned(),
                    format!("PRAGMA busy_timeout = {busy_ms}"),
                ] {
                    sqlx::query(&pragma).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
        .map_err(|source| LedgerError::Open { what: "SQLite ledger", location: sqlite_file(url).to_owned(), source })
}

/// A read transaction on one snapshot of the ledger (REPEATABLE READ on PostgreSQL; an SQLite read
/// transaction is one already) and the audit head as that snapshot holds it, for walks of the chain
/// that must see the head, the records and the tables at one instant (verify, export).
async fn snapshot_with_head<'c>(
    pooled: &'c mut sqlx::pool::PoolConnection<Any>,
    dialect: Dialect,
    op: &'static str,
) -> Result<(sqlx::Transaction<'c, Any>, i64, Vec<u8>), LedgerError> {
    let mut conn = sqlx::Connection::begin(&mut **pooled).await.map_err(LedgerError::db(op))?;
    if dialect == Dialect::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *conn)
            .await
            .map_err(LedgerError::db(op))?;
    }
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(LedgerError::db(op))?;
    let seq: i64 = head.try_get(0).map_err(LedgerError::db(op))?;
    let hash: Vec<u8> = head.try_get(1).map_err(LedgerError::db(op))?;
    Ok((conn, seq, hash))
}

impl Ledger {
    /// Opens (creating and migrating if needed) the ledger at `url` with default settings.
    pub async fn open(url: &str) -> Result<Self, LedgerError> {
        Self::open_with(LedgerConfig::new(url)).await
    }

    /// Opens the ledger described by `cfg`, applies pending migrations and starts the writer task.
    /// Must be called inside a Tokio runtime.
    pub async fn open_with(cfg: LedgerConfig) -> Result<Self, LedgerError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(install_default_drivers);
        let dialect = Dialect::from_url(&cfg.url)?;
        if cfg.max_group == 0 || cfg.queue_depth == 0 {
            return Err(LedgerError::Invalid {
                field: "ledger max_group/queue_depth",
                value: format!("{}/{}", cfg.max_group, cfg.queue_depth),
                why: "must be at least 1",
            });
        }
        let (read, write) = match dialect {
            Dialect::Sqlite => {
                if cfg.url.contains(":memory:") || cfg.url.contains("mode=memory") {
                    return Err(LedgerError::Invalid {
                        field: "ledger url",
                        value: cfg.url.clone(),
                        why: "in-memory SQLite is not durable; give a file path",
                    });
                }
                restrict_sqlite_files(&cfg.url)?;
                let url = with_create_mode(&cfg.url);
                let write = sqlite_pool(&url, 1, cfg.busy_timeout).await?;
                schema::migrate(&write, dialect).await?;
                let read = sqlite_pool(&url, cfg.read_connections.max(1), cfg.busy_timeout).await?;
                (read, write)
            }
            Dialect::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(cfg.pg_connections.max(2))
                    .acquire_timeout(cfg.busy_timeout)
                    .connect(&cfg.url)
                    .await
                    .map_err(|source| LedgerError::Open {
                        what: "PostgreSQL ledger",
                        location: redact_url(&cfg.url),
                        source,
                    })?;
                schema::migrate(&pool, dialect).await?;
                (pool.clone(), pool)
            }
        };
        let (ledger_id, genesis) = ensure_identity(&write, dialect).await?;
        let (tx, rx) = mpsc::channel(cfg.queue_depth);
        let appended = Arc::new(Appended::default());
        tokio::spawn(writer::run(write.clone(), dialect, rx, cfg.max_group, appended.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                dialect,
                ledger_id,
                genesis,
                read,
                write,
                ops: tx,
                appended,
                batches: Default::default(),
            }),
        })
    }

    /// The database dialect in use.
    pub fn dialect(&self) -> Dialect {
        self.inner.dialect
    }

    /// The ledger's random id, created with it (or at its first opening with schema v5).
    pub fn ledger_id(&self) -> [u8; 16] {
        self.inner.ledger_id
    }

    /// How the audit chain starts: bound to the ledger id, or legacy (created before ledger ids).
    pub fn genesis(&self) -> Genesis {
        self.inner.genesis
    }

    /// Records appended by this process's group-commit writer (licences, refusals, install reports).
    pub fn appended(&self) -> &Arc<Appended> {
        &self.inner.appended
    }

    /// The committed audit head: its seq and hash.
    pub async fn audit_head(&self) -> Result<(i64, Vec<u8>), LedgerError> {
        const OP: &str = "read audit head";
        let mut conn = self.read_conn().await?;
        let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
        Ok((row.try_get(0).map_err(LedgerError::db(OP))?, row.try_get(1).map_err(LedgerError::db(OP))?))
    }

    /// Stores a signed checkpoint (a second copy of the same one is ignored).
    pub async fn store_checkpoint(&self, cp: &StoredCheckpoint) -> Result<(), LedgerError> {
        let mut conn = self.inner.write.acquire().await.map_err(LedgerError::db("store audit checkpoint"))?;
        checkpoints::insert(&mut conn, cp, now_ms()).await.map_err(LedgerError::db("store audit checkpoint"))
    }

    /// The newest stored checkpoint of any broker on the ledger.
    pub async fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, LedgerError> {
        let mut conn = self.read_conn().await?;
        checkpoints::latest(&mut conn).await.map_err(LedgerError::db("read audit checkpoint"))
    }

    /// Every stored checkpoint, by seq, time and broker (at most `limit`; a test and admin helper).
    pub async fn checkpoints(&self, limit: i64) -> Result<Vec<StoredCheckpoint>, LedgerError> {
        let mut conn = self.read_conn().await?;
        checkpoints::page(&mut conn, (-1, 0, ""), limit).await.map_err(LedgerError::db("read audit checkpoints"))
    }

    async fn submit(&self, payload: Payload) -> Result<Outcome, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.inner.ops.send(WriteOp { payload, reply }).await.map_err(|_| LedgerError::WriterStopped)?;
        rx.await.map_err(|_| LedgerError::WriterStopped)?
    }

    async fn read_conn(&self) -> Result<sqlx::pool::PoolConnection<Any>, LedgerError> {
        self.inner.read.acquire().await.map_err(LedgerError::db("acquire read connection"))
    }

    /// Optimistic check before the HSM computes a licence: returns the device's existing licence if any, else
    /// the batch if it is open for this site and product with quota left. A refusal is audited and returned
    /// as [`LedgerError::Refused`]. [`Ledger::commit_issue`] re-checks everything.
    ///
    /// An existing licence (a reissue) obeys the same rules as a first issue — state, validity window,
    /// product and site — except that a paused batch still reissues, so boards already on fixtures finish;
    /// it consumes nothing. A reissue to a station other than the one the licence was first issued to is
    /// audited (`licence.reissued`) the first time that station receives it; retries by the same station are
    /// not audited (they return bytes that station already holds; the `reissued` metric counts them).
    pub async fn precheck(&self, req: &PrecheckRequest) -> Result<Precheck, LedgerError> {
        // One statement: the batch (with key id) and the device's licence and its first station, if any.
        let (existing, batch) = {
            let mut conn = self.read_conn().await?;
            let sql = format!(
                "SELECT {BATCH_COLUMNS}, l.licence, l.station FROM batches b JOIN images i ON i.sha256 = b.image_sha256 \
                 LEFT JOIN licences l ON l.batch_id = b.id AND l.device_id = $2 WHERE b.id = $1"
            );
            let row = sqlx::query(&sql)
                .bind(&req.batch_id)
                .bind(&req.device_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(LedgerError::db("precheck: read batch and licence"))?;
            match row {
                None => (None, None),
                Some(r) => {
                    let licence: Option<Vec<u8>> =
                        r.try_get(BATCH_COLUMN_COUNT).map_err(LedgerError::db("precheck: read batch and licence"))?;
                    let station: Option<String> = r
                        .try_get(BATCH_COLUMN_COUNT + 1)
                        .map_err(LedgerError::db("precheck: read batch and licence"))?;
                    (licence.zip(station), Some(batch_from_row(&r).map_err(LedgerError::db("precheck: read batch"))?))
                }
            }
        };
        if let Some(b) = &batch {
            self.remember_batch(b);
        }
        let now = now_ms();
        let refusal = match (&batch, &existing) {
            (None, _) => Some((RefusalReason::UnknownBatch, format!("batch {:?} does not exist", req.batch_id))),
            (Some(b), Some(_)) => b.check_reissue(now, &req.site, &req.product_id).err(),
            (Some(b), None) => match b.check(now, &req.site, &req.product_id) {
                Err(r) => Some(r),
                Ok(()) if b.remaining() == 0 => Some((RefusalReason::QuotaExhausted, b.exhausted())),
                Ok(()) => None,
            },
        };
        // A wait, not a refusal: at a site broker that may still get units, a mirrored batch out of units
        // or past its lease; at central, a batch whose last units are leased to site brokers (unused ones
        // come back when their leases expire, the site idles or the batch closes).
        if let Some((reason, detail)) = &refusal
            && req.lease_wait
            && batch.as_ref().is_some_and(|b| b.waits_for_units(*reason))
        {
            return Err(LedgerError::LeaseWait { detail: detail.clone() });
        }
        if let Some((reason, detail)) = refusal {
            self.record_refusal(RefusalRecord {
                batch_id: req.batch_id.clone(),
                device_id: req.device_id.clone(),
                station: req.station.clone(),
                site: req.site.clone(),
                actor: req.actor.clone(),
                reason,
                detail: detail.clone(),
            })
            .await?;
            return Err(LedgerError::Refused { reason, detail });
        }
        match (existing, batch) {
            (Some((licence, first_station)), _) => {
                if first_station != req.station {
                    self.record_reissue(ReissueRecord {
                        batch_id: req.batch_id.clone(),
                        device_id: req.device_id.clone(),
                        station: req.station.clone(),
                        site: req.site.clone(),
                        first_station,
                        actor: req.actor.clone(),
                    })
                    .await?;
                }
                Ok(Precheck::Existing(licence))
            }
            (None, Some(b)) => Ok(Precheck::Proceed(Box::new(b))),
            (None, None) => Err(LedgerError::Internal { what: "precheck: batch vanished" }),
        }
    }

    /// [`Ledger::precheck`] without the read, for a broker whose HSM computes a licence in memory, where the
    /// precheck's database round trip costs more than the licence it would save (BENCHMARKS.md, CPU per
    /// licence). When the batch, as a precheck read it at most [`BATCH_CACHE_TTL`] ago, is open for this
    /// site and product with quota left, answers [`Precheck::Proceed`] without looking the device up: the
    /// caller computes the licence and [`Ledger::commit_issue`] decides — an existing licence is returned
    /// byte-identical under the reissue rules (and `licence.reissued` audited for another station), a
    /// refusal is audited there. Anything else (no cached batch, or one that would refuse) takes the full
    /// [`Ledger::precheck`], so every refusal is decided on a fresh read. Not for HSMs whose licences cost
    /// time or a counter unit (PKCS#11 tokens, smart cards): a retry would be computed again.
    pub async fn precheck_fast(&self, req: &PrecheckRequest) -> Result<Precheck, LedgerError> {
        let cached = {
            let cache = self.inner.batches.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(&req.batch_id).and_then(|(b, at)| (at.elapsed() < BATCH_CACHE_TTL).then(|| b.clone()))
        };
        if let Some(b) = cached
            && b.check(now_ms(), &req.site, &req.product_id).is_ok()
            && b.remaining() > 0
        {
            return Ok(Precheck::Proceed(Box::new(b)));
        }
        self.precheck(req).await
    }

    fn remember_batch(&self, b: &Batch) {
        let mut cache = self.inner.batches.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_BATCHES && !cache.contains_key(&b.id) {
            cache.clear();
        }
        cache.insert(b.id.clone(), (b.clone(), std::time::Instant::now()));
    }

    fn forget_batch(&self, id: &str) {
        self.inner.batches.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// Records that `rec.station` received the licence first issued to another station: a
    /// `licence.reissued` audit record and a holder row, once per (batch, device, station).
    pub async fn record_reissue(&self, rec: ReissueRecord) -> Result<(), LedgerError> {
        match self.submit(Payload::Reissue(rec)).await? {
            Outcome::Reissue => Ok(()),
            _ => Err(LedgerError::Internal { what: "writer answered a reissue with another outcome" }),
        }
    }

    /// Whether a station of `site` may report an install of (batch, device): the device holds a licence of
    /// the batch that was issued or reissued to a station of that site. `None` when the device holds no
    /// licence of the batch at all.
    pub async fn licence_site_ok(
        &self,
        batch_id: &str,
        device_id: &str,
        site: &str,
    ) -> Result<Option<bool>, LedgerError> {
        let mut conn = self.read_conn().await?;
        let row = sqlx::query(
            "SELECT l.site = $3 OR EXISTS (SELECT 1 FROM licence_reissues r WHERE r.batch_id = l.batch_id \
             AND r.device_id = l.device_id AND r.site = $3) FROM licences l WHERE l.batch_id = $1 AND l.device_id = $2",
        )
        .bind(batch_id)
        .bind(device_id)
        .bind(site)
        .fetch_optional(&mut *conn)
        .await
        .map_err(LedgerError::db("read licence holders"))?;
        row.map(|r| {
            // SQLite answers a boolean expression as an integer, PostgreSQL as a boolean.
            r.try_get::<bool, _>(0).or_else(|_| r.try_get::<i64, _>(0).map(|v| v != 0))
        })
        .transpose()
        .map_err(LedgerError::db("read licence holders"))
    }

    /// Commits a computed licence: in one (group) transaction returns the existing licence if the device has
    /// one (nothing consumed; under the reissue rules of [`Ledger::precheck`], and `licence.reissued` audited
    /// when another station first got it), else re-checks the batch, takes one unit of quota, stores the licence and appends
    /// `licence.issued` to the audit chain. Returns only after the commit is durable. Refusals are audited
    /// (`licence.refused`) and returned as [`LedgerError::Refused`]; any database failure returns
    /// [`LedgerError::Database`] and nothing was committed for this request (retrying is safe).
    pub async fn commit_issue(&self, rec: IssueRecord) -> Result<IssueOutcome, LedgerError> {
        if rec.licence.is_empty() {
            return Err(LedgerError::Invalid { field: "licence", value: String::new(), why: "empty licence" });
        }
        match self.submit(Payload::Issue(rec)).await? {
            Outcome::Issue(o) => Ok(o),
            _ => Err(LedgerError::Internal { what: "writer answered an issue with another outcome" }),
        }
    }

    /// Appends a `licence.refused` record for a refusal decided by the service (certificate not verified,
    /// station revoked, not authorised).
    pub async fn record_refusal(&self, rec: RefusalRecord) -> Result<(), LedgerError> {
        match self.submit(Payload::Refusal(rec)).await? {
            Outcome::Refusal => Ok(()),
            _ => Err(LedgerError::Internal { what: "writer answered a refusal with another outcome" }),
        }
    }

    /// Records an install report once per (station, result_id), with an `install.reported` audit record.
    /// A repeat is [`InstallOutcome::Duplicate`] and is not counted again.
    pub async fn report_install(&self, rep: InstallReport) -> Result<InstallOutcome, LedgerError> {
        if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&rep.timings_json).is_err() {
            return Err(LedgerError::Invalid {
                field: "install timings",
                value: rep.timings_json,
                why: "expected a JSON object",
            });
        }
        match self.submit(Payload::Install(rep)).await? {
            Outcome::Install(o) => Ok(o),
            _ => Err(LedgerError::Internal { what: "writer answered an install report with another outcome" }),
        }
    }

    /// The licence stored for (batch, device), if any.
    pub async fn licence(&self, batch_id: &str, device_id: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        let mut conn = self.read_conn().await?;
        writer::existing_licence(&mut conn, batch_id, device_id).await.map_err(LedgerError::db("read licence"))
    }

    /// Records a firmware key (metadata only) with a `key.added` audit record.
    pub async fn add_key(&self, key: &KeyRecord, actor: &str) -> Result<(), LedgerError> {
        const OP: &str = "add key";
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let now = now_ms();
        let n = sqlx::query(
            "INSERT INTO keys (key_id, label, backend, backend_ref, created_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(&key.key_id)
        .bind(&key.label)
        .bind(&key.backend)
        .bind(&key.backend_ref)
        .bind(now)
        .bind(actor)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?
        .rows_affected();
        if n == 0 {
            return Err(LedgerError::AlreadyExists { what: "key", id: key.key_id.clone() });
        }
        let details = serde_json::json!({"label": key.label, "backend": key.backend, "backend_ref": key.backend_ref});
        let ev = AuditEvent { actor, event: "key.added", subject: format!("key/{}", key.key_id), details };
        audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await
    }

    /// Appends one audit record for a security event that changes no ledger table (e.g. a key already
    /// recorded being imported into another broker's HSM).
    pub async fn record_event(
        &self,
        actor: &str,
        event: &'static str,
        subject: String,
        details: serde_json::Value,
    ) -> Result<(), LedgerError> {
        const OP: &str = "record audit event";
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        audit::append(&mut tx, &mut head, now_ms(), AuditEvent { actor, event, subject, details })
            .await
            .map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await
    }

    /// Stores an encrypted image (chunked, shared by every broker on the ledger) under its SHA-256 with an
    /// `image.added` audit record. Storing the same bytes again returns the stored metadata.
    pub async fn put_image(&self, img: &NewImage, bytes: &[u8], actor: &str) -> Result<ImageMeta, LedgerError> {
        const OP: &str = "store image";
        let sha = hex::encode(Sha256::digest(bytes));
        let size = i64::try_from(bytes.len()).map_err(|_| LedgerError::Invalid {
            field: "image size",
            value: bytes.len().to_string(),
            why: "too large",
        })?;
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        if let Some(meta) = load_image_meta(&mut tx, &sha).await.map_err(LedgerError::db(OP))? {
            tx.rollback().await.map_err(LedgerError::db(OP))?;
            return Ok(meta);
        }
        let key = sqlx::query("SELECT 1 FROM keys WHERE key_id = $1")
            .bind(&img.key_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(LedgerError::db(OP))?;
        if key.is_none() {
            return Err(LedgerError::NotFound { what: "key", id: img.key_id.clone() });
        }
        let chunks: Vec<&[u8]> = bytes.chunks(IMAGE_CHUNK).collect();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO images (sha256, key_id, family, product_id, size, chunk_count, created_at, created_by, \
             nonce, area_count, expected_crc) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&sha)
        .bind(&img.key_id)
        .bind(&img.family)
        .bind(&img.product_id)
        .bind(size)
        .bind(chunks.len() as i64)
        .bind(now)
        .bind(actor)
        .bind(hex::encode(img.nonce))
        .bind(i64::from(img.area_count))
        .bind(img.expected_crc.map(i64::from))
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?;
        for (i, c) in chunks.iter().enumerate() {
            sqlx::query("INSERT INTO image_chunks (sha256, idx, bytes) VALUES ($1, $2, $3)")
                .bind(&sha)
                .bind(i as i64)
                .bind(c.to_vec())
                .execute(&mut *tx)
                .await
                .map_err(LedgerError::db(OP))?;
        }
        let details = serde_json::json!({
            "key_id": img.key_id, "family": img.family, "product_id": img.product_id, "size": size,
            "area_count": img.area_count, "expected_crc": img.expected_crc,
        });
        let ev = AuditEvent { actor, event: "image.added", subject: format!("image/{sha}"), details };
        audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        let meta = load_image_meta(&mut tx, &sha).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        meta.ok_or_else(|| LedgerError::NotFound { what: "image", id: sha })
    }

    /// An image's metadata.
    pub async fn image_meta(&self, sha256: &str) -> Result<ImageMeta, LedgerError> {
        let mut conn = self.read_conn().await?;
        load_image_meta(&mut conn, sha256)
            .await
            .map_err(LedgerError::db("read image metadata"))?
            .ok_or_else(|| LedgerError::NotFound { what: "image", id: sha256.to_owned() })
    }

    /// Every image, oldest first.
    pub async fn images(&self) -> Result<Vec<ImageMeta>, LedgerError> {
        const OP: &str = "list images";
        let mut conn = self.read_conn().await?;
        let sql = format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY created_at, sha256");
        let rows = sqlx::query(&sql).fetch_all(&mut *conn).await.map_err(LedgerError::db(OP))?;
        rows.iter().map(image_from_row).collect::<Result<_, _>>().map_err(LedgerError::db(OP))
    }

    /// Chunk `idx` (of [`IMAGE_CHUNK`] bytes, the last one shorter) of a stored image.
    pub async fn image_chunk(&self, sha256: &str, idx: i64) -> Result<Vec<u8>, LedgerError> {
        const OP: &str = "read image chunk";
        let mut conn = self.read_conn().await?;
        let row = sqlx::query("SELECT bytes FROM image_chunks WHERE sha256 = $1 AND idx = $2")
            .bind(sha256)
            .bind(idx)
            .fetch_optional(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "image chunk", id: format!("{sha256}#{idx}") })?;
        row.try_get(0).map_err(LedgerError::db(OP))
    }

    /// Every firmware key recorded, oldest first.
    pub async fn keys(&self) -> Result<Vec<KeyListing>, LedgerError> {
        const OP: &str = "list keys";
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query(
            "SELECT key_id, label, backend, backend_ref, created_at, created_by FROM keys ORDER BY created_at, key_id",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
        rows.iter()
            .map(|r| {
                Ok(KeyListing {
                    key: KeyRecord {
                        key_id: r.try_get(0)?,
                        label: r.try_get(1)?,
                        backend: r.try_get(2)?,
                        backend_ref: r.try_get(3)?,
                    },
                    created_at: r.try_get(4)?,
                    created_by: r.try_get(5)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::db(OP))
    }

    /// Licences and install reports of one device, oldest first.
    pub async fn device_history(&self, device_id: &str) -> Result<DeviceHistory, LedgerError> {
        const OP: &str = "read device history";
        let mut conn = self.read_conn().await?;
        let lic = sqlx::query(
            "SELECT batch_id, station, site, issued_at, licence FROM licences WHERE device_id = $1 \
             ORDER BY issued_at, batch_id",
        )
        .bind(device_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
        let inst = sqlx::query(
            "SELECT batch_id, station, result_id, status_code, message, flash_crc, attempt, reported_at \
             FROM installs WHERE device_id = $1 ORDER BY reported_at, station, result_id",
        )
        .bind(device_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
        let licences = lic
            .iter()
            .map(|r| {
                Ok(LicenceRow {
                    batch_id: r.try_get(0)?,
                    station: r.try_get(1)?,
                    site: r.try_get(2)?,
                    issued_at: r.try_get(3)?,
                    licence: r.try_get(4)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::db(OP))?;
        let installs = inst
            .iter()
            .map(|r| {
                let code: i64 = r.try_get(3)?;
                let crc: Option<i64> = r.try_get(5)?;
                let attempt: i64 = r.try_get(6)?;
                Ok(InstallRow {
                    batch_id: r.try_get(0)?,
                    station: r.try_get(1)?,
                    result_id: r.try_get(2)?,
                    status_code: u16::try_from(code).unwrap_or(u16::MAX),
                    message: r.try_get(4)?,
                    flash_crc: crc.and_then(|c| u32::try_from(c).ok()),
                    attempt: u32::try_from(attempt).unwrap_or(0),
                    reported_at: r.try_get(7)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::db(OP))?;
        Ok(DeviceHistory { licences, installs })
    }

    /// Records that `identity` (of `site`) connected with the certificate `serial` now. Bookkeeping for
    /// [`Ledger::stations`] and revocation by identity; callers rate-limit it.
    pub async fn note_station(&self, identity: &str, site: &str, serial: &str) -> Result<(), LedgerError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO stations (identity, serial, site, first_seen, last_seen) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (identity, serial) DO UPDATE SET last_seen = excluded.last_seen",
        )
        .bind(identity)
        .bind(serial)
        .bind(site)
        .bind(now)
        .execute(&self.inner.write)
        .await
        .map_err(LedgerError::db("record station"))?;
        Ok(())
    }

    /// Every station seen (by certificate, licence or install report), by identity, with its counts.
    pub async fn stations(&self) -> Result<Vec<StationSummary>, LedgerError> {
        const OP: &str = "list stations";
        let mut conn = self.read_conn().await?;
        let mut map: std::collections::BTreeMap<String, StationSummary> = std::collections::BTreeMap::new();
        let certs = sqlx::query(
            "SELECT identity, site, serial, first_seen, last_seen FROM stations ORDER BY identity, first_seen",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
        for r in &certs {
            let identity: String = r.try_get(0).map_err(LedgerError::db(OP))?;
            let s = map.entry(identity.clone()).or_insert_with(|| StationSummary { identity, ..Default::default() });
            s.site = r.try_get(1).map_err(LedgerError::db(OP))?;
            s.certificates.push(StationCertSeen {
                serial: r.try_get(2).map_err(LedgerError::db(OP))?,
                first_seen: r.try_get(3).map_err(LedgerError::db(OP))?,
                last_seen: r.try_get(4).map_err(LedgerError::db(OP))?,
            });
        }
        let lic = sqlx::query("SELECT station, site, COUNT(*) FROM licences GROUP BY station, site")
            .fetch_all(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
        for r in &lic {
            let identity: String = r.try_get(0).map_err(LedgerError::db(OP))?;
            let site: String = r.try_get(1).map_err(LedgerError::db(OP))?;
            let s =
                map.entry(identity.clone()).or_insert_with(|| StationSummary { identity, site, ..Default::default() });
            s.licences += r.try_get::<i64, _>(2).map_err(LedgerError::db(OP))?;
        }
        let inst = sqlx::query(
            "SELECT station, CAST(SUM(CASE WHEN status_code = 0 THEN 1 ELSE 0 END) AS BIGINT), \
             CAST(SUM(CASE WHEN status_code <> 0 THEN 1 ELSE 0 END) AS BIGINT) FROM installs GROUP BY station",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
        for r in &inst {
            let identity: String = r.try_get(0).map_err(LedgerError::db(OP))?;
            let s = map.entry(identity.clone()).or_insert_with(|| StationSummary { identity, ..Default::default() });
            s.installs_ok += r.try_get::<i64, _>(1).map_err(LedgerError::db(OP))?;
            s.installs_failed += r.try_get::<i64, _>(2).map_err(LedgerError::db(OP))?;
        }
        Ok(map.into_values().collect())
    }

    /// Reads an image back, checking its size and SHA-256.
    pub async fn image(&self, sha256: &str) -> Result<(ImageMeta, Vec<u8>), LedgerError> {
        const OP: &str = "read image";
        let mut conn = self.read_conn().await?;
        let meta = load_image_meta(&mut conn, sha256)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "image", id: sha256.to_owned() })?;
        let row = sqlx::query("SELECT chunk_count FROM images WHERE sha256 = $1")
            .bind(sha256)
            .fetch_one(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
        let chunk_count: i64 = row.try_get(0).map_err(LedgerError::db(OP))?;
        let rows = sqlx::query("SELECT idx, bytes FROM image_chunks WHERE sha256 = $1 ORDER BY idx")
            .bind(sha256)
            .fetch_all(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
        let corrupt = |why: String| LedgerError::Corrupt { what: "image", id: sha256.to_owned(), why };
        if rows.len() as i64 != chunk_count {
            return Err(corrupt(format!("expected {chunk_count} chunks, found {}", rows.len())));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(meta.size).unwrap_or(0));
        for (i, r) in rows.iter().enumerate() {
            let idx: i64 = r.try_get(0).map_err(LedgerError::db(OP))?;
            if idx != i as i64 {
                return Err(corrupt(format!("chunk {i} missing (found chunk {idx})")));
            }
            let c: Vec<u8> = r.try_get(1).map_err(LedgerError::db(OP))?;
            bytes.extend_from_slice(&c);
        }
        if bytes.len() as i64 != meta.size {
            return Err(corrupt(format!("expected {} bytes, found {}", meta.size, bytes.len())));
        }
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != sha256 {
            return Err(corrupt(format!("bytes hash to {actual}")));
        }
        Ok((meta, bytes))
    }

    /// Creates a batch (state open, nothing issued) with a `batch.created` audit record.
    pub async fn create_batch(&self, b: &NewBatch, actor: &str) -> Result<Batch, LedgerError> {
        const OP: &str = "create batch";
        if b.quota < 0 {
            return Err(LedgerError::Invalid { field: "batch quota", value: b.quota.to_string(), why: "negative" });
        }
        if b.product_id.len() != 8 || !b.product_id.is_ascii() {
            return Err(LedgerError::Invalid {
                field: "batch product_id",
                value: b.product_id.clone(),
                why: "expected 8 ASCII characters",
            });
        }
        if let (Some(nb), Some(na)) = (b.not_before, b.not_after)
            && na <= nb
        {
            return Err(LedgerError::Invalid {
                field: "batch validity window",
                value: format!("{nb}..{na}"),
                why: "not_after must be later than not_before",
            });
        }
        let sites = serde_json::to_string(&b.allowed_sites).map_err(|_| LedgerError::Invalid {
            field: "batch allowed_sites",
            value: format!("{:?}", b.allowed_sites),
            why: "not serialisable",
        })?;
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let img = sqlx::query("SELECT product_id FROM images WHERE sha256 = $1")
            .bind(&b.image_sha256)
            .fetch_optional(&mut *tx)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "image", id: b.image_sha256.clone() })?;
        let img_product: String = img.try_get(0).map_err(LedgerError::db(OP))?;
        if img_product != b.product_id {
            return Err(LedgerError::Invalid {
                field: "batch product_id",
                value: b.product_id.clone(),
                why: "differs from the image's product id",
            });
        }
        let now = now_ms();
        let n = sqlx::query(
            "INSERT INTO batches (id, product_id, image_sha256, quota, issued, allowed_sites, not_before, not_after, \
             state, created_at, created_by) VALUES ($1, $2, $3, $4, 0, $5, $6, $7, 'open', $8, $9) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&b.id)
        .bind(&b.product_id)
        .bind(&b.image_sha256)
        .bind(b.quota)
        .bind(&sites)
        .bind(b.not_before)
        .bind(b.not_after)
        .bind(now)
        .bind(actor)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?
        .rows_affected();
        if n == 0 {
            return Err(LedgerError::AlreadyExists { what: "batch", id: b.id.clone() });
        }
        let details = serde_json::json!({
            "product_id": b.product_id, "image_sha256": b.image_sha256, "quota": b.quota,
            "allowed_sites": b.allowed_sites, "not_before": b.not_before, "not_after": b.not_after,
        });
        let ev = AuditEvent { actor, event: "batch.created", subject: format!("batch/{}", b.id), details };
        audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        let batch = load_batch(&mut tx, &b.id).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        batch.ok_or_else(|| LedgerError::NotFound { what: "batch", id: b.id.clone() })
    }

    /// Changes a batch's state (open, paused, closed) with a `batch.state_changed` audit record. A closed batch
    /// cannot be reopened.
    pub async fn set_batch_state(&self, id: &str, state: BatchState, actor: &str) -> Result<Batch, LedgerError> {
        const OP: &str = "change batch state";
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let before = load_batch(&mut tx, id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "batch", id: id.to_owned() })?;
        if before.state == BatchState::Closed && state != BatchState::Closed {
            return Err(LedgerError::Invalid {
                field: "batch state",
                value: state.as_str().to_owned(),
                why: "a closed batch cannot be reopened or paused",
            });
        }
        sqlx::query("UPDATE batches SET state = $1 WHERE id = $2")
            .bind(state.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::db(OP))?;
        let now = now_ms();
        let details = serde_json::json!({"from": before.state.as_str(), "to": state.as_str()});
        let ev = AuditEvent { actor, event: "batch.state_changed", subject: format!("batch/{id}"), details };
        audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        self.forget_batch(id);
        Ok(Batch { state, ..before })
    }

    /// Reads one batch.
    pub async fn batch(&self, id: &str) -> Result<Batch, LedgerError> {
        let mut conn = self.read_conn().await?;
        load_batch(&mut conn, id)
            .await
            .map_err(LedgerError::db("read batch"))?
            .ok_or_else(|| LedgerError::NotFound { what: "batch", id: id.to_owned() })
    }

    /// Every batch, by id.
    pub async fn batches(&self) -> Result<Vec<Batch>, LedgerError> {
        let mut conn = self.read_conn().await?;
        let sql =
            format!("SELECT {BATCH_COLUMNS} FROM batches b JOIN images i ON i.sha256 = b.image_sha256 ORDER BY b.id");
        let rows = sqlx::query(&sql).fetch_all(&mut *conn).await.map_err(LedgerError::db("list batches"))?;
        rows.iter().map(batch_from_row).collect::<Result<_, _>>().map_err(LedgerError::db("list batches"))
    }

    /// Issued, installed, failed and remaining counts of a batch.
    pub async fn batch_status(&self, id: &str) -> Result<BatchStatus, LedgerError> {
        const OP: &str = "read batch status";
        let mut conn = self.read_conn().await?;
        let batch = load_batch(&mut conn, id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "batch", id: id.to_owned() })?;
        let row = sqlx::query(
            "SELECT \
               (SELECT COUNT(DISTINCT device_id) FROM installs WHERE batch_id = $1 AND status_code = 0), \
               (SELECT COUNT(DISTINCT f.device_id) FROM installs f WHERE f.batch_id = $1 AND f.status_code <> 0 \
                  AND NOT EXISTS (SELECT 1 FROM installs s WHERE s.batch_id = f.batch_id \
                                  AND s.device_id = f.device_id AND s.status_code = 0))",
        )
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
        let mut sites: std::collections::BTreeMap<String, SiteUnits> = std::collections::BTreeMap::new();
        for (sql, which) in [
            ("SELECT site, COUNT(*) FROM licences WHERE batch_id = $1 GROUP BY site", 0),
            (
                "SELECT site, CAST(COALESCE(SUM(granted - used - returned), 0) AS BIGINT) FROM leases WHERE batch_id = $1 \
                 AND state = 'active' GROUP BY site",
                1,
            ),
            ("SELECT site, COUNT(*) FROM licence_conflicts WHERE batch_id = $1 GROUP BY site", 2),
        ] {
            for r in sqlx::query(sql).bind(id).fetch_all(&mut *conn).await.map_err(LedgerError::db(OP))? {
                let site: String = r.try_get(0).map_err(LedgerError::db(OP))?;
                let n: i64 = r.try_get(1).map_err(LedgerError::db(OP))?;
                let e = sites.entry(site.clone()).or_insert_with(|| SiteUnits { site, ..SiteUnits::default() });
                match which {
                    0 => e.issued = n,
                    1 => e.leased = n,
                    _ => e.conflicts = n,
                }
            }
        }
        Ok(BatchStatus {
            issued: batch.issued,
            installed: row.try_get(0).map_err(LedgerError::db(OP))?,
            failed: row.try_get(1).map_err(LedgerError::db(OP))?,
            remaining: batch.remaining(),
            sites: sites.into_values().filter(|s| s.issued + s.leased + s.conflicts > 0).collect(),
            batch,
        })
    }

    /// Revokes a station certificate with a `station.revoked` audit record. Revoking an already revoked serial
    /// returns the existing revocation.
    pub async fn revoke_station(
        &self,
        serial: &str,
        identity: &str,
        reason: &str,
        actor: &str,
    ) -> Result<Revocation, LedgerError> {
        const OP: &str = "revoke station";
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let now = now_ms();
        let n = sqlx::query(
            "INSERT INTO revocations (serial, identity, reason, revoked_at, revoked_by) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (serial) DO NOTHING",
        )
        .bind(serial)
        .bind(identity)
        .bind(reason)
        .bind(now)
        .bind(actor)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?
        .rows_affected();
        if n == 1 {
            let details = serde_json::json!({"identity": identity, "reason": reason});
            let ev = AuditEvent { actor, event: "station.revoked", subject: format!("station-cert/{serial}"), details };
            audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
            commit_write(tx, &head, OP).await?;
        } else {
            tx.rollback().await.map_err(LedgerError::db(OP))?;
        }
        self.revocations()
            .await?
            .into_iter()
            .find(|r| r.serial == serial)
            .ok_or_else(|| LedgerError::NotFound { what: "revocation", id: serial.to_owned() })
    }

    /// Every revocation, by serial.
    pub async fn revocations(&self) -> Result<Vec<Revocation>, LedgerError> {
        const OP: &str = "list revocations";
        let mut conn = self.read_conn().await?;
        let rows =
            sqlx::query("SELECT serial, identity, reason, revoked_at, revoked_by FROM revocations ORDER BY serial")
                .fetch_all(&mut *conn)
                .await
                .map_err(LedgerError::db(OP))?;
        rows.iter()
            .map(|r| {
                Ok(Revocation {
                    serial: r.try_get(0)?,
                    identity: r.try_get(1)?,
                    reason: r.try_get(2)?,
                    revoked_at: r.try_get(3)?,
                    revoked_by: r.try_get(4)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::db(OP))
    }

    /// Assigns batch `batch_id` to the station `identity` (and lifts a pause) with a `station.assigned`
    /// audit record. The batch must exist, not be closed, and allow the station's site.
    pub async fn assign_station(&self, identity: &str, batch_id: &str, actor: &str) -> Result<Assignment, LedgerError> {
        const OP: &str = "assign station";
        let site = station_site(identity)?;
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let batch = load_batch(&mut tx, batch_id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "batch", id: batch_id.to_owned() })?;
        if batch.state == BatchState::Closed {
            return Err(LedgerError::Precondition {
                what: "batch",
                id: batch_id.to_owned(),
                why: format!("is closed and cannot be assigned to {identity}"),
            });
        }
        if !batch.allowed_sites.iter().any(|s| s == ANY_SITE || *s == site) {
            return Err(LedgerError::Precondition {
                what: "batch",
                id: batch_id.to_owned(),
                why: format!(
                    "cannot be assigned to {identity}: site {site:?} is not among its allowed sites {:?}",
                    batch.allowed_sites
                ),
            });
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO station_assignments (identity, batch_id, paused, reason, revision, updated_at, updated_by) \
             VALUES ($1, $2, 0, '', 1, $3, $4) ON CONFLICT (identity) DO UPDATE SET batch_id = excluded.batch_id, \
             paused = 0, reason = '', revision = station_assignments.revision + 1, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(identity)
        .bind(batch_id)
        .bind(now)
        .bind(actor)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?;
        let details = serde_json::json!({"batch_id": batch_id, "site": site});
        let ev = AuditEvent { actor, event: "station.assigned", subject: format!("station/{identity}"), details };
        audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        let assignment = load_assignment(&mut tx, identity).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        assignment.ok_or_else(|| LedgerError::NotFound { what: "station assignment", id: identity.to_owned() })
    }

    /// Pauses the station `identity` (its assigned batch, if any, stays recorded) with a `station.paused`
    /// audit record. Assigning a batch again lifts the pause.
    pub async fn pause_station(&self, identity: &str, reason: &str, actor: &str) -> Result<Assignment, LedgerError> {
        const OP: &str = "pause station";
        let site = station_site(identity)?;
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO station_assignments (identity, batch_id, paused, reason, revision, updated_at, updated_by) \
             VALUES ($1, '', 1, $2, 1, $3, $4) ON CONFLICT (identity) DO UPDATE SET paused = 1, \
             reason = excluded.reason, revision = station_assignments.revision + 1, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(identity)
        .bind(reason)
        .bind(now)
        .bind(actor)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?;
        let assignment = load_assignment(&mut tx, identity)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "station assignment", id: identity.to_owned() })?;
        let details = serde_json::json!({"reason": reason, "batch_id": assignment.batch_id, "site": site});
        let ev = AuditEvent { actor, event: "station.paused", subject: format!("station/{identity}"), details };
        audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        Ok(assignment)
    }

    /// The assignment of the station `identity`, if an operator ever made one.
    pub async fn station_assignment(&self, identity: &str) -> Result<Option<Assignment>, LedgerError> {
        let mut conn = self.read_conn().await?;
        load_assignment(&mut conn, identity).await.map_err(LedgerError::db("read station assignment"))
    }

    /// Every station assignment, by identity.
    pub async fn station_assignments(&self) -> Result<Vec<Assignment>, LedgerError> {
        const OP: &str = "list station assignments";
        let mut conn = self.read_conn().await?;
        let sql = format!("SELECT {ASSIGNMENT_COLUMNS} FROM station_assignments ORDER BY identity");
        let rows = sqlx::query(&sql).fetch_all(&mut *conn).await.map_err(LedgerError::db(OP))?;
        rows.iter().map(assignment_from_row).collect::<Result<_, _>>().map_err(LedgerError::db(OP))
    }

    /// Writes (inserts or replaces) the status of `status.identity`. Bookkeeping written on heartbeats
    /// (callers rate-limit it); not audited.
    pub async fn put_station_status(&self, status: &StationStatus) -> Result<(), LedgerError> {
        const OP: &str = "record station status";
        let probes = serde_json::to_string(&status.probes).map_err(|_| LedgerError::Invalid {
            field: "station probes",
            value: format!("{:?}", status.probes),
            why: "not serialisable",
        })?;
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO station_status (identity, site, broker, session, attached, probes, current_batch, \
             devices_ok, devices_failed, running, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (identity) DO UPDATE SET site = excluded.site, broker = excluded.broker, \
             session = excluded.session, attached = excluded.attached, probes = excluded.probes, \
             current_batch = excluded.current_batch, devices_ok = excluded.devices_ok, \
             devices_failed = excluded.devices_failed, running = excluded.running, updated_at = excluded.updated_at",
        )
        .bind(&status.identity)
        .bind(&status.site)
        .bind(&status.broker)
        .bind(&status.session)
        .bind(i64::from(status.attached))
        .bind(probes)
        .bind(&status.current_batch)
        .bind(count(status.devices_ok))
        .bind(count(status.devices_failed))
        .bind(i64::from(status.running))
        .bind(status.updated_at)
        .execute(&self.inner.write)
        .await
        .map_err(LedgerError::db(OP))?;
        Ok(())
    }

    /// Marks the station `identity` detached, unless another stream (`session`) has written its status
    /// since (it reattached, possibly to another broker). Returns whether the row was changed.
    pub async fn mark_station_detached(&self, identity: &str, session: &str) -> Result<bool, LedgerError> {
        let n = sqlx::query(
            "UPDATE station_status SET attached = 0, running = 0, updated_at = $3 \
             WHERE identity = $1 AND session = $2",
        )
        .bind(identity)
        .bind(session)
        .bind(now_ms())
        .execute(&self.inner.write)
        .await
        .map_err(LedgerError::db("mark station detached"))?
        .rows_affected();
        Ok(n > 0)
    }

    /// The last status of every station that ever attached, by identity.
    pub async fn station_statuses(&self) -> Result<Vec<StationStatus>, LedgerError> {
        const OP: &str = "list station status";
        let mut conn = self.read_conn().await?;
        let sql = format!("SELECT {STATUS_COLUMNS} FROM station_status ORDER BY identity");
        let rows = sqlx::query(&sql).fetch_all(&mut *conn).await.map_err(LedgerError::db(OP))?;
        rows.iter().map(status_from_row).collect::<Result<_, _>>().map_err(LedgerError::db(OP))
    }

    /// Up to `limit` audit records after `after_seq`, in order.
    pub async fn audit_page(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRecord>, LedgerError> {
        let mut conn = self.read_conn().await?;
        audit::page(&mut conn, after_seq, limit).await.map_err(LedgerError::db("read audit"))
    }

    /// Walks the whole audit chain up to the current head. Returns the first broken record as
    /// [`LedgerError::AuditBroken`] (edited, missing, reordered, or trailing records deleted).
    pub async fn verify_audit(&self) -> Result<AuditSummary, LedgerError> {
        const OP: &str = "verify audit";
        const PAGE: i64 = 2000;
        let mut pooled = self.read_conn().await?;
        // One snapshot for the head, the chain and the tables, so that a licence committed meanwhile is
        // neither a record without its licence nor a licence without its record.
        let (mut conn, head_seq, head_hash) = snapshot_with_head(&mut pooled, self.dialect(), OP).await?;
        // The identity as stored now (not as cached at opening): an edited ledger_meta must show.
        let meta = sqlx::query("SELECT ledger_id, genesis FROM ledger_meta WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
        let (id, genesis) = match meta {
            Some(r) => (
                r.try_get::<Vec<u8>, _>(0).map_err(LedgerError::db(OP))?,
                r.try_get::<String, _>(1).map_err(LedgerError::db(OP))?,
            ),
            None => (Vec::new(), String::new()),
        };
        if id != self.inner.ledger_id || Genesis::from_name(&genesis) != Some(self.inner.genesis) {
            return Err(LedgerError::AuditBroken {
                seq: 0,
                why: AuditFault::Identity(format!(
                    "ledger_meta holds id {} ({genesis:?}) but this ledger was opened as {} ({})",
                    hex::encode(&id),
                    hex::encode(self.inner.ledger_id),
                    self.inner.genesis.as_str()
                )),
            });
        }
        let first_prev = self.inner.genesis.first_prev_hash(&self.inner.ledger_id);
        let mut v = audit::Verifier::new(first_prev);
        // The stored checkpoints, held against the chain: a rewrite that left them in place is named here
        // too. (Their signatures are checked offline by `flashgate audit verify`, against keys held outside
        // the ledger; here they only have to agree with the chain.)
        let witnesses = self.stored_witnesses(&mut conn).await?;
        let mut wc = flashgate_common::checkpoint::WitnessCheck::with_genesis(witnesses, first_prev);
        let contradicted = |e: flashgate_common::checkpoint::WitnessError,
                            wc: &flashgate_common::checkpoint::WitnessCheck| {
            use flashgate_common::checkpoint::WitnessError as W;
            let after =
                wc.last_agreed().map(|(s, n)| format!("; the rewrite lies after seq {s}, which {n} vouches for"));
            let seq = match &e {
                W::HashDiffers { seq, .. } => *seq,
                W::ChainTooShort { first_missing, .. } => *first_missing,
            };
            LedgerError::AuditBroken {
                seq: i64::try_from(seq).unwrap_or(i64::MAX),
                why: AuditFault::Checkpoint(format!("{e}{}", after.unwrap_or_default())),
            }
        };
        // Every licence record's (batch, device), with its seq, and the units the records count per batch
        // (`flashgate_common::audit::issuance`), to reconcile with the tables.
        let mut issued: HashMap<(String, String), i64> = HashMap::new();
        let mut units: HashMap<String, i64> = HashMap::new();
        let mut after = 0;
        'pages: loop {
            let page = audit::page(&mut conn, after, PAGE).await.map_err(LedgerError::db(OP))?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for r in &page {
                // Records appended after we read the head belong to a later verification.
                if r.seq > head_seq {
                    break 'pages;
                }
                v.push(r)?;
                // push checked the stored hash equals the recomputed one (32 bytes).
                let mut h = [0u8; 32];
                if r.hash.len() == 32 {
                    h.copy_from_slice(&r.hash);
                }
                wc.record(u64::try_from(r.seq).unwrap_or(0), &h).map_err(|e| contradicted(e, &wc))?;
                let is = flashgate_common::audit::issuance(&r.event, &r.details)
                    .map_err(|e| LedgerError::AuditBroken { seq: r.seq, why: AuditFault::Unreconciled(e) })?;
                if let Some(is) = is
                    && let Some((batch, device)) = audit::parse_device_subject(&r.subject)
                {
                    if is.licence {
                        issued.insert((batch.to_owned(), device.to_owned()), r.seq);
                    }
                    if is.unit {
                        *units.entry(batch.to_owned()).or_default() += 1;
                    }
                }
            }
        }
        let mut summary = v.finish(head_seq, &head_hash)?;
        let agreed = wc.clone();
        wc.finish(u64::try_from(head_seq).unwrap_or(0)).map_err(|e| contradicted(e, &agreed))?;
        summary.ledger_id = hex::encode(self.inner.ledger_id);
        summary.genesis = self.inner.genesis;
        reconcile(&mut conn, head_seq, issued, units).await?;
        conn.rollback().await.map_err(LedgerError::db(OP))?;
        Ok(summary)
    }

    /// The stored checkpoints of this ledger as witnesses (parsed; a row that does not parse or names
    /// another ledger or seq is a broken audit).
    async fn stored_witnesses(
        &self,
        conn: &mut AnyConnection,
    ) -> Result<Vec<flashgate_common::checkpoint::Witness>, LedgerError> {
        use flashgate_common::checkpoint::{SignedCheckpoint, Witness};
        const OP: &str = "verify audit: read checkpoints";
        let mut out = Vec::new();
        let mut after: (i64, i64, String) = (-1, 0, String::new());
        loop {
            let page =
                checkpoints::page(conn, (after.0, after.1, &after.2), 2000).await.map_err(LedgerError::db(OP))?;
            let Some(last) = page.last() else { return Ok(out) };
            after = (last.seq, last.at, last.broker.clone());
            for c in page {
                let bad = |why: String| LedgerError::AuditBroken { seq: c.seq, why: AuditFault::Checkpoint(why) };
                let cp = SignedCheckpoint::parse(&c.bytes).map_err(|e| {
                    bad(format!("the stored checkpoint of seq {} by {} does not parse: {e}", c.seq, c.broker))
                })?;
                if cp.head.ledger_id != self.inner.ledger_id || i64::try_from(cp.head.seq).ok() != Some(c.seq) {
                    return Err(bad(format!(
                        "the stored checkpoint of seq {} by {} signs seq {} of ledger {}",
                        c.seq,
                        c.broker,
                        cp.head.seq,
                        hex::encode(cp.head.ledger_id)
                    )));
                }
                out.push(Witness::from_checkpoint(
                    format!("stored checkpoint seq {} signed by {} at {}", cp.head.seq, cp.head.broker, cp.head.at),
                    &cp,
                ));
            }
        }
    }

    /// Writes the audit log as JSON lines (hashes in hex) and returns the number of records written.
    pub async fn export_audit(&self, out: &mut (dyn std::io::Write + Send)) -> Result<u64, LedgerError> {
        const PAGE: i64 = 2000;
        let mut after = 0;
        let mut n = 0;
        loop {
            let page = self.audit_page(after, PAGE).await?;
            let Some(last) = page.last() else { return Ok(n) };
            after = last.seq;
            for r in &page {
                let line = serde_json::to_string(r).map_err(|e| LedgerError::Corrupt {
                    what: "audit record",
                    id: r.seq.to_string(),
                    why: e.to_string(),
                })?;
                writeln!(out, "{line}").map_err(|source| LedgerError::Io { what: "audit export", source })?;
                n += 1;
            }
        }
    }

    /// Writes the audit export (`flashgate-audit-export-v1`, `flashgate_common::audit_export`) of one
    /// database snapshot to `out`, line by line (each ending in a newline): header, every checkpoint, every
    /// record up to the snapshot's head, every licence, every batch, end. Memory is one page at a time.
    /// Sign a checkpoint of the head first (the admin service does) so that the export ends covered.
    pub async fn export_bundle(
        &self,
        broker: &str,
        out: &mpsc::Sender<String>,
    ) -> Result<flashgate_common::audit_export::EndLine, LedgerError> {
        use flashgate_common::audit_export::{
            BatchLine, CheckpointLine, EXPORT_FORMAT, ExportWriter, Header, LicenceLine, Line, RecordLine,
        };
        const OP: &str = "export audit";
        const PAGE: i64 = 2000;
        let mut w = ExportWriter::new();
        let send = |text: String| async move {
            out.send(text).await.map_err(|_| LedgerError::Io {
                what: "audit export",
                source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the receiver went away"),
            })
        };
        let mut pooled = self.read_conn().await?;
        let (mut conn, head_seq, head_hash) = snapshot_with_head(&mut pooled, self.dialect(), OP).await?;
        send(w.line(&Line::Header(Header {
            format: EXPORT_FORMAT.into(),
            ledger_id: hex::encode(self.inner.ledger_id),
            genesis: self.inner.genesis.as_str().into(),
            broker: broker.into(),
            exported_at_ms: now_ms(),
            head_seq,
            head_hash: hex::encode(&head_hash),
        })))
        .await?;
        let mut after: (i64, i64, String) = (-1, 0, String::new());
        loop {
            let page =
                checkpoints::page(&mut conn, (after.0, after.1, &after.2), PAGE).await.map_err(LedgerError::db(OP))?;
            let Some(last) = page.last() else { break };
            after = (last.seq, last.at, last.broker.clone());
            for c in page {
                send(w.line(&Line::Checkpoint(CheckpointLine {
                    checkpoint: hex::encode(&c.bytes),
                    seq: u64::try_from(c.seq).unwrap_or(0),
                    broker: c.broker,
                    at: u64::try_from(c.at).unwrap_or(0),
                })))
                .await?;
            }
        }
        let mut after = 0;
        'records: loop {
            let page = audit::page(&mut conn, after, PAGE).await.map_err(LedgerError::db(OP))?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for r in page {
                if r.seq > head_seq {
                    break 'records;
                }
                send(w.line(&Line::Record(RecordLine {
                    seq: r.seq,
                    at_ms: r.at,
                    actor: r.actor,
                    event: r.event,
                    subject: r.subject,
                    details_json: r.details,
                    prev_hash: hex::encode(&r.prev_hash),
                    hash: hex::encode(&r.hash),
                })))
                .await?;
            }
        }
        let (mut batch, mut device) = (String::new(), String::new());
        loop {
            let rows = sqlx::query(
                "SELECT batch_id, device_id, station, site, issued_at FROM licences                  WHERE batch_id > $1 OR (batch_id = $1 AND device_id > $2) ORDER BY batch_id, device_id LIMIT $3",
            )
            .bind(&batch)
            .bind(&device)
            .bind(PAGE)
            .fetch_all(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let l = LicenceLine {
                    batch_id: r.try_get(0).map_err(LedgerError::db(OP))?,
                    device_id: r.try_get(1).map_err(LedgerError::db(OP))?,
                    station: r.try_get(2).map_err(LedgerError::db(OP))?,
                    site: r.try_get(3).map_err(LedgerError::db(OP))?,
                    issued_at_ms: r.try_get(4).map_err(LedgerError::db(OP))?,
                };
                (batch, device) = (l.batch_id.clone(), l.device_id.clone());
                send(w.line(&Line::Licence(l))).await?;
            }
        }
        let rows = sqlx::query("SELECT id, quota, issued FROM batches ORDER BY id")
            .fetch_all(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
        for r in &rows {
            send(w.line(&Line::Batch(BatchLine {
                id: r.try_get(0).map_err(LedgerError::db(OP))?,
                quota: r.try_get(1).map_err(LedgerError::db(OP))?,
                issued: r.try_get(2).map_err(LedgerError::db(OP))?,
            })))
            .await?;
        }
        conn.rollback().await.map_err(LedgerError::db(OP))?;
        let end = w.end();
        let parsed = serde_json::from_str::<Line>(&end).ok();
        send(end).await?;
        match parsed {
            Some(Line::End(e)) => Ok(e),
            _ => Err(LedgerError::Internal { what: "the export's end line does not parse" }),
        }
    }

    /// Closes the connection pools (pending writes already answered are durable).
    pub async fn close(&self) {
        self.inner.read.close().await;
        self.inner.write.close().await;
    }
}

/// Reads the ledger's identity, creating it at the first opening: a random id, and — when the chain is
/// still empty — the head moved to the id's genesis hash (`bound`); a ledger that already holds records
/// keeps its zero start (`legacy`) and gets a `ledger.id_assigned` record naming the id. Runs inside a
/// writing transaction (the head lock serialises brokers opening one PostgreSQL ledger together).
async fn ensure_identity(pool: &AnyPool, dialect: Dialect) -> Result<([u8; 16], Genesis), LedgerError> {
    const OP: &str = "read or create the ledger id";
    let (mut tx, mut head) = begin_write(pool, dialect).await.map_err(LedgerError::db(OP))?;
    let row = sqlx::query("SELECT ledger_id, genesis FROM ledger_meta WHERE id = 1")
        .fetch_optional(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?;
    if let Some(row) = row {
        tx.rollback().await.map_err(LedgerError::db(OP))?;
        let id: Vec<u8> = row.try_get(0).map_err(LedgerError::db(OP))?;
        let genesis: String = row.try_get(1).map_err(LedgerError::db(OP))?;
        let corrupt = |why: String| LedgerError::Corrupt { what: "ledger_meta", id: "1".into(), why };
        let id: [u8; 16] =
            id.as_slice().try_into().map_err(|_| corrupt(format!("ledger_id is {} bytes, expected 16", id.len())))?;
        let genesis = Genesis::from_name(&genesis)
            .ok_or_else(|| corrupt(format!("genesis {genesis:?} is not bound or legacy")))?;
        return Ok((id, genesis));
    }
    let mut id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
    let genesis = if head.seq == 0 { Genesis::Bound } else { Genesis::Legacy };
    let now = now_ms();
    sqlx::query("INSERT INTO ledger_meta (id, ledger_id, genesis, created_at) VALUES (1, $1, $2, $3)")
        .bind(id.to_vec())
        .bind(genesis.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?;
    match genesis {
        Genesis::Bound => head.hash = audit::genesis_hash(&id).to_vec(),
        Genesis::Legacy => {
            let details = serde_json::json!({"ledger_id": hex::encode(id), "genesis": genesis.as_str()});
            let ev = AuditEvent { actor: "system", event: "ledger.id_assigned", subject: "ledger".into(), details };
            audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        }
    }
    commit_write(tx, &head, OP).await?;
    tracing::info!(ledger_id = %hex::encode(id), genesis = genesis.as_str(), "ledger id created");
    Ok((id, genesis))
}

/// Cross-checks an intact chain with the tables, in the verification's snapshot: every licence has its
/// licence record (`licence.issued`, or from a site broker `licence.replicated` / `licence.unleased`) and
/// every such record its licence, and each batch's issued count equals the units its records count
/// (`per_batch`, by `flashgate_common::audit::issuance`). Names the first mismatch.
async fn reconcile(
    conn: &mut AnyConnection,
    head_seq: i64,
    mut issued: HashMap<(String, String), i64>,
    per_batch: HashMap<String, i64>,
) -> Result<(), LedgerError> {
    const OP: &str = "reconcile audit with licences";
    let broken = |seq: i64, what: String| LedgerError::AuditBroken { seq, why: AuditFault::Unreconciled(what) };
    let rows = sqlx::query("SELECT batch_id, device_id FROM licences ORDER BY issued_at, batch_id, device_id")
        .fetch_all(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
    for row in rows {
        let batch: String = row.try_get(0).map_err(LedgerError::db(OP))?;
        let device: String = row.try_get(1).map_err(LedgerError::db(OP))?;
        if issued.remove(&(batch.clone(), device.clone())).is_none() {
            return Err(broken(
                head_seq,
                format!("the licence of device {device} in batch {batch:?} has no licence.issued record"),
            ));
        }
    }
    if let Some(((batch, device), seq)) = issued.iter().min_by_key(|(_, seq)| **seq) {
        return Err(broken(
            *seq,
            format!("the licence.issued record of device {device} in batch {batch:?} has no licence"),
        ));
    }
    let rows = sqlx::query("SELECT id, issued FROM batches ORDER BY id")
        .fetch_all(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
    for row in rows {
        let id: String = row.try_get(0).map_err(LedgerError::db(OP))?;
        let count: i64 = row.try_get(1).map_err(LedgerError::db(OP))?;
        let records = per_batch.get(&id).copied().unwrap_or(0);
        if records != count {
            return Err(broken(
                head_seq,
                format!("batch {id:?} counts {count} issued licences but the chain holds {records} issue records"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_column_count_matches_the_list() {
        assert_eq!(BATCH_COLUMNS.split(',').count(), BATCH_COLUMN_COUNT);
    }

    #[test]
    fn dialect_and_redaction() {
        assert_eq!(Dialect::from_url("sqlite:///tmp/x.db").unwrap(), Dialect::Sqlite);
        assert_eq!(Dialect::from_url("postgres://u@h/db").unwrap(), Dialect::Postgres);
        let e = Dialect::from_url("mysql://u:secret@h/db").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(with_create_mode("sqlite:///a.db"), "sqlite:///a.db?mode=rwc");
        assert_eq!(multi_row_insert("V ", 2, 2), "V ($1, $2), ($3, $4)");
    }

    /// Issue 12 item 2: a ledger that cannot be opened is named (SQLite's own words are only
    /// "unable to open database file").
    #[tokio::test]
    async fn a_ledger_that_cannot_be_opened_is_named() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: SQLite cannot open it.
        let e = Ledger::open(&format!("sqlite://{}", dir.path().display())).await.err().unwrap().to_string();
        assert!(e.contains("cannot open the SQLite ledger") && e.contains(&dir.path().display().to_string()), "{e}");
        // A parent that is not a directory (a read-only /etc fails the same way, naming the file).
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let path = dir.path().join("file/ledger.db");
        let e = Ledger::open(&format!("sqlite://{}", path.display())).await.err().unwrap().to_string();
        assert!(e.contains("create the ledger file") && e.contains(&path.display().to_string()), "{e}");
    }
}
