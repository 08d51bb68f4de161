//! The proxy's side of approvals: requests held until a person decides, the per-agent queue
//! that bounds them, the watcher that finds decisions taken anywhere (CLI, any replica's
//! dashboard) and releases what it holds, and the audit lines of grants.
//!
//! SECURITY: a held request's future may be dropped at any `.await` (the agent went away);
//! [`HoldGuard`]'s `Drop` then removes the pending entry and writes the `approval_cancelled`
//! line, so no approval can later release a request that no longer exists, and no held entry
//! outlives its agent.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::oneshot;

use super::notify::Webhook;
use super::store::{Store, StoreError};
use super::{audit_event, Allowance, Decision, Kind, Pending, Step};
use crate::audit::Recorder;

/// How often the watcher looks for decisions on what this replica holds: a decision taken
/// anywhere releases its request within this (plus one Redis round trip).
pub const POLL_EVERY: Duration = Duration::from_millis(100);

/// How often grants (asked by `token issue` / `run`) are looked at for their audit lines.
const GRANTS_EVERY: u32 = 5;

/// How often (in ticks: a minute) decided and expired approval files are swept.
const SWEEP_EVERY: u32 = 600;

/// How a held request ended.
#[derive(Debug, Clone)]
pub enum Released {
    /// A person approved it.
    Approved(Decision),
    /// A person denied it.
    Denied(Decision),
    /// Nobody decided within the timeout.
    TimedOut(Decision),
}

/// Every request this replica holds, and what bounds them.
pub struct Holds {
    store: Arc<Store>,
    recorder: Arc<Recorder>,
    notify: Option<Arc<Webhook>>,
    waiting: DashMap<String, oneshot::Sender<Decision>>,
    per_agent: DashMap<String, usize>,
    allowances: DashMap<(String, String), Allowance>,
    timeout: Duration,
    queue: usize,
    replica: String,
}

/// A place in one agent's approval queue; freed on drop.
pub struct QueueSlot {
    holds: Arc<Holds>,
    agent: String,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        if let Some(mut n) = self.holds.per_agent.get_mut(&self.agent) {
            *n = n.saturating_sub(1);
        }
        self.holds.per_agent.remove_if(&self.agent, |_, n| *n == 0);
    }
}

/// Removes a held entry whose future was dropped, and says so in the audit log.
struct HoldGuard {
    holds: Arc<Holds>,
    pending: Option<Pending>,
}

impl HoldGuard {
    /// The hold ended normally: nothing left for `Drop` to do.
    fn disarm(&mut self) -> Pending {
        self.pending.take().expect("a hold guard is disarmed once")
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            self.holds.waiting.remove(&p.id);
            self.holds.store.remove_soon(&p.id);
            self.holds
                .recorder
                .note(audit_event(&p, Step::Cancelled, None));
        }
    }
}

impl Holds {
    /// Hold requests for at most `timeout`, at most `queue` per agent, in `store`, writing
    /// lines with `recorder` and announcing each to `notify`.
    pub fn new(
        store: Arc<Store>,
        recorder: Arc<Recorder>,
        notify: Option<Arc<Webhook>>,
        timeout: Duration,
        queue: usize,
        replica: String,
    ) -> Holds {
        Holds {
            store,
            recorder,
            notify,
            waiting: DashMap::new(),
            per_agent: DashMap::new(),
            allowances: DashMap::new(),
            timeout,
            queue,
            replica,
        }
    }

    /// The store (for the dashboard's decisions).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// How long a request is held at most.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Requests held by this replica right now.
    pub fn held_count(&self) -> usize {
        self.waiting.len()
    }

    /// This replica's name (recorded on what it holds).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// A place in `agent`'s queue, or `None` when it already holds `queue` requests.
    pub fn reserve(self: &Arc<Self>, agent: &str) -> Option<QueueSlot> {
        let mut n = self.per_agent.entry(agent.to_owned()).or_insert(0);
        if *n >= self.queue {
            return None;
        }
        *n += 1;
        drop(n);
        Some(QueueSlot {
            holds: Arc::clone(self),
            agent: agent.to_owned(),
        })
    }

    /// The most one agent may have held at once.
    pub fn queue(&self) -> usize {
        self.queue
    }

    /// A live "this route for this session" allowance, if a person granted one (here, in
    /// the state dir, or on another replica through Redis).
    pub async fn allowed(&self, session: &str, route: &str) -> Option<Allowance> {
        let key = (session.to_owned(), route.to_owned());
        let now = crate::auth::unix_now();
        if let Some(a) = self.allowances.get(&key) {
            if a.until > now {
                return Some(a.clone());
            }
        }
        self.allowances.remove_if(&key, |_, a| a.until <= now);
        let a = self.store.allowance(session, route).await?;
        self.allowances.insert(key, a.clone());
        Some(a)
    }

    /// Hold `p` until a person decides or the timeout passes. Cancel-safe: dropping the
    /// future (the agent went away) removes the entry and writes `approval_cancelled`.
    pub async fn hold(
        self: &Arc<Self>,
        p: Pending,
        slot: QueueSlot,
    ) -> Result<Released, StoreError> {
        let id = p.id.clone();
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(id.clone(), tx);
        let mut guard = HoldGuard {
            holds: Arc::clone(self),
            pending: Some(p.clone()),
        };
        if let Err(e) = self.store.put_pending(&p).await {
            // Never asked: no line, no entry.
            guard.disarm();
            self.waiting.remove(&id);
            self.store.remove(&id).await;
            return Err(e);
        }
        self.recorder.note(audit_event(&p, Step::Requested, None));
        if let Some(n) = &self.notify {
            n.announce(&p);
        }
        let decided = tokio::select! {
            d = rx => d.ok(),
            _ = tokio::time::sleep(self.timeout) => None,
        };
        let decision = match decided {
            Some(d) => d,
            None => {
                let t = Decision {
                    id: id.clone(),
                    approve: false,
                    approver: "timeout".into(),
                    reason: None,
                    at: crate::auth::unix_now(),
                    routes: None,
                    ttl_secs: None,
                    for_secs: None,
                    timed_out: true,
                };
                // A person may have decided in the same instant: the first decision stands.
                match self.store.decide(&t).await {
                    Ok(Some(first)) => first,
                    _ => t,
                }
            }
        };
        let p = guard.disarm();
        self.waiting.remove(&id);
        drop(slot);
        self.recorder
            .note(audit_event(&p, Step::of(&decision), Some(&decision)));
        if let (true, Some(secs), Some(r)) = (decision.approve, decision.for_secs, &p.request) {
            let a = Allowance {
                session: r.session.clone(),
                agent: p.agent.clone(),
                route: r.route.clone(),
                until: decision.at + secs,
                approval_id: p.id.clone(),
                approver: decision.approver.clone(),
            };
            if let Err(e) = self.store.put_allowance(&a).await {
                tracing::error!(error = %e, approval = %p.id, "cannot record the route allowance; later requests will be held again");
            }
            self.allowances
                .insert((a.session.clone(), a.route.clone()), a);
        }
        self.store.remove(&id).await;
        Ok(match Step::of(&decision) {
            Step::Approved => Released::Approved(decision),
            Step::TimedOut => Released::TimedOut(decision),
            _ => Released::Denied(decision),
        })
    }

    /// Forget held requests a previous run of this replica left behind (it crashed or was
    /// killed while holding them): their agents are gone, so no decision may look pending.
    /// Returns how many were removed.
    pub async fn forget_stale(&self) -> usize {
        let Ok(list) = self.store.list_kind(Some(Kind::Request)).await else {
            return 0;
        };
        let mut n = 0;
        for (p, _) in list {
            if p.replica.as_deref() == Some(self.replica.as_str())
                && !self.waiting.contains_key(&p.id)
            {
                self.store.remove(&p.id).await;
                n += 1;
            }
        }
        n
    }

    /// Deliver every decision taken on what this replica holds.
    pub async fn poll_once(&self) {
        if self.waiting.is_empty() {
            return;
        }
        let ids: Vec<String> = self.waiting.iter().map(|e| e.key().clone()).collect();
        for d in self.store.decisions_of(&ids).await {
            if let Some((_, tx)) = self.waiting.remove(&d.id) {
                let _ = tx.send(d);
            }
        }
    }

    /// Write the audit lines of session grants (asked, decided, expired), each once across
    /// the replicas sharing the store, and announce new ones to the webhook.
    pub async fn grants_once(&self) {
        let list = match self.store.list_kind(Some(Kind::Session)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list approval grants");
                return;
            }
        };
        let now = crate::auth::unix_now();
        for (p, d) in list {
            if self.store.claim(&p.id, Step::Requested).await {
                self.recorder.note(audit_event(&p, Step::Requested, None));
                if let Some(n) = &self.notify {
                    n.announce(&p);
                }
            }
            let d = match d {
                Some(d) => Some(d),
                // Nobody decided and the asker stopped waiting (or died): it timed out.
                None if p.expires <= now => {
                    let t = Decision {
                        id: p.id.clone(),
                        approve: false,
                        approver: "timeout".into(),
                        reason: None,
                        at: now,
                        routes: None,
                        ttl_secs: None,
                        for_secs: None,
                        timed_out: true,
                    };
                    match self.store.decide(&t).await {
                        Ok(Some(first)) => Some(first),
                        Ok(None) => Some(t),
                        Err(_) => None,
                    }
                }
                None => None,
            };
            if let Some(d) = d {
                let step = Step::of(&d);
                if self.store.claim(&p.id, step).await {
                    self.recorder.note(audit_event(&p, step, Some(&d)));
                }
            }
        }
    }

    /// Run the watcher until `stop` resolves.
    pub async fn watch(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u32 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop => return,
            }
            self.poll_once().await;
            n = n.wrapping_add(1);
            if n.is_multiple_of(GRANTS_EVERY) {
                self.grants_once().await;
            }
            if n.is_multiple_of(SWEEP_EVERY) {
                self.store.sweep();
            }
        }
    }
}
