//! The fetch kit (§4, §7a): everything a fetcher does that does not depend
//! on its mail protocol, so the IMAP and POP3 fetchers differ only in their
//! protocol.
//!
//! A fetcher is a [`Protocol`] — one mailbox session, and nothing else —
//! handed to [`run`], which starts the service, takes its share of Redis
//! leases ([`lease`]), runs one worker per leased mail config, keeps the
//! heartbeat and shuts down gracefully ([`supervisor`]). A worker retries its
//! sessions with one backoff rule and reports them with one heartbeat rule
//! ([`worker`]); inside a session the protocol hands messages over through
//! one path — the envelope, a confirm-mode publish, the per-confirm
//! metrics, the oversized record ([`handover`], [`publish`]).
//!
//! ```text
//!   supervisor ── leases ──► worker (one per mail config) ──► Protocol::session
//!                                 │ retry, heartbeat, tokens        │
//!                                 ▼                                  ▼
//!                              Mailbox  ◄──────── handover (envelope, publish, metrics)
//! ```
//!
//! Failures are classified once: [`FetchError`] holds the classes every
//! protocol shares (token, publish, Redis, permission), and a protocol's own
//! error wraps it and implements [`Failure`].

pub mod error;
pub mod handover;
pub mod lease;
pub mod metrics;
pub mod options;
pub mod publish;
pub mod supervisor;
pub mod worker;
pub mod xoauth2;

pub use error::{Class, Failure, FetchError};
pub use options::Options;
pub use supervisor::{run, Protocol};
pub use worker::{Kit, Mailbox};
