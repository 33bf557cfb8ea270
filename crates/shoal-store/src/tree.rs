//! Parallel BLAKE3 hashing in 16 KiB groups, and the pre-order outboard
//! (bao-tree's layout, block size 16 KiB) built from the groups' chaining
//! values.
//!
//! Runs of groups are hashed in parallel (rayon, or the mapped path's own
//! threads), each run wide, every chunk and parent of it in SIMD passes
//! ([`wide`]); the tree above the groups is then built level by level. The
//! result is bit-for-bit the outboard that
//! `bao_tree::io::outboard::PreOrderMemOutboard::create` computes, which a
//! test checks.

use std::fs::File;
use std::io::Read;

use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use rayon::prelude::*;
use shoal_proto::{GROUP_CHUNK_LOG, GROUP_SIZE, GroupRanges};

mod copy;
#[cfg(test)]
mod import_tests;
mod mapped;
mod wide;

#[cfg(test)]
pub(crate) use copy::copy_and_hash_with;
pub(crate) use copy::{CopyError, copy_and_hash};
pub(crate) use wide::hash_small_many;

/// Bytes in one group, as a `usize`.
pub(crate) const GROUP: usize = GROUP_SIZE as usize;

/// Bytes hashed per batch when streaming a file (a multiple of [`GROUP`]).
pub(crate) const BATCH: usize = 8 << 20;

/// The bao-tree block size for 16 KiB groups.
pub(crate) const fn block_size() -> BlockSize {
    BlockSize::from_chunk_log(GROUP_CHUNK_LOG)
}

/// The bao tree of a blob of `size` bytes.
pub(crate) fn bao_tree(size: u64) -> BaoTree {
    BaoTree::new(size, block_size())
}

/// Chunk ranges (1 KiB units) covering the groups of `groups`.
pub(crate) fn chunk_ranges(groups: &GroupRanges) -> ChunkRanges {
    let shift = GROUP_CHUNK_LOG;
    let mut out = ChunkRanges::empty();
    for r in groups.runs() {
        let start = r.start.saturating_mul(1 << shift);
        let end = r.end.saturating_mul(1 << shift);
        out |= ChunkRanges::from(ChunkNum(start)..ChunkNum(end));
    }
    out
}

/// Groups touched by the byte range `start..end` (at least the group of
/// `start`).
pub(crate) fn groups_of_bytes(start: u64, end: u64) -> std::ops::Range<u64> {
    let first = start / GROUP_SIZE;
    let last = end.div_ceil(GROUP_SIZE).max(first + 1);
    first..last
}

/// The chaining value of group `index` (not the root).
fn group_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * GROUP_SIZE);
    h.update(data);
    h.finalize_non_root()
}

/// Buffers up to this long are hashed on the calling thread; longer ones
/// in pieces of this length on every core.
const PAR_HASH_MIN: usize = 64 * GROUP;

/// Hashes a blob fed in order, in batches that are multiples of [`GROUP`]
/// (only the last may be shorter).
#[derive(Default)]
pub(crate) struct TreeHasher {
    cvs: Vec<ChainingValue>,
    len: u64,
    first: Vec<u8>,
}

impl TreeHasher {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Bytes hashed so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Hash the next `buf`; every call but the last must be a whole number
    /// of groups.
    pub(crate) fn update(&mut self, buf: &[u8]) {
        debug_assert!(self.len.is_multiple_of(GROUP_SIZE));
        if self.len == 0 {
            self.first = buf[..buf.len().min(GROUP)].to_vec();
        }
        let base = self.len / GROUP_SIZE;
        let start = self.cvs.len();
        self.cvs.resize(start + buf.len().div_ceil(GROUP), [0; 32]);
        let out = &mut self.cvs[start..];
        if buf.len() <= PAR_HASH_MIN {
            wide::group_cvs(buf, base, out);
        } else {
            let per = PAR_HASH_MIN / GROUP;
            buf.par_chunks(PAR_HASH_MIN)
                .zip(out.par_chunks_mut(per))
                .enumerate()
                .for_each(|(i, (b, o))| wide::group_cvs(b, base + (i * per) as u64, o));
        }
        self.len += buf.len() as u64;
    }

    /// The root hash and the tree, whose outboard is empty for one group.
    pub(crate) fn finish(self) -> (blake3::Hash, Outboard) {
        if self.len <= GROUP_SIZE {
            return (blake3::hash(&self.first), Outboard::none());
        }
        build_tree(vec![self.cvs])
    }
}

/// Read `r` to its end in [`BATCH`]-sized pieces, hashing each and handing
/// it to `sink` (for a copy) before reading the next.
pub(crate) fn hash_reader(
    mut r: impl Read + Send,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<(blake3::Hash, u64, Outboard)> {
    use std::sync::mpsc::sync_channel;
    // Read the next batch on a thread of its own while this one is hashed:
    // a read is a copy out of the page cache on one core, and with the
    // hashing waiting for it the other cores sat idle (0.76x of b3sum).
    let (full_tx, full_rx) = sync_channel::<std::io::Result<(Vec<u8>, usize)>>(1);
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(2);
    for _ in 0..2 {
        let _ = empty_tx.send(vec![0u8; BATCH]);
    }
    std::thread::scope(|s| {
        s.spawn(move || {
            while let Ok(mut buf) = empty_rx.recv() {
                let res = fill(&mut r, &mut buf);
                let last = res.as_ref().map_or(true, |n| *n < buf.len());
                if full_tx.send(res.map(|n| (buf, n))).is_err() || last {
                    break;
                }
            }
        });
        let mut hasher = TreeHasher::new();
        while let Ok(next) = full_rx.recv() {
            let (buf, n) = next?;
            hasher.update(&buf[..n]);
            sink(&buf[..n])?;
            if n < buf.len() {
                break;
            }
            let _ = empty_tx.send(buf);
        }
        let len = hasher.len();
        let (hash, ob) = hasher.finish();
        Ok((hash, len, ob))
    })
}

/// Files at least this large are hashed through a mapping (see
/// [`mapped`]); smaller ones are read.
pub(crate) const MAP_MIN: u64 = 16 << 20;

/// What hashing a file found.
pub(crate) enum FileHash {
    /// Root hash, length hashed and the tree.
    Hashed(blake3::Hash, u64, Outboard),
    /// The file shrank while it was hashed.
    Shrank,
}

/// Hash `f`, expected to hold `size` bytes, from its start: through a
/// mapping when it is large and that is safe, else by reading it.
pub(crate) fn hash_file(f: &File, size: u64) -> std::io::Result<FileHash> {
    if size >= MAP_MIN
        && let Some(m) = mapped::hash_mapped(f, size)
    {
        return Ok(match m {
            mapped::Mapped::Hashed(h, len, ob) => FileHash::Hashed(h, len, ob),
            mapped::Mapped::Shrank => FileHash::Shrank,
        });
    }
    let (h, len, ob) = if size < BATCH as u64 {
        // Small: one read into a buffer of its size, no read-ahead thread
        // and no 16 MiB of zeroed buffers (which cost 200 us a file when
        // importing thousands of small ones). One byte more is asked for,
        // so that a file that grew shows in the length.
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0) + 1);
        f.take(size + 1).read_to_end(&mut buf)?;
        let (h, ob) = hash_tree(&buf);
        (h, buf.len() as u64, ob)
    } else {
        hash_reader(f, |_| Ok(()))?
    };
    #[cfg(test)]
    hooks::run(hooks::At::Hashed, f);
    Ok(FileHash::Hashed(h, len, ob))
}

#[cfg(test)]
pub(crate) mod hooks {
    //! Test hooks: run a closure at a given point of the import of a given
    //! file (by inode), to make races deterministic.
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;

    /// Where a hook runs.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(crate) enum At {
        /// The file was just mapped, before anything is hashed.
        Mapped,
        /// The file (or its copy) was hashed, before its size and mtime are
        /// checked again.
        Hashed,
        /// `--copy`: the first piece was copied.
        Piece,
    }

    thread_local! {
        /// Set: this thread maps nothing (tests of the read fallbacks).
        pub(crate) static NO_MAP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    type Hook = Box<dyn FnOnce() + Send>;
    static HOOKS: Mutex<Vec<(At, u64, Hook)>> = Mutex::new(Vec::new());

    /// Run `f` once, at `at`, during the import of the file with inode `ino`.
    pub(crate) fn on(at: At, ino: u64, f: impl FnOnce() + Send + 'static) {
        HOOKS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((at, ino, Box::new(f)));
    }

    /// Remove the hooks of inode `ino` that have not run.
    pub(crate) fn forget(ino: u64) {
        HOOKS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, n, _)| *n != ino);
    }

    pub(crate) fn run(at: At, f: &File) {
        let Ok(ino) = f.metadata().map(|m| m.ino()) else {
            return;
        };
        let hook = {
            let mut v = HOOKS.lock().unwrap_or_else(|e| e.into_inner());
            v.iter()
                .position(|(a, n, _)| *a == at && *n == ino)
                .map(|i| v.swap_remove(i).2)
        };
        if let Some(h) = hook {
            h();
        }
    }
}

/// Read until `buf` is full or the reader ends; returns the bytes read.
pub(crate) fn fill(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Hash and pre-order outboard of an in-memory blob.
#[cfg(test)]
pub(crate) fn hash_bytes(data: &[u8]) -> (blake3::Hash, Vec<u8>) {
    let (hash, tree) = hash_tree(data);
    (hash, tree.to_vec())
}

/// Hash and tree of an in-memory blob.
pub(crate) fn hash_tree(data: &[u8]) -> (blake3::Hash, Outboard) {
    let mut h = TreeHasher::new();
    h.update(data);
    h.finish()
}

/// Levels of subtrees above `groups` groups that [`build_tree`] builds, at
/// most `max`: level `k` holds subtrees of `2^k` groups, and one is built
/// while the level below has more than two.
fn inner_levels(groups: usize, max: usize) -> usize {
    (1..=max)
        .take_while(|k| groups.div_ceil(1 << (k - 1)) > 2)
        .count()
}

/// Levels at least this long are merged on every core.
const PAR_MERGE_MIN: usize = 1 << 14;

/// The tree over at least two groups, from the levels already built (the
/// groups' chaining values first; each level pairs the one below, the last
/// of an odd count promoted unchanged): the root hash, and every level.
fn build_tree(levels: Vec<Vec<ChainingValue>>) -> (blake3::Hash, Outboard) {
    build_tree_par(levels, PAR_MERGE_MIN)
}

/// [`build_tree`], merging levels of at least `par_min` on every core.
fn build_tree_par(mut levels: Vec<Vec<ChainingValue>>, par_min: usize) -> (blake3::Hash, Outboard) {
    while let Some(prev) = levels.last().filter(|l| l.len() > 2) {
        // A short level is merged on this thread: a 1 GiB file mapped has
        // 1,024 chunks left here, ~0.1 ms of merging, and in a fresh
        // `shoal add` process rayon's pool would first have to start.
        let mut next = vec![[0; 32]; prev.len().div_ceil(2)];
        if prev.len() >= par_min {
            let per = (par_min / 4).max(1);
            prev.par_chunks(2 * per)
                .zip(next.par_chunks_mut(per))
                .for_each(|(b, o)| wide::merge_level(b, o));
        } else {
            wide::merge_level(prev, &mut next);
        }
        levels.push(next);
    }
    let root = match levels.last().map(Vec::as_slice) {
        Some([l, r]) => hazmat::merge_subtrees_root(l, r, Mode::Hash),
        _ => blake3::hash(b""),
    };
    (root, Outboard { levels })
}

/// A blob's hash tree: every level of chaining values above its groups,
/// from which its pre-order outboard (64 bytes per pair of children) is
/// written out.
///
/// The outboard is streamed to its file rather than built whole in memory
/// first: for a 1 GiB file that was a 4 MiB buffer whose page faults, and
/// its copy into the page cache, added ~2 ms to the end of `shoal add`,
/// when only one core is working (and it doubled the memory an import of
/// a huge file needs).
pub(crate) struct Outboard {
    /// Empty for a blob of one group (no outboard).
    levels: Vec<Vec<ChainingValue>>,
}

impl std::fmt::Debug for Outboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outboard({} bytes)", self.len())
    }
}

/// Bytes gathered before each write of a streamed outboard.
const EMIT_BUF: usize = 256 << 10;

impl Outboard {
    /// The tree of a blob of at most one group: no outboard.
    pub(crate) fn none() -> Self {
        Outboard { levels: Vec::new() }
    }

    /// Length of the outboard in bytes.
    pub(crate) fn len(&self) -> u64 {
        let groups = self.levels.first().map_or(0, Vec::len) as u64;
        groups.saturating_sub(1) * 64
    }

    /// Whether there is no outboard (one group or none).
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The outboard, whole, in memory.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(self.len()).unwrap_or(0));
        self.emit(&mut |l, r| {
            out.extend_from_slice(l);
            out.extend_from_slice(r);
        });
        out
    }

    /// Write the outboard to `w` in pieces of [`EMIT_BUF`] bytes.
    pub(crate) fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(EMIT_BUF);
        let mut res = Ok(());
        self.emit(&mut |l, r| {
            if res.is_err() {
                return;
            }
            buf.extend_from_slice(l);
            buf.extend_from_slice(r);
            if buf.len() >= EMIT_BUF {
                res = w.write_all(&buf);
                buf.clear();
            }
        });
        res?;
        w.write_all(&buf)
    }

    /// Hand every pair of children to `out`, in pre-order.
    fn emit(&self, out: &mut dyn FnMut(&ChainingValue, &ChainingValue)) {
        if !self.is_empty() {
            emit(&self.levels, self.levels.len(), 0, out);
        }
    }
}

/// Hand `out`, in pre-order, the children of node `index` at `level`
/// (which are in `levels[level - 1]`) and the pairs below them.
fn emit(
    levels: &[Vec<ChainingValue>],
    level: usize,
    index: usize,
    out: &mut dyn FnMut(&ChainingValue, &ChainingValue),
) {
    let Some(children) = level.checked_sub(1).and_then(|l| levels.get(l)) else {
        return;
    };
    let (l, r) = (2 * index, 2 * index + 1);
    match (children.get(l), children.get(r)) {
        (Some(left), Some(right)) => {
            out(left, right);
            emit(levels, level - 1, l, out);
            emit(levels, level - 1, r, out);
        }
        // No right sibling: this node is its left child, promoted.
        (Some(_), None) => emit(levels, level - 1, l, out),
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bao_tree::io::outboard::PreOrderMemOutboard;

    pub(crate) fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn levels_merged_on_one_thread_or_all_cores_give_one_outboard() {
        let cvs: Vec<ChainingValue> = (0..40_001u32)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect();
        let one = build_tree_par(vec![cvs.clone()], usize::MAX);
        let one_ob = one.1.to_vec();
        assert_eq!(one_ob.len(), 40_000 * 64);
        // Pieces of one pair per task, and of three pairs (levels of odd
        // lengths split into pieces that end mid-level).
        for par_min in [2, 12] {
            let all = build_tree_par(vec![cvs.clone()], par_min);
            assert_eq!(one.0, all.0, "par_min {par_min}");
            assert!(
                one_ob == all.1.to_vec(),
                "the outboards differ, par_min {par_min}"
            );
        }
    }

    /// The outboard as [`Outboard::write_to`] streams it.
    pub(crate) fn written(ob: &Outboard) -> Vec<u8> {
        let mut w = Vec::new();
        ob.write_to(&mut w).unwrap();
        w
    }

    #[test]
    fn streamed_outboard_equals_the_one_in_memory() {
        // 40,001 groups: a 2.5 MiB outboard, written in several pieces.
        for n in [2usize, 3, 4096, 4097, 40_001] {
            let cvs: Vec<ChainingValue> = (0..n as u32)
                .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
                .collect();
            let (_, ob) = build_tree(vec![cvs]);
            let mem = ob.to_vec();
            assert_eq!(mem.len() as u64, ob.len());
            assert_eq!(mem.len(), (n - 1) * 64);
            assert!(
                written(&ob) == mem,
                "{n} groups: the streamed outboard differs"
            );
        }
        assert!(written(&Outboard::none()).is_empty());
    }

    #[test]
    fn a_failed_write_of_the_outboard_is_reported_and_ends_it() {
        /// Fails its `fail`-th write only; counts the calls.
        struct Flaky {
            fail: usize,
            calls: usize,
            written: usize,
        }
        impl std::io::Write for Flaky {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.calls += 1;
                if self.calls == self.fail {
                    return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
                }
                self.written += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        // 20,000 groups: 1.2 MiB of outboard, in five writes.
        let cvs: Vec<ChainingValue> = (0..20_000u32)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect();
        let (_, ob) = build_tree(vec![cvs]);
        let pieces = (ob.len() as usize).div_ceil(EMIT_BUF);
        assert_eq!(pieces, 5);
        for fail in 1..=pieces {
            let mut w = Flaky {
                fail,
                calls: 0,
                written: 0,
            };
            let err = ob.write_to(&mut w).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "write {fail}");
            assert_eq!(
                w.calls, fail,
                "nothing is written after the failed write {fail}"
            );
            assert_eq!(w.written, (fail - 1) * EMIT_BUF);
        }
        let mut w = Flaky {
            fail: 0,
            calls: 0,
            written: 0,
        };
        ob.write_to(&mut w).unwrap();
        assert_eq!((w.calls, w.written as u64), (pieces, ob.len()));
    }

    #[test]
    fn outboard_equals_bao_tree() {
        let sizes = [
            0,
            1,
            1024,
            GROUP - 1,
            GROUP,
            GROUP + 1,
            2 * GROUP,
            3 * GROUP + 5,
            5 * GROUP,
            7 * GROUP - 1,
            64 * GROUP - 1,
            64 * GROUP,
            64 * GROUP + 1,
            (1 << 20) + 7,
            128 * GROUP,
            5_000_000,
        ];
        for size in sizes {
            let d = data(size, size as u64);
            let (hash, ob) = hash_bytes(&d);
            assert_eq!(hash, blake3::hash(&d), "size {size}");
            let expected = PreOrderMemOutboard::create(&d, block_size());
            assert_eq!(expected.root, hash, "size {size}");
            assert_eq!(ob, expected.data, "outboard of size {size}");
            assert_eq!(ob.len() as u64, bao_tree(size as u64).outboard_size());
        }
    }

    #[test]
    fn streaming_in_batches_matches() {
        let d = data(3 * BATCH + 12345, 7);
        let (h, len, ob) = hash_reader(&d[..], |_| Ok(())).unwrap();
        assert_eq!(len, d.len() as u64);
        assert_eq!(h, blake3::hash(&d));
        assert_eq!(ob.to_vec(), hash_bytes(&d).1);
    }

    #[test]
    fn group_ranges_map_to_chunks() {
        let c = chunk_ranges(&GroupRanges::from_groups([0, 2, 3]));
        assert_eq!(
            c,
            ChunkRanges::from(ChunkNum(0)..ChunkNum(16))
                | ChunkRanges::from(ChunkNum(32)..ChunkNum(64))
        );
        assert_eq!(groups_of_bytes(0, 0), 0..1);
        assert_eq!(groups_of_bytes(GROUP_SIZE, 2 * GROUP_SIZE + 1), 1..3);
    }
}
