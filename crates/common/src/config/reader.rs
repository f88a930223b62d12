//! The generic typed reader of the loose tree: each read takes a table, the
//! table's key path and a key, returns the typed value (or the default), and
//! records a [`ConfigError`] with the full key path instead of stopping.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use figment::value::{Dict, Value};

use super::error::ConfigError;
use super::section::Section;
use super::Component;
use crate::secret::{Secret, SecretUrl};

/// Collects errors while reading the loose tree.
pub(super) struct Walker {
    /// Every problem found so far.
    pub(super) errors: Vec<ConfigError>,
    /// The binary reading: decides which secret files are read.
    pub(super) component: Component,
}

/// The key path of `key` below `path` (`path.key`, or `key` at the top).
pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// What a value is, for "must be …, found …" messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::String(..) | Value::Char(..) => "a string",
        Value::Bool(..) => "a boolean",
        Value::Num(..) => "a number",
        Value::Empty(..) => "empty",
        Value::Dict(..) => "a table",
        Value::Array(..) => "an array",
    }
}

impl Walker {
    /// Records one problem at `path`.
    pub(super) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    /// Reports every key of `t` not in `known`, with a "did you mean" hint
    /// for a near miss (`lock_ttl` for `lock-ttl`).
    pub(super) fn unknown_keys(&mut self, t: &Dict, path: &str, known: &[&str]) {
        for key in t.keys() {
            if !known.contains(&key.as_str()) {
                let hint = known
                    .iter()
                    .find(|k| {
                        k.replace('-', "_") == key.as_str()
                            || k.replace('-', "") == key.replace(['_', '-'], "")
                    })
                    .map(|k| format!(" (did you mean {k:?}?)"))
                    .unwrap_or_default();
                self.err(join(path, key), format!("unknown key{hint}"));
            }
        }
    }

    /// The single table `[section]`. An absent one, or one that is not a
    /// table (an error), reads as empty: every key takes its default.
    pub(super) fn section<'a>(&mut self, tree: &'a Dict, section: Section) -> &'a Dict {
        static EMPTY: Dict = Dict::new();
        let key = section.key();
        match tree.get(key) {
            None => &EMPTY,
            Some(Value::Dict(_, d)) => d,
            Some(other) => {
                self.err(key, format!("must be a table, found {}", kind(other)));
                &EMPTY
            }
        }
    }

    /// The array of tables `[[section]]`, each with its key path
    /// (`section[i]`).
    pub(super) fn tables<'a>(
        &mut self,
        tree: &'a Dict,
        section: Section,
    ) -> Vec<(String, &'a Dict)> {
        let key = section.key();
        match tree.get(key) {
            None => Vec::new(),
            Some(Value::Array(_, items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::Dict(_, d) => Some((format!("{key}[{i}]"), d)),
                    other => {
                        self.err(
                            format!("{key}[{i}]"),
                            format!("must be a table, found {}", kind(other)),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.err(
                    key,
                    format!(
                        "must be an array of tables ([[{key}]]), found {}",
                        kind(other)
                    ),
                );
                Vec::new()
            }
        }
    }

    /// A string (numbers are taken as their text: environment values are
    /// strings and TOML values may be numbers).
    pub(super) fn string(&mut self, t: &Dict, path: &str, key: &str) -> Option<String> {
        match t.get(key)? {
            Value::String(_, s) => Some(s.clone()),
            Value::Char(_, c) => Some(c.to_string()),
            Value::Num(_, n) => n
                .to_i128()
                .map(|i| i.to_string())
                .or_else(|| n.to_f64().map(|f| f.to_string())),
            other => {
                self.err(
                    join(path, key),
                    format!("must be a string, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// A list of non-empty strings, or a comma-separated string (from the
    /// environment).
    pub(super) fn string_list(&mut self, t: &Dict, path: &str, key: &str) -> Vec<String> {
        match t.get(key) {
            None => Vec::new(),
            // From the environment: a comma-separated list.
            Some(Value::String(_, s)) => s
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
            Some(Value::Array(_, items)) => {
                let mut out = Vec::new();
                for (i, v) in items.iter().enumerate() {
                    match v {
                        Value::String(_, s) if !s.trim().is_empty() => out.push(s.clone()),
                        other => self.err(
                            format!("{}[{i}]", join(path, key)),
                            format!("must be a non-empty string, found {}", kind(other)),
                        ),
                    }
                }
                out
            }
            Some(other) => {
                self.err(
                    join(path, key),
                    format!("must be an array of strings, found {}", kind(other)),
                );
                Vec::new()
            }
        }
    }

    /// `true` or `false` (also as text, from the environment).
    pub(super) fn boolean(&mut self, t: &Dict, path: &str, key: &str, default: bool) -> bool {
        match t.get(key) {
            None => default,
            Some(Value::Bool(_, b)) => *b,
            Some(Value::String(_, s)) if s == "true" => true,
            Some(Value::String(_, s)) if s == "false" => false,
            Some(other) => {
                self.err(
                    join(path, key),
                    format!("must be true or false, found {}", kind(other)),
                );
                default
            }
        }
    }

    /// A whole number in `min..=max`.
    pub(super) fn int_in(
        &mut self,
        t: &Dict,
        path: &str,
        key: &str,
        min: u64,
        max: u64,
        default: u64,
    ) -> u64 {
        let value = match t.get(key) {
            None => return default,
            Some(Value::Num(_, n)) => match n.to_i128() {
                Some(i) => i,
                None => {
                    self.err(join(path, key), "must be a whole number");
                    return default;
                }
            },
            Some(Value::String(_, s)) => match s.trim().parse::<i128>() {
                Ok(i) => i,
                Err(_) => {
                    self.err(join(path, key), format!("{s:?} is not a whole number"));
                    return default;
                }
            },
            Some(other) => {
                self.err(
                    join(path, key),
                    format!("must be a whole number, found {}", kind(other)),
                );
                return default;
            }
        };
        if value < min as i128 || value > max as i128 {
            self.err(
                join(path, key),
                format!("{value} is out of range {min}..={max}"),
            );
            return default;
        }
        value as u64
    }

    /// A whole number of seconds in `min..=max`.
    pub(super) fn secs(
        &mut self,
        t: &Dict,
        path: &str,
        key: &str,
        min: u64,
        max: u64,
        default: u64,
    ) -> Duration {
        Duration::from_secs(self.int_in(t, path, key, min, max, default))
    }

    /// A number between 0 and 1.
    pub(super) fn fraction(&mut self, t: &Dict, path: &str, key: &str, default: f64) -> f64 {
        let v = match t.get(key) {
            None => return default,
            Some(Value::Num(_, n)) => n.to_f64(),
            Some(Value::String(_, s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        match v {
            Some(f) if (0.0..=1.0).contains(&f) => f,
            _ => {
                self.err(join(path, key), "must be a number between 0 and 1");
                default
            }
        }
    }

    /// A name used in keys, queues and metrics labels.
    pub(super) fn name(
        &mut self,
        t: &Dict,
        path: &str,
        key: &str,
        default: Option<&str>,
    ) -> Option<String> {
        let value = self
            .string(t, path, key)
            .or_else(|| default.map(String::from));
        let Some(value) = value else {
            self.err(join(path, key), "missing");
            return None;
        };
        let ok = !value.is_empty()
            && value.len() <= 64
            && value
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
        if !ok {
            self.err(
                join(path, key),
                format!("{value:?} must be 1-64 letters, digits, '-', '_', '.', '@', starting with a letter or digit"),
            );
            return None;
        }
        Some(value)
    }

    /// A secret given as `key` (value) or `key-file` (path). Returns the value
    /// when `read` (this component uses it), `None` otherwise.
    pub(super) fn secret(
        &mut self,
        t: &Dict,
        path: &str,
        key: &str,
        read: bool,
        required: bool,
    ) -> Option<Secret> {
        let file_key = format!("{key}-file");
        let inline = t.get(key);
        let file = t.get(&file_key);
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.err(
                    join(path, key),
                    format!("set either {key} or {file_key}, not both"),
                );
                None
            }
            (Some(Value::String(_, s)), None) => {
                if s.is_empty() {
                    self.err(join(path, key), "is empty");
                }
                read.then(|| Secret::new(s.clone()))
            }
            (Some(other), None) => {
                self.err(
                    join(path, key),
                    format!("must be a string, found {}", kind(other)),
                );
                None
            }
            (None, Some(Value::String(_, f))) => {
                if !read {
                    return None;
                }
                match std::fs::read_to_string(f) {
                    Ok(text) => {
                        let value = text.trim_end_matches(['\r', '\n']).to_string();
                        if value.is_empty() {
                            self.err(join(path, &file_key), format!("secret file {f} is empty"));
                        }
                        Some(Secret::new(value))
                    }
                    Err(e) => {
                        self.err(
                            join(path, &file_key),
                            format!("cannot read secret file {f}: {}", e.kind()),
                        );
                        None
                    }
                }
            }
            (None, Some(other)) => {
                self.err(
                    join(path, &file_key),
                    format!("must be a file path, found {}", kind(other)),
                );
                None
            }
            (None, None) => {
                if required {
                    self.err(
                        join(path, key),
                        format!("missing secret: set {key} or {file_key}"),
                    );
                }
                None
            }
        }
    }

    /// A URL that may hold credentials: `key` or `key-file`, with a default.
    pub(super) fn secret_url(
        &mut self,
        t: &Dict,
        path: &str,
        key: &str,
        default: &str,
        schemes: &[&str],
    ) -> SecretUrl {
        // URLs are read by every component: each one connects with them.
        let value = if t.contains_key(key) || t.contains_key(&format!("{key}-file")) {
            self.secret(t, path, key, true, false)
                .map(|s| s.expose().trim().to_string())
                .unwrap_or_else(|| default.to_string())
        } else {
            default.to_string()
        };
        let url = SecretUrl::new(value);
        self.check_url(&join(path, key), &url, schemes);
        url
    }

    /// Checks a URL that may hold credentials, reporting problems at
    /// `at` (a full key path) with the URL redacted.
    pub(super) fn check_url(&mut self, at: &str, url: &SecretUrl, schemes: &[&str]) {
        match url::Url::parse(url.expose()) {
            // redis-rs reads `rediss://…/#insecure` as "skip certificate
            // verification"; TLS is always verified here (spec §8).
            Ok(u) if u.fragment() == Some("insecure") => self.err(
                at,
                "#insecure would turn certificate verification off, which is not supported: remove it and trust the server's CA with [tls] extra-ca-file",
            ),
            Ok(u) if schemes.contains(&u.scheme()) => {}
            Ok(u) => self.err(
                at,
                format!(
                    "scheme {:?} not supported: expected {}",
                    u.scheme(),
                    schemes.join(" or ")
                ),
            ),
            Err(e) => self.err(at, format!("not a valid URL ({e}): {}", url.redacted())),
        }
    }

    /// An `https` URL (`http` too when `allow_insecure`).
    pub(super) fn url(
        &mut self,
        t: &Dict,
        path: &str,
        key: &str,
        allow_insecure: bool,
        required: bool,
    ) -> Option<url::Url> {
        let Some(text) = self.string(t, path, key) else {
            if required {
                self.err(join(path, key), "missing");
            }
            return None;
        };
        match url::Url::parse(&text) {
            Ok(u) if u.scheme() == "https" => Some(u),
            Ok(u) if u.scheme() == "http" && allow_insecure => Some(u),
            Ok(u) if u.scheme() == "http" => {
                self.err(
                    join(path, key),
                    "must be https (allow-insecure = true permits http, for tests only)",
                );
                Some(u)
            }
            Ok(u) => {
                self.err(
                    join(path, key),
                    format!("scheme {:?} not supported: expected https", u.scheme()),
                );
                None
            }
            Err(e) => {
                self.err(join(path, key), format!("not a valid URL: {e}"));
                None
            }
        }
    }

    /// Checks that `path` holds at least one PEM certificate.
    pub(super) fn check_ca_file(&mut self, path: &PathBuf, key: &str) {
        match std::fs::read(path) {
            Ok(bytes) => {
                let certs = rustls_pemfile::certs(&mut bytes.as_slice())
                    .filter(|c| c.is_ok())
                    .count();
                if certs == 0 {
                    self.err(key, format!("{} holds no PEM certificate", path.display()));
                }
            }
            Err(e) => self.err(key, format!("cannot read {}: {}", path.display(), e.kind())),
        }
    }

    /// Reports each repeated value of `names` in the array `section`, at
    /// `section[i].key`.
    pub(super) fn duplicates(
        &mut self,
        section: Section,
        names: impl Iterator<Item = String>,
        key: &str,
    ) {
        let section = section.key();
        let mut seen = HashSet::new();
        for (i, n) in names.enumerate() {
            if !seen.insert(n.clone()) {
                self.err(
                    format!("{section}[{i}].{key}"),
                    format!("duplicate {key} {n:?}"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walker() -> Walker {
        Walker {
            errors: Vec::new(),
            component: Component::Cli,
        }
    }

    fn table(toml: &str) -> Dict {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(toml))
            .extract()
            .unwrap()
    }

    fn messages(w: &Walker) -> Vec<String> {
        w.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn int_in_reports_the_key_path_and_keeps_the_default() {
        let cases: &[(&str, u64, &[&str])] = &[
            ("", 5, &[]),
            ("n = 7", 7, &[]),
            ("n = \"8\"", 8, &[]),
            ("n = 0", 5, &["s.n: 0 is out of range 1..=10"]),
            ("n = 1.5", 5, &["s.n: must be a whole number"]),
            ("n = \"x\"", 5, &["s.n: \"x\" is not a whole number"]),
            (
                "n = true",
                5,
                &["s.n: must be a whole number, found a boolean"],
            ),
        ];
        for (toml, want, errors) in cases {
            let mut w = walker();
            let got = w.int_in(&table(toml), "s", "n", 1, 10, 5);
            assert_eq!(got, *want, "{toml}");
            assert_eq!(messages(&w), *errors, "{toml}");
        }
    }

    #[test]
    fn string_list_takes_an_array_or_a_comma_separated_string() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("", &[], &[]),
            ("l = [\"a\", \"b\"]", &["a", "b"], &[]),
            ("l = \" a, b,\"", &["a", "b"], &[]),
            (
                "l = [\"a\", 3]",
                &["a"],
                &["s.l[1]: must be a non-empty string, found a number"],
            ),
            (
                "l = 3",
                &[],
                &["s.l: must be an array of strings, found a number"],
            ),
        ];
        for (toml, want, errors) in cases {
            let mut w = walker();
            assert_eq!(w.string_list(&table(toml), "s", "l"), *want, "{toml}");
            assert_eq!(messages(&w), *errors, "{toml}");
        }
    }

    #[test]
    fn unknown_key_names_the_near_miss() {
        let mut w = walker();
        w.unknown_keys(
            &table("lock_ttl = 1\nother = 2"),
            "token-broker",
            &["lock-ttl"],
        );
        let mut got = messages(&w);
        got.sort();
        assert_eq!(
            got,
            [
                "token-broker.lock_ttl: unknown key (did you mean \"lock-ttl\"?)",
                "token-broker.other: unknown key",
            ]
        );
    }

    #[test]
    fn secret_given_twice_is_an_error_and_never_echoed() {
        let mut w = walker();
        let got = w.secret(
            &table("pw = \"hunter2\"\npw-file = \"/x\""),
            "m",
            "pw",
            true,
            true,
        );
        assert!(got.is_none());
        assert_eq!(messages(&w), ["m.pw: set either pw or pw-file, not both"]);
    }

    #[test]
    fn join_omits_the_dot_at_the_top() {
        assert_eq!(join("", "redis"), "redis");
        assert_eq!(join("incoming-mail[2]", "port"), "incoming-mail[2].port");
    }
}
