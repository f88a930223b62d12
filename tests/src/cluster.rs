//! The 3-node RabbitMQ cluster of `scripts/services up --cluster`
//! (scripts/services.d/rabbitmq-cluster.sh): its nodes' URLs, which node
//! leads a quorum queue, and kill -9 / restart of one node. Tests using it
//! are named `cluster_*`, so nextest runs them one at a time
//! (.config/nextest.toml): a node killed by one must not fail another.

use std::path::PathBuf;
use std::time::Duration;

use crate::env::Endpoints;
use crate::harness::wait_for;

/// One node of the test cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its index, 1..=3.
    pub index: usize,
    /// Erlang node name (`mailagent-c1@localhost`).
    pub name: String,
    /// Its AMQP URL (guest).
    pub url: String,
    /// Its rabbitmqctl wrapper.
    pub rabbitmqctl: PathBuf,
    /// The Erlang VM's pid file.
    pub pid_file: PathBuf,
    /// The script that starts it and waits until it serves AMQP again.
    pub start: PathBuf,
}

/// The cluster's nodes.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Nodes 1..=3.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Reads the cluster's endpoints; panics with a hint when the services
    /// were started without `--cluster`.
    pub fn load(env: &Endpoints) -> Self {
        let nodes = (1..=3)
            .map(|i| {
                let get = |what: &str| {
                    env.get(&format!("MAILAGENT_TEST_CLUSTER_NODE{i}_{what}"))
                        .to_string()
                };
                Node {
                    index: i,
                    name: get("NAME"),
                    url: get("AMQP_URL"),
                    rabbitmqctl: get("RABBITMQCTL").into(),
                    pid_file: get("PID_FILE").into(),
                    start: get("START").into(),
                }
            })
            .collect();
        Self { nodes }
    }

    /// Every node's URL, node 1 first.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// The node whose Erlang name is `name`.
    pub fn by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// True while node `n`'s VM runs.
    pub fn running(&self, n: &Node) -> bool {
        pid(n).is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    }

    /// Which node leads quorum queue `queue` and its members, asked of a
    /// running node (rabbitmqctl, a test's privilege: users have no such
    /// view over AMQP).
    pub fn leader(&self, queue: &str) -> Option<(String, Vec<String>)> {
        for n in self.nodes.iter().filter(|n| self.running(n)) {
            let out = std::process::Command::new(&n.rabbitmqctl)
                .args([
                    "-q",
                    "list_queues",
                    "name",
                    "leader",
                    "members",
                    "--formatter",
                    "json",
                ])
                .output()
                .ok()?;
            if !out.status.success() {
                continue;
            }
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            for row in rows.as_array()? {
                if row["name"] == queue {
                    let leader = row["leader"].as_str()?.to_string();
                    let members = row["members"]
                        .as_array()
                        .map(|m| {
                            m.iter()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    return Some((leader, members));
                }
            }
            return None;
        }
        None
    }

    /// Waits until quorum queue `queue` has a leader, and returns that node.
    pub async fn wait_leader(&self, queue: &str, within: Duration) -> Node {
        wait_for(&format!("a leader of {queue}"), within, || async {
            let (leader, _) = self.leader(queue)?;
            self.by_name(&leader).cloned()
        })
        .await
    }

    /// Waits until quorum queue `queue` is led by a running node other than
    /// `old` (after `old` was killed), and returns it.
    pub async fn wait_new_leader(&self, queue: &str, old: &Node, within: Duration) -> Node {
        wait_for(
            &format!("a new leader of {queue} (not {})", old.name),
            within,
            || async {
                let (leader, _) = self.leader(queue)?;
                let n = self.by_name(&leader)?;
                (n.name != old.name && self.running(n)).then(|| n.clone())
            },
        )
        .await
    }

    /// SIGKILLs node `n`'s VM and waits until it is gone.
    pub async fn kill_9(&self, n: &Node) {
        let p = pid(n).unwrap_or_else(|| panic!("node {} is not running", n.name));
        assert!(crate::process::signal("KILL", p), "kill -9 {p}");
        wait_for(
            &format!("node {} to die", n.name),
            Duration::from_secs(20),
            || async { (!self.running(n)).then_some(()) },
        )
        .await;
    }

    /// Starts node `n` again (no-op when it runs) and waits until it has
    /// rejoined the cluster and serves AMQP. Runs the node's start script on
    /// a blocking thread.
    pub async fn start(&self, n: &Node) {
        let script = n.start.clone();
        let status = tokio::task::spawn_blocking(move || {
            std::process::Command::new(script)
                .arg("120")
                .status()
                .expect("run the node's start script")
        })
        .await
        .expect("start thread");
        assert!(status.success(), "node {} did not start again", n.name);
    }

    /// Makes sure every node runs (a test that failed half-way may have
    /// left one down).
    pub async fn ensure_up(&self) {
        for n in &self.nodes {
            if !self.running(n) {
                self.start(n).await;
            }
        }
    }
}

fn pid(n: &Node) -> Option<u32> {
    std::fs::read_to_string(&n.pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()
}
