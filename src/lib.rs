//! latchkey: a local forward proxy that lets AI agents call real APIs with a short-lived,
//! scoped token while the real credential is injected from an encrypted store.
//!
//! One request flows `proxy::server -> tls -> auth -> policy -> inject -> proxy::forward -> audit`;
//! `app` wires the components into a running proxy, `cli` turns flags into its config.
#![forbid(unsafe_code)]

pub mod app;
pub mod approval;
pub mod audit;
pub mod auth;
pub mod authority;
pub mod cli;
pub mod connect;
pub mod credential;
pub mod deny;
pub mod fsutil;
pub mod inject;
pub mod keys;
pub mod metrics;
pub mod netguard;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod redact;
pub mod redis;
pub mod run;
pub mod secrets;
pub mod tls;
pub mod tripwire;
pub mod ui;
