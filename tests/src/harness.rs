//! Building configurations for tests: each test gets its own Redis and AMQP
//! prefix, a free admin port and a temporary directory for secret files, so
//! tests run in parallel against the shared test servers.

use std::path::{Path, PathBuf};

use common::config::{load, Component, Config, LoadOptions};

use crate::env::{unique, Endpoints};

/// A per-test configuration under construction: a TOML text plus files.
pub struct TestConfig {
    /// Temporary directory holding the config and secret files.
    pub dir: tempfile::TempDir,
    /// Redis key prefix of this test.
    pub redis_prefix: String,
    /// AMQP name prefix of this test.
    pub amqp_prefix: String,
    /// The TOML text.
    pub toml: String,
}

impl TestConfig {
    /// Base sections pointing at the test servers, with a fresh token key.
    pub fn new(env: &Endpoints) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key: [u8; 32] = rand::random();
        use base64::Engine;
        std::fs::write(
            dir.path().join("token-key"),
            base64::engine::general_purpose::STANDARD.encode(key),
        )
        .expect("write key");
        let redis_prefix = unique("t");
        let amqp_prefix = redis_prefix.clone();
        let toml = format!(
            r#"[redis]
url = "{redis}"
prefix = "{redis_prefix}"
[amqp]
url = "{amqp}"
prefix = "{amqp_prefix}"
[tls]
extra-ca-file = "{ca}"
[admin]
listen = "127.0.0.1:0"
heartbeat-interval = 1
[token-broker]
encryption-key-file = "{key}"
"#,
            redis = env.redis_url(),
            amqp = env.amqp_url(),
            ca = env.ca_file().display(),
            key = dir.path().join("token-key").display(),
        );
        Self {
            dir,
            redis_prefix,
            amqp_prefix,
            toml,
        }
    }

    /// Writes a file into the test directory and returns its path.
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write file");
        path
    }

    /// Appends TOML (a profile, a mail config, a topic, more settings).
    pub fn push(&mut self, toml: &str) -> &mut Self {
        self.toml.push('\n');
        self.toml.push_str(toml);
        self
    }

    /// Adds a `[token-broker]`-section key (placed before any array table).
    pub fn broker_setting(&mut self, line: &str) -> &mut Self {
        self.toml = self
            .toml
            .replacen("[token-broker]\n", &format!("[token-broker]\n{line}\n"), 1);
        self
    }

    /// Adds an OAuth profile for the test IdP (http token URL, allowed insecure).
    pub fn idp_profile(
        &mut self,
        name: &str,
        token_url: &str,
        client_id: &str,
        secret: &str,
    ) -> &mut Self {
        let secret_file = self.file(&format!("{name}-secret"), secret);
        self.push(&format!(
            r#"[[oauth-profiles]]
name = "{name}"
provider = "azure"
application-key = "{client_id}"
application-secret-file = "{secret}"
token-url = "{token_url}"
allow-insecure = true
"#,
            secret = secret_file.display()
        ))
    }

    /// The config file path (written on each call).
    pub fn path(&self) -> PathBuf {
        self.file("config.toml", &self.toml)
    }

    /// The config file `component` runs with: this one with the
    /// component's least-privilege users (`crate::restricted`).
    pub fn path_for(&self, component: Component) -> PathBuf {
        self.file(
            &format!("config-{}.toml", component.name()),
            &crate::restricted::restrict(&self.toml, component),
        )
    }

    /// Loads and validates it for `component`, with the component's
    /// least-privilege users.
    pub fn load(&self, component: Component) -> Config {
        let options = LoadOptions {
            path: Some(self.path_for(component)),
            env: vec![],
        };
        load(&options, component)
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{}", self.toml))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`
/// naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
