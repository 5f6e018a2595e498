//! How every Flashgate daemon reads its configuration: a TOML file overlaid with `FLASHGATE_*`
//! environment variables through the `config` crate (nested keys with a double underscore,
//! `FLASHGATE_LEDGER__URL`), and human durations (`"5s"`, `"250ms"`) in those files. The broker's
//! and the agent's configuration modules own their schemas and checks; this module owns the loading
//! and where a file's relative paths land ([`PathBases`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The file, or an override, does not load or does not match the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration {source_name}: {reason}")]
pub struct LoadError {
    /// The file.
    pub source_name: String,
    /// What is wrong (the config crate's message names the key).
    pub reason: String,
}

/// Deserializes a human duration (`"5s"`, `"250ms"`, `"2m"`) for `#[serde(deserialize_with = …)]`.
pub fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("duration {s:?}: {e}")))
}

/// Loads `path` (TOML) overlaid with the `FLASHGATE_*` entries of `env`: nested keys
/// (`FLASHGATE_SECTION__KEY`) and the top-level variables named in `top_level` (`FLASHGATE_NAME`).
/// Other `FLASHGATE_*` variables (`FLASHGATE_LOG`, secrets) are not configuration keys and are
/// ignored. Keys in `list_keys` (dotted, e.g. `broker.endpoints`) take comma-separated lists.
pub fn load_toml<T: DeserializeOwned>(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    top_level: &[&str],
    list_keys: &[&str],
) -> Result<T, LoadError> {
    let overrides: HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| {
            k.strip_prefix("FLASHGATE_").is_some_and(|rest| rest.contains("__")) || top_level.contains(&k.as_str())
        })
        .collect();
    let mut environment = config::Environment::with_prefix("FLASHGATE")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        .try_parsing(true)
        .source(Some(overrides));
    for key in list_keys {
        environment = environment.with_list_parse_key(key);
    }
    let error = |e: config::ConfigError| LoadError { source_name: path.display().to_string(), reason: e.to_string() };
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml).required(true))
        .add_source(environment)
        .build()
        .map_err(error)?
        .try_deserialize()
        .map_err(error)
}

/// The variable systemd sets to the unit's `StateDirectory=` (e.g. `/var/lib/flashgate`; several
/// directories are separated by `:`, the first is used).
pub const STATE_DIRECTORY_ENV: &str = "STATE_DIRECTORY";

/// The variable systemd sets to the directory holding the unit's `LoadCredential=` files
/// (`/run/credentials/UNIT`).
pub const CREDENTIALS_DIRECTORY_ENV: &str = "CREDENTIALS_DIRECTORY";

/// Where the relative paths of a configuration file land, by kind of file:
///
/// - files read only (certificates, keys, vendor CA keys): the file's own directory;
/// - state written at run time (keystore, SQLite ledger, journal, image cache): the state directory
///   systemd gives the unit (`StateDirectory=`, in [`STATE_DIRECTORY_ENV`]), else the file's directory;
/// - secret files (passphrase, PINs): the unit's credentials directory (`LoadCredential=`, in
///   [`CREDENTIALS_DIRECTORY_ENV`]), else the file's directory.
///
/// Outside systemd everything is relative to the file's directory, so a configuration copied into a
/// working directory keeps all its files there; installed as `/etc/flashgate/broker.toml` under the
/// units of `deploy/systemd/`, the state lands in writable `/var/lib/flashgate` and the secrets come
/// from `/run/credentials/…`. Absolute paths are taken as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathBases {
    /// The configuration file's directory (empty: the working directory).
    pub config: PathBuf,
    /// Base of relative state paths.
    pub state: PathBuf,
    /// Base of relative secret files.
    pub credentials: PathBuf,
    /// Whether `credentials` is systemd's credentials directory.
    systemd_credentials: bool,
}

impl PathBases {
    /// The bases for the configuration file `path`, given the process environment `env` (only
    /// [`STATE_DIRECTORY_ENV`] and [`CREDENTIALS_DIRECTORY_ENV`] are read; a value that is empty or
    /// not an absolute path is ignored).
    pub fn new<'a>(path: &Path, env: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        // Absolute, so that what the paths resolve to does not depend on a later working directory and a
        // caller that joins a base onto them again changes nothing (`--config sub/broker.toml`).
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let config = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
        let (mut state, mut credentials) = (None, None);
        for (k, v) in env {
            let first = v.split(':').next().map(PathBuf::from).filter(|p| p.is_absolute());
            match k {
                STATE_DIRECTORY_ENV => state = first,
                CREDENTIALS_DIRECTORY_ENV => credentials = Some(PathBuf::from(v)).filter(|p| p.is_absolute()),
                _ => {}
            }
        }
        Self {
            state: state.unwrap_or_else(|| config.clone()),
            systemd_credentials: credentials.is_some(),
            credentials: credentials.unwrap_or_else(|| config.clone()),
            config,
        }
    }

    /// A read-only file named in the configuration.
    pub fn config_file(&self, p: &Path) -> PathBuf {
        join(&self.config, p)
    }

    /// A state file or directory named in the configuration.
    pub fn state_file(&self, p: &Path) -> PathBuf {
        join(&self.state, p)
    }

    /// A secret file named in the configuration.
    pub fn secret_file(&self, p: &Path) -> PathBuf {
        join(&self.credentials, p)
    }

    /// Whether secret files resolve against a systemd credentials directory.
    pub fn has_credentials_dir(&self) -> bool {
        self.systemd_credentials
    }
}

fn join(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_relative_config_path_resolves_against_the_working_directory_once() {
        let cwd = std::env::current_dir().unwrap();
        let b = PathBases::new(Path::new("sub/broker.toml"), std::iter::empty());
        let p = b.config_file(Path::new("vendor/v.pub"));
        assert!(p.is_absolute(), "{}", p.display());
        assert!(p.ends_with("sub/vendor/v.pub") && p.starts_with(&cwd), "{}", p.display());
        let here = PathBases::new(Path::new("broker.toml"), std::iter::empty()).config_file(Path::new("a.pem"));
        assert!(here.is_absolute() && here.ends_with("a.pem"), "{}", here.display());
    }

    #[derive(Debug, Deserialize)]
    struct Doc {
        name: String,
        sect: Sect,
    }

    #[derive(Debug, Deserialize)]
    struct Sect {
        #[serde(deserialize_with = "duration")]
        every: Duration,
        list: Vec<String>,
    }

    #[test]
    fn file_then_environment_and_only_configuration_variables() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.toml");
        std::fs::write(&p, "name = \"a\"\n[sect]\nevery = \"2s\"\nlist = [\"x\"]\n").unwrap();
        let env =
            [("FLASHGATE_NAME", "b"), ("FLASHGATE_SECT__LIST", "y,z"), ("FLASHGATE_LOG", "debug"), ("OTHER__X", "1")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let d: Doc = load_toml(&p, env.clone(), &["FLASHGATE_NAME"], &["sect.list"]).unwrap();
        assert_eq!((d.name.as_str(), d.sect.every, d.sect.list.len()), ("b", Duration::from_secs(2), 2));
        let d: Doc = load_toml(&p, env, &[], &["sect.list"]).unwrap();
        assert_eq!(d.name, "a", "top-level variables apply only when named");
        std::fs::write(&p, "name = \"a\"\n[sect]\nevery = \"soon\"\nlist = []\n").unwrap();
        let e = load_toml::<Doc>(&p, Vec::new(), &[], &[]).unwrap_err().to_string();
        assert!(e.contains("soon") && e.contains("x.toml"), "{e}");
    }

    #[test]
    fn relative_paths_land_by_kind_of_file() {
        let none = PathBases::new(Path::new("/etc/flashgate/broker.toml"), std::iter::empty());
        assert_eq!(none.state_file(Path::new("ledger.db")), Path::new("/etc/flashgate/ledger.db"));
        assert_eq!(none.secret_file(Path::new("pin")), Path::new("/etc/flashgate/pin"));
        assert!(!none.has_credentials_dir());
        let unit = PathBases::new(
            Path::new("/etc/flashgate/broker.toml"),
            [
                (STATE_DIRECTORY_ENV, "/var/lib/flashgate:/var/lib/other"),
                (CREDENTIALS_DIRECTORY_ENV, "/run/credentials/flashgate-broker.service"),
                ("HOME", "/root"),
            ],
        );
        assert_eq!(unit.config_file(Path::new("pki/ca.pem")), Path::new("/etc/flashgate/pki/ca.pem"));
        assert_eq!(unit.state_file(Path::new("ledger.db")), Path::new("/var/lib/flashgate/ledger.db"));
        assert_eq!(
            unit.secret_file(Path::new("token-pin")),
            Path::new("/run/credentials/flashgate-broker.service/token-pin")
        );
        assert_eq!(unit.state_file(Path::new("/srv/l.db")), Path::new("/srv/l.db"), "absolute paths stay");
        assert!(unit.has_credentials_dir());
        // A relative or empty value is not a systemd directory: ignored.
        let odd = PathBases::new(
            Path::new("line/broker.toml"),
            [(STATE_DIRECTORY_ENV, "state"), (CREDENTIALS_DIRECTORY_ENV, "")],
        );
        // (A relative configuration path is made absolute against the working directory, once.)
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(odd.state_file(Path::new("keys.fgks")), cwd.join("line/keys.fgks"));
        assert_eq!(
            PathBases::new(Path::new("broker.toml"), std::iter::empty()).config_file(Path::new("a")),
            cwd.join("a")
        );
    }
}
