//! Counters for operators, rendered in the Prometheus text format by the admin listener.
//! Labels are agent names, route ids and decisions: never a secret, a token or a path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

/// Upper bounds (seconds) of the upstream latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Process-wide metrics. Cheap to update from any task: atomics and a sharded map.
#[derive(Default)]
pub struct Metrics {
    requests: DashMap<RequestKey, AtomicU64>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    active_tunnels: AtomicI64,
    active_connections: AtomicI64,
    redactions: AtomicU64,
    /// Shared state (Redis): configured, reachable, last complete sync, errors.
    state_configured: std::sync::atomic::AtomicBool,
    state_up: AtomicI64,
    state_last_sync: AtomicU64,
    state_errors: AtomicU64,
    rate_fallbacks: AtomicU64,
    /// Requests the exfiltration tripwire refused, by agent and kind (`stored` or a format).
    exfiltrations: DashMap<(String, &'static str), AtomicU64>,
    /// Token lifecycle events of minting credentials, by credential name and event
    /// (`refreshed`, `adopted`, `refresh_failed`, `broken`).
    credential_events: DashMap<(String, &'static str), AtomicU64>,
}

#[derive(Debug, Clone)]
struct RequestKey {
    agent: String,
    route: String,
    decision: &'static str,
    outcome: &'static str,
    reason: &'static str,
}

/// A [`RequestKey`] as borrowed from a completed record: the counter of a key seen before is
/// found without allocating (every request but the first of its kind).
#[derive(PartialEq, Eq, Hash, Clone, Copy)]
struct KeyRef<'a> {
    agent: &'a str,
    route: &'a str,
    decision: &'static str,
    outcome: &'static str,
    reason: &'static str,
}

/// Either form of a key, so the map (keyed by owned keys) can be asked with a borrowed one.
trait AsKey {
    fn key(&self) -> KeyRef<'_>;
}

impl AsKey for RequestKey {
    fn key(&self) -> KeyRef<'_> {
        KeyRef {
            agent: &self.agent,
            route: &self.route,
            decision: self.decision,
            outcome: self.outcome,
            reason: self.reason,
        }
    }
}

impl AsKey for KeyRef<'_> {
    fn key(&self) -> KeyRef<'_> {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn AsKey + 'a> for RequestKey {
    fn borrow(&self) -> &(dyn AsKey + 'a) {
        self
    }
}

// Hash and equality of both forms are those of `KeyRef`, as `Borrow` requires.
impl std::hash::Hash for dyn AsKey + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for dyn AsKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn AsKey + '_ {}

impl std::hash::Hash for RequestKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for RequestKey {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for RequestKey {}

/// Decrements a gauge when dropped, so every exit path (errors and panics included) counts.
pub struct GaugeGuard<'a>(&'a AtomicI64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Count one completed request (the same event as its audit line).
    pub fn record_request(
        &self,
        agent: Option<&str>,
        route: Option<&str>,
        decision: &'static str,
        outcome: &'static str,
        reason: &'static str,
    ) {
        let key = KeyRef {
            agent: agent.unwrap_or(""),
            route: route.unwrap_or(""),
            decision,
            outcome,
            reason,
        };
        if let Some(c) = self.requests.get(&key as &dyn AsKey) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let key = RequestKey {
            agent: key.agent.to_owned(),
            route: key.route.to_owned(),
            decision,
            outcome,
            reason,
        };
        self.requests
            .entry(key)
            .or_insert_with(|| AtomicU64::new(0))
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Record the time from sending a request upstream to its response head.
    pub fn observe_upstream(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Count an open tunnel until the guard drops.
    pub fn tunnel(&self) -> GaugeGuard<'_> {
        self.active_tunnels.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(&self.active_tunnels)
    }

    /// Count an open agent connection until the guard drops.
    pub fn connection(&self) -> GaugeGuard<'_> {
        self.active_connections.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(&self.active_connections)
    }

    /// Count a response in which an echoed credential was redacted.
    pub fn record_redaction(&self) {
        self.redactions.fetch_add(1, Ordering::Relaxed);
    }

    /// Record whether the shared state (Redis) answered the last sync, and when the last
    /// complete sync started (unix seconds).
    pub fn record_state_sync(&self, up: bool, last_sync: u64) {
        self.state_configured.store(true, Ordering::Relaxed);
        self.state_up.store(i64::from(up), Ordering::Relaxed);
        self.state_last_sync.store(last_sync, Ordering::Relaxed);
        if !up {
            self.state_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count a request refused by the exfiltration tripwire.
    pub fn record_exfiltration(&self, agent: &str, kind: &'static str) {
        self.exfiltrations
            .entry((agent.to_owned(), kind))
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Count a token lifecycle event of a minting credential (`refreshed`: this replica got a
    /// new token; `adopted`: another replica's; `refresh_failed`; `broken`: `invalid_grant`).
    pub fn record_credential_event(&self, credential: &str, event: &'static str) {
        self.credential_events
            .entry((credential.to_owned(), event))
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The count of one credential event (tests, `connections list`).
    pub fn credential_events(&self, credential: &str, event: &'static str) -> u64 {
        self.credential_events
            .get(&(credential.to_owned(), event))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Count a rate-limit decision made locally because Redis failed.
    pub fn record_rate_fallback(&self) {
        self.rate_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Open tunnels right now.
    pub fn active_tunnels(&self) -> i64 {
        self.active_tunnels.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition. `cert_cache` is (hits, misses) of the leaf cache.
    pub fn render(&self, cert_cache: (u64, u64)) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP latchkey_requests_total Completed requests (one per audit line) by agent, route, decision, outcome and reason.\n");
        out.push_str("# TYPE latchkey_requests_total counter\n");
        let mut rows: Vec<(RequestKey, u64)> = self
            .requests
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
            .collect();
        rows.sort_by(|a, b| {
            (
                &a.0.agent,
                &a.0.route,
                a.0.decision,
                a.0.outcome,
                a.0.reason,
            )
                .cmp(&(
                    &b.0.agent,
                    &b.0.route,
                    b.0.decision,
                    b.0.outcome,
                    b.0.reason,
                ))
        });
        for (k, v) in rows {
            let _ = writeln!(
                out,
                "latchkey_requests_total{{agent=\"{}\",route=\"{}\",decision=\"{}\",outcome=\"{}\",reason=\"{}\"}} {v}",
                escape(&k.agent),
                escape(&k.route),
                k.decision,
                k.outcome,
                k.reason
            );
        }
        out.push_str(
            "# HELP latchkey_upstream_duration_seconds Time to the upstream's response head.\n",
        );
        out.push_str("# TYPE latchkey_upstream_duration_seconds histogram\n");
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "latchkey_upstream_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "latchkey_upstream_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "latchkey_upstream_duration_seconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "latchkey_upstream_duration_seconds_count {count}");
        scalar(
            &mut out,
            "latchkey_cert_cache_hits_total",
            "counter",
            "Leaf certificate cache hits.",
            cert_cache.0,
        );
        scalar(
            &mut out,
            "latchkey_cert_cache_misses_total",
            "counter",
            "Leaf certificates minted.",
            cert_cache.1,
        );
        scalar(
            &mut out,
            "latchkey_redactions_total",
            "counter",
            "Upstream responses that echoed an injected credential.",
            self.redactions.load(Ordering::Relaxed),
        );
        out.push_str("# HELP latchkey_exfiltration_attempts_total Requests refused for carrying a credential (secret_in_request), by agent and kind (stored, or a format such as github).\n");
        out.push_str("# TYPE latchkey_exfiltration_attempts_total counter\n");
        let mut rows: Vec<((String, &'static str), u64)> = self
            .exfiltrations
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
            .collect();
        rows.sort();
        for ((agent, kind), v) in rows {
            let _ = writeln!(
                out,
                "latchkey_exfiltration_attempts_total{{agent=\"{}\",kind=\"{kind}\"}} {v}",
                escape(&agent)
            );
        }
        out.push_str("# HELP latchkey_credential_events_total Token lifecycle events of minting credentials (refreshed, adopted from another replica, refresh_failed, broken by invalid_grant), by credential.\n");
        out.push_str("# TYPE latchkey_credential_events_total counter\n");
        let mut rows: Vec<((String, &'static str), u64)> = self
            .credential_events
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
            .collect();
        rows.sort();
        for ((credential, event), v) in rows {
            let _ = writeln!(
                out,
                "latchkey_credential_events_total{{credential=\"{}\",event=\"{event}\"}} {v}",
                escape(&credential)
            );
        }
        scalar(
            &mut out,
            "latchkey_active_tunnels",
            "gauge",
            "Open CONNECT tunnels.",
            self.active_tunnels(),
        );
        scalar(
            &mut out,
            "latchkey_active_connections",
            "gauge",
            "Open agent connections.",
            self.active_connections.load(Ordering::Relaxed),
        );
        if self.state_configured.load(Ordering::Relaxed) {
            scalar(
                &mut out,
                "latchkey_shared_state_up",
                "gauge",
                "Whether the last sync with the shared state (Redis) succeeded.",
                self.state_up.load(Ordering::Relaxed),
            );
            scalar(
                &mut out,
                "latchkey_shared_state_last_sync_seconds",
                "gauge",
                "Unix time at which the last complete revocation sync started.",
                self.state_last_sync.load(Ordering::Relaxed),
            );
            scalar(
                &mut out,
                "latchkey_shared_state_errors_total",
                "counter",
                "Failed syncs with the shared state.",
                self.state_errors.load(Ordering::Relaxed),
            );
            scalar(
                &mut out,
                "latchkey_rate_limit_local_fallbacks_total",
                "counter",
                "Rate-limit decisions made locally because Redis failed.",
                self.rate_fallbacks.load(Ordering::Relaxed),
            );
        }
        out
    }
}

/// One unlabelled metric: its HELP and TYPE lines and its value.
fn scalar(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Escape a label value (backslash, quote, newline) per the exposition format.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_requests_latency_and_gauges() {
        let m = Metrics::default();
        m.record_request(Some("bot"), Some("r1"), "allow", "ok", "");
        m.record_request(Some("bot"), Some("r1"), "allow", "ok", "");
        m.record_request(Some("bot"), None, "deny", "denied", "no_route");
        m.observe_upstream(Duration::from_millis(3));
        let g = m.tunnel();
        let text = m.render((5, 2));
        assert!(text.contains(
            "latchkey_requests_total{agent=\"bot\",route=\"r1\",decision=\"allow\",outcome=\"ok\",reason=\"\"} 2"
        ));
        assert!(text.contains("reason=\"no_route\"} 1"));
        assert!(text.contains("latchkey_upstream_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("latchkey_upstream_duration_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("latchkey_upstream_duration_seconds_count 1"));
        assert!(text.contains("latchkey_cert_cache_misses_total 2"));
        assert!(text.contains("latchkey_active_tunnels 1"));
        drop(g);
        assert_eq!(m.active_tunnels(), 0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
