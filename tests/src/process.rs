//! The workspace's binaries as child processes: start one with its config
//! (and a log file, environment, kill-on-drop), signal it by its one
//! positive pid, stop it gracefully, read its peak RSS. Every test and
//! benchmark that runs a binary goes through here.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::env::bin_path;

/// `bin --config <config>`, not yet started: stdin, stdout and stderr
/// closed, killed when its [`Child`] is dropped. Add a log and environment
/// with the methods, then [`Launch::spawn`].
pub struct Launch {
    bin: String,
    cmd: Command,
}

/// Starts building the command line of binary `bin` (built next to the
/// running test or benchmark).
pub fn launch(bin: &str, config: &Path) -> Launch {
    let mut cmd = Command::new(bin_path(bin));
    cmd.arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    Launch {
        bin: bin.to_string(),
        cmd,
    }
}

impl Launch {
    /// Sets an environment variable.
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// `RUST_LOG`.
    pub fn log_level(self, level: &str) -> Self {
        self.env("RUST_LOG", level)
    }

    /// Only `PATH` from this process's environment, as under a service
    /// manager (no `MAILAGENT_*` leaking in from the test's shell).
    pub fn clean_env(mut self) -> Self {
        self.cmd
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        self
    }

    /// Short lease and backoff times for either fetcher (`lease_ttl`
    /// seconds; backoff 300 ms doubling to 2 s).
    pub fn fast_fetch(self, lease_ttl: u32) -> Self {
        let ttl = lease_ttl.to_string();
        self.env("MAILAGENT_IMAP_LEASE_TTL", &ttl)
            .env("MAILAGENT_IMAP_BACKOFF_MS", "300")
            .env("MAILAGENT_IMAP_BACKOFF_MAX_MS", "2000")
            .env("MAILAGENT_POP3_LEASE_TTL", &ttl)
            .env("MAILAGENT_POP3_BACKOFF_MS", "300")
            .env("MAILAGENT_POP3_BACKOFF_MAX_MS", "2000")
    }

    /// Writes stdout and stderr to the file `path` (created).
    pub fn log(mut self, path: &Path) -> Self {
        let file = std::fs::File::create(path)
            .unwrap_or_else(|e| panic!("create log {}: {e}", path.display()));
        self.cmd
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        self
    }

    /// Starts it; panics when it cannot.
    pub fn spawn(self) -> Child {
        self.try_spawn()
            .unwrap_or_else(|e| panic!("cannot start {e}"))
    }

    /// Starts it (for the benchmarks, which report errors).
    pub fn try_spawn(mut self) -> anyhow::Result<Child> {
        let bin = self.bin;
        self.cmd.spawn().map_err(|e| anyhow::anyhow!("{bin}: {e}"))
    }
}

/// Sends `signal` (`TERM`, `KILL`…) to the one process `pid`; false when
/// `kill` failed (no such process). Never a process group: a negative pid
/// to kill(1) can reach far more than the test's own processes.
pub fn signal(signal: &str, pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-s", signal, "--", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// SIGTERM to `pid` (see [`signal`]).
pub fn sigterm(pid: u32) -> bool {
    signal("TERM", pid)
}

/// Waits up to `within` for `child` to exit; after that kills it and
/// returns `None`.
pub async fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => Some(status.expect("wait for child")),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    }
}

/// Graceful stop: SIGTERM, then [`wait_exit`]. `None` when it had to be
/// killed.
pub async fn stop(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    if let Some(pid) = child.id() {
        sigterm(pid);
    }
    wait_exit(child, within).await
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
}

/// Current and peak resident set size of a process, kB (`VmRSS`, `VmHWM`).
pub fn rss_kb(pid: u32) -> Option<(u64, u64)> {
    Some((status_kb(pid, "VmRSS:")?, status_kb(pid, "VmHWM:")?))
}

/// Peak resident set size (`VmHWM`) of `pid` in KiB; 0 once it is gone.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kb(pid, "VmHWM:").unwrap_or(0)
}

/// Runs the `mailagent` CLI on `config` with `args` (a `MAILAGENT_CONFIG`
/// in the test's own environment does not apply): its output, and its
/// stdout and stderr as one text.
pub async fn mailagent(config: &Path, args: &[&str]) -> (std::process::Output, String) {
    let out = Command::new(bin_path("mailagent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("MAILAGENT_CONFIG")
        .output()
        .await
        .expect("run mailagent");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}
