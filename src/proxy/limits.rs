//! Caps on what agents can make the proxy hold open: connections that have not authenticated
//! yet, authenticated connections overall, tunnels (plus in-flight plain requests) per agent,
//! requests in flight per agent (across all its tunnels and HTTP/2 streams), and upstream
//! connections overall. One busy or hostile agent, or anyone who can reach the port, must not
//! starve the others or run the process out of file descriptors.
//!
//! This module only counts; what a full counter means for a request is `server`'s and
//! `request`'s business.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::Notify;

/// Counters behind the caps. Lock-free on the common path (the pending pool takes a short
/// lock once per accepted connection, never across an `.await`).
#[derive(Default)]
pub struct ConnLimits {
    global: Arc<AtomicUsize>,
    per_agent: DashMap<Box<str>, Arc<AtomicUsize>>,
    in_flight: DashMap<Box<str>, Arc<AtomicUsize>>,
    pending: Arc<Pending>,
}

/// Connections that have not presented a valid token yet, oldest first.
#[derive(Default)]
struct Pending {
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Notify>>>,
}

/// A counted pool of one kind of connection shared by everyone (the upstream connections).
#[derive(Clone, Default)]
pub struct Pool {
    counter: Arc<AtomicUsize>,
}

impl Pool {
    /// Take a slot if fewer than `max` are held.
    pub fn try_take(&self, max: usize) -> Option<GlobalSlot> {
        try_take(&self.counter, max).then(|| GlobalSlot {
            counter: self.counter.clone(),
        })
    }
}

/// A held slot, released on drop.
pub struct Slot {
    counter: Arc<AtomicUsize>,
}

/// A held global slot, released on drop. It moves with the connection: from the accepted
/// TCP connection into the tunnel when a CONNECT upgrades it.
pub struct GlobalSlot {
    counter: Arc<AtomicUsize>,
}

/// A connection's place in the unauthenticated pool, released on drop (or when the
/// connection authenticates and takes a [`GlobalSlot`] instead).
pub struct PendingSlot {
    id: u64,
    pool: Arc<Pending>,
    evicted: Arc<Notify>,
}

impl PendingSlot {
    /// A handle that says when a newer connection needed this one's place in the full pool
    /// (kept by the connection while the slot itself moves on).
    pub fn eviction(&self) -> Eviction {
        Eviction(self.evicted.clone())
    }
}

/// See [`PendingSlot::eviction`].
pub struct Eviction(Arc<Notify>);

impl Eviction {
    /// Resolves once the connection was told to make room.
    pub async fn evicted(&self) {
        self.0.notified().await;
    }
}

/// Where one accepted connection stands against the caps: waiting in the unauthenticated
/// pool until a request on it authenticates, then holding an authenticated slot (which a
/// CONNECT carries into its tunnel).
pub struct Admission {
    stage: Mutex<Stage>,
}

enum Stage {
    Pending(Option<PendingSlot>),
    Admitted(Option<GlobalSlot>),
}

impl Admission {
    /// A connection just accepted, holding its place in the unauthenticated pool.
    pub fn pending(slot: PendingSlot) -> Admission {
        Admission {
            stage: Mutex::new(Stage::Pending(Some(slot))),
        }
    }

    fn stage(&self) -> std::sync::MutexGuard<'_, Stage> {
        self.stage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Move to the authenticated pool once a request authenticated (a no-op when already
    /// there). False when `max` authenticated connections are open: the connection stays
    /// unauthenticated, to be answered 429 and closed.
    pub fn admit(&self, limits: &ConnLimits, max: usize) -> bool {
        let mut stage = self.stage();
        if matches!(*stage, Stage::Admitted(_)) {
            return true;
        }
        match limits.try_global(max) {
            // Dropping the pending slot leaves the unauthenticated pool.
            Some(slot) => {
                *stage = Stage::Admitted(Some(slot));
                true
            }
            None => false,
        }
    }

    /// Whether a request on this connection has authenticated.
    pub fn is_admitted(&self) -> bool {
        matches!(*self.stage(), Stage::Admitted(_))
    }

    /// The authenticated slot, for the tunnel a CONNECT opens: it outlives the HTTP
    /// connection it came from and keeps counting against the cap.
    pub fn take_slot(&self) -> Option<GlobalSlot> {
        match &mut *self.stage() {
            Stage::Admitted(slot) => slot.take(),
            Stage::Pending(slot) => {
                slot.take();
                None
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for GlobalSlot {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.pool
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.id);
    }
}

fn try_take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

fn try_keyed(map: &DashMap<Box<str>, Arc<AtomicUsize>>, key: &str, max: usize) -> Option<Slot> {
    let counter = match map.get(key) {
        Some(c) => c.clone(),
        None => map
            .entry(key.into())
            .or_insert_with(|| Arc::new(AtomicUsize::new(0)))
            .clone(),
    };
    try_take(&counter, max).then(|| Slot { counter })
}

impl ConnLimits {
    /// Take an authenticated connection slot if fewer than `max` are open.
    pub fn try_global(&self, max: usize) -> Option<GlobalSlot> {
        try_take(&self.global, max).then(|| GlobalSlot {
            counter: self.global.clone(),
        })
    }

    /// Take one of `agent`'s connection slots if it holds fewer than `max`.
    pub fn try_agent(&self, agent: &str, max: usize) -> Option<Slot> {
        try_keyed(&self.per_agent, agent, max)
    }

    /// Take one of `agent`'s in-flight request slots if it has fewer than `max` in flight.
    pub fn try_in_flight(&self, agent: &str, max: usize) -> Option<Slot> {
        try_keyed(&self.in_flight, agent, max)
    }

    /// A place in the unauthenticated pool for a connection just accepted. The pool never
    /// refuses: when `max` are already waiting, the oldest one is told to close. An idle
    /// flood then only pushes its own sockets out, while an agent's connection, which sends
    /// its CONNECT at once, authenticates long before `max` newer connections displace it.
    pub fn enter_pending(&self, max: usize) -> PendingSlot {
        let id = self.pending.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let mut open = self
            .pending
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while open.len() >= max.max(1) {
            match open.pop_first() {
                // `notify_one` keeps the wake-up for a connection not yet waiting on it.
                Some((_, oldest)) => oldest.notify_one(),
                None => break,
            }
        }
        open.insert(id, evicted.clone());
        PendingSlot {
            id,
            pool: self.pending.clone(),
            evicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_released_on_drop() {
        let l = ConnLimits::default();
        let a = l.try_agent("bot", 2).unwrap();
        let _b = l.try_agent("bot", 2).unwrap();
        assert!(l.try_agent("bot", 2).is_none());
        assert!(l.try_agent("other", 2).is_some());
        drop(a);
        assert!(l.try_agent("bot", 2).is_some());
        let g = l.try_global(1).unwrap();
        assert!(l.try_global(1).is_none());
        drop(g);
        assert!(l.try_global(1).is_some());
    }

    #[test]
    fn in_flight_and_upstream_are_counted_apart_from_connections() {
        let l = ConnLimits::default();
        let _conn = l.try_agent("bot", 1).unwrap();
        let r = l.try_in_flight("bot", 1).unwrap();
        assert!(l.try_in_flight("bot", 1).is_none());
        assert!(l.try_in_flight("other", 1).is_some());
        drop(r);
        assert!(l.try_in_flight("bot", 1).is_some());
        let _g = l.try_global(1).unwrap();
        let upstream = Pool::default();
        let u = upstream.try_take(1).unwrap();
        assert!(upstream.try_take(1).is_none());
        drop(u);
        assert!(upstream.try_take(1).is_some());
    }

    #[tokio::test]
    async fn a_full_pending_pool_evicts_its_oldest_connection() {
        let l = ConnLimits::default();
        let wait = |ms| std::time::Duration::from_millis(ms);
        let first = l.enter_pending(2);
        let second = l.enter_pending(2);
        let (e1, e2) = (first.eviction(), second.eviction());
        let third = Admission::pending(l.enter_pending(2));
        // The oldest was told to go; the others were not.
        tokio::time::timeout(wait(1000), e1.evicted())
            .await
            .expect("the oldest connection is evicted");
        assert!(tokio::time::timeout(wait(20), e2.evicted()).await.is_err());
        // A connection that authenticates leaves the pool and frees its place.
        assert!(third.admit(&l, 10));
        assert!(third.is_admitted());
        let _fourth = l.enter_pending(2);
        assert!(tokio::time::timeout(wait(20), e2.evicted()).await.is_err());
        drop(second);
    }
}
