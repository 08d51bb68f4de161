//! The audit record: what was decided for one request, and by whom.
//!
//! An event never holds a secret value, only the credential's name; everything here is
//! safe to write to disk and to print.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Whether the request went out: `allow` exactly when latchkey handed it, with its credential
/// (if the route has one), to the upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The request was sent upstream, with its credential injected if the route has one,
    /// whatever happened after (the `outcome` says).
    Allow,
    /// The request never went upstream: refused by the proxy, or the upstream could not even
    /// be connected to.
    Deny,
}

/// How the request's life ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The response was delivered to its end (for CONNECT: the tunnel was opened).
    Ok,
    /// latchkey refused the request (`decision: deny`; `reason` says why).
    Denied,
    /// The upstream could not be reached or failed before its response head (unreachable, TLS,
    /// timeout, protocol error). `decision` says whether the request had gone out.
    UpstreamFailed,
    /// The agent went away (closed its socket, reset its stream) before the response ended.
    Cancelled,
    /// A body broke mid-stream: the upstream's response body, or the agent's request body
    /// after it had started going upstream (`reason` says which).
    BodyError,
    /// The request carried no proxy credentials at all and was answered `407` with
    /// `Proxy-Authenticate` (`decision: deny`, `reason: token_missing`): the first step of
    /// clients that send credentials only when challenged (git, Java), not a refusal.
    Challenged,
}

impl Outcome {
    /// The snake_case word used in the log and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Cancelled => "cancelled",
            Outcome::BodyError => "body_error",
            Outcome::Challenged => "challenged",
        }
    }
}

impl Decision {
    /// The lowercase word used in the log (`allow` / `deny`).
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// One decision. Never holds a secret value: only the credential's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When the request was received; serialised RFC 3339 with milliseconds and `Z`.
    #[serde(with = "ts_millis")]
    pub ts: DateTime<Utc>,
    /// Proxy-assigned id of the request.
    pub request_id: String,
    /// Authenticated agent, if the token was valid.
    pub agent: Option<String>,
    /// Human or service the agent acts for.
    pub on_behalf_of: Option<String>,
    /// Session id (the token's `jti`).
    pub session: Option<String>,
    /// Task label carried by the token.
    pub task: Option<String>,
    /// Policy route that matched.
    pub route: Option<String>,
    /// Name (never the value) of the credential injected.
    pub credential: Option<String>,
    /// The credential's kind (`static`, `oauth2`, ...), when one went on the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_kind: Option<String>,
    /// What the kind says about its use, never a value: whose connection, which role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_detail: Option<String>,
    /// `allow` exactly when the request (and its credential) went upstream.
    pub decision: Decision,
    /// How the request ended. Absent in lines written before this field existed.
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// Stable reason code (a `Deny::code()` for denials).
    pub reason: Option<String>,
    /// The latchkey replica that decided (`--replica-id`, default the host name).
    #[serde(default)]
    pub replica: Option<String>,
    /// HTTP method (or `CONNECT`).
    pub method: String,
    /// Target host.
    pub host: String,
    /// Request path without the query string (queries may carry secrets).
    pub path: String,
    /// Status returned to the agent; `null` when the agent went away before any response.
    pub status: Option<u16>,
    /// Time from receipt to the end of the response body (or to the end of the request's
    /// life: refusal, failure, cancellation), in milliseconds.
    pub duration_ms: f64,
    /// Time from receipt to the response head sent to the agent, in milliseconds; `null` when
    /// none was sent. Absent in older lines.
    #[serde(default)]
    pub ttfb_ms: Option<f64>,
    /// Request body bytes forwarded upstream. Absent in older lines.
    #[serde(default)]
    pub bytes_up: Option<u64>,
    /// Response body bytes delivered to the agent. Absent in older lines.
    #[serde(default)]
    pub bytes_down: Option<u64>,
    /// The human decision this line records or depends on; every field is absent from lines
    /// that have nothing to do with an approval (so older lines hash the same).
    #[serde(flatten)]
    pub approval: ApprovalFacts,
}

/// What an approval line (or a request that needed one) says about the human decision.
/// Names and digests only: never a body, a header value, a secret or a token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApprovalFacts {
    /// `approval` on the line of a human decision (grant asked, approved, denied, timed out,
    /// cancelled); absent on request lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The pending approval's id (`latchkey approvals list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// Who decided, as they named themselves at sign-in or with `--as` (`timeout` when
    /// nobody did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    /// What was approved or asked for: `request`, `route R for session S for 10m`, or the
    /// routes and lifetime of a session grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<String>,
    /// SHA-256 (hex) of the held request's body: the exact bytes that were approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_sha256: Option<String>,
}

impl AuditEvent {
    /// `ts` as written to the log: RFC 3339, milliseconds, `Z`.
    pub fn ts_string(&self) -> String {
        ts_text(&self.ts).as_str().to_owned()
    }
}

/// A timestamp as the log writes it, built on the stack (once per line, by the writer).
pub(crate) enum TsText {
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`, the only form a timestamp from the clock takes.
    Fixed([u8; 24]),
    /// What chrono writes for the rest (years outside 0-9999, a leap second).
    Other(String),
}

impl TsText {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            TsText::Fixed(b) => std::str::from_utf8(b).expect("ASCII digits and separators"),
            TsText::Other(s) => s,
        }
    }
}

/// `ts` as chrono's `to_rfc3339_opts(SecondsFormat::Millis, true)` writes it, without its
/// formatting machinery or an allocation.
pub(crate) fn ts_text(ts: &DateTime<Utc>) -> TsText {
    use chrono::{Datelike, Timelike};
    let year = ts.year();
    let nanos = ts.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return TsText::Other(ts.to_rfc3339_opts(SecondsFormat::Millis, true));
    }
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, ts.month());
    put(8, 2, ts.day());
    put(11, 2, ts.hour());
    put(14, 2, ts.minute());
    put(17, 2, ts.second());
    put(20, 3, nanos / 1_000_000);
    TsText::Fixed(b)
}

/// Round a duration to whole microseconds and clamp non-finite or negative values to 0.
///
/// Why: the verifier re-serialises the number it parsed back from the line. A value with at
/// most three decimals parses back to exactly the same `f64` (exact fast path), so its
/// shortest representation, and thus the hash, is stable. Arbitrary floats may not be with
/// serde_json's default float parsing, and NaN would be written as `null`.
pub fn normalise_duration_ms(ms: f64) -> f64 {
    if ms.is_finite() && ms > 0.0 {
        (ms * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// chrono's `serde` feature is not enabled in this crate, and we want a fixed format anyway.
pub(crate) mod ts_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Write `ts` as `2026-11-22T18:00:00.123Z`.
    pub fn serialize<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::ts_text(ts).as_str())
    }

    /// Read any RFC 3339 timestamp and convert it to UTC.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn ts_is_written_with_millis_and_z_and_reads_back() {
        let ts = Utc.with_ymd_and_hms(2026, 11, 22, 18, 0, 0).unwrap()
            + chrono::Duration::microseconds(123_456);
        let e = AuditEvent {
            ts,
            request_id: "r1".into(),
            agent: None,
            on_behalf_of: None,
            session: None,
            task: None,
            route: None,
            credential: None,
            credential_kind: None,
            credential_detail: None,
            decision: Decision::Deny,
            outcome: Some(Outcome::Denied),
            reason: Some("no_rule".into()),
            replica: None,
            method: "GET".into(),
            host: "h".into(),
            path: "/".into(),
            status: Some(403),
            duration_ms: 1.5,
            ttfb_ms: Some(1.5),
            bytes_up: Some(0),
            bytes_down: Some(120),
            approval: Default::default(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["ts"], "2026-11-22T18:00:00.123Z");
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["outcome"], "denied");
        assert_eq!(v["bytes_down"], 120);
        assert!(v["agent"].is_null());
        let back: AuditEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back.ts, ts - chrono::Duration::microseconds(456));
    }

    #[test]
    fn a_line_written_before_outcome_and_byte_counts_still_reads() {
        let old = r#"{"ts":"2026-11-22T18:00:00.123Z","request_id":"r","agent":null,"on_behalf_of":null,"session":null,"task":null,"route":null,"credential":null,"decision":"allow","reason":null,"replica":"a","method":"GET","host":"h","path":"/","status":200,"duration_ms":2.5}"#;
        let e: AuditEvent = serde_json::from_str(old).unwrap();
        assert_eq!(e.status, Some(200));
        assert_eq!(e.outcome, None);
        assert_eq!(e.bytes_down, None);
    }

    #[test]
    fn the_stack_timestamp_is_chronos_to_the_byte() {
        let chrono_text = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut cases = vec![
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap()
                + chrono::Duration::nanoseconds(999_999_999),
            Utc.with_ymd_and_hms(2024, 2, 29, 12, 34, 56).unwrap()
                + chrono::Duration::microseconds(7_890),
            // Outside the fixed form: chrono's own text.
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 15, 8, 0, 0).unwrap(),
            Utc::now(),
        ];
        // A spread of instants from 1970 to about 2310, at odd nanoseconds.
        let mut t: i64 = 0;
        for _ in 0..5000 {
            t = t
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let secs = (t as u64 % 10_700_000_000) as i64;
            let nanos = (t as u64 >> 33) as u32 % 1_000_000_000;
            cases.push(DateTime::from_timestamp(secs, nanos).unwrap());
        }
        for ts in &cases {
            assert_eq!(ts_text(ts).as_str(), chrono_text(ts), "{ts:?}");
        }
        // A leap second (chrono keeps it in the nanoseconds) goes to chrono too.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_milli_opt(23, 59, 59, 1_500)
            .unwrap()
            .and_utc();
        assert!(matches!(ts_text(&leap), TsText::Other(_)));
        assert_eq!(ts_text(&leap).as_str(), chrono_text(&leap));
    }

    #[test]
    fn durations_are_normalised_to_microseconds() {
        assert_eq!(normalise_duration_ms(1.234_567_8), 1.235);
        assert_eq!(normalise_duration_ms(f64::NAN), 0.0);
        assert_eq!(normalise_duration_ms(-3.0), 0.0);
        assert_eq!(normalise_duration_ms(f64::INFINITY), 0.0);
    }
}
