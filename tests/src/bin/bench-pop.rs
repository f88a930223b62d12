//! The POP3 fetcher's benchmark (issue 5), against the servers of
//! `scripts/services`. In one run, on N messages of S bytes in one maildrop:
//!
//! - F: a raw single-connection RETR loop over POP3S (two-step XOAUTH2,
//!   RETR pipelined when CAPA offers PIPELINING), the bytes read without
//!   parsing (only the `CRLF.CRLF` terminators are counted);
//! - P: a raw confirmed, persistent publish of the same bytes (lapin,
//!   confirm mode, a window of outstanding confirms) to the same exchange
//!   and durable queue the fetcher uses;
//! - R: pop-fetcher (in process) fetching, publishing with confirms and
//!   deleting them, timed until all N are in the queue and the maildrop is
//!   empty (QUIT committed).
//!
//! R is reported as a ratio of the serialized ceiling 1/(1/F + 1/P).
//!
//! ```sh
//! scripts/services start
//! cargo run --release -p mailagent-tests --bin bench-pop -- --messages 10000 --size 8192
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::BasicProperties;
use mailagent_tests::bench::{self, Figure};
use mailagent_tests::mailclient::{self, AuthOutcome};
use mailagent_tests::maildir;
use mailagent_tests::pop_support::{self, Fixture};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Measures F, P and R (see the module documentation).
#[derive(Debug, Parser)]
struct Args {
    /// Amount and size of the mail, confirm window.
    #[command(flatten)]
    mail: bench::MailArgs,
    /// RETR commands in flight in F.
    #[arg(long, default_value_t = 200)]
    pipeline: usize,
    /// The fetcher's `batch-size` in R (its default unless given).
    #[arg(long, default_value_t = common::config::DEFAULT_BATCH_SIZE as usize)]
    batch_size: usize,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fx = Fixture::new("benchpop");
    let msgs: Vec<Vec<u8>> = (0..args.mail.messages)
        .map(|i| maildir::message(&fx.prefix, i, args.mail.size, false))
        .collect();
    let total_bytes: u64 = msgs.iter().map(|m| m.len() as u64).sum();
    let seeding = Instant::now();
    maildir::seed(&fx.env, &fx.mailbox, &msgs);
    println!(
        "seeded {} messages of {} bytes ({:.1} MB) in {:.1} s into {}",
        msgs.len(),
        args.mail.size,
        total_bytes as f64 / 1e6,
        seeding.elapsed().as_secs_f64(),
        fx.mailbox
    );
    fx.plant_token().await;

    let f = raw_retr(&fx, &args, total_bytes).await?;
    f.print();
    let channel = fx.channel().await;
    let p = raw_publish(&fx, &channel, &msgs, args.mail.window).await?;
    p.print();
    channel
        .queue_purge(&fx.queue(), QueuePurgeOptions::default())
        .await?;
    let r = fetcher(&fx, &channel, &args, total_bytes).await?;
    r.print();

    let ceiling = 1.0 / (1.0 / f.rate() + 1.0 / p.rate());
    println!(
        "ceiling 1/(1/F + 1/P) = {ceiling:.0} msg/s; R = {:.0} msg/s = {:.1} % of the ceiling (goal >= 80 %)",
        r.rate(),
        100.0 * r.rate() / ceiling
    );
    for q in [fx.queue(), format!("{}.dead", fx.prefix)] {
        let _ = channel
            .queue_delete(&q, QueueDeleteOptions::default())
            .await;
    }
    Ok(())
}

/// F: one POP3S connection, two-step XOAUTH2, RETR of every message
/// (pipelined `pipeline` deep when offered), read without parsing.
async fn raw_retr(fx: &Fixture, args: &Args, expected_bytes: u64) -> anyhow::Result<Figure> {
    let addr = fx.env.mail_addr("POP3S");
    let token = fx.mint(Duration::from_secs(3600), 0);
    let started = Instant::now();
    let mut conn = mailclient::connect_tls(addr, &fx.env.ca_file()).await?;
    let greeting = conn.read_line().await?;
    ensure!(greeting.starts_with("+OK"), "greeting {greeting:?}");
    conn.send("CAPA").await?;
    let mut pipelining = false;
    loop {
        let line = conn.read_line().await?;
        if line == "." {
            break;
        }
        pipelining |= line.eq_ignore_ascii_case("PIPELINING");
    }
    match mailclient::pop3_xoauth2(&mut conn, &fx.mailbox, &token).await? {
        AuthOutcome::Accepted(_) => {}
        other => bail!("login refused: {other:?}"),
    }
    let depth = if pipelining { args.pipeline.max(1) } else { 1 };
    let n = args.mail.messages;
    let stream = conn.into_inner();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = vec![0u8; 256 * 1024];
    let mut tail: Vec<u8> = Vec::with_capacity(8);
    let mut sent = 0usize;
    let mut done = 0usize;
    let mut bytes = 0u64;
    let mut out = Vec::with_capacity(depth * 12);
    while done < n {
        // Refill when half the window has drained (fewer, larger writes).
        if sent < n && sent - done <= depth / 2 {
            out.clear();
            let upto = (done + depth).min(n);
            while sent < upto {
                sent += 1;
                out.extend_from_slice(format!("RETR {sent}\r\n").as_bytes());
            }
            wr.write_all(&out).await?;
            wr.flush().await?;
        }
        let got = tokio::time::timeout(Duration::from_secs(60), rd.read(&mut buf))
            .await
            .context("RETR stalled")??;
        ensure!(got > 0, "connection closed after {done} messages");
        bytes += got as u64;
        done += count_terminators(&mut tail, &buf[..got]);
    }
    let elapsed = started.elapsed();
    wr.write_all(b"QUIT\r\n").await?;
    let _ = wr.flush().await;
    ensure!(
        bytes >= expected_bytes,
        "read {bytes} bytes, less than the {expected_bytes} stored"
    );
    Ok(Figure {
        name: if pipelining {
            "F  raw RETR loop (1 connection, pipelined)"
        } else {
            "F  raw RETR loop (1 connection)"
        },
        messages: n,
        bytes: expected_bytes,
        elapsed,
    })
}

/// Counts `CRLF.CRLF` in a stream split into chunks; `tail` carries the
/// last four bytes of the previous chunk, so each terminator is counted once,
/// in the chunk holding its last byte. A dot-stuffed line starts with "..",
/// so this sequence only ends a multi-line response.
fn count_terminators(tail: &mut Vec<u8>, chunk: &[u8]) -> usize {
    const END: &[u8] = b"\r\n.\r\n";
    let mut n = 0;
    // Terminators that start in the tail and end in this chunk.
    let head = chunk.len().min(END.len() - 1);
    let mut joined = std::mem::take(tail);
    let from_tail = joined.len();
    joined.extend_from_slice(&chunk[..head]);
    for start in 0..from_tail {
        if joined[start..].starts_with(END) {
            n += 1;
        }
    }
    // Terminators wholly inside the chunk: find each '.', check around it.
    let mut i = 2;
    while i + 2 < chunk.len() {
        match chunk[i..chunk.len() - 2].iter().position(|&b| b == b'.') {
            None => break,
            Some(p) => {
                let at = i + p;
                if &chunk[at - 2..at + 3] == END {
                    n += 1;
                }
                i = at + 1;
            }
        }
    }
    // The new tail: the last four bytes of the stream so far.
    joined.truncate(from_tail);
    joined.extend_from_slice(&chunk[chunk.len().saturating_sub(END.len() - 1)..]);
    let keep = joined.len().min(END.len() - 1);
    joined.drain(..joined.len() - keep);
    *tail = joined;
    n
}

/// P: the same bytes published persistent, with confirms, `window` in flight.
async fn raw_publish(
    fx: &Fixture,
    channel: &lapin::Channel,
    msgs: &[Vec<u8>],
    window: usize,
) -> anyhow::Result<Figure> {
    let conn =
        lapin::Connection::connect(fx.env.amqp_url(), lapin::ConnectionProperties::default())
            .await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let exchange = format!("{}.incoming", fx.prefix);
    let routing_key = common::config::Action::Create.routing_key();
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("message/rfc822".into());
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for m in msgs {
        if pending.len() >= window.max(1) {
            let c: lapin::publisher_confirm::PublisherConfirm =
                pending.pop_front().expect("pending");
            ensure!(c.await?.is_ack(), "nack");
        }
        let confirm = ch
            .basic_publish(
                &exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                m,
                props.clone(),
            )
            .await?;
        pending.push_back(confirm);
    }
    for c in pending {
        ensure!(c.await?.is_ack(), "nack");
    }
    let elapsed = started.elapsed();
    let depth = pop_support::depth(channel, &fx.queue()).await as usize;
    ensure!(depth == msgs.len(), "{depth} messages in the queue");
    let _ = conn.close(200, "done").await;
    Ok(Figure {
        name: "P  raw confirmed persistent publish",
        messages: msgs.len(),
        bytes: msgs.iter().map(|m| m.len() as u64).sum(),
        elapsed,
    })
}

/// R: pop-fetcher fetching, publishing with confirms and deleting.
async fn fetcher(
    fx: &Fixture,
    channel: &lapin::Channel,
    args: &Args,
    bytes: u64,
) -> anyhow::Result<Figure> {
    let n = args.mail.messages;
    let extra = format!("batch-size = {}\npoll-interval = 60\n", args.batch_size);
    let (config, _) = fx.config(&[fx.mail_table("bench", "POP3S", &extra)]);
    let started = Instant::now();
    let running = pop_support::InProcess::start(config);
    let deadline = started + Duration::from_secs(600);
    while (pop_support::depth(channel, &fx.queue()).await as usize) < n {
        ensure!(Instant::now() < deadline, "fetcher too slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published = started.elapsed();
    while fx.maildrop_len() > 0 {
        ensure!(Instant::now() < deadline, "maildrop not emptied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    running.stop().await?;
    println!(
        "   (R: all {n} confirmed in the queue after {:.2} s, maildrop empty after {:.2} s)",
        published.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    let depth = pop_support::depth(channel, &fx.queue()).await as usize;
    ensure!(depth == n, "{depth} messages in the queue, expected {n}");
    Ok(Figure {
        name: "R  pop-fetcher: RETR, publish+confirm, DELE",
        messages: n,
        bytes,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::count_terminators;

    #[test]
    fn terminators_are_counted_across_chunk_boundaries() {
        let stream = b"+OK\r\na\r\n..b\r\n.\r\n+OK\r\nc\r\n.\r\n".to_vec();
        for split in 0..stream.len() {
            let mut tail = Vec::new();
            let n = count_terminators(&mut tail, &stream[..split])
                + count_terminators(&mut tail, &stream[split..]);
            assert_eq!(n, 2, "split at {split}");
        }
    }
}
