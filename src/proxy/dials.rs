//! At most [`PER_HOST`] upstream connections being set up per host at a time, and no dial for
//! a request the pool has served meanwhile.
//!
//! hyper-util's pool races each request that finds no idle connection between waiting for one
//! and dialing a new one, and a dial it started goes on in the background when an idle
//! connection wins. Under a burst (32 agents starting at once against an HTTP/1 upstream) that
//! made 167 TLS connections to the upstream for 32 agents, and 64 stayed open. Here a dial
//! past the per-host limit waits for one in progress to get its first answer from the upstream
//! (for TLS the server's handshake flight), for at most [`WAIT_AT_MOST`]: requests that hold
//! their connections long (a burst of LLM completions to an HTTP/1 upstream) each need one, and
//! wait no longer than that for it. A waiting dial that hyper-util has moved to the background
//! (it is polled from another task from then on: its request was served from the pool) gives
//! up without dialing. A dial in progress is never cancelled: its connection joins the pool.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

/// Connections being set up at once to one host and port...
pub const PER_HOST: usize = 4;
/// ...unless a dial has waited this long for its turn.
pub const WAIT_AT_MOST: Duration = Duration::from_millis(50);

/// Why a waiting dial woke.
enum Woke {
    Released,
    Overdue,
    Moved,
}

/// Connect error: the request this dial was for got a pooled connection while it waited.
#[derive(Debug, thiserror::Error)]
#[error("dial not needed: the request was served by a pooled connection")]
pub struct NotNeeded;

/// Dials in progress per (host, port).
#[derive(Default)]
pub struct Dials {
    hosts: Mutex<HashMap<(String, u16), usize>>,
    released: Notify,
}

impl Dials {
    /// Wait for a dial slot for `host:port`. The waiting is done in the task that polls this
    /// future first; polled from another one, it ends with [`NotNeeded`].
    pub async fn enter(self: &Arc<Self>, host: &str, port: u16) -> Result<DialSlot, NotNeeded> {
        let mut first: Option<Waker> = None;
        let mut overdue = None;
        let mut limit = PER_HOST;
        loop {
            let released = self.released.notified();
            let mut released = pin!(released);
            // Registered before looking, so a release in between is not missed.
            released.as_mut().enable();
            if let Some(slot) = self.try_enter(host, port, limit) {
                return Ok(slot);
            }
            let overdue = overdue.get_or_insert_with(|| Box::pin(tokio::time::sleep(WAIT_AT_MOST)));
            let woke = poll_fn(|cx| {
                match &first {
                    None => first = Some(cx.waker().clone()),
                    Some(w) if !w.will_wake(cx.waker()) => return Poll::Ready(Woke::Moved),
                    Some(_) => {}
                }
                if overdue.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woke::Overdue);
                }
                released.as_mut().poll(cx).map(|()| Woke::Released)
            })
            .await;
            match woke {
                Woke::Released => {}
                Woke::Moved => return Err(NotNeeded),
                Woke::Overdue => limit = usize::MAX,
            }
        }
    }

    /// Dials to `host:port` in progress.
    #[cfg(test)]
    pub fn in_progress(&self, host: &str, port: u16) -> usize {
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts.get(&(host.to_owned(), port)).copied().unwrap_or(0)
    }

    fn try_enter(self: &Arc<Self>, host: &str, port: u16, limit: usize) -> Option<DialSlot> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let key = (host.to_owned(), port);
        let n = hosts.entry(key.clone()).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(DialSlot {
            dials: Some(self.clone()),
            key,
        })
    }
}

/// A dial in progress; released by [`DialSlot::release`] or when dropped.
pub struct DialSlot {
    dials: Option<Arc<Dials>>,
    key: (String, u16),
}

impl DialSlot {
    pub fn release(&mut self) {
        let Some(dials) = self.dials.take() else {
            return;
        };
        let mut hosts = dials.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = hosts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                hosts.remove(&self.key);
            }
        }
        drop(hosts);
        dials.released.notify_waiters();
    }
}

impl Drop for DialSlot {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All [`PER_HOST`] dial slots of `api.test:443`.
    async fn every_slot(dials: &Arc<Dials>) -> Vec<DialSlot> {
        let mut slots = Vec::new();
        for _ in 0..PER_HOST {
            slots.push(dials.enter("api.test", 443).await.unwrap());
        }
        slots
    }

    #[tokio::test]
    async fn past_the_limit_a_dial_waits_for_a_release() {
        let dials = Arc::new(Dials::default());
        let mut slots = every_slot(&dials).await;
        // Another host is not held up.
        let other = dials.enter("other.test", 443).await.unwrap();
        let waiting = {
            let dials = dials.clone();
            tokio::spawn(async move { dials.enter("api.test", 443).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "a fifth dial to the same host waits"
        );
        slots[0].release();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("released slot taken")
            .unwrap()
            .unwrap();
        drop(other);
        drop(slots);
        assert!(
            dials.hosts.lock().unwrap().is_empty(),
            "every slot given back"
        );
    }

    #[tokio::test]
    async fn a_waiting_dial_moved_to_another_task_gives_up() {
        let dials = Arc::new(Dials::default());
        let _slots = every_slot(&dials).await;
        let d = dials.clone();
        let mut waiting = Box::pin(async move { d.enter("api.test", 443).await.map(|_| ()) });
        // First polled here, as a request's own connect is.
        assert!(poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx).is_pending())).await);
        // Then driven by a task of its own, as hyper-util does with a background connect.
        let outcome = tokio::spawn(waiting).await.unwrap();
        assert!(
            outcome.is_err(),
            "a dial its request no longer needs is not made"
        );
    }

    #[tokio::test]
    async fn a_dial_that_waited_long_enough_goes_ahead_past_the_limit() {
        let dials = Arc::new(Dials::default());
        let slots = every_slot(&dials).await;
        let started = std::time::Instant::now();
        let extra = tokio::time::timeout(Duration::from_secs(5), dials.enter("api.test", 443))
            .await
            .expect("not held for good")
            .unwrap();
        assert!(started.elapsed() >= WAIT_AT_MOST);
        assert_eq!(dials.in_progress("api.test", 443), PER_HOST + 1);
        drop(extra);
        drop(slots);
        assert_eq!(dials.in_progress("api.test", 443), 0);
    }
}
