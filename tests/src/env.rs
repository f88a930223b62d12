//! Where the test servers are: `scripts/services up` writes
//! `$MAILAGENT_SERVICES_DIR/endpoints.env` (default `/tmp/mailagent-services`),
//! one `KEY=VALUE` a line; this reads it.

use std::collections::HashMap;
use std::path::PathBuf;

/// The endpoints file's directory.
pub fn services_dir() -> PathBuf {
    std::env::var_os("MAILAGENT_SERVICES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/mailagent-services"))
}

/// The test servers' endpoints, by their `MAILAGENT_TEST_*` names.
#[derive(Debug, Clone)]
pub struct Endpoints {
    values: HashMap<String, String>,
}

impl Endpoints {
    /// Reads `endpoints.env`; panics with a hint when the services are not up,
    /// since no integration test can run without them.
    pub fn load() -> Self {
        let path = services_dir().join("endpoints.env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {} ({e}): start the test servers with `scripts/services up` (scripts/test does it)",
                path.display()
            )
        });
        let values = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Self { values }
    }

    /// A value by its full name, or `None` when absent (the cluster
    /// endpoints exist only after `scripts/services up --cluster`).
    pub fn get_opt(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// A value by its full name (`MAILAGENT_TEST_REDIS_URL`); panics when absent.
    pub fn get(&self, key: &str) -> &str {
        self.values.get(key).map(String::as_str).unwrap_or_else(|| {
            panic!("{key} is missing from endpoints.env: is scripts/services up to date?")
        })
    }

    /// Redis URL.
    pub fn redis_url(&self) -> &str {
        self.get("MAILAGENT_TEST_REDIS_URL")
    }

    /// AMQP URL.
    pub fn amqp_url(&self) -> &str {
        self.get("MAILAGENT_TEST_AMQP_URL")
    }

    /// PostgreSQL URL of a user that may create databases.
    pub fn postgres_url(&self) -> &str {
        self.get("MAILAGENT_TEST_POSTGRES_URL")
    }

    /// The CA that signed the mail servers' certificates.
    pub fn ca_file(&self) -> PathBuf {
        PathBuf::from(self.get("MAILAGENT_TEST_CA"))
    }

    /// `host:port` of a listener: `IMAPS`, `IMAP`, `POP3S`, `POP3`.
    pub fn mail_addr(&self, listener: &str) -> std::net::SocketAddr {
        let key = format!("MAILAGENT_TEST_{listener}");
        self.get(&key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not host:port"))
    }
}

/// A short random name for per-test prefixes, queues and mailboxes.
pub fn unique(label: &str) -> String {
    format!("{label}{:08x}", rand::random::<u32>())
}

impl Endpoints {
    /// Grants `appid` access to `mailbox` (Exchange's Add-MailboxPermission):
    /// appends `<appid>|<mailbox>` to the grants file Dovecot re-reads.
    pub fn grant(&self, appid: &str, mailbox: &str) {
        use std::io::Write;
        let path = self.get("MAILAGENT_TEST_GRANTS");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open grants file {path}: {e}"));
        // One write per line: appends of a short line are atomic, so parallel
        // tests never interleave.
        f.write_all(format!("{}|{}\n", appid.to_lowercase(), mailbox.to_lowercase()).as_bytes())
            .expect("append grant");
        // Dovecot stats a passwd-file at most once per second of its clock, so
        // a grant is visible from the next whole second on: wait for it.
        let written = unix_secs();
        while unix_secs() <= written {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The path of one of the workspace's binaries, built next to the running
/// executable: a test's (`target/<profile>/deps/`) or a benchmark's
/// (`target/<profile>/`). `scripts/test` builds them all before the suite.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
