//! `flashgate admin`: the operator's client of the broker's `AdminService` (firmware keys, images,
//! batches, device histories, stations, the audit chain, HSM pool status). Owns the argument
//! definitions, local checks of argument values before anything is sent, request building
//! (including packing firmware inputs into plaintext areas for `PackImage`), and the output: aligned
//! tables for people, or with `--json` one JSON document built by hand from the prost messages.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, anyhow, bail};
use clap::{ArgGroup, Args, Subcommand};
use flashgate_common::family::Family;
use flashgate_common::pki::{self, Identity};
use flashgate_common::{firmware, keyfile, sfi};
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::admin_service_client::AdminServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::client::{ConnectArgs, MAX_RESPONSE_BYTES, RpcResultExt};
use crate::output::{OutFile, Table, human_bytes, ms_time};

/// `flashgate admin …`
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// How to reach the broker and as whom.
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// Print the response as JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The `admin` subcommands, one or more per `AdminService` RPC.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Firmware keys held by the broker's HSMs.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Encrypted `.sfi` images stored by the broker.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Production batches: quota, image, allowed sites, validity window, state.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Licences and install reports of one device.
    Device(DeviceArgs),
    /// Quota leases held by site brokers.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Site broker ledgers replicated here: how far each is held, its lag, licences, conflicts, leased units.
    Sites,
    /// On a site broker: stop taking units of a batch and hand the unused ones back to central (its
    /// stations take new devices to central), or `--resume`.
    Drain {
        /// The batch.
        batch: String,
        /// Take units again.
        #[arg(long)]
        resume: bool,
    },
    /// Export ledger data for other tools.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Stations known to the ledger: certificates, counts, whether attached, assigned batch.
    Stations,
    /// Assign a batch to a station, pause it, or revoke its certificates.
    #[command(subcommand)]
    Station(StationCommand),
    /// The audit hash chain.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// State of the broker's HSM pool members.
    Hsm,
}

/// `flashgate admin key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Generate a new AES-128 firmware key inside the HSM.
    Generate {
        /// A label for people.
        #[arg(long)]
        label: String,
    },
    /// Import an ST-style key file (16 raw bytes) into every HSM of the pool.
    Import {
        /// A label for people.
        #[arg(long)]
        label: String,
        /// The key file (exactly 16 raw bytes, e.g. key.bin from `flashgate pack --generate-key`).
        #[arg(long, value_name = "KEY_BIN")]
        key: PathBuf,
        /// Key id to import under (32 hex digits), e.g. to match another broker; random when absent.
        #[arg(long, value_name = "HEX", value_parser = parse_key_id)]
        key_id: Option<String>,
    },
    /// List firmware keys.
    List,
}

/// `flashgate admin image …`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Store an image packed elsewhere (`flashgate pack`) under a key the broker holds.
    Upload(UploadArgs),
    /// Pack firmware inside the broker's HSM under a fresh nonce (the plaintext is not stored).
    Pack(PackArgs),
    /// List stored images.
    List,
}

/// Arguments of `flashgate admin image upload`.
#[derive(Debug, Args)]
pub struct UploadArgs {
    /// Key id the image is encrypted under (32 hex digits).
    #[arg(long, value_name = "HEX", value_parser = parse_key_id)]
    pub key_id: String,
    /// The image nonce file it was packed with (exactly 12 raw bytes).
    #[arg(long, value_name = "NONCE_BIN")]
    pub nonce: PathBuf,
    /// Target family: stm32l4, stm32h7, stm32l5 or stm32wl.
    #[arg(long)]
    pub family: Family,
    /// Product id, 8 ASCII characters (default: the family's, e.g. 46201002 for stm32l4).
    #[arg(long, value_parser = parse_product)]
    pub product: Option<String>,
    /// The `.sfi` file.
    pub file: PathBuf,
}

/// Arguments of `flashgate admin image pack`.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// Key id to pack under (32 hex digits).
    #[arg(long, value_name = "HEX", value_parser = parse_key_id)]
    pub key_id: String,
    /// Target family: stm32l4, stm32h7, stm32l5 or stm32wl.
    #[arg(long)]
    pub family: Family,
    /// Product id, 8 ASCII characters (default: the family's, e.g. 46201002 for stm32l4).
    #[arg(long, value_parser = parse_product)]
    pub product: Option<String>,
    /// Option bytes as CSV lines `id_or_name,value` (becomes the image's `C` area).
    #[arg(long, value_name = "CSV")]
    pub option_bytes: Option<PathBuf>,
    /// Split areas larger than this (bytes; `0x…`, `K`, `M` accepted).
    #[arg(long, default_value = "64K", value_parser = super::parse_size)]
    pub max_area: u32,
    /// Firmware inputs, as for `flashgate pack --firmware`: ELF, Intel HEX, or `file.bin@0xADDRESS`.
    #[arg(required_unless_present = "option_bytes", value_name = "INPUT")]
    pub inputs: Vec<String>,
}

/// `flashgate admin batch …`
#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Create a batch.
    Create(CreateBatchArgs),
    /// Open a batch: stations may obtain licences.
    Open {
        /// Batch id.
        id: String,
    },
    /// Pause a batch: licences are refused until it is opened again.
    Pause {
        /// Batch id.
        id: String,
    },
    /// Close a batch for good.
    Close {
        /// Batch id.
        id: String,
    },
    /// List batches.
    List,
    /// Issued, installed, failed and remaining counts of one batch.
    Status {
        /// Batch id.
        id: String,
    },
    /// Yield per site, station and probe: installs, failures by status, refusals by reason, first-pass
    /// yield, mean and p95 time per stage, devices per hour (flashgate-batch-report-v1 with --json).
    Report {
        /// Batch id.
        id: String,
    },
    /// Write a signed certificate of conformance of the batch and the device export it covers
    /// (DIR/BATCH.conformance.json, DIR/BATCH.devices.jsonl), checked offline by `flashgate audit verify
    /// --certificate … --devices …`.
    Certificate {
        /// Batch id.
        id: String,
        /// Directory to write both files into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// `flashgate admin lease …`
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Leases, newest first: batch, site, holder, granted, used, returned, outstanding, state, expiry.
    List {
        /// Only this batch's leases.
        #[arg(long)]
        batch: Option<String>,
    },
}

/// `flashgate admin export …`
#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Every field of every device of a batch — certificate, licence, every attempt, refusals, verdict —
    /// streamed from one snapshot (flashgate-devices-v1 JSON lines, or CSV).
    Devices(super::trace::ExportDevicesArgs),
}

/// Arguments of `flashgate admin batch create`.
#[derive(Debug, Args)]
pub struct CreateBatchArgs {
    /// Batch id.
    pub id: String,
    /// Product id, 8 ASCII characters.
    #[arg(long, value_parser = parse_product)]
    pub product: String,
    /// SHA-256 of the image (64 hex digits, from `admin image list`).
    #[arg(long, value_name = "SHA256", value_parser = parse_sha256)]
    pub image: String,
    /// How many devices may be licensed.
    #[arg(long, value_parser = super::number_at_least(1i64))]
    pub quota: i64,
    /// A site whose stations may obtain licences; repeatable; `*` allows every site.
    #[arg(long = "site", value_name = "SITE", required = true)]
    pub sites: Vec<String>,
    /// Start of validity: RFC 3339 UTC (`2027-05-01T12:00:00Z`, `2027-05-01`) or ms since the epoch.
    #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
    pub not_before: Option<i64>,
    /// End of validity, same forms as --not-before.
    #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
    pub not_after: Option<i64>,
}

/// Arguments of `flashgate admin device`.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// Device id: hex(SHA-256(chip public key))[0..32], as in licences and reports.
    #[arg(value_parser = parse_device_id)]
    pub device_id: String,
}

/// `flashgate admin station …`
#[derive(Debug, Subcommand)]
pub enum StationCommand {
    /// Revoke one certificate, or every certificate seen for a station identity.
    Revoke(RevokeArgs),
    /// Assign a batch to a station (lifts a pause); the station starts it on every probe.
    Assign {
        /// Station: its identity URI (spiffe://TD/site/SITE/station/N) or SITE/N in the admin's trust domain.
        station: String,
        /// Batch id.
        batch: String,
    },
    /// Pause a station: devices in flight finish, no new ones start until it is assigned again.
    Pause {
        /// Station: its identity URI (spiffe://TD/site/SITE/station/N) or SITE/N in the admin's trust domain.
        station: String,
        /// Why (recorded in the audit chain and shown on the station).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Arguments of `flashgate admin station revoke`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).multiple(true).args(["serial", "identity"])))]
pub struct RevokeArgs {
    /// Certificate serial (hex, any case, `:` allowed). One the ledger has never seen is refused,
    /// naming the serials it knows, unless --force is given.
    #[arg(long)]
    pub serial: Option<String>,
    /// Station identity URI (spiffe://TD/site/SITE/station/N): alone, every certificate seen for it;
    /// with --serial, the station that serial must belong to.
    #[arg(long, value_name = "URI")]
    pub identity: Option<String>,
    /// Why (recorded in the audit chain).
    #[arg(long)]
    pub reason: String,
    /// Revoke --serial although no station has connected with it yet (a certificate issued but not
    /// yet used).
    #[arg(long, requires = "serial")]
    pub force: bool,
}

/// `flashgate admin audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Write the audit export for offline verification (`flashgate audit verify`): a checkpoint of the
    /// head is signed first, then header, checkpoints, records, licences, batch counts and an end line,
    /// as JSON lines from one snapshot (flashgate-audit-export-v1, docs/protocol.md §3.2). With
    /// `--after`: only the records after that seq, one per line, as before (not verifiable offline).
    Export {
        /// Output file, written whole or not at all (default, or `-`: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only records with a sequence number greater than this, one JSON object per line.
        #[arg(long, value_name = "SEQ")]
        after: Option<i64>,
    },
    /// Walk the whole hash chain; exits 1 naming the first broken record when it does not hold.
    Verify,
    /// Sign the audit head now with the broker's HSM audit-signing key and print the checkpoint.
    Checkpoint,
    /// Write the audit-signing public keys of the broker's HSM members (the `--trust` file of
    /// `flashgate audit verify`): PEM `PUBLIC KEY` blocks, or with `--der` the DER SubjectPublicKeyInfo
    /// of a single member.
    Key {
        /// Output file, written whole or not at all (default, or `-`: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// DER instead of PEM (only when exactly one member has a key).
        #[arg(long)]
        der: bool,
    },
}

// ---------------------------------------------------------------------------------------------
// Argument values
// ---------------------------------------------------------------------------------------------

/// A key id: exactly 32 hex digits (16 bytes), returned in lowercase.
pub fn parse_key_id(s: &str) -> Result<String, String> {
    parse_hex(s, 16, "key id")
}

/// A device id: exactly 32 hex digits, returned in lowercase.
pub fn parse_device_id(s: &str) -> Result<String, String> {
    parse_hex(s, 16, "device id")
}

/// An image hash: exactly 64 hex digits (SHA-256), returned in lowercase.
pub fn parse_sha256(s: &str) -> Result<String, String> {
    parse_hex(s, 32, "SHA-256")
}

fn parse_hex(s: &str, bytes: usize, what: &str) -> Result<String, String> {
    let t = s.trim();
    if t.len() != 2 * bytes || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{what} {s:?}: expected exactly {} hex digits ({bytes} bytes)", 2 * bytes));
    }
    Ok(t.to_ascii_lowercase())
}

/// A product id: exactly 8 printable ASCII characters, e.g. `46201002`.
pub fn parse_product(s: &str) -> Result<String, String> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("product id {s:?}: expected exactly 8 printable ASCII characters, e.g. 46201002"));
    }
    Ok(s.to_string())
}

/// A point in time as milliseconds since the Unix epoch: either that number itself, or an RFC 3339
/// UTC time (`2027-05-01T12:00:00Z`, fractions and a space instead of `T` accepted) or a date
/// (`2027-05-01`, midnight UTC).
pub fn parse_time_ms(s: &str) -> Result<i64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<i64>().map_err(|e| format!("{s:?}: {e}"));
    }
    let full =
        if t.len() == 10 && t.as_bytes().get(4) == Some(&b'-') { format!("{t}T00:00:00Z") } else { t.to_string() };
    let time = humantime::parse_rfc3339_weak(&full).map_err(|e| {
        format!("{s:?} is neither milliseconds since the Unix epoch nor an RFC 3339 UTC time like 2027-05-01T12:00:00Z ({e})")
    })?;
    let since = time.duration_since(UNIX_EPOCH).map_err(|_| format!("{s:?} is before 1970"))?;
    i64::try_from(since.as_millis()).map_err(|_| format!("{s:?} is too far in the future"))
}

/// Check a validity window: when both ends are given, the end must come after the start.
pub fn check_window(not_before: Option<i64>, not_after: Option<i64>) -> Result<(), String> {
    match (not_before, not_after) {
        (Some(nb), Some(na)) if na <= nb => {
            Err(format!("--not-after {} ({na}) is not after --not-before {} ({nb})", ms_time(na), ms_time(nb)))
        }
        _ => Ok(()),
    }
}

/// A station named on the command line as its identity URI (checked: a station), or as `SITE/N`
/// expanded in `trust_domain` (`None` when the admin's trust domain is unknown: then only URIs work).
pub fn station_uri(spec: &str, trust_domain: Option<&str>) -> Result<String> {
    let t = spec.trim();
    let uri = if t.starts_with("spiffe://") {
        t.to_string()
    } else {
        let Some((site, n)) = t.split_once('/') else {
            bail!("station {spec:?}: expected spiffe://TD/site/SITE/station/N or SITE/N (e.g. berlin/1)");
        };
        let Some(td) = trust_domain else {
            bail!("station {spec:?}: the trust domain is unknown; give the full spiffe:// URI");
        };
        format!("spiffe://{td}/site/{site}/station/{n}")
    };
    match Identity::parse_uri(&uri).with_context(|| format!("station {spec:?}"))? {
        id @ Identity::Station { .. } => Ok(id.to_uri()),
        other => bail!("station {spec:?}: {} is a {} identity, not a station", other.to_uri(), other.role()),
    }
}

/// The trust domain of the admin identity the connection flags name: from the CA of `--pki`, or
/// from the `--cert` certificate's URI. `None` when neither is given (the connection fails anyway).
fn admin_trust_domain(conn: &ConnectArgs) -> Result<Option<String>> {
    if let Some(dir) = &conn.pki {
        let td =
            pki::ca_trust_domain(dir).with_context(|| format!("reading the trust domain of PKI {}", dir.display()))?;
        return Ok(Some(td));
    }
    if let Some(cert) = &conn.cert {
        let info = pki::read_cert_info(cert).with_context(|| format!("reading the identity of {}", cert.display()))?;
        return Ok(Some(info.identity.trust_domain().to_string()));
    }
    Ok(None)
}

/// Lowercase short name of a batch state: `open`, `paused`, `closed`, `unspecified`, or the number.
pub fn state_name(state: i32) -> String {
    match pb::BatchState::try_from(state) {
        Ok(pb::BatchState::Open) => "open".into(),
        Ok(pb::BatchState::Paused) => "paused".into(),
        Ok(pb::BatchState::Closed) => "closed".into(),
        Ok(pb::BatchState::Unspecified) => "unspecified".into(),
        Err(_) => format!("state {state}"),
    }
}

fn opt_ms(ms: Option<i64>) -> String {
    ms.map(ms_time).unwrap_or_else(|| "-".into())
}

fn product_or_default(product: Option<String>, family: Family) -> String {
    product.unwrap_or_else(|| family.profile().product_id_str().to_string())
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// Run `flashgate admin …`.
pub async fn run(args: AdminArgs) -> Result<()> {
    // Check local inputs before connecting, so a typo costs no handshake.
    let prepared = prepare(&args.command, &args.conn)?;
    let channel = args.conn.channel().await?;
    let mut client = AdminServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
    let json = args.json;
    match args.command {
        AdminCommand::Key(cmd) => key(&mut client, cmd, prepared, json).await,
        AdminCommand::Image(cmd) => image(&mut client, cmd, prepared, json).await,
        AdminCommand::Batch(cmd) => batch(&mut client, cmd, json).await,
        AdminCommand::Device(a) => device(&mut client, &a.device_id, json).await,
        AdminCommand::Lease(LeaseCommand::List { batch }) => leases(&mut client, batch, json).await,
        AdminCommand::Sites => sites(&mut client, json).await,
        AdminCommand::Drain { batch, resume } => {
            let r = client
                .drain_site(pb::DrainSiteRequest { batch_id: batch.clone(), resume })
                .await
                .rpc(&format!("draining batch {batch:?}"))?;
            if json {
                println!("{}", json!({"batch_id": r.batch_id, "drained": r.drained, "units_left": r.units_left}));
            } else if r.drained {
                println!(
                    "batch {} drained here: {} unused units go back to central at the next sync; new devices go to central",
                    r.batch_id, r.units_left
                );
            } else {
                println!("batch {} resumed here: the site takes units from central again", r.batch_id);
            }
            Ok(())
        }
        AdminCommand::Export(ExportCommand::Devices(a)) => super::trace::export_devices(&mut client, a).await,
        AdminCommand::Stations => stations(&mut client, json).await,
        AdminCommand::Station(StationCommand::Revoke(a)) => revoke(&mut client, a, json).await,
        AdminCommand::Station(cmd) => station(&mut client, cmd, prepared, json).await,
        AdminCommand::Audit(AuditCommand::Export { out, after: Some(after) }) => {
            audit_export(&mut client, out, after).await
        }
        AdminCommand::Audit(AuditCommand::Export { out, after: None }) => audit_bundle(&mut client, out).await,
        AdminCommand::Audit(AuditCommand::Verify) => audit_verify(&mut client, json).await,
        AdminCommand::Audit(AuditCommand::Checkpoint) => audit_checkpoint(&mut client, json).await,
        AdminCommand::Audit(AuditCommand::Key { out, der }) => audit_key(&mut client, out, der).await,
        AdminCommand::Hsm => hsm(&mut client, json).await,
    }
}

/// Local work done before connecting: files read, firmware parsed.
enum Prepared {
    None,
    /// The firmware key of `key import` (zeroized on drop).
    Key(sfi::FirmwareKey),
    /// The nonce and the image bytes of `image upload`.
    Upload {
        nonce: sfi::ImageNonce,
        sfi: Vec<u8>,
    },
    /// The areas of `image pack`.
    Pack(Vec<sfi::PlainArea>),
    /// The station URI of `station assign` / `station pause`.
    Station(String),
}

fn prepare(command: &AdminCommand, conn: &ConnectArgs) -> Result<Prepared> {
    Ok(match command {
        AdminCommand::Station(StationCommand::Assign { station, .. } | StationCommand::Pause { station, .. }) => {
            let td = if station.trim().starts_with("spiffe://") { None } else { admin_trust_domain(conn)? };
            Prepared::Station(station_uri(station, td.as_deref())?)
        }
        AdminCommand::Key(KeyCommand::Import { key, .. }) => Prepared::Key(read_key(key)?),
        AdminCommand::Image(ImageCommand::Upload(a)) => {
            let nonce = keyfile::read_nonce_file(&a.nonce)?;
            let sfi = std::fs::read(&a.file).with_context(|| format!("reading image {}", a.file.display()))?;
            Prepared::Upload { nonce, sfi }
        }
        AdminCommand::Image(ImageCommand::Pack(a)) => Prepared::Pack(pack_areas(a)?),
        AdminCommand::Batch(BatchCommand::Create(a)) => {
            check_window(a.not_before, a.not_after).map_err(|e| anyhow!(e))?;
            Prepared::None
        }
        _ => Prepared::None,
    })
}

/// Read a 16-byte firmware key file; any other size is refused naming the file and its size.
fn read_key(path: &Path) -> Result<sfi::FirmwareKey> {
    keyfile::read_key_file(path).context("reading the firmware key")
}

/// Parse the firmware inputs exactly as `flashgate pack` does and lay them out for the family.
fn pack_areas(a: &PackArgs) -> Result<Vec<sfi::PlainArea>> {
    let profile = a.family.profile();
    if a.max_area == 0 || a.max_area > sfi::MAX_AREA_SIZE {
        bail!("--max-area {} must be between 1 and {} bytes", a.max_area, sfi::MAX_AREA_SIZE);
    }
    let mut segments = Vec::new();
    for spec in &a.inputs {
        segments.extend(firmware::load_input(spec).with_context(|| format!("reading firmware {spec}"))?);
    }
    let mut areas = firmware::layout(segments, profile, a.max_area)?;
    if let Some(csv) = &a.option_bytes {
        let text = std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
        areas.push(
            firmware::parse_option_bytes_csv(&text, profile)
                .with_context(|| format!("option bytes {}", csv.display()))?,
        );
    }
    if areas.is_empty() {
        bail!("the inputs {:?} hold no bytes to pack", a.inputs);
    }
    Ok(areas)
}

/// The wire form of a plaintext area: kind `F`, `C`, … as a one-letter string.
pub fn plain_area(area: sfi::PlainArea) -> pb::PlainArea {
    pb::PlainArea { kind: char::from(area.area_type.as_byte()).to_string(), address: area.address, data: area.data }
}

type Client = AdminServiceClient<Channel>;

async fn key(client: &mut Client, cmd: KeyCommand, prepared: Prepared, json: bool) -> Result<()> {
    match cmd {
        KeyCommand::Generate { label } => {
            let k = client
                .generate_key(pb::GenerateKeyRequest { label: label.clone() })
                .await
                .rpc(&format!("generating key {label:?}"))?;
            if json {
                println!("{}", key_json(&k));
            } else {
                print_keys(std::slice::from_ref(&k), false);
            }
        }
        KeyCommand::Import { label, key, key_id } => {
            let Prepared::Key(firmware_key) = prepared else {
                bail!("internal: key file {} was not read", key.display());
            };
            let request = pb::ImportKeyRequest {
                label: label.clone(),
                key: firmware_key.as_bytes().to_vec(),
                key_id: key_id.unwrap_or_default(),
            };
            let k = client.import_key(request).await.rpc(&format!("importing key {} as {label:?}", key.display()))?;
            if json {
                println!("{}", key_json(&k));
            } else {
                print_keys(std::slice::from_ref(&k), false);
            }
        }
        KeyCommand::List => {
            let r = client.list_keys(pb::ListKeysRequest {}).await.rpc("listing keys")?;
            print_keys(&r.keys, json);
        }
    }
    Ok(())
}

async fn image(client: &mut Client, cmd: ImageCommand, prepared: Prepared, json: bool) -> Result<()> {
    match cmd {
        ImageCommand::Upload(a) => {
            let Prepared::Upload { nonce, sfi } = prepared else {
                bail!("internal: image {} was not read", a.file.display());
            };
            let request = pb::UploadImageRequest {
                key_id: a.key_id,
                nonce: nonce.as_bytes().to_vec(),
                family: a.family.name().to_string(),
                product_id: product_or_default(a.product, a.family),
                sfi,
            };
            let i = client.upload_image(request).await.rpc(&format!("uploading image {}", a.file.display()))?;
            if json {
                println!("{}", image_json(&i));
            } else {
                print_images(std::slice::from_ref(&i), false);
            }
        }
        ImageCommand::Pack(a) => {
            let Prepared::Pack(areas) = prepared else {
                bail!("internal: firmware {:?} was not parsed", a.inputs);
            };
            let count = areas.len();
            let request = pb::PackImageRequest {
                key_id: a.key_id.clone(),
                family: a.family.name().to_string(),
                product_id: product_or_default(a.product, a.family),
                areas: areas.into_iter().map(plain_area).collect(),
            };
            let i = client
                .pack_image(request)
                .await
                .rpc(&format!("packing {count} areas under key {} for {}", a.key_id, a.family))?;
            if json {
                println!("{}", image_json(&i));
            } else {
                print_images(std::slice::from_ref(&i), false);
            }
        }
        ImageCommand::List => {
            let r = client.list_images(pb::ListImagesRequest {}).await.rpc("listing images")?;
            print_images(&r.images, json);
        }
    }
    Ok(())
}

/// Print the broker's warnings about a request it accepted, one `warning:` line each on stderr
/// (with `--json` they are in the document instead).
fn print_warnings(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// `value` with a `warnings` array added (empty when the broker had none).
fn with_warnings(mut value: Value, warnings: &[String]) -> Value {
    if let Value::Object(map) = &mut value {
        map.insert("warnings".into(), json!(warnings));
    }
    value
}

async fn batch(client: &mut Client, cmd: BatchCommand, json: bool) -> Result<()> {
    let set_state = |id: String, state: pb::BatchState| pb::SetBatchStateRequest { id, state: state as i32 };
    let created = matches!(cmd, BatchCommand::Create(_));
    let info = match cmd {
        BatchCommand::Create(a) => {
            let request = pb::CreateBatchRequest {
                id: a.id.clone(),
                product_id: a.product,
                image_sha256: a.image,
                quota: a.quota,
                allowed_sites: a.sites,
                not_before_ms: a.not_before,
                not_after_ms: a.not_after,
            };
            client.create_batch(request).await.rpc(&format!("creating batch {}", a.id))?
        }
        BatchCommand::Open { id } => client
            .set_batch_state(set_state(id.clone(), pb::BatchState::Open))
            .await
            .rpc(&format!("opening batch {id}"))?,
        BatchCommand::Pause { id } => client
            .set_batch_state(set_state(id.clone(), pb::BatchState::Paused))
            .await
            .rpc(&format!("pausing batch {id}"))?,
        BatchCommand::Close { id } => client
            .set_batch_state(set_state(id.clone(), pb::BatchState::Closed))
            .await
            .rpc(&format!("closing batch {id}"))?,
        BatchCommand::List => {
            let r = client.list_batches(pb::ListBatchesRequest {}).await.rpc("listing batches")?;
            print_batches(&r.batches, json);
            return Ok(());
        }
        BatchCommand::Report { id } => return super::trace::report(client, &id, json).await,
        BatchCommand::Certificate { id, out } => return super::trace::certificate(client, &id, &out, json).await,
        BatchCommand::Status { id } => client
            .batch_status(pb::BatchStatusRequest { id: id.clone() })
            .await
            .rpc(&format!("status of batch {id}"))?,
    };
    if json && created {
        println!("{}", with_warnings(batch_json(&info), &info.warnings));
    } else if json {
        println!("{}", batch_json(&info));
    } else {
        print!("{}", batch_detail(&info));
        print_warnings(&info.warnings);
    }
    Ok(())
}

async fn device(client: &mut Client, device_id: &str, json: bool) -> Result<()> {
    let r = client
        .device_history(pb::DeviceHistoryRequest { device_id: device_id.to_string() })
        .await
        .rpc(&format!("history of device {device_id}"))?;
    if json {
        println!("{}", super::trace::device_json(&r)?);
    } else {
        print!("{}", super::trace::device_text(&r)?);
    }
    Ok(())
}

async fn leases(client: &mut Client, batch: Option<String>, json: bool) -> Result<()> {
    let r = client
        .list_leases(pb::ListLeasesRequest { batch_id: batch.unwrap_or_default() })
        .await
        .rpc("listing leases")?;
    if json {
        let rows: Vec<Value> = r
            .leases
            .iter()
            .map(|l| {
                json!({
                    "id": l.id, "batch_id": l.batch_id, "site": l.site, "holder": l.holder,
                    "granted": l.granted, "used": l.used, "returned": l.returned, "outstanding": l.outstanding,
                    "state": l.state, "granted_at_ms": l.granted_at_ms, "expires_at_ms": l.expires_at_ms,
                    "settled_at_ms": l.settled_at_ms,
                })
            })
            .collect();
        println!("{}", Value::Array(rows));
        return Ok(());
    }
    let mut t = Table::new([
        "lease",
        "batch",
        "site",
        "holder",
        "granted",
        "used",
        "returned",
        "outstanding",
        "state",
        "expires",
    ])
    .right(&[4, 5, 6, 7]);
    for l in &r.leases {
        t.row([
            l.id[..l.id.len().min(8)].to_string(),
            l.batch_id.clone(),
            l.site.clone(),
            l.holder.clone(),
            l.granted.to_string(),
            l.used.to_string(),
            l.returned.to_string(),
            l.outstanding.to_string(),
            l.state.clone(),
            ms_time(l.expires_at_ms),
        ]);
    }
    print!("{t}");
    if r.leases.is_empty() {
        println!("no leases (site brokers have none, or none asked yet)");
    }
    Ok(())
}

async fn sites(client: &mut Client, json: bool) -> Result<()> {
    let r = client.list_sites(pb::ListSitesRequest {}).await.rpc("listing site brokers")?;
    if json {
        let rows: Vec<Value> = r
            .sites
            .iter()
            .map(|s| {
                json!({
                    "site": s.site, "holder": s.holder, "site_ledger_id": s.site_ledger_id,
                    "acked_seq": s.acked_seq, "site_head_seq": s.site_head_seq, "lag_records": s.lag_records,
                    "lag_ms": s.lag_ms, "last_record_at_ms": s.last_record_at_ms, "licences": s.licences,
                    "conflicts": s.conflicts, "outstanding_units": s.outstanding_units,
                    "updated_at_ms": s.updated_at_ms,
                })
            })
            .collect();
        println!("{}", Value::Array(rows));
        return Ok(());
    }
    let mut t = Table::new([
        "site",
        "holder",
        "ledger",
        "held",
        "head",
        "lag",
        "lag (s)",
        "licences",
        "conflicts",
        "leased",
        "updated",
    ])
    .right(&[3, 4, 5, 6, 7, 8, 9]);
    for s in &r.sites {
        t.row([
            s.site.clone(),
            s.holder.clone(),
            s.site_ledger_id[..s.site_ledger_id.len().min(8)].to_string(),
            s.acked_seq.to_string(),
            s.site_head_seq.to_string(),
            s.lag_records.to_string(),
            format!("{:.1}", s.lag_ms as f64 / 1000.0),
            s.licences.to_string(),
            s.conflicts.to_string(),
            s.outstanding_units.to_string(),
            ms_time(s.updated_at_ms),
        ]);
    }
    print!("{t}");
    if r.sites.is_empty() {
        println!("no site ledgers (no site broker has synced or replicated here yet)");
    }
    Ok(())
}

async fn stations(client: &mut Client, json: bool) -> Result<()> {
    let r = client.list_stations(pb::ListStationsRequest {}).await.rpc("listing stations")?;
    if json {
        println!("{}", Value::Array(r.stations.iter().map(station_json).collect()));
        return Ok(());
    }
    print!("{}", stations_table(&r.stations));
    Ok(())
}

/// `station assign` / `station pause`: the station as the broker now lists it.
async fn station(client: &mut Client, cmd: StationCommand, prepared: Prepared, json: bool) -> Result<()> {
    let Prepared::Station(uri) = prepared else {
        bail!("internal: the station of {cmd:?} was not resolved");
    };
    let info = match cmd {
        StationCommand::Assign { batch, .. } => client
            .assign_station(pb::AssignStationRequest { station: uri.clone(), batch_id: batch.clone() })
            .await
            .rpc(&format!("assigning batch {batch} to {uri}"))?,
        StationCommand::Pause { reason, .. } => client
            .pause_station(pb::PauseStationRequest { station: uri.clone(), reason })
            .await
            .rpc(&format!("pausing {uri}"))?,
        StationCommand::Revoke(_) => bail!("internal: revoke is not an assignment"),
    };
    if json {
        println!("{}", with_warnings(station_json(&info), &info.warnings));
    } else {
        print!("{}", station_detail(&info));
        print_warnings(&info.warnings);
    }
    Ok(())
}

async fn revoke(client: &mut Client, a: RevokeArgs, json: bool) -> Result<()> {
    let target = match (&a.serial, &a.identity) {
        (Some(s), Some(i)) => format!("serial {s} of {i}"),
        (Some(s), None) => format!("serial {s}"),
        (None, Some(i)) => format!("identity {i}"),
        (None, None) => bail!("give --serial or --identity"),
    };
    let r = client
        .revoke_station(pb::RevokeStationRequest {
            serial: a.serial.unwrap_or_default(),
            identity: a.identity.unwrap_or_default(),
            reason: a.reason,
            force: a.force,
        })
        .await
        .rpc(&format!("revoking {target}"))?;
    if json {
        println!("{}", json!({ "serials": r.serials, "warnings": r.warnings }));
        return Ok(());
    }
    print_warnings(&r.warnings);
    if r.serials.is_empty() {
        println!("no certificate revoked for {target} (none seen by the ledger)");
    } else {
        println!("revoked {} certificate(s) for {target}:", r.serials.len());
        for s in &r.serials {
            println!("  {s}");
        }
    }
    Ok(())
}

async fn audit_export(client: &mut Client, out: Option<PathBuf>, after: i64) -> Result<()> {
    let mut stream =
        client.export_audit(pb::ExportAuditRequest { after_seq: after }).await.rpc("exporting the audit log")?;
    let mut writer = match &out {
        Some(path) => OutFile::create(path, flashgate_common::atomic_file::PUBLIC_MODE)?,
        None => OutFile::stdout(),
    };
    let target = writer.name().to_string();
    let (mut count, mut first, mut last) = (0u64, None, None);
    loop {
        let record = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(s) => {
                let _ = writer.flush();
                bail!(
                    "exporting the audit log: stream broke after {count} records (last seq {}): {}",
                    last.map(|s: i64| s.to_string()).unwrap_or_else(|| "-".into()),
                    super::client::status_text(&s)
                );
            }
        };
        first.get_or_insert(record.seq);
        last = Some(record.seq);
        writeln!(writer, "{}", audit_json(&record)).with_context(|| format!("writing to {target}"))?;
        count += 1;
    }
    writer.commit()?;
    match (first, last) {
        (Some(a), Some(b)) => eprintln!("exported {count} audit records (seq {a} to {b}) to {target}"),
        _ => eprintln!("no audit records after seq {after}"),
    }
    Ok(())
}

async fn audit_bundle(client: &mut Client, out: Option<PathBuf>) -> Result<()> {
    let mut stream = client
        .export_audit_bundle(pb::ExportAuditBundleRequest {})
        .await
        .rpc("exporting the audit (records, checkpoints, licences, batches)")?;
    let mut writer = match &out {
        Some(path) => OutFile::create(path, flashgate_common::atomic_file::PUBLIC_MODE)?,
        None => OutFile::stdout(),
    };
    let target = writer.name().to_string();
    let mut bytes = 0u64;
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                writer.write_all(&chunk.data).with_context(|| format!("writing to {target}"))?;
                bytes += chunk.data.len() as u64;
            }
            Ok(None) => break,
            Err(s) => {
                // A file is not committed: a cut export never replaces a whole one.
                bail!("exporting the audit: stream broke after {bytes} bytes: {}", super::client::status_text(&s));
            }
        }
    }
    writer.commit()?;
    eprintln!("audit export ({bytes} bytes, flashgate-audit-export-v1) written to {target}");
    Ok(())
}

async fn audit_checkpoint(client: &mut Client, json: bool) -> Result<()> {
    let r = client.checkpoint_audit(pb::CheckpointAuditRequest {}).await.rpc("signing an audit checkpoint")?;
    if json {
        println!(
            "{}",
            json!({
                "checkpoint": hex::encode(&r.checkpoint),
                "seq": r.seq,
                "hash": r.hash,
                "at": r.at,
                "broker": r.broker,
                "ledger_id": r.ledger_id,
            })
        );
    } else {
        println!(
            "checkpoint of ledger {} signed by {} at {}: head seq {} hash {}",
            r.ledger_id, r.broker, r.at, r.seq, r.hash
        );
        println!("{}", hex::encode(&r.checkpoint));
    }
    Ok(())
}

async fn audit_key(client: &mut Client, out: Option<PathBuf>, der: bool) -> Result<()> {
    use p256::pkcs8::{DecodePublicKey as _, EncodePublicKey as _, LineEnding};
    let r = client.hsm_status(pb::HsmStatusRequest {}).await.rpc("reading the HSM members' audit keys")?;
    let keys: Vec<&pb::HsmMember> = r.members.iter().filter(|m| !m.audit_key_spki.is_empty()).collect();
    if keys.is_empty() {
        bail!("no HSM member of broker {} has an audit-signing key", r.broker);
    }
    let mut writer = match &out {
        Some(path) => OutFile::create(path, flashgate_common::atomic_file::PUBLIC_MODE)?,
        None => OutFile::stdout(),
    };
    let target = writer.name().to_string();
    if der {
        if keys.len() != 1 {
            bail!("--der writes one key, but {} members have one; use PEM (several blocks in one file)", keys.len());
        }
        writer.write_all(&keys[0].audit_key_spki).with_context(|| format!("writing to {target}"))?;
    } else {
        for m in &keys {
            let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&m.audit_key_spki)
                .map_err(|e| anyhow::anyhow!("member {}: the broker sent an unusable audit key: {e}", m.name))?;
            let pem = vk.to_public_key_pem(LineEnding::LF).map_err(|e| anyhow::anyhow!("PEM encoding: {e}"))?;
            writeln!(
                writer,
                "# audit-signing key of HSM member {} of broker {} (SHA-256 {})",
                m.name, r.broker, m.audit_key_fingerprint
            )
            .with_context(|| format!("writing to {target}"))?;
            writer.write_all(pem.as_bytes()).with_context(|| format!("writing to {target}"))?;
        }
    }
    writer.commit()?;
    if !writer_is_stdout(&out) {
        eprintln!("{} audit key(s) of broker {} written to {target}", keys.len(), r.broker);
    }
    Ok(())
}

fn writer_is_stdout(out: &Option<PathBuf>) -> bool {
    out.as_deref().is_none_or(|p| p.as_os_str() == "-")
}

async fn audit_verify(client: &mut Client, json: bool) -> Result<()> {
    let r = client.verify_audit(pb::VerifyAuditRequest {}).await.rpc("verifying the audit chain")?;
    if json {
        println!("{}", verify_json(&r));
    } else if r.ok {
        println!("audit chain ok: {} records, head seq {} hash {}", r.records, r.head_seq, r.head_hash);
        match r.genesis.as_str() {
            "legacy" => println!(
                "ledger id {} (legacy: the chain predates ledger ids and starts from zeros; its first record binds nothing)",
                r.ledger_id
            ),
            _ => println!("ledger id {} (bound by the first record's genesis hash)", r.ledger_id),
        }
    }
    if !r.ok {
        bail!(
            "audit chain broken at seq {}: {} ({} records checked, head seq {})",
            r.broken_seq,
            r.fault,
            r.records,
            r.head_seq
        );
    }
    Ok(())
}

async fn hsm(client: &mut Client, json: bool) -> Result<()> {
    let r = client.hsm_status(pb::HsmStatusRequest {}).await.rpc("reading HSM pool status")?;
    if json {
        println!("{}", hsm_json(&r));
        return Ok(());
    }
    println!("broker {}", r.broker);
    print!("{}", hsm_table(&r.members));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

fn print_keys(keys: &[pb::KeyInfo], json: bool) {
    if json {
        println!("{}", Value::Array(keys.iter().map(key_json).collect()));
        return;
    }
    let mut t = Table::new(["key id", "label", "backend", "created", "by"]);
    for k in keys {
        t.row([k.key_id.clone(), k.label.clone(), k.backend.clone(), ms_time(k.created_at_ms), k.created_by.clone()]);
    }
    print!("{t}");
}

fn print_images(images: &[pb::ImageSummary], json: bool) {
    if json {
        println!("{}", Value::Array(images.iter().map(image_json).collect()));
        return;
    }
    print!("{}", images_table(images));
}

fn images_table(images: &[pb::ImageSummary]) -> Table {
    let mut t = Table::new(["sha256", "key id", "family", "product", "size", "areas", "flash crc", "created", "by"])
        .right(&[4, 5]);
    for i in images {
        t.row([
            i.sha256.clone(),
            i.key_id.clone(),
            i.family.clone(),
            i.product_id.clone(),
            human_bytes(i.size),
            i.area_count.to_string(),
            i.expected_flash_crc.map(|c| format!("0x{c:08X}")).unwrap_or_else(|| "-".into()),
            ms_time(i.created_at_ms),
            i.created_by.clone(),
        ]);
    }
    t
}

fn print_batches(batches: &[pb::BatchInfo], json: bool) {
    if json {
        println!("{}", Value::Array(batches.iter().map(batch_json).collect()));
        return;
    }
    let mut t = Table::new([
        "batch",
        "state",
        "product",
        "quota",
        "issued",
        "installed",
        "failed",
        "remaining",
        "sites",
        "image",
    ])
    .right(&[3, 4, 5, 6, 7]);
    for b in batches {
        t.row([
            b.id.clone(),
            state_name(b.state),
            b.product_id.clone(),
            b.quota.to_string(),
            b.issued.to_string(),
            b.installed.to_string(),
            b.failed.to_string(),
            b.remaining.to_string(),
            b.allowed_sites.join(","),
            short_hash(&b.image_sha256),
        ]);
    }
    print!("{t}");
}

/// One batch as `field  value` lines.
fn batch_detail(b: &pb::BatchInfo) -> Table {
    let mut t = Table::new(["batch", b.id.as_str()]);
    let rows: [(&str, String); 14] = [
        ("state", state_name(b.state)),
        ("product", b.product_id.clone()),
        ("image", b.image_sha256.clone()),
        ("key id", b.key_id.clone()),
        ("quota", b.quota.to_string()),
        ("issued", b.issued.to_string()),
        ("installed", b.installed.to_string()),
        ("failed", b.failed.to_string()),
        ("remaining", b.remaining.to_string()),
        ("sites", b.allowed_sites.join(", ")),
        ("not before", opt_ms(b.not_before_ms)),
        ("not after", opt_ms(b.not_after_ms)),
        ("created", ms_time(b.created_at_ms)),
        ("created by", b.created_by.clone()),
    ];
    for (k, v) in rows {
        t.row([k.to_string(), v]);
    }
    if b.leased > 0 {
        t.row(["leased to site brokers".to_string(), b.leased.to_string()]);
    }
    for s in &b.sites {
        let mut v = format!("{} issued", s.issued);
        if s.leased > 0 {
            v.push_str(&format!(", {} leased unused", s.leased));
        }
        if s.conflicts > 0 {
            v.push_str(&format!(", {} conflicts", s.conflicts));
        }
        t.row([format!("site {}", s.site), v]);
    }
    t
}

/// What a station was told to do: `BATCH`, `BATCH (paused)`, `paused` or `-`.
fn assignment_text(s: &pb::StationInfo) -> String {
    match (s.assigned_batch.is_empty(), s.paused) {
        (true, false) => "-".into(),
        (true, true) => "paused".into(),
        (false, false) => s.assigned_batch.clone(),
        (false, true) => format!("{} (paused)", s.assigned_batch),
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

fn stations_table(stations: &[pb::StationInfo]) -> Table {
    let mut t = Table::new([
        "identity",
        "site",
        "online",
        "broker",
        "probes",
        "assigned",
        "running",
        "ok/failed",
        "licences",
        "installs ok",
        "failed",
        "last seen",
        "certificates",
    ])
    .right(&[4, 7, 8, 9, 10]);
    for s in stations {
        let certs: Vec<String> = s
            .certificates
            .iter()
            .map(|c| if c.revoked { format!("{} (revoked: {})", c.serial, c.revoked_reason) } else { c.serial.clone() })
            .collect();
        t.row([
            s.identity.clone(),
            s.site.clone(),
            if s.online { "yes" } else { "no" }.to_string(),
            or_dash(&s.broker),
            s.probes.len().to_string(),
            assignment_text(s),
            or_dash(&s.current_batch),
            format!("{}/{}", s.devices_ok, s.devices_failed),
            s.licences.to_string(),
            s.installs_ok.to_string(),
            s.installs_failed.to_string(),
            if s.last_seen_ms > 0 { ms_time(s.last_seen_ms) } else { "-".into() },
            if certs.is_empty() { "-".into() } else { certs.join(", ") },
        ]);
    }
    t
}

/// One station as `field  value` lines.
fn station_detail(s: &pb::StationInfo) -> Table {
    let mut t = Table::new(["station", s.identity.as_str()]);
    let probes: Vec<String> = s.probes.iter().map(|p| format!("{} ({} {})", p.probe_id, p.kind, p.port)).collect();
    let rows: [(&str, String); 9] = [
        ("site", s.site.clone()),
        ("assigned", assignment_text(s)),
        ("online", if s.online { "yes" } else { "no" }.to_string()),
        ("broker", or_dash(&s.broker)),
        ("probes", if probes.is_empty() { "-".into() } else { probes.join(", ") }),
        ("running", or_dash(&s.current_batch)),
        ("devices ok", s.devices_ok.to_string()),
        ("devices failed", s.devices_failed.to_string()),
        ("licences", s.licences.to_string()),
    ];
    for (k, v) in rows {
        t.row([k.to_string(), v]);
    }
    t
}

fn hsm_table(members: &[pb::HsmMember]) -> Table {
    let mut t = Table::new([
        "member",
        "healthy",
        "in flight",
        "requests",
        "device errors",
        "failures",
        "mean ms",
        "max ms",
        "audit key",
        "last error",
    ])
    .right(&[2, 3, 4, 5, 6, 7]);
    for m in members {
        t.row([
            m.name.clone(),
            if m.healthy { "yes" } else { "NO" }.to_string(),
            format!("{}/{}", m.in_flight, m.capacity),
            m.requests.to_string(),
            m.device_errors.to_string(),
            m.consecutive_failures.to_string(),
            format!("{:.2}", m.latency_mean_ms),
            format!("{:.2}", m.latency_max_ms),
            if m.audit_key_fingerprint.is_empty() {
                "-".to_string()
            } else {
                format!("sha256:{}", &m.audit_key_fingerprint[..m.audit_key_fingerprint.len().min(16)])
            },
            if m.last_error.is_empty() { "-".to_string() } else { m.last_error.clone() },
        ]);
    }
    t
}

fn short_hash(h: &str) -> String {
    if h.len() > 16 { format!("{}…", &h[..16]) } else { h.to_string() }
}

// ---------------------------------------------------------------------------------------------
// JSON (prost messages do not derive Serialize)
// ---------------------------------------------------------------------------------------------

fn key_json(k: &pb::KeyInfo) -> Value {
    json!({
        "key_id": k.key_id,
        "label": k.label,
        "backend": k.backend,
        "created_at_ms": k.created_at_ms,
        "created_by": k.created_by,
    })
}

fn image_json(i: &pb::ImageSummary) -> Value {
    json!({
        "sha256": i.sha256,
        "key_id": i.key_id,
        "family": i.family,
        "product_id": i.product_id,
        "size": i.size,
        "area_count": i.area_count,
        "expected_flash_crc": i.expected_flash_crc,
        "created_at_ms": i.created_at_ms,
        "created_by": i.created_by,
    })
}

fn batch_json(b: &pb::BatchInfo) -> Value {
    json!({
        "id": b.id,
        "product_id": b.product_id,
        "image_sha256": b.image_sha256,
        "key_id": b.key_id,
        "quota": b.quota,
        "issued": b.issued,
        "installed": b.installed,
        "failed": b.failed,
        "remaining": b.remaining,
        "leased": b.leased,
        "sites": b.sites.iter().map(|s| json!({
            "site": s.site, "issued": s.issued, "leased": s.leased, "conflicts": s.conflicts,
        })).collect::<Vec<_>>(),
        "allowed_sites": b.allowed_sites,
        "not_before_ms": b.not_before_ms,
        "not_after_ms": b.not_after_ms,
        "state": state_name(b.state),
        "created_at_ms": b.created_at_ms,
        "created_by": b.created_by,
    })
}

fn station_json(s: &pb::StationInfo) -> Value {
    let certs: Vec<Value> = s
        .certificates
        .iter()
        .map(|c| {
            json!({
                "serial": c.serial,
                "first_seen_ms": c.first_seen_ms,
                "last_seen_ms": c.last_seen_ms,
                "revoked": c.revoked,
                "revoked_reason": c.revoked_reason,
            })
        })
        .collect();
    let probes: Vec<Value> =
        s.probes.iter().map(|p| json!({ "probe_id": p.probe_id, "kind": p.kind, "port": p.port })).collect();
    json!({
        "identity": s.identity,
        "site": s.site,
        "certificates": certs,
        "licences": s.licences,
        "installs_ok": s.installs_ok,
        "installs_failed": s.installs_failed,
        "last_seen_ms": s.last_seen_ms,
        "online": s.online,
        "broker": s.broker,
        "probes": probes,
        "assigned_batch": s.assigned_batch,
        "paused": s.paused,
        "current_batch": s.current_batch,
        "devices_ok": s.devices_ok,
        "devices_failed": s.devices_failed,
    })
}

/// One audit record as a JSON object; `details_json` is kept as the exact string that was hashed.
pub fn audit_json(r: &pb::AuditRecord) -> Value {
    json!({
        "seq": r.seq,
        "at_ms": r.at_ms,
        "actor": r.actor,
        "event": r.event,
        "subject": r.subject,
        "details_json": r.details_json,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

fn verify_json(r: &pb::VerifyAuditResponse) -> Value {
    json!({
        "ok": r.ok,
        "records": r.records,
        "head_seq": r.head_seq,
        "head_hash": r.head_hash,
        "broken_seq": r.broken_seq,
        "fault": r.fault,
        "ledger_id": r.ledger_id,
        "genesis": r.genesis,
    })
}

fn hsm_json(r: &pb::HsmStatusResponse) -> Value {
    let members: Vec<Value> = r
        .members
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "healthy": m.healthy,
                "in_flight": m.in_flight,
                "capacity": m.capacity,
                "last_error": m.last_error,
                "consecutive_failures": m.consecutive_failures,
                "requests": m.requests,
                "device_errors": m.device_errors,
                "latency_mean_ms": m.latency_mean_ms,
                "latency_max_ms": m.latency_max_ms,
                "audit_key_spki": hex::encode(&m.audit_key_spki),
                "audit_key_fingerprint": m.audit_key_fingerprint,
            })
        })
        .collect();
    json!({ "broker": r.broker, "members": members })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        admin: AdminArgs,
    }

    fn words(line: &str) -> Vec<&str> {
        line.split_whitespace().collect()
    }

    fn parse(args: &[&str]) -> Result<AdminArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("admin").chain(args.iter().copied())).map(|c| c.admin)
    }

    #[test]
    fn times_parse_as_ms_or_rfc3339() {
        assert_eq!(parse_time_ms("1800000000000"), Ok(1_800_000_000_000));
        assert_eq!(parse_time_ms("2027-01-15T08:00:00Z"), Ok(1_800_000_000_000));
        assert_eq!(parse_time_ms("2027-01-15T08:00:00.250Z"), Ok(1_800_000_000_250));
        assert_eq!(parse_time_ms("2027-01-15 08:00:00"), Ok(1_800_000_000_000));
        assert_eq!(parse_time_ms("2027-01-15"), Ok(1_800_000_000_000 - 8 * 3_600_000));
        assert_eq!(parse_time_ms("0"), Ok(0));
        for bad in ["tomorrow", "2027-13-01T00:00:00Z", "-5", "", "99999999999999999999"] {
            let e = parse_time_ms(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn windows_must_be_ordered() {
        assert!(check_window(None, None).is_ok());
        assert!(check_window(Some(5), None).is_ok());
        assert!(check_window(None, Some(5)).is_ok());
        assert!(check_window(Some(1), Some(2)).is_ok());
        let e = check_window(Some(1_800_000_000_000), Some(1_800_000_000_000)).unwrap_err();
        assert!(e.contains("2027-01-15T08:00:00Z") && e.contains("is not after"), "{e}");
    }

    #[test]
    fn hex_ids_and_products() {
        assert_eq!(parse_key_id("00112233445566778899AABBCCDDEEFF"), Ok("00112233445566778899aabbccddeeff".into()));
        assert!(parse_key_id("0011").unwrap_err().contains("32 hex digits"));
        assert!(parse_key_id("zz112233445566778899aabbccddeeff").is_err());
        assert_eq!(parse_sha256(&"Ab".repeat(32)), Ok("ab".repeat(32)));
        assert!(parse_sha256("ab").is_err());
        assert_eq!(parse_product("46201002"), Ok("46201002".into()));
        assert!(parse_product("4620100").is_err());
        assert!(parse_product("4620 002").is_err());
    }

    #[test]
    fn states_have_short_names() {
        assert_eq!(state_name(pb::BatchState::Open as i32), "open");
        assert_eq!(state_name(pb::BatchState::Paused as i32), "paused");
        assert_eq!(state_name(pb::BatchState::Closed as i32), "closed");
        assert_eq!(state_name(42), "state 42");
    }

    #[test]
    fn command_lines() {
        let a = parse(&[
            "--cert", "c.pem", "--key", "c.key", "--ca", "ca.pem", "key", "import", "--label", "l", "--key", "k.bin",
        ])
        .unwrap();
        assert_eq!(a.conn.key.as_deref(), Some(Path::new("c.key")));
        assert!(
            matches!(a.command, AdminCommand::Key(KeyCommand::Import { ref key, .. }) if key == Path::new("k.bin"))
        );

        let image = "a".repeat(64);
        let a = parse(&words(&format!(
            "batch create b1 --product 46201002 --image {image} --quota 10 --site berlin --site austin \
             --not-after 2027-01-15 --pki pki --json"
        )))
        .unwrap();
        assert!(a.json);
        assert_eq!(a.conn.pki.as_deref(), Some(Path::new("pki")));
        let AdminCommand::Batch(BatchCommand::Create(c)) = a.command else { panic!("not batch create") };
        assert_eq!(c.sites, ["berlin", "austin"]);
        assert_eq!(c.not_after, Some(1_800_000_000_000 - 8 * 3_600_000));
        assert_eq!(c.not_before, None);

        assert!(parse(&["batch", "create", "b1", "--product", "46201002", "--image", "x", "--quota", "1"]).is_err());
        assert!(parse(&["station", "revoke", "--reason", "lost"]).is_err());
        let a = parse(&["station", "revoke", "--serial", "4a", "--identity", "x", "--reason", "lost"]).unwrap();
        assert!(matches!(a.command, AdminCommand::Station(StationCommand::Revoke(ref r))
            if r.serial.as_deref() == Some("4a") && r.identity.as_deref() == Some("x") && !r.force));
        assert!(parse(&["station", "revoke", "--serial", "4a:0b", "--reason", "lost"]).is_ok());
        let a = parse(&["station", "revoke", "--serial", "4a", "--reason", "new", "--force"]).unwrap();
        assert!(matches!(a.command, AdminCommand::Station(StationCommand::Revoke(ref r)) if r.force));
        assert!(parse(&["station", "revoke", "--identity", "x", "--reason", "lost", "--force"]).is_err());
        assert!(parse(&["image", "pack", "--key-id", &"0".repeat(32), "--family", "stm32l4"]).is_err());
        let a = parse(&["audit", "export", "--after", "7", "--out", "a.jsonl"]).unwrap();
        assert!(matches!(a.command, AdminCommand::Audit(AuditCommand::Export { after: Some(7), .. })));
    }

    /// Every `admin station revoke` example in the docs is a command line the CLI accepts.
    #[test]
    fn revoke_examples_in_the_docs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = vec![root.join("README.md")];
        for entry in std::fs::read_dir(root.join("docs")).unwrap() {
            files.push(entry.unwrap().path());
        }
        let mut seen = 0;
        for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "md")) {
            let text = std::fs::read_to_string(file).unwrap();
            let spans = text.lines().flat_map(|l| l.split('`').skip(1).step_by(2));
            for span in spans.filter(|s| s.contains("admin station revoke")) {
                // Shell words: quoted strings stay one argument.
                let mut args: Vec<String> = Vec::new();
                for (i, part) in span.split('"').enumerate() {
                    if i % 2 == 1 {
                        args.push(part.to_string());
                    } else {
                        args.extend(part.split_whitespace().map(String::from));
                    }
                }
                let from = args.iter().position(|a| a == "station").unwrap();
                let argv: Vec<&str> = args[from..].iter().map(String::as_str).collect();
                parse(&argv).unwrap_or_else(|e| panic!("{}: `{span}`: {e}", file.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3, "only {seen} revoke examples found");
    }

    #[test]
    fn stations_are_uris_or_site_slash_number() {
        let uri = "spiffe://factory.test/site/berlin/station/2";
        assert_eq!(station_uri(uri, None).unwrap(), uri);
        assert_eq!(station_uri("berlin/2", Some("factory.test")).unwrap(), uri);
        assert_eq!(station_uri(" berlin/2 ", Some("factory.test")).unwrap(), uri);
        let e = station_uri("berlin/2", None).unwrap_err().to_string();
        assert!(e.contains("\"berlin/2\"") && e.contains("spiffe://"), "{e}");
        for bad in ["berlin", "berlin/0", "berlin/x", "Berlin/1", "spiffe://factory.test/admin/ops"] {
            assert!(station_uri(bad, Some("factory.test")).is_err(), "{bad}");
        }
        let a = parse(&["station", "assign", "berlin/2", "b1"]).unwrap();
        assert!(matches!(a.command, AdminCommand::Station(StationCommand::Assign { ref batch, .. }) if batch == "b1"));
        let a = parse(&["station", "pause", "berlin/2", "--reason", "line stop"]).unwrap();
        assert!(
            matches!(a.command, AdminCommand::Station(StationCommand::Pause { ref reason, .. }) if reason == "line stop")
        );
        let a = parse(&["station", "pause", uri]).unwrap();
        assert!(
            matches!(a.command, AdminCommand::Station(StationCommand::Pause { ref reason, .. }) if reason.is_empty())
        );
        assert!(parse(&["station", "assign", "berlin/2"]).is_err());
    }

    #[test]
    fn station_tables_show_live_fields() {
        let s = pb::StationInfo {
            identity: "spiffe://factory.test/site/berlin/station/1".into(),
            site: "berlin".into(),
            online: true,
            broker: "broker-1".into(),
            probes: vec![pb::ProbeInfo { probe_id: "p0".into(), kind: "sim".into(), port: "tcp://h:1".into() }],
            assigned_batch: "b1".into(),
            paused: true,
            current_batch: "b1".into(),
            devices_ok: 5,
            devices_failed: 2,
            ..Default::default()
        };
        let t = stations_table(std::slice::from_ref(&s)).render();
        let row = words(t.lines().nth(1).unwrap()).join(" ");
        assert!(row.contains("berlin yes broker-1 1 b1 (paused) b1 5/2"), "{t}");
        let d = station_detail(&s).render();
        assert!(d.contains("p0 (sim tcp://h:1)") && d.contains("b1 (paused)"), "{d}");
        let j = station_json(&s);
        assert_eq!((j["online"].as_bool(), j["paused"].as_bool()), (Some(true), Some(true)));
        assert_eq!(j["probes"][0]["probe_id"], "p0");
        assert_eq!(j["devices_failed"], 2);
        let idle = pb::StationInfo { identity: "x".into(), ..Default::default() };
        let t = stations_table(&[idle]).render();
        assert!(words(t.lines().nth(1).unwrap()).join(" ").starts_with("x no - 0 - - 0/0"), "{t}");
    }

    #[test]
    fn pack_inputs_become_wire_areas() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("app.bin");
        std::fs::write(&bin, [0xAAu8; 10]).unwrap();
        let csv = dir.path().join("ob.csv");
        std::fs::write(&csv, "RDP,0xBB\n").unwrap();
        let a = PackArgs {
            key_id: "0".repeat(32),
            family: Family::Stm32L4,
            product: None,
            option_bytes: Some(csv),
            max_area: 64 * 1024,
            inputs: vec![format!("{}@0x08000000", bin.display())],
        };
        let areas: Vec<pb::PlainArea> = pack_areas(&a).unwrap().into_iter().map(plain_area).collect();
        assert_eq!(areas.len(), 2);
        assert_eq!((areas[0].kind.as_str(), areas[0].address, areas[0].data.len()), ("F", 0x0800_0000, 16));
        assert_eq!(&areas[0].data[10..], &[0xFF; 6]);
        assert_eq!((areas[1].kind.as_str(), areas[1].address), ("C", 0));
        assert_eq!(product_or_default(a.product.clone(), a.family), "46201002");

        let outside = PackArgs { inputs: vec![format!("{}@0x20000000", bin.display())], option_bytes: None, ..a };
        assert!(pack_areas(&outside).is_err());
    }

    #[test]
    fn wrong_key_sizes_name_file_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.bin");
        std::fs::write(&path, [7u8; 15]).unwrap();
        let e = format!("{:#}", read_key(&path).unwrap_err());
        assert!(e.contains(&path.display().to_string()) && e.contains("15"), "{e}");
        std::fs::write(&path, [7u8; 16]).unwrap();
        assert_eq!(read_key(&path).unwrap().as_bytes(), &[7u8; 16]);
    }

    #[test]
    fn tables_and_json_of_messages() {
        let b = pb::BatchInfo {
            id: "b1".into(),
            product_id: "46201002".into(),
            quota: 10,
            issued: 3,
            remaining: 7,
            allowed_sites: vec!["berlin".into(), "austin".into()],
            state: pb::BatchState::Paused as i32,
            not_after_ms: Some(1_800_000_000_000),
            ..Default::default()
        };
        let text = batch_detail(&b).render();
        assert!(text.starts_with("batch       b1\nstate       paused\n"), "{text}");
        assert!(text.contains("not after   2027-01-15T08:00:00Z\n") && text.contains("not before  -\n"), "{text}");
        let j = batch_json(&b);
        assert_eq!(j["state"], "paused");
        assert_eq!(j["not_after_ms"], 1_800_000_000_000i64);
        assert!(j["not_before_ms"].is_null());

        let r = pb::AuditRecord { seq: 4, details_json: "{\"a\":1}".into(), ..Default::default() };
        let line = audit_json(&r).to_string();
        assert!(!line.contains('\n') && line.contains(r#""details_json":"{\"a\":1}""#), "{line}");

        let m = pb::HsmMember { name: "soft-0".into(), healthy: true, in_flight: 2, capacity: 8, ..Default::default() };
        let t = hsm_table(&[m]).render();
        assert!(t.lines().nth(1).unwrap().starts_with("soft-0  yes"), "{t}");
        assert!(t.contains("2/8"), "{t}");
    }
}
