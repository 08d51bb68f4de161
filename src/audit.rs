//! Audit log: one hash-chained JSON line per request, written when the request's life ends.
//!
//! The proxy opens a [`Record`] when a request arrives; the record completes exactly once,
//! also when it is dropped (the agent went away), and hands its [`AuditEvent`] to an
//! [`AuditSink`]; a single writer task encodes,
//! chains and appends it, so the request path never touches the disk. The log rotates by
//! size (`audit.jsonl.1`, `.2`, ...) and the chain runs on across the files. `verify` checks the
//! chain offline and `tail` renders the log for operators.
//!
//! This module must never see a secret value: events carry only the credential's *name*.

pub mod chain;
pub mod event;
pub mod record;
pub mod rotate;
pub mod sink;
pub mod tail;
pub mod verify;

pub use chain::{Chain, GENESIS_HASH};
pub use event::{ApprovalFacts, AuditEvent, Decision, Outcome};
pub use record::{Record, Recorder};
pub use rotate::Rotation;
pub use sink::{AuditError, AuditSink, AuditWriter};
pub use tail::{format_line, tail, TailFilter, TailReport};
pub use verify::{verify, VerifyError, VerifyReport};

#[cfg(test)]
mod tests;
