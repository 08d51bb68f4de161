//! Agent tokens: latchkey's own Ed25519 signing key, issuing JWTs, verifying them, and the
//! revocation list (`revocation`, with its Redis sync). The algorithm is pinned to EdDSA and
//! never read from the token.
//!
//! SECURITY: the token is the agent's only credential. It is never logged, never forwarded
//! upstream, and never part of an error message.

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

pub mod revocation;
pub mod sessions;

pub use revocation::sync::{
    load_revocations, publish_revocation, resync_revocations, sync_revocations,
};
pub use revocation::{Revocations, Revoked};

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
            return Err(Deny::TokenInvalid(stage, "the token is too long"));
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
            return Err(Deny::TokenInvalid(stage, "the token is too long"));
        }
        use jsonwebtoken::errors::ErrorKind;
        // The kid only selects among our own keys; the algorithm stays pinned.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Deny::TokenInvalid(stage, "malformed token"))?;
        let ring = self.ring.load();
        let key = ring.find(header.kid.as_deref()).ok_or(Deny::TokenInvalid(
            stage,
            "signed by a key this latchkey does not know",
        ))?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => Deny::TokenExpired(stage),
                    ErrorKind::InvalidSignature => Deny::TokenInvalid(stage, "bad signature"),
                    ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                        Deny::TokenInvalid(stage, "wrong algorithm")
                    }
                    ErrorKind::InvalidIssuer => Deny::TokenInvalid(stage, "wrong issuer"),
                    ErrorKind::InvalidAudience => Deny::TokenInvalid(stage, "wrong audience"),
                    ErrorKind::ImmatureSignature => {
                        Deny::TokenInvalid(stage, "not valid yet (nbf)")
                    }
                    ErrorKind::MissingRequiredClaim(_) => {
                        Deny::TokenInvalid(stage, "a required claim is missing")
                    }
                    ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => {
                        Deny::TokenInvalid(stage, "a claim has the wrong format")
                    }
                    _ => Deny::TokenInvalid(stage, "malformed token"),
                }
            })?;
        let mut claims = data.claims;
        claims.kid = header.kid;
        if claims.jti.is_empty() || claims.sub.is_empty() {
            return Err(Deny::TokenInvalid(stage, "a required claim is missing"));
        }
        // SECURITY: jsonwebtoken does not check `iat`; a token "issued" in the future was not
        // minted by this clock and is refused.
        if claims.iat > unix_now() + LEEWAY_SECS {
            return Err(Deny::TokenInvalid(stage, "issued in the future (iat)"));
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
    let value = value.ok_or(Deny::TokenMissing(AuthStage::Proxy))?;
    let text = value
        .to_str()
        .map_err(|_| {
            Deny::TokenInvalid(
                AuthStage::Proxy,
                "the Proxy-Authorization header is not ASCII",
            )
        })?
        .trim();
    if text.is_empty() {
        return Err(Deny::TokenMissing(AuthStage::Proxy));
    }
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err(Deny::TokenMissing(AuthStage::Proxy));
        }
        return Ok(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        if rest.len() > MAX_TOKEN_LEN * 2 {
            return Err(Deny::TokenInvalid(
                AuthStage::Proxy,
                "the token is too long",
            ));
        }
        let decoded = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| {
                    Deny::TokenInvalid(AuthStage::Proxy, "the Basic credentials are not base64")
                })?,
        );
        let text = std::str::from_utf8(&decoded).map_err(|_| {
            Deny::TokenInvalid(AuthStage::Proxy, "the Basic credentials are not UTF-8")
        })?;
        let (_user, password) = text.split_once(':').ok_or(Deny::TokenInvalid(
            AuthStage::Proxy,
            "the Basic credentials have no password",
        ))?;
        if password.is_empty() {
            return Err(Deny::TokenMissing(AuthStage::Proxy));
        }
        return Ok(password.to_owned());
    }
    Err(Deny::TokenInvalid(
        AuthStage::Proxy,
        "unsupported Proxy-Authorization scheme",
    ))
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Fresh signing keys in a temp dir (kept alive by the returned guard).
    pub(crate) fn keys() -> (tempfile::TempDir, TokenKeys) {
        let dir = tempfile::tempdir().unwrap();
        let k = TokenKeys::load_or_create(dir.path()).unwrap();
        (dir, k)
    }

    /// A one-minute token for `agent`, on behalf of alice, task triage.
    pub(crate) fn spec(agent: &str) -> TokenSpec {
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
        let mode = std::fs::metadata(d.path().join(SIGNING_KEY_FILE))
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
}
