//! Test support for the Incoming Mail Agent: discovery of the real servers
//! that `scripts/services` starts, the test identity provider standing in for
//! Microsoft Entra ID, and small protocol clients used to check servers.

pub mod bench;
pub mod certs;
pub mod cluster;
pub mod corpus;
pub mod e2e;
pub mod env;
pub mod exchange_front;
pub mod fetch_rewrite;
pub mod fixture;
pub mod forms;
pub mod harness;
pub mod idp;
pub mod imap_support;
pub mod mailclient;
pub mod maildir;
pub mod pop_support;
pub mod private_rabbit;
pub mod process;
pub mod redis_ha;
pub mod relay;
pub mod restricted;
