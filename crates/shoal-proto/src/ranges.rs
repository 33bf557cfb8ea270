//! Sets of chunk groups and their compact wire form.
//!
//! A hand-written run list rather than `range-collections`: the wire form
//! needs delta encoding with a hard cap on runs, validated while decoding,
//! and the operations shoal needs (union, difference, iteration) are a few
//! lines each on a sorted `Vec`.

use std::ops::Range;

use crate::pb;

/// Most boundary values a `GroupRanges` may carry on the wire (2048 runs).
pub const MAX_BOUNDARIES: usize = 4096;

/// A set of chunk-group indices, kept as sorted, disjoint, non-adjacent
/// half-open runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct GroupRanges {
    runs: Vec<Range<u64>>,
}

/// A malformed range set or hash from the network.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RangesError {
    /// An odd number of boundaries.
    #[error("group ranges have an odd number of boundaries")]
    Odd,
    /// More boundaries than [`MAX_BOUNDARIES`].
    #[error("group ranges have {0} boundaries, more than the limit")]
    TooMany(usize),
    /// A zero delta after the first value: an empty or touching run.
    #[error("group ranges are not strictly increasing")]
    NotIncreasing,
    /// Boundaries beyond u64.
    #[error("group ranges overflow")]
    Overflow,
    /// A hash field that is not 32 bytes.
    #[error("hash is {0} bytes, expected 32")]
    BadHash(usize),
}

/// The first index from `from` on whose run does not satisfy `before`
/// (true for a prefix of `runs`), found by doubling steps and then a binary
/// search: O(log skipped) rather than a step per run, so that an operation
/// between a few runs and many (a batch against what a download has) costs
/// the few.
fn gallop(runs: &[Range<u64>], from: usize, before: impl Fn(&Range<u64>) -> bool) -> usize {
    let mut lo = from;
    let mut step = 1;
    while lo + step < runs.len() && before(&runs[lo + step]) {
        lo += step;
        step *= 2;
    }
    let hi = (lo + step).min(runs.len());
    lo + runs[lo.min(hi)..hi].partition_point(&before)
}

impl GroupRanges {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// All groups in `range`.
    pub fn from_range(range: Range<u64>) -> Self {
        let mut s = Self::new();
        s.insert(range);
        s
    }

    /// The set holding the groups of `iter`, in any order.
    pub fn from_groups(iter: impl IntoIterator<Item = u64>) -> Self {
        let mut v: Vec<u64> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        let mut runs: Vec<Range<u64>> = Vec::new();
        for g in v {
            match runs.last_mut() {
                Some(last) if last.end == g => last.end = g + 1,
                _ => runs.push(g..g.saturating_add(1)),
            }
        }
        Self { runs }
    }

    /// The runs, ascending.
    pub fn runs(&self) -> &[Range<u64>] {
        &self.runs
    }

    /// True if no group is in the set.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Number of groups in the set.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|r| r.end - r.start).sum()
    }

    /// The bytes these groups hold of a blob of `size` bytes: the last
    /// group may be short, and groups past the end hold nothing.
    pub fn bytes_of(&self, size: u64) -> u64 {
        self.runs
            .iter()
            .map(|r| {
                let start = r.start.saturating_mul(crate::GROUP_SIZE).min(size);
                let end = r.end.saturating_mul(crate::GROUP_SIZE).min(size);
                end - start
            })
            .sum()
    }

    /// True if `g` is in the set.
    pub fn contains(&self, g: u64) -> bool {
        let i = self.runs.partition_point(|r| r.end <= g);
        self.runs.get(i).is_some_and(|r| r.start <= g)
    }

    /// True if every group of `range` is in the set.
    pub fn contains_range(&self, range: Range<u64>) -> bool {
        if range.is_empty() {
            return true;
        }
        let i = self.runs.partition_point(|r| r.end <= range.start);
        self.runs
            .get(i)
            .is_some_and(|r| r.start <= range.start && range.end <= r.end)
    }

    /// Every group, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|r| r.clone())
    }

    /// Add the groups of `range`.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let mut merged = range;
        // Runs entirely before `merged` (not touching) stay; so do those after.
        let lo = self.runs.partition_point(|r| r.end < merged.start);
        let hi = self.runs.partition_point(|r| r.start <= merged.end);
        if lo < hi {
            merged.start = merged.start.min(self.runs[lo].start);
            merged.end = merged.end.max(self.runs[hi - 1].end);
        }
        self.runs.splice(lo..hi, std::iter::once(merged));
    }

    /// The union of two sets.
    pub fn union(&self, other: &GroupRanges) -> GroupRanges {
        let mut out = self.clone();
        out.union_with(other);
        out
    }

    /// Add every group of `other` (in place: no copy of `self`, which is
    /// the large one where a download adds a batch to what it has).
    pub fn union_with(&mut self, other: &GroupRanges) {
        for r in &other.runs {
            self.insert(r.clone());
        }
    }

    /// True if the set is exactly the groups of `range`.
    pub fn is_exactly(&self, range: Range<u64>) -> bool {
        match self.runs.as_slice() {
            [] => range.is_empty(),
            [r] => *r == range,
            _ => false,
        }
    }

    /// The groups of `self` that are not in `other`.
    pub fn difference(&self, other: &GroupRanges) -> GroupRanges {
        let mut out = Vec::new();
        let mut j = 0;
        for r in &self.runs {
            let mut start = r.start;
            j = gallop(&other.runs, j, |o| o.end <= start);
            let mut k = j;
            while start < r.end {
                match other.runs.get(k) {
                    Some(o) if o.start < r.end => {
                        if o.start > start {
                            out.push(start..o.start);
                        }
                        start = start.max(o.end);
                        k += 1;
                    }
                    _ => {
                        out.push(start..r.end);
                        break;
                    }
                }
            }
        }
        GroupRanges { runs: out }
    }

    /// The groups in both sets.
    pub fn intersection(&self, other: &GroupRanges) -> GroupRanges {
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.runs.len() && j < other.runs.len() {
            let (a, b) = (&self.runs[i], &other.runs[j]);
            if a.end <= b.start {
                i = gallop(&self.runs, i, |r| r.end <= b.start);
                continue;
            }
            if b.end <= a.start {
                j = gallop(&other.runs, j, |r| r.end <= a.start);
                continue;
            }
            let start = a.start.max(b.start);
            let end = a.end.min(b.end);
            if start < end {
                out.push(start..end);
            }
            if a.end < b.end {
                i += 1;
            } else {
                j += 1;
            }
        }
        GroupRanges { runs: out }
    }

    /// The wire form: delta-encoded boundaries.
    pub fn to_pb(&self) -> pb::GroupRanges {
        let mut deltas = Vec::with_capacity(self.runs.len() * 2);
        let mut prev = 0;
        for r in &self.runs {
            deltas.push(r.start - prev);
            deltas.push(r.end - r.start);
            prev = r.end;
        }
        pb::GroupRanges { deltas }
    }

    /// The wire form of a claim: these groups if they fit the wire's
    /// limit of runs, else the last run and the longest others, up to
    /// [`MAX_BOUNDARIES`]` / 2` runs (a subset, so the claim stays true; a
    /// peer told less asks for less). For what a node says it has: a
    /// partial download picked rarest first can hold more runs than a peer
    /// would accept. The last run is kept because it may hold the blob's
    /// last group, which a downloader fetches first to prove the size.
    pub fn to_pb_claim(&self) -> pb::GroupRanges {
        let max = MAX_BOUNDARIES / 2;
        let Some((last, others)) = self.runs.split_last().filter(|_| self.runs.len() > max) else {
            return self.to_pb();
        };
        let mut longest: Vec<&Range<u64>> = others.iter().collect();
        // Longest first; among equals, the earliest.
        longest.sort_by_key(|r| (std::cmp::Reverse(r.end - r.start), r.start));
        longest.truncate(max - 1);
        longest.push(last);
        longest.sort_by_key(|r| r.start);
        GroupRanges {
            runs: longest.into_iter().cloned().collect(),
        }
        .to_pb()
    }

    /// Only the groups below `end` (a peer's claim clipped to the blob).
    pub fn clipped(&self, end: u64) -> GroupRanges {
        let n = self.runs.partition_point(|r| r.end <= end);
        let mut runs = self.runs[..n].to_vec();
        if let Some(r) = self.runs.get(n).filter(|r| r.start < end) {
            runs.push(r.start..end);
        }
        GroupRanges { runs }
    }

    /// Parse the wire form, refusing anything malformed.
    pub fn from_pb(p: &pb::GroupRanges) -> Result<Self, RangesError> {
        let d = &p.deltas;
        if d.len() > MAX_BOUNDARIES {
            return Err(RangesError::TooMany(d.len()));
        }
        if !d.len().is_multiple_of(2) {
            return Err(RangesError::Odd);
        }
        let mut runs = Vec::with_capacity(d.len() / 2);
        let mut pos: u64 = 0;
        for (i, pair) in d.chunks_exact(2).enumerate() {
            let (gap, len) = (pair[0], pair[1]);
            if len == 0 || (i > 0 && gap == 0) {
                return Err(RangesError::NotIncreasing);
            }
            let start = pos.checked_add(gap).ok_or(RangesError::Overflow)?;
            let end = start.checked_add(len).ok_or(RangesError::Overflow)?;
            runs.push(start..end);
            pos = end;
        }
        Ok(Self { runs })
    }

    /// Parse an optional wire field (absent means empty).
    pub fn from_opt_pb(p: Option<&pb::GroupRanges>) -> Result<Self, RangesError> {
        p.map_or_else(|| Ok(Self::new()), Self::from_pb)
    }
}

impl FromIterator<Range<u64>> for GroupRanges {
    fn from_iter<T: IntoIterator<Item = Range<u64>>>(iter: T) -> Self {
        let mut s = Self::new();
        for r in iter {
            s.insert(r);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_of_counts_the_last_group_as_what_is_left() {
        let g = crate::GROUP_SIZE;
        let size = 3 * g + 100;
        let set = |r: Range<u64>| GroupRanges::from_range(r);
        assert_eq!(set(0..1).bytes_of(size), g);
        assert_eq!(set(3..4).bytes_of(size), 100);
        assert_eq!(set(0..4).bytes_of(size), size);
        // Past the end: nothing.
        assert_eq!(set(0..9).bytes_of(size), size);
        assert_eq!(set(0..1).bytes_of(0), 0);
        assert_eq!(GroupRanges::default().bytes_of(size), 0);
    }

    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn set(groups: &BTreeSet<u64>) -> GroupRanges {
        GroupRanges::from_groups(groups.iter().copied())
    }

    #[test]
    fn nearly_complete_blob_is_a_few_bytes() {
        // 65536 groups with one missing: 4 values on the wire.
        let mut s = GroupRanges::from_range(0..65536);
        s = s.difference(&GroupRanges::from_range(1000..1001));
        let p = s.to_pb();
        assert_eq!(p.deltas, vec![0, 1000, 1, 64535]);
        assert_eq!(GroupRanges::from_pb(&p).unwrap(), s);
    }

    #[test]
    fn malformed_wire_forms_are_refused() {
        let check = |d: Vec<u64>, e: RangesError| {
            assert_eq!(GroupRanges::from_pb(&pb::GroupRanges { deltas: d }), Err(e));
        };
        check(vec![1], RangesError::Odd);
        check(vec![0, 0], RangesError::NotIncreasing);
        check(vec![0, 2, 0, 1], RangesError::NotIncreasing);
        check(vec![u64::MAX, 2], RangesError::Overflow);
        check(
            vec![1; MAX_BOUNDARIES + 2],
            RangesError::TooMany(MAX_BOUNDARIES + 2),
        );
    }

    proptest! {
        #[test]
        fn set_operations_match_btreeset(
            a in proptest::collection::btree_set(0u64..200, 0..80),
            b in proptest::collection::btree_set(0u64..200, 0..80),
        ) {
            let (sa, sb) = (set(&a), set(&b));
            prop_assert_eq!(sa.union(&sb).iter().collect::<BTreeSet<_>>(), &a | &b);
            prop_assert_eq!(sa.difference(&sb).iter().collect::<BTreeSet<_>>(), &a - &b);
            prop_assert_eq!(sa.intersection(&sb).iter().collect::<BTreeSet<_>>(), &a & &b);
            prop_assert_eq!(sa.count(), a.len() as u64);
            for g in 0..200 {
                prop_assert_eq!(sa.contains(g), a.contains(&g));
            }
            // Runs never touch: the canonical form is unique.
            for w in sa.runs().windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            prop_assert_eq!(GroupRanges::from_pb(&sa.to_pb()).unwrap(), sa);
        }

        /// A few runs against many, both ways round (the galloping paths).
        #[test]
        fn a_few_runs_against_many_match_btreeset(
            a in proptest::collection::btree_set(0u64..2000, 0..4),
            b in proptest::collection::btree_set(0u64..2000, 0..1500),
        ) {
            let (sa, sb) = (set(&a), set(&b));
            for (x, y, sx, sy) in [(&a, &b, &sa, &sb), (&b, &a, &sb, &sa)] {
                prop_assert_eq!(sx.difference(sy).iter().collect::<BTreeSet<_>>(), x - y);
                prop_assert_eq!(sx.intersection(sy).iter().collect::<BTreeSet<_>>(), x & y);
                let mut u = sx.clone();
                u.union_with(sy);
                prop_assert_eq!(u.iter().collect::<BTreeSet<_>>(), x | y);
            }
            prop_assert!(GroupRanges::new().is_exactly(5..5));
        }

        /// `is_exactly` holds for the set of one range and for no other.
        #[test]
        fn is_exactly_one_range(
            a in proptest::collection::btree_set(0u64..64, 0..64),
            lo in 0u64..64,
            len in 0u64..64,
        ) {
            let want: BTreeSet<u64> = (lo..lo + len).collect();
            prop_assert_eq!(set(&a).is_exactly(lo..lo + len), a == want);
            prop_assert!(set(&want).is_exactly(lo..lo + len));
        }

        #[test]
        fn a_claim_always_fits_the_wire_and_is_a_subset(
            runs in proptest::collection::vec((0u64..5, 1u64..4), 0..5000),
        ) {
            let mut set = GroupRanges::new();
            let mut pos = 0;
            for (gap, len) in runs {
                pos += gap + 1;
                set.insert(pos..pos + len);
                pos += len;
            }
            let claim = GroupRanges::from_pb(&set.to_pb_claim()).expect("a claim decodes");
            prop_assert!(claim.runs().len() <= MAX_BOUNDARIES / 2);
            prop_assert_eq!(claim.intersection(&set), claim.clone());
            if set.runs().len() <= MAX_BOUNDARIES / 2 {
                prop_assert_eq!(&claim, &set);
            } else {
                // The last run and the longest others are kept: none left
                // out is longer than the shortest other kept.
                prop_assert_eq!(claim.runs().last(), set.runs().last());
                let others = &claim.runs()[..claim.runs().len() - 1];
                let shortest = others.iter().map(|r| r.end - r.start).min().unwrap();
                let left = set.difference(&claim);
                prop_assert!(left.runs().iter().all(|r| r.end - r.start <= shortest));
            }
        }

        #[test]
        fn clipped_matches_btreeset(
            groups in proptest::collection::btree_set(0u64..300, 0..200),
            end in 0u64..320,
        ) {
            let want: BTreeSet<u64> = groups.iter().copied().filter(|g| *g < end).collect();
            prop_assert_eq!(set(&groups).clipped(end), set(&want));
        }

        #[test]
        fn any_wire_form_decodes_or_errors(d in proptest::collection::vec(any::<u64>(), 0..20)) {
            if let Ok(s) = GroupRanges::from_pb(&pb::GroupRanges { deltas: d }) {
                prop_assert_eq!(GroupRanges::from_pb(&s.to_pb()).unwrap(), s);
            }
        }
    }
}
