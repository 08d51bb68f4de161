//! Agent tokens: latchkey's own Ed25519 signing key, issuing JWTs, verifying them, and the
//! revocation list. The algorithm is pinned to EdDSA and never read from the token.
//!
//! SECURITY: the token is the agent's only credential. It is never logged, never forwarded
//! upstream, and never part of an error message.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use http::HeaderValue;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::deny::{AuthStage, Deny};
use crate::fsutil;

/// Issuer claim of every latchkey token.
pub const ISSUER: &str = "latchkey";
/// Audience claim of every latchkey token.
pub const AUDIENCE: &str = "latchkey-proxy";
/// Tokens longer than this are refused before any parsing (a cheap DoS guard).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds (the contract says at most one).
pub const LEEWAY_SECS: u64 = 1;

#[cfg(test)]
const SIGNING_KEY_FILE: &str = "signing.key";
const REVOCATIONS_FILE: &str = "revocations.json";

/// The claims of an agent token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Always `latchkey`.
    pub iss: String,
    /// Always `latchkey-proxy`.
    pub aud: String,
    /// The agent name.
    pub sub: String,
    /// Session id.
    pub jti: String,
    /// Issued at (unix seconds).
    pub iat: u64,
    /// Expiry (unix seconds).
    pub exp: u64,
    /// Not before (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// The user on whose behalf the agent acts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obo: Option<String>,
    /// Free text describing the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Narrowing to a subset of the agent's route ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<String>>,
    /// The id of the key that signed the token (from its header, not its payload); set by
    /// `verify` so that retiring a key also ends tunnels opened with its tokens.
    #[serde(skip)]
    pub kid: Option<String>,
}

impl Claims {
    /// Whether `exp` has passed at `now` (unix seconds), with the contract's leeway.
    pub fn is_expired_at(&self, now: u64) -> bool {
        now > self.exp.saturating_add(LEEWAY_SECS)
    }
}

/// What to put in a new token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// Agent name (`sub`).
    pub agent: String,
    /// Lifetime.
    pub ttl: Duration,
    /// Delegating user.
    pub on_behalf_of: Option<String>,
    /// Task text.
    pub task: Option<String>,
    /// Route narrowing; empty means every route of the agent.
    pub routes: Vec<String>,
}

/// Errors loading keys or issuing tokens (CLI side). Verification failures are `Deny`s.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Reading or writing a key file failed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key file exists but cannot be used.
    #[error("the token key file {0} is not a valid Ed25519 PEM key")]
    BadKey(PathBuf),
    /// Generating a key failed.
    #[error("cannot generate a token signing key: {0}")]
    KeyGeneration(String),
    /// Signing failed.
    #[error("cannot sign the token: {0}")]
    Signing(String),
    /// The revocation list cannot be parsed.
    #[error("the revocation list {0} is corrupted")]
    BadRevocations(PathBuf),
}

/// latchkey's token keys: the current signing key (for `token issue`; absent on a replica
/// that only verifies) and the ring of public keys tokens are verified with, by `kid`.
pub struct TokenKeys {
    signing: Option<crate::keys::SigningKey>,
    ring: ArcSwap<crate::keys::KeyRing>,
    ring_source: PathBuf,
    ring_stamp: std::sync::Mutex<Option<fsutil::FileStamp>>,
    validation: Validation,
    /// Tokens whose signature and claims were already checked, keyed by their SHA-256, so a
    /// client opening many tunnels pays the Ed25519 verification once. Expiry and revocation
    /// are still checked on every use by the caller.
    verified: dashmap::DashMap<[u8; 32], Arc<Claims>>,
}

/// Entries kept in the verified-token cache before it is pruned.
const VERIFIED_CACHE_MAX: usize = 16 * 1024;

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys { [redacted] }")
    }
}

impl From<crate::keys::KeyError> for AuthError {
    fn from(e: crate::keys::KeyError) -> AuthError {
        match e {
            crate::keys::KeyError::Io { path, source } => AuthError::Io { path, source },
            crate::keys::KeyError::Bad { path, .. } => AuthError::BadKey(path),
            crate::keys::KeyError::Generate(why) => AuthError::KeyGeneration(why),
        }
    }
}

impl TokenKeys {
    /// Load the signing key and the key ring from the state dir, creating the key pair
    /// (private key 0600) on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<TokenKeys, AuthError> {
        let signing = crate::keys::load_or_create_signing(state_dir)?;
        let mut keys = TokenKeys::verify_only(&state_dir.join(crate::keys::JWKS_FILE))?;
        keys.signing = Some(signing);
        Ok(keys)
    }

    /// Verify-only keys from a JWKS or PEM public-key file (a replica that never issues).
    pub fn verify_only(source: &Path) -> Result<TokenKeys, AuthError> {
        // Stamp before load: a change in between is then reloaded, not missed.
        let stamp = fsutil::FileStamp::of(source);
        let ring = crate::keys::KeyRing::load(source)?;
        Ok(TokenKeys {
            signing: None,
            ring: ArcSwap::from_pointee(ring),
            ring_source: source.to_path_buf(),
            ring_stamp: std::sync::Mutex::new(stamp),
            validation: pinned_validation(),
            verified: dashmap::DashMap::new(),
        })
    }

    /// Whether the key that signed these claims is still accepted. Checked on every request
    /// in a tunnel: a retired (e.g. compromised) key ends the tunnels its tokens opened.
    pub fn still_trusted(&self, claims: &Claims) -> bool {
        self.ring.load().find(claims.kid.as_deref()).is_some()
    }

    /// Re-read the key ring if its file changed (a `keys rotate` while serving). A broken file
    /// keeps the last good ring.
    pub fn reload_if_changed(&self) -> Result<bool, AuthError> {
        let stamp = fsutil::FileStamp::of(&self.ring_source);
        let mut last = self.ring_stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == stamp {
            return Ok(false);
        }
        *last = stamp;
        let ring = crate::keys::KeyRing::load(&self.ring_source)?;
        self.ring.store(Arc::new(ring));
        // A retired key must not live on through tokens verified with it earlier.
        self.verified.clear();
        Ok(true)
    }

    /// Issue a token. Returns the JWT and its claims.
    pub fn issue(&self, spec: &TokenSpec) -> Result<(String, Claims), AuthError> {
        let signing = self
            .signing
            .as_ref()
            .ok_or_else(|| AuthError::Signing("no private key loaded".into()))?;
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: spec.agent.clone(),
            jti: new_id(),
            iat: now,
            exp: now + spec.ttl.as_secs().max(1),
            nbf: Some(now),
            obo: spec.on_behalf_of.clone(),
            task: spec.task.clone(),
            routes: if spec.routes.is_empty() {
                None
            } else {
                Some(spec.routes.clone())
            },
            kid: Some(signing.kid.clone()),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(signing.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &signing.encoding)
            .map_err(|e| AuthError::Signing(e.to_string()))?;
        Ok((token, claims))
    }

    /// Verify signature and claims, from the cache when this exact token was verified before.
    /// `stage` decides 407 vs 403 for expiry.
    pub fn verify(&self, token: &str, stage: AuthStage) -> Result<Arc<Claims>, Deny> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Deny::TokenInvalid("the token is too long"));
        }
        use sha2::Digest;
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(claims) = self.verified.get(&key) {
            if claims.is_expired_at(unix_now()) {
                drop(claims);
                self.verified.remove(&key);
                return Err(Deny::TokenExpired(stage));
            }
            return Ok(claims.clone());
        }
        let claims = Arc::new(self.verify_uncached(token, stage)?);
        if self.verified.len() >= VERIFIED_CACHE_MAX {
            let now = unix_now();
            self.verified.retain(|_, c| !c.is_expired_at(now));
            if self.verified.len() >= VERIFIED_CACHE_MAX {
                self.verified.clear();
            }
        }
        self.verified.insert(key, claims.clone());
        Ok(claims)
    }

    /// Verify signature and claims without the cache.
    pub fn verify_uncached(&self, token: &str, stage: AuthStage) -> Result<Claims, Deny> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Deny::TokenInvalid("the token is too long"));
        }
        use jsonwebtoken::errors::ErrorKind;
        // The kid only selects among our own keys; the algorithm stays pinned.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Deny::TokenInvalid("malformed token"))?;
        let ring = self.ring.load();
        let key = ring.find(header.kid.as_deref()).ok_or(Deny::TokenInvalid(
            "signed by a key this latchkey does not know",
        ))?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => Deny::TokenExpired(stage),
                    ErrorKind::InvalidSignature => Deny::TokenInvalid("bad signature"),
                    ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                        Deny::TokenInvalid("wrong algorithm")
                    }
                    ErrorKind::InvalidIssuer => Deny::TokenInvalid("wrong issuer"),
                    ErrorKind::InvalidAudience => Deny::TokenInvalid("wrong audience"),
                    ErrorKind::ImmatureSignature => Deny::TokenInvalid("not valid yet (nbf)"),
                    ErrorKind::MissingRequiredClaim(_) => {
                        Deny::TokenInvalid("a required claim is missing")
                    }
                    ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => {
                        Deny::TokenInvalid("a claim has the wrong format")
                    }
                    _ => Deny::TokenInvalid("malformed token"),
                }
            })?;
        let mut claims = data.claims;
        claims.kid = header.kid;
        if claims.jti.is_empty() || claims.sub.is_empty() {
            return Err(Deny::TokenInvalid("a required claim is missing"));
        }
        // SECURITY: jsonwebtoken does not check `iat`; a token "issued" in the future was not
        // minted by this clock and is refused.
        if claims.iat > unix_now() + LEEWAY_SECS {
            return Err(Deny::TokenInvalid("issued in the future (iat)"));
        }
        Ok(claims)
    }
}

impl TokenKeys {
    /// The claims of a token whose signature is ours but which has expired, for attributing
    /// the refusal in the audit log. Never grants anything.
    pub fn claims_of_expired(&self, token: &str) -> Option<Claims> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let mut v = self.validation.clone();
        v.validate_exp = false;
        let header = jsonwebtoken::decode_header(token).ok()?;
        let ring = self.ring.load();
        let key = ring.find(header.kid.as_deref())?;
        jsonwebtoken::decode::<Claims>(token, key, &v)
            .ok()
            .map(|d| d.claims)
    }
}

fn pinned_validation() -> Validation {
    // SECURITY: the algorithm list is fixed to EdDSA, so `alg: none`, HS256-with-public-key and
    // any other algorithm confusion fails before the signature is even looked at.
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[AUDIENCE]);
    v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub", "jti"]);
    v.leeway = LEEWAY_SECS;
    v.validate_exp = true;
    v.validate_nbf = true;
    v
}

/// Extract the token from a `Proxy-Authorization` header: `Basic base64(user:token)` (any user
/// name) or `Bearer token`.
pub fn token_from_header(value: Option<&HeaderValue>) -> Result<String, Deny> {
    let value = value.ok_or(Deny::TokenMissing)?;
    let text = value
        .to_str()
        .map_err(|_| Deny::TokenInvalid("the Proxy-Authorization header is not ASCII"))?
        .trim();
    if text.is_empty() {
        return Err(Deny::TokenMissing);
    }
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err(Deny::TokenMissing);
        }
        return Ok(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        if rest.len() > MAX_TOKEN_LEN * 2 {
            return Err(Deny::TokenInvalid("the token is too long"));
        }
        let decoded = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| Deny::TokenInvalid("the Basic credentials are not base64"))?,
        );
        let text = std::str::from_utf8(&decoded)
            .map_err(|_| Deny::TokenInvalid("the Basic credentials are not UTF-8"))?;
        let (_user, password) = text
            .split_once(':')
            .ok_or(Deny::TokenInvalid("the Basic credentials have no password"))?;
        if password.is_empty() {
            return Err(Deny::TokenMissing);
        }
        return Ok(password.to_owned());
    }
    Err(Deny::TokenInvalid("unsupported Proxy-Authorization scheme"))
}

/// Seconds since the unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random 128-bit id, hex (session ids and request ids).
pub fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

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

    fn keys() -> (tempfile::TempDir, TokenKeys) {
        let dir = tempfile::tempdir().unwrap();
        let k = TokenKeys::load_or_create(dir.path()).unwrap();
        (dir, k)
    }

    fn spec(agent: &str) -> TokenSpec {
        TokenSpec {
            agent: agent.into(),
            ttl: Duration::from_secs(60),
            on_behalf_of: Some("alice".into()),
            task: Some("triage".into()),
            routes: vec![],
        }
    }

    #[test]
    fn issued_token_verifies_and_carries_claims() {
        let (_d, k) = keys();
        let (tok, claims) = k.issue(&spec("bot")).unwrap();
        let got = k.verify(&tok, AuthStage::Proxy).unwrap();
        assert_eq!(*got, claims);
        // The second verification comes from the cache and is the same.
        let again = k.verify(&tok, AuthStage::Proxy).unwrap();
        assert!(Arc::ptr_eq(&got, &again));
        assert_eq!(got.obo.as_deref(), Some("alice"));
    }

    #[test]
    fn private_key_is_created_0600() {
        use std::os::unix::fs::PermissionsExt;
        let (d, _k) = keys();
        let mode = fs::metadata(d.path().join(SIGNING_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn token_from_another_latchkey_is_invalid() {
        let (_d1, k1) = keys();
        let (_d2, k2) = keys();
        let (tok, _) = k1.issue(&spec("bot")).unwrap();
        assert_eq!(
            k2.verify(&tok, AuthStage::Proxy).unwrap_err().code(),
            "token_invalid"
        );
    }

    #[test]
    fn alg_none_is_invalid() {
        let (_d, k) = keys();
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let now = unix_now();
        let body = format!(
            r#"{{"iss":"latchkey","aud":"latchkey-proxy","sub":"bot","jti":"x","iat":{now},"exp":{}}}"#,
            now + 60
        );
        let tok = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&body));
        assert_eq!(
            k.verify(&tok, AuthStage::Proxy).unwrap_err().code(),
            "token_invalid"
        );
    }

    #[test]
    fn expired_token_is_expired_not_invalid() {
        let (_d, k) = keys();
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: "bot".into(),
            jti: "j".into(),
            iat: now - 100,
            exp: now - 10,
            nbf: None,
            obo: None,
            task: None,
            routes: None,
            kid: None,
        };
        let tok = jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &k.signing.as_ref().unwrap().encoding,
        )
        .unwrap();
        assert_eq!(k.verify(&tok, AuthStage::Tunnel).unwrap_err().status(), 403);
        assert_eq!(
            k.verify(&tok, AuthStage::Proxy).unwrap_err().code(),
            "token_expired"
        );
    }

    #[test]
    fn proxy_authorization_forms() {
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("agent:tok.en.x")
        );
        assert_eq!(
            token_from_header(Some(&HeaderValue::from_str(&basic).unwrap())).unwrap(),
            "tok.en.x"
        );
        assert_eq!(
            token_from_header(Some(&HeaderValue::from_static("Bearer abc"))).unwrap(),
            "abc"
        );
        assert_eq!(token_from_header(None).unwrap_err().code(), "token_missing");
        assert_eq!(
            token_from_header(Some(&HeaderValue::from_static("Digest x")))
                .unwrap_err()
                .code(),
            "token_invalid"
        );
        assert_eq!(
            token_from_header(Some(&HeaderValue::from_static("Basic !!!")))
                .unwrap_err()
                .code(),
            "token_invalid"
        );
    }

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
