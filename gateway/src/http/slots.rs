//! Slots for what a client may hold open without doing work: waiters (long polls, `Prefer: wait`)
//! and event streams. Each kind has a cap for the whole process and one per tenant, so that no
//! tenant can take every slot another tenant needs (OWASP API4:2023, Unrestricted Resource
//! Consumption). Hand-written: a semaphore per tenant would need creating and sweeping; a count
//! per tenant under one lock, dropped with its last slot, does not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::DEFAULT_TENANT;

/// Slots of one kind: at most `total` at once, at most `per_tenant` for any one tenant.
#[derive(Clone)]
pub struct Slots {
    total: Arc<Semaphore>,
    per_tenant: usize,
    held: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

/// One slot, given back when dropped.
pub struct Slot {
    _total: OwnedSemaphorePermit,
    held: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    tenant: Arc<str>,
}

impl Slots {
    pub fn new(total: usize, per_tenant: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total)),
            per_tenant,
            held: Arc::default(),
        }
    }

    /// A slot for `tenant`, or `None` when the process or the tenant holds all it may. The
    /// `default` tenant (no `[auth]`: every caller) has only the process's cap.
    pub fn try_take(&self, tenant: &Arc<str>) -> Option<Slot> {
        let mut held = self.held.lock().expect("never poisoned");
        let count = held.get(tenant).copied().unwrap_or(0);
        if count >= self.per_tenant && &**tenant != DEFAULT_TENANT {
            return None;
        }
        let total = self.total.clone().try_acquire_owned().ok()?;
        *held.entry(tenant.clone()).or_default() += 1;
        Some(Slot {
            _total: total,
            held: self.held.clone(),
            tenant: tenant.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("never poisoned");
        if let Some(count) = held.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_cannot_take_what_another_needs() {
        let slots = Slots::new(3, 2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let a1 = slots.try_take(&a).unwrap();
        let _a2 = slots.try_take(&a).unwrap();
        assert!(slots.try_take(&a).is_none(), "a's own cap");
        let _b1 = slots.try_take(&b).unwrap();
        assert!(slots.try_take(&b).is_none(), "the process's cap");
        drop(a1);
        assert!(
            slots.try_take(&b).is_some(),
            "a slot given back is free again"
        );
        assert!(slots.held.lock().unwrap().len() <= 2);
        // Without [auth] every caller is `default`: only the process's cap applies.
        let slots = Slots::new(3, 1);
        let default: Arc<str> = DEFAULT_TENANT.into();
        let all: Vec<_> = (0..3).map(|_| slots.try_take(&default)).collect();
        assert!(all.iter().all(Option::is_some));
        assert!(slots.try_take(&default).is_none());
        assert_eq!(
            slots.held.lock().unwrap().len(),
            1,
            "no entry left for a refusal"
        );
    }
}
