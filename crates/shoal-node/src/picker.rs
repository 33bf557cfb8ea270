//! The open blocks of a download (wanted, no request in flight), kept in
//! ascending order of how many peers hold them, so that a rarest-first pick
//! costs the blocks it skips, not a pass over the whole blob.
//!
//! The layout is BitTorrent's classic piece picker: one array of blocks
//! sorted by availability, cut into buckets (every block of bucket `a` is
//! held by `a` peers), and each block's position in it. A peer gaining or
//! losing a block moves it across one bucket boundary by a single swap;
//! a block requested (or completed) leaves by one swap per bucket above
//! its own, and one whose request failed comes back the same way. The order
//! inside a bucket means nothing (those swaps reverse it wholesale when a
//! complete peer arrives); the scheduler breaks ties by where in the bucket
//! it starts looking.
//!
//! Why by hand: no crate offers an availability-bucketed index; a sorted
//! set of `(availability, tie, block)` would cost ~40 bytes a block and a
//! log-time update (a complete peer of a 1 TiB blob announces 8 million
//! blocks at once), where this costs 8 bytes and a swap.

/// Marks a block that is not in the order.
const GONE: u32 = u32::MAX;

/// See the module's comment.
#[derive(Debug)]
pub(crate) struct Picker {
    /// The open blocks, in ascending availability.
    order: Vec<u32>,
    /// Each block's index in `order` ([`GONE`] once removed).
    pos: Vec<u32>,
    /// `start[a]..start[a + 1]` is bucket `a` in `order`; the last entry is
    /// `order.len()`.
    start: Vec<u32>,
    /// Peers holding each block (also for blocks no longer in the order).
    avail: Vec<u32>,
}

impl Picker {
    /// `blocks` blocks (at most `u32::MAX - 1`), all open, none held by
    /// anyone yet.
    pub(crate) fn new(blocks: u32) -> Self {
        Picker {
            order: (0..blocks).collect(),
            pos: (0..blocks).collect(),
            start: vec![0, blocks],
            avail: vec![0; blocks as usize],
        }
    }

    /// Peers holding block `b`.
    pub(crate) fn avail(&self, b: u32) -> u32 {
        self.avail[b as usize]
    }

    /// Open blocks.
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether `b` is open.
    pub(crate) fn contains(&self, b: u32) -> bool {
        self.pos[b as usize] != GONE
    }

    /// The open blocks held by at least `min` peers, bucket by bucket,
    /// rarest first (in no order inside a bucket).
    pub(crate) fn buckets_from(&self, min: usize) -> impl Iterator<Item = &[u32]> + '_ {
        self.start
            .windows(2)
            .skip(min)
            .map(|w| &self.order[w[0] as usize..w[1] as usize])
            .filter(|b| !b.is_empty())
    }

    /// The open blocks, rarest first.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.buckets_from(0).flatten().copied()
    }

    fn swap(&mut self, i: u32, j: u32) {
        self.order.swap(i as usize, j as usize);
        self.pos[self.order[i as usize] as usize] = i;
        self.pos[self.order[j as usize] as usize] = j;
    }

    /// One more peer holds `b`.
    pub(crate) fn inc(&mut self, b: u32) {
        let a = self.avail[b as usize];
        self.avail[b as usize] = a + 1;
        let at = self.pos[b as usize];
        if at == GONE {
            return;
        }
        let a = a as usize;
        if a + 2 == self.start.len() {
            // A new, empty top bucket.
            self.start.push(self.order.len() as u32);
        }
        // To the end of bucket a, which then ends one earlier: b is the
        // first of bucket a + 1.
        let last = self.start[a + 1] - 1;
        self.swap(at, last);
        self.start[a + 1] = last;
    }

    /// One peer fewer holds `b` (it must have been counted).
    pub(crate) fn dec(&mut self, b: u32) {
        let a = self.avail[b as usize];
        debug_assert!(a > 0, "block {b} had no holder to lose");
        let Some(lower) = a.checked_sub(1) else {
            return;
        };
        self.avail[b as usize] = lower;
        let at = self.pos[b as usize];
        if at == GONE {
            return;
        }
        // To the start of bucket a, which then starts one later: b is the
        // last of bucket a - 1.
        let first = self.start[a as usize];
        self.swap(at, first);
        self.start[a as usize] = first + 1;
    }

    /// `b` is no longer open (requested, or complete): it leaves the order.
    pub(crate) fn remove(&mut self, b: u32) {
        let mut at = self.pos[b as usize];
        if at == GONE {
            return;
        }
        // Bucket by bucket to the end of the array, each boundary above it
        // moving down by one.
        for k in (self.avail[b as usize] as usize + 1)..self.start.len() {
            let last = self.start[k] - 1;
            self.swap(at, last);
            self.start[k] = last;
            at = last;
        }
        debug_assert_eq!(at as usize, self.order.len() - 1);
        self.order.pop();
        self.pos[b as usize] = GONE;
    }

    /// `b` is open again (its request ended without it).
    pub(crate) fn insert(&mut self, b: u32) {
        if self.pos[b as usize] != GONE {
            return;
        }
        let a = self.avail[b as usize] as usize;
        while self.start.len() < a + 2 {
            // Empty buckets up to b's.
            self.start.push(self.order.len() as u32);
        }
        // In at the end, then bucket by bucket down to its own, each
        // boundary on the way moving up by one.
        let mut at = self.order.len() as u32;
        self.order.push(b);
        self.pos[b as usize] = at;
        for k in (a + 1..self.start.len()).rev() {
            let first = self.start[k];
            self.swap(at, first);
            self.start[k] = first + 1;
            at = first;
        }
    }

    /// Check every invariant (tests).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        assert_eq!(
            *self.start.last().expect("sentinel"),
            self.order.len() as u32
        );
        assert_eq!(self.start[0], 0);
        for (a, w) in self.start.windows(2).enumerate() {
            assert!(w[0] <= w[1], "bucket {a} ends before it starts");
            for i in w[0]..w[1] {
                let b = self.order[i as usize];
                assert_eq!(
                    self.avail[b as usize] as usize, a,
                    "block {b} in bucket {a}"
                );
                assert_eq!(self.pos[b as usize], i);
            }
        }
        let present = self.pos.iter().filter(|p| **p != GONE).count();
        assert_eq!(present, self.order.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Inc(u32),
        Dec(u32),
        Remove(u32),
        Insert(u32),
    }

    fn op(blocks: u32) -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..blocks).prop_map(Op::Inc),
            2 => (0..blocks).prop_map(Op::Dec),
            1 => (0..blocks).prop_map(Op::Remove),
            1 => (0..blocks).prop_map(Op::Insert),
        ]
    }

    proptest! {
        /// Against a plain model: the order holds exactly the blocks not
        /// removed (or inserted again), sorted by availability, whatever
        /// the operations.
        #[test]
        fn the_order_is_the_wanted_blocks_by_availability(
            (blocks, ops) in (1u32..40).prop_flat_map(|n| (Just(n), prop::collection::vec(op(n), 0..200))),
        ) {
            let mut p = Picker::new(blocks);
            let mut avail = vec![0u32; blocks as usize];
            let mut gone = vec![false; blocks as usize];
            for o in ops {
                match o {
                    Op::Inc(b) => { p.inc(b); avail[b as usize] += 1; }
                    Op::Dec(b) if avail[b as usize] > 0 => { p.dec(b); avail[b as usize] -= 1; }
                    Op::Dec(_) => {}
                    Op::Remove(b) => { p.remove(b); gone[b as usize] = true; }
                    Op::Insert(b) => { p.insert(b); gone[b as usize] = false; }
                }
                p.check();
            }
            let got: Vec<u32> = p.iter().collect();
            let per_bucket: Vec<u32> = p.buckets_from(0).map(|b| avail[b[0] as usize]).collect();
            prop_assert!(per_bucket.windows(2).all(|w| w[0] < w[1]), "buckets {:?}", per_bucket);
            let mut want: Vec<u32> = (0..blocks).filter(|b| !gone[*b as usize]).collect();
            prop_assert_eq!(got.len(), want.len());
            let keys: Vec<u32> = got.iter().map(|b| avail[*b as usize]).collect();
            prop_assert!(keys.windows(2).all(|w| w[0] <= w[1]), "not sorted: {:?}", keys);
            let mut sorted = got.clone();
            sorted.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(sorted, want);
            for b in 0..blocks {
                prop_assert_eq!(p.avail(b), avail[b as usize]);
                prop_assert_eq!(p.contains(b), !gone[b as usize]);
            }
        }
    }
}
