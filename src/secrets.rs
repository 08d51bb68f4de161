//! Secrets: the redacting [`Secret`] type and the backends that hold credential values.
//!
//! Two backends sit behind the [`SecretBackend`] trait: `file`, the encrypted-at-rest
//! [`SecretStore`] in the state dir, and `openbao`, a KV v2 engine in OpenBao or HashiCorp
//! Vault ([`OpenBao`]). The proxy and the CLI use them through [`Secrets`], which reads the
//! file store directly (at most one `stat` a millisecond) and OpenBao through a
//! [`SecretCache`], so the request path answers from memory and never waits on a remote secret
//! manager for longer than a short, bounded fetch.
//!
//! This module owns every credential value latchkey injects. It must never put a value into
//! an error, a log line, a span or an audit event: callers get values only through
//! [`Secret::expose`], and errors name the secret, never its contents.

mod cache;
mod openbao;
mod secret;
mod store;
pub mod typed;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use cache::SecretCache;
pub use openbao::{OpenBao, OpenBaoAuth, OpenBaoConfig, OpenBaoError};
pub use secret::Secret;
pub use store::{
    parse_master_key, validate_name, SecretMeta, SecretStore, StoreError, MASTER_KEY_ENV,
};

/// Why a backend could not answer. Never carries a secret value or a token.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The encrypted file store failed.
    #[error(transparent)]
    File(#[from] StoreError),
    /// OpenBao failed or refused.
    #[error(transparent)]
    OpenBao(#[from] OpenBaoError),
    /// A lookup on the request path took longer than its bound.
    #[error("the secret backend did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

impl BackendError {
    /// One phrase for the agent's `secret_unavailable` detail: what went wrong, without
    /// addresses, paths or backend internals (those go to the operator's log).
    pub fn agent_detail(&self) -> &'static str {
        match self {
            BackendError::File(_) => "the secret store cannot be read",
            BackendError::Timeout(_) => {
                "the secret manager did not answer in time and no fresh cached value is held"
            }
            BackendError::OpenBao(e) if e.is_unreachable() => {
                "the secret manager cannot be reached and no fresh cached value is held"
            }
            BackendError::OpenBao(OpenBaoError::Refused { status: 403, .. }) => {
                "the secret manager refused latchkey access to it"
            }
            BackendError::OpenBao(_) => "the secret manager's answer could not be used",
        }
    }
}

/// A place credential values live. The file store answers from local disk; OpenBao over the
/// network, so the proxy reads it through a [`SecretCache`].
pub trait SecretBackend: Send + Sync + 'static {
    /// The current value of `name`, or `None` when there is none.
    fn get(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Arc<Secret>>, BackendError>> + Send;
    /// Sets `name` to `value` (a new version where the backend keeps versions).
    fn set(
        &self,
        name: &str,
        value: Secret,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Removes `name`; `Ok(false)` when it did not exist.
    fn remove(&self, name: &str) -> impl Future<Output = Result<bool, BackendError>> + Send;
    /// Names and dates of every secret, sorted by name; never values.
    fn list(&self) -> impl Future<Output = Result<Vec<SecretMeta>, BackendError>> + Send;
    /// Whether `name` exists.
    fn contains(&self, name: &str) -> impl Future<Output = Result<bool, BackendError>> + Send;
    /// Where the secrets are, for messages (never a credential).
    fn describe(&self) -> String;
}

impl SecretBackend for SecretStore {
    // The file store is local and fast (a `stat`, and a decrypt only when the file changed),
    // so its futures are ready at once, exactly as the store answered before backends existed.
    fn get(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Arc<Secret>>, BackendError>> + Send {
        std::future::ready(SecretStore::get(self, name).map_err(Into::into))
    }
    fn set(
        &self,
        name: &str,
        value: Secret,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        std::future::ready(SecretStore::set(self, name, value).map_err(Into::into))
    }
    fn remove(&self, name: &str) -> impl Future<Output = Result<bool, BackendError>> + Send {
        std::future::ready(SecretStore::remove(self, name).map_err(Into::into))
    }
    fn list(&self) -> impl Future<Output = Result<Vec<SecretMeta>, BackendError>> + Send {
        std::future::ready(SecretStore::list(self).map_err(Into::into))
    }
    fn contains(&self, name: &str) -> impl Future<Output = Result<bool, BackendError>> + Send {
        std::future::ready(SecretStore::contains(self, name).map_err(Into::into))
    }
    fn describe(&self) -> String {
        SecretStore::describe(self)
    }
}

impl SecretBackend for OpenBao {
    async fn get(&self, name: &str) -> Result<Option<Arc<Secret>>, BackendError> {
        Ok(self.read(name).await?.map(Arc::new))
    }
    async fn set(&self, name: &str, value: Secret) -> Result<(), BackendError> {
        Ok(self.write(name, &value).await?)
    }
    async fn remove(&self, name: &str) -> Result<bool, BackendError> {
        Ok(self.delete(name).await?)
    }
    async fn list(&self) -> Result<Vec<SecretMeta>, BackendError> {
        Ok(OpenBao::list(self).await?)
    }
    async fn contains(&self, name: &str) -> Result<bool, BackendError> {
        Ok(OpenBao::contains(self, name).await?)
    }
    fn describe(&self) -> String {
        OpenBao::describe(self)
    }
}

/// Which backend to open, validated (flags and environment already read).
#[derive(Debug)]
pub enum BackendConfig {
    /// The encrypted store in the state dir.
    File,
    /// OpenBao / Vault behind a TTL cache.
    OpenBao {
        /// Address, mount, prefix and credentials.
        config: OpenBaoConfig,
        /// How long a value is served from memory before it must be re-read.
        cache_ttl: Duration,
        /// Bound on the one fetch a request may wait for when its value is not cached fresh.
        request_fetch_timeout: Duration,
    },
}

impl BackendConfig {
    /// Open the backend. OpenBao is not contacted here: a down OpenBao is reported by the
    /// first lookup, so the proxy starts and serves routes that need no credential.
    pub fn open(self, state_dir: &std::path::Path) -> Result<Secrets, BackendError> {
        Ok(match self {
            BackendConfig::File => Secrets::File(Box::new(SecretStore::open(state_dir)?)),
            BackendConfig::OpenBao {
                config,
                cache_ttl,
                request_fetch_timeout,
            } => Secrets::OpenBao(Arc::new(SecretCache::new(
                OpenBao::try_new(config)?,
                cache_ttl,
                request_fetch_timeout,
            ))),
        })
    }
}

/// The configured backend, as the proxy and the CLI use it.
pub enum Secrets {
    /// The encrypted store in the state dir, read directly.
    File(Box<SecretStore>),
    /// OpenBao / Vault, read through the TTL cache.
    OpenBao(Arc<SecretCache<OpenBao>>),
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Secrets {
    /// The value to inject for `name`. From OpenBao this answers from the cache while the
    /// entry is younger than the TTL; otherwise it waits for one bounded fetch.
    pub async fn get(&self, name: &str) -> Result<Option<Arc<Secret>>, Arc<BackendError>> {
        match self {
            Secrets::File(store) => {
                SecretStore::get(store, name).map_err(|e| Arc::new(BackendError::File(e)))
            }
            Secrets::OpenBao(cache) => cache.get(name).await,
        }
    }

    /// The value of `name` as the backend holds it now: the file store re-reads a changed
    /// file (looking at once, where `get` looks at most once a millisecond), OpenBao is asked
    /// directly, past the cache (bounded by its own timeout), and the cache is dropped so the
    /// next `get` sees the same. For the rare reads that must see another replica's write (a
    /// refreshed OAuth token).
    pub async fn get_fresh(&self, name: &str) -> Result<Option<Arc<Secret>>, BackendError> {
        match self {
            Secrets::File(store) => store.get_fresh(name).map_err(BackendError::File),
            Secrets::OpenBao(cache) => {
                let value = SecretBackend::get(cache.backend(), name).await?;
                cache.invalidate(name).await;
                Ok(value)
            }
        }
    }

    /// Sets `name` to `value` in the backend (and drops this process's cached copy).
    pub async fn set(&self, name: &str, value: Secret) -> Result<(), BackendError> {
        match self {
            Secrets::File(store) => SecretBackend::set(&**store, name, value).await,
            Secrets::OpenBao(cache) => {
                SecretBackend::set(cache.backend(), name, value).await?;
                cache.invalidate(name).await;
                Ok(())
            }
        }
    }

    /// Removes `name`; `Ok(false)` when it did not exist.
    pub async fn remove(&self, name: &str) -> Result<bool, BackendError> {
        match self {
            Secrets::File(store) => SecretBackend::remove(&**store, name).await,
            Secrets::OpenBao(cache) => {
                let existed = SecretBackend::remove(cache.backend(), name).await?;
                cache.invalidate(name).await;
                Ok(existed)
            }
        }
    }

    /// Names and dates, sorted by name; never values. Always asks the backend.
    pub async fn list(&self) -> Result<Vec<SecretMeta>, BackendError> {
        match self {
            Secrets::File(store) => SecretBackend::list(&**store).await,
            Secrets::OpenBao(cache) => SecretBackend::list(cache.backend()).await,
        }
    }

    /// Whether `name` exists. Always asks the backend.
    pub async fn contains(&self, name: &str) -> Result<bool, BackendError> {
        match self {
            Secrets::File(store) => SecretBackend::contains(&**store, name).await,
            Secrets::OpenBao(cache) => SecretBackend::contains(cache.backend(), name).await,
        }
    }

    /// Where the secrets are, for messages.
    pub fn describe(&self) -> String {
        match self {
            Secrets::File(store) => store.describe(),
            Secrets::OpenBao(cache) => cache.backend().describe(),
        }
    }

    /// For the file store, a counter that moves whenever its contents change (the file is
    /// re-read first if its stamp changed: one `stat` otherwise); `None` for OpenBao, whose
    /// changes cannot be noticed this cheaply.
    pub fn file_generation(&self) -> Option<u64> {
        match self {
            Secrets::File(store) => {
                if let Err(e) = SecretStore::list(store) {
                    tracing::warn!(error = %e, "cannot read the secret store");
                }
                Some(store.generation())
            }
            Secrets::OpenBao(_) => None,
        }
    }

    /// Start keeping cached OpenBao values fresh in the background (a no-op for the file
    /// store). The task ends when the last handle to the cache is dropped.
    pub fn start_refresh(&self) {
        if let Secrets::OpenBao(cache) = self {
            cache.spawn_refresher();
        }
    }
}
