//! End-to-end: the whole agent as users run it. Each test starts its own
//! stack (`mailagent_tests::e2e::Stack`): token-broker, three imap-fetcher
//! replicas, one pop-fetcher and one form-processor as separate processes
//! from the built binaries, against the real Redis, RabbitMQ and Dovecot of
//! `scripts/services`, with the test identity provider standing in for Entra
//! ID, two IMAP and two POP3 mail configs, and a SQLite record store.
//!
//! Every test mails a first batch of 1,000 offline forms (860 valid, 100
//! from a sender the topic refuses, 40 repeating another form's unique id)
//! and checks exactly the expected records and rejections; then it mails a
//! second batch of 1,000 and, while that batch is being processed, injects
//! one fault; after recovery it checks again: every record exactly once (0
//! lost, 0 created twice), every rejection once with its reason and one
//! dead letter, both POP3 maildrops empty and every IMAP message `\Seen`.
//!
//! Restarts of RabbitMQ and Redis are simulated by cutting a per-test TCP
//! relay in front of the shared server: every connection of the stack is
//! closed and new ones are refused for 10 s, then accepted again. To the
//! agent's clients that is what a restart looks like; the shared servers —
//! and the tests running beside this one — carry on, and the data survives
//! as on a RabbitMQ with durable queues and a Redis with AOF persistence.
//! Processes run under a supervisor that restarts one that exits, as
//! compose's `restart:` policy does.
//!
//! The IMAP configs of the fault tests poll every second (`idle = false`),
//! so a batch's pace does not hang on Dovecot's change notifications; the
//! stack with IDLE is `imap_idle_hands_over_mail_that_arrives_during_a_pass`.

use std::time::{Duration, Instant};

use mailagent_tests::e2e::{batch, Bin, Expected, Stack, BATCH, TOKEN_LIFETIME};

/// The fault injected during the second batch.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL the token broker; it stays down longer than a token lives.
    KillTokenBroker,
    /// SIGKILL one of the three imap-fetcher replicas holding a mail config.
    KillImapReplica,
    /// SIGKILL the pop-fetcher; it is restarted after 3 s.
    KillPopFetcher,
    /// SIGKILL the form-processor; it is restarted after 1 s.
    KillFormProcessor,
    /// RabbitMQ "restarts": its relay is cut for 10 s.
    RestartRabbitMq,
    /// Redis "restarts": its relay is cut for 10 s.
    RestartRedis,
    /// The identity provider answers 503 for 30 s.
    IdentityProviderDown,
}

/// How long the processing of one batch may take.
const BATCH_DEADLINE: Duration = Duration::from_secs(240);

/// How long a relay stays cut.
const OUTAGE: Duration = Duration::from_secs(10);

/// Batch 1 clean, batch 2 with `fault`; exact checks after each.
async fn scenario(label: &str, fault: Fault) {
    let started = Instant::now();
    let stack = Stack::start(label, false).await;
    eprintln!("[e2e] {label}: stack up in {:?}", started.elapsed());

    let first = batch("A", BATCH, &stack.mailboxes);
    stack.seed(&first);
    let t = Instant::now();
    let outcome = stack.verify(&first.expected, BATCH_DEADLINE).await;
    eprintln!(
        "[e2e] {label}: batch 1 ({BATCH} mails) processed in {:?}: {outcome:?}",
        t.elapsed()
    );

    let second = batch("B", BATCH, &stack.mailboxes);
    let mut all = Expected::default();
    all.extend(&first.expected);
    all.extend(&second.expected);
    let total = all.records() + all.failures();
    let before = stack.settled().await;
    stack.seed(&second);
    let t = Instant::now();
    // Strike once the batch is well under way.
    stack
        .wait_settled(before + BATCH / 10, BATCH_DEADLINE)
        .await;
    let at_fault = stack.settled().await;
    inject(&stack, fault).await;
    assert!(
        at_fault < total,
        "the fault came after the batch was done ({at_fault} of {total} settled)"
    );
    let outcome = stack.verify(&all, BATCH_DEADLINE).await;
    eprintln!(
        "[e2e] {label}: batch 2 with {fault:?} at {} of {BATCH} settled, processed in {:?}: {outcome:?}",
        at_fault - before,
        t.elapsed()
    );
    stack
        .wait_mailboxes_done([BATCH / 2, BATCH / 2], Duration::from_secs(60))
        .await;
    if matches!(
        fault,
        Fault::RestartRabbitMq | Fault::RestartRedis | Fault::IdentityProviderDown
    ) {
        // An outage of a server is ridden out in process: no binary exited
        // (the supervisor would have started it again).
        let restarted: Vec<String> = [
            "token-broker",
            "imap-fetcher-0",
            "imap-fetcher-1",
            "imap-fetcher-2",
            "pop-fetcher",
            "form-processor",
        ]
        .iter()
        .filter(|n| stack.starts(n) != 1)
        .map(|n| format!("{n} started {} times", stack.starts(n)))
        .collect();
        assert!(restarted.is_empty(), "{fault:?}: {restarted:?}");
    }
    stack.shutdown().await;
    eprintln!("[e2e] {label}: done in {:?}", started.elapsed());
}

async fn inject(stack: &Stack, fault: Fault) {
    match fault {
        Fault::KillTokenBroker => {
            let requests = stack.idp.requests().len();
            stack.kill_9(
                "token-broker",
                Some(TOKEN_LIFETIME + Duration::from_secs(5)),
            );
            mailagent_tests::e2e::poll_until(
                "the token broker back and requesting tokens",
                Duration::from_secs(60),
                Duration::from_millis(200),
                || async {
                    stack.starts("token-broker") == 2 && stack.idp.requests().len() > requests
                },
            )
            .await;
        }
        Fault::KillImapReplica => {
            let owners = stack.lease_owners().await;
            let running = stack.running(Bin::ImapFetcher);
            let (victim, pid) = running
                .iter()
                .find(|(_, pid)| owners.values().any(|o| o.contains(&format!("-{pid}-"))))
                .cloned()
                .expect("a replica holding an IMAP config");
            stack.kill_9(&victim, None);
            // The survivors take its configs over.
            mailagent_tests::e2e::poll_until(
                "the killed replica's IMAP configs taken over",
                Duration::from_secs(30),
                Duration::from_millis(200),
                || async {
                    let owners = stack.lease_owners().await;
                    stack.configs[..2].iter().all(|c| {
                        owners
                            .get(c)
                            .is_some_and(|o| !o.contains(&format!("-{pid}-")))
                    })
                },
            )
            .await;
        }
        Fault::KillPopFetcher => stack.kill_9("pop-fetcher", Some(Duration::from_secs(3))),
        Fault::KillFormProcessor => stack.kill_9("form-processor", Some(Duration::from_secs(1))),
        Fault::RestartRabbitMq => {
            stack.amqp_relay.down();
            tokio::time::sleep(OUTAGE).await; // the outage itself, not a wait for a condition
            stack.amqp_relay.up();
        }
        Fault::RestartRedis => {
            stack.redis_relay.down();
            tokio::time::sleep(OUTAGE).await; // the outage itself
            stack.redis_relay.up();
        }
        Fault::IdentityProviderDown => {
            stack.idp_front.fail();
            tokio::time::sleep(Duration::from_secs(30)).await; // the outage itself
            stack.idp_front.heal();
            assert!(
                stack.idp_front.refused() > 0,
                "no token request during a 30 s outage with {TOKEN_LIFETIME:?} tokens"
            );
        }
    }
}

/// One test per fault: `$name` runs [`scenario`] with prefix label `$label`.
macro_rules! scenarios {
    ($($name:ident: $label:literal, $fault:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            scenario($label, Fault::$fault).await;
        }
    )*};
}

scenarios! {
    kill_9_token_broker_during_a_batch_loses_nothing_and_creates_nothing_twice:
        "e2ebroker", KillTokenBroker;
    kill_9_one_of_three_imap_replicas_during_a_batch_loses_nothing_and_creates_nothing_twice:
        "e2eimap", KillImapReplica;
    kill_9_pop_fetcher_during_a_batch_loses_nothing_and_creates_nothing_twice:
        "e2epop", KillPopFetcher;
    kill_9_form_processor_during_a_batch_loses_nothing_and_creates_nothing_twice:
        "e2efp", KillFormProcessor;
    rabbitmq_restart_during_a_batch_loses_nothing_and_creates_nothing_twice:
        "e2eamqp", RestartRabbitMq;
    redis_restart_during_a_batch_loses_nothing_and_creates_nothing_twice:
        "e2eredis", RestartRedis;
    identity_provider_down_30_s_during_a_batch_loses_nothing_and_creates_nothing_twice:
        "e2eidp", IdentityProviderDown;
}

/// Mail written into the IMAP mailboxes in small chunks while the fetchers
/// (IDLE, three replicas) are handing over the earlier chunks: every
/// message is handed over and processed within a minute.
///
/// What it does not pin down: imap-fetcher's pass-again rule (mail
/// announced by an untagged `* n EXISTS` during a pass, which async-imap
/// queues as unsolicited, triggers another pass rather than an IDLE that
/// would wait for the next change; commit 46f19af). With that rule switched
/// off the test still passes here, because Dovecot syncs the mailbox when
/// IDLE starts and announces what arrived since. (The test was ignored for
/// a while for a bug of its own: it seeded 240 of each mailbox's 250 mails
/// and waited for all 250.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_idle_hands_over_mail_that_arrives_during_a_pass() {
    let stack = Stack::start("e2eidle", true).await;
    let forms = batch("I", BATCH, &stack.mailboxes);
    for chunk in 0..20 {
        let part = mailagent_tests::e2e::Batch {
            // Every mail of the mailbox in 20 parts (250 each is not a
            // multiple of 20: the last part takes the rest).
            mails: std::array::from_fn(|b| {
                let n = forms.mails[b].len();
                forms.mails[b][n * chunk / 20..n * (chunk + 1) / 20].to_vec()
            }),
            expected: Expected::default(),
        };
        stack.seed(&part);
        // Pacing of the arrivals, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stack.verify(&forms.expected, Duration::from_secs(60)).await;
    stack.shutdown().await;
}
