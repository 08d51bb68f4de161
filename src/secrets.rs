//! Secrets: the redacting [`Secret`] type and the encrypted-at-rest [`SecretStore`].
//!
//! This module owns every credential value latchkey injects. It must never put a value into
//! an error, a log line, a span or an audit event: callers get values only through
//! [`Secret::expose`], and errors name the secret, never its contents.

mod secret;
mod store;

pub use secret::Secret;
pub use store::{
    parse_master_key, validate_name, SecretMeta, SecretStore, StoreError, MASTER_KEY_ENV,
};
