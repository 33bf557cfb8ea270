//! `add --copy`: copy a file into the store and hash the copy, pipelined.
//!
//! One thread copies the file in [`PIECE`]-sized pieces in the kernel
//! (`copy_file_range`: no byte crosses into user space) and starts the
//! writeback of each piece to disk at once (`sync_file_range`), so the disk
//! works from the first piece instead of all at once in the final
//! `fdatasync`. Meanwhile the calling thread hashes each piece of the copy
//! (not of the source: what is hashed is exactly what is stored) through a
//! mapping of it, on every core. Copying, hashing and writing to disk
//! overlap; done one after the other they ran at 0.73x of `cp` + `sync`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, sync_channel};

use super::mapped::Mapping;
use crate::slot::sync_range;
use blake3::hazmat::ChainingValue;

use super::{FileHash, GROUP, Outboard, TreeHasher, build_tree, wide};

/// Bytes copied, written back and hashed at a time (a multiple of the
/// group size and of the page size).
const PIECE: u64 = 32 << 20;
/// Pieces whose writeback may be in flight before the copy waits for the
/// oldest: bounds the dirty pages of a huge file while keeping the disk
/// busy.
const IN_FLIGHT: u64 = 4;

/// A failed copy: reading the source or writing the copy.
#[derive(Debug)]
pub(crate) enum CopyError {
    /// Reading the source failed.
    Source(io::Error),
    /// Writing (or reading back) the copy failed.
    Dest(io::Error),
}

/// Copy the first `len` bytes of `src` into `dst` (empty, opened for
/// reading and writing) and hash the copy. `Shrank` if `src` ended early.
/// The copy is not yet durable: the caller syncs it.
pub(crate) fn copy_and_hash(src: &File, dst: &File, len: u64) -> Result<FileHash, CopyError> {
    let parallel = std::thread::available_parallelism().is_ok_and(|n| n.get() > 2);
    copy_and_hash_with(src, dst, len, parallel)
}

/// [`copy_and_hash`], hashing on every core or on the calling thread.
pub(crate) fn copy_and_hash_with(
    src: &File,
    dst: &File,
    len: u64,
    parallel: bool,
) -> Result<FileHash, CopyError> {
    // Size the copy first so that it can be mapped whole.
    dst.set_len(len).map_err(CopyError::Dest)?;
    let map = Mapping::new(dst, len);
    let (tx, rx) = sync_channel::<Result<(u64, u64), CopyError>>(2);
    let hashed = std::thread::scope(|s| {
        s.spawn(move || copy_pieces(src, dst, len, |r| tx.send(r).is_ok()));
        // `rx` is dropped when this returns, which stops the copy early.
        hash_pieces(rx, dst, map.as_ref(), parallel)
    })?;
    // Short, or someone truncated our private copy: not what was hashed.
    let Some((hasher, _)) =
        hashed.filter(|(_, n)| *n == len && !map.as_ref().is_some_and(Mapping::faulted))
    else {
        return Ok(FileHash::Shrank);
    };
    drop(map);
    #[cfg(test)]
    super::hooks::run(super::hooks::At::Hashed, src);
    let (hash, ob) = hasher.finish();
    Ok(FileHash::Hashed(hash, len, ob))
}

/// Hash the pieces of `dst` as they are reported copied; None if the source
/// ended early.
fn hash_pieces(
    rx: Receiver<Result<(u64, u64), CopyError>>,
    dst: &File,
    map: Option<&Mapping>,
    parallel: bool,
) -> Result<Option<(Hasher, u64)>, CopyError> {
    let mut hasher = if parallel {
        Hasher::Parallel(TreeHasher::new())
    } else {
        Hasher::Serial(Vec::new(), Vec::new())
    };
    let mut buf = Vec::new();
    let mut len = 0;
    while let Ok(piece) = rx.recv() {
        let (off, n) = piece?;
        if n == 0 {
            return Ok(None);
        }
        let (start, end) = (off as usize, (off + n) as usize);
        let bytes = match map {
            Some(m) => &m.bytes()[start..end],
            None => {
                buf.resize(end - start, 0);
                dst.read_exact_at(&mut buf, off).map_err(CopyError::Dest)?;
                &buf[..]
            }
        };
        hasher.update(len, bytes);
        if let Some(m) = map {
            m.release(start..end);
        }
        len += n;
    }
    Ok(Some((hasher, len)))
}

/// The copy's hasher: on every core, or on this thread alone (with two
/// cores, the copy needs one of them to itself: hashing on both slowed
/// the copy by a third).
enum Hasher {
    Parallel(TreeHasher),
    /// Group chaining values, and the first group.
    Serial(Vec<ChainingValue>, Vec<u8>),
}

impl Hasher {
    /// Hash `bytes`, found at `offset` (a multiple of the group size).
    fn update(&mut self, offset: u64, bytes: &[u8]) {
        match self {
            Hasher::Parallel(h) => h.update(bytes),
            Hasher::Serial(cvs, first) => {
                if offset == 0 {
                    first.extend_from_slice(&bytes[..bytes.len().min(GROUP)]);
                }
                let start = cvs.len();
                cvs.resize(start + bytes.len().div_ceil(GROUP), [0; 32]);
                wide::group_cvs(bytes, offset / GROUP as u64, &mut cvs[start..]);
            }
        }
    }

    fn finish(self) -> (blake3::Hash, Outboard) {
        match self {
            Hasher::Parallel(h) => h.finish(),
            Hasher::Serial(cvs, first) if cvs.len() <= 1 => {
                (blake3::hash(&first), Outboard::none())
            }
            Hasher::Serial(cvs, _) => build_tree(vec![cvs]),
        }
    }
}

/// Copy piece by piece, handing `(offset, length)` of each copied piece to
/// `done` (a length of 0: the source ended early); stops when `done`
/// returns false.
fn copy_pieces(
    src: &File,
    dst: &File,
    len: u64,
    mut done: impl FnMut(Result<(u64, u64), CopyError>) -> bool,
) {
    let mut off = 0;
    let mut piece = 0;
    while off < len {
        let n = PIECE.min(len - off);
        let copied = match copy_range(src, dst, off, n) {
            Ok(c) => c,
            Err(e) => {
                done(Err(e));
                return;
            }
        };
        if copied < n {
            done(Ok((off, 0)));
            return;
        }
        // Start writing this piece to disk now, and wait for the piece
        // IN_FLIGHT pieces back to be written (advice only: the final
        // fdatasync reports any error).
        sync_range(dst, off, n, libc::SYNC_FILE_RANGE_WRITE);
        if piece >= IN_FLIGHT {
            let old = off - IN_FLIGHT * PIECE;
            sync_range(
                dst,
                old,
                PIECE,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
        #[cfg(test)]
        if piece == 0 {
            super::hooks::run(super::hooks::At::Piece, src);
        }
        if !done(Ok((off, n))) {
            return;
        }
        off += n;
        piece += 1;
    }
}

/// Copy `n` bytes at `off` from `src` to `dst`; fewer if `src` ends.
fn copy_range(src: &File, dst: &File, off: u64, n: u64) -> Result<u64, CopyError> {
    let mut copied = 0;
    while copied < n {
        let (mut from, mut to) = (to_off(off + copied)?, to_off(off + copied)?);
        let want = usize::try_from(n - copied).unwrap_or(usize::MAX);
        // SAFETY: valid descriptors and offsets owned by this call.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut from,
                dst.as_raw_fd(),
                &mut to,
                want,
                0,
            )
        };
        match r {
            0 => break,
            r if r > 0 => copied += r as u64,
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Not supported between these files (other file
                    // systems, old kernels): copy through user space.
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        return copy_slow(src, dst, off + copied, n - copied).map(|c| copied + c);
                    }
                    // Which side failed? Only a write can run out of room.
                    Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => {
                        return Err(CopyError::Dest(e));
                    }
                    _ => return Err(CopyError::Source(e)),
                }
            }
        }
    }
    Ok(copied)
}

/// `copy_range` through a buffer.
fn copy_slow(src: &File, dst: &File, off: u64, n: u64) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    while copied < n {
        let want = buf
            .len()
            .min(usize::try_from(n - copied).unwrap_or(usize::MAX));
        let r = match src.read_at(&mut buf[..want], off + copied) {
            Ok(0) => break,
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Source(e)),
        };
        dst.write_all_at(&buf[..r], off + copied)
            .map_err(CopyError::Dest)?;
        copied += r as u64;
    }
    Ok(copied)
}

fn to_off(v: u64) -> Result<libc::loff_t, CopyError> {
    libc::loff_t::try_from(v).map_err(|e| CopyError::Source(io::Error::other(e)))
}
