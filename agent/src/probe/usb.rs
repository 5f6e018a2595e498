//! The USB side of probe discovery: the probe identities of SFI profile v1 §7
//! ([`KNOWN_PROBE_IDS`]), enumeration through libusb ([`UsbEnumerator`]), bus-port paths, stable
//! probe ids (`usb:<serial>`, or `usb@<port path>` where serial numbers repeat or are missing) and
//! turning matched USB devices plus their sysfs ttys into [`ProbeInfo`]s ([`usb_probes`]).

use std::collections::HashMap;
use std::fmt;

use super::sysfs::Sysfs;
use super::{ProbeInfo, ProbeKind};
use crate::bootloader::{SerialParity, TargetAddr};

/// A range of product ids of one vendor that the agent treats as a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsbIdRange {
    /// USB vendor id.
    pub vid: u16,
    /// First product id of the range.
    pub pid_first: u16,
    /// Last product id of the range (inclusive).
    pub pid_last: u16,
    /// What the device is, for probe descriptions.
    pub name: &'static str,
}

impl UsbIdRange {
    const fn one(vid: u16, pid: u16, name: &'static str) -> Self {
        Self { vid, pid_first: pid, pid_last: pid, name }
    }

    /// Whether `vid:pid` lies in this range.
    pub fn contains(&self, vid: u16, pid: u16) -> bool {
        vid == self.vid && (self.pid_first..=self.pid_last).contains(&pid)
    }
}

/// The probe identities SFI profile v1 §7 names: ST's DFU bootloader, ST-LINKs and VCP, SEGGER
/// J-Links, FTDI, CP210x and CH340 USB-serial adapters.
pub const KNOWN_PROBE_IDS: &[UsbIdRange] = &[
    UsbIdRange::one(0x0483, 0xdf11, "STM32 DFU bootloader"),
    UsbIdRange::one(0x0483, 0x3748, "ST-LINK/V2"),
    UsbIdRange::one(0x0483, 0x374b, "ST-LINK/V2-1"),
    UsbIdRange::one(0x0483, 0x374e, "STLINK-V3"),
    UsbIdRange::one(0x0483, 0x374f, "STLINK-V3"),
    UsbIdRange::one(0x0483, 0x3753, "STLINK-V3"),
    UsbIdRange::one(0x0483, 0x5740, "ST Virtual COM Port"),
    UsbIdRange { vid: 0x1366, pid_first: 0x0101, pid_last: 0x0105, name: "SEGGER J-Link" },
    UsbIdRange { vid: 0x1366, pid_first: 0x1015, pid_last: 0x1069, name: "SEGGER J-Link" },
    UsbIdRange::one(0x0403, 0x6001, "FTDI FT232R"),
    UsbIdRange::one(0x0403, 0x6010, "FTDI FT2232"),
    UsbIdRange::one(0x0403, 0x6014, "FTDI FT232H"),
    UsbIdRange::one(0x10c4, 0xea60, "Silicon Labs CP210x"),
    UsbIdRange::one(0x1a86, 0x7523, "WCH CH340"),
];

/// The §7 name of `vid:pid`, when it is a known probe identity.
pub fn known_probe_name(vid: u16, pid: u16) -> Option<&'static str> {
    KNOWN_PROBE_IDS.iter().find(|r| r.contains(vid, pid)).map(|r| r.name)
}

/// Whether `vid:pid` is a probe: a §7 identity or one of the configured `extra_ids`.
pub fn is_probe_id(vid: u16, pid: u16, extra_ids: &[(u16, u16)]) -> bool {
    known_probe_name(vid, pid).is_some() || extra_ids.contains(&(vid, pid))
}

/// `vid:pid` as four lower-case hex digits each, e.g. `0483:374b`.
pub fn format_vid_pid((vid, pid): (u16, u16)) -> String {
    format!("{vid:04x}:{pid:04x}")
}

/// The bus-port path of a device as sysfs names it: `<bus>-<port>[.<port>…]` (`1-2.3`); `None`
/// for a root hub (no ports).
pub fn port_path(bus: u8, ports: &[u8]) -> Option<String> {
    let (first, rest) = ports.split_first()?;
    let mut path = format!("{bus}-{first}");
    for p in rest {
        path.push('.');
        path.push_str(&p.to_string());
    }
    Some(path)
}

/// A USB device that matched a probe identity, as enumeration found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbDevice {
    /// Bus-port path, e.g. `1-2.3`.
    pub port_path: String,
    /// Vendor id.
    pub vid: u16,
    /// Product id.
    pub pid: u16,
    /// Serial number string (sysfs `serial`, else the string descriptor), when readable.
    pub serial: Option<String>,
    /// Product string (sysfs `product`), when readable.
    pub product: Option<String>,
}

/// libusb could not be used; discovery carries on with configured probes only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("USB discovery unavailable: {stage} failed: {error}")]
pub struct UsbUnavailable {
    /// What was attempted: `libusb initialisation` or `USB device enumeration`.
    pub stage: &'static str,
    /// libusb's error.
    pub error: String,
}

/// Enumerates USB devices through libusb, keeping one libusb context across scans (created on
/// first use, retried on the next scan if that fails).
#[derive(Default)]
pub struct UsbEnumerator {
    context: Option<rusb::Context>,
}

impl fmt::Debug for UsbEnumerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsbEnumerator").field("initialised", &self.context.is_some()).finish()
    }
}

impl UsbEnumerator {
    /// An enumerator; libusb is initialised on the first [`enumerate`](Self::enumerate).
    pub fn new() -> Self {
        Self::default()
    }

    /// The devices whose VID:PID is a probe identity (§7 or `extra_ids`), ordered by port path.
    /// Serial numbers come from sysfs when it has them (no bus traffic, no device permissions
    /// needed) and otherwise from the serial-number string descriptor; a device that cannot be
    /// opened (permissions, busy) simply has no serial. Blocks (libusb, file reads).
    pub fn enumerate(&mut self, extra_ids: &[(u16, u16)], sysfs: &Sysfs) -> Result<Vec<UsbDevice>, UsbUnavailable> {
        use rusb::UsbContext;
        let context = match &self.context {
            Some(c) => c.clone(),
            None => {
                let c = rusb::Context::new()
                    .map_err(|e| UsbUnavailable { stage: "libusb initialisation", error: e.to_string() })?;
                self.context = Some(c.clone());
                c
            }
        };
        let list =
            context.devices().map_err(|e| UsbUnavailable { stage: "USB device enumeration", error: e.to_string() })?;
        let mut found = Vec::new();
        for device in list.iter() {
            let Ok(descriptor) = device.device_descriptor() else { continue };
            let (vid, pid) = (descriptor.vendor_id(), descriptor.product_id());
            if !is_probe_id(vid, pid, extra_ids) {
                continue;
            }
            let ports = match device.port_numbers() {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(vid, pid, bus = device.bus_number(), error = %e, "USB probe without port path; skipped");
                    continue;
                }
            };
            let Some(path) = port_path(device.bus_number(), &ports) else { continue };
            let serial = sysfs.attribute(&path, "serial").or_else(|| match device.open() {
                Ok(handle) => handle.read_serial_number_string_ascii(&descriptor).ok(),
                Err(e) => {
                    tracing::debug!(port_path = %path, error = %e, "cannot open USB probe to read its serial number");
                    None
                }
            });
            let product = sysfs.attribute(&path, "product");
            found.push(UsbDevice { port_path: path, vid, pid, serial, product });
        }
        found.sort_by_key(|d| port_path_key(&d.port_path));
        Ok(found)
    }
}

/// Sort key of a port path: numerically by bus then each port (`1-10` after `1-9`).
fn port_path_key(path: &str) -> Vec<u32> {
    path.split(['-', '.']).map(|n| n.parse::<u32>().unwrap_or(u32::MAX)).collect()
}

/// A serial number usable in an id: trimmed, non-empty, printable ASCII without spaces or `/`.
fn usable_serial(serial: Option<&str>) -> Option<&str> {
    let s = serial?.trim();
    let ok = !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic() && c != '/');
    ok.then_some(s)
}

/// How [`usb_probes`] names and connects discovered probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsbNaming {
    /// Name every probe by port path (`usb@1-2.3`) even when its serial number is unique.
    pub ids_by_port: bool,
    /// Baud rate of the `serial:` target of a discovered tty.
    pub baud: u32,
}

/// The probes of matched USB devices: one per tty the device exposes, or one without a target
/// when it exposes none (a DFU bootloader, an ST-LINK/V2 without VCP: listed, not connectable).
///
/// Ids: `usb:<serial>` when the device has a usable serial number that no other matched device
/// shares; otherwise `usb@<port path>`. A device with several ttys (FT2232, STLINK-V3 with two
/// VCPs) gets `:if<N>` appended, N being the tty's interface number.
pub fn usb_probes(devices: &[UsbDevice], sysfs: &Sysfs, naming: UsbNaming) -> Vec<ProbeInfo> {
    let mut serial_count: HashMap<&str, usize> = HashMap::new();
    for d in devices {
        if let Some(s) = usable_serial(d.serial.as_deref()) {
            *serial_count.entry(s).or_default() += 1;
        }
    }
    let mut probes = Vec::new();
    for d in devices {
        let serial = usable_serial(d.serial.as_deref());
        let base_id = match serial {
            Some(s) if !naming.ids_by_port && serial_count.get(s) == Some(&1) => format!("usb:{s}"),
            _ => format!("usb@{}", d.port_path),
        };
        let name = d
            .product
            .clone()
            .or_else(|| known_probe_name(d.vid, d.pid).map(str::to_string))
            .unwrap_or_else(|| "configured USB identity".to_string());
        let info = |id: String, tty: Option<&super::sysfs::UsbTty>, description: String| ProbeInfo {
            id,
            kind: ProbeKind::UsbSerial,
            vid_pid: Some((d.vid, d.pid)),
            usb_serial: d.serial.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_string),
            port_path: Some(d.port_path.clone()),
            tty: tty.map(|t| t.path.clone()),
            target: tty.map_or_else(String::new, |t| {
                TargetAddr::Serial {
                    path: t.path.to_string_lossy().into_owned(),
                    baud: naming.baud,
                    parity: SerialParity::Even,
                }
                .to_string()
            }),
            description,
        };
        let ttys = sysfs.ttys(&d.port_path);
        match ttys.as_slice() {
            [] => probes.push(info(base_id, None, format!("{name} (no serial interface)"))),
            [tty] => probes.push(info(base_id, Some(tty), name)),
            many => {
                for tty in many {
                    let id = format!("{base_id}:if{}", tty.interface);
                    probes.push(info(id, Some(tty), format!("{name} interface {}", tty.interface)));
                }
            }
        }
    }
    probes
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::sysfs::fake;
    use super::*;

    fn dev(path: &str, vid: u16, pid: u16, serial: Option<&str>) -> UsbDevice {
        UsbDevice { port_path: path.into(), vid, pid, serial: serial.map(str::to_string), product: None }
    }

    const NAMING: UsbNaming = UsbNaming { ids_by_port: false, baud: 115_200 };

    #[test]
    fn profile_identities_are_recognised() {
        for (vid, pid) in [
            (0x0483, 0xdf11),
            (0x0483, 0x3748),
            (0x0483, 0x374b),
            (0x0483, 0x374e),
            (0x0483, 0x374f),
            (0x0483, 0x3753),
            (0x0483, 0x5740),
            (0x1366, 0x0101),
            (0x1366, 0x0105),
            (0x1366, 0x1015),
            (0x1366, 0x1050),
            (0x1366, 0x1069),
            (0x0403, 0x6001),
            (0x0403, 0x6010),
            (0x0403, 0x6014),
            (0x10c4, 0xea60),
            (0x1a86, 0x7523),
        ] {
            assert!(is_probe_id(vid, pid, &[]), "{}", format_vid_pid((vid, pid)));
        }
        for (vid, pid) in [(0x1366, 0x0106), (0x1366, 0x1014), (0x1366, 0x106a), (0x0483, 0x3749), (0x046d, 0xc52b)] {
            assert!(!is_probe_id(vid, pid, &[]), "{}", format_vid_pid((vid, pid)));
        }
        assert!(is_probe_id(0x2e8a, 0x000a, &[(0x2e8a, 0x000a)]));
        assert_eq!(known_probe_name(0x0483, 0x374b), Some("ST-LINK/V2-1"));
        assert_eq!(format_vid_pid((0x0483, 0xdf11)), "0483:df11");
    }

    #[test]
    fn port_paths_follow_sysfs_names() {
        assert_eq!(port_path(1, &[2]).as_deref(), Some("1-2"));
        assert_eq!(port_path(3, &[1, 4, 2]).as_deref(), Some("3-1.4.2"));
        assert_eq!(port_path(1, &[]), None);
        let mut paths = vec!["1-10", "1-9", "2-1", "1-9.2"];
        paths.sort_by_key(|p| port_path_key(p));
        assert_eq!(paths, ["1-9", "1-9.2", "1-10", "2-1"]);
    }

    #[test]
    fn ids_use_unique_serials_and_fall_back_to_port_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (path, tty) in [("1-1", "ttyUSB0"), ("1-2", "ttyUSB1"), ("1-3", "ttyUSB2"), ("1-4", "ttyUSB3")] {
            fake::usb_serial_tty(root, path, 0, tty);
        }
        let devices = [
            dev("1-1", 0x0403, 0x6001, Some("A50285BI")),
            dev("1-2", 0x0483, 0xdf11, Some("DUP")),
            dev("1-3", 0x0483, 0xdf11, Some("DUP")),
            dev("1-4", 0x1a86, 0x7523, None),
        ];
        let probes = usb_probes(&devices, &Sysfs::new(root), NAMING);
        let ids: Vec<_> = probes.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["usb:A50285BI", "usb@1-2", "usb@1-3", "usb@1-4"]);
        let p = &probes[0];
        assert_eq!(p.kind, ProbeKind::UsbSerial);
        assert_eq!(p.vid_pid, Some((0x0403, 0x6001)));
        assert_eq!(p.usb_serial.as_deref(), Some("A50285BI"));
        assert_eq!(p.port_path.as_deref(), Some("1-1"));
        assert_eq!(p.tty.as_deref(), Some(std::path::Path::new("/dev/ttyUSB0")));
        assert_eq!(p.target, "serial:/dev/ttyUSB0?baud=115200");
        assert_eq!(p.description, "FTDI FT232R");
        assert_eq!(probes[1].usb_serial.as_deref(), Some("DUP"));
        assert_eq!(probes[3].usb_serial, None);

        let by_port = usb_probes(&devices[..1], &Sysfs::new(root), UsbNaming { ids_by_port: true, baud: 57_600 });
        assert_eq!(by_port[0].id, "usb@1-1");
        assert_eq!(by_port[0].target, "serial:/dev/ttyUSB0?baud=57600");
    }

    #[test]
    fn odd_serials_are_not_used_in_ids() {
        let devices = [dev("1-1", 0x0403, 0x6001, Some("  ")), dev("1-2", 0x0403, 0x6001, Some("a b"))];
        let probes = usb_probes(&devices, &Sysfs::new("/nonexistent"), NAMING);
        assert_eq!(probes[0].id, "usb@1-1");
        assert_eq!(probes[0].usb_serial, None);
        assert_eq!(probes[1].id, "usb@1-2");
        assert_eq!(probes[1].usb_serial.as_deref(), Some("a b"));
    }

    #[test]
    fn multi_tty_devices_get_one_probe_per_interface_and_ttyless_ones_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake::device(root, "2-1.1", Some("FT2232X"), Some("Dual RS232-HS"));
        fake::usb_serial_tty(root, "2-1.1", 0, "ttyUSB4");
        fake::usb_serial_tty(root, "2-1.1", 1, "ttyUSB5");
        let devices = [
            UsbDevice { product: Some("Dual RS232-HS".into()), ..dev("2-1.1", 0x0403, 0x6010, Some("FT2232X")) },
            dev("2-1.2", 0x0483, 0xdf11, Some("3574364C3034")),
        ];
        let probes = usb_probes(&devices, &Sysfs::new(root), NAMING);
        assert_eq!(probes.len(), 3);
        assert_eq!(probes[0].id, "usb:FT2232X:if0");
        assert_eq!(probes[0].target, "serial:/dev/ttyUSB4?baud=115200");
        assert_eq!(probes[0].description, "Dual RS232-HS interface 0");
        assert_eq!(probes[1].id, "usb:FT2232X:if1");
        assert_eq!(probes[1].tty.as_deref(), Some(std::path::Path::new("/dev/ttyUSB5")));
        assert_eq!(probes[2].id, "usb:3574364C3034");
        assert_eq!(probes[2].tty, None);
        assert_eq!(probes[2].target, "");
        assert!(!probes[2].is_connectable());
        assert_eq!(probes[2].description, "STM32 DFU bootloader (no serial interface)");
    }

    #[test]
    #[ignore = "needs real USB hardware and a usable libusb (/dev/bus/usb); run on a station"]
    fn enumerates_real_usb_devices() {
        let devices = UsbEnumerator::new().enumerate(&[], &Sysfs::default()).expect("libusb works here");
        for d in &devices {
            println!("{} {} {:?} {:?}", d.port_path, format_vid_pid((d.vid, d.pid)), d.serial, d.product);
            assert!(is_probe_id(d.vid, d.pid, &[]));
        }
    }
}
