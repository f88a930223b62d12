//! Support for the POP3 fetcher's tests: the fixture
//! ([`crate::fixture::Fixture`] for POP3), an in-process fetcher and the
//! fetcher's last reported error.

use std::time::Duration;

use common::config::Config;
use common::shutdown::CancellationToken;

pub use crate::fixture::{depth, drain, eventually, Pop};
pub use crate::relay::Relay;

/// The OAuth profile name every fixture config uses.
pub const PROFILE: &str = <Pop as crate::fixture::Protocol>::PROFILE;

/// One POP3 test's world.
pub type Fixture = crate::fixture::Fixture<Pop>;

impl Fixture {
    /// A `[[incoming-mail]]` table: `listener` is `POP3S` or `POP3`; `extra`
    /// lines are appended.
    pub fn mail_table(&self, name: &str, listener: &str, extra: &str) -> String {
        let addr = self.env.mail_addr(listener);
        self.mail_table_at(
            name,
            addr.port(),
            if listener == "POP3" { "pop3" } else { "pop3s" },
            extra,
        )
    }

    /// A mail table for a server on `port` of `localhost`.
    pub fn mail_table_at(&self, name: &str, port: u16, server_type: &str, extra: &str) -> String {
        self.mail_table_for(name, &self.mailbox, port, server_type, extra)
    }
}

/// A fetcher running in this process until dropped or stopped.
pub struct InProcess {
    /// Cancels it.
    pub shutdown: CancellationToken,
    /// Its task.
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Starts `pop_fetcher::run` with short backoffs.
    pub fn start(config: Config) -> Self {
        let options = pop_fetcher::Options {
            lease_ttl: Duration::from_secs(3),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(3),
            token_wait: Duration::from_secs(1),
            ..Default::default()
        };
        Self::start_with(config, options)
    }

    /// Starts it with `options`.
    pub fn start_with(config: Config, options: pop_fetcher::Options) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(common::fetch::run(
            pop_fetcher::Pop3,
            config,
            options,
            shutdown.clone(),
        ));
        Self {
            shutdown,
            task: Some(task),
        }
    }

    /// Graceful stop; returns the run's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let task = self.task.take().expect("running");
        crate::fixture::stop_task(&self.shutdown, task, Duration::from_secs(15), "fetcher").await
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
