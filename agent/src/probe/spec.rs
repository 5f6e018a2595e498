//! Configured probes and discovery settings: [`ProbeSpec`] (parsed from `serial:/dev/ttyUSB0?baud=115200`,
//! `tcp://host:port` or `sim:N`, each optionally carrying `id=NAME` in its query), [`ProbeConfig`]
//! (its `agent.toml` form: a plain string or a `{ id, target }` table) and [`ProbeSettings`]
//! (everything discovery and the watcher need).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::usb::format_vid_pid;
use super::{ProbeError, ProbeInfo, ProbeKind};
use crate::bootloader::TargetAddr;
use crate::bootloader::transport::DEFAULT_BAUD;

/// Where a configured probe's bootloader is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEndpoint {
    /// A serial port or a TCP byte stream.
    Target(TargetAddr),
    /// Target number `N` of the in-process simulator (`sim:N`); the runner resolves it.
    Sim(u32),
}

impl ProbeEndpoint {
    /// The kind of probe this endpoint makes.
    pub fn kind(&self) -> ProbeKind {
        match self {
            ProbeEndpoint::Target(TargetAddr::Serial { .. }) => ProbeKind::Serial,
            ProbeEndpoint::Target(TargetAddr::Tcp(_)) => ProbeKind::Tcp,
            ProbeEndpoint::Sim(_) => ProbeKind::Sim,
        }
    }
}

impl fmt::Display for ProbeEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeEndpoint::Target(t) => t.fmt(f),
            ProbeEndpoint::Sim(n) => write!(f, "sim:{n}"),
        }
    }
}

impl FromStr for ProbeEndpoint {
    type Err = ProbeError;

    /// Parse `sim:N` or anything [`TargetAddr`] accepts.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(n) = s.strip_prefix("sim:") {
            return n.parse::<u32>().map(ProbeEndpoint::Sim).map_err(|_| ProbeError::Spec {
                spec: s.to_string(),
                reason: format!("simulator index {n:?} is not a number"),
            });
        }
        s.parse::<TargetAddr>()
            .map(ProbeEndpoint::Target)
            .map_err(|source| ProbeError::Target { spec: s.to_string(), source })
    }
}

/// A configured probe: where it is and, optionally, the id the operator gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Operator-given id; when absent the id is the target itself ([`ProbeSpec::id`]).
    pub id: Option<String>,
    /// Where the bootloader is reached.
    pub endpoint: ProbeEndpoint,
}

impl ProbeSpec {
    /// The probe's id: the operator's, or the target string (`serial:/dev/ttyUSB0`, without
    /// line options, `tcp://host:port`, `sim:N`).
    pub fn id(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        match &self.endpoint {
            ProbeEndpoint::Target(TargetAddr::Serial { path, .. }) => format!("serial:{path}"),
            other => other.to_string(),
        }
    }

    /// The kind of probe.
    pub fn kind(&self) -> ProbeKind {
        self.endpoint.kind()
    }

    /// The target string to connect to (`TargetAddr` syntax, or `sim:N`).
    pub fn target(&self) -> String {
        self.endpoint.to_string()
    }

    /// The serial device path, for a serial probe.
    pub fn serial_path(&self) -> Option<&str> {
        match &self.endpoint {
            ProbeEndpoint::Target(TargetAddr::Serial { path, .. }) => Some(path),
            _ => None,
        }
    }

    /// The simulator index, for a `sim:N` probe.
    pub fn sim_index(&self) -> Option<u32> {
        match self.endpoint {
            ProbeEndpoint::Sim(n) => Some(n),
            _ => None,
        }
    }

    /// The probe as listed before any USB information is merged in.
    pub fn to_info(&self) -> ProbeInfo {
        ProbeInfo {
            id: self.id(),
            kind: self.kind(),
            vid_pid: None,
            usb_serial: None,
            port_path: None,
            tty: self.serial_path().map(PathBuf::from),
            target: self.target(),
            description: match &self.endpoint {
                ProbeEndpoint::Target(TargetAddr::Serial { .. }) => "configured serial port".to_string(),
                ProbeEndpoint::Target(TargetAddr::Tcp(_)) => "configured serial-over-TCP".to_string(),
                ProbeEndpoint::Sim(n) => format!("simulated target {n}"),
            },
        }
    }
}

/// Check an operator-given id: non-empty, printable, no whitespace.
fn check_id(spec: &str, id: &str) -> Result<(), ProbeError> {
    if id.is_empty()
        || !id.chars().all(|c| c.is_ascii_graphic() || (!c.is_ascii() && !c.is_whitespace() && !c.is_control()))
    {
        return Err(ProbeError::Spec {
            spec: spec.to_string(),
            reason: format!("id {id:?} must be non-empty and without spaces or control characters"),
        });
    }
    Ok(())
}

impl FromStr for ProbeSpec {
    type Err = ProbeError;

    /// Parse `serial:PATH[?baud=N][&parity=…][&id=NAME]`, `tcp://HOST:PORT[?id=NAME]` or
    /// `sim:N[?id=NAME]`. The `id=` option is taken out before the rest is parsed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s_trim = s.trim();
        let (base, query) = s_trim.split_once('?').unwrap_or((s_trim, ""));
        let mut id = None;
        let mut kept = Vec::new();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.strip_prefix("id=") {
                Some(value) => {
                    if id.replace(value.to_string()).is_some() {
                        return Err(ProbeError::Spec { spec: s.to_string(), reason: "id= is given twice".to_string() });
                    }
                    check_id(s, value)?;
                }
                None => kept.push(kv),
            }
        }
        let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        let endpoint = rest.parse::<ProbeEndpoint>().map_err(|e| match e {
            // Name the operator's whole string, not the id-less remainder.
            ProbeError::Target { source, .. } => ProbeError::Target { spec: s.to_string(), source },
            ProbeError::Spec { reason, .. } => ProbeError::Spec { spec: s.to_string(), reason },
            other => other,
        })?;
        Ok(ProbeSpec { id, endpoint })
    }
}

impl fmt::Display for ProbeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = self.target();
        match &self.id {
            None => f.write_str(&target),
            Some(id) => {
                let sep = if target.contains('?') { '&' } else { '?' };
                write!(f, "{target}{sep}id={id}")
            }
        }
    }
}

/// A probe as written in `agent.toml`: either a plain string
/// (`"serial:/dev/ttyUSB0?baud=115200&id=bench-1"`) or a table (`{ id = "bench-1", target =
/// "tcp://ser2net:7000" }`). Validated by [`ProbeConfig::spec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RawProbeConfig")]
pub struct ProbeConfig {
    /// Operator-given id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `serial:…`, `tcp://…` or `sim:N`.
    pub target: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeConfigTable {
    #[serde(default)]
    id: Option<String>,
    target: String,
}

/// String-or-table form of [`ProbeConfig`], with errors that name the table's keys.
struct RawProbeConfig(ProbeConfig);

impl From<RawProbeConfig> for ProbeConfig {
    fn from(raw: RawProbeConfig) -> Self {
        raw.0
    }
}

impl<'de> Deserialize<'de> for RawProbeConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawProbeConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a probe target string or a table with `target` and optional `id`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawProbeConfig(ProbeConfig { id: None, target: v.to_string() }))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let t = ProbeConfigTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawProbeConfig(ProbeConfig { id: t.id, target: t.target }))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl ProbeConfig {
    /// A configured probe without an operator id.
    pub fn new(target: impl Into<String>) -> Self {
        Self { id: None, target: target.into() }
    }

    /// Parse and check it. The table's `id` and an `id=` in the target must agree if both are given.
    pub fn spec(&self) -> Result<ProbeSpec, ProbeError> {
        let mut spec: ProbeSpec = self.target.parse()?;
        if let Some(id) = &self.id {
            check_id(&self.target, id)?;
            match &spec.id {
                Some(inner) if inner != id => {
                    return Err(ProbeError::Spec {
                        spec: self.target.clone(),
                        reason: format!("id {id:?} disagrees with id={inner} in the target"),
                    });
                }
                _ => spec.id = Some(id.clone()),
            }
        }
        Ok(spec)
    }
}

/// Default re-scan interval of the [`ProbeWatcher`](super::ProbeWatcher).
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(2);

/// Everything probe discovery needs. `Default` = no configured probes, USB discovery on with the
/// §7 identities, 115200 baud, `/sys`, a 2 s re-scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeSettings {
    /// Probes given by address.
    pub probes: Vec<ProbeConfig>,
    /// Look for USB probes at all (off for simulator-only or TCP-only stations).
    pub usb_scan: bool,
    /// VID:PIDs to treat as probes in addition to the §7 list; `"1234:abcd"` strings or
    /// `[0x1234, 0xabcd]` pairs in TOML.
    #[serde(with = "usb_id_list")]
    pub extra_ids: Vec<(u16, u16)>,
    /// Name every USB probe by port path (`usb@1-2.3`), for stations whose adapters all share
    /// one serial number.
    pub ids_by_port: bool,
    /// Baud rate of discovered USB-serial probes.
    pub usb_baud: u32,
    /// Where sysfs is mounted.
    pub sysfs_root: PathBuf,
    /// How often the watcher re-scans (humantime text in TOML: `"2s"`).
    #[serde(with = "duration_text")]
    pub scan_interval: Duration,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            probes: Vec::new(),
            usb_scan: true,
            extra_ids: Vec::new(),
            ids_by_port: false,
            usb_baud: DEFAULT_BAUD,
            sysfs_root: PathBuf::from(super::sysfs::DEFAULT_SYSFS_ROOT),
            scan_interval: DEFAULT_SCAN_INTERVAL,
        }
    }
}

/// Parse `"vvvv:pppp"` (hex) into a VID:PID pair.
pub fn parse_usb_id(text: &str) -> Result<(u16, u16), ProbeError> {
    let bad = |reason: &str| ProbeError::UsbId { value: text.to_string(), reason: reason.to_string() };
    let (vid, pid) = text.trim().split_once(':').ok_or_else(|| bad("expected VID:PID in hex, e.g. 0483:5740"))?;
    let hex = |part: &str| {
        let part = part.trim_start_matches("0x");
        if part.is_empty() || part.len() > 4 {
            return Err(bad("each of VID and PID must be 1-4 hex digits"));
        }
        u16::from_str_radix(part, 16).map_err(|_| bad("each of VID and PID must be 1-4 hex digits"))
    };
    Ok((hex(vid)?, hex(pid)?))
}

mod usb_id_list {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{format_vid_pid, parse_usb_id};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Text(String),
        Pair(u16, u16),
    }

    pub fn serialize<S: Serializer>(ids: &[(u16, u16)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ids.iter().map(|id| format_vid_pid(*id)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u16, u16)>, D::Error> {
        Vec::<Entry>::deserialize(d)?
            .into_iter()
            .map(|e| match e {
                Entry::Pair(vid, pid) => Ok((vid, pid)),
                Entry::Text(t) => parse_usb_id(&t).map_err(serde::de::Error::custom),
            })
            .collect()
    }
}

mod duration_text {
    use std::time::Duration;

    use serde::Serializer;

    pub use flashgate_common::settings::duration as deserialize;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::bootloader::SerialParity;

    #[test]
    fn parses_the_three_forms_with_and_without_ids() {
        let s: ProbeSpec = "serial:/dev/ttyUSB0?baud=115200".parse().unwrap();
        assert_eq!(s.id, None);
        assert_eq!(s.id(), "serial:/dev/ttyUSB0");
        assert_eq!(s.kind(), ProbeKind::Serial);
        assert_eq!(s.target(), "serial:/dev/ttyUSB0?baud=115200");
        assert_eq!(s.serial_path(), Some("/dev/ttyUSB0"));

        let s: ProbeSpec = "serial:/dev/ttyS1?id=bench-1&baud=9600&parity=none".parse().unwrap();
        assert_eq!(s.id(), "bench-1");
        assert_eq!(
            s.endpoint,
            ProbeEndpoint::Target(TargetAddr::Serial {
                path: "/dev/ttyS1".into(),
                baud: 9600,
                parity: SerialParity::None
            })
        );
        assert_eq!(s.to_string(), "serial:/dev/ttyS1?baud=9600&parity=none&id=bench-1");
        assert_eq!(s.to_string().parse::<ProbeSpec>().unwrap(), s);

        let t: ProbeSpec = "tcp://ser2net.lab:7001?id=rack3".parse().unwrap();
        assert_eq!((t.id(), t.kind(), t.target()), ("rack3".into(), ProbeKind::Tcp, "tcp://ser2net.lab:7001".into()));
        let t: ProbeSpec = "tcp://[::1]:7000".parse().unwrap();
        assert_eq!(t.id(), "tcp://[::1]:7000");

        let m: ProbeSpec = "sim:3".parse().unwrap();
        assert_eq!((m.id(), m.kind(), m.sim_index()), ("sim:3".into(), ProbeKind::Sim, Some(3)));
        let m: ProbeSpec = "sim:0?id=s0".parse().unwrap();
        assert_eq!(m.to_string(), "sim:0?id=s0");
        let info = m.to_info();
        assert_eq!((info.id.as_str(), info.target.as_str(), info.tty.as_deref()), ("s0", "sim:0", None));
    }

    #[test]
    fn bad_specs_name_what_is_wrong() {
        let err = |s: &str| s.parse::<ProbeSpec>().unwrap_err().to_string();
        assert_eq!(err("sim:x"), "probe \"sim:x\": simulator index \"x\" is not a number");
        let e = err("serial:/dev/ttyUSB0?baud=fast&id=a");
        assert!(e.starts_with("probe \"serial:/dev/ttyUSB0?baud=fast&id=a\": target address"), "{e}");
        assert!(e.contains("baud \"fast\""), "{e}");
        assert!(err("usb:1234").contains("unknown scheme"));
        assert!(err("tcp://h:1?id=a&id=b").contains("id= is given twice"));
        assert!(err("sim:1?id=").contains("id \"\" must be non-empty"));
        assert!(err("tcp://h:1?id=a b").contains("without spaces"));
    }

    #[test]
    fn probe_config_takes_strings_and_tables() {
        #[derive(Deserialize)]
        struct File {
            probes: Vec<ProbeConfig>,
        }
        let f: File = serde_json::from_value(serde_json::json!({
            "probes": ["sim:1", {"id": "bench", "target": "tcp://h:7000"}, {"target": "serial:/dev/ttyS0?id=s"}]
        }))
        .unwrap();
        assert_eq!(f.probes[0], ProbeConfig::new("sim:1"));
        assert_eq!(f.probes[1].spec().unwrap().id(), "bench");
        assert_eq!(f.probes[2].spec().unwrap().id(), "s");
        let bad = serde_json::from_value::<File>(serde_json::json!({"probes": [{"target": "sim:1", "name": "x"}]}));
        assert!(bad.err().unwrap().to_string().contains("unknown field `name`"));
        let clash = ProbeConfig { id: Some("a".into()), target: "sim:1?id=b".into() };
        assert!(clash.spec().unwrap_err().to_string().contains("disagrees"));
        let same = ProbeConfig { id: Some("a".into()), target: "sim:1?id=a".into() };
        assert_eq!(same.spec().unwrap().id(), "a");
    }

    #[test]
    fn settings_deserialize_with_defaults_and_usb_ids() {
        let s: ProbeSettings = serde_json::from_value(serde_json::json!({
            "probes": ["tcp://h:7000"],
            "extra_ids": ["2e8a:000a", [4660, 43981]],
            "scan_interval": "500ms",
        }))
        .unwrap();
        assert_eq!(s.extra_ids, vec![(0x2e8a, 0x000a), (0x1234, 0xabcd)]);
        assert_eq!(s.scan_interval, Duration::from_millis(500));
        assert!(s.usb_scan);
        assert_eq!(s.usb_baud, 115_200);
        assert_eq!(s.sysfs_root, PathBuf::from("/sys"));
        let back = serde_json::to_value(&s).unwrap();
        assert_eq!(back["extra_ids"], serde_json::json!(["2e8a:000a", "1234:abcd"]));
        assert_eq!(serde_json::from_value::<ProbeSettings>(back).unwrap(), s);

        let e = serde_json::from_value::<ProbeSettings>(serde_json::json!({"extra_ids": ["0483-5740"]})).unwrap_err();
        assert!(e.to_string().contains("USB id \"0483-5740\""), "{e}");
        assert_eq!(parse_usb_id("0x0483:0xDF11").unwrap(), (0x0483, 0xdf11));
        assert!(parse_usb_id("12345:1").is_err());
        assert!(parse_usb_id(":1").is_err());
    }
}
