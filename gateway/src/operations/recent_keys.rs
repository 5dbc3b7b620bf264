//! Key tokens this replica answered lately: the hint [`super::accept`] reads a likely retry's
//! key by before it tries a write.

use std::sync::atomic::{AtomicU64, Ordering};

/// Key tokens this replica accepted or replayed lately, as 64-bit hashes in a direct-mapped
/// table of [`RECENT_KEYS`] slots (1 MiB: the keys of the last few seconds at 25k accepts/s; a
/// newer key takes an older one's slot): a hint that a submission is a client's retry, so that
/// its key is read before a write is tried. A retry through another replica, or after its slot
/// was taken, goes the usual way; a false hint costs one read. Hand-written glue: a lock-free,
/// fixed-size set is all this needs, and no crate's cache is that small.
pub struct RecentKeys {
    slots: Box<[AtomicU64]>,
}

/// Slots of [`RecentKeys`].
const RECENT_KEYS: usize = 1 << 17;

impl Default for RecentKeys {
    fn default() -> Self {
        Self {
            slots: (0..RECENT_KEYS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RecentKeys {
    /// The slot of a key token, and the nonzero value it holds when the token is there.
    fn locate(&self, key_token: &str) -> (&AtomicU64, u64) {
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(key_token, &mut hasher);
        let hash = std::hash::Hasher::finish(&hasher) | 1;
        (&self.slots[hash as usize % RECENT_KEYS], hash)
    }

    pub fn insert(&self, key_token: &str) {
        let (slot, hash) = self.locate(key_token);
        slot.store(hash, Ordering::Relaxed);
    }

    pub fn contains(&self, key_token: &str) -> bool {
        let (slot, hash) = self.locate(key_token);
        slot.load(Ordering::Relaxed) == hash
    }
}

#[cfg(test)]
mod tests {
    use super::{RECENT_KEYS, RecentKeys};
    use crate::operations::idempotency::key_token;

    #[test]
    fn recent_keys_hint_at_retries_and_forget_the_oldest() {
        let recent = RecentKeys::default();
        let first = key_token("default", "orders", "a");
        assert!(!recent.contains(&first));
        recent.insert(&first);
        assert!(recent.contains(&first));
        assert!(!recent.contains(&key_token("default", "orders", "b")));
        assert!(!recent.contains(&key_token("other", "orders", "a")));
        // A newer key that falls in the same slot takes it.
        let slot = recent.locate(&first).0;
        let newer = (0..100 * RECENT_KEYS)
            .map(|i| key_token("default", "orders", &i.to_string()))
            .find(|token| std::ptr::eq(recent.locate(token).0, slot))
            .expect("some key shares the slot");
        recent.insert(&newer);
        assert!(recent.contains(&newer));
        assert!(!recent.contains(&first));
    }
}
