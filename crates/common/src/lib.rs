//! What the Incoming Mail Agent's binaries share: the configuration (§2), the
//! message envelope and AMQP topology (§5), Redis key names (§7a), TLS,
//! telemetry, shutdown, the admin HTTP server and heartbeats (§7), and the
//! fetch kit both fetchers are built on ([`fetch`]).

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod connect;
pub mod credential;
pub mod envelope;
pub mod error;
pub mod fetch;
pub mod heartbeat;
pub mod keys;
pub mod least_privilege;
pub mod redis_handle;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod topology;

pub use config::{Component, Config};
pub use error::{Error, Result};
pub use redis_handle::RedisHandle;
pub use secret::Secret;
