//! Step one: read the TOML file and the environment into one loose tree.

use std::path::PathBuf;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;

use super::error::{ConfigError, ConfigErrors};
use super::section::Section;
use super::{Component, Config};

/// The environment variable naming the config file when `--config` is absent.
pub const CONFIG_ENV: &str = "MAILAGENT_CONFIG";

/// Prefix of environment overrides.
const ENV_PREFIX: &str = "MAILAGENT_";

/// Where the configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The TOML file (`--config` or `MAILAGENT_CONFIG`); none means defaults
    /// and environment only.
    pub path: Option<PathBuf>,
    /// Environment variables to apply (the process environment in binaries;
    /// an explicit list in tests).
    pub env: Vec<(String, String)>,
}

impl LoadOptions {
    /// The file from `--config` (else `MAILAGENT_CONFIG`) and the process
    /// environment.
    pub fn from_process(config_flag: Option<PathBuf>) -> Self {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let path = config_flag.or_else(|| {
            env.iter()
                .find(|(k, _)| k == CONFIG_ENV)
                .map(|(_, v)| PathBuf::from(v))
                .filter(|p| !p.as_os_str().is_empty())
        });
        Self { path, env }
    }
}

/// Loads, applies defaults and validates the configuration for `component`.
/// Every problem found is returned at once.
pub fn load(options: &LoadOptions, component: Component) -> Result<Config, ConfigErrors> {
    let source = options
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "config".to_string());
    let (text, read_error) = match &options.path {
        None => (None, None),
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => (Some(text), None),
            Err(e) => (
                None,
                Some(ConfigError::new(
                    source.clone(),
                    format!("cannot read config file: {e}"),
                )),
            ),
        },
    };
    let loaded = load_text(text.as_deref(), &source, &options.env, component);
    match read_error {
        None => loaded,
        Some(e) => {
            let mut errors = vec![e];
            if let Err(more) = loaded {
                errors.extend(more.0);
            }
            Err(ConfigErrors(errors))
        }
    }
}

/// [`load`] from TOML text already read (`None`: defaults and environment
/// only); `source` names the text in errors. Also the entry point of the
/// `config` fuzz target.
pub fn load_text(
    text: Option<&str>,
    source: &str,
    env: &[(String, String)],
    component: Component,
) -> Result<Config, ConfigErrors> {
    let mut figment = Figment::new();
    if let Some(text) = text {
        figment = figment.merge(Toml::string(text));
    }
    let (env_tree, mut errors) = env_overrides(env);
    figment = figment.merge(Serialized::globals(env_tree));

    let tree = match figment.extract::<Dict>() {
        Ok(tree) => tree,
        Err(e) => {
            // figment's message names the TOML position; it never echoes secrets
            // because a parse error quotes at most the offending token.
            for err in e {
                errors.push(ConfigError::new(
                    source.to_string(),
                    format!("cannot parse: {}", err.kind),
                ));
            }
            return Err(ConfigErrors(errors));
        }
    };
    match super::parse(&tree, component) {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(more) => {
            errors.extend(more.0);
            Err(ConfigErrors(errors))
        }
    }
}

/// Turns `MAILAGENT_SECTION__KEY_NAME=value` into `{section: {key-name: value}}`.
/// Variables for other sections are ignored (the arrays come from the file);
/// a variable that looks like a misspelt override is an error. An empty
/// `…_FILE` variable sets nothing, so that a layer of environment (a
/// compose overlay) can take back the file an earlier layer named, e.g.
/// `MAILAGENT_REDIS__URL_FILE=` where `[redis] sentinels` replaces the URL;
/// any other empty value is kept (and an empty secret is refused).
fn env_overrides(env: &[(String, String)]) -> (Dict, Vec<ConfigError>) {
    let mut tree = Dict::new();
    let mut errors = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if name == CONFIG_ENV || (value.is_empty() && name.ends_with("_FILE")) {
            continue;
        }
        let lowered = rest.to_ascii_lowercase();
        let parts: Vec<String> = lowered.split("__").map(|p| p.replace('_', "-")).collect();
        let section = parts[0].as_str();
        if !env_sections().any(|s| s == section) {
            if parts.len() == 1 && env_sections().any(|s| section.starts_with(&format!("{s}-"))) {
                errors.push(ConfigError::new(
                    format!("environment {name}"),
                    "separate the section from the key with a double underscore, e.g. MAILAGENT_REDIS__URL".to_string(),
                ));
            }
            continue;
        }
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            errors.push(ConfigError::new(
                format!("environment {name}"),
                "names no key of the section".to_string(),
            ));
            continue;
        }
        insert(&mut tree, &parts, Value::from(value.clone()));
    }
    (tree, errors)
}

/// The sections the environment may override (§2): the single-valued ones.
fn env_sections() -> impl Iterator<Item = &'static str> {
    Section::ALL
        .into_iter()
        .filter(|s| s.is_single())
        .map(Section::key)
}

fn insert(tree: &mut Dict, path: &[String], value: Value) {
    if path.len() == 1 {
        tree.insert(path[0].clone(), value);
        return;
    }
    let entry = tree
        .entry(path[0].clone())
        .or_insert_with(|| Value::from(Dict::new()));
    if entry.as_dict().is_none() {
        *entry = Value::from(Dict::new());
    }
    if let Value::Dict(_, child) = entry {
        insert(child, &path[1..], value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_names_map_to_kebab_case_paths() {
        let (tree, errors) = env_overrides(&env(&[
            ("MAILAGENT_TOKEN_BROKER__ENCRYPTION_KEY_FILE", "/k"),
            ("MAILAGENT_REDIS__URL", "redis://h/1"),
            ("MAILAGENT_CONFIG", "/etc/x.toml"),
            ("MAILAGENT_TEST_REDIS_URL", "ignored"),
            ("PATH", "/bin"),
        ]));
        assert!(errors.is_empty(), "{errors:?}");
        let tb = tree["token-broker"].as_dict().unwrap();
        assert_eq!(tb["encryption-key-file"].as_str(), Some("/k"));
        assert_eq!(
            tree["redis"].as_dict().unwrap()["url"].as_str(),
            Some("redis://h/1")
        );
        assert_eq!(tree.len(), 2);
    }

    #[test]
    fn empty_file_env_override_sets_nothing() {
        let (tree, errors) = env_overrides(&env(&[
            ("MAILAGENT_REDIS__URL_FILE", ""),
            ("MAILAGENT_REDIS__SENTINELS", "redis://s1:26379"),
        ]));
        assert!(errors.is_empty());
        let redis = tree["redis"].as_dict().unwrap();
        assert!(!redis.contains_key("url-file"));
        assert!(redis.contains_key("sentinels"));
    }

    #[test]
    fn misspelt_env_override_is_reported() {
        let (_, errors) = env_overrides(&env(&[("MAILAGENT_REDIS_URL", "redis://x")]));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].path.contains("MAILAGENT_REDIS_URL"));
    }
}
