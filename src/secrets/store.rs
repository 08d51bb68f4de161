//! The encrypted secret store: `<state_dir>/secrets.enc`, sealed with XChaCha20-Poly1305
//! under a 32-byte master key.
//!
//! File layout: the magic `LKSEC1\n`, a 24-byte random nonce (fresh on every write), then the
//! AEAD ciphertext (AAD = the magic) of a small binary encoding, all integers big-endian:
//!
//! ```text
//! repeated: [u16 name_len][name][i64 created_unix_ms][i64 updated_unix_ms][u32 value_len][value]
//! ```
//!
//! The encoding is binary rather than JSON so a value never passes through an intermediate
//! `String`: it is decoded straight from a zeroized plaintext buffer into a [`Secret`].
//!
//! Writers serialise on an exclusive lock of `<state_dir>/secrets.lock`, re-read the current
//! file under the lock, and replace the file atomically (temp file, fsync, rename, fsync dir;
//! the file helpers and stamps are `crate::fsutil`'s), so several processes (`latchkey secret
//! set` while `latchkey serve` runs) never lose an update. Readers notice a changed file from
//! one `stat` (at most one per [`CHECK_INTERVAL`], 1 ms, however many lookups) and reload it.
//!
//! This module must never put a secret value into an error, a log line or a `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use chrono::{DateTime, Utc};
use rand::RngCore;
use zeroize::Zeroizing;

use super::Secret;
use crate::fsutil::{self, FileStamp};

/// First bytes of every store file; also the AEAD associated data, so a file whose header was
/// swapped for another format version fails authentication.
const MAGIC: &[u8] = b"LKSEC1\n";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const STORE_FILE: &str = "secrets.enc";
const LOCK_FILE: &str = "secrets.lock";
const KEY_FILE: &str = "master.key";
/// Environment variable that supplies the master key instead of `<state_dir>/master.key`.
pub const MASTER_KEY_ENV: &str = "LATCHKEY_MASTER_KEY";
const MAX_NAME_LEN: usize = 128;
/// How long [`SecretStore::get`] trusts its last look at the file. Under load this turns a
/// `stat` per request (about 5 % of a proxied request's CPU) into one per millisecond; a
/// value written by another process is used from at most this long after the write.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// Why the secret store could not be used. No variant ever carries a secret value.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Authentication of the ciphertext failed: the key is not the one the file was written
    /// with, or the file was altered.
    #[error(
        "the secret store could not be decrypted: wrong master key or corrupted file {}",
        path.display()
    )]
    WrongKeyOrCorrupted {
        /// The store file.
        path: PathBuf,
    },
    /// The master key from the environment or the key file is not 32 bytes in a known form.
    #[error("the master key from {origin} is not 64 hex characters or base64 of 32 bytes")]
    BadMasterKey {
        /// Where the key came from: the environment variable name or the key file path.
        origin: String,
    },
    /// A filesystem operation failed.
    #[error("could not access {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A secret name outside `[A-Za-z0-9_.-]{1,128}`.
    #[error("invalid secret name {name:?}: use 1 to 128 characters from A-Z a-z 0-9 _ . -")]
    InvalidName {
        /// The rejected name (names are not secret).
        name: String,
    },
    /// An empty value was given to `set`.
    #[error("the value for secret {name:?} is empty")]
    EmptyValue {
        /// The secret's name.
        name: String,
    },
    /// A value too large for the file format (4 GiB).
    #[error("the value for secret {name:?} is too large to store")]
    ValueTooLarge {
        /// The secret's name.
        name: String,
    },
    /// The file does not start with the store's magic bytes.
    #[error("{} is not a latchkey secret store (unknown header)", path.display())]
    BadMagic {
        /// The store file.
        path: PathBuf,
    },
    /// The file is truncated or its decrypted contents are not a valid record list.
    #[error("the secret store {} is malformed: {reason}", path.display())]
    Format {
        /// The store file.
        path: PathBuf,
        /// What is wrong, in a few words.
        reason: &'static str,
    },
}

/// Metadata about a stored secret; never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMeta {
    /// The secret's name.
    pub name: String,
    /// When the secret was first set.
    pub created: DateTime<Utc>,
    /// When the secret was last set.
    pub updated: DateTime<Utc>,
}

/// Validate a secret name: `[A-Za-z0-9_.-]{1,128}`.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            name: name.chars().take(MAX_NAME_LEN + 8).collect(),
        })
    }
}

/// Parse a master key given as 64 hex characters or as base64 (standard alphabet) of 32
/// bytes; surrounding whitespace is ignored. `origin` names the source for the error.
pub fn parse_master_key(text: &str, origin: &str) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let text = text.trim();
    let bad = || StoreError::BadMasterKey {
        origin: origin.to_owned(),
    };
    let mut key = Zeroizing::new([0u8; 32]);
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode_to_slice(text, &mut key[..]).map_err(|_| bad())?;
        return Ok(key);
    }
    // SECURITY: decode into a zeroized buffer; a wrong-length key is rejected, not padded.
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| bad())?,
    );
    if decoded.len() != 32 {
        return Err(bad());
    }
    key.copy_from_slice(&decoded);
    Ok(key)
}

struct Entry {
    created_ms: i64,
    updated_ms: i64,
    value: Arc<Secret>,
}

type Entries = BTreeMap<String, Entry>;

/// The last contents read from disk and the stamp of the file they came from (`None` when the
/// file did not exist).
struct Loaded {
    stamp: Option<FileStamp>,
    entries: Entries,
}

/// The encrypted secret store. `Send + Sync`; the proxy shares one behind an `Arc`.
pub struct SecretStore {
    dir: PathBuf,
    path: PathBuf,
    lock_path: PathBuf,
    key: Zeroizing<[u8; 32]>,
    loaded: RwLock<Loaded>,
    generation: AtomicU64,
    /// When `get` last compared the file's stamp, in nanoseconds after `opened`.
    checked_ns: AtomicU64,
    opened: Instant,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SECURITY: neither the key nor any value; the number of loaded secrets is harmless.
        let count = self
            .loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len();
        f.debug_struct("SecretStore")
            .field("path", &self.path)
            .field("key", &"[redacted]")
            .field("loaded_secrets", &count)
            .field("generation", &self.generation())
            .finish()
    }
}

impl SecretStore {
    /// Opens the store in `state_dir` (the store file need not exist). The master key comes
    /// from the environment variable `LATCHKEY_MASTER_KEY` (64 hex chars or base64 of 32
    /// bytes; anything else is [`StoreError::BadMasterKey`]), else from
    /// `<state_dir>/master.key`, which is created on first use (32 random bytes, hex, mode
    /// 0600; `state_dir` created 0700 if missing).
    pub fn open(state_dir: &Path) -> Result<SecretStore, StoreError> {
        let key = match std::env::var(MASTER_KEY_ENV) {
            Ok(text) => parse_master_key(&text, MASTER_KEY_ENV)?,
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(StoreError::BadMasterKey {
                    origin: MASTER_KEY_ENV.to_owned(),
                })
            }
            Err(std::env::VarError::NotPresent) => load_or_create_key_file(state_dir)?,
        };
        SecretStore::open_with_key(state_dir, *key)
    }

    /// Opens the store with an explicit key (tests and benches; no environment read).
    /// Creates `state_dir` (0700) if missing.
    pub fn open_with_key(state_dir: &Path, key: [u8; 32]) -> Result<SecretStore, StoreError> {
        let key = Zeroizing::new(key);
        ensure_private_dir(state_dir)?;
        Ok(SecretStore {
            dir: state_dir.to_path_buf(),
            path: state_dir.join(STORE_FILE),
            lock_path: state_dir.join(LOCK_FILE),
            key,
            loaded: RwLock::new(Loaded {
                stamp: None,
                entries: BTreeMap::new(),
            }),
            generation: AtomicU64::new(0),
            checked_ns: AtomicU64::new(0),
            opened: Instant::now(),
        })
    }

    /// `the encrypted store <path>`, for messages.
    pub fn describe(&self) -> String {
        format!("the encrypted store {}", self.path.display())
    }

    /// The current value of `name`, or `None`. Re-reads the file when it changed since the
    /// last read (one `stat`, at most every [`CHECK_INTERVAL`]), so a secret set by another
    /// process is used without a restart, from at most `CHECK_INTERVAL` after the write on.
    pub fn get(&self, name: &str) -> Result<Option<Arc<Secret>>, StoreError> {
        let now = self.since_opened_ns();
        let last = self.checked_ns.load(Ordering::Relaxed);
        // `last == 0`: never looked (or the first look failed), so look now.
        if last == 0 || now.saturating_sub(last) >= CHECK_INTERVAL.as_nanos() as u64 {
            return self.look(now, name);
        }
        Ok(self.loaded_value(name))
    }

    /// Like [`SecretStore::get`], but always compares the file's stamp first (for a caller
    /// that must see another process's write of a moment ago, e.g. an OAuth refresh that
    /// just took the replicas' lock).
    pub fn get_fresh(&self, name: &str) -> Result<Option<Arc<Secret>>, StoreError> {
        self.look(self.since_opened_ns(), name)
    }

    /// Compare the file's stamp (reloading a changed file), note that it was looked at `now`,
    /// and answer from what is loaded.
    fn look(&self, now: u64, name: &str) -> Result<Option<Arc<Secret>>, StoreError> {
        self.refresh()?;
        self.checked_ns.store(now.max(1), Ordering::Relaxed);
        Ok(self.loaded_value(name))
    }

    fn since_opened_ns(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn loaded_value(&self, name: &str) -> Option<Arc<Secret>> {
        let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        loaded.entries.get(name).map(|e| Arc::clone(&e.value))
    }

    /// Monotonic counter bumped whenever the loaded contents change, so callers can cache
    /// values derived from secrets (prebuilt header values) and rebuild them only then.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Sets `name` to `value`, keeping the creation time of an existing secret.
    pub fn set(&self, name: &str, value: Secret) -> Result<(), StoreError> {
        validate_name(name)?;
        if value.is_empty() {
            return Err(StoreError::EmptyValue {
                name: name.to_owned(),
            });
        }
        if u32::try_from(value.len()).is_err() {
            return Err(StoreError::ValueTooLarge {
                name: name.to_owned(),
            });
        }
        let value = Arc::new(value);
        self.modify(|entries| {
            let now = Utc::now().timestamp_millis();
            let created_ms = entries.get(name).map_or(now, |e| e.created_ms);
            entries.insert(
                name.to_owned(),
                Entry {
                    created_ms,
                    updated_ms: now,
                    value,
                },
            );
            true
        })
        .map(|_| ())
    }

    /// Removes `name`; `Ok(false)` when it did not exist.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        validate_name(name)?;
        self.modify(|entries| entries.remove(name).is_some())
    }

    /// Names and timestamps of all secrets, sorted by name; never values.
    pub fn list(&self) -> Result<Vec<SecretMeta>, StoreError> {
        self.refresh()?;
        let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        Ok(loaded
            .entries
            .iter()
            .map(|(name, e)| SecretMeta {
                name: name.clone(),
                created: ms_to_datetime(e.created_ms),
                updated: ms_to_datetime(e.updated_ms),
            })
            .collect())
    }

    /// Whether a secret called `name` exists.
    pub fn contains(&self, name: &str) -> Result<bool, StoreError> {
        self.refresh()?;
        let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        Ok(loaded.entries.contains_key(name))
    }

    /// Reloads from disk if the file's stamp differs from the loaded one.
    fn refresh(&self) -> Result<(), StoreError> {
        let current = FileStamp::try_of(&self.path).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })?;
        {
            let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
            // The common case: nothing changed, one stat and a read lock.
            if loaded.stamp == current {
                return Ok(());
            }
        }
        let (entries, stamp) = self.read_file()?;
        self.install(entries, stamp);
        Ok(())
    }

    /// Replaces the loaded contents, bumping the generation if they differ.
    fn install(&self, entries: Entries, stamp: Option<FileStamp>) {
        let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        let changed = !same_entries(&loaded.entries, &entries);
        loaded.entries = entries;
        loaded.stamp = stamp;
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Reads and decrypts the file; a missing file is an empty store.
    fn read_file(&self) -> Result<(Entries, Option<FileStamp>), StoreError> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((BTreeMap::new(), None)),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let io_err = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        // The stamp comes from the handle we read, so it always matches the bytes we decode.
        let stamp = FileStamp::of_file(&file).map_err(io_err)?;
        let mut raw = Vec::with_capacity(usize::try_from(stamp.size()).unwrap_or(0));
        file.read_to_end(&mut raw).map_err(io_err)?;
        let entries = self.decrypt(&raw)?;
        Ok((entries, Some(stamp)))
    }

    fn decrypt(&self, raw: &[u8]) -> Result<Entries, StoreError> {
        if raw.len() < MAGIC.len() || &raw[..MAGIC.len()] != MAGIC {
            if raw.is_empty() || MAGIC.starts_with(raw) {
                return Err(self.format_error("the file is truncated"));
            }
            return Err(StoreError::BadMagic {
                path: self.path.clone(),
            });
        }
        let rest = &raw[MAGIC.len()..];
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(self.format_error("the file is truncated"));
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        // SECURITY: the plaintext lives only in this zeroized buffer; its capacity is fixed up
        // front so decrypting in place never reallocates and leaves a copy behind.
        let mut buf = Zeroizing::new(Vec::with_capacity(ciphertext.len()));
        buf.extend_from_slice(ciphertext);
        self.cipher()
            .decrypt_in_place(XNonce::from_slice(nonce), MAGIC, &mut *buf)
            .map_err(|_| StoreError::WrongKeyOrCorrupted {
                path: self.path.clone(),
            })?;
        decode(&buf).map_err(|reason| self.format_error(reason))
    }

    fn format_error(&self, reason: &'static str) -> StoreError {
        StoreError::Format {
            path: self.path.clone(),
            reason,
        }
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.key[..]))
    }

    /// Runs `f` on the current on-disk contents under the store's exclusive file lock, and
    /// writes the result back when `f` reports a change.
    fn modify(&self, f: impl FnOnce(&mut Entries) -> bool) -> Result<bool, StoreError> {
        ensure_private_dir(&self.dir)?;
        // Blocks until other writers (threads or processes) are done; released when `lock`
        // is dropped at the end of this function.
        let lock = fsutil::lock_file(&self.lock_path).map_err(|source| StoreError::Io {
            path: self.lock_path.clone(),
            source,
        })?;
        // Re-read under the lock: the cached copy may be older than another writer's update.
        let (mut entries, stamp) = self.read_file()?;
        let changed = f(&mut entries);
        let stamp = if changed {
            Some(self.write_file(&entries)?)
        } else {
            stamp
        };
        self.install(entries, stamp);
        drop(lock);
        Ok(changed)
    }

    /// Encrypts `entries` and atomically replaces the store file; returns the new stamp.
    fn write_file(&self, entries: &Entries) -> Result<FileStamp, StoreError> {
        let mut buf = encode(entries);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.cipher()
            .encrypt_in_place(XNonce::from_slice(&nonce), MAGIC, &mut *buf)
            .map_err(|_| self.format_error("encryption failed"))?;
        // `buf` now holds ciphertext; it is still zeroized on drop, which costs nothing.
        let mut file = Vec::with_capacity(MAGIC.len() + NONCE_LEN + buf.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&nonce);
        file.extend_from_slice(&buf);
        // SECURITY: 0600 from creation (see fsutil), so no other user can ever open the file.
        // The stamp is the temp file's, taken before the rename: if another process replaces
        // the store right after, the next `refresh` sees a different stamp and reloads.
        fsutil::write_atomic_stamped(&self.path, &file, 0o600).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

fn ms_to_datetime(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn same_entries(a: &Entries, b: &Entries) -> bool {
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((na, ea), (nb, eb))| {
            na == nb
                && ea.created_ms == eb.created_ms
                && ea.updated_ms == eb.updated_ms
                && ea.value.expose() == eb.value.expose()
        })
}

/// Serialises the records into a zeroized buffer sized exactly (plus room for the AEAD tag),
/// so it never reallocates and leaves plaintext in freed memory.
fn encode(entries: &Entries) -> Zeroizing<Vec<u8>> {
    let len: usize = entries
        .iter()
        .map(|(name, e)| 2 + name.len() + 8 + 8 + 4 + e.value.len())
        .sum();
    let mut buf = Zeroizing::new(Vec::with_capacity(len + TAG_LEN));
    for (name, e) in entries {
        // Both lengths were checked on the way in (validate_name, ValueTooLarge) and on decode.
        let name_len = u16::try_from(name.len()).expect("names are at most 128 bytes");
        let value_len = u32::try_from(e.value.len()).expect("values are checked to fit u32");
        buf.extend_from_slice(&name_len.to_be_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&e.created_ms.to_be_bytes());
        buf.extend_from_slice(&e.updated_ms.to_be_bytes());
        buf.extend_from_slice(&value_len.to_be_bytes());
        buf.extend_from_slice(e.value.expose());
    }
    buf
}

/// Parses records from decrypted plaintext; the error is a short reason, never content.
fn decode(mut buf: &[u8]) -> Result<Entries, &'static str> {
    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
        if buf.len() < n {
            return Err("a record is truncated");
        }
        let (head, tail) = buf.split_at(n);
        *buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(buf: &mut &[u8]) -> Result<[u8; N], &'static str> {
        let mut out = [0u8; N];
        out.copy_from_slice(take(buf, N)?);
        Ok(out)
    }
    let mut entries = BTreeMap::new();
    while !buf.is_empty() {
        let name_len = usize::from(u16::from_be_bytes(array(&mut buf)?));
        let name = std::str::from_utf8(take(&mut buf, name_len)?)
            .map_err(|_| "a secret name is not UTF-8")?;
        validate_name(name).map_err(|_| "a secret name is invalid")?;
        let created_ms = i64::from_be_bytes(array(&mut buf)?);
        let updated_ms = i64::from_be_bytes(array(&mut buf)?);
        let value_len = usize::try_from(u32::from_be_bytes(array(&mut buf)?))
            .map_err(|_| "a value is too large")?;
        let value = Secret::new(take(&mut buf, value_len)?.to_vec());
        let entry = Entry {
            created_ms,
            updated_ms,
            value: Arc::new(value),
        };
        if entries.insert(name.to_owned(), entry).is_some() {
            return Err("a secret name appears twice");
        }
    }
    Ok(entries)
}

/// Creates `dir` with mode 0700 if it does not exist (existing directories are left alone).
fn ensure_private_dir(dir: &Path) -> Result<(), StoreError> {
    fsutil::ensure_private_dir(dir).map_err(|source| StoreError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Reads `<state_dir>/master.key`, creating it (32 random bytes, hex, 0600) when missing.
fn load_or_create_key_file(state_dir: &Path) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let path = state_dir.join(KEY_FILE);
    let origin = path.display().to_string();
    match fs::read(&path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            if let Ok(meta) = fs::metadata(&path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "master key file is readable by other users; chmod 600 it");
                }
            }
            let text = std::str::from_utf8(&bytes).map_err(|_| StoreError::BadMasterKey {
                origin: origin.clone(),
            })?;
            return parse_master_key(text, &origin);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(StoreError::Io { path, source }),
    }
    ensure_private_dir(state_dir)?;
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut key[..]);
    let text = Zeroizing::new(hex::encode(&key[..]));

    // Created without overwriting: if another process won the race, we use its key. The key
    // file is never seen half-written.
    let mut contents = Zeroizing::new(Vec::with_capacity(text.len() + 1));
    contents.extend_from_slice(text.as_bytes());
    contents.push(b'\n');
    let created = fsutil::write_new(&path, &contents, 0o600).map_err(|source| StoreError::Io {
        path: path.clone(),
        source,
    })?;
    if created {
        return Ok(key);
    }
    let bytes = Zeroizing::new(fs::read(&path).map_err(|source| StoreError::Io {
        path: path.clone(),
        source,
    })?);
    let text = std::str::from_utf8(&bytes).map_err(|_| StoreError::BadMasterKey {
        origin: origin.clone(),
    })?;
    parse_master_key(text, &origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];
    const VALUE: &str = "s3cr3t-value-that-must-not-leak";

    fn store(dir: &Path) -> SecretStore {
        SecretStore::open_with_key(dir, KEY).unwrap()
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec())
    }

    fn file_of(dir: &Path) -> PathBuf {
        dir.join(STORE_FILE)
    }

    #[test]
    fn set_then_get_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(s.get("gh").unwrap().is_none());
        s.set("gh", secret(VALUE)).unwrap();
        s.set("other.key-1", secret("x")).unwrap();
        assert_eq!(s.get("gh").unwrap().unwrap().expose(), VALUE.as_bytes());

        let fresh = store(dir.path());
        assert_eq!(fresh.get("gh").unwrap().unwrap().expose(), VALUE.as_bytes());
        assert!(fresh.contains("other.key-1").unwrap());
        assert!(!fresh.contains("missing").unwrap());
        let names: Vec<_> = fresh.list().unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["gh", "other.key-1"]);
    }

    #[test]
    fn the_file_does_not_contain_the_value_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path()).set("gh", secret(VALUE)).unwrap();
        let raw = fs::read(file_of(dir.path())).unwrap();
        assert!(raw.starts_with(MAGIC));
        assert!(!raw.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()));
        assert!(!raw.windows(2).any(|w| w == b"gh"));
    }

    #[test]
    fn each_write_uses_a_fresh_nonce() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.set("a", secret("1")).unwrap();
        let first = fs::read(file_of(dir.path())).unwrap();
        s.set("a", secret("1")).unwrap();
        let second = fs::read(file_of(dir.path())).unwrap();
        let nonce = MAGIC.len()..MAGIC.len() + NONCE_LEN;
        assert_ne!(first[nonce.clone()], second[nonce]);
    }

    #[test]
    fn set_keeps_created_and_moves_updated() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.set("a", secret("1")).unwrap();
        let before = s.list().unwrap().remove(0);
        std::thread::sleep(std::time::Duration::from_millis(5));
        s.set("a", secret("2")).unwrap();
        let after = s.list().unwrap().remove(0);
        assert_eq!(before.created, after.created);
        assert!(after.updated > before.updated);
    }

    #[test]
    fn remove_reports_whether_the_secret_existed() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.set("a", secret("1")).unwrap();
        assert!(s.remove("a").unwrap());
        assert!(!s.remove("a").unwrap());
        assert!(s.get("a").unwrap().is_none());
        assert!(store(dir.path()).get("a").unwrap().is_none());
    }

    #[test]
    fn wrong_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path()).set("gh", secret(VALUE)).unwrap();
        let other = SecretStore::open_with_key(dir.path(), [8u8; 32]).unwrap();
        let err = other.get("gh").unwrap_err();
        assert!(
            matches!(err, StoreError::WrongKeyOrCorrupted { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("wrong master key or corrupted file"), "{msg}");
        assert!(msg.contains(STORE_FILE), "{msg}");
        assert!(!msg.contains(VALUE));
    }

    fn corrupt_and_get(edit: impl FnOnce(&mut Vec<u8>)) -> StoreError {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path()).set("gh", secret(VALUE)).unwrap();
        let path = file_of(dir.path());
        let mut raw = fs::read(&path).unwrap();
        edit(&mut raw);
        fs::write(&path, &raw).unwrap();
        let err = store(dir.path()).get("gh").unwrap_err();
        assert!(!format!("{err} {err:?}").contains(VALUE));
        err
    }

    #[test]
    fn truncated_file_is_an_error() {
        for keep in [
            3,
            MAGIC.len(),
            MAGIC.len() + 10,
            MAGIC.len() + NONCE_LEN + 5,
        ] {
            let err = corrupt_and_get(|raw| raw.truncate(keep));
            assert!(
                matches!(err, StoreError::Format { .. }),
                "keep {keep}: {err:?}"
            );
        }
        let err = corrupt_and_get(|raw| {
            raw.pop();
        });
        assert!(
            matches!(err, StoreError::WrongKeyOrCorrupted { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_flipped_byte_anywhere_after_the_magic_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path()).set("gh", secret(VALUE)).unwrap();
        let path = file_of(dir.path());
        let good = fs::read(&path).unwrap();
        for i in MAGIC.len()..good.len() {
            let mut raw = good.clone();
            raw[i] ^= 0x01;
            fs::write(&path, &raw).unwrap();
            let err = store(dir.path()).get("gh").unwrap_err();
            assert!(
                matches!(err, StoreError::WrongKeyOrCorrupted { .. }),
                "byte {i}: {err:?}"
            );
        }
    }

    #[test]
    fn bad_magic_is_an_error() {
        let err = corrupt_and_get(|raw| raw[0] = b'X');
        assert!(matches!(err, StoreError::BadMagic { .. }), "{err:?}");
        assert!(err.to_string().contains("not a latchkey secret store"));
    }

    #[test]
    fn empty_file_is_an_error() {
        let err = corrupt_and_get(|raw| raw.clear());
        assert!(matches!(err, StoreError::Format { .. }), "{err:?}");
    }

    #[test]
    fn malformed_plaintext_is_a_format_error_not_a_panic() {
        let truncated_record = {
            let mut v = Vec::new();
            v.extend_from_slice(&2u16.to_be_bytes());
            v.extend_from_slice(b"gh");
            v.extend_from_slice(&[0u8; 10]);
            v
        };
        let bad_name = {
            let mut v = Vec::new();
            v.extend_from_slice(&3u16.to_be_bytes());
            v.extend_from_slice(b"a b");
            v.extend_from_slice(&[0u8; 16]);
            v.extend_from_slice(&0u32.to_be_bytes());
            v
        };
        let huge_len = {
            let mut v = Vec::new();
            v.extend_from_slice(&1u16.to_be_bytes());
            v.extend_from_slice(b"a");
            v.extend_from_slice(&[0u8; 16]);
            v.extend_from_slice(&u32::MAX.to_be_bytes());
            v
        };
        let duplicate = {
            let mut one = Vec::new();
            one.extend_from_slice(&1u16.to_be_bytes());
            one.extend_from_slice(b"a");
            one.extend_from_slice(&[0u8; 16]);
            one.extend_from_slice(&1u32.to_be_bytes());
            one.push(b'x');
            [one.clone(), one].concat()
        };
        for plain in [truncated_record, bad_name, huge_len, duplicate, vec![0u8]] {
            assert!(decode(&plain).is_err());
        }
    }

    #[test]
    fn store_file_lock_file_and_master_key_are_0600_and_dir_0700() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        let key = load_or_create_key_file(&dir).unwrap();
        let s = SecretStore::open_with_key(&dir, *key).unwrap();
        s.set("a", secret("1")).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(STORE_FILE)), 0o600);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn master_key_file_is_reused_once_created() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_key_file(dir.path()).unwrap();
        let second = load_or_create_key_file(dir.path()).unwrap();
        assert_eq!(*first, *second);
        let text = fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(text.trim().len(), 64);
    }

    #[test]
    fn a_garbage_master_key_file_is_bad_master_key() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), "not a key").unwrap();
        let err = load_or_create_key_file(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::BadMasterKey { .. }), "{err:?}");
        assert!(err.to_string().contains(KEY_FILE));
    }

    #[test]
    fn master_key_parses_hex_and_base64_only() {
        let hex_key = "00".repeat(31) + "ff";
        let parsed = parse_master_key(&hex_key, MASTER_KEY_ENV).unwrap();
        assert_eq!(parsed[31], 0xff);
        let upper = parse_master_key(&format!("  {}\n", "AB".repeat(32)), "x").unwrap();
        assert_eq!(*upper, [0xab; 32]);
        let b64 = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        assert_eq!(*parse_master_key(&b64, "x").unwrap(), [9u8; 32]);

        let short_b64 = base64::engine::general_purpose::STANDARD.encode([9u8; 16]);
        for bad in [
            "",
            "abc",
            &"0".repeat(63),
            &"0".repeat(65),
            &"zz".repeat(32),
            &short_b64,
            "!!!!",
        ] {
            let err = parse_master_key(bad, MASTER_KEY_ENV).unwrap_err();
            assert!(matches!(err, StoreError::BadMasterKey { .. }), "{bad:?}");
            assert!(err.to_string().contains(MASTER_KEY_ENV));
        }
    }

    #[test]
    fn names_are_validated() {
        for good in ["a", "GITHUB_TOKEN", "x.y-z_1", &"a".repeat(128)] {
            validate_name(good).unwrap();
        }
        for bad in ["", "a b", "a/b", "ä", "a\n", &"a".repeat(129)] {
            assert!(matches!(
                validate_name(bad),
                Err(StoreError::InvalidName { .. })
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(matches!(
            s.set("bad name", secret("v")),
            Err(StoreError::InvalidName { .. })
        ));
        assert!(matches!(
            s.set("ok", Secret::new(Vec::new())),
            Err(StoreError::EmptyValue { .. })
        ));
    }

    #[test]
    fn a_value_set_by_another_instance_is_seen_once_the_check_interval_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let reader = store(dir.path());
        let writer = store(dir.path());
        let settle = || std::thread::sleep(CHECK_INTERVAL * 2);
        assert!(reader.get("gh").unwrap().is_none());
        let g0 = reader.generation();

        writer.set("gh", secret("one")).unwrap();
        settle();
        assert_eq!(reader.get("gh").unwrap().unwrap().expose(), b"one");
        let g1 = reader.generation();
        assert!(g1 > g0);

        // Same length as before, so only inode/mtime tell the versions apart.
        writer.set("gh", secret("two")).unwrap();
        settle();
        assert_eq!(reader.get("gh").unwrap().unwrap().expose(), b"two");
        let g2 = reader.generation();
        assert!(g2 > g1);

        // Unchanged file: no reload, no bump.
        settle();
        reader.get("gh").unwrap();
        assert_eq!(reader.generation(), g2);

        writer.remove("gh").unwrap();
        settle();
        assert!(reader.get("gh").unwrap().is_none());
        assert!(reader.generation() > g2);
    }

    #[test]
    fn a_write_through_the_same_instance_is_seen_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(s.get("gh").unwrap().is_none());
        s.set("gh", secret("one")).unwrap();
        assert_eq!(s.get("gh").unwrap().unwrap().expose(), b"one");
        s.remove("gh").unwrap();
        assert!(s.get("gh").unwrap().is_none());
    }

    #[test]
    fn debug_output_never_contains_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.set("gh", secret(VALUE)).unwrap();
        let value = s.get("gh").unwrap().unwrap();
        assert!(!format!("{value:?}").contains(VALUE));
        assert!(!format!("{s:?}").contains(VALUE));
        assert!(!format!("{s:#?}").contains(VALUE));
        assert!(!format!("{:?}", s.list().unwrap()).contains(VALUE));
        assert!(!format!("{s:?}").contains(&hex::encode(KEY)));
    }

    #[test]
    fn concurrent_sets_from_two_instances_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let stores = [Arc::new(store(dir.path())), Arc::new(store(dir.path()))];
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let s = Arc::clone(&stores[t % 2]);
                std::thread::spawn(move || {
                    for i in 0..5 {
                        s.set(&format!("t{t}-{i}"), secret(&format!("v{t}-{i}")))
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for s in stores.iter().chain([&Arc::new(store(dir.path()))]) {
            assert_eq!(s.list().unwrap().len(), 40);
            for t in 0..8 {
                for i in 0..5 {
                    let v = s.get(&format!("t{t}-{i}")).unwrap().unwrap();
                    assert_eq!(v.expose(), format!("v{t}-{i}").as_bytes());
                }
            }
        }
    }

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SecretStore>();
    }
}
