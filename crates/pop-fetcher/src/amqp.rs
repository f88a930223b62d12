//! The AMQP connection, reopened when it has died (RabbitMQ restarted), and
//! confirm-mode publishers on it: shared with the IMAP fetcher in
//! [`common::publish::AmqpLink`].

pub use common::publish::AmqpLink;
