//! `mailagent dead-letters` (§7): list rejections with their dead-letter
//! state, and replay a dead-lettered message into the CREATE queue. Both
//! first record the messages RabbitMQ dead-lettered on its own
//! ([`form_processor::broker_dead`]), so that those are listed (reason
//! `delivery_limit`, `rejected`, `expired`) and replayable too.

use anyhow::{anyhow, bail};
use common::config::Config;
use common::envelope::headers::REASON;
use common::envelope::headers::REPLAY;
use form_processor::deadletter::REASON_DETAIL;
use form_processor::store::Store;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::AMQPValue;

use crate::dates::format_utc;
use crate::records::open_store;

/// `mailagent dead-letters`
#[derive(Debug, clap::Subcommand)]
pub enum DeadLettersCommand {
    /// List rejections (failures table) and what waits in the dead-letter queue.
    List,
    /// Send a dead-lettered message back to the CREATE queue, where the
    /// processor forgets its failure and processes it afresh. The copy in
    /// the dead-letter queue is removed only once RabbitMQ confirmed the
    /// replay into a queue. ID is the failure id.
    Replay {
        /// Failure id (from `dead-letters list`).
        id: i64,
    },
}

fn header_text(props: &lapin::BasicProperties, name: &str) -> String {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        })
        .unwrap_or_default()
}

/// `mailagent dead-letters …`
pub async fn dead_letters(config: &Config, command: &DeadLettersCommand) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let conn = common::connect::amqp(config, "mailagent-cli").await?;
    let channel = conn.create_channel().await?;
    let topology = common::topology::declare(&channel, &config.amqp, true).await?;
    // Messages RabbitMQ dead-lettered itself (a quorum queue's delivery
    // limit, say) get their failure rows first, so they are listed and
    // replayable like the processor's own.
    let limits = form_processor::mime::MimeLimits {
        max_depth: config.form_processor.max_mime_depth,
        max_parts: config.form_processor.max_mime_parts,
    };
    let reconciled =
        form_processor::broker_dead::reconcile(&store, &conn, &topology, limits).await?;
    if !reconciled.recorded.is_empty() {
        let ids: Vec<String> = reconciled
            .recorded
            .iter()
            .map(|id| format!("#{id}"))
            .collect();
        eprintln!(
            "recorded {} message(s) RabbitMQ dead-lettered itself as failure(s) {}",
            ids.len(),
            ids.join(", ")
        );
    }
    let depth = common::topology::queue_depth(&channel, &topology.dead_queue).await?;
    let result = match command {
        DeadLettersCommand::List => {
            let failures = store.failures().await?;
            for f in &failures {
                println!(
                    "#{} {} dead-lettered={} {} from {} \"{}\": {}",
                    f.id,
                    f.reason,
                    f.dead_lettered,
                    format_utc(f.created_at),
                    f.source.sender,
                    f.source.subject,
                    f.detail
                );
            }
            println!(
                "{} failure(s); {depth} message(s) waiting in {}",
                failures.len(),
                topology.dead_queue
            );
            Ok(())
        }
        DeadLettersCommand::Replay { id } => {
            replay(&store, &conn, &channel, &topology, depth, *id).await
        }
    };
    // Closing the channel returns every message we looked at but did not ack.
    let _ = channel.close(200, "done").await;
    let _ = conn.close(200, "done").await;
    store.close().await;
    result
}

async fn replay(
    store: &Store,
    conn: &lapin::Connection,
    channel: &lapin::Channel,
    topology: &common::topology::Topology,
    depth: u32,
    id: i64,
) -> anyhow::Result<()> {
    let failure = store
        .failures()
        .await?
        .into_iter()
        .find(|f| f.id == id)
        .ok_or_else(|| anyhow!("no failure #{id}"))?;
    let key = failure.source.dedupe_key.clone();
    let publisher = common::topology::confirming_channel(conn).await?;
    let mut replayed: Option<String> = None;
    let mut copies = 0;
    // Each message of the queue is looked at once. One that is not this
    // mail is put back (published again to the dead-letter exchange,
    // confirmed, then the original acked) instead of being returned
    // unacked: on a quorum queue a return counts as a delivery, and past
    // the queue's delivery limit RabbitMQ drops a dead letter.
    for _ in 0..depth {
        let Some(m) = channel
            .basic_get(&topology.dead_queue, BasicGetOptions::default())
            .await?
        else {
            break;
        };
        let same = m.properties.message_id().as_ref().map(|s| s.as_str()) == Some(key.as_str());
        if same && replayed.is_some() {
            // Two copies of one rejected mail processed at once may both
            // have been dead-lettered: the replay stands for them all.
            m.acker.ack(BasicAckOptions::default()).await?;
            copies += 1;
            continue;
        }
        if !same {
            put_back(&publisher, topology, &m).await?;
            m.acker.ack(BasicAckOptions::default()).await?;
            continue;
        }
        let reason = header_text(&m.properties, REASON);
        let mut headers = m.properties.headers().clone().unwrap_or_default();
        let mut inner = headers.inner().clone();
        inner.remove(REASON);
        inner.remove(REASON_DETAIL);
        inner.insert(REPLAY.into(), AMQPValue::LongLongInt(id));
        headers = inner.into();
        let props = m.properties.clone().with_headers(headers);
        // Published first (mandatory, confirmed); the failure is forgotten
        // by the processor when the replay arrives, and the dead-letter copy
        // acked only now: a replay that reaches no queue loses nothing.
        let confirm = publish(
            &publisher,
            &topology.exchange,
            common::config::Action::Create.routing_key(),
            &m.data,
            props,
        )
        .await?;
        let refused = match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => None,
            Confirmation::Ack(Some(_)) => Some(format!(
                "the replay reached no queue (is {} bound to {} with key create?); failure #{id} stays dead-lettered",
                topology.create_queue, topology.exchange
            )),
            Confirmation::Nack(_) => Some(format!(
                "RabbitMQ refused the replay; failure #{id} stays dead-lettered"
            )),
        };
        if let Some(refused) = refused {
            put_back(&publisher, topology, &m).await?;
            m.acker.ack(BasicAckOptions::default()).await?;
            let _ = publisher.close(200, "done").await;
            bail!(refused);
        }
        m.acker.ack(BasicAckOptions::default()).await?;
        replayed = Some(reason);
    }
    let _ = publisher.close(200, "done").await;
    let Some(reason) = replayed else {
        bail!(
            "failure #{id} has no message waiting in {}",
            topology.dead_queue
        )
    };
    let copies = match copies {
        0 => String::new(),
        n => format!("; {n} more copy(ies) of the same mail removed"),
    };
    println!(
        "replayed failure #{id} ({reason}) into {}{copies}",
        topology.create_queue
    );
    Ok(())
}

/// Publishes `body` to `exchange` with `routing_key`, mandatory, and waits
/// for the confirm.
async fn publish(
    publisher: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) -> anyhow::Result<Confirmation> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    Ok(publisher
        .basic_publish(exchange, routing_key, options, body, props)
        .await?
        .await?)
}

/// Puts a dead letter the replay looked at back into the dead-letter queue
/// (through the dead-letter exchange, confirmed), unchanged: headers,
/// `x-reason`, `x-death` and message id as they were.
async fn put_back(
    publisher: &lapin::Channel,
    topology: &common::topology::Topology,
    m: &lapin::message::BasicGetMessage,
) -> anyhow::Result<()> {
    let confirm = publish(
        publisher,
        &topology.dead_exchange,
        "",
        &m.data,
        m.properties.clone(),
    )
    .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        _ => bail!(
            "could not put a dead letter back into {} (is it bound to {}?); nothing was removed",
            topology.dead_queue,
            topology.dead_exchange
        ),
    }
}
