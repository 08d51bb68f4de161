//! The in-memory cache in front of a remote secret backend (OpenBao).
//!
//! Why it exists: the request path must not wait on a secret manager. An entry is fresh for
//! the TTL after it was fetched; a background task refetches every cached name every TTL/2,
//! so a credential in use is always answered from memory, and a value rotated in OpenBao
//! reaches every replica within the TTL. When OpenBao is down the refresh fails, the entry
//! ages, and once it is older than the TTL the lookup fetches again, fails within
//! `fetch_timeout`, and the proxy answers 503 `secret_unavailable`: stale values are never
//! served past the TTL (a rotated-out credential stops being used), and nothing hangs.
//!
//! Concurrent misses on one name share a single fetch (and its error), so an outage costs
//! one bounded wait per name, not one per request. Absent names are cached too (`None`), so
//! a route whose credential is missing does not send every request to OpenBao.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{BackendError, Secret, SecretBackend};

/// Most names held; far more than any policy set refers to.
const MAX_ENTRIES: u64 = 100_000;
/// The refresher never runs more often than this, whatever the TTL.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// Values from `B`, each fresh for the TTL after its fetch.
pub struct SecretCache<B> {
    backend: Arc<B>,
    ttl: Duration,
    fetch_timeout: Duration,
    entries: moka::future::Cache<String, Option<Arc<Secret>>>,
    /// Whether the last fetch succeeded: the warn line fires once per outage, not per request.
    reachable: AtomicBool,
}

impl<B: SecretBackend> SecretCache<B> {
    /// A cache over `backend`: entries live `ttl` after each successful fetch; a lookup that
    /// has to fetch waits at most `fetch_timeout`.
    pub fn new(backend: B, ttl: Duration, fetch_timeout: Duration) -> SecretCache<B> {
        SecretCache {
            backend: Arc::new(backend),
            ttl,
            fetch_timeout,
            entries: moka::future::Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_live(ttl)
                .build(),
            reachable: AtomicBool::new(true),
        }
    }

    /// The backend behind the cache (writes and listings go straight to it).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// How long a fetched value is served.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The value of `name`: from memory while fresh, else one shared, bounded fetch. An error
    /// means the backend failed and no fresh value is held.
    pub async fn get(&self, name: &str) -> Result<Option<Arc<Secret>>, Arc<BackendError>> {
        if let Some(hit) = self.entries.get(name).await {
            return Ok(hit);
        }
        // Boxed: a fetch from the backend is kilobytes of state that every request's future
        // would otherwise carry, cache hit or not.
        Box::pin(self.entries.try_get_with_by_ref(name, self.fetch(name))).await
    }

    /// Forget `name` (after this process changed it in the backend).
    pub async fn invalidate(&self, name: &str) {
        self.entries.invalidate(name).await;
    }

    /// Refetch every cached name once, concurrently; a failure leaves the entry to age out.
    pub async fn refresh(&self) {
        let names: Vec<Arc<String>> = self.entries.iter().map(|(k, _)| k).collect();
        let fetches = names.iter().map(|name| async move {
            if let Ok(value) = self.fetch(name).await {
                self.entries.insert(String::clone(name), value).await;
            }
        });
        futures_util::future::join_all(fetches).await;
    }

    /// Refresh every TTL/2 in a background task until the cache is dropped.
    pub fn spawn_refresher(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let every = (self.ttl / 2).max(MIN_REFRESH_INTERVAL);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                cache.refresh().await;
            }
        });
    }

    async fn fetch(&self, name: &str) -> Result<Option<Arc<Secret>>, BackendError> {
        let result = match tokio::time::timeout(self.fetch_timeout, self.backend.get(name)).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout(self.fetch_timeout)),
        };
        match &result {
            Ok(_) => {
                if !self.reachable.swap(true, Ordering::AcqRel) {
                    tracing::info!(backend = %self.backend.describe(), "secret backend answers again");
                }
            }
            Err(e) => {
                if self.reachable.swap(false, Ordering::AcqRel) {
                    tracing::warn!(
                        backend = %self.backend.describe(),
                        credential = name,
                        error = %e,
                        ttl = %humantime::format_duration(self.ttl),
                        "secret backend unavailable; cached values are served until they are older than the TTL"
                    );
                } else {
                    tracing::debug!(credential = name, error = %e, "secret backend still unavailable");
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::secrets::{OpenBaoError, SecretMeta};

    /// A backend whose values, availability and latency the test controls.
    #[derive(Default)]
    struct Fake {
        values: Mutex<HashMap<String, &'static str>>,
        down: AtomicBool,
        hang: AtomicBool,
        fetches: AtomicUsize,
    }

    impl Fake {
        fn put(&self, name: &str, value: &'static str) {
            self.values.lock().unwrap().insert(name.into(), value);
        }
    }

    impl SecretBackend for Fake {
        async fn get(&self, name: &str) -> Result<Option<Arc<Secret>>, BackendError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            // Let concurrent callers pile up on the same fetch.
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(OpenBaoError::Unreachable {
                    addr: "http://fake".into(),
                    reason: "connection refused".into(),
                }
                .into());
            }
            Ok(self
                .values
                .lock()
                .unwrap()
                .get(name)
                .map(|v| Arc::new(Secret::new(v.as_bytes().to_vec()))))
        }
        fn set(&self, _: &str, _: Secret) -> impl Future<Output = Result<(), BackendError>> + Send {
            std::future::ready(Ok(()))
        }
        fn remove(&self, _: &str) -> impl Future<Output = Result<bool, BackendError>> + Send {
            std::future::ready(Ok(false))
        }
        fn list(&self) -> impl Future<Output = Result<Vec<SecretMeta>, BackendError>> + Send {
            std::future::ready(Ok(Vec::new()))
        }
        fn contains(&self, _: &str) -> impl Future<Output = Result<bool, BackendError>> + Send {
            std::future::ready(Ok(false))
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    fn cache(ttl_ms: u64) -> Arc<SecretCache<Fake>> {
        let fake = Fake::default();
        fake.put("gh", "one");
        Arc::new(SecretCache::new(
            fake,
            Duration::from_millis(ttl_ms),
            Duration::from_millis(300),
        ))
    }

    async fn value(c: &SecretCache<Fake>, name: &str) -> Option<Vec<u8>> {
        c.get(name).await.unwrap().map(|s| s.expose().to_vec())
    }

    #[tokio::test]
    async fn a_fresh_value_is_served_from_memory() {
        let c = cache(60_000);
        assert_eq!(value(&c, "gh").await.as_deref(), Some(&b"one"[..]));
        c.backend().down.store(true, Ordering::SeqCst);
        for _ in 0..10 {
            assert_eq!(value(&c, "gh").await.as_deref(), Some(&b"one"[..]));
        }
        assert_eq!(c.backend().fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn absent_names_are_cached_too() {
        let c = cache(60_000);
        assert!(value(&c, "nope").await.is_none());
        assert!(value(&c, "nope").await.is_none());
        assert_eq!(c.backend().fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_rotated_value_is_used_once_the_ttl_has_passed() {
        let c = cache(200);
        assert_eq!(value(&c, "gh").await.as_deref(), Some(&b"one"[..]));
        c.backend().put("gh", "two");
        // Time passing is what this test is about, not readiness.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(value(&c, "gh").await.as_deref(), Some(&b"two"[..]));
    }

    #[tokio::test]
    async fn the_refresher_picks_up_a_rotation_without_a_request_waiting() {
        let c = cache(200);
        c.spawn_refresher();
        assert_eq!(value(&c, "gh").await.as_deref(), Some(&b"one"[..]));
        c.backend().put("gh", "two");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if value(&c, "gh").await.as_deref() == Some(&b"two"[..]) {
                break;
            }
            assert!(Instant::now() < deadline, "rotation never seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn during_an_outage_values_serve_until_the_ttl_then_fail() {
        let c = cache(300);
        assert_eq!(value(&c, "gh").await.as_deref(), Some(&b"one"[..]));
        c.backend().down.store(true, Ordering::SeqCst);
        assert_eq!(value(&c, "gh").await.as_deref(), Some(&b"one"[..]));
        tokio::time::sleep(Duration::from_millis(350)).await;
        let err = c.get("gh").await.unwrap_err();
        assert!(matches!(&*err, BackendError::OpenBao(e) if e.is_unreachable()));
        assert!(err.agent_detail().contains("cannot be reached"));
        // Back up: the next lookup fetches again.
        c.backend().down.store(false, Ordering::SeqCst);
        assert_eq!(value(&c, "gh").await.as_deref(), Some(&b"one"[..]));
    }

    #[tokio::test]
    async fn a_hanging_backend_costs_one_bounded_wait() {
        let c = cache(60_000);
        c.backend().hang.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let err = c.get("gh").await.unwrap_err();
        assert!(matches!(&*err, BackendError::Timeout(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let c = cache(60_000);
        let lookups = (0..20).map(|_| {
            let c = c.clone();
            tokio::spawn(async move { value(&c, "gh").await })
        });
        for got in futures_util::future::join_all(lookups).await {
            assert_eq!(got.unwrap().as_deref(), Some(&b"one"[..]));
        }
        assert_eq!(c.backend().fetches.load(Ordering::SeqCst), 1);
    }
}
