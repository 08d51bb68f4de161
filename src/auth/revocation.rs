//! The revocation list: sessions and agents revoked by `token revoke`, kept in the state dir
//! (`revocations.json`, reloaded when it changes) and, with `--redis`, a second snapshot
//! learned from the other replicas (`sync`). The per-request check reads both without locks,
//! and refuses tokens it cannot judge (`state_unavailable`) once the shared state has been out
//! of reach for longer than the grace period.
//!
//! It knows session ids, agent names and times: never tokens or secrets.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::{unix_now, AuthError, Claims, LEEWAY_SECS};
use crate::deny::{AuthStage, Deny};
use crate::fsutil;

pub mod sync;

const REVOCATIONS_FILE: &str = "revocations.json";

/// The revocation list as stored on disk.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RevocationFile {
    /// Revoked session ids and their token's expiry (kept until then, then pruned).
    #[serde(default)]
    sessions: HashMap<String, u64>,
    /// Per agent: every token issued at or before this unix second is revoked.
    #[serde(default)]
    agents: HashMap<String, u64>,
}

/// One revocation, as stored in Redis and pushed to every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Revoked {
    /// One session, kept until its token's expiry.
    Session {
        /// The session id (jti).
        jti: String,
        /// The token's `exp`: after it the revocation can be forgotten.
        exp: u64,
    },
    /// Every token of an agent issued at or before `cutoff` (unix seconds).
    Agent {
        /// The agent name.
        agent: String,
        /// The cutoff `iat`.
        cutoff: u64,
    },
}

/// Revoked sessions and agents, shared by the CLI (writes) and the proxy (reads, reloaded when
/// the file changes). With shared state (Redis), a second snapshot holds what the replicas
/// learned from Redis; a token is revoked if either snapshot says so.
pub struct Revocations {
    path: PathBuf,
    current: ArcSwap<RevocationFile>,
    stamp: std::sync::Mutex<Option<fsutil::FileStamp>>,
    /// Learned from Redis (pushes and resyncs). Only grows, except for sessions past their
    /// expiry: a Redis that lost its data (restart without persistence) must not un-revoke.
    remote: ArcSwap<RevocationFile>,
    /// Freshness of `remote`, when shared state is in use.
    sync: SyncClock,
}

/// When the remote snapshot was last known complete, and how long it may go stale.
#[derive(Default)]
struct SyncClock {
    /// Whether a shared store is configured at all (without one, nothing is ever stale).
    required: std::sync::atomic::AtomicBool,
    /// Unix second at which the last full resync started (0: never).
    last_sync: std::sync::atomic::AtomicU64,
    /// Seconds the snapshot may be stale before fresh tokens are refused.
    grace_secs: std::sync::atomic::AtomicU64,
}

impl Revocations {
    /// Open the list in the state dir (a missing file is an empty list).
    pub fn open(state_dir: &Path) -> Result<Revocations, AuthError> {
        let r = Revocations {
            path: state_dir.join(REVOCATIONS_FILE),
            current: ArcSwap::from_pointee(RevocationFile::default()),
            stamp: std::sync::Mutex::new(None),
            remote: ArcSwap::from_pointee(RevocationFile::default()),
            sync: SyncClock::default(),
        };
        r.reload_if_changed()?;
        Ok(r)
    }

    /// Re-read the file if it changed since the last read. Cheap when unchanged (one stat).
    pub fn reload_if_changed(&self) -> Result<bool, AuthError> {
        let stamp = fsutil::FileStamp::of(&self.path);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == stamp && last.is_some() {
            return Ok(false);
        }
        let file = read_revocations(&self.path)?;
        self.current.store(Arc::new(file));
        *last = stamp;
        Ok(true)
    }

    /// Whether these claims are revoked. Lock-free read of the current snapshots.
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        let revoked_in = |f: &RevocationFile| {
            f.sessions.contains_key(&claims.jti)
                || f.agents
                    .get(&claims.sub)
                    .is_some_and(|cutoff| claims.iat <= *cutoff)
        };
        revoked_in(&self.current.load()) || revoked_in(&self.remote.load())
    }

    /// The per-request check: revoked (`token_revoked`), or too new to judge because the
    /// shared state has been out of reach for longer than the grace period
    /// (`state_unavailable`). Lock-free.
    pub fn check(&self, claims: &Claims, stage: AuthStage) -> Result<(), Deny> {
        if self.is_revoked(claims) {
            return Err(Deny::TokenRevoked(stage));
        }
        if self.is_stale_for(claims, unix_now()) {
            return Err(Deny::StateUnavailable);
        }
        Ok(())
    }

    /// SECURITY: a token issued after the last complete sync may have been revoked on another
    /// replica in the meantime, unseen here. Within the grace period that risk is accepted
    /// (Redis blips must not stop every agent); past it, such tokens are refused. Tokens
    /// issued before the last sync keep working: their revocations, if any, are known.
    pub fn is_stale_for(&self, claims: &Claims, now: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.sync.required.load(Relaxed) {
            return false;
        }
        let last = self.sync.last_sync.load(Relaxed);
        let grace = self.sync.grace_secs.load(Relaxed);
        now.saturating_sub(last) > grace && claims.iat >= last
    }

    /// Declare that a shared store feeds this list: from now on freshness is tracked, and the
    /// grace period starts counting from now (a replica that starts while Redis is down still
    /// serves tokens issued before it started).
    pub fn require_sync(&self, grace: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sync.grace_secs.store(grace.as_secs(), Relaxed);
        self.sync.last_sync.store(unix_now(), Relaxed);
        self.sync.required.store(true, Relaxed);
    }

    /// Record a complete resync that started at `started` (unix seconds).
    pub fn mark_synced(&self, started: u64) {
        self.sync
            .last_sync
            .fetch_max(started, std::sync::atomic::Ordering::Relaxed);
    }

    /// Unix second at which the last complete resync started (0: never).
    pub fn last_sync(&self) -> u64 {
        self.sync
            .last_sync
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Merge revocations learned from the shared store into the remote snapshot. Returns how
    /// many were new (or moved an agent's cutoff later).
    pub fn learn(&self, items: impl IntoIterator<Item = Revoked>) -> usize {
        let items: Vec<Revoked> = items.into_iter().collect();
        let now = unix_now();
        let cur = self.remote.load();
        let is_new = |r: &Revoked| match r {
            Revoked::Session { jti, exp } => {
                *exp + LEEWAY_SECS >= now && !cur.sessions.contains_key(jti)
            }
            Revoked::Agent { agent, cutoff } => cur.agents.get(agent).is_none_or(|c| c < cutoff),
        };
        let fresh = items.iter().filter(|r| is_new(r)).count();
        if fresh == 0 {
            return 0;
        }
        self.remote.rcu(|old| {
            let mut next = RevocationFile::clone(old);
            next.sessions.retain(|_, exp| *exp + LEEWAY_SECS >= now);
            for r in &items {
                match r {
                    Revoked::Session { jti, exp } if *exp + LEEWAY_SECS >= now => {
                        next.sessions.insert(jti.clone(), *exp);
                    }
                    Revoked::Session { .. } => {}
                    Revoked::Agent { agent, cutoff } => {
                        let c = next.agents.entry(agent.clone()).or_insert(0);
                        *c = (*c).max(*cutoff);
                    }
                }
            }
            next
        });
        fresh
    }

    /// Everything learned from the shared store that has not expired (to write back into a
    /// store that lost it).
    pub fn learned(&self) -> Vec<Revoked> {
        let now = unix_now();
        let cur = self.remote.load();
        let sessions = cur
            .sessions
            .iter()
            .filter(|(_, exp)| **exp + LEEWAY_SECS >= now)
            .map(|(jti, exp)| Revoked::Session {
                jti: jti.clone(),
                exp: *exp,
            });
        let agents = cur.agents.iter().map(|(agent, cutoff)| Revoked::Agent {
            agent: agent.clone(),
            cutoff: *cutoff,
        });
        sessions.chain(agents).collect()
    }

    /// Revoke one session until `exp`.
    pub fn revoke_session(&self, jti: &str, exp: u64) -> Result<(), AuthError> {
        self.update(|f| {
            f.sessions.insert(jti.to_owned(), exp);
        })
    }

    /// Revoke every token of `agent` issued until now. Returns the cutoff (unix seconds).
    pub fn revoke_agent(&self, agent: &str) -> Result<u64, AuthError> {
        let now = unix_now();
        self.update(|f| {
            f.agents.insert(agent.to_owned(), now);
        })?;
        Ok(now)
    }

    fn update(&self, change: impl FnOnce(&mut RevocationFile)) -> Result<(), AuthError> {
        let io = |source| AuthError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fsutil::ensure_private_dir(dir).map_err(io)?;
        let _lock = fsutil::lock_file(&dir.join("revocations.lock")).map_err(io)?;
        let mut file = read_revocations(&self.path)?;
        change(&mut file);
        let now = unix_now();
        file.sessions.retain(|_, exp| *exp + LEEWAY_SECS >= now);
        let mut bytes = serde_json::to_vec_pretty(&file).expect("revocation list serialises");
        bytes.push(b'\n');
        fsutil::write_atomic(&self.path, &bytes, 0o600).map_err(io)?;
        drop(_lock);
        self.reload_if_changed()?;
        Ok(())
    }
}

fn read_revocations(path: &Path) -> Result<RevocationFile, AuthError> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|_| AuthError::BadRevocations(path.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevocationFile::default()),
        Err(source) => Err(AuthError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tests::{keys, spec};

    #[test]
    fn revocations_learned_from_the_shared_store_bite_and_are_never_lowered() {
        let (d, k) = keys();
        let revs = Revocations::open(d.path()).unwrap();
        let (_, a) = k.issue(&spec("bot")).unwrap();
        let (_, b) = k.issue(&spec("other")).unwrap();
        let learned = revs.learn([
            Revoked::Session {
                jti: a.jti.clone(),
                exp: a.exp,
            },
            Revoked::Agent {
                agent: "other".into(),
                cutoff: b.iat,
            },
        ]);
        assert_eq!(learned, 2);
        assert!(revs.is_revoked(&a) && revs.is_revoked(&b));
        assert_eq!(
            revs.check(&a, AuthStage::Tunnel).unwrap_err().code(),
            "token_revoked"
        );
        // Learning the same again, or an older cutoff, changes nothing.
        assert_eq!(
            revs.learn([Revoked::Agent {
                agent: "other".into(),
                cutoff: 1
            }]),
            0
        );
        assert!(revs.is_revoked(&b));
        // Expired sessions are not learned.
        assert_eq!(
            revs.learn([Revoked::Session {
                jti: "old".into(),
                exp: 1
            }]),
            0
        );
        assert_eq!(revs.learned().len(), 2);
    }

    #[test]
    fn tokens_newer_than_the_last_sync_are_refused_only_past_the_grace_period() {
        let (d, k) = keys();
        let revs = Revocations::open(d.path()).unwrap();
        let (_, c) = k.issue(&spec("bot")).unwrap();
        // Without a shared store nothing is ever stale.
        assert!(!revs.is_stale_for(&c, c.iat + 1000));
        revs.require_sync(Duration::from_secs(30));
        revs.mark_synced(c.iat);
        assert!(!revs.is_stale_for(&c, c.iat + 30));
        assert!(revs.is_stale_for(&c, c.iat + 31));
        // A token issued before the last sync is still judged by what is known.
        let mut older = c.clone();
        older.iat = c.iat - 1;
        assert!(!revs.is_stale_for(&older, c.iat + 1000));
        // A later sync makes the token judgeable again.
        revs.mark_synced(c.iat + 1);
        assert!(!revs.is_stale_for(&c, c.iat + 31));
    }

    #[test]
    fn revocation_by_session_and_by_agent() {
        let (d, k) = keys();
        let revs = Revocations::open(d.path()).unwrap();
        let (_, a) = k.issue(&spec("bot")).unwrap();
        let (_, b) = k.issue(&spec("other")).unwrap();
        assert!(!revs.is_revoked(&a));
        revs.revoke_session(&a.jti, a.exp).unwrap();
        assert!(revs.is_revoked(&a));
        assert!(!revs.is_revoked(&b));
        // A second handle (another process) sees the change after reload.
        let other = Revocations::open(d.path()).unwrap();
        other.revoke_agent("other").unwrap();
        revs.reload_if_changed().unwrap();
        assert!(revs.is_revoked(&b));
    }
}
