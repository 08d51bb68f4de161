//! Session state shared by every replica through Redis (`--redis`): revocations and rate-limit
//! counters. Without `--redis` none of this runs and the state dir is the only store.
//!
//! Revocations: `token revoke` writes `latchkey:revoked:session:<jti>` (value and expiry: the
//! token's `exp`) or `latchkey:revoked:agent:<agent>` (value: the cutoff `iat`) and publishes the
//! same fact on `latchkey:revocations`, in one MULTI. Every `serve` replica subscribes and
//! applies pushes at once, and rescans the whole set every `RESYNC_EVERY`, so a replica that
//! missed pushes (disconnected, or started late) catches up. What a replica learned is never
//! forgotten before expiry: a Redis restarted empty does not un-revoke anything, and the
//! replica writes what it knows back.
//!
//! Rate limits: one Lua script (GCRA on Redis's own clock) per request, atomic in Redis, one
//! round trip; no read-modify-write race between replicas.
//!
//! This module never sees tokens or secrets: only session ids, agent names and route ids.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::auth::{unix_now, Revocations, Revoked};
use crate::metrics::Metrics;
use crate::ratelimit::{Rate, Verdict};

/// Channel on which revocations are pushed.
pub const CHANNEL: &str = "latchkey:revocations";
const SESSION_PREFIX: &str = "latchkey:revoked:session:";
const AGENT_PREFIX: &str = "latchkey:revoked:agent:";
const RATE_PREFIX: &str = "latchkey:rate:";

/// How often every replica rescans the full revocation set. Pushes make revocations bite at
/// once; the rescan is the safety net for missed pushes, so it can be a little slower.
pub const RESYNC_EVERY: Duration = Duration::from_secs(2);
/// Longest wait on one Redis call on the request path: a slow Redis must not stall agents
/// (the rate limiter falls back to local counting instead).
const CALL_TIMEOUT: Duration = Duration::from_millis(300);
/// Longest wait to (re)connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

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

/// Errors talking to the shared state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The `--redis` URL cannot be used.
    #[error("--redis {url:?} is not a usable Redis URL: {reason}")]
    BadUrl {
        /// The URL as given (a password in it is the operator's own).
        url: String,
        /// Why.
        reason: String,
    },
    /// Redis refused or failed a command.
    #[error("Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// A handle on the shared store. Cheap to share; reconnects by itself.
pub struct SharedState {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    gcra: redis::Script,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedState { .. }")
    }
}

async fn timed<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, StateError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(StateError::Timeout(limit)),
    }
}

impl SharedState {
    /// Parse the URL; no I/O (the first call connects).
    pub fn open(url: &str) -> Result<SharedState, StateError> {
        let client = redis::Client::open(url).map_err(|e| StateError::BadUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(SharedState {
            client,
            conn: ArcSwapOption::empty(),
            gcra: redis::Script::new(GCRA_LUA),
        })
    }

    /// The multiplexed connection, connecting on first use. The manager reconnects by itself
    /// after Redis comes back; a call made while it is away fails fast.
    async fn connection(&self) -> Result<ConnectionManager, StateError> {
        if let Some(c) = self.conn.load_full() {
            return Ok(ConnectionManager::clone(&c));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(CALL_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(500);
        let c = timed(
            CONNECT_TIMEOUT * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await?;
        self.conn.store(Some(Arc::new(c.clone())));
        Ok(c)
    }

    /// Check that Redis answers.
    pub async fn ping(&self) -> Result<(), StateError> {
        let mut c = self.connection().await?;
        timed(
            CALL_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut c),
        )
        .await?;
        Ok(())
    }

    /// Store a revocation and push it to every replica (one MULTI: both or neither).
    pub async fn publish_revocation(&self, r: &Revoked) -> Result<(), StateError> {
        let mut c = self.connection().await?;
        let message = serde_json::to_string(r).expect("a revocation serialises");
        let mut pipe = redis::pipe();
        pipe.atomic();
        match r {
            Revoked::Session { jti, exp } => {
                // Kept one second past `exp` (the verification leeway), then Redis drops it.
                pipe.cmd("SET")
                    .arg(format!("{SESSION_PREFIX}{jti}"))
                    .arg(*exp)
                    .arg("EXAT")
                    .arg(exp + crate::auth::LEEWAY_SECS.max(1))
                    .ignore();
            }
            Revoked::Agent { agent, cutoff } => {
                pipe.cmd("SET")
                    .arg(format!("{AGENT_PREFIX}{agent}"))
                    .arg(*cutoff)
                    .ignore();
            }
        }
        pipe.cmd("PUBLISH").arg(CHANNEL).arg(message).ignore();
        timed(CALL_TIMEOUT * 3, pipe.query_async::<()>(&mut c)).await?;
        Ok(())
    }

    /// Every revocation stored in Redis (SCAN, then MGET per batch).
    pub async fn load_revocations(&self) -> Result<Vec<Revoked>, StateError> {
        let mut c = self.connection().await?;
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = timed(
                CALL_TIMEOUT,
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("latchkey:revoked:*")
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut c),
            )
            .await?;
            if !keys.is_empty() {
                let values: Vec<Option<u64>> = timed(
                    CALL_TIMEOUT,
                    redis::cmd("MGET").arg(&keys).query_async(&mut c),
                )
                .await?;
                for (key, value) in keys.into_iter().zip(values) {
                    let Some(value) = value else { continue };
                    if let Some(jti) = key.strip_prefix(SESSION_PREFIX) {
                        out.push(Revoked::Session {
                            jti: jti.to_owned(),
                            exp: value,
                        });
                    } else if let Some(agent) = key.strip_prefix(AGENT_PREFIX) {
                        out.push(Revoked::Agent {
                            agent: agent.to_owned(),
                            cutoff: value,
                        });
                    }
                }
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// GCRA for (agent, route) in Redis: `EVALSHA` (the script is loaded on first use).
    pub async fn check_rate(
        &self,
        agent: &str,
        route: &str,
        rate: Rate,
    ) -> Result<Verdict, StateError> {
        let mut c = self.connection().await?;
        let mut call = self.gcra.prepare_invoke();
        call.key(format!("{RATE_PREFIX}{agent}:{route}"))
            .arg(rate.period.as_micros() as u64)
            .arg(rate.count);
        let (allowed, retry): (i64, u64) = timed(CALL_TIMEOUT, call.invoke_async(&mut c)).await?;
        Ok(if allowed == 1 {
            Verdict::Allow
        } else {
            Verdict::Deny {
                retry_after_secs: retry.max(1),
            }
        })
    }

    /// Rescan everything into `revs`; write back what this replica knows and Redis lacks
    /// (a Redis restarted without persistence). Marks the sync complete on success.
    pub async fn resync(&self, revs: &Revocations) -> Result<usize, StateError> {
        let started = unix_now();
        let stored = self.load_revocations().await?;
        let learned = revs.learn(stored.iter().cloned());
        revs.mark_synced(started);
        // Sessions about to expire are left out: Redis would drop them at once anyway.
        let soon = unix_now() + 2;
        let missing: Vec<Revoked> = revs
            .learned()
            .into_iter()
            .filter(|r| !matches!(r, Revoked::Session { exp, .. } if *exp <= soon))
            .filter(|r| !stored.contains(r))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                count = missing.len(),
                "Redis lacks revocations this replica knows (restarted empty?); writing them back"
            );
            for r in &missing {
                self.publish_revocation(r).await?;
            }
        }
        Ok(learned)
    }
}

/// Keep `revs` in step with Redis until `stop` resolves: a subscriber applying pushes as they
/// come, and a resync every `RESYNC_EVERY` (also at once after every reconnect). Logs each
/// change between reachable and unreachable once, and reports it in `metrics`.
pub async fn sync_revocations(
    state: &SharedState,
    revs: &Revocations,
    metrics: &Metrics,
    grace: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let subscriber = subscribe_loop(state, revs);
    let resyncer = async {
        let mut tick = tokio::time::interval(RESYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut up = true;
        let mut refusing = false;
        loop {
            tick.tick().await;
            match state.resync(revs).await {
                Ok(n) => {
                    if !up {
                        tracing::info!(
                            "shared state (Redis) reachable again; revocations resynced"
                        );
                    }
                    if n > 0 {
                        tracing::info!(new = n, "revocations learned by resync");
                    }
                    up = true;
                    refusing = false;
                }
                Err(e) => {
                    if up {
                        tracing::error!(error = %e, "shared state (Redis) unreachable; enforcing the revocations known so far");
                    }
                    up = false;
                    let stale = unix_now().saturating_sub(revs.last_sync());
                    if stale > grace.as_secs() && !refusing {
                        refusing = true;
                        tracing::error!(
                            stale_secs = stale,
                            "shared state unreachable for longer than the grace period; refusing tokens issued after the last sync (state_unavailable)"
                        );
                    }
                }
            }
            metrics.record_state_sync(up, revs.last_sync());
        }
    };
    tokio::select! {
        _ = subscriber => {}
        _ = resyncer => {}
        _ = stop => {}
    }
}

/// Subscribe, apply pushes, and resubscribe after any disconnect.
async fn subscribe_loop(state: &SharedState, revs: &Revocations) {
    loop {
        match timed(CONNECT_TIMEOUT, state.client.get_async_pubsub()).await {
            Ok(mut pubsub) => match timed(CONNECT_TIMEOUT, pubsub.subscribe(CHANNEL)).await {
                Ok(()) => {
                    tracing::debug!("subscribed to revocation pushes");
                    // Pushes sent while we were away are lost: catch up now.
                    if let Err(e) = state.resync(revs).await {
                        tracing::debug!(error = %e, "resync after subscribing failed");
                    }
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        match serde_json::from_slice::<Revoked>(msg.get_payload_bytes()) {
                            Ok(r) => {
                                tracing::info!(revocation = ?r, "revocation pushed");
                                revs.learn([r]);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "ignoring a malformed revocation push")
                            }
                        }
                    }
                    tracing::debug!("revocation subscription ended");
                }
                Err(e) => tracing::debug!(error = %e, "cannot subscribe to revocation pushes"),
            },
            Err(e) => tracing::debug!(error = %e, "cannot connect for revocation pushes"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
