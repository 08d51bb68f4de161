//! Where pending approvals, decisions and allowances live: `<state-dir>/approvals/` (0600
//! files in a 0700 directory; the CLI and every proxy on the host see them) and, with
//! `--redis`, Redis keys under `latchkey:approval:` (every replica sees them).
//!
//! A decision is recorded once: the first writer wins (`SET NX` in Redis when configured, a
//! hard link that fails if the file exists otherwise), and a later decider is told who was
//! first. Files are named by ids checked with [`super::valid_id`] and by digests, never by
//! anything an agent chose.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{valid_id, Allowance, Decision, Kind, Pending, Step};
use crate::fsutil;
use crate::redis::{Redis, RedisError};

const KEY_PENDING: &str = "latchkey:approval:pending:";
const KEY_DECISION: &str = "latchkey:approval:decision:";
const KEY_ALLOW: &str = "latchkey:approval:allow:";
const KEY_CLAIM: &str = "latchkey:approval:audited:";

/// How long a decided or expired approval is kept (files and keys) for history and for
/// replicas that look late.
pub const KEEP_AFTER: u64 = 3600;

/// A store failure (files or Redis).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file in the approvals directory could not be read or written.
    #[error("cannot use {}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Redis failed.
    #[error("the shared state (--redis) failed")]
    Redis(#[from] RedisError),
}

/// The approvals directory and, optionally, Redis.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    redis: Option<Arc<Redis>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("approval records serialise")
}

impl Store {
    /// The store under `state_dir` (the directory is created 0700 on first write).
    pub fn new(state_dir: &Path, redis: Option<Arc<Redis>>) -> Store {
        Store {
            dir: state_dir.join("approvals"),
            redis,
        }
    }

    /// Whether decisions also go through Redis.
    pub fn shared(&self) -> bool {
        self.redis.is_some()
    }

    fn pending_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn decision_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.decision.json"))
    }

    fn allow_key(session: &str, route: &str) -> String {
        let mut h = Sha256::new();
        h.update(session.as_bytes());
        h.update([0]);
        h.update(route.as_bytes());
        hex::encode(h.finalize())
    }

    fn ensure_dir(&self) -> Result<(), StoreError> {
        fsutil::ensure_private_dir(&self.dir).map_err(io(&self.dir))
    }

    /// Record a pending approval (replacing one of the same id).
    pub async fn put_pending(&self, p: &Pending) -> Result<(), StoreError> {
        self.ensure_dir()?;
        let path = self.pending_path(&p.id);
        fsutil::write_atomic(&path, &to_json(p), 0o600).map_err(io(&path))?;
        if let Some(r) = &self.redis {
            let ttl = p.expires.saturating_sub(crate::auth::unix_now()) + KEEP_AFTER;
            r.query::<()>(
                ::redis::cmd("SET")
                    .arg(format!("{KEY_PENDING}{}", p.id))
                    .arg(to_json(p))
                    .arg("EX")
                    .arg(ttl.max(1)),
            )
            .await?;
        }
        Ok(())
    }

    /// Forget a held request once it is over (its pending entry and decision).
    pub async fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.pending_path(id));
        let _ = std::fs::remove_file(self.decision_path(id));
        if let Some(r) = &self.redis {
            let _ = r
                .query::<()>(
                    ::redis::cmd("DEL")
                        .arg(format!("{KEY_PENDING}{id}"))
                        .arg(format!("{KEY_DECISION}{id}")),
                )
                .await;
        }
    }

    /// Forget a held request's files now (from a `Drop`, where nothing can be awaited); the
    /// Redis keys are removed by a task when a runtime is there, and expire anyway.
    pub fn remove_soon(self: &Arc<Self>, id: &str) {
        let _ = std::fs::remove_file(self.pending_path(id));
        let _ = std::fs::remove_file(self.decision_path(id));
        if self.redis.is_some() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let me = Arc::clone(self);
                let id = id.to_owned();
                rt.spawn(async move { me.remove(&id).await });
            }
        }
    }

    /// The pending approval `id`, from the directory or Redis.
    pub async fn pending(&self, id: &str) -> Result<Option<Pending>, StoreError> {
        if !valid_id(id) {
            return Ok(None);
        }
        if let Some(p) = read_json::<Pending>(&self.pending_path(id))? {
            return Ok(Some(p));
        }
        if let Some(r) = &self.redis {
            let raw: Option<Vec<u8>> = r
                .query(::redis::cmd("GET").arg(format!("{KEY_PENDING}{id}")))
                .await?;
            return Ok(raw.and_then(|b| serde_json::from_slice(&b).ok()));
        }
        Ok(None)
    }

    /// The decision on `id`, if any.
    pub async fn decision(&self, id: &str) -> Result<Option<Decision>, StoreError> {
        if !valid_id(id) {
            return Ok(None);
        }
        if let Some(d) = read_json::<Decision>(&self.decision_path(id))? {
            return Ok(Some(d));
        }
        if let Some(r) = &self.redis {
            let raw: Option<Vec<u8>> = r
                .query(::redis::cmd("GET").arg(format!("{KEY_DECISION}{id}")))
                .await?;
            return Ok(raw.and_then(|b| serde_json::from_slice(&b).ok()));
        }
        Ok(None)
    }

    /// The decisions taken on any of `ids` (the holder's poll: one `stat` per id, one MGET).
    pub async fn decisions_of(&self, ids: &[String]) -> Vec<Decision> {
        let mut found = Vec::new();
        let mut rest = Vec::new();
        for id in ids {
            match read_json::<Decision>(&self.decision_path(id)) {
                Ok(Some(d)) => found.push(d),
                _ => rest.push(id),
            }
        }
        if let (Some(r), false) = (&self.redis, rest.is_empty()) {
            let keys: Vec<String> = rest
                .iter()
                .map(|id| format!("{KEY_DECISION}{id}"))
                .collect();
            match r
                .query::<Vec<Option<Vec<u8>>>>(::redis::cmd("MGET").arg(&keys))
                .await
            {
                Ok(values) => found.extend(
                    values
                        .into_iter()
                        .flatten()
                        .filter_map(|b| serde_json::from_slice(&b).ok()),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read approval decisions from the shared state")
                }
            }
        }
        found
    }

    /// Record `d` unless somebody decided first; `Some(first)` when they did.
    pub async fn decide(&self, d: &Decision) -> Result<Option<Decision>, StoreError> {
        let bytes = to_json(d);
        if let Some(r) = &self.redis {
            let set: Option<String> = r
                .query(
                    ::redis::cmd("SET")
                        .arg(format!("{KEY_DECISION}{}", d.id))
                        .arg(&bytes)
                        .arg("NX")
                        .arg("EX")
                        .arg(KEEP_AFTER * 24),
                )
                .await?;
            if set.is_none() {
                return Ok(self.decision(&d.id).await?.or_else(|| Some(d.clone())));
            }
        }
        self.ensure_dir()?;
        let path = self.decision_path(&d.id);
        let written = fsutil::write_new(&path, &bytes, 0o600).map_err(io(&path))?;
        if !written && self.redis.is_none() {
            return Ok(read_json::<Decision>(&path)?.or_else(|| Some(d.clone())));
        }
        Ok(None)
    }

    /// Every pending approval known here or in Redis, with its decision if taken, oldest
    /// first.
    pub async fn list(&self) -> Result<Vec<(Pending, Option<Decision>)>, StoreError> {
        self.list_kind(None).await
    }

    /// [`Store::list`] of one kind only (told apart by the id's first letter, so the other
    /// kind's files are not even read).
    pub async fn list_kind(
        &self,
        kind: Option<Kind>,
    ) -> Result<Vec<(Pending, Option<Decision>)>, StoreError> {
        let prefix = kind.map_or("", |k| id_prefix(k));
        let mut all: std::collections::BTreeMap<String, Pending> = Default::default();
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    let name = e.file_name();
                    let Some(name) = name.to_str() else { continue };
                    let Some(id) = name.strip_suffix(".json") else {
                        continue;
                    };
                    if !valid_id(id) || id.starts_with("allow-") || !id.starts_with(prefix) {
                        continue;
                    }
                    if let Ok(Some(p)) = read_json::<Pending>(&e.path()) {
                        all.insert(p.id.clone(), p);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&self.dir)(e)),
        }
        if let Some(r) = &self.redis {
            for (_, raw) in r
                .scan_values::<Vec<u8>>(&format!("{KEY_PENDING}{prefix}*"))
                .await?
            {
                if let Ok(p) = serde_json::from_slice::<Pending>(&raw) {
                    if !valid_id(&p.id) {
                        continue;
                    }
                    all.entry(p.id.clone()).or_insert(p);
                }
            }
        }
        let mut out = Vec::with_capacity(all.len());
        for (_, p) in all {
            let d = self.decision(&p.id).await?;
            out.push((p, d));
        }
        out.sort_by_key(|(p, _)| p.created);
        Ok(out)
    }

    /// Remember that `a.route` is let through for `a.session` until `a.until`.
    pub async fn put_allowance(&self, a: &Allowance) -> Result<(), StoreError> {
        self.ensure_dir()?;
        let key = Self::allow_key(&a.session, &a.route);
        let path = self.dir.join(format!("allow-{key}.json"));
        fsutil::write_atomic(&path, &to_json(a), 0o600).map_err(io(&path))?;
        if let Some(r) = &self.redis {
            let ttl = a.until.saturating_sub(crate::auth::unix_now()).max(1);
            r.query::<()>(
                ::redis::cmd("SET")
                    .arg(format!("{KEY_ALLOW}{key}"))
                    .arg(to_json(a))
                    .arg("EX")
                    .arg(ttl),
            )
            .await?;
        }
        Ok(())
    }

    /// The live allowance of `route` for `session`, if one was granted (here or elsewhere).
    pub async fn allowance(&self, session: &str, route: &str) -> Option<Allowance> {
        let key = Self::allow_key(session, route);
        let now = crate::auth::unix_now();
        let live = |a: &Allowance| a.until > now && a.session == session && a.route == route;
        if let Ok(Some(a)) = read_json::<Allowance>(&self.dir.join(format!("allow-{key}.json"))) {
            if live(&a) {
                return Some(a);
            }
        }
        let r = self.redis.as_ref()?;
        let raw: Option<Vec<u8>> = r
            .query(::redis::cmd("GET").arg(format!("{KEY_ALLOW}{key}")))
            .await
            .ok()?;
        raw.and_then(|b| serde_json::from_slice::<Allowance>(&b).ok())
            .filter(live)
    }

    /// Claim the writing of `id`'s audit line for `step`: true for exactly one caller across
    /// every replica sharing this store (Redis when configured, else the directory).
    pub async fn claim(&self, id: &str, step: Step) -> bool {
        if let Some(r) = &self.redis {
            return matches!(
                r.query::<Option<String>>(
                    ::redis::cmd("SET")
                        .arg(format!("{KEY_CLAIM}{id}:{}", step.as_str()))
                        .arg(crate::auth::unix_now())
                        .arg("NX")
                        .arg("EX")
                        .arg(KEEP_AFTER * 24),
                )
                .await,
                Ok(Some(_))
            );
        }
        if self.ensure_dir().is_err() {
            return false;
        }
        let path = self.dir.join(format!("{id}.{}.audited", step.as_str()));
        fsutil::write_new(&path, b"", 0o600).unwrap_or(false)
    }

    /// Delete files of approvals decided or expired more than [`KEEP_AFTER`] ago, and
    /// allowances that ran out.
    pub fn sweep(&self) {
        let now = crate::auth::unix_now();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(rest) = name.strip_prefix("allow-") {
                if rest.ends_with(".json") {
                    if let Ok(Some(a)) = read_json::<Allowance>(&path) {
                        if a.until <= now {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                continue;
            }
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if id.contains('.') || !valid_id(id) {
                continue;
            }
            if let Ok(Some(p)) = read_json::<Pending>(&path) {
                if p.expires + KEEP_AFTER <= now {
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(self.decision_path(id));
                    for step in [
                        Step::Requested,
                        Step::Approved,
                        Step::Denied,
                        Step::TimedOut,
                    ] {
                        let _ = std::fs::remove_file(
                            self.dir.join(format!("{id}.{}.audited", step.as_str())),
                        );
                    }
                }
            }
        }
    }
}

/// The first letter of every id of this kind: `r` held requests, `g` session grants.
pub fn id_prefix(kind: Kind) -> &'static str {
    match kind {
        Kind::Request => "r",
        Kind::Session => "g",
    }
}

/// A fresh id for an approval of `kind`.
pub fn new_id(kind: Kind) -> String {
    format!("{}{}", id_prefix(kind), crate::auth::new_id())
}

/// Read a JSON file; `None` when it does not exist (or is being replaced) or does not parse.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match std::fs::read(path) {
        Ok(b) => Ok(serde_json::from_slice(&b).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}
