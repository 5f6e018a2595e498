//! Probes: the ways the station agent reaches target bootloaders (USB-serial adapters found on the
//! bus, configured serial ports, serial-over-TCP such as ser2net, in-process simulated targets).
//! This module owns the probe model ([`ProbeKind`], [`ProbeInfo`]), discovery ([`discover`],
//! [`Discoverer`]: configured probes merged with USB devices of the SFI profile v1 §7 identities,
//! deduplicated by tty), the periodic re-scan ([`ProbeWatcher`]: `Added`/`Removed` events) and the
//! listings of `flashgate agent probes` ([`format_probes`], [`probes_json`]).
//!
//! Submodules: [`spec`] (configured probes and settings), [`usb`] (libusb enumeration, §7 ids,
//! stable ids), [`sysfs`] (USB device → tty through sysfs), [`watch`] (the watcher).
//! Discovery never fails because USB is unavailable (a container without `/dev/bus/usb`): it then
//! returns the configured probes and a warning.

pub mod spec;
pub mod sysfs;
pub mod usb;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use spec::{DEFAULT_SCAN_INTERVAL, ProbeConfig, ProbeEndpoint, ProbeSettings, ProbeSpec, parse_usb_id};
pub use sysfs::{Sysfs, UsbTty};
pub use usb::{
    KNOWN_PROBE_IDS, UsbDevice, UsbEnumerator, UsbIdRange, UsbNaming, UsbUnavailable, format_vid_pid, is_probe_id,
    known_probe_name, usb_probes,
};
pub use watch::{ProbeEvent, ProbeScanner, ProbeWatcher, diff_probes};

use crate::bootloader::AddrError;

/// How a probe reaches its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeKind {
    /// A USB-serial adapter (or a probe's virtual COM port) found on the USB bus.
    UsbSerial,
    /// A configured serial port that is not a discovered USB device.
    Serial,
    /// A serial line exposed over TCP (ser2net and the like).
    Tcp,
    /// A target of the in-process simulator.
    Sim,
}

impl ProbeKind {
    /// The kebab-case name used in listings and JSON: `usb-serial`, `serial`, `tcp`, `sim`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::UsbSerial => "usb-serial",
            ProbeKind::Serial => "serial",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Sim => "sim",
        }
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One probe the agent can (or, for a USB device without a serial interface, cannot) drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeInfo {
    /// Stable id: the operator's, `usb:<serial>`, `usb@<port path>` (either with `:if<N>` for one
    /// of several ttys of a device), or the configured target (`serial:/dev/ttyS0`, `tcp://h:p`, `sim:N`).
    pub id: String,
    /// How the target is reached.
    pub kind: ProbeKind,
    /// USB vendor and product id, for USB probes (`"0483:374b"` in JSON).
    #[serde(serialize_with = "ser_vid_pid")]
    pub vid_pid: Option<(u16, u16)>,
    /// USB serial number, when readable.
    pub usb_serial: Option<String>,
    /// USB bus-port path such as `1-2.3`.
    pub port_path: Option<String>,
    /// The tty device node.
    pub tty: Option<PathBuf>,
    /// What to connect to: `TargetAddr` syntax or `sim:N`; empty when the probe has no serial
    /// interface (see [`ProbeInfo::is_connectable`]).
    pub target: String,
    /// Human description (USB product string or §7 name, "configured serial port", …).
    pub description: String,
}

fn ser_vid_pid<S: serde::Serializer>(v: &Option<(u16, u16)>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(id) => s.serialize_str(&format_vid_pid(*id)),
        None => s.serialize_none(),
    }
}

impl ProbeInfo {
    /// Whether the probe has a target to connect to (a DFU bootloader or an ST-LINK/V2 without
    /// VCP is listed but has none).
    pub fn is_connectable(&self) -> bool {
        !self.target.is_empty()
    }

    /// The parsed target.
    pub fn endpoint(&self) -> Result<ProbeEndpoint, ProbeError> {
        if !self.is_connectable() {
            return Err(ProbeError::NotConnectable { id: self.id.clone(), description: self.description.clone() });
        }
        self.target.parse()
    }

    /// The probe as a JSON object (the shape of [`probes_json`]'s elements).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "kind": self.kind.as_str(),
            "vid_pid": self.vid_pid.map(format_vid_pid),
            "usb_serial": self.usb_serial,
            "port_path": self.port_path,
            "tty": self.tty.as_ref().map(|t| t.to_string_lossy().into_owned()),
            "target": self.target,
            "description": self.description,
        })
    }
}

/// Probe configuration and use errors, naming what failed with what value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// A configured probe's target address does not parse.
    #[error("probe {spec:?}: {source}")]
    Target {
        /// The probe string as configured.
        spec: String,
        /// What is wrong with its address.
        #[source]
        source: AddrError,
    },
    /// A configured probe string is wrong otherwise (simulator index, id).
    #[error("probe {spec:?}: {reason}")]
    Spec {
        /// The probe string as configured.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// Two configured probes have the same id.
    #[error("probe id {id:?} is given to both {first:?} and {second:?}")]
    DuplicateId {
        /// The id.
        id: String,
        /// The first probe's target.
        first: String,
        /// The second probe's target.
        second: String,
    },
    /// Two configured probes name the same serial device.
    #[error("serial device {tty} is configured twice: as probe {first:?} and as probe {second:?}")]
    DuplicateTty {
        /// The device (after resolving symlinks).
        tty: String,
        /// The first probe's id.
        first: String,
        /// The second probe's id.
        second: String,
    },
    /// A VID:PID in the settings does not parse.
    #[error("USB id {value:?}: {reason}")]
    UsbId {
        /// The text.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The probe has nothing to connect to.
    #[error("probe {id:?} ({description}) has no serial interface to connect to")]
    NotConnectable {
        /// The probe's id.
        id: String,
        /// Its description.
        description: String,
    },
}

/// The result of one discovery pass: the probes and what could not be looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovery {
    /// Configured probes first (in configuration order, USB details merged in where their tty is
    /// a discovered device), then discovered USB probes by port path.
    pub probes: Vec<ProbeInfo>,
    /// Non-fatal problems: USB unavailable, a configured serial device missing, an id clash.
    pub warnings: Vec<String>,
}

/// Discovery state kept across scans: the parsed configured probes, the sysfs tree and the libusb
/// context. Build once with [`Discoverer::new`] (which checks the configuration) and call
/// [`Discoverer::scan`] for each pass.
#[derive(Debug)]
pub struct Discoverer {
    specs: Vec<ProbeSpec>,
    usb_scan: bool,
    extra_ids: Vec<(u16, u16)>,
    naming: UsbNaming,
    sysfs: Sysfs,
    usb: UsbEnumerator,
}

impl Discoverer {
    /// Parse and check the configured probes (ids unique, no serial device given twice).
    pub fn new(settings: &ProbeSettings) -> Result<Self, ProbeError> {
        let specs = settings.probes.iter().map(ProbeConfig::spec).collect::<Result<Vec<_>, _>>()?;
        let mut ids: HashMap<String, String> = HashMap::new();
        let mut ttys: HashMap<PathBuf, String> = HashMap::new();
        for spec in &specs {
            if let Some(first) = ids.insert(spec.id(), spec.target()) {
                return Err(ProbeError::DuplicateId { id: spec.id(), first, second: spec.target() });
            }
            if let Some(path) = spec.serial_path()
                && let Some(first) = ttys.insert(canonical(Path::new(path)), spec.id())
            {
                let tty = canonical(Path::new(path)).display().to_string();
                return Err(ProbeError::DuplicateTty { tty, first, second: spec.id() });
            }
        }
        Ok(Self {
            specs,
            usb_scan: settings.usb_scan,
            extra_ids: settings.extra_ids.clone(),
            naming: UsbNaming { ids_by_port: settings.ids_by_port, baud: settings.usb_baud },
            sysfs: Sysfs::new(&settings.sysfs_root),
            usb: UsbEnumerator::new(),
        })
    }

    /// Use this sysfs view instead of the one the settings name (tests: a fake `/dev` too).
    pub fn with_sysfs(mut self, sysfs: Sysfs) -> Self {
        self.sysfs = sysfs;
        self
    }

    /// The configured probes.
    pub fn specs(&self) -> &[ProbeSpec] {
        &self.specs
    }

    /// One discovery pass: enumerate USB (unless disabled) and merge. Blocks (libusb, sysfs).
    pub fn scan(&mut self) -> Discovery {
        let usb = if self.usb_scan { Some(self.usb.enumerate(&self.extra_ids, &self.sysfs)) } else { None };
        self.assemble(usb)
    }

    /// Merge the configured probes with the outcome of a USB enumeration (`None`: USB scanning
    /// is off). Pure apart from reading sysfs and resolving device paths.
    pub fn assemble(&self, usb: Option<Result<Vec<UsbDevice>, UsbUnavailable>>) -> Discovery {
        let mut warnings = Vec::new();
        let discovered = match usb {
            None => Vec::new(),
            Some(Ok(devices)) => usb_probes(&devices, &self.sysfs, self.naming),
            Some(Err(e)) => {
                warnings.push(format!("{e}; using configured probes only"));
                Vec::new()
            }
        };
        let mut by_tty: HashMap<PathBuf, usize> = HashMap::new();
        for (i, p) in discovered.iter().enumerate() {
            if let Some(tty) = &p.tty {
                by_tty.insert(canonical(tty), i);
            }
        }
        let mut merged_usb = HashSet::new();
        let mut probes = Vec::new();
        for spec in &self.specs {
            let mut info = spec.to_info();
            if let Some(path) = spec.serial_path() {
                let tty = canonical(Path::new(path));
                if let Some(&i) = by_tty.get(&tty) {
                    let usb = &discovered[i];
                    merged_usb.insert(i);
                    info = ProbeInfo {
                        id: spec.id.clone().unwrap_or_else(|| usb.id.clone()),
                        kind: ProbeKind::UsbSerial,
                        tty: usb.tty.clone(),
                        target: spec.target(),
                        description: format!("{} (configured)", usb.description),
                        ..usb.clone()
                    };
                } else if !Path::new(path).exists() {
                    warnings.push(format!("configured probe {:?}: serial device {path} does not exist", spec.id()));
                    continue;
                }
            }
            probes.push(info);
        }
        let mut taken: HashSet<String> = probes.iter().map(|p| p.id.clone()).collect();
        for (i, p) in discovered.into_iter().enumerate() {
            if merged_usb.contains(&i) {
                continue;
            }
            if !taken.insert(p.id.clone()) {
                warnings.push(format!(
                    "USB probe at {} ({}) has id {:?}, which a configured probe already uses; not listed",
                    p.port_path.as_deref().unwrap_or("?"),
                    p.description,
                    p.id
                ));
                continue;
            }
            probes.push(p);
        }
        Discovery { probes, warnings }
    }
}

/// A device path with symlinks resolved (`/dev/serial/by-id/…` → `/dev/ttyUSB0`); the path as
/// given when it cannot be resolved.
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Discover probes once and report the warnings too (for `flashgate agent probes`).
pub fn discover_report(cfg: &ProbeSettings) -> Result<Discovery, ProbeError> {
    Ok(Discoverer::new(cfg)?.scan())
}

/// Discover probes once: the configured ones merged with USB devices of the §7 identities (and
/// `extra_ids`), deduplicated by tty. Fails only on a bad configuration; USB problems are logged
/// as warnings.
pub fn discover(cfg: &ProbeSettings) -> Result<Vec<ProbeInfo>, ProbeError> {
    let found = discover_report(cfg)?;
    for w in &found.warnings {
        tracing::warn!("probe discovery: {w}");
    }
    Ok(found.probes)
}

/// An aligned text table of probes (id, kind, VID:PID, serial, port path, tty, target,
/// description), `-` for what a probe does not have. One line per probe after the header.
pub fn format_probes(probes: &[ProbeInfo]) -> String {
    let dash = |s: Option<String>| s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".to_string());
    let mut rows: Vec<[String; 8]> =
        vec![["ID", "KIND", "VID:PID", "SERIAL", "PORT", "TTY", "TARGET", "DESCRIPTION"].map(str::to_string)];
    for p in probes {
        rows.push([
            p.id.clone(),
            p.kind.to_string(),
            dash(p.vid_pid.map(format_vid_pid)),
            dash(p.usb_serial.clone()),
            dash(p.port_path.clone()),
            dash(p.tty.as_ref().map(|t| t.display().to_string())),
            dash(Some(p.target.clone())),
            dash(Some(p.description.clone())),
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The probes as a JSON array of objects with keys `id`, `kind`, `vid_pid` (`"0483:374b"`),
/// `usb_serial`, `port_path`, `tty`, `target`, `description` (`null` for what a probe lacks).
pub fn probes_json(probes: &[ProbeInfo]) -> serde_json::Value {
    serde_json::Value::Array(probes.iter().map(ProbeInfo::to_json).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::fs;

    use super::sysfs::fake;
    use super::*;

    fn settings(probes: &[&str]) -> ProbeSettings {
        ProbeSettings { probes: probes.iter().map(|p| ProbeConfig::new(*p)).collect(), ..ProbeSettings::default() }
    }

    /// A fake sysfs with an FTDI adapter at 1-1 (ttyUSB0), an ST-LINK/V2-1 at 1-2 (ttyACM0) and a
    /// DFU bootloader at 1-3 (no tty); the device nodes exist in `<dir>/dev`.
    fn bench(dir: &Path) -> (Sysfs, Vec<UsbDevice>) {
        let root = dir.join("sys");
        fake::device(&root, "1-1", Some("A50285BI"), Some("FT232R USB UART"));
        fake::usb_serial_tty(&root, "1-1", 0, "ttyUSB0");
        fake::device(&root, "1-2", Some("066DFF555654"), None);
        fake::acm_tty(&root, "1-2", 2, "ttyACM0");
        fake::device(&root, "1-3", None, None);
        let dev = dir.join("dev");
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("ttyUSB0"), b"").unwrap();
        fs::write(dev.join("ttyACM0"), b"").unwrap();
        let devices = vec![
            UsbDevice {
                port_path: "1-1".into(),
                vid: 0x0403,
                pid: 0x6001,
                serial: Some("A50285BI".into()),
                product: Some("FT232R USB UART".into()),
            },
            UsbDevice {
                port_path: "1-2".into(),
                vid: 0x0483,
                pid: 0x374b,
                serial: Some("066DFF555654".into()),
                product: None,
            },
            UsbDevice { port_path: "1-3".into(), vid: 0x0483, pid: 0xdf11, serial: None, product: None },
        ];
        (Sysfs::new(root).with_dev_dir(dev), devices)
    }

    #[test]
    fn configured_and_discovered_probes_merge_by_tty() {
        let dir = tempfile::tempdir().unwrap();
        let (sysfs, devices) = bench(dir.path());
        // The ACM port is configured through a by-id symlink, with its own id and baud.
        let by_id = dir.path().join("by-id");
        fs::create_dir_all(&by_id).unwrap();
        let link = by_id.join("usb-STMicroelectronics_STM32_STLink_066DFF555654-if02");
        std::os::unix::fs::symlink(dir.path().join("dev/ttyACM0"), &link).unwrap();
        let acm = format!("serial:{}?baud=57600&id=bench-a", link.display());
        let usb0 = format!("serial:{}", dir.path().join("dev/ttyUSB0").display());
        let d = Discoverer::new(&settings(&["tcp://ser2net:7000", &acm, &usb0, "sim:2"])).unwrap().with_sysfs(sysfs);
        let found = d.assemble(Some(Ok(devices)));
        assert_eq!(found.warnings, Vec::<String>::new());
        let ids: Vec<_> = found.probes.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["tcp://ser2net:7000", "bench-a", "usb:A50285BI", "sim:2", "usb@1-3"]);

        let a = &found.probes[1];
        assert_eq!(a.kind, ProbeKind::UsbSerial);
        assert_eq!(a.vid_pid, Some((0x0483, 0x374b)));
        assert_eq!(a.usb_serial.as_deref(), Some("066DFF555654"));
        assert_eq!(a.port_path.as_deref(), Some("1-2"));
        assert_eq!(a.tty, Some(dir.path().join("dev/ttyACM0")));
        assert_eq!(a.target, format!("serial:{}?baud=57600", link.display()));
        assert_eq!(a.description, "ST-LINK/V2-1 (configured)");
        let u = &found.probes[2];
        assert_eq!((u.kind, u.target.clone()), (ProbeKind::UsbSerial, format!("{usb0}?baud=115200")));
        assert_eq!(u.description, "FT232R USB UART (configured)");
        assert_eq!(found.probes[0].kind, ProbeKind::Tcp);
        assert_eq!(found.probes[3].kind, ProbeKind::Sim);
        assert!(!found.probes[4].is_connectable());
        assert!(matches!(found.probes[4].endpoint(), Err(ProbeError::NotConnectable { .. })));
        assert_eq!(found.probes[3].endpoint().unwrap(), ProbeEndpoint::Sim(2));
    }

    #[test]
    fn unconfigured_usb_ttys_get_default_targets() {
        let dir = tempfile::tempdir().unwrap();
        let (sysfs, devices) = bench(dir.path());
        let d = Discoverer::new(&ProbeSettings { usb_baud: 230_400, ..settings(&[]) }).unwrap().with_sysfs(sysfs);
        let found = d.assemble(Some(Ok(devices)));
        let targets: Vec<_> = found.probes.iter().map(|p| p.target.clone()).collect();
        let dev = dir.path().join("dev");
        assert_eq!(
            targets,
            [
                format!("serial:{}?baud=230400", dev.join("ttyUSB0").display()),
                format!("serial:{}?baud=230400", dev.join("ttyACM0").display()),
                String::new(),
            ]
        );
        assert!(matches!(found.probes[1].endpoint().unwrap(), ProbeEndpoint::Target(_)));
    }

    #[test]
    fn usb_unavailable_or_off_leaves_configured_probes_and_a_warning() {
        let d = Discoverer::new(&settings(&["tcp://h:7000", "sim:0"])).unwrap();
        let found =
            d.assemble(Some(Err(UsbUnavailable { stage: "libusb initialisation", error: "Other error".into() })));
        assert_eq!(found.probes.len(), 2);
        assert_eq!(
            found.warnings,
            ["USB discovery unavailable: libusb initialisation failed: Other error; using configured probes only"]
        );
        let off = d.assemble(None);
        assert_eq!((off.probes.len(), off.warnings.len()), (2, 0));
    }

    #[test]
    fn discover_never_fails_for_lack_of_usb() {
        // Whatever this machine has (a container usually has no /dev/bus/usb), discovery succeeds
        // and the configured probes are there.
        let probes = discover(&settings(&["tcp://127.0.0.1:7000?id=t", "sim:1"])).unwrap();
        assert_eq!(probes[0].id, "t");
        assert_eq!(probes[1].id, "sim:1");
        let off = discover(&ProbeSettings { usb_scan: false, ..settings(&["sim:0"]) }).unwrap();
        assert_eq!(off.len(), 1);
    }

    #[test]
    fn missing_configured_serial_devices_are_left_out_with_a_warning() {
        let mut d =
            Discoverer::new(&ProbeSettings { usb_scan: false, ..settings(&["serial:/nonexistent/ttyUSB7"]) }).unwrap();
        let found = d.scan();
        assert!(found.probes.is_empty());
        assert_eq!(
            found.warnings,
            ["configured probe \"serial:/nonexistent/ttyUSB7\": serial device /nonexistent/ttyUSB7 does not exist"]
        );
    }

    #[test]
    fn configuration_errors_are_caught_up_front() {
        let e = Discoverer::new(&settings(&["tcp://a:1?id=x", "sim:1?id=x"])).unwrap_err();
        assert_eq!(e.to_string(), "probe id \"x\" is given to both \"tcp://a:1\" and \"sim:1\"");
        let e =
            Discoverer::new(&settings(&["serial:/dev/ttyS9?id=a", "serial:/dev/ttyS9?baud=9600&id=b"])).unwrap_err();
        assert_eq!(e.to_string(), "serial device /dev/ttyS9 is configured twice: as probe \"a\" and as probe \"b\"");
        let e = discover(&settings(&["bogus"])).unwrap_err();
        assert!(matches!(e, ProbeError::Target { .. }), "{e}");
    }

    #[test]
    fn discovered_ids_clashing_with_configured_ones_are_dropped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let (sysfs, devices) = bench(dir.path());
        let d = Discoverer::new(&settings(&["tcp://h:1?id=usb:A50285BI"])).unwrap().with_sysfs(sysfs);
        let found = d.assemble(Some(Ok(devices)));
        assert_eq!(found.probes.iter().filter(|p| p.id == "usb:A50285BI").count(), 1);
        assert_eq!(found.probes[0].kind, ProbeKind::Tcp);
        assert_eq!(found.warnings.len(), 1);
        assert!(found.warnings[0].contains("USB probe at 1-1"), "{:?}", found.warnings);
    }

    fn sample() -> Vec<ProbeInfo> {
        vec![
            ProbeInfo {
                id: "usb:066DFF555654".into(),
                kind: ProbeKind::UsbSerial,
                vid_pid: Some((0x0483, 0x374b)),
                usb_serial: Some("066DFF555654".into()),
                port_path: Some("1-2.3".into()),
                tty: Some("/dev/ttyACM0".into()),
                target: "serial:/dev/ttyACM0?baud=115200".into(),
                description: "ST-LINK/V2-1".into(),
            },
            "tcp://ser2net:7000?id=rack".parse::<ProbeSpec>().unwrap().to_info(),
        ]
    }

    #[test]
    fn table_is_aligned() {
        let table = format_probes(&sample());
        let expected = "\
ID                KIND        VID:PID    SERIAL        PORT   TTY           TARGET                           DESCRIPTION
usb:066DFF555654  usb-serial  0483:374b  066DFF555654  1-2.3  /dev/ttyACM0  serial:/dev/ttyACM0?baud=115200  ST-LINK/V2-1
rack              tcp         -          -             -      -             tcp://ser2net:7000               configured serial-over-TCP
";
        assert_eq!(table, expected);
        assert_eq!(format_probes(&[]).lines().count(), 1);
    }

    #[test]
    fn json_has_one_object_per_probe() {
        let v = probes_json(&sample());
        assert_eq!(
            v[0],
            serde_json::json!({
                "id": "usb:066DFF555654", "kind": "usb-serial", "vid_pid": "0483:374b",
                "usb_serial": "066DFF555654", "port_path": "1-2.3", "tty": "/dev/ttyACM0",
                "target": "serial:/dev/ttyACM0?baud=115200", "description": "ST-LINK/V2-1",
            })
        );
        assert_eq!(v[1]["vid_pid"], serde_json::Value::Null);
        assert_eq!(v[1]["kind"], "tcp");
        // The derived Serialize agrees with the hand-built JSON.
        assert_eq!(serde_json::to_value(sample()).unwrap(), v);
    }
}
