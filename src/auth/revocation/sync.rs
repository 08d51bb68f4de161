//! Revocations shared by every replica through Redis (`--redis`). Without `--redis` none of
//! this runs and the state dir is the only store.
//!
//! `token revoke` writes `latchkey:revoked:session:<jti>` (value and expiry: the token's `exp`)
//! or `latchkey:revoked:agent:<agent>` (value: the cutoff `iat`) and publishes the same fact on
//! `latchkey:revocations`, in one MULTI. Every `serve` replica subscribes and applies pushes at
//! once, and rescans the whole set every `RESYNC_EVERY`, so a replica that missed pushes
//! (disconnected, or started late) catches up. What a replica learned is never forgotten
//! before expiry: a Redis restarted empty does not un-revoke anything, and the replica writes
//! what it knows back.
//!
//! Redis is reached only through `crate::redis`; this module owns the keys and what they mean.
//! It never sees tokens or secrets: only session ids, agent names and times.

use std::future::Future;
use std::time::Duration;

use super::{Revocations, Revoked};
use crate::auth::{unix_now, LEEWAY_SECS};
use crate::metrics::Metrics;
use crate::redis::{Redis, RedisError};

/// Channel on which revocations are pushed.
pub const CHANNEL: &str = "latchkey:revocations";
const SESSION_PREFIX: &str = "latchkey:revoked:session:";
const AGENT_PREFIX: &str = "latchkey:revoked:agent:";
/// Matches every key written under `SESSION_PREFIX` or `AGENT_PREFIX`.
const ALL_REVOKED: &str = "latchkey:revoked:*";

/// How often every replica rescans the full revocation set. Pushes make revocations bite at
/// once; the rescan is the safety net for missed pushes, so it can be a little slower.
pub const RESYNC_EVERY: Duration = Duration::from_secs(2);
/// Pause before resubscribing after the subscription failed or ended.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);

/// Store a revocation and push it to every replica (one MULTI: both or neither).
pub async fn publish_revocation(redis: &Redis, r: &Revoked) -> Result<(), RedisError> {
    let message = serde_json::to_string(r).expect("a revocation serialises");
    let mut pipe = ::redis::pipe();
    pipe.atomic();
    match r {
        Revoked::Session { jti, exp } => {
            // Kept one second past `exp` (the verification leeway), then Redis drops it.
            pipe.cmd("SET")
                .arg(format!("{SESSION_PREFIX}{jti}"))
                .arg(*exp)
                .arg("EXAT")
                .arg(exp + LEEWAY_SECS.max(1))
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
    redis.exec(&pipe).await
}

/// Every revocation stored in Redis.
pub async fn load_revocations(redis: &Redis) -> Result<Vec<Revoked>, RedisError> {
    let stored: Vec<(String, u64)> = redis.scan_values(ALL_REVOKED).await?;
    Ok(stored
        .into_iter()
        .filter_map(|(key, value)| from_key(&key, value))
        .collect())
}

/// The revocation a stored key and value stand for (`None` for a key this version does not
/// know).
fn from_key(key: &str, value: u64) -> Option<Revoked> {
    if let Some(jti) = key.strip_prefix(SESSION_PREFIX) {
        Some(Revoked::Session {
            jti: jti.to_owned(),
            exp: value,
        })
    } else {
        key.strip_prefix(AGENT_PREFIX).map(|agent| Revoked::Agent {
            agent: agent.to_owned(),
            cutoff: value,
        })
    }
}

/// Rescan everything into `revs`; write back what this replica knows and Redis lacks
/// (a Redis restarted without persistence). Marks the sync complete on success.
pub async fn resync_revocations(redis: &Redis, revs: &Revocations) -> Result<usize, RedisError> {
    let started = unix_now();
    let stored = load_revocations(redis).await?;
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
            publish_revocation(redis, r).await?;
        }
    }
    Ok(learned)
}

/// Keep `revs` in step with Redis until `stop` resolves: a subscriber applying pushes as they
/// come, and a resync every `RESYNC_EVERY` (also at once after every reconnect). Logs each
/// change between reachable and unreachable once, and reports it in `metrics`.
pub async fn sync_revocations(
    redis: &Redis,
    revs: &Revocations,
    metrics: &Metrics,
    grace: Duration,
    stop: impl Future<Output = ()>,
) {
    let subscriber = subscribe_loop(redis, revs);
    let resyncer = async {
        let mut tick = tokio::time::interval(RESYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut up = true;
        let mut refusing = false;
        loop {
            tick.tick().await;
            match resync_revocations(redis, revs).await {
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
async fn subscribe_loop(redis: &Redis, revs: &Revocations) {
    loop {
        match redis.subscribe(CHANNEL).await {
            Ok(mut pushes) => {
                tracing::debug!("subscribed to revocation pushes");
                // Pushes sent while we were away are lost: catch up now.
                if let Err(e) = resync_revocations(redis, revs).await {
                    tracing::debug!(error = %e, "resync after subscribing failed");
                }
                while let Some(payload) = pushes.next().await {
                    match serde_json::from_slice::<Revoked>(&payload) {
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
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_keys_read_back_as_the_revocations_written() {
        assert_eq!(
            from_key("latchkey:revoked:session:abc", 42),
            Some(Revoked::Session {
                jti: "abc".into(),
                exp: 42
            })
        );
        assert_eq!(
            from_key("latchkey:revoked:agent:bot", 7),
            Some(Revoked::Agent {
                agent: "bot".into(),
                cutoff: 7
            })
        );
        assert_eq!(from_key("latchkey:revoked:other:x", 1), None);
    }
}
