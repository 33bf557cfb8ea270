//! The downloader's side of a verified stream: a decoder fed with whatever
//! buffers the network hands out, that checks every parent pair and group
//! against the hash before it lets a byte of it out.
//!
//! Why not bao-tree's `DecodeResponseIter`: it wants a blocking `Read`, so
//! the stream had to cross to a blocking thread (a channel hand-over and a
//! thread wake-up per few packets), and every byte was copied once into its
//! buffer and once more into the write batch. This decoder has no I/O of its
//! own: the receiving task feeds it in place, each group is assembled
//! straight into the batch that will be written (the one copy it needs, since
//! a group arrives in ~1.4 KiB packets and BLAKE3 hashes a contiguous group
//! several times faster than packet-sized pieces), and only full batches
//! cross to the writer thread. What the stream contains and in which order
//! come from bao-tree's traversal, as in [`crate::encode`]; the tests decode
//! bao-tree's own encoder output, split anywhere, and refuse any flipped byte.

use bao_tree::io::sync::truncate_ranges;
use bao_tree::iter::{BaoChunk, PreOrderPartialChunkIterRef};
use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use shoal_proto::{GROUP_SIZE, GroupRanges};

use crate::encode::Verifier;
use crate::slot::AlignedBuf;
use crate::tree::groups_of_bytes;

/// Verified bytes ready to be written: one contiguous run of data and one
/// of outboard (pre-order parent pairs), and the groups the data completes.
/// The data is aligned in memory (and, being whole groups, on disk) so the
/// writer can hand it to the disk with `O_DIRECT`.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) data_start: u64,
    pub(crate) data: AlignedBuf,
    pub(crate) ob_start: u64,
    pub(crate) ob: Vec<u8>,
    pub(crate) groups: GroupRanges,
}

impl Batch {
    /// Nothing to write and nothing to mark (an empty blob's one group
    /// has no bytes, but is still a group to mark).
    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty() && self.ob.is_empty() && self.groups.is_empty()
    }
}

/// A group or parent pair that did not match its hash.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Mismatch {
    /// The first group the failed item covers.
    pub(crate) group: u64,
}

/// What is being assembled.
enum Cur {
    /// A parent pair: `have` of its 64 bytes are in `pair`.
    Parent {
        node: bao_tree::TreeNode,
        is_root: bool,
        left: bool,
        right: bool,
        pair: [u8; 64],
        have: usize,
    },
    /// A group of `size` bytes starting at chunk `start`, assembled at the
    /// end of the batch's data from `at` on.
    Leaf {
        start: ChunkNum,
        size: usize,
        is_root: bool,
        at: usize,
    },
}

/// Decodes one response stream (see the module docs).
pub(crate) struct Decoder<'a> {
    tree: BaoTree,
    items: PreOrderPartialChunkIterRef<'a>,
    verifier: Verifier,
    cur: Option<Cur>,
    finished: bool,
    batch: Batch,
    /// A batch is handed out once its data reaches this many bytes.
    batch_bytes: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder of the response for `ranges` (whole groups) of the blob
    /// `root` of `tree.size()` bytes.
    pub(crate) fn new(
        root: blake3::Hash,
        tree: BaoTree,
        ranges: &'a ChunkRanges,
        batch_bytes: usize,
    ) -> Self {
        let ranges = truncate_ranges(ranges, tree.size());
        Self {
            tree,
            items: tree.ranges_pre_order_chunks_iter_ref(ranges, 0),
            verifier: Verifier::new(root),
            cur: None,
            finished: false,
            batch: Batch::default(),
            batch_bytes,
        }
    }

    /// True when every item of the response has been verified.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// The first group not verified yet (for error reports).
    pub(crate) fn next_group(&self) -> Option<u64> {
        match &self.cur {
            Some(Cur::Leaf { start, .. }) => Some(start.to_bytes() / GROUP_SIZE),
            Some(Cur::Parent { node, .. }) => {
                Some(node.chunk_range().start.to_bytes() / GROUP_SIZE)
            }
            None => None,
        }
    }

    /// Feed the next bytes of the stream. Full batches go to `ready` as
    /// they fill. On a mismatch the bytes of the bad item are dropped and
    /// what was verified before it stays in the batch ([`Decoder::take`]).
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        mut ready: impl FnMut(Batch),
    ) -> Result<(), Mismatch> {
        loop {
            if self.cur.is_none() {
                let Some(item) = self.items.next() else {
                    self.finished = true;
                    return Ok(());
                };
                self.start(item, &mut ready);
            }
            let complete = match &mut self.cur {
                Some(Cur::Parent { pair, have, .. }) => {
                    let k = (64 - *have).min(input.len());
                    pair[*have..*have + k].copy_from_slice(&input[..k]);
                    *have += k;
                    input = &input[k..];
                    *have == 64
                }
                Some(Cur::Leaf { size, at, .. }) => {
                    let got = self.batch.data.len() - *at;
                    let k = (*size - got).min(input.len());
                    self.batch.data.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    got + k == *size
                }
                None => true,
            };
            if !complete {
                return Ok(());
            }
            self.complete(&mut ready)?;
        }
    }

    /// End the stream: take what is verified and not handed out yet. The
    /// bytes of a group still being assembled are dropped, never written.
    pub(crate) fn take(&mut self) -> Batch {
        if let Some(Cur::Leaf { at, .. }) = self.cur.take() {
            self.batch.data.truncate(at);
        }
        std::mem::take(&mut self.batch)
    }

    /// Hand out the batch (only between items: no group is half there).
    fn hand_out(&mut self, ready: &mut impl FnMut(Batch)) {
        if !self.batch.is_empty() {
            ready(std::mem::take(&mut self.batch));
        }
    }

    /// Begin assembling `item`, handing out the batch first when the item
    /// does not continue it.
    fn start(&mut self, item: BaoChunk<&bao_tree::ChunkRangesRef>, ready: &mut impl FnMut(Batch)) {
        match item {
            BaoChunk::Parent {
                node,
                is_root,
                left,
                right,
                ..
            } => {
                self.cur = Some(Cur::Parent {
                    node,
                    is_root,
                    left,
                    right,
                    pair: [0; 64],
                    have: 0,
                });
            }
            BaoChunk::Leaf {
                start_chunk,
                size,
                is_root,
                ..
            } => {
                let off = start_chunk.to_bytes();
                let b = &self.batch;
                if !b.data.is_empty() && b.data_start + b.data.len() as u64 != off {
                    self.hand_out(ready);
                }
                if self.batch.data.is_empty() {
                    self.batch.data_start = off;
                    self.batch.data.reserve(self.batch_bytes + size);
                }
                self.cur = Some(Cur::Leaf {
                    start: start_chunk,
                    size,
                    is_root,
                    at: self.batch.data.len(),
                });
            }
        }
    }

    /// Verify the item just assembled.
    fn complete(&mut self, ready: &mut impl FnMut(Batch)) -> Result<(), Mismatch> {
        let group = self.next_group().unwrap_or(0);
        match self.cur.take() {
            Some(Cur::Parent {
                node,
                is_root,
                left,
                right,
                pair,
                ..
            }) => {
                if !self.verifier.parent(&pair, is_root, left, right) {
                    return Err(Mismatch { group });
                }
                // Nodes past the end of a partial tree are not stored.
                if let Some(off) = self.tree.pre_order_offset(node) {
                    let off = off * 64;
                    let b = &self.batch;
                    if !b.ob.is_empty() && b.ob_start + b.ob.len() as u64 != off {
                        self.hand_out(ready);
                    }
                    if self.batch.ob.is_empty() {
                        self.batch.ob_start = off;
                    }
                    self.batch.ob.extend_from_slice(&pair);
                }
            }
            Some(Cur::Leaf {
                start,
                size,
                is_root,
                at,
            }) => {
                if !self
                    .verifier
                    .leaf(start, &self.batch.data[at..at + size], is_root)
                {
                    self.batch.data.truncate(at);
                    return Err(Mismatch { group });
                }
                let off = start.to_bytes();
                self.batch
                    .groups
                    .insert(groups_of_bytes(off, off + size as u64));
                if self.batch.data.len() >= self.batch_bytes {
                    self.hand_out(ready);
                }
            }
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::tests::{all_groups, groups, reference as encode};
    use crate::tree::{bao_tree, chunk_ranges, hash_bytes, tests::data};
    use proptest::prelude::*;

    const G: u64 = 16 << 10;

    /// Decode `stream` fed in pieces cut at `cuts`; the written image of
    /// the blob, the outboard bytes by offset, and the groups verified.
    fn decode(
        root: blake3::Hash,
        size: u64,
        ranges: &ChunkRanges,
        stream: &[u8],
        cuts: &[usize],
        batch_bytes: usize,
    ) -> (Vec<u8>, Vec<u8>, GroupRanges, Result<bool, Mismatch>) {
        let mut image = vec![0u8; size as usize];
        let mut ob = vec![0u8; stream.len()];
        let mut verified = GroupRanges::new();
        let mut apply = |b: Batch| {
            let s = b.data_start as usize;
            image[s..s + b.data.len()].copy_from_slice(&b.data);
            let o = b.ob_start as usize;
            if ob.len() < o + b.ob.len() {
                ob.resize(o + b.ob.len(), 0);
            }
            ob[o..o + b.ob.len()].copy_from_slice(&b.ob);
            verified = verified.union(&b.groups);
        };
        let mut d = Decoder::new(root, bao_tree(size), ranges, batch_bytes);
        let mut pos = 0;
        let mut res = Ok(());
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        points.push(stream.len());
        points.sort_unstable();
        for p in points {
            res = d.feed(&stream[pos..p], &mut apply);
            pos = p;
            if res.is_err() {
                break;
            }
        }
        let finished = d.is_finished();
        let rest = d.take();
        apply(rest);
        (image, ob, verified, res.map(|()| finished))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn decodes_bao_tree_streams_cut_anywhere(
            size in prop_oneof![0u64..70_000, 70_000u64..3_000_000],
            picks in proptest::collection::vec((any::<u64>(), any::<u64>()), 1..4),
            cuts in proptest::collection::vec(any::<usize>(), 0..40),
            seed in any::<u64>(),
            batch_kib in 1usize..2048,
        ) {
            let bytes = data(size as usize, seed);
            let (root, ob) = hash_bytes(&bytes);
            let wanted = groups(size, &picks);
            let ranges = chunk_ranges(&wanted);
            let stream = encode(&bytes, root, &ob, &ranges);
            let (image, got_ob, verified, res) =
                decode(root, size, &ranges, &stream, &cuts, batch_kib << 10);
            prop_assert_eq!(res, Ok(true));
            let mut all = GroupRanges::new();
            all.insert(groups_of_bytes(0, size));
            let expect = wanted.intersection(&all);
            prop_assert_eq!(&verified, &expect);
            for g in verified.iter() {
                let s = (g * G) as usize;
                let e = ((g + 1) * G).min(size) as usize;
                prop_assert_eq!(&image[s..e], &bytes[s..e]);
            }
            // Every stored parent pair is the outboard's.
            for (i, w) in got_ob.chunks(64).enumerate() {
                if w.iter().any(|&x| x != 0) {
                    prop_assert_eq!(w, &ob[i * 64..i * 64 + 64]);
                }
            }
        }

        /// One flipped bit anywhere: the stream is refused, and nothing
        /// handed out differs from the blob.
        #[test]
        fn refuses_any_flipped_bit(
            size in 1u64..600_000,
            seed in any::<u64>(),
            flip in any::<usize>(),
            bit in 0u8..8,
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let bytes = data(size as usize, seed);
            let (root, ob) = hash_bytes(&bytes);
            let ranges = chunk_ranges(&all_groups(size));
            let mut stream = encode(&bytes, root, &ob, &ranges);
            prop_assume!(!stream.is_empty());
            let at = flip % stream.len();
            stream[at] ^= 1 << bit;
            let (image, _, verified, res) = decode(root, size, &ranges, &stream, &cuts, 64 << 10);
            prop_assert!(res.is_err(), "flip at {} accepted", at);
            for g in verified.iter() {
                let s = (g * G) as usize;
                let e = ((g + 1) * G).min(size) as usize;
                prop_assert_eq!(&image[s..e], &bytes[s..e]);
            }
        }
    }

    #[test]
    fn a_short_stream_is_not_finished() {
        let size = 200_000u64;
        let bytes = data(size as usize, 3);
        let (root, ob) = hash_bytes(&bytes);
        let ranges = chunk_ranges(&all_groups(size));
        let stream = encode(&bytes, root, &ob, &ranges);
        // Cut inside the last group, and inside the first (nothing verified).
        for cut in [stream.len() - 1, 64 * 8 + 100] {
            let (image, _, verified, res) =
                decode(root, size, &ranges, &stream[..cut], &[], 1 << 20);
            assert_eq!(res, Ok(false));
            assert!(verified.count() < size.div_ceil(G));
            // The group being assembled when the stream ended is not handed
            // out: only verified groups reach the image.
            for g in 0..size.div_ceil(G) {
                let s = (g * G) as usize;
                let e = ((g + 1) * G).min(size) as usize;
                if verified.contains(g) {
                    assert_eq!(&image[s..e], &bytes[s..e]);
                } else {
                    assert!(
                        image[s..e].iter().all(|&b| b == 0),
                        "unverified group {g} written"
                    );
                }
            }
        }
    }

    #[test]
    fn the_empty_blob_needs_no_bytes() {
        let (root, ob) = hash_bytes(&[]);
        let ranges = chunk_ranges(&groups(0, &[(0, 0)]));
        let stream = encode(&[], root, &ob, &ranges);
        assert!(stream.is_empty());
        let (_, _, _, res) = decode(root, 0, &ranges, &stream, &[], 1 << 20);
        assert_eq!(res, Ok(true));
    }
}
