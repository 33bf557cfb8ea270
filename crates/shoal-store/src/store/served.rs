//! Small blobs served lately, kept in memory with their content checked.
//!
//! A node answering `GetBlobs` opens, reads and hashes again every small
//! blob it sends (see [`Store::read_whole_many`]): for a file of 4 KiB
//! that is four system calls and a lookup, about 5 us of CPU here,
//! as much as QUIC spends sending it. The peers of a swarm ask for the same
//! blobs again and again, so the content last served is kept here, up to
//! a byte budget, the least recently served evicted first, and served
//! from memory without reading or hashing it again.
//!
//! Only content that was just checked against its hash goes in, and
//! `Bytes` cannot change, so what comes out is right by construction. A
//! hit counts only while the store still holds the blob complete and not
//! marked corrupt; blobs taken out of the store (`rm`, gc, a vanished
//! source) are dropped from here at once, so nothing removed is served
//! or kept. Content in memory is served even if the file it was read
//! from has changed since: it is still the content the hash names.

use bytes::Bytes;
use lru::LruCache;

/// The default budget: the content of ~16,000 files of 4 KiB.
pub(super) const DEFAULT_BUDGET: usize = 64 << 20;
/// Memory counted per entry besides its content (the map's node and key).
const ENTRY_OVERHEAD: usize = 96;

/// See the module documentation.
pub(super) struct Served {
    lru: LruCache<blake3::Hash, Bytes>,
    /// Content and overhead of the entries held.
    bytes: usize,
    budget: usize,
}

impl Served {
    pub(super) fn new(budget: usize) -> Served {
        Served {
            lru: LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    /// The content of `hash`, if held; it becomes the most recent.
    pub(super) fn get(&mut self, hash: &blake3::Hash) -> Option<Bytes> {
        self.lru.get(hash).cloned()
    }

    /// Keep `data`, the checked content of `hash`, evicting the least
    /// recently served as needed; content larger than an eighth of the
    /// budget is not kept (one large blob would push out many small ones).
    pub(super) fn put(&mut self, hash: blake3::Hash, data: Bytes) {
        let cost = data.len() + ENTRY_OVERHEAD;
        if cost > self.budget / 8 {
            return;
        }
        if let Some(old) = self.lru.put(hash, data) {
            self.bytes -= old.len() + ENTRY_OVERHEAD;
        }
        self.bytes += cost;
        self.evict();
    }

    pub(super) fn remove(&mut self, hash: &blake3::Hash) {
        if let Some(old) = self.lru.pop(hash) {
            self.bytes -= old.len() + ENTRY_OVERHEAD;
        }
    }

    /// A new budget (0 turns the cache off and empties it).
    pub(super) fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.evict();
    }

    fn evict(&mut self) {
        while self.bytes > self.budget {
            let Some((_, old)) = self.lru.pop_lru() else {
                break;
            };
            self.bytes -= old.len() + ENTRY_OVERHEAD;
        }
    }

    /// Entries held, and the memory they count for.
    pub(super) fn usage(&self) -> (usize, usize) {
        (self.lru.len(), self.bytes)
    }

    /// The most memory the entries may count for.
    pub(super) fn budget(&self) -> usize {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn h(i: u8) -> blake3::Hash {
        blake3::hash(&[i])
    }

    fn data(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    #[test]
    fn the_least_recently_served_goes_first_and_the_budget_holds() {
        let mut s = Served::new(8 * 1000);
        s.put(h(0), data(1000 - ENTRY_OVERHEAD));
        s.put(h(1), data(1001 - ENTRY_OVERHEAD));
        assert_eq!(
            s.usage(),
            (1, 1000),
            "an entry over an eighth of the budget is not kept"
        );
        let mut s = Served::new(24 * (1000 + ENTRY_OVERHEAD));
        for i in 0..24 {
            s.put(h(i), data(1000));
        }
        assert_eq!(s.usage(), (24, 24 * (1000 + ENTRY_OVERHEAD)));
        // 0 served lately: 1 is now the least recent.
        assert!(s.get(&h(0)).is_some());
        s.put(h(100), data(1000));
        assert!(s.get(&h(1)).is_none());
        assert!(s.get(&h(0)).is_some());
        assert_eq!(s.usage().0, 24);
        assert!(s.usage().1 <= 24 * (1000 + ENTRY_OVERHEAD));
        // The same hash again replaces, it does not count twice.
        s.put(h(100), data(1000));
        assert_eq!(s.usage(), (24, 24 * (1000 + ENTRY_OVERHEAD)));
        s.remove(&h(100));
        assert!(s.get(&h(100)).is_none());
        assert_eq!(s.usage(), (23, 23 * (1000 + ENTRY_OVERHEAD)));
        s.set_budget(0);
        assert_eq!(s.usage(), (0, 0));
        s.put(h(5), data(10));
        assert_eq!(s.usage(), (0, 0), "a budget of 0 keeps nothing");
    }
}
