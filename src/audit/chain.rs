//! The hash chain: turns an [`AuditEvent`] into one log line linked to the line before it.
//!
//! `hash = hex(sha256(prev_hash + "\n" + canonical))`, where `canonical` is the line's JSON
//! object without its `hash` key, compact, keys sorted. A verifier can recompute it from the
//! line alone. This is the writer's per-line work, so it writes straight into the batch
//! buffer and allocates only for the timestamp.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::event::{normalise_duration_ms, AuditEvent, Decision, Outcome};

/// `prev_hash` of the first line of a log: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Length of a hex SHA-256.
const HASH_HEX_LEN: usize = 64;

/// Position in the chain: the hash of the last line written (or the genesis hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    prev: [u8; HASH_HEX_LEN],
}

/// The canonical form of a line, fields in sorted order so that serialising this struct
/// gives exactly the bytes of the sorted `serde_json::Value` the verifier rebuilds
/// (checked by a test). Keep the fields alphabetical.
#[derive(Serialize)]
struct Canonical<'a> {
    agent: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval_id: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approved: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approver: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_sha256: &'a Option<String>,
    bytes_down: Option<u64>,
    bytes_up: Option<u64>,
    credential: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credential_detail: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credential_kind: &'a Option<String>,
    decision: Decision,
    duration_ms: f64,
    host: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: &'a Option<String>,
    method: &'a str,
    on_behalf_of: &'a Option<String>,
    outcome: Option<Outcome>,
    path: &'a str,
    prev_hash: &'a str,
    reason: &'a Option<String>,
    replica: &'a Option<String>,
    request_id: &'a str,
    route: &'a Option<String>,
    session: &'a Option<String>,
    status: Option<u16>,
    task: &'a Option<String>,
    ts: &'a str,
    ttfb_ms: Option<f64>,
}

impl Chain {
    /// A chain for an empty log.
    pub fn genesis() -> Chain {
        Chain {
            prev: [b'0'; HASH_HEX_LEN],
        }
    }

    /// Continue after a line whose `hash` is `last_hash`; `None` if it is not 64 lowercase hex digits.
    pub fn resume(last_hash: &str) -> Option<Chain> {
        let bytes = last_hash.as_bytes();
        if bytes.len() != HASH_HEX_LEN
            || !bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        let mut prev = [0u8; HASH_HEX_LEN];
        prev.copy_from_slice(bytes);
        Some(Chain { prev })
    }

    /// Hash of the last line appended (the next line's `prev_hash`).
    pub fn last_hash(&self) -> &str {
        std::str::from_utf8(&self.prev).expect("prev holds only ASCII hex digits")
    }

    /// Encode `event` as one line (with trailing `\n`) appended to `out`, and advance the chain.
    pub fn append(&mut self, event: &AuditEvent, out: &mut Vec<u8>) {
        let start = out.len();
        let ts = super::event::ts_text(&event.ts);
        let canonical = Canonical {
            agent: &event.agent,
            approval_id: &event.approval.approval_id,
            approved: &event.approval.approved,
            approver: &event.approval.approver,
            body_sha256: &event.approval.body_sha256,
            bytes_down: event.bytes_down,
            bytes_up: event.bytes_up,
            credential: &event.credential,
            credential_detail: &event.credential_detail,
            credential_kind: &event.credential_kind,
            decision: event.decision,
            duration_ms: normalise_duration_ms(event.duration_ms),
            host: &event.host,
            kind: &event.approval.kind,
            method: &event.method,
            on_behalf_of: &event.on_behalf_of,
            outcome: event.outcome,
            path: &event.path,
            prev_hash: self.last_hash(),
            reason: &event.reason,
            replica: &event.replica,
            request_id: &event.request_id,
            route: &event.route,
            session: &event.session,
            status: event.status,
            task: &event.task,
            ts: ts.as_str(),
            ttfb_ms: event.ttfb_ms.map(normalise_duration_ms),
        };
        // Writing to a Vec cannot fail, and every field is a plain string, number or null.
        serde_json::to_writer(&mut *out, &canonical)
            .expect("serialising strings and finite numbers into a Vec cannot fail");
        let hash = hash_hex(&self.prev, &out[start..]);
        // The canonical object ends with `}`: reopen it to add `hash` as the last key.
        out.pop();
        out.extend_from_slice(b",\"hash\":\"");
        out.extend_from_slice(&hash);
        out.extend_from_slice(b"\"}\n");
        self.prev = hash;
    }
}

/// `hex(sha256(prev + "\n" + canonical))` as ASCII bytes.
fn hash_hex(prev: &[u8], canonical: &[u8]) -> [u8; HASH_HEX_LEN] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(b"\n");
    h.update(canonical);
    let digest = h.finalize();
    let mut hex_out = [0u8; HASH_HEX_LEN];
    hex::encode_to_slice(digest, &mut hex_out).expect("64 hex digits fit a 32-byte digest");
    hex_out
}

/// What a parsed line says about itself, for the verifier and for resuming.
pub(crate) struct LineCheck {
    /// The `prev_hash` the line claims.
    pub prev_hash: String,
    /// The `hash` the line claims.
    pub hash: String,
    /// The hash recomputed from the line's contents.
    pub recomputed: String,
}

/// Recompute a parsed line's hash from its own fields. `Err` says which chain field is missing.
pub(crate) fn check_line(
    object: &serde_json::Map<String, serde_json::Value>,
) -> Result<LineCheck, &'static str> {
    let hash = object
        .get("hash")
        .and_then(|v| v.as_str())
        .ok_or("missing or non-string field `hash`")?;
    let prev_hash = object
        .get("prev_hash")
        .and_then(|v| v.as_str())
        .ok_or("missing or non-string field `prev_hash`")?;
    // Sort explicitly rather than rely on serde_json's map type (`preserve_order` would change it).
    let sorted: BTreeMap<&str, &serde_json::Value> = object
        .iter()
        .filter(|(k, _)| k.as_str() != "hash")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let canonical = serde_json::to_vec(&sorted).map_err(|_| "fields cannot be re-serialised")?;
    let recomputed = hash_hex(prev_hash.as_bytes(), &canonical);
    Ok(LineCheck {
        prev_hash: prev_hash.to_owned(),
        hash: hash.to_owned(),
        recomputed: String::from_utf8_lossy(&recomputed).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn event(i: u32) -> AuditEvent {
        AuditEvent {
            ts: Utc.with_ymd_and_hms(2026, 11, 22, 18, 0, 0).unwrap(),
            request_id: format!("req-{i}"),
            agent: Some("claude \"quoted\" \u{e9}\u{1b}[31m".into()),
            on_behalf_of: Some("alice@example.com".into()),
            session: None,
            task: Some("tab\there\nnewline".into()),
            route: Some("github".into()),
            credential: Some("gh_token".into()),
            credential_kind: Some("static".into()),
            credential_detail: None,
            decision: Decision::Allow,
            outcome: Some(Outcome::Ok),
            reason: None,
            replica: None,
            method: "GET".into(),
            host: "api.github.com".into(),
            path: "/repos/x/y".into(),
            status: Some(200),
            duration_ms: 0.1 + 0.2 + f64::from(i) * 1.000_000_7,
            ttfb_ms: Some(0.1 + 0.2),
            bytes_up: Some(0),
            bytes_down: Some(u64::from(i) * 1000),
            approval: Default::default(),
        }
    }

    #[test]
    fn an_approval_line_hashes_its_approval_fields_in_sorted_order() {
        let mut e = event(1);
        e.approval = crate::audit::event::ApprovalFacts {
            kind: Some("approval".into()),
            approval_id: Some("a1".into()),
            approver: Some("alice".into()),
            approved: Some("request".into()),
            body_sha256: Some("ab".repeat(32)),
        };
        let mut chain = Chain::genesis();
        let mut out = Vec::new();
        chain.append(&e, &mut out);
        let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&out).unwrap();
        let check = check_line(&obj).unwrap();
        assert_eq!(check.hash, check.recomputed);
        assert_eq!(obj["approver"], "alice");
        // Editing the approver breaks the line's hash.
        let mut edited = obj.clone();
        edited.insert("approver".into(), "mallory".into());
        let check = check_line(&edited).unwrap();
        assert_ne!(check.hash, check.recomputed);
        // A line without approval fields has none of the keys.
        let mut out = Vec::new();
        chain.append(&event(2), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains("approv") && !text.contains("\"kind\""),
            "{text}"
        );
    }

    #[test]
    fn canonical_struct_matches_sorted_value_serialisation() {
        let e = event(3);
        let mut chain = Chain::genesis();
        let mut out = Vec::new();
        chain.append(&e, &mut out);
        let line = std::str::from_utf8(&out).unwrap().trim_end();
        let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        let check = check_line(&obj).unwrap();
        assert_eq!(check.hash, check.recomputed);
        assert_eq!(check.prev_hash, GENESIS_HASH);
        assert_eq!(chain.last_hash(), check.hash);
        // The canonical bytes are the line minus the trailing hash key.
        let mut value = serde_json::to_value(&e).unwrap();
        value["prev_hash"] = GENESIS_HASH.into();
        value["duration_ms"] = normalise_duration_ms(e.duration_ms).into();
        value["ttfb_ms"] = normalise_duration_ms(e.ttfb_ms.unwrap()).into();
        let sorted: BTreeMap<String, serde_json::Value> = serde_json::from_value(value).unwrap();
        let expected = serde_json::to_string(&sorted).unwrap();
        assert_eq!(&line[..expected.len() - 1], &expected[..expected.len() - 1]);
    }

    #[test]
    fn awkward_durations_still_verify_after_reparse() {
        let mut chain = Chain::genesis();
        for d in [
            0.0,
            1e-9,
            0.1 + 0.2,
            123_456.789_012_3,
            9e12,
            f64::NAN,
            5e-4,
            1e20,
        ] {
            let mut e = event(0);
            e.duration_ms = d;
            let mut out = Vec::new();
            chain.append(&e, &mut out);
            let obj: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&out).unwrap();
            let check = check_line(&obj).unwrap();
            assert_eq!(check.hash, check.recomputed, "duration {d}");
        }
    }

    #[test]
    fn resume_accepts_only_lowercase_hex_of_the_right_length() {
        assert!(Chain::resume(GENESIS_HASH).is_some());
        assert!(Chain::resume("abc").is_none());
        assert!(Chain::resume(&"G".repeat(64)).is_none());
        assert!(Chain::resume(&"A".repeat(64)).is_none());
    }
}
