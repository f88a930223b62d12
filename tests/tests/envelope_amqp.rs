//! The envelope (§5) survives a round trip through a real RabbitMQ queue, and
//! the topology is declared idempotently by every start.

use common::config::{Action, AmqpConfig, QueueType};
use common::envelope::{dedupe_key, Envelope, MessageRef};
use common::secret::SecretUrl;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Connection, ConnectionProperties};
use mailagent_tests::env::{unique, Endpoints};

fn amqp_config(env: &Endpoints, prefix: &str, queue_type: QueueType) -> AmqpConfig {
    AmqpConfig {
        url: SecretUrl::new(env.amqp_url()),
        urls: vec![SecretUrl::new(env.amqp_url())],
        prefix: prefix.to_string(),
        queue_type,
        delivery_limit: 5,
        broker_max_message_bytes: common::config::DEFAULT_BROKER_MAX_MESSAGE_BYTES,
    }
}

async fn connect(env: &Endpoints) -> Connection {
    Connection::connect(env.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ")
}

/// A connection, a channel and a fresh classic topology under its own
/// prefix.
async fn classic_topology() -> (Connection, lapin::Channel, common::topology::Topology) {
    let env = Endpoints::load();
    let conn = connect(&env).await;
    let channel = conn.create_channel().await.unwrap();
    let config = amqp_config(&env, &unique("t"), QueueType::Classic);
    let topo = common::topology::declare(&channel, &config, false)
        .await
        .unwrap();
    (conn, channel, topo)
}

#[tokio::test]
async fn envelope_round_trips_through_a_real_queue() {
    let (_conn, channel, topo) = classic_topology().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let body = b"Message-ID: <rt@example.com>\r\nSubject: LEASE ABSTRACT FORM\r\n\r\n\x00\xff binary-safe\r\n.\r\n".to_vec();
    let cases = [
        MessageRef::Imap {
            uid: 42,
            uidvalidity: 1_700_000_001,
        },
        MessageRef::Pop3 {
            uidl: "AQMkADAwATM0MDAAMS1iNTcwLWI2NTEtMDACLTAwCgBGAAAD".into(),
        },
    ];
    for message_ref in cases {
        let sent = Envelope {
            dedupe_key: dedupe_key("forms@contoso.com", &body),
            body: body.clone(),
            timestamp: 1_764_000_000,
            mail_config: "lease-forms".into(),
            mailbox: "forms@contoso.com".into(),
            message_ref,
            action: Action::Create,
            fetcher: "imap-fetcher-1".into(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        let confirm = channel
            .basic_publish(
                &topo.exchange,
                sent.routing_key(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &sent.body,
                sent.properties(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "{confirm:?}");
        assert!(
            confirm.take_message().is_none(),
            "message was returned unroutable"
        );

        let got = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                if let Some(m) = channel
                    .basic_get(&topo.create_queue, BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()
                {
                    return m;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("message arrives on the create queue");
        assert_eq!(
            got.delivery.properties.delivery_mode(),
            &Some(2),
            "persistent"
        );
        let received =
            Envelope::from_amqp(&got.delivery.properties, got.delivery.data.clone()).unwrap();
        assert_eq!(received, sent);
    }
}

#[tokio::test]
async fn topology_declares_idempotently_for_both_queue_types() {
    let env = Endpoints::load();
    let conn = connect(&env).await;
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let config = amqp_config(&env, &unique("t"), queue_type);
        let channel = conn.create_channel().await.unwrap();
        let first = common::topology::declare(&channel, &config, false)
            .await
            .unwrap();
        let second = common::topology::declare(&channel, &config, false)
            .await
            .unwrap();
        assert_eq!(first, second);
        // A passive declare (a user without configure permission) finds it.
        common::topology::declare(&channel, &config, true)
            .await
            .unwrap();
        assert_eq!(
            common::topology::queue_depth(&channel, &first.dead_queue)
                .await
                .unwrap(),
            0
        );
    }
    // A passive declare of a topology nobody declared fails.
    let channel = conn.create_channel().await.unwrap();
    let missing = amqp_config(&env, &unique("absent"), QueueType::Classic);
    assert!(common::topology::declare(&channel, &missing, true)
        .await
        .is_err());
}

/// Issue 12: a publisher holds at most its byte limit of bodies awaiting
/// confirms (a blocked connection keeps them in memory), however large its
/// message window; a single body over the limit still goes, alone.
#[tokio::test]
async fn a_publisher_holds_at_most_its_byte_limit_unconfirmed() {
    use common::fetch::publish::Publisher;
    let (conn, _channel, topo) = classic_topology().await;
    let limit: u64 = 3 << 20;
    let mut publisher: Publisher<usize> = Publisher::open(&conn, &topo.exchange, 256, limit)
        .await
        .unwrap();
    let mut confirmed = Vec::new();
    let sizes = [
        1 << 20,
        1 << 20,
        1 << 20,
        1 << 20,
        5 << 20,
        1 << 20,
        1 << 20,
    ];
    let mut most = 0;
    for (i, size) in sizes.into_iter().enumerate() {
        let body = vec![b'x'; size];
        let envelope = Envelope {
            dedupe_key: dedupe_key("forms@contoso.com", &body),
            body,
            timestamp: 1_764_000_000,
            mail_config: "bytes".into(),
            mailbox: "forms@contoso.com".into(),
            message_ref: MessageRef::Imap {
                uid: i as u32 + 1,
                uidvalidity: 1,
            },
            action: Action::Create,
            fetcher: "imap-fetcher-1".into(),
            traceparent: None,
        };
        publisher
            .publish(&envelope, &envelope.body, i, &mut confirmed)
            .await
            .unwrap();
        let held = publisher.in_flight_bytes();
        assert!(
            held <= limit.max(size as u64),
            "{held} bytes unconfirmed after message {i}"
        );
        most = most.max(held);
    }
    publisher.flush(&mut confirmed).await.unwrap();
    let tags: Vec<usize> = confirmed.iter().map(|c| c.tag).collect();
    assert_eq!(
        tags,
        (0..sizes.len()).collect::<Vec<_>>(),
        "all confirmed, in order"
    );
    assert!(
        most >= 2 << 20,
        "the window is used, not one at a time ({most})"
    );
    publisher.close().await;
}
