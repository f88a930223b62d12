//! `mailagent setup`: what a deployment needs once, before the services
//! start with least privilege — the AMQP topology declared (so the services
//! may run with `[amqp] declare = "passive"` and no configure permission),
//! the RabbitMQ permissions each component needs, and the Redis ACL users of
//! each component, printed or applied.

use std::path::{Path, PathBuf};

use anyhow::Context;
use common::least_privilege::{amqp_permissions, redis_rules, Role};
use common::Config;
use sha2::Digest;

/// `mailagent setup` options.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Do not declare the AMQP topology (print the rules only).
    #[arg(long)]
    no_amqp: bool,
    /// Also print the Redis ACL users of every component (`ACL SETUSER`).
    #[arg(long)]
    redis_acl: bool,
    /// Create or replace those users on `[redis] url`, whose user must be
    /// allowed `ACL SETUSER` (an administrator). Needs --password-dir.
    #[arg(long, requires = "redis_acl", requires = "password_dir")]
    apply: bool,
    /// A directory with one file per user, named like the user
    /// (`<prefix>-imap-fetcher`), holding its password. Only their SHA-256
    /// is printed or sent.
    #[arg(long, value_name = "DIR")]
    password_dir: Option<PathBuf>,
}

/// Runs `mailagent setup`.
pub async fn setup(config: &Config, args: &SetupArgs) -> anyhow::Result<()> {
    let amqp_prefix = &config.amqp.prefix;
    if !args.no_amqp {
        let conn = common::connect::amqp(config, "mailagent-setup").await?;
        let channel = conn.create_channel().await?;
        let topology = common::topology::declare(&channel, &config.amqp, false)
            .await
            .with_context(|| {
                format!(
                    "cannot declare the topology on RabbitMQ at {} (the user needs the setup role's permissions below)",
                    config.amqp.endpoints()
                )
            })?;
        let _ = conn.close(200, "setup done").await;
        println!(
            "declared on RabbitMQ at {}: exchange {} (direct) -> queue {} ({}, routing key create, dead-letters to {}); exchange and queue {} (fanout)",
            config.amqp.endpoints(),
            topology.exchange,
            topology.create_queue,
            config.amqp.queue_type.as_str(),
            topology.dead_exchange,
            topology.dead_queue
        );
    }

    let vhost = vhost(config.amqp.url.expose());
    println!("\nRabbitMQ permissions (vhost {vhost:?}; the services then run with [amqp] declare = \"passive\"):");
    for role in Role::ALL {
        let p = amqp_permissions(role, amqp_prefix);
        println!(
            "  rabbitmqctl set_permissions -p '{vhost}' '{}' '{}' '{}' '{}'",
            role.user(amqp_prefix),
            p.configure,
            p.write,
            p.read
        );
    }

    if !args.redis_acl {
        return Ok(());
    }
    let prefix = &config.redis.prefix;
    let mut commands = Vec::new();
    for role in Role::ALL {
        let Some(rules) = redis_rules(role, prefix) else {
            continue;
        };
        let user = role.user(prefix);
        let password = match &args.password_dir {
            Some(dir) => format!("#{}", password_hash(dir, &user)?),
            None => "#<sha256 of the password>".to_string(),
        };
        commands.push((user, password, rules));
    }
    println!("\nRedis ACL users (prefix {prefix}):");
    for (user, password, rules) in &commands {
        println!("  ACL SETUSER {user} reset on {password} {rules}");
    }
    if args.apply {
        let mut redis = common::connect::redis(config).await?;
        for (user, password, rules) in &commands {
            let mut cmd = redis::cmd("ACL");
            cmd.arg("SETUSER")
                .arg(user)
                .arg("reset")
                .arg("on")
                .arg(password);
            for rule in rules.split(' ') {
                cmd.arg(rule);
            }
            cmd.query_async::<()>(&mut redis).await.with_context(|| {
                format!(
                    "cannot create Redis user {user} at {} (the [redis] url user needs ACL SETUSER)",
                    config.redis.endpoint()
                )
            })?;
        }
        println!(
            "applied {} Redis users at {} (not persisted by this command: ACL SAVE, or the server's aclfile, keeps them)",
            commands.len(),
            config.redis.endpoint()
        );
    }
    Ok(())
}

/// SHA-256 (hex) of the password in `<dir>/<user>`, trailing newline removed.
fn password_hash(dir: &Path, user: &str) -> anyhow::Result<String> {
    let path = dir.join(user);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the password of {user} from {}", path.display()))?;
    let password = text.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "{} is empty", path.display());
    Ok(hex::encode(sha2::Sha256::digest(password.as_bytes())))
}

/// The vhost of an AMQP URL: its percent-decoded path, `/` when empty.
fn vhost(url: &str) -> String {
    let path = url::Url::parse(url)
        .map(|u| u.path().trim_start_matches('/').to_string())
        .unwrap_or_default();
    if path.is_empty() {
        return "/".into();
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_is_the_decoded_path() {
        for (url, want) in [
            ("amqp://u:p@h:5672/%2f", "/"),
            ("amqp://u:p@h:5672/", "/"),
            ("amqp://u:p@h:5672", "/"),
            ("amqps://u:p@h/mailagent", "mailagent"),
            ("amqp://h/a%2Fb", "a/b"),
        ] {
            assert_eq!(vhost(url), want, "{url}");
        }
    }
}
