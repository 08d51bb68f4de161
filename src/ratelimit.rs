//! Request rate limits per (agent, route): the `rate = "120/min"` value a policy carries, and
//! the local GCRA limiter used without Redis (and as the fallback when Redis is down).
//!
//! GCRA (generic cell rate algorithm): each key keeps one number, the theoretical arrival time
//! (TAT) of the next request. With `count` requests per `period`, the emission interval is
//! `T = period / count` and the burst tolerance `tau = period - T`, so `count` requests can
//! pass at once and then one per `T`. A request at `now` passes when `now >= TAT - tau`, and
//! moves TAT to `max(TAT, now) + T`. One number per key, no timers, no sliding windows.
//!
//! `RateLimits` picks the store: Redis when configured (`SharedLimiter`: the same algorithm as
//! one Lua script on Redis's own clock, atomic, one round trip, so replicas neither race nor
//! disagree), else this process's `LocalLimiter`; when Redis fails it falls back to the local
//! limiter rather than refusing or waving everything through.
//!
//! Redis is reached only through `crate::redis`. This module knows agent names and route ids,
//! never tokens or secrets; it must not import `policy` (policy imports `Rate` from here).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::metrics::Metrics;
use crate::redis::{Redis, RedisError};

const RATE_PREFIX: &str = "latchkey:rate:";

/// GCRA in one atomic step on Redis's clock (so replicas with skewed clocks agree).
/// KEYS[1]: the counter; ARGV[1]: period in microseconds; ARGV[2]: count.
/// Returns {1, 0} when allowed (and counted), {0, retry_after_secs} when not.
const GCRA_LUA: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local period = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = period / count
local tau = period - interval
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local allow_at = tat - tau
if now < allow_at then
  local wait = math.ceil((allow_at - now) / 1000000)
  if wait < 1 then wait = 1 end
  return {0, wait}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
"#;

/// A rate: `count` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests allowed per period (also the burst).
    pub count: u32,
    /// The period.
    pub period: Duration,
}

impl Rate {
    /// The emission interval `T = period / count`.
    pub fn interval(&self) -> Duration {
        self.period / self.count
    }

    /// The burst tolerance `tau = period - T`.
    pub fn tolerance(&self) -> Duration {
        self.period.saturating_sub(self.interval())
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Parse `"120/min"`, `"5/s"`, `"1000/h"` (also `sec`, `second`, `m`, `minute`, `hour`).
pub fn parse_rate(raw: &str) -> Result<Rate, String> {
    let bad = || format!("{raw:?} is not a rate such as \"120/min\", \"5/s\" or \"1000/h\"");
    let (count, unit) = raw.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!(
            "{raw:?}: the count must be at least 1 (remove the route to forbid it)"
        ));
    }
    let period = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok(Rate { count, period })
}

/// The answer of a limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The request passes (and was counted).
    Allow,
    /// Over the limit: the earliest retry, in whole seconds (at least 1).
    Deny {
        /// Seconds until a request would pass.
        retry_after_secs: u64,
    },
}

/// Process-local GCRA state: one TAT (nanoseconds since `base`) per (agent, route).
pub struct LocalLimiter {
    base: Instant,
    tat: DashMap<(Box<str>, Box<str>), AtomicU64>,
}

impl Default for LocalLimiter {
    fn default() -> LocalLimiter {
        LocalLimiter::new()
    }
}

impl LocalLimiter {
    /// An empty limiter.
    pub fn new() -> LocalLimiter {
        LocalLimiter {
            base: Instant::now(),
            tat: DashMap::new(),
        }
    }

    /// Count one request of `agent` on `route` against `rate`, now.
    pub fn check(&self, agent: &str, route: &str, rate: Rate) -> Verdict {
        let now = self.base.elapsed().as_nanos() as u64;
        self.check_at(agent, route, rate, now)
    }

    /// `check` at an explicit time (nanoseconds since this limiter was made), for tests.
    pub fn check_at(&self, agent: &str, route: &str, rate: Rate, now: u64) -> Verdict {
        let key = (Box::from(agent), Box::from(route));
        let cell = match self.tat.get(&key) {
            Some(c) => c,
            None => {
                self.tat.entry(key.clone()).or_insert(AtomicU64::new(0));
                self.tat.get(&key).expect("the entry was just inserted")
            }
        };
        let interval = rate.interval().as_nanos() as u64;
        let tau = rate.tolerance().as_nanos() as u64;
        // Compare-and-swap: two requests racing on one key both read TAT, only one moves it;
        // the other retries with the new value, so no request is counted twice or lost.
        let mut current = cell.load(Ordering::Acquire);
        loop {
            let tat = current.max(now);
            let allow_at = tat.saturating_sub(tau);
            if now < allow_at {
                let wait = Duration::from_nanos(allow_at - now);
                return Verdict::Deny {
                    retry_after_secs: ceil_secs(wait),
                };
            }
            match cell.compare_exchange_weak(
                current,
                tat + interval,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Verdict::Allow,
                Err(actual) => current = actual,
            }
        }
    }
}

/// GCRA state kept in Redis and shared by every replica: one key per (agent, route).
pub struct SharedLimiter {
    redis: Arc<Redis>,
    gcra: ::redis::Script,
}

impl SharedLimiter {
    /// Counters in `redis` (no I/O yet: the script is loaded on first use).
    pub fn new(redis: Arc<Redis>) -> SharedLimiter {
        SharedLimiter {
            redis,
            gcra: ::redis::Script::new(GCRA_LUA),
        }
    }

    /// Count one request of `agent` on `route` against `rate`, on Redis's clock.
    pub async fn check(&self, agent: &str, route: &str, rate: Rate) -> Result<Verdict, RedisError> {
        let mut call = self.gcra.prepare_invoke();
        call.key(format!("{RATE_PREFIX}{agent}:{route}"))
            .arg(rate.period.as_micros() as u64)
            .arg(rate.count);
        let (allowed, retry): (i64, u64) = self.redis.eval(&call).await?;
        Ok(if allowed == 1 {
            Verdict::Allow
        } else {
            Verdict::Deny {
                retry_after_secs: retry.max(1),
            }
        })
    }
}

/// Rate limiting for the proxy: shared through Redis when configured, else local.
#[derive(Default)]
pub struct RateLimits {
    local: LocalLimiter,
    shared: Option<SharedLimiter>,
}

impl RateLimits {
    /// Limits kept in this process only.
    pub fn local() -> RateLimits {
        RateLimits::default()
    }

    /// Limits shared by every replica through `redis`, with a local fallback.
    pub fn shared(redis: Arc<Redis>) -> RateLimits {
        RateLimits {
            local: LocalLimiter::new(),
            shared: Some(SharedLimiter::new(redis)),
        }
    }

    /// Count one request of `agent` on `route` against `rate`.
    pub async fn check(&self, agent: &str, route: &str, rate: Rate, metrics: &Metrics) -> Verdict {
        if let Some(shared) = &self.shared {
            // Boxed: a Redis call is kilobytes of state that every request's future would
            // otherwise carry, rated route or not.
            match Box::pin(shared.check(agent, route, rate)).await {
                Ok(v) => return v,
                Err(e) => {
                    // Availability over exactness: while Redis is away each replica enforces
                    // the limit on its own (so the fleet allows at most replicas x rate).
                    tracing::warn!(error = %e, agent, route, "shared rate limit unavailable; limiting locally");
                    metrics.record_rate_fallback();
                }
            }
        }
        self.local.check(agent, route, rate)
    }
}

/// Whole seconds, rounded up, at least 1 (`Retry-After` has second granularity; 0 would invite
/// an immediate retry that is still refused).
pub fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn rates_parse_with_every_unit() {
        assert_eq!(
            parse_rate("120/min").unwrap(),
            Rate {
                count: 120,
                period: Duration::from_secs(60)
            }
        );
        assert_eq!(parse_rate("5/s").unwrap().period, Duration::from_secs(1));
        assert_eq!(
            parse_rate(" 1000 / h ").unwrap().period,
            Duration::from_secs(3600)
        );
        assert_eq!(parse_rate("10/min").unwrap().to_string(), "10/min");
    }

    #[test]
    fn malformed_rates_are_rejected() {
        for bad in ["", "10", "10/day", "x/min", "-1/s", "0/min", "10/"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_rate("0/min").unwrap_err().contains("at least 1"));
    }

    #[test]
    fn gcra_lets_a_full_burst_pass_then_one_per_interval() {
        let l = LocalLimiter::new();
        let rate = parse_rate("10/min").unwrap();
        let t0 = 100 * SEC;
        for i in 0..10 {
            assert_eq!(
                l.check_at("bot", "r", rate, t0),
                Verdict::Allow,
                "request {i}"
            );
        }
        // The 11th waits one emission interval (6 s).
        assert_eq!(
            l.check_at("bot", "r", rate, t0),
            Verdict::Deny {
                retry_after_secs: 6
            }
        );
        assert_eq!(
            l.check_at("bot", "r", rate, t0 + 5 * SEC),
            Verdict::Deny {
                retry_after_secs: 1
            }
        );
        assert_eq!(l.check_at("bot", "r", rate, t0 + 6 * SEC), Verdict::Allow);
        assert!(matches!(
            l.check_at("bot", "r", rate, t0 + 6 * SEC),
            Verdict::Deny { .. }
        ));
        // After a whole idle period the full burst is back.
        for _ in 0..10 {
            assert_eq!(l.check_at("bot", "r", rate, t0 + 100 * SEC), Verdict::Allow);
        }
    }

    #[test]
    fn gcra_keys_are_per_agent_and_route() {
        let l = LocalLimiter::new();
        let rate = parse_rate("1/h").unwrap();
        assert_eq!(l.check_at("bot", "a", rate, SEC), Verdict::Allow);
        assert_eq!(l.check_at("bot", "b", rate, SEC), Verdict::Allow);
        assert_eq!(l.check_at("other", "a", rate, SEC), Verdict::Allow);
        assert_eq!(
            l.check_at("bot", "a", rate, SEC),
            Verdict::Deny {
                retry_after_secs: 3600
            }
        );
    }

    #[test]
    fn gcra_counts_exactly_under_contention() {
        let l = std::sync::Arc::new(LocalLimiter::new());
        let rate = parse_rate("100/h").unwrap();
        let passed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let l = l.clone();
                let passed = passed.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        if l.check_at("bot", "r", rate, SEC) == Verdict::Allow {
                            passed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(passed.load(Ordering::Relaxed), 100);
    }
}
