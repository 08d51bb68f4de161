//! Token keys: the current Ed25519 signing key (private, used only by `token issue`/`run`) and
//! the key ring of public keys a token may be verified with, each named by a `kid`.
//!
//! Files in the state dir: `signing.key` (PKCS#8 PEM, 0600) and `signing.pub` (the current
//! pair), and `jwks.json`, the public keys still accepted (current first). `keys rotate` makes
//! a new current pair and keeps the previous public keys in `jwks.json`, so tokens signed
//! before the rotation stay valid until they expire. Replicas that must not issue tokens get
//! only a JWKS or PEM public-key file (`serve --verify-keys FILE`).
//!
//! SECURITY: only Ed25519 (`OKP`/`Ed25519`) keys are accepted from a key file; the algorithm
//! is never taken from a token or a key file.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine;
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::fsutil;

const SIGNING_KEY_FILE: &str = "signing.key";
const SIGNING_PUB_FILE: &str = "signing.pub";
/// The accepted public keys, in the state dir.
pub const JWKS_FILE: &str = "jwks.json";
/// How many public keys `keys rotate` keeps by default (current included).
pub const DEFAULT_KEEP: usize = 5;

/// Errors loading, creating or rotating keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file cannot be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key file holds no usable Ed25519 key.
    #[error("{path} holds no usable Ed25519 key: {why}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Key generation failed.
    #[error("cannot generate a signing key: {0}")]
    Generate(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One public key in JWKS form (RFC 8037 `OKP` / `Ed25519`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwk {
    /// Key type: `OKP`.
    pub kty: String,
    /// Curve: `Ed25519`.
    pub crv: String,
    /// The raw public key, base64url without padding.
    pub x: String,
    /// Key id.
    pub kid: String,
    /// Always `EdDSA`.
    #[serde(default)]
    pub alg: Option<String>,
    /// Always `sig`.
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
}

/// A JWKS document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys, current first.
    pub keys: Vec<Jwk>,
}

impl Jwk {
    fn from_raw(raw: &[u8]) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw),
            kid: kid_of(raw),
            alg: Some("EdDSA".into()),
            use_: Some("sig".into()),
        }
    }
}

/// The key id of a raw Ed25519 public key: the first 16 hex digits of its SHA-256.
pub fn kid_of(raw_public: &[u8]) -> String {
    hex::encode(&sha2::Sha256::digest(raw_public)[..8])
}

/// Public keys tokens may be verified with, by kid.
pub struct KeyRing {
    keys: Vec<(String, DecodingKey)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        write!(f, "KeyRing({kids:?})")
    }
}

impl KeyRing {
    /// The key for `kid`; without a kid, the only key of a one-key ring.
    pub fn find(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        match kid {
            Some(kid) => self.keys.iter().find(|(k, _)| k == kid).map(|(_, d)| d),
            None if self.keys.len() == 1 => Some(&self.keys[0].1),
            None => None,
        }
    }

    /// The key ids, current first.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// Load a ring from a JWKS file or a PEM public-key file.
    pub fn load(path: &Path) -> Result<KeyRing, KeyError> {
        let bytes = fs::read(path).map_err(io(path))?;
        let bad = |why: &str| KeyError::Bad {
            path: path.to_path_buf(),
            why: why.to_owned(),
        };
        if bytes.starts_with(b"-----BEGIN") {
            let raw = raw_from_spki_pem(&bytes).ok_or_else(|| bad("not an Ed25519 public key"))?;
            return Ok(KeyRing {
                keys: vec![(kid_of(&raw), decoding_from_raw(&raw)?)],
            });
        }
        let jwks: Jwks = serde_json::from_slice(&bytes)
            .map_err(|e| bad(&format!("not a PEM key nor a JWKS document ({e})")))?;
        let mut keys = Vec::new();
        for jwk in &jwks.keys {
            // SECURITY: the key type is pinned; anything else in the set is refused, not skipped,
            // so a tampered file is noticed.
            if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
                return Err(bad(&format!("key {} is not OKP/Ed25519", jwk.kid)));
            }
            if jwk.alg.as_deref().is_some_and(|a| a != "EdDSA") {
                return Err(bad(&format!("key {} is not for EdDSA", jwk.kid)));
            }
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&jwk.x)
                .ok()
                .filter(|r| r.len() == 32)
                .ok_or_else(|| bad(&format!("key {} has an invalid x", jwk.kid)))?;
            keys.push((jwk.kid.clone(), decoding_from_raw(&raw)?));
        }
        if keys.is_empty() {
            return Err(bad("the key set is empty"));
        }
        Ok(KeyRing { keys })
    }
}

fn decoding_from_raw(raw: &[u8]) -> Result<DecodingKey, KeyError> {
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    DecodingKey::from_ed_components(&x).map_err(|e| KeyError::Bad {
        path: PathBuf::new(),
        why: e.to_string(),
    })
}

/// The raw 32-byte key of an Ed25519 SPKI PEM (the SPKI is a fixed 12-byte prefix + key).
fn raw_from_spki_pem(pem: &[u8]) -> Option<Vec<u8>> {
    const ED25519_SPKI_PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let spki = crate::tls::pem::public_key(pem).ok()?;
    let der = spki.as_ref();
    (der.len() == 44 && der[..12] == ED25519_SPKI_PREFIX).then(|| der[12..].to_vec())
}

/// The current signing key and its kid.
pub struct SigningKey {
    /// For `jsonwebtoken::encode`.
    pub encoding: EncodingKey,
    /// Goes into every token's header.
    pub kid: String,
}

/// Load the current signing key, creating the pair and `jwks.json` on first use.
pub fn load_or_create_signing(state_dir: &Path) -> Result<SigningKey, KeyError> {
    let key_path = state_dir.join(SIGNING_KEY_FILE);
    if !key_path.exists() {
        fsutil::ensure_private_dir(state_dir).map_err(io(state_dir))?;
        let jwks = read_jwks(state_dir)?.unwrap_or_default();
        write_new_pair(state_dir, jwks, DEFAULT_KEEP)?;
    }
    let pub_path = state_dir.join(SIGNING_PUB_FILE);
    let private = zeroize::Zeroizing::new(fs::read(&key_path).map_err(io(&key_path))?);
    let encoding = EncodingKey::from_ed_pem(&private).map_err(|e| KeyError::Bad {
        path: key_path.clone(),
        why: e.to_string(),
    })?;
    let public = fs::read(&pub_path).map_err(io(&pub_path))?;
    let raw = raw_from_spki_pem(&public).ok_or_else(|| KeyError::Bad {
        path: pub_path.clone(),
        why: "not an Ed25519 public key".into(),
    })?;
    // A state dir from before key rings: make sure the current key is in jwks.json.
    let mut jwks = read_jwks(state_dir)?.unwrap_or_default();
    let kid = kid_of(&raw);
    if !jwks.keys.iter().any(|k| k.kid == kid) {
        jwks.keys.insert(0, Jwk::from_raw(&raw));
        write_jwks(state_dir, &jwks)?;
    }
    Ok(SigningKey { encoding, kid })
}

/// Make a new current key; keep at most `keep` public keys (the new one included).
/// Returns the new kid.
pub fn rotate(state_dir: &Path, keep: usize) -> Result<String, KeyError> {
    load_or_create_signing(state_dir)?;
    let jwks = read_jwks(state_dir)?.unwrap_or_default();
    write_new_pair(state_dir, jwks, keep.max(1))
}

fn write_new_pair(state_dir: &Path, mut jwks: Jwks, keep: usize) -> Result<String, KeyError> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    let raw = pair.public_key_raw().to_vec();
    let jwk = Jwk::from_raw(&raw);
    let kid = jwk.kid.clone();
    jwks.keys.retain(|k| k.kid != kid);
    jwks.keys.insert(0, jwk);
    jwks.keys.truncate(keep);
    // Order matters for crash safety: the new public key is accepted before any token can be
    // signed with the new private key.
    write_jwks(state_dir, &jwks)?;
    let pub_path = state_dir.join(SIGNING_PUB_FILE);
    fsutil::write_atomic(&pub_path, pair.public_key_pem().as_bytes(), 0o644)
        .map_err(io(&pub_path))?;
    let key_path = state_dir.join(SIGNING_KEY_FILE);
    let private = zeroize::Zeroizing::new(pair.serialize_pem());
    fsutil::write_atomic(&key_path, private.as_bytes(), 0o600).map_err(io(&key_path))?;
    Ok(kid)
}

/// The accepted public keys of this state dir, if the file exists.
pub fn read_jwks(state_dir: &Path) -> Result<Option<Jwks>, KeyError> {
    let path = state_dir.join(JWKS_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| KeyError::Bad {
                path,
                why: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

fn write_jwks(state_dir: &Path, jwks: &Jwks) -> Result<(), KeyError> {
    let path = state_dir.join(JWKS_FILE);
    let mut bytes = serde_json::to_vec_pretty(jwks).expect("a JWKS serialises");
    bytes.push(b'\n');
    fsutil::write_atomic(&path, &bytes, 0o644).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_use_creates_a_pair_and_a_one_key_ring() {
        let d = tempfile::tempdir().unwrap();
        let k = load_or_create_signing(d.path()).unwrap();
        let ring = KeyRing::load(&d.path().join(JWKS_FILE)).unwrap();
        assert_eq!(ring.kids(), vec![k.kid.as_str()]);
        // The PEM public key gives the same kid.
        let pem_ring = KeyRing::load(&d.path().join(SIGNING_PUB_FILE)).unwrap();
        assert_eq!(pem_ring.kids(), vec![k.kid.as_str()]);
    }

    #[test]
    fn rotate_keeps_previous_keys_up_to_keep() {
        let d = tempfile::tempdir().unwrap();
        let first = load_or_create_signing(d.path()).unwrap().kid;
        let second = rotate(d.path(), 2).unwrap();
        let third = rotate(d.path(), 2).unwrap();
        let ring = KeyRing::load(&d.path().join(JWKS_FILE)).unwrap();
        assert_eq!(ring.kids(), vec![third.as_str(), second.as_str()]);
        assert!(ring.find(Some(&first)).is_none());
        assert_eq!(load_or_create_signing(d.path()).unwrap().kid, third);
    }

    #[test]
    fn key_files_with_other_key_types_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("jwks.json");
        fs::write(&p, r#"{"keys":[{"kty":"RSA","crv":"","x":"","kid":"a"}]}"#).unwrap();
        assert!(KeyRing::load(&p)
            .unwrap_err()
            .to_string()
            .contains("not OKP/Ed25519"));
        fs::write(&p, r#"{"keys":[]}"#).unwrap();
        assert!(KeyRing::load(&p).is_err());
        fs::write(&p, "garbage").unwrap();
        assert!(KeyRing::load(&p).is_err());
        let missing = KeyRing::load(&d.path().join("missing")).unwrap_err();
        assert!(missing.to_string().contains("cannot access"), "{missing}");
    }
}
