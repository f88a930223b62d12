//! A private RabbitMQ node for one test, for what would disturb every other
//! test on the shared broker: a resource alarm blocks *all* publishing
//! connections of a node, so a test that raises one gets a node of its own.
//!
//! The node runs from the same installation as the shared one
//! (`/usr/lib/rabbitmq`), on free loopback ports, with its state in a
//! temporary directory, registered in the shared test epmd; it is shut
//! down when dropped. Starting it takes a few seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::env::{unique, Endpoints};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A running private RabbitMQ node.
pub struct PrivateRabbit {
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub url: String,
    /// Its AMQP listener.
    pub addr: SocketAddr,
    env: Vec<(String, String)>,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The shared test epmd's port, read from the `rabbitmqctl` wrapper that
/// `scripts/services` writes.
fn epmd_port(env: &Endpoints) -> Option<String> {
    let wrapper = std::fs::read_to_string(env.get("MAILAGENT_TEST_RABBITMQCTL")).ok()?;
    wrapper
        .lines()
        .find_map(|l| l.trim().strip_prefix("export ERL_EPMD_PORT="))
        .map(|p| p.trim().to_string())
}

impl PrivateRabbit {
    /// Starts a node and waits until it accepts AMQP connections.
    pub async fn start() -> Self {
        let endpoints = Endpoints::load();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        let port = free_port();
        std::fs::write(d.join("rabbitmq-env.conf"), "").expect("env conf");
        std::fs::write(d.join("enabled_plugins"), "[].\n").expect("plugins");
        std::fs::write(
            d.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users.guest = true\nlog.console = false\ndisk_free_limit.absolute = 1MB\n"
            ),
        )
        .expect("conf");
        std::fs::write(
            d.join("advanced.config"),
            "[{kernel, [{inet_dist_use_interface, {127,0,0,1}}]}].\n",
        )
        .expect("advanced config");
        let p = |name: &str| d.join(name).display().to_string();
        let mut env: Vec<(String, String)> = vec![
            ("HOME".into(), p("home")),
            (
                "RABBITMQ_NODENAME".into(),
                format!("{}@localhost", unique("mailagent-private-")),
            ),
            ("RABBITMQ_CONF_ENV_FILE".into(), p("rabbitmq-env.conf")),
            ("RABBITMQ_CONFIG_FILE".into(), p("rabbitmq.conf")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE".into(), p("advanced.config")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), p("enabled_plugins")),
            ("RABBITMQ_MNESIA_BASE".into(), p("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), p("log")),
            ("RABBITMQ_PID_FILE".into(), p("rabbitmq.pid")),
            ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT".into(), port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), free_port().to_string()),
            ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
            (
                "RABBITMQ_CTL_ERL_ARGS".into(),
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
        ];
        if let Some(epmd) = epmd_port(&endpoints) {
            env.push(("ERL_EPMD_PORT".into(), epmd));
        }
        let log = std::fs::File::create(d.join("startup.log")).expect("log");
        let mut cmd = std::process::Command::new(SERVER);
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("start rabbitmq-server");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let node = Self {
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            addr,
            env,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "private RabbitMQ did not start; see {}",
                node._dir.path().join("startup.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let out = node.ctl(&["-q", "await_startup", "--timeout", "60"]).await;
        assert!(out.is_some(), "private RabbitMQ did not finish starting");
        node
    }

    /// Runs `rabbitmqctl` against this node; its stdout on success.
    pub async fn ctl(&self, args: &[&str]) -> Option<String> {
        let out = tokio::process::Command::new(CTL)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .output()
            .await
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Evaluates an Erlang expression on the node; its printed result.
    /// Panics, saying `what` could not be done, when `rabbitmqctl` fails.
    pub async fn eval(&self, expression: &str, what: &str) -> String {
        self.ctl(&["eval", expression])
            .await
            .unwrap_or_else(|| panic!("cannot {what}"))
    }

    /// Points `amqp` at this node and declares its topology there; a
    /// channel on the node, for draining its queues.
    pub async fn channel_with_topology(
        &self,
        amqp: &mut common::config::AmqpConfig,
    ) -> lapin::Channel {
        amqp.set_url(common::secret::SecretUrl::new(self.url.clone()));
        crate::fixture::channel_with_topology(&self.url, amqp).await
    }

    /// Raises a disk resource alarm: RabbitMQ blocks every connection that
    /// publishes (until [`PrivateRabbit::clear_disk_alarm`]).
    pub async fn set_disk_alarm(&self) {
        let set = "rabbit_alarm:set_alarm({{resource_limit, disk, node()}, []}).";
        self.eval(set, "set the disk alarm").await;
        let alarms = self
            .eval("rabbit_alarm:get_alarms().", "list the alarms")
            .await;
        assert!(alarms.contains("disk"), "alarm not in place: {alarms}");
    }

    /// Clears the disk alarm: blocked connections resume.
    pub async fn clear_disk_alarm(&self) {
        let clear = "rabbit_alarm:clear_alarm({resource_limit, disk, node()}).";
        self.eval(clear, "clear the disk alarm").await;
    }

    /// The state of every client connection (`running`, `blocking`, `blocked`…).
    pub async fn connection_states(&self) -> Vec<String> {
        self.ctl(&["-q", "list_connections", "state"])
            .await
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty() && l != "state")
            .collect()
    }

    /// Where its logs are.
    pub fn log_dir(&self) -> PathBuf {
        self._dir.path().join("log")
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        // Stop the node through its own CLI (returns once the VM exited),
        // then reap the server script. Never a negative pid to kill(1):
        // procps-ng 4 reads `kill -KILL -<pgid>` as kill(-1), which as root
        // kills every process on the machine.
        let stopped = std::process::Command::new(CTL)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["-q", "shutdown", "--timeout", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            // The VM's own pid, from its pid file: one positive pid.
            let pid = std::fs::read_to_string(self._dir.path().join("rabbitmq.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
                .filter(|p| *p > 1);
            if let Some(pid) = pid {
                crate::process::signal("KILL", pid);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
