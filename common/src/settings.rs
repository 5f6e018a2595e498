//! How every Flashgate daemon reads its configuration: a TOML file overlaid with `FLASHGATE_*`
//! environment variables through the `config` crate (nested keys with a double underscore,
//! `FLASHGATE_LEDGER__URL`), and human durations (`"5s"`, `"250ms"`) in those files. The broker's
//! and the agent's configuration modules own their schemas and checks; this module owns the loading.

use std::collections::HashMap;
use std::path::Path;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

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
}
