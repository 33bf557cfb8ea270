//! The seeder's side of a verified stream: the bao encoding of some groups
//! of a blob, built in pieces of about [`PIECE`] bytes, each checked whole
//! against the blob's hash before it is handed out.
//!
//! Why not bao-tree's `encode_ranges_validated`: it reads one group and one
//! parent pair per system call, copies every byte once more into an
//! `io::Write`, and grows its output a little at a time. Here a piece is
//! sized before it is filled: parents come from a cached window of the
//! outboard, the data of consecutive groups is read with one `preadv` straight
//! into its place in the piece, and the piece is then checked in place. The
//! order of the stream, and what it contains, still come from bao-tree's own
//! traversal (`ranges_pre_order_chunks_iter_ref`), and the tests check that
//! the bytes are the same as bao-tree's encoder gives for any size and any
//! groups. [`crate::decode`] is the other side.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;

use bao_tree::io::EncodeError;
use bao_tree::iter::BaoChunk;
use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use bytes::Bytes;
use positioned_io::ReadAt;

use crate::slot::Slot;

/// About how many bytes of the stream a piece holds.
pub(crate) const PIECE: usize = 1 << 20;

/// Most buffers one `preadv` fills (Linux allows 1024).
const MAX_IOV: usize = 256;

/// How much of the outboard is read at once: parents of a subtree are
/// stored together in pre-order, so a window serves many of them.
const OB_WINDOW: usize = 64 << 10;

/// One item of a piece, at byte `at` of it.
enum Item {
    Parent {
        node: bao_tree::TreeNode,
        is_root: bool,
        left: bool,
        right: bool,
        at: usize,
    },
    Leaf {
        start: ChunkNum,
        size: usize,
        is_root: bool,
        at: usize,
    },
}

/// Encode `ranges` (chunk ranges made of whole groups) of the blob `root`,
/// whose bytes are in `data` and whose pre-order outboard is in `outboard`.
/// Each piece goes to `emit` only after every group and parent pair in it
/// matched the hash; `emit` returns false to stop (the reader went away).
pub(crate) fn encode_pieces(
    data: &Slot,
    outboard: &Slot,
    root: blake3::Hash,
    tree: BaoTree,
    ranges: &ChunkRanges,
    mut emit: impl FnMut(Bytes) -> bool,
) -> Result<(), EncodeError> {
    let ranges = bao_tree::io::sync::truncate_ranges(ranges, tree.size());
    let mut verifier = Verifier::new(root);
    let mut ob = ObWindow::new(outboard);
    let mut plan = Vec::new();
    let mut len = 0;
    for chunk in tree.ranges_pre_order_chunks_iter_ref(ranges, 0) {
        match chunk {
            BaoChunk::Parent {
                node,
                is_root,
                left,
                right,
                ..
            } => {
                plan.push(Item::Parent {
                    node,
                    is_root,
                    left,
                    right,
                    at: len,
                });
                len += 64;
            }
            BaoChunk::Leaf {
                start_chunk,
                size,
                is_root,
                ..
            } => {
                plan.push(Item::Leaf {
                    start: start_chunk,
                    size,
                    is_root,
                    at: len,
                });
                len += size;
            }
        }
        if len >= PIECE {
            let piece = build(data, &mut ob, tree, &plan, len, &mut verifier)?;
            if !emit(piece) {
                return Ok(());
            }
            plan.clear();
            len = 0;
        }
    }
    if !plan.is_empty() {
        let piece = build(data, &mut ob, tree, &plan, len, &mut verifier)?;
        emit(piece);
    }
    Ok(())
}

/// Fill one piece, check it against `stack`, and freeze it.
fn build(
    data: &Slot,
    ob: &mut ObWindow<'_>,
    tree: BaoTree,
    plan: &[Item],
    len: usize,
    verifier: &mut Verifier,
) -> Result<Bytes, EncodeError> {
    let mut buf = vec![0u8; len];
    fill(data, ob, tree, plan, &mut buf)?;
    check(plan, &buf, verifier)?;
    Ok(Bytes::from(buf))
}

/// Put each item's bytes at its place in `buf`.
fn fill(
    data: &Slot,
    ob: &mut ObWindow<'_>,
    tree: BaoTree,
    plan: &[Item],
    buf: &mut [u8],
) -> Result<(), EncodeError> {
    let mut rest = buf;
    let mut taken = 0;
    // Consecutive groups of the file waiting to be read together.
    let mut run: Vec<IoSliceMut<'_>> = Vec::new();
    let mut run_start = 0u64;
    let mut run_end = 0u64;
    for item in plan {
        match *item {
            Item::Parent { node, at, .. } => {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - taken);
                let (pair, tail) = tail.split_at_mut(64);
                rest = tail;
                taken = at + 64;
                // A traversal of stored ranges only yields stored parents;
                // if not, it is a missing record, not corrupt data (which
                // would mark the blob corrupt).
                let off = tree.pre_order_offset(node).ok_or_else(|| {
                    EncodeError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the outboard has no hash pair for node {node:?}"),
                    ))
                })?;
                ob.read(off * 64, pair).map_err(EncodeError::Io)?;
            }
            Item::Leaf {
                start, size, at, ..
            } => {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - taken);
                let (leaf, tail) = tail.split_at_mut(size);
                rest = tail;
                taken = at + size;
                if size == 0 {
                    continue;
                }
                let off = start.to_bytes();
                if !run.is_empty() && (off != run_end || run.len() == MAX_IOV) {
                    read_run(data, run_start, &mut run)?;
                }
                if run.is_empty() {
                    run_start = off;
                }
                run_end = off + size as u64;
                run.push(IoSliceMut::new(leaf));
            }
        }
    }
    if !run.is_empty() {
        read_run(data, run_start, &mut run)?;
    }
    Ok(())
}

/// Read the file bytes at `start` into `bufs`, in order, and empty `bufs`.
fn read_run(data: &Slot, start: u64, bufs: &mut Vec<IoSliceMut<'_>>) -> Result<(), EncodeError> {
    match data {
        Slot::File(f) => preadv_exact(f, start, bufs)?,
        other => {
            let mut pos = start;
            for b in bufs.iter_mut() {
                other.read_exact_at(pos, b)?;
                pos += b.len() as u64;
            }
        }
    }
    bufs.clear();
    Ok(())
}

/// `preadv` until every buffer is full; a file that ends first is an error
/// (it changed since it was hashed). std has no positional vectored read on
/// stable Rust, hence the system call by hand.
fn preadv_exact(f: &File, mut pos: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
    let mut bufs = bufs;
    while !bufs.is_empty() {
        let off = libc::off_t::try_from(pos).map_err(io::Error::other)?;
        let count = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: IoSliceMut is ABI-compatible with iovec, and each one
        // points at a live, exclusively borrowed buffer.
        let n = unsafe {
            libc::preadv(
                f.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                count,
                off,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file is shorter than when it was hashed",
            ));
        }
        let n = n as usize;
        pos += n as u64;
        IoSliceMut::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Check every item of a filled piece against the hashes the stream so far
/// has vouched for.
fn check(plan: &[Item], buf: &[u8], v: &mut Verifier) -> Result<(), EncodeError> {
    for item in plan {
        match *item {
            Item::Parent {
                node,
                is_root,
                left,
                right,
                at,
            } => {
                if !v.parent(&buf[at..at + 64], is_root, left, right) {
                    return Err(EncodeError::ParentHashMismatch(node));
                }
            }
            Item::Leaf {
                start,
                size,
                is_root,
                at,
            } => {
                if !v.leaf(start, &buf[at..at + size], is_root) {
                    return Err(EncodeError::LeafHashMismatch(start));
                }
            }
        }
    }
    Ok(())
}

/// The checks of a verified stream, shared by both ends: the hashes vouched
/// for and not used yet, the next item's on top (the root first). Items must
/// come in bao-tree's pre-order.
pub(crate) struct Verifier {
    stack: Vec<blake3::Hash>,
}

impl Verifier {
    pub(crate) fn new(root: blake3::Hash) -> Self {
        Self { stack: vec![root] }
    }

    /// Check a parent pair (64 bytes); on success, vouch for the children
    /// the stream will still send.
    pub(crate) fn parent(&mut self, pair: &[u8], is_root: bool, left: bool, right: bool) -> bool {
        let (Ok(l), Ok(r)) = (
            ChainingValue::try_from(&pair[..32]),
            ChainingValue::try_from(&pair[32..64]),
        ) else {
            return false;
        };
        let actual = if is_root {
            merge_subtrees_root(&l, &r, Mode::Hash)
        } else {
            blake3::Hash::from(merge_subtrees_non_root(&l, &r, Mode::Hash))
        };
        if self.stack.pop() != Some(actual) {
            return false;
        }
        if right {
            self.stack.push(blake3::Hash::from(r));
        }
        if left {
            self.stack.push(blake3::Hash::from(l));
        }
        true
    }

    /// Check one group starting at chunk `start` (the whole blob when
    /// `is_root`).
    pub(crate) fn leaf(&mut self, start: ChunkNum, data: &[u8], is_root: bool) -> bool {
        let actual = if is_root {
            blake3::hash(data)
        } else {
            let mut h = blake3::Hasher::new();
            h.set_input_offset(start.to_bytes());
            h.update(data);
            blake3::Hash::from(h.finalize_non_root())
        };
        self.stack.pop() == Some(actual)
    }
}

/// A window of the outboard read ahead.
struct ObWindow<'a> {
    slot: &'a Slot,
    start: u64,
    buf: Vec<u8>,
}

impl<'a> ObWindow<'a> {
    fn new(slot: &'a Slot) -> Self {
        Self {
            slot,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// Read the 64 bytes at `pos`.
    fn read(&mut self, pos: u64, out: &mut [u8]) -> io::Result<()> {
        let end = pos + out.len() as u64;
        if pos < self.start || end > self.start + self.buf.len() as u64 {
            self.buf.resize(OB_WINDOW, 0);
            let mut got = 0;
            while got < self.buf.len() {
                let n = self.slot.read_at(pos + got as u64, &mut self.buf[got..])?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            self.buf.truncate(got);
            self.start = pos;
            if got < out.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the outboard is shorter than the blob needs",
                ));
            }
        }
        let at = (pos - self.start) as usize;
        out.copy_from_slice(&self.buf[at..at + out.len()]);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::tree::{bao_tree, chunk_ranges, hash_bytes, tests::data};
    use bao_tree::io::outboard::PreOrderOutboard;
    use proptest::prelude::*;
    use shoal_proto::GroupRanges;

    const G: u64 = 16 << 10;

    /// What bao-tree's own encoder gives.
    pub(crate) fn reference(
        bytes: &[u8],
        root: blake3::Hash,
        ob: &[u8],
        ranges: &ChunkRanges,
    ) -> Vec<u8> {
        let tree = bao_tree(bytes.len() as u64);
        let outboard = PreOrderOutboard {
            root,
            tree,
            data: ob,
        };
        let mut out = Vec::new();
        bao_tree::io::sync::encode_ranges_validated(bytes, outboard, ranges, &mut out)
            .expect("reference encode");
        out
    }

    fn ours(
        data: &Slot,
        ob: &Slot,
        root: blake3::Hash,
        size: u64,
        ranges: &ChunkRanges,
    ) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        let mut pieces = 0;
        encode_pieces(data, ob, root, bao_tree(size), ranges, |b| {
            assert!(
                b.len() < PIECE + (16 << 10) + 64,
                "piece of {} bytes",
                b.len()
            );
            out.extend_from_slice(&b);
            pieces += 1;
            true
        })?;
        Ok(out)
    }

    fn file_slot(bytes: &[u8]) -> (tempfile::NamedTempFile, Slot) {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), bytes).expect("write");
        let file = File::open(f.path()).expect("open");
        (f, Slot::File(Arc::new(file)))
    }

    /// Groups of a blob of `size` bytes: one run per pick, wrapped into range.
    pub(crate) fn groups(size: u64, picks: &[(u64, u64)]) -> GroupRanges {
        let n = size.div_ceil(G).max(1);
        let mut g = GroupRanges::new();
        for &(a, b) in picks {
            let (a, b) = (a % n, b % n);
            let (a, b) = (a.min(b), a.max(b) + 1);
            g.insert(a..b);
        }
        g
    }

    pub(crate) fn all_groups(size: u64) -> GroupRanges {
        let mut g = GroupRanges::new();
        g.insert(0..size.div_ceil(G).max(1));
        g
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn same_bytes_as_bao_tree(
            size in prop_oneof![0u64..70_000, 70_000u64..3_000_000],
            picks in proptest::collection::vec((any::<u64>(), any::<u64>()), 1..5),
            seed in any::<u64>(),
        ) {
            let bytes = data(size as usize, seed);
            let (root, ob) = hash_bytes(&bytes);
            let ranges = chunk_ranges(&groups(size, &picks));
            let want = reference(&bytes, root, &ob, &ranges);
            let (_f, file) = file_slot(&bytes);
            let obs = Slot::Bytes(Bytes::from(ob.clone()));
            prop_assert_eq!(&ours(&file, &obs, root, size, &ranges).expect("encode file"), &want);
            let mem = Slot::Bytes(Bytes::from(bytes.clone()));
            prop_assert_eq!(&ours(&mem, &obs, root, size, &ranges).expect("encode memory"), &want);
        }
    }

    #[test]
    fn whole_blob_in_pieces() {
        let size = 5 * PIECE as u64 + 12_345;
        let bytes = data(size as usize, 7);
        let (root, ob) = hash_bytes(&bytes);
        let all = chunk_ranges(&all_groups(size));
        let (_f, file) = file_slot(&bytes);
        let obs = Slot::Bytes(Bytes::from(ob.clone()));
        let mut sizes = Vec::new();
        encode_pieces(&file, &obs, root, bao_tree(size), &all, |b| {
            sizes.push(b.len());
            true
        })
        .expect("encode");
        assert!(sizes.len() >= 4, "{sizes:?}");
        assert!(
            sizes[..sizes.len() - 1].iter().all(|&s| s >= PIECE),
            "{sizes:?}"
        );
        let mut got = Vec::new();
        encode_pieces(&file, &obs, root, bao_tree(size), &all, |b| {
            got.extend_from_slice(&b);
            true
        })
        .expect("encode");
        assert_eq!(got, reference(&bytes, root, &ob, &all));
    }

    #[test]
    fn stops_when_the_reader_goes_away() {
        let size = 4 * PIECE as u64;
        let bytes = data(size as usize, 8);
        let (root, ob) = hash_bytes(&bytes);
        let all = chunk_ranges(&all_groups(size));
        let (_f, file) = file_slot(&bytes);
        let mut calls = 0;
        encode_pieces(
            &file,
            &Slot::Bytes(Bytes::from(ob)),
            root,
            bao_tree(size),
            &all,
            |_| {
                calls += 1;
                false
            },
        )
        .expect("encode");
        assert_eq!(calls, 1);
    }

    /// A flipped byte anywhere in the data or the outboard is refused, and
    /// the piece holding it is never handed out.
    #[test]
    fn corruption_is_refused_before_it_leaves() {
        let size = 3 * PIECE as u64 + 999;
        let bytes = data(size as usize, 9);
        let (root, ob) = hash_bytes(&bytes);
        let all = chunk_ranges(&all_groups(size));
        let good = reference(&bytes, root, &ob, &all);
        for at in [0, PIECE + 17, size as usize - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            let (_f, file) = file_slot(&bad);
            let mut sent = Vec::new();
            let err = encode_pieces(
                &file,
                &Slot::Bytes(Bytes::from(ob.clone())),
                root,
                bao_tree(size),
                &all,
                |b| {
                    sent.extend_from_slice(&b);
                    true
                },
            )
            .expect_err(&format!("corrupt data at {at} must be refused"));
            assert!(matches!(err, EncodeError::LeafHashMismatch(_)), "{err:?}");
            // What went out is a clean prefix of the good stream.
            assert!(
                sent.len() < good.len() && good.starts_with(&sent),
                "corruption at {at} sent"
            );
        }
        for at in [0, 64 * 100 + 3, ob.len() - 1] {
            let mut bad = ob.clone();
            bad[at] ^= 1;
            let (_f, file) = file_slot(&bytes);
            let err = encode_pieces(
                &file,
                &Slot::Bytes(Bytes::from(bad)),
                root,
                bao_tree(size),
                &all,
                |_| true,
            )
            .expect_err("corrupt outboard must be refused");
            assert!(
                matches!(
                    err,
                    EncodeError::ParentHashMismatch(_) | EncodeError::LeafHashMismatch(_)
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn a_truncated_file_is_an_error() {
        let size = 2 * PIECE as u64;
        let bytes = data(size as usize, 10);
        let (root, ob) = hash_bytes(&bytes);
        let all = chunk_ranges(&all_groups(size));
        let (_f, file) = file_slot(&bytes[..PIECE + 100]);
        let err = encode_pieces(
            &file,
            &Slot::Bytes(Bytes::from(ob)),
            root,
            bao_tree(size),
            &all,
            |_| true,
        )
        .expect_err("short file");
        assert!(
            matches!(&err, EncodeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{err:?}"
        );
    }
}
