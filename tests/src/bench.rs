//! What the benchmark binaries (`bench-imap`, `bench-e2e`) share: the raw
//! baselines they compare the agent with — **F**, one IMAPS connection
//! fetching a whole mailbox with `UID FETCH 1:* (BODY.PEEK[])` read raw, and
//! **P**, a raw confirmed persistent publish of the same bytes — and the
//! bookkeeping around them: a measured phase ([`Figure`]), percentiles,
//! peak RSS and CPU time from `/proc`, bulk mailbox grants, SIGTERM by pid.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use common::envelope::{dedupe_key, Envelope, MessageRef};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::env::Endpoints;

/// One measured phase: `messages` (of `bytes` in all) in `elapsed`.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What was measured (one line of the printed table).
    pub name: &'static str,
    /// Messages handled.
    pub messages: usize,
    /// Bytes handled.
    pub bytes: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl Figure {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    /// Megabytes (10⁶) per second.
    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }

    /// Prints one table row.
    pub fn print(&self) {
        println!(
            "{:<58} {:>6} msgs {:>8.2} s {:>9.0} msg/s {:>8.1} MB/s",
            self.name,
            self.messages,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.mb_s()
        );
    }
}

/// The serialized ceiling of phases run one after the other on the same
/// messages: 1 / Σ (1 / rate).
pub fn ceiling(figures: &[&Figure]) -> f64 {
    1.0 / figures.iter().map(|f| 1.0 / f.rate()).sum::<f64>()
}

/// A master-user IMAPS session on `mailbox` (any mailbox, no token needed),
/// as a raw TLS stream.
pub async fn master_tls(
    env: &Endpoints,
    mailbox: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    crate::imap_support::master(env, mailbox).await.into_inner()
}

/// Sends `tag command` and reads raw bytes until the tagged completion;
/// returns the bytes read (untagged responses included).
pub async fn raw_command<S>(io: &mut S, tag: &str, command: &str) -> anyhow::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(format!("{tag} {command}\r\n").as_bytes())
        .await?;
    io.flush().await?;
    let done_ok = format!("\r\n{tag} OK");
    let done_other = [format!("\r\n{tag} NO"), format!("\r\n{tag} BAD")];
    let mut out = Vec::with_capacity(1 << 20);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed during {command}");
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"\r\n") {
            let tail_start = out.len().saturating_sub(n + 64);
            let tail = &out[tail_start..];
            let text = String::from_utf8_lossy(tail);
            // The tagged line is the last line of the response.
            let last_line_start = text[..text.len() - 2].rfind("\r\n");
            if let Some(i) = last_line_start {
                let last = &text[i..];
                if last.starts_with(&done_ok) {
                    return Ok(out);
                }
                if done_other.iter().any(|d| last.starts_with(d.as_str())) {
                    bail!("{command} failed: {}", last.trim());
                }
            } else if out.len() < 512 && text.starts_with(&format!("{tag} ")) {
                if text.starts_with(&format!("{tag} OK")) {
                    return Ok(out);
                }
                bail!("{command} failed: {}", text.trim());
            }
        }
    }
}

/// Lets Dovecot index freshly seeded Maildir files (a `SELECT` and a size
/// fetch of every message), so that F measures fetching, not indexing.
/// Returns how long it took.
///
/// `SELECT`, not `EXAMINE`: the files are seeded into `new/`, and the first
/// read-write selection moves every one of them to `cur/` (10,000 renames,
/// about 0.2 s). That is a one-off cost of the seeding, like the indexing;
/// left to the first read-write session it fell on the fetcher's R, while
/// F and P (read-only, or no IMAP) never paid it.
pub async fn warm_up(env: &Endpoints, mailbox: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut io = master_tls(env, mailbox).await;
    raw_command(&mut io, "w0", "SELECT INBOX").await?;
    raw_command(&mut io, "w1", "UID FETCH 1:* (UID RFC822.SIZE)").await?;
    Ok(started.elapsed())
}

/// F: one connection, one `UID FETCH 1:* (BODY.PEEK[])` of the INBOX of
/// `mailbox` (which must hold `n` messages), read raw: only the tagged OK
/// is looked for. Nothing is flagged.
pub async fn raw_fetch(env: &Endpoints, mailbox: &str, n: usize) -> anyhow::Result<Figure> {
    let mut io = master_tls(env, mailbox).await;
    raw_command(&mut io, "f0", "EXAMINE INBOX").await?;
    let started = Instant::now();
    let bytes = raw_command(&mut io, "f1", "UID FETCH 1:* (BODY.PEEK[])").await?;
    let elapsed = started.elapsed();
    let fetched = bytes.windows(8).filter(|w| w == b" FETCH (").count();
    ensure!(fetched == n, "F fetched {fetched} messages, expected {n}");
    Ok(Figure {
        name: "F  raw UID FETCH 1:* (BODY.PEEK[]), one connection",
        messages: n,
        bytes: bytes.len() as u64,
        elapsed,
    })
}

/// P: a confirmed, persistent, `mandatory` publish of `bodies` with the
/// fetcher's envelope properties and `window` confirms outstanding, to the
/// exchange and CREATE queue of `config`'s AMQP prefix; the queue is purged
/// afterwards.
pub async fn raw_publish(
    config: &common::Config,
    mailbox: &str,
    bodies: &[Vec<u8>],
    window: usize,
) -> anyhow::Result<Figure> {
    let conn = common::connect::amqp(config, "bench-p").await?;
    let channel = conn.create_channel().await?;
    let topology = common::topology::declare(&channel, &config.amqp, false).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let envelopes: Vec<Envelope> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| Envelope {
            dedupe_key: dedupe_key(mailbox, b),
            body: b.clone(),
            timestamp: common::heartbeat::now_secs(),
            mail_config: "bench".into(),
            mailbox: mailbox.to_string(),
            message_ref: MessageRef::Imap {
                uid: i as u32 + 1,
                uidvalidity: 1,
            },
            action: common::config::Action::Create,
            fetcher: "bench".into(),
            traceparent: None,
        })
        .collect();
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    let mut bytes = 0u64;
    for e in &envelopes {
        if pending.len() >= window {
            let c: lapin::publisher_confirm::PublisherConfirm =
                pending.pop_front().expect("pending");
            ensure!(c.await?.is_ack(), "P: nacked");
        }
        let confirm = channel
            .basic_publish(
                &topology.exchange,
                e.routing_key(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &e.body,
                e.properties(),
            )
            .await?;
        pending.push_back(confirm);
        bytes += e.body.len() as u64;
    }
    while let Some(c) = pending.pop_front() {
        ensure!(c.await?.is_ack(), "P: nacked");
    }
    let elapsed = started.elapsed();
    channel
        .queue_purge(&topology.create_queue, QueuePurgeOptions::default())
        .await?;
    let _ = conn.close(200, "done").await;
    Ok(Figure {
        name: "P  raw confirmed persistent publish, window",
        messages: envelopes.len(),
        bytes,
        elapsed,
    })
}

/// The `p` quantile (0–1) of sorted durations, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on
/// every Linux this runs on).
pub const TICKS_PER_SEC: f64 = 100.0;

/// (command name, user + system CPU ticks) of a process, from
/// `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold spaces and parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After comm: state(0) … utime(11) stime(12).
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// Every process's (command name, CPU ticks) by pid, now.
pub fn cpu_snapshot() -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(v) = cpu_ticks(pid) {
            out.insert(pid, v);
        }
    }
    out
}

/// CPU seconds used between two snapshots, summed by command name and
/// sorted, largest first (a process that started in between counts whole;
/// one that ended in between is missed). A process is matched by pid
/// alone: the kernel's worker threads rename themselves after the work
/// they pick up (`kworker/u8:3-writeback`, then `…-events_unbound`), and
/// matching by name too counted such a thread's whole lifetime. They are
/// summed as one `kworker` row.
pub fn cpu_between(
    before: &HashMap<u32, (String, u64)>,
    after: &HashMap<u32, (String, u64)>,
) -> Vec<(String, f64)> {
    let mut by_name: HashMap<String, u64> = HashMap::new();
    for (pid, (comm, ticks)) in after {
        let base = before.get(pid).map_or(0, |(_, t)| *t);
        let name = if comm.starts_with("kworker/") {
            "kworker".to_string()
        } else {
            comm.clone()
        };
        *by_name.entry(name).or_default() += ticks.saturating_sub(base);
    }
    let mut out: Vec<(String, f64)> = by_name
        .into_iter()
        .filter(|(_, t)| *t > 0)
        .map(|(c, t)| (c, t as f64 / TICKS_PER_SEC))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Grants `app` every mailbox in one write to the grants file, then waits
/// until Dovecot can see it (it re-reads the file at most once a second;
/// [`Endpoints::grant`] waits that second for each line).
pub fn grant_all(env: &Endpoints, app: &str, mailboxes: &[String]) -> anyhow::Result<()> {
    let path = env.get("MAILAGENT_TEST_GRANTS");
    let lines: String = mailboxes
        .iter()
        .map(|m| format!("{}|{}\n", app.to_lowercase(), m.to_lowercase()))
        .collect();
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(lines.as_bytes())?;
    std::thread::sleep(Duration::from_millis(1100));
    Ok(())
}

/// The command-line options every fetch benchmark has: how much mail, how
/// big, and the publisher's confirm window.
#[derive(Debug, clap::Args)]
pub struct MailArgs {
    /// Messages in the mailbox (form mails for bench-e2e).
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Size of each message in bytes (bench-e2e pads a form mail with a
    /// text body to it; a mail whose workbook alone is larger stays larger).
    #[arg(long, default_value_t = 8192)]
    pub size: usize,
    /// Outstanding publisher confirms in P (the fetcher's default window).
    #[arg(long, default_value_t = common::fetch::publish::DEFAULT_WINDOW)]
    pub window: usize,
}

/// A form mail: lease `<tag>-<i>` (8 typed fields, 3 payment rows), a
/// Message-ID of its own, padded with a text body to `size` bytes.
pub fn form_mail(tag: &str, i: usize, size: usize) -> Vec<u8> {
    let id = format!("{tag}-{i}");
    let name = format!("Lease {tag} {i}");
    let notes = format!("benchmark form {i}");
    let workbook = crate::forms::lease_workbook(&crate::forms::Lease {
        id: &id,
        name: &name,
        rent: 1000.0 + i as f64,
        area: 100.0 + (i % 997) as f64,
        active: i % 2 == 0,
        notes: &notes,
        ..Default::default()
    });
    let raw = crate::forms::mail(
        crate::forms::LEASE_SUBJECT,
        "ann@contoso.com",
        &[],
        &[crate::forms::Attachment::xlsx(workbook)],
    );
    let mut text = String::from_utf8(raw).expect("the test mail is ASCII");
    // A Message-ID that is unique by construction (forms::mail draws a
    // random 32-bit one: among 10,000 mails a collision is likely enough to
    // lose a record to deduplication).
    let start = text.find("Message-ID: ").expect("Message-ID") + "Message-ID: ".len();
    let end = start + text[start..].find("\r\n").expect("header line");
    text.replace_range(start..end, &format!("<{tag}.{i}@bench.contoso.com>"));
    let body = "Please find the form attached.\r\n";
    let at = text.find(body).expect("text part") + body.len();
    let mut padding = String::new();
    let line = format!("This lease form ({id}) was filled in offline and sent for processing.\r\n");
    while text.len() + padding.len() < size {
        padding.push_str(&line);
    }
    text.insert_str(at, &padding);
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel worker that renamed itself between the snapshots counts
    /// only what it used in between (not its whole lifetime), summed with
    /// the other kernel workers; a process that started in between counts
    /// whole.
    #[test]
    fn cpu_between_counts_a_renamed_kernel_worker_by_pid() {
        let before = HashMap::from([
            (10, ("kworker/u8:3-writeback".to_string(), 50_000)),
            (11, ("kworker/0:0-events".to_string(), 100)),
            (20, ("postgres".to_string(), 300)),
        ]);
        let after = HashMap::from([
            (10, ("kworker/u8:3-events_unbound".to_string(), 50_030)),
            (11, ("kworker/0:0-mm_percpu_wq".to_string(), 110)),
            (20, ("postgres".to_string(), 500)),
            (30, ("form-processor".to_string(), 250)),
        ]);
        let secs = |ticks: f64| ticks / TICKS_PER_SEC;
        assert_eq!(
            cpu_between(&before, &after),
            vec![
                ("form-processor".to_string(), secs(250.0)),
                ("postgres".to_string(), secs(200.0)),
                ("kworker".to_string(), secs(40.0)),
            ]
        );
    }
}
