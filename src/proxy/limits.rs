//! Caps on what agents can make the proxy hold open: connections overall and tunnels (plus
//! in-flight plain requests) per agent. One busy or hostile agent must not starve the others.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// Counters behind the caps. Lock-free on the common path.
#[derive(Default)]
pub struct ConnLimits {
    global: Arc<AtomicUsize>,
    per_agent: DashMap<Box<str>, Arc<AtomicUsize>>,
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

fn try_take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl ConnLimits {
    /// Take a connection slot if fewer than `max` are open.
    pub fn try_global(&self, max: usize) -> Option<GlobalSlot> {
        try_take(&self.global, max).then(|| GlobalSlot {
            counter: self.global.clone(),
        })
    }

    /// Take one of `agent`'s slots if it holds fewer than `max`.
    pub fn try_agent(&self, agent: &str, max: usize) -> Option<Slot> {
        let counter = match self.per_agent.get(agent) {
            Some(c) => c.clone(),
            None => self
                .per_agent
                .entry(agent.into())
                .or_insert_with(|| Arc::new(AtomicUsize::new(0)))
                .clone(),
        };
        try_take(&counter, max).then(|| Slot { counter })
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
}
