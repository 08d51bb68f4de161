//! The integration suite, one binary: a real proxy (in-process through `latchkey::app`, or
//! the real binary where the test is about the CLI, signals or `run`), real HTTPS upstreams
//! on loopback with a test CA, and real clients (curl, Python requests, git, reqwest).
//! Each test asserts what the agent got, what the upstream got and what the audit log holds.
//!
//! The shared harness is in `common`; each area is a module.

mod common;

mod adversarial;
mod approval;
mod aws;
mod challenge;
mod cli;
mod gateway;
mod grpc;
mod keys;
mod limits;
mod longcalls;
mod oauth;
mod openbao;
mod operate;
mod proxy;
mod record;
mod redaction;
mod redis;
mod replica;
mod run;
mod sessions;
mod tripwire;
mod ui;
mod uploads;
mod websocket;
