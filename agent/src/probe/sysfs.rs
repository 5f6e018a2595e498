//! The Linux sysfs view of USB devices that probe discovery needs: which ttys a USB device's
//! interfaces expose (`/sys/bus/usb/devices/<path>:<config>.<iface>/ttyUSB*` for usb-serial
//! drivers, `.../tty/ttyACM*` for CDC ACM) and plain device attributes (`serial`, `product`).
//! Owns [`Sysfs`], which works against a configurable root so tests can build a fake tree in a
//! temporary directory. Every lookup is best-effort: a missing or unreadable file means "none".

use std::fs;
use std::path::{Path, PathBuf};

/// Default sysfs mount point.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";
/// Default directory of device nodes.
pub const DEFAULT_DEV_DIR: &str = "/dev";

/// A tty that one interface of a USB device exposes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsbTty {
    /// `bInterfaceNumber` of the interface (the `N` of `<path>:<config>.N`).
    pub interface: u8,
    /// Kernel name of the tty, e.g. `ttyUSB0` or `ttyACM1`.
    pub name: String,
    /// Its device node, e.g. `/dev/ttyUSB0`.
    pub path: PathBuf,
}

/// A sysfs tree (normally `/sys`) and the device directory its tty names resolve in (`/dev`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    root: PathBuf,
    dev_dir: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new(DEFAULT_SYSFS_ROOT)
    }
}

impl Sysfs {
    /// A sysfs tree mounted at `root`, with device nodes in `/dev`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), dev_dir: PathBuf::from(DEFAULT_DEV_DIR) }
    }

    /// The same tree with device nodes looked up in `dev_dir` instead of `/dev`.
    pub fn with_dev_dir(mut self, dev_dir: impl Into<PathBuf>) -> Self {
        self.dev_dir = dev_dir.into();
        self
    }

    /// The sysfs root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/bus/usb/devices`, where every USB device and interface has an entry.
    pub fn usb_devices_dir(&self) -> PathBuf {
        self.root.join("bus/usb/devices")
    }

    /// A device attribute such as `serial` or `product` of the USB device at `port_path`
    /// (`1-2.3`), trimmed; `None` when absent, unreadable or empty.
    pub fn attribute(&self, port_path: &str, name: &str) -> Option<String> {
        let text = fs::read_to_string(self.usb_devices_dir().join(port_path).join(name)).ok()?;
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_string())
    }

    /// The ttys the interfaces of the USB device at `port_path` expose, ordered by interface
    /// number then name. Looks at every `<port_path>:<config>.<iface>` entry for children named
    /// `tty*` (usb-serial drivers: `ttyUSB0`) and for the entries of its `tty/` child (CDC ACM:
    /// `tty/ttyACM0`). Empty when the device has no tty or the tree cannot be read.
    pub fn ttys(&self, port_path: &str) -> Vec<UsbTty> {
        let Ok(entries) = fs::read_dir(self.usb_devices_dir()) else {
            return Vec::new();
        };
        let mut ttys = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(interface) = name.to_str().and_then(|n| interface_of(n, port_path)) else {
                continue;
            };
            let dir = entry.path();
            for tty in tty_names(&dir) {
                let path = self.dev_dir.join(&tty);
                ttys.push(UsbTty { interface, name: tty, path });
            }
        }
        ttys.sort();
        ttys.dedup();
        ttys
    }
}

/// The interface number of sysfs entry `name` when it is an interface of the device at
/// `port_path` (`1-2.3:1.0` → 0 for `1-2.3`).
fn interface_of(name: &str, port_path: &str) -> Option<u8> {
    let rest = name.strip_prefix(port_path)?.strip_prefix(':')?;
    let (config, iface) = rest.split_once('.')?;
    config.parse::<u8>().ok()?;
    iface.parse::<u8>().ok()
}

/// Tty names under one interface directory: its `tty*` children and the children of `tty/`.
fn tty_names(interface_dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in fs::read_dir(interface_dir).into_iter().flatten().flatten() {
        let Ok(name) = entry.file_name().into_string() else { continue };
        if name == "tty" {
            let children = fs::read_dir(entry.path()).into_iter().flatten().flatten();
            names.extend(children.filter_map(|c| c.file_name().into_string().ok()).filter(|n| is_tty_name(n)));
        } else if is_tty_name(&name) {
            names.push(name);
        }
    }
    names
}

/// `ttyUSB0`, `ttyACM3` and the like: `tty` followed by something (not the `tty` class dir).
fn is_tty_name(name: &str) -> bool {
    name.strip_prefix("tty").is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// Helpers that build a fake sysfs tree; shared by the probe module's tests.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod fake {
    use std::fs;
    use std::path::Path;

    /// Create the device directory `port_path` with optional `serial` and `product` attributes.
    pub fn device(root: &Path, port_path: &str, serial: Option<&str>, product: Option<&str>) {
        let dir = root.join("bus/usb/devices").join(port_path);
        fs::create_dir_all(&dir).unwrap();
        if let Some(s) = serial {
            fs::write(dir.join("serial"), format!("{s}\n")).unwrap();
        }
        if let Some(p) = product {
            fs::write(dir.join("product"), format!("{p}\n")).unwrap();
        }
    }

    /// A usb-serial tty (`<path>:1.<iface>/ttyUSBn/tty/ttyUSBn`, as ftdi_sio, cp210x, ch341 do).
    pub fn usb_serial_tty(root: &Path, port_path: &str, iface: u8, tty: &str) {
        let dir = root.join("bus/usb/devices").join(format!("{port_path}:1.{iface}")).join(tty).join("tty").join(tty);
        fs::create_dir_all(dir).unwrap();
    }

    /// A CDC ACM tty (`<path>:1.<iface>/tty/ttyACMn`).
    pub fn acm_tty(root: &Path, port_path: &str, iface: u8, tty: &str) {
        let dir = root.join("bus/usb/devices").join(format!("{port_path}:1.{iface}")).join("tty").join(tty);
        fs::create_dir_all(dir).unwrap();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_usb_serial_and_acm_ttys_of_one_device_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake::device(root, "1-2", Some("FT1234"), Some("FT2232H"));
        fake::usb_serial_tty(root, "1-2", 1, "ttyUSB1");
        fake::usb_serial_tty(root, "1-2", 0, "ttyUSB0");
        fake::device(root, "1-2.4", Some("066DFF"), None);
        fake::acm_tty(root, "1-2.4", 2, "ttyACM0");
        // An interface without a tty (ST-LINK debug interface) and a hub's interface.
        fs::create_dir_all(root.join("bus/usb/devices/1-2.4:1.0")).unwrap();
        fs::create_dir_all(root.join("bus/usb/devices/1-0:1.0")).unwrap();

        let sysfs = Sysfs::new(root);
        let ttys = sysfs.ttys("1-2");
        assert_eq!(
            ttys,
            vec![
                UsbTty { interface: 0, name: "ttyUSB0".into(), path: "/dev/ttyUSB0".into() },
                UsbTty { interface: 1, name: "ttyUSB1".into(), path: "/dev/ttyUSB1".into() },
            ]
        );
        let acm = Sysfs::new(root).with_dev_dir("/fake/dev").ttys("1-2.4");
        assert_eq!(acm, vec![UsbTty { interface: 2, name: "ttyACM0".into(), path: "/fake/dev/ttyACM0".into() }]);
        assert!(sysfs.ttys("1-3").is_empty());
        assert_eq!(sysfs.attribute("1-2", "serial").as_deref(), Some("FT1234"));
        assert_eq!(sysfs.attribute("1-2.4", "product"), None);
        assert_eq!(sysfs.attribute("9-9", "serial"), None);
    }

    #[test]
    fn missing_tree_means_nothing_found() {
        let sysfs = Sysfs::new("/nonexistent/flashgate-sysfs");
        assert!(sysfs.ttys("1-1").is_empty());
        assert_eq!(sysfs.attribute("1-1", "serial"), None);
    }

    #[test]
    fn interface_names_match_exactly() {
        assert_eq!(interface_of("1-2:1.0", "1-2"), Some(0));
        assert_eq!(interface_of("1-2:2.3", "1-2"), Some(3));
        assert_eq!(interface_of("1-2.3:1.0", "1-2"), None);
        assert_eq!(interface_of("1-2", "1-2"), None);
        assert_eq!(interface_of("1-2:x.0", "1-2"), None);
        assert!(is_tty_name("ttyUSB0") && is_tty_name("ttyACM12"));
        assert!(!is_tty_name("tty") && !is_tty_name("power") && !is_tty_name("tty/x"));
    }
}
