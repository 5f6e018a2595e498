//! The agent's configuration: `agent.toml` (commented example in `deploy/config/agent.toml`) overlaid
//! with `FLASHGATE_*` environment variables through the `config` crate — nested keys with a double
//! underscore (`FLASHGATE_BROKER__ENDPOINTS=https://a:7443,https://b:7443`, `FLASHGATE_RUN__MAX_PARALLEL`).
//! [`AgentConfig::load_from`] takes the environment as an argument (the testable seam).

use std::path::{Path, PathBuf};
use std::time::Duration;

use flashgate_common::settings::{self, duration};
use flashgate_proto::transport::{BrokerUrl, TransportError};
use serde::Deserialize;

use crate::bootloader::ClientConfig;

/// Configuration errors, naming the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override does not load or match the schema.
    #[error(transparent)]
    Load(#[from] settings::LoadError),
    /// A value is present but unusable.
    #[error("configuration key {key} = {value:?}: {why}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// The value.
        value: String,
        /// Why.
        why: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Broker endpoints.
    pub broker: BrokerSection,
    /// The station certificate.
    pub tls: TlsSection,
    /// Journal and image cache.
    pub state: StateSection,
    /// Probes.
    #[serde(default)]
    pub probes: ProbesSection,
    /// Run behaviour.
    #[serde(default)]
    pub run: RunSection,
    /// Bootloader link settings.
    #[serde(default)]
    pub bootloader: BootloaderSection,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// The control stream to the broker (`flashgate agent serve`).
    #[serde(default)]
    pub station: StationSection,
}

/// `[broker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// `https://host:port` of every broker, tried in order with failover.
    pub endpoints: Vec<String>,
    /// TLS server name to verify instead of each endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Station certificate (PEM) with its SPIFFE identity.
    pub cert: PathBuf,
    /// Its key (PEM, 0600).
    pub key: PathBuf,
    /// The CA that signs brokers.
    pub ca: PathBuf,
}

/// `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    /// Directory of the journal (`journal/`) and the image cache (`images/`).
    pub dir: PathBuf,
}

/// One configured probe.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticProbe {
    /// Stable id (default: derived from the target).
    #[serde(default)]
    pub id: Option<String>,
    /// `serial:/dev/ttyUSB0?baud=115200`, `tcp://host:port`.
    pub target: String,
}

/// `[probes]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbesSection {
    /// Probes given by address.
    #[serde(default, rename = "static")]
    pub fixed: Vec<StaticProbe>,
    /// Discover USB-serial probes (profile §7 identities).
    #[serde(default = "yes")]
    pub usb_scan: bool,
    /// Re-scan interval.
    #[serde(default = "default_scan", deserialize_with = "duration")]
    pub scan_interval: Duration,
    /// Baud rate for discovered USB-serial probes.
    #[serde(default = "default_baud")]
    pub usb_baud: u32,
}

fn yes() -> bool {
    true
}
fn default_scan() -> Duration {
    Duration::from_secs(2)
}
fn default_baud() -> u32 {
    115_200
}

impl Default for ProbesSection {
    fn default() -> Self {
        Self { fixed: Vec::new(), usb_scan: true, scan_interval: default_scan(), usb_baud: default_baud() }
    }
}

/// `[run]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Installs in flight at once.
    #[serde(default = "default_parallel")]
    pub max_parallel: usize,
    /// Attempts per device.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Wait between looks for a responding bootloader.
    #[serde(default = "default_poll", deserialize_with = "duration")]
    pub poll_interval: Duration,
}

fn default_parallel() -> usize {
    16
}
fn default_attempts() -> u32 {
    3
}
fn default_poll() -> Duration {
    Duration::from_millis(250)
}

impl Default for RunSection {
    fn default() -> Self {
        Self { max_parallel: default_parallel(), max_attempts: default_attempts(), poll_interval: default_poll() }
    }
}

/// `[bootloader]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootloaderSection {
    /// Wait for an ACK after a frame.
    #[serde(default = "default_ack", deserialize_with = "duration")]
    pub ack_timeout: Duration,
    /// Resends of a command after a transient failure.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Wait for INSTALL's answer.
    #[serde(default = "default_install", deserialize_with = "duration")]
    pub install_timeout: Duration,
}

fn default_ack() -> Duration {
    Duration::from_secs(1)
}
fn default_retries() -> u32 {
    3
}
fn default_install() -> Duration {
    Duration::from_secs(60)
}

impl Default for BootloaderSection {
    fn default() -> Self {
        Self { ack_timeout: default_ack(), retries: default_retries(), install_timeout: default_install() }
    }
}

impl BootloaderSection {
    /// The host client's settings (the line baud is set per probe).
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            ack_timeout: self.ack_timeout,
            retries: self.retries,
            install_timeout: self.install_timeout,
            ..ClientConfig::default()
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Prometheus `/metrics` address; absent or empty: disabled.
    #[serde(default)]
    pub listen: Option<String>,
}

/// `[station]`: the station daemon's control stream to the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationSection {
    /// Between two heartbeats on the stream (probes, current batch, device counts).
    #[serde(default = "default_heartbeat", deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
}

fn default_heartbeat() -> Duration {
    crate::station::DEFAULT_HEARTBEAT_INTERVAL
}

impl Default for StationSection {
    fn default() -> Self {
        Self { heartbeat_interval: default_heartbeat() }
    }
}

impl AgentConfig {
    /// Loads `path` overlaid with the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    /// Loads `path` overlaid with the nested `FLASHGATE_*__*` entries of `env`, resolves relative paths
    /// ([`settings::PathBases`]: the TLS files against the file's directory, `[state] dir` against
    /// systemd's `STATE_DIRECTORY` when set, else the file's directory too), and validates.
    pub fn load_from(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut cfg: AgentConfig = settings::load_toml(path, env.iter().cloned(), &[], &["broker.endpoints"])?;
        let bases = settings::PathBases::new(path, env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for p in [&mut cfg.tls.cert, &mut cfg.tls.key, &mut cfg.tls.ca] {
            *p = bases.config_file(p);
        }
        cfg.state.dir = bases.state_file(&cfg.state.dir);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what the schema cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, value: String, why: &str| Err(ConfigError::Invalid { key: key.into(), value, why: why.into() });
        if self.broker.endpoints.is_empty() {
            return invalid("broker.endpoints", String::new(), "at least one broker endpoint is required");
        }
        for (i, e) in self.broker.endpoints.iter().enumerate() {
            if let Err(err) = BrokerUrl::parse(e) {
                let why = match err {
                    TransportError::Endpoint { reason, .. } => reason,
                    other => other.to_string(),
                };
                return invalid(&format!("broker.endpoints[{i}]"), e.clone(), &why);
            }
        }
        for (i, p) in self.probes.fixed.iter().enumerate() {
            if let Err(e) = p.target.parse::<crate::bootloader::TargetAddr>() {
                return invalid(&format!("probes.static[{i}].target"), p.target.clone(), &e.to_string());
            }
        }
        if self.run.max_parallel == 0 {
            return invalid("run.max_parallel", "0".into(), "at least 1");
        }
        if self.run.max_attempts == 0 {
            return invalid("run.max_attempts", "0".into(), "at least 1");
        }
        if self.station.heartbeat_interval.is_zero() {
            return invalid(
                "station.heartbeat_interval",
                humantime::format_duration(self.station.heartbeat_interval).to_string(),
                "must be longer than zero",
            );
        }
        Ok(())
    }

    /// Probe discovery settings: the configured probes plus USB discovery.
    pub fn probe_settings(&self) -> crate::probe::ProbeSettings {
        crate::probe::ProbeSettings {
            probes: self
                .probes
                .fixed
                .iter()
                .map(|p| crate::probe::ProbeConfig { id: p.id.clone(), target: p.target.clone() })
                .collect(),
            usb_scan: self.probes.usb_scan,
            usb_baud: self.probes.usb_baud,
            scan_interval: self.probes.scan_interval,
            ..crate::probe::ProbeSettings::default()
        }
    }

    /// The journal directory.
    pub fn journal_dir(&self) -> PathBuf {
        self.state.dir.join("journal")
    }

    /// The image cache directory.
    pub fn image_dir(&self) -> PathBuf {
        self.state.dir.join("images")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, text).unwrap();
        AgentConfig::load_from(&p, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    const GOOD: &str = r#"
[broker]
endpoints = ["https://127.0.0.1:7443"]
[tls]
cert = "s.pem"
key = "s.key"
ca = "ca.pem"
[state]
dir = "state"
[[probes.static]]
id = "fixture-1"
target = "tcp://127.0.0.1:7001"
"#;

    #[test]
    fn loads_with_defaults_and_overrides() {
        let c =
            load(GOOD, &[("FLASHGATE_BROKER__ENDPOINTS", "https://a:1,https://b:2"), ("FLASHGATE_LOG", "x")]).unwrap();
        assert_eq!(c.broker.endpoints, vec!["https://a:1", "https://b:2"]);
        assert_eq!(c.run.max_parallel, 16);
        assert!(c.state.dir.is_absolute());
        assert_eq!(c.probes.fixed[0].id.as_deref(), Some("fixture-1"));
        assert_eq!(c.station.heartbeat_interval, Duration::from_secs(5));
        let c = load(GOOD, &[("FLASHGATE_STATION__HEARTBEAT_INTERVAL", "2s")]).unwrap();
        assert_eq!(c.station.heartbeat_interval, Duration::from_secs(2));
    }

    #[test]
    fn negative_fixtures_name_the_key() {
        let e = load(&GOOD.replace("tcp://127.0.0.1:7001", "usb://x"), &[]).unwrap_err().to_string();
        assert!(e.contains("probes.static[0].target"), "{e}");
        let e = load(&GOOD.replace("https://127.0.0.1:7443", "http://x:1"), &[]).unwrap_err().to_string();
        assert!(e.contains("broker.endpoints[0]") && e.contains("only https"), "{e}");
        let e = load(GOOD, &[("FLASHGATE_BROKER__ENDPOINTS", "https://a:1,https://127.0.0.1:35359.")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker.endpoints[1]") && e.contains("https://127.0.0.1:35359."), "{e}");
        assert!(e.contains("port \"35359.\" is not a number from 1 to 65535"), "{e}");
        let e = load(&format!("{GOOD}\n[run]\nmax_paralel = 3\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("max_paralel"), "{e}");
        let e = load(&format!("{GOOD}\n[station]\nheartbeat_interval = \"0s\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("station.heartbeat_interval"), "{e}");
    }

    /// Under systemd (`StateDirectory=`) the journal and image cache land in the state directory, the
    /// station's certificate stays beside the configuration.
    #[test]
    fn state_lands_in_systemds_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, GOOD).unwrap();
        let env = [("STATE_DIRECTORY".to_string(), "/var/lib/flashgate-agent".to_string())];
        let c = AgentConfig::load_from(&p, env).unwrap();
        assert_eq!(c.state.dir, Path::new("/var/lib/flashgate-agent/state"));
        assert_eq!(c.tls.cert, dir.path().join("s.pem"));
        let c = AgentConfig::load_from(&p, std::iter::empty()).unwrap();
        assert_eq!(c.state.dir, dir.path().join("state"));
    }

    #[test]
    fn the_commented_example_in_deploy_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/agent.toml");
        AgentConfig::load_from(&p, std::iter::empty()).unwrap();
    }

    /// The example's probe is the first target of the simulator README.md starts.
    #[test]
    fn the_example_probe_is_the_readme_simulator() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let c = AgentConfig::load_from(&root.join("deploy/config/agent.toml"), std::iter::empty()).unwrap();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let listen = readme
            .lines()
            .filter(|l| l.trim_start().starts_with("flashgate sim "))
            .find_map(|l| l.split_whitespace().skip_while(|w| *w != "--listen").nth(1))
            .expect("README.md starts a simulator with --listen");
        assert_eq!(c.probes.fixed[0].target, format!("tcp://{listen}"), "README.md simulator: --listen {listen}");
    }
}
