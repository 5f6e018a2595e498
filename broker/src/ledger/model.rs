//! Plain data types exchanged with the ledger: batches, issue requests and outcomes, install reports, keys,
//! images, revocations, and station assignments and status. No database access lives here.

use std::time::{SystemTime, UNIX_EPOCH};

use super::error::{LedgerError, RefusalReason};

/// Milliseconds since the Unix epoch, the unit of every timestamp in the ledger.
pub fn now_ms() -> i64 {
    // A clock before 1970 is a misconfigured host; treat it as the epoch rather than failing issues.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Administrative state of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchState {
    /// Licences may be issued.
    Open,
    /// Temporarily no licences; may be reopened.
    Paused,
    /// Permanently closed.
    Closed,
}

impl BatchState {
    /// The value stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Paused => "paused",
            Self::Closed => "closed",
        }
    }

    /// Parses a stored `state` value.
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        match s {
            "open" => Ok(Self::Open),
            "paused" => Ok(Self::Paused),
            "closed" => Ok(Self::Closed),
            other => Err(LedgerError::Invalid {
                field: "batch state",
                value: other.to_owned(),
                why: "expected open, paused or closed",
            }),
        }
    }
}

/// The site wildcard: a batch whose allowed sites contain it accepts every site.
pub const ANY_SITE: &str = "*";

/// A new batch, as an administrator creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBatch {
    /// Batch id chosen by the administrator (unique across the ledger).
    pub id: String,
    /// 8-character ASCII product id the batch's chips must carry (e.g. `46201002`).
    pub product_id: String,
    /// Hex SHA-256 of the image (must already be stored with [`crate::ledger::Ledger::put_image`]).
    pub image_sha256: String,
    /// Maximum number of licences.
    pub quota: i64,
    /// Sites whose stations may obtain licences; [`ANY_SITE`] allows every site; empty allows none.
    pub allowed_sites: Vec<String>,
    /// Licences are refused before this time (ms since epoch), if set.
    pub not_before: Option<i64>,
    /// Licences are refused from this time on (ms since epoch), if set.
    pub not_after: Option<i64>,
}

/// A batch as stored, with its issued count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Batch id.
    pub id: String,
    /// Product id the batch's chips must carry.
    pub product_id: String,
    /// Hex SHA-256 of the image.
    pub image_sha256: String,
    /// Hex key id of the image's firmware key.
    pub key_id: String,
    /// Maximum number of licences.
    pub quota: i64,
    /// Licences issued so far (each a durable unit of quota).
    pub issued: i64,
    /// Allowed sites ([`ANY_SITE`] allows every site).
    pub allowed_sites: Vec<String>,
    /// Start of the validity window (ms since epoch).
    pub not_before: Option<i64>,
    /// End of the validity window (ms since epoch, exclusive).
    pub not_after: Option<i64>,
    /// Administrative state.
    pub state: BatchState,
    /// Creation time (ms since epoch).
    pub created_at: i64,
    /// Who created it.
    pub created_by: String,
    /// Units granted to site brokers in leases and not yet used or returned (schema v8).
    pub leased: i64,
    /// On a site broker, the batch mirrored from central: when its quota leases expire, so that new
    /// devices are refused (`LEASE_EXPIRED`) until central renews them (schema v9). `None` on a central
    /// broker.
    pub lease_expires_at: Option<i64>,
    /// On a site broker: when an operator drained the batch here (new devices go to central; unused units
    /// are handed back). `None` otherwise.
    pub drained_at: Option<i64>,
}

impl Batch {
    /// Whether a refusal for `reason` is a wait instead (see [`PrecheckRequest::lease_wait`]): at a site
    /// broker, a mirrored batch out of units or past its lease; at central, a batch out of units whose last
    /// ones are leased to site brokers.
    pub fn waits_for_units(&self, reason: RefusalReason) -> bool {
        if self.lease_expires_at.is_some() {
            matches!(reason, RefusalReason::QuotaExhausted | RefusalReason::LeaseExpired)
        } else {
            reason == RefusalReason::QuotaExhausted && self.leased > 0
        }
    }

    /// Checks everything except the quota: state, validity window at `now`, site and product.
    /// Returns the first refusal in the order state, window, product, site.
    pub fn check(&self, now: i64, site: &str, product_id: &str) -> Result<(), (RefusalReason, String)> {
        self.check_with(now, site, product_id, false)
    }

    /// [`Batch::check`] for a reissue (a device that already holds its licence asks again): the same rules,
    /// except that a paused batch still reissues, so that boards already on fixtures can finish.
    pub fn check_reissue(&self, now: i64, site: &str, product_id: &str) -> Result<(), (RefusalReason, String)> {
        self.check_with(now, site, product_id, true)
    }

    fn check_with(
        &self,
        now: i64,
        site: &str,
        product_id: &str,
        paused_ok: bool,
    ) -> Result<(), (RefusalReason, String)> {
        match self.state {
            BatchState::Open => {}
            BatchState::Paused if paused_ok => {}
            BatchState::Paused => return Err((RefusalReason::BatchPaused, format!("batch {:?} is paused", self.id))),
            BatchState::Closed => return Err((RefusalReason::BatchClosed, format!("batch {:?} is closed", self.id))),
        }
        if let Some(nb) = self.not_before
            && now < nb
        {
            return Err((
                RefusalReason::BatchNotStarted,
                format!("batch {:?} is valid from {nb} ms, now is {now} ms", self.id),
            ));
        }
        if let Some(na) = self.not_after
            && now >= na
        {
            return Err((
                RefusalReason::BatchExpired,
                format!("batch {:?} expired at {na} ms, now is {now} ms", self.id),
            ));
        }
        if !paused_ok && self.drained_at.is_some() {
            return Err((
                RefusalReason::QuotaExhausted,
                format!("this site broker is drained for batch {:?}: new devices go to central", self.id),
            ));
        }
        // Units left past the expiry: refused for the lease (none left: the quota check says so).
        if !paused_ok
            && let Some(at) = self.lease_expires_at
            && now >= at
            && self.remaining() > 0
        {
            // Reissues pass: a device that holds its licence takes no unit.
            return Err((
                RefusalReason::LeaseExpired,
                format!(
                    "this site's quota lease for batch {:?} expired at {} and could not be renewed: central \
                     has not answered since; new devices wait until it does",
                    self.id,
                    flashgate_common::pki::format_time(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(at.max(0) as u64)
                    )
                ),
            ));
        }
        if product_id != self.product_id {
            return Err((
                RefusalReason::ProductMismatch,
                format!(
                    "chip product id {product_id:?} differs from batch {:?} product id {:?}",
                    self.id, self.product_id
                ),
            ));
        }
        if !self.allowed_sites.iter().any(|s| s == ANY_SITE || s == site) {
            return Err((RefusalReason::SiteNotAllowed, format!("site {site:?} may not use batch {:?}", self.id)));
        }
        Ok(())
    }

    /// Units left (`quota - issued - leased`, never negative).
    pub fn remaining(&self) -> i64 {
        (self.quota - self.issued - self.leased).max(0)
    }

    /// The refusal detail when no unit is left.
    pub fn exhausted(&self) -> String {
        if self.lease_expires_at.is_some() && self.quota == 0 {
            format!("this site holds no quota lease for batch {:?}: central has granted it none", self.id)
        } else if self.lease_expires_at.is_some() {
            format!(
                "this site has used all {} units central leased it of batch {:?}; more when central grants them",
                self.quota, self.id
            )
        } else if self.leased == 0 {
            format!("batch {:?} has issued {} of {} licences", self.id, self.issued, self.quota)
        } else {
            format!(
                "batch {:?} has issued {} and leased {} to site brokers of {} licences",
                self.id, self.issued, self.leased, self.quota
            )
        }
    }
}

/// What the service asks before computing a licence with the HSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrecheckRequest {
    /// Batch id.
    pub batch_id: String,
    /// Chip device id (`hex(SHA-256(chip_pub))[0..32]`).
    pub device_id: String,
    /// Product id from the (verified) chip certificate.
    pub product_id: String,
    /// The requesting station's identity (audit subject).
    pub station: String,
    /// The requesting station's site.
    pub site: String,
    /// Who is asking (audit actor), usually the station identity.
    pub actor: String,
    /// A batch out of units is a wait ([`crate::ledger::LedgerError::LeaseWait`], nothing recorded), not a
    /// refusal, when units may come back: at a site broker that may still get units from central (a
    /// mirrored batch out of units or past its lease), at central when units are leased to site brokers.
    pub lease_wait: bool,
}

/// A licence returned to another station than the one it was first issued to (a board moved between
/// fixtures), to be audited once per station as `licence.reissued`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReissueRecord {
    /// Batch id.
    pub batch_id: String,
    /// Chip device id.
    pub device_id: String,
    /// The station now receiving the licence.
    pub station: String,
    /// Its site.
    pub site: String,
    /// The station the licence was first issued to.
    pub first_station: String,
    /// Audit actor.
    pub actor: String,
}

/// Result of [`crate::ledger::Ledger::precheck`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precheck {
    /// The device already holds a licence for the batch: return these bytes, consume nothing, skip the HSM.
    Existing(Vec<u8>),
    /// The batch looked open for this site and product with quota left: compute the licence and commit it.
    /// (Optimistic: [`crate::ledger::Ledger::commit_issue`] re-checks everything.)
    Proceed(Box<Batch>),
}

/// A computed licence to commit against a batch's quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRecord {
    /// Batch id.
    pub batch_id: String,
    /// Chip device id.
    pub device_id: String,
    /// Product id from the chip certificate.
    pub product_id: String,
    /// The licence bytes (132 bytes for licence v1).
    pub licence: Vec<u8>,
    /// The chip certificate (136 bytes).
    pub certificate: Vec<u8>,
    /// Station identity.
    pub station: String,
    /// Station site.
    pub site: String,
    /// Audit actor.
    pub actor: String,
    /// As [`PrecheckRequest::lease_wait`]: no unit left is a wait (nothing recorded), not a refusal, when
    /// units may come back.
    pub lease_wait: bool,
}

/// Successful result of [`crate::ledger::Ledger::commit_issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueOutcome {
    /// A new licence was committed; one unit of quota is durably consumed.
    Issued(Vec<u8>),
    /// The device already had a licence: these are its stored bytes; nothing was consumed.
    Existing(Vec<u8>),
}

impl IssueOutcome {
    /// The licence bytes to return to the station.
    pub fn licence(&self) -> &[u8] {
        match self {
            Self::Issued(l) | Self::Existing(l) => l,
        }
    }

    /// Consumes the outcome, returning the licence bytes.
    pub fn into_licence(self) -> Vec<u8> {
        match self {
            Self::Issued(l) | Self::Existing(l) => l,
        }
    }
}

/// A refusal decided outside the ledger (e.g. certificate not verified, station revoked), to be audited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalRecord {
    /// Batch id asked for (may be unknown).
    pub batch_id: String,
    /// Device id, if known.
    pub device_id: String,
    /// Station identity.
    pub station: String,
    /// Station site.
    pub site: String,
    /// Audit actor.
    pub actor: String,
    /// Why.
    pub reason: RefusalReason,
    /// Human-readable detail.
    pub detail: String,
}

/// An install result reported by a station.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// Reporting station identity.
    pub station: String,
    /// Station-chosen id of this result, unique per station (idempotency key).
    pub result_id: String,
    /// Batch id.
    pub batch_id: String,
    /// Device id.
    pub device_id: String,
    /// SFI status code (0 = installed).
    pub status_code: u16,
    /// Status in words.
    pub message: String,
    /// Flash CRC-32 reported by INSTALL, if it got that far.
    pub flash_crc: Option<u32>,
    /// Attempt number on the station (1-based).
    pub attempt: u32,
    /// Timings as a JSON object (e.g. `{"licence_ms":3,"flash_ms":12000}`).
    pub timings_json: String,
    /// Audit actor.
    pub actor: String,
}

/// Result of [`crate::ledger::Ledger::report_install`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallOutcome {
    /// First time this (station, result_id) was reported: counted.
    Recorded,
    /// Already reported: not counted again.
    Duplicate,
}

/// Counters of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchStatus {
    /// The batch.
    pub batch: Batch,
    /// Licences issued.
    pub issued: i64,
    /// Distinct devices with at least one successful install report.
    pub installed: i64,
    /// Distinct devices with failed install reports and no successful one.
    pub failed: i64,
    /// Quota units left.
    pub remaining: i64,
    /// Per site (sorted by name): licences, units leased and unused, conflicts kept from its site broker.
    pub sites: Vec<SiteUnits>,
}

/// One site's share of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SiteUnits {
    /// Site name.
    pub site: String,
    /// Licences of its stations (issued centrally or replicated from its site broker).
    pub issued: i64,
    /// Units leased to its site broker and not yet used or returned.
    pub leased: i64,
    /// Licences its site broker issued offline for devices held from another site.
    pub conflicts: i64,
}

/// A firmware key known to the HSM pool, as recorded in the ledger (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Hex of the 16-byte key id.
    pub key_id: String,
    /// Human label.
    pub label: String,
    /// Backend kind ("soft", "pkcs11").
    pub backend: String,
    /// Backend-specific locator.
    pub backend_ref: String,
}

/// An encrypted image to store, with what licensing it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    /// Hex key id of the firmware key the image is encrypted under.
    pub key_id: String,
    /// The 12-byte image nonce (profile §2: it travels with the key, every licence carries it).
    pub nonce: [u8; 12],
    /// Family name (e.g. "stm32l4").
    pub family: String,
    /// Product id (8 ASCII characters).
    pub product_id: String,
    /// Number of areas in the image.
    pub area_count: u32,
    /// CRC-32 of the whole internal flash after a successful install, when known (packed by the broker).
    pub expected_crc: Option<u32>,
}

/// Metadata of an encrypted image stored in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    /// Hex SHA-256 of the image bytes.
    pub sha256: String,
    /// Hex key id of the firmware key.
    pub key_id: String,
    /// The image nonce (all zeros for images stored before schema v2, which cannot be licensed).
    pub nonce: [u8; 12],
    /// Family name (e.g. "stm32l4").
    pub family: String,
    /// Product id.
    pub product_id: String,
    /// Size in bytes.
    pub size: i64,
    /// Number of areas.
    pub area_count: u32,
    /// CRC-32 of the flash after install, when known.
    pub expected_crc: Option<u32>,
    /// When it was stored (ms since epoch).
    pub created_at: i64,
    /// By whom.
    pub created_by: String,
}

/// A firmware key as listed by the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyListing {
    /// The record.
    pub key: KeyRecord,
    /// When it was added (ms since epoch).
    pub created_at: i64,
    /// By whom.
    pub created_by: String,
}

/// A licence of a device, as device history shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenceRow {
    /// Batch id.
    pub batch_id: String,
    /// Station identity that obtained it.
    pub station: String,
    /// Station site.
    pub site: String,
    /// When (ms since epoch).
    pub issued_at: i64,
    /// The licence bytes.
    pub licence: Vec<u8>,
}

/// An install report of a device, as device history shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRow {
    /// Batch id.
    pub batch_id: String,
    /// Reporting station identity.
    pub station: String,
    /// The station's result id.
    pub result_id: String,
    /// SFI status code (0 = installed).
    pub status_code: u16,
    /// Status in words.
    pub message: String,
    /// Flash CRC, if reported.
    pub flash_crc: Option<u32>,
    /// Attempt number.
    pub attempt: u32,
    /// When it was reported (ms since epoch).
    pub reported_at: i64,
}

/// Everything the ledger knows about one device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceHistory {
    /// Licences, oldest first.
    pub licences: Vec<LicenceRow>,
    /// Install reports, oldest first.
    pub installs: Vec<InstallRow>,
}

/// One certificate a station was seen with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StationCertSeen {
    /// Serial (lowercase hex).
    pub serial: String,
    /// First seen (ms since epoch).
    pub first_seen: i64,
    /// Last seen (ms since epoch; refreshed at most once a minute per broker).
    pub last_seen: i64,
}

/// A station as the ledger knows it: certificates seen, licences and install counts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StationSummary {
    /// Station identity URI.
    pub identity: String,
    /// Site.
    pub site: String,
    /// Certificates seen.
    pub certificates: Vec<StationCertSeen>,
    /// Licences obtained (new issues, not retries).
    pub licences: i64,
    /// Successful install reports.
    pub installs_ok: i64,
    /// Failed install reports.
    pub installs_failed: i64,
}

/// A revoked station certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Certificate serial (hex).
    pub serial: String,
    /// The identity the certificate carried.
    pub identity: String,
    /// Why it was revoked.
    pub reason: String,
    /// When (ms since epoch).
    pub revoked_at: i64,
    /// By whom.
    pub revoked_by: String,
}

/// How long after its last report a station attached to a broker still counts as online (ms).
pub const STATION_ONLINE_WINDOW_MS: i64 = 15_000;

/// What an operator decided for a station: a batch to run, or a pause. Audited when changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Station identity URI.
    pub identity: String,
    /// Batch assigned (`""` when only a pause was ever recorded).
    pub batch_id: String,
    /// Paused: the station finishes devices in flight and starts no new ones.
    pub paused: bool,
    /// Why it was paused (`""` when not paused).
    pub reason: String,
    /// Incremented by the ledger on every change; brokers push an assignment whose revision is newer than
    /// the one they last sent (independent of the brokers' clocks).
    pub revision: i64,
    /// When it last changed (ms since epoch).
    pub updated_at: i64,
    /// Who changed it (admin identity URI).
    pub updated_by: String,
}

/// A probe a station reported (stored as a JSON array in `station_status.probes`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct StationProbe {
    /// Stable probe id on the station.
    pub probe_id: String,
    /// `usb-serial`, `serial`, `tcp`, `sim`.
    pub kind: String,
    /// Port the probe is reached on.
    pub port: String,
}

/// The last report of a station attached to a broker (bookkeeping, not audited).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StationStatus {
    /// Station identity URI.
    pub identity: String,
    /// Its site.
    pub site: String,
    /// Name of the broker it is (or was last) attached to.
    pub broker: String,
    /// That broker's id of the Attach stream: only that stream may mark the station offline.
    pub session: String,
    /// The stream is open (false once it ended).
    pub attached: bool,
    /// Probes it reported.
    pub probes: Vec<StationProbe>,
    /// Batch the agent reports running (`""` idle).
    pub current_batch: String,
    /// Devices installed since the agent started.
    pub devices_ok: u64,
    /// Devices failed (refusals included) since the agent started.
    pub devices_failed: u64,
    /// A batch is running.
    pub running: bool,
    /// When it was written (ms since epoch).
    pub updated_at: i64,
}

impl StationStatus {
    /// Attached and reported within [`STATION_ONLINE_WINDOW_MS`] of `now`.
    pub fn online(&self, now: i64) -> bool {
        self.attached && now.saturating_sub(self.updated_at) <= STATION_ONLINE_WINDOW_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            id: "b".into(),
            product_id: "46201002".into(),
            image_sha256: String::new(),
            key_id: String::new(),
            quota: 2,
            issued: 0,
            allowed_sites: vec!["lyon".into()],
            not_before: Some(100),
            not_after: Some(200),
            state: BatchState::Open,
            created_at: 0,
            created_by: String::new(),
            leased: 0,
            lease_expires_at: None,
            drained_at: None,
        }
    }

    #[test]
    fn checks_in_order() {
        let b = batch();
        assert!(b.check(150, "lyon", "46201002").is_ok());
        assert_eq!(b.check(99, "lyon", "46201002").unwrap_err().0, RefusalReason::BatchNotStarted);
        assert_eq!(b.check(200, "lyon", "46201002").unwrap_err().0, RefusalReason::BatchExpired);
        assert_eq!(b.check(150, "lyon", "45002001").unwrap_err().0, RefusalReason::ProductMismatch);
        assert_eq!(b.check(150, "porto", "46201002").unwrap_err().0, RefusalReason::SiteNotAllowed);
        let mut any = b.clone();
        any.allowed_sites = vec![ANY_SITE.into()];
        assert!(any.check(150, "porto", "46201002").is_ok());
        let mut p = b.clone();
        p.state = BatchState::Paused;
        assert_eq!(p.check(150, "lyon", "46201002").unwrap_err().0, RefusalReason::BatchPaused);
        let mut site = b;
        site.lease_expires_at = Some(160);
        site.quota = 2;
        assert!(site.check(159, "lyon", "46201002").is_ok());
        let (reason, detail) = site.check(160, "lyon", "46201002").unwrap_err();
        assert_eq!(reason, RefusalReason::LeaseExpired);
        assert!(detail.contains("quota lease") && detail.contains("central"), "{detail}");
        assert!(site.check_reissue(160, "lyon", "46201002").is_ok(), "a reissue takes no unit");
    }

    #[test]
    fn online_needs_attachment_and_a_recent_report() {
        let s = StationStatus { attached: true, updated_at: 1_000, ..Default::default() };
        assert!(s.online(1_000 + STATION_ONLINE_WINDOW_MS));
        assert!(!s.online(1_001 + STATION_ONLINE_WINDOW_MS));
        assert!(!StationStatus { attached: false, ..s }.online(1_000));
    }
}
