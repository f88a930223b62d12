//! `mailagent status`: every live agent from the Redis heartbeats, each OAuth
//! profile's token state, each mail config's owner and progress, and the
//! depths of the action and dead-letter queues — TRIRIGA's Agents panel.

use std::collections::HashMap;

use common::heartbeat::{list_agents, now_secs, AgentStatus};
use common::keys::Keys;
use common::token::{read_state, ProfileState, TokenClient};
use common::Config;
use redis::AsyncCommands;
use serde::Serialize;

/// `mailagent status` options.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print one JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// A profile's token as status shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct ProfileRow {
    name: String,
    state: String,
    expires_in_s: Option<i64>,
    key_id: Option<String>,
    last_error: Option<String>,
    error_code: Option<String>,
    next_attempt_in_s: Option<i64>,
    /// `secret`, `certificate` or `assertion-file`.
    credential: String,
    /// The credential the broker last used (thumbprint, never a value).
    credential_used: Option<String>,
    /// Days until the credential expires (negative: expired), when known.
    credential_days_left: Option<i64>,
    /// The stored token cannot be opened with the configured keys.
    token_problem: Option<String>,
}

/// A mail config as status shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct MailRow {
    name: String,
    protocol: String,
    mailbox: String,
    owner: Option<String>,
    progress: Option<String>,
    oversized: u64,
}

/// The whole report.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Report {
    /// Where the shared state is: the server, the primary the Sentinels
    /// name now, or each Cluster node with its role.
    redis: Vec<String>,
    agents: Vec<AgentStatus>,
    profiles: Vec<ProfileRow>,
    mail_configs: Vec<MailRow>,
    queues: HashMap<String, Option<u32>>,
    nodes: Vec<NodeRow>,
    errors: Vec<String>,
}

/// One configured RabbitMQ node (`[amqp] urls`) as status sees it through
/// its own AMQP connection. AMQP tells whether the node accepts clients and
/// what its queues hold; which node leads a quorum queue and which nodes
/// are its members is not visible over AMQP (that takes the management API
/// or `rabbitmq-queues quorum_status` on a node).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct NodeRow {
    /// The node's URL, password redacted.
    url: String,
    /// Whether it accepted an AMQP connection.
    reachable: bool,
    /// Why not, when it did not.
    error: Option<String>,
    /// The deployment's queues as seen through this node.
    queues: Vec<QueueRow>,
}

/// A queue as seen through one node.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct QueueRow {
    name: String,
    /// Ready messages (`None`: the queue could not be read through this node).
    ready: Option<u32>,
    /// Consumers.
    consumers: Option<u32>,
}

/// Looks at each configured node over its own connection.
async fn nodes(config: &Config, topology: &common::topology::Topology) -> Vec<NodeRow> {
    let mut out = Vec::new();
    for url in &config.amqp.urls {
        let mut row = NodeRow {
            url: url.redacted(),
            reachable: false,
            error: None,
            queues: Vec::new(),
        };
        match common::connect::amqp_node(config, url, "mailagent-status").await {
            Ok(conn) => {
                row.reachable = true;
                for q in [&topology.create_queue, &topology.dead_queue] {
                    let counts = match conn.create_channel().await {
                        Ok(ch) => {
                            let opts = lapin::options::QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            };
                            let got = ch
                                .queue_declare(q, opts, lapin::types::FieldTable::default())
                                .await
                                .ok();
                            let _ = ch.close(200, "status").await;
                            got.map(|d| (d.message_count(), d.consumer_count()))
                        }
                        Err(_) => None,
                    };
                    row.queues.push(QueueRow {
                        name: q.clone(),
                        ready: counts.map(|c| c.0),
                        consumers: counts.map(|c| c.1),
                    });
                }
                let _ = conn.close(200, "status done").await;
            }
            Err(e) => row.error = Some(e.to_string()),
        }
        out.push(row);
    }
    out
}

/// Prints the report; fails when Redis cannot be read at all.
pub async fn status(config: &Config, args: &StatusArgs) -> anyhow::Result<()> {
    let keys = Keys::new(config.redis.prefix.clone());
    let mut redis = common::connect::redis(config).await?;
    let mut errors = Vec::new();
    let redis_nodes = match redis.describe().await {
        Ok(lines) => lines,
        Err(e) => {
            errors.push(format!("cannot describe Redis: {e}"));
            Vec::new()
        }
    };
    let agents = list_agents(&mut redis, &keys).await?;
    let tokens = TokenClient::new(redis.clone(), keys.clone(), &config.token_broker.encryption);

    let mut profiles = Vec::new();
    for p in &config.oauth_profiles {
        let state: ProfileState = read_state(&mut redis, &keys, &p.name)
            .await?
            .unwrap_or_default();
        let stored = tokens.stored(&p.name).await.unwrap_or(None);
        let token_problem = match tokens.current(&p.name).await {
            Err(e) if !e.is_transient() => Some(e.to_string()),
            _ => None,
        };
        let now = now_secs() as i64;
        let expires = common::credential::expiry(p)
            .ok()
            .flatten()
            .or(state.credential_expires_at);
        profiles.push(ProfileRow {
            name: p.name.clone(),
            state: if state.state.is_empty() {
                "unknown (no broker has run)".into()
            } else {
                state.state.clone()
            },
            expires_in_s: stored.as_ref().map(|s| s.expires_at as i64 - now),
            key_id: stored.map(|s| s.kid),
            last_error: state.last_error.clone(),
            error_code: state.error_code.clone(),
            next_attempt_in_s: state.next_attempt_ms.map(|ms| (ms / 1000) as i64 - now),
            credential: common::credential::kind(&p.credential).to_string(),
            credential_used: state.credential_used.clone(),
            credential_days_left: expires.map(|e| (e - now).div_euclid(86_400)),
            token_problem,
        });
    }

    let mut mail_configs = Vec::new();
    for m in &config.incoming_mail {
        let owner: Option<String> = redis.get(keys.lease(&m.name)).await?;
        let checkpoint: HashMap<String, String> = redis
            .hgetall(keys.checkpoint(&m.name))
            .await
            .unwrap_or_default();
        let progress = match m.protocol() {
            common::config::Protocol::Imap => checkpoint.get("last-uid").map(|uid| {
                format!(
                    "uidvalidity {} last uid {uid}",
                    checkpoint
                        .get("uidvalidity")
                        .map(String::as_str)
                        .unwrap_or("?")
                )
            }),
            common::config::Protocol::Pop3 => {
                let n: u64 = redis.scard(keys.uidls(&m.name)).await.unwrap_or(0);
                Some(format!("{n} uidl(s) handed over"))
            }
        };
        let oversized: u64 = redis.hlen(keys.oversized(&m.name)).await.unwrap_or(0);
        mail_configs.push(MailRow {
            name: m.name.clone(),
            protocol: m.protocol().as_str().into(),
            mailbox: m.username.clone(),
            owner,
            progress,
            oversized,
        });
    }

    let mut queues = HashMap::new();
    let topology = common::topology::Topology::new(&config.amqp.prefix);
    match common::connect::amqp(config, "mailagent-status").await {
        Ok(conn) => {
            for q in [&topology.create_queue, &topology.dead_queue] {
                let depth = match conn.create_channel().await {
                    Ok(ch) => common::topology::queue_depth(&ch, q).await.ok(),
                    Err(_) => None,
                };
                if depth.is_none() {
                    errors.push(format!("queue {q} not found (has any agent started?)"));
                }
                queues.insert(q.clone(), depth);
            }
            let _ = conn.close(200, "status done").await;
        }
        Err(e) => errors.push(e.to_string()),
    }

    let nodes = if config.amqp.urls.len() > 1 {
        nodes(config, &topology).await
    } else {
        Vec::new()
    };
    let report = Report {
        redis: redis_nodes,
        agents,
        profiles,
        mail_configs,
        queues,
        nodes,
        errors,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn age(epoch: Option<u64>) -> String {
    match epoch {
        Some(t) if t > 0 => format!("{}s ago", now_secs().saturating_sub(t)),
        _ => "-".into(),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ");
        s = s.trim_end().to_string();
        s.push('\n');
        s
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn render(r: &Report) -> String {
    let mut out = String::from("REDIS\n");
    for line in &r.redis {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str("\nAGENTS\n");
    if r.agents.is_empty() {
        out.push_str("  (no live agent: none has beaten its heartbeat in the last intervals)\n");
    } else {
        out.push_str(&table(
            &[
                "COMPONENT",
                "INSTANCE",
                "OWNS",
                "LAST POLL",
                "HANDLED",
                "ADMIN",
                "LAST ERROR",
            ],
            r.agents
                .iter()
                .map(|a| {
                    vec![
                        a.component.clone(),
                        a.instance.clone(),
                        if a.owns.is_empty() {
                            "-".into()
                        } else {
                            a.owns.join(",")
                        },
                        age(a.last_poll),
                        a.handled.to_string(),
                        a.admin.clone().unwrap_or_else(|| "-".into()),
                        a.last_error.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect(),
        ));
    }
    out.push_str("\nOAUTH PROFILES\n");
    out.push_str(&table(
        &[
            "PROFILE",
            "STATE",
            "EXPIRES IN",
            "KEY",
            "CREDENTIAL",
            "DAYS LEFT",
            "NEXT ATTEMPT",
            "LAST ERROR",
        ],
        r.profiles
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.state.clone(),
                    p.expires_in_s
                        .map(|s| format!("{s}s"))
                        .unwrap_or_else(|| "no token".into()),
                    p.key_id.clone().unwrap_or_else(|| "-".into()),
                    p.credential_used
                        .clone()
                        .unwrap_or_else(|| p.credential.clone()),
                    p.credential_days_left
                        .map(|d| {
                            if d < 0 {
                                "expired".to_string()
                            } else {
                                d.to_string()
                            }
                        })
                        .unwrap_or_else(|| "-".into()),
                    p.next_attempt_in_s
                        .filter(|s| *s > 0)
                        .map(|s| format!("in {s}s"))
                        .unwrap_or_else(|| "-".into()),
                    match (&p.token_problem, &p.last_error) {
                        (Some(t), Some(e)) => format!("{t}; {e}"),
                        (Some(t), None) => t.clone(),
                        (None, Some(e)) => e.clone(),
                        (None, None) => "-".into(),
                    },
                ]
            })
            .collect(),
    ));
    out.push_str("\nMAIL CONFIGS\n");
    out.push_str(&table(
        &[
            "CONFIG",
            "PROTOCOL",
            "MAILBOX",
            "OWNER",
            "PROGRESS",
            "OVERSIZED",
        ],
        r.mail_configs
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    m.protocol.clone(),
                    m.mailbox.clone(),
                    m.owner.clone().unwrap_or_else(|| "(no owner)".into()),
                    m.progress.clone().unwrap_or_else(|| "-".into()),
                    m.oversized.to_string(),
                ]
            })
            .collect(),
    ));
    out.push_str("\nQUEUES\n");
    let mut queues: Vec<_> = r.queues.iter().collect();
    queues.sort();
    out.push_str(&table(
        &["QUEUE", "READY"],
        queues
            .into_iter()
            .map(|(q, d)| {
                vec![
                    q.clone(),
                    d.map(|d| d.to_string()).unwrap_or_else(|| "?".into()),
                ]
            })
            .collect(),
    ));
    if !r.nodes.is_empty() {
        out.push_str("\nRABBITMQ NODES\n");
        let mut rows = Vec::new();
        for n in &r.nodes {
            if !n.reachable {
                let why = n.error.clone().unwrap_or_default();
                rows.push(vec![
                    n.url.clone(),
                    format!("unreachable: {why}"),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                continue;
            }
            for q in &n.queues {
                let num = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
                rows.push(vec![
                    n.url.clone(),
                    "up".into(),
                    q.name.clone(),
                    num(q.ready),
                    num(q.consumers),
                ]);
            }
        }
        out.push_str(&table(
            &["NODE", "STATE", "QUEUE", "READY", "CONSUMERS"],
            rows,
        ));
        out.push_str("note: quorum queue leaders and members are not visible over AMQP; see `rabbitmq-queues quorum_status <queue>` on a node\n");
    }
    for e in &r.errors {
        out.push_str(&format!("note: {e}\n"));
    }
    out
}
