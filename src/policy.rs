//! Route policies: parse and validate TOML files once, compile them into a per-agent index,
//! and decide allow/deny for a request. Policy never sees secret values, only credential names.

pub mod decision;
