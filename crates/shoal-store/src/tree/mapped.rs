//! Hashing a file through a read-only mapping of it, without letting a file
//! truncated under us kill the process.
//!
//! Why map: reading copies every byte out of the page cache on one core,
//! while the hashing wants both; `b3sum` maps the file and was 1.3x faster
//! than our reads here. A mapping costs only page-table entries.
//!
//! The danger: a page of the mapping that lies past the end of the file
//! (another process truncated it after we mapped it) raises SIGBUS when it
//! is touched, and SIGBUS kills the process by default. A node serving for
//! weeks must not die because a user truncated a file it was adding.
//!
//! So, process-wide and once, we install a SIGBUS handler ([`on_sigbus`]).
//! Importers register the address range of each mapping in a fixed table of
//! atomics ([`RANGES`]: no lock and no allocation, which a signal handler may
//! not take). A fault inside a registered range is answered by mapping
//! anonymous zero pages (`MAP_FIXED`) from the faulting page to the end of
//! that range and setting the range's `faulted` flag; the handler returns,
//! the faulting load runs again and reads zeros, and the importer, which
//! checks the flag after hashing, reports the file as changed and records
//! nothing. A fault anywhere else is not ours: the handler puts the previous
//! disposition back and lets the fault happen again, so a real crash still
//! crashes (with Rust's own stack-overflow handler, then the default action).
//!
//! Why by hand: no maintained crate offers this. `memmap2` (and blake3's
//! `mmap` feature on top of it) leaves SIGBUS to the caller; the crates that
//! recover from it (`sapling-indexedlog`, `byztime`) do so for their own
//! mappings only, with no API for anyone else's. The technique is the one
//! of EFL's `eina_mmap` (a zero page over the bad page).
//!
//! If the handler cannot be installed, or someone replaced it, or all
//! [`SLOTS`] are in use, or the file cannot be mapped, callers read the file
//! instead (see [`hash_mapped`]'s `None`).

use std::ffi::{c_int, c_void};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use blake3::hazmat::ChainingValue;

use super::{GROUP, Outboard, build_tree, inner_levels, wide};

/// Mappings that can be registered at once.
const SLOTS: usize = 64;

/// Page tables are filled ahead of the hashing and dropped behind it a
/// window at a time, so that only a few windows are mapped in at once and
/// the resident size stays bounded however large the file (the page cache
/// keeps the pages): `shoal add` of 1 GiB peaked at 38 MiB (95 MiB with
/// 32 MiB windows, at the same speed).
pub(crate) const WINDOW: usize = 8 << 20;

/// Bytes hashed by one thread at a time (a multiple of [`GROUP`] that
/// divides [`WINDOW`]).
const CHUNK: usize = 1 << 20;

/// One registered mapping: `[start, end)`, `start == 0` when free.
struct Range {
    taken: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

impl Range {
    const fn new() -> Self {
        Range {
            taken: AtomicBool::new(false),
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            faulted: AtomicBool::new(false),
        }
    }
}

static RANGES: [Range; SLOTS] = [const { Range::new() }; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The SIGBUS disposition before ours, written once before ours is
/// installed and only read afterwards.
struct Previous(std::cell::UnsafeCell<std::mem::MaybeUninit<libc::sigaction>>);
// SAFETY: written once inside `INSTALL` before the handler that reads it
// can run; never written again.
unsafe impl Sync for Previous {}
static PREVIOUS: Previous = Previous(std::cell::UnsafeCell::new(std::mem::MaybeUninit::uninit()));

/// Our handler's address, as `sigaction` stores it.
fn handler_addr() -> libc::sighandler_t {
    on_sigbus as extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) as libc::sighandler_t
}

/// Install the handler once; true if it is installed and still ours.
fn guard_ready() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: plain libc calls on valid, initialised structures;
        // PREVIOUS is written before the handler that reads it exists.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page <= 0 {
                return;
            }
            PAGE.store(page as usize, Ordering::Relaxed);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return;
            }
            (*PREVIOUS.0.get()).write(old);
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler_addr();
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) == 0 {
                INSTALLED.store(true, Ordering::Release);
            }
        }
    });
    if !INSTALLED.load(Ordering::Acquire) {
        return false;
    }
    // Someone may have replaced it since (or it gave way to a real crash).
    // SAFETY: reading the current disposition into a local.
    unsafe {
        let mut cur: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut cur) == 0
            && cur.sa_sigaction == handler_addr()
    }
}

/// The SIGBUS handler. Only async-signal-safe work: atomics, `mmap`,
/// `sigaction`, `raise`.
extern "C" fn on_sigbus(sig: c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // SAFETY: errno is thread-local; the kernel passes a valid siginfo for
    // an SA_SIGINFO handler (checked for null anyway); si_addr is the
    // faulting address for a memory fault (si_code > 0).
    unsafe {
        let errno = *libc::__errno_location();
        let code = if info.is_null() { 0 } else { (*info).si_code };
        if code > 0 && recover((*info).si_addr() as usize) {
            *libc::__errno_location() = errno;
            return;
        }
        // Not ours: back to the previous disposition. A fault happens again
        // when we return and meets it; a signal sent by kill() must be sent
        // again (it stays pending until this handler returns).
        libc::sigaction(
            libc::SIGBUS,
            (*PREVIOUS.0.get()).as_ptr(),
            std::ptr::null_mut(),
        );
        if code <= 0 {
            libc::raise(sig);
        }
        *libc::__errno_location() = errno;
    }
}

/// If `addr` is inside a registered range, put zero pages from its page to
/// the range's end and flag the range.
fn recover(addr: usize) -> bool {
    let page = PAGE.load(Ordering::Relaxed);
    for r in &RANGES {
        let start = r.start.load(Ordering::Acquire);
        let end = r.end.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= end {
            continue;
        }
        let from = addr & !(page - 1);
        // SAFETY: [from, end) lies inside a mapping registered by its owner,
        // which holds it until it deregisters; replacing its pages with
        // anonymous ones is what the owner agreed to.
        let p = unsafe {
            libc::mmap(
                from as *mut c_void,
                end - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return false;
        }
        r.faulted.store(true, Ordering::Release);
        return true;
    }
    false
}

/// A read-only mapping of a whole file, registered with the SIGBUS guard
/// for as long as it lives.
pub(crate) struct Mapping {
    ptr: *mut c_void,
    len: usize,
    map_len: usize,
    slot: usize,
}

// SAFETY: the mapping is read-only and only read through `bytes`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map the first `len` bytes of `f` (at least one byte). None if the
    /// guard is not ready, no slot is free or the file cannot be mapped.
    pub(crate) fn new(f: &File, len: u64) -> Option<Mapping> {
        let len = usize::try_from(len).ok().filter(|l| *l > 0)?;
        #[cfg(test)]
        if super::hooks::NO_MAP.get() {
            return None;
        }
        if !guard_ready() {
            return None;
        }
        let page = PAGE.load(Ordering::Relaxed);
        let map_len = len.checked_next_multiple_of(page)?;
        let slot = RANGES.iter().position(|r| {
            r.taken
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        // SAFETY: a fresh shared read-only mapping of a file we hold open.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            RANGES[slot].taken.store(false, Ordering::Release);
            return None;
        }
        let r = &RANGES[slot];
        r.faulted.store(false, Ordering::Relaxed);
        r.end.store(ptr as usize + map_len, Ordering::Release);
        r.start.store(ptr as usize, Ordering::Release);
        Some(Mapping {
            ptr,
            len,
            map_len,
            slot,
        })
    }

    /// The file's bytes (zeros where the file was truncated meanwhile).
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes are mapped readable for as long as `self`
        // lives; a page that loses its file is replaced by zeros (see the
        // module's comment). The bytes may change under us if another
        // process writes the file, as with any mapped file (memmap2 and
        // b3sum do the same); the importer re-checks the file afterwards.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// Whether a page had to be replaced by zeros (the file shrank).
    pub(crate) fn faulted(&self) -> bool {
        RANGES[self.slot].faulted.load(Ordering::Acquire)
    }

    /// Drop the page-table entries of `range` (bytes, page-aligned start):
    /// the pages stay in the page cache, the process's resident size falls.
    pub(crate) fn release(&self, range: std::ops::Range<usize>) {
        self.advise(range, libc::MADV_DONTNEED);
    }

    /// Fault in `range` ahead of its use (errors ignored: a page past the
    /// end of the file is left to the fault handler).
    pub(crate) fn populate(&self, range: std::ops::Range<usize>) {
        self.advise(range, libc::MADV_POPULATE_READ);
    }

    fn advise(&self, range: std::ops::Range<usize>, advice: c_int) {
        let page = PAGE.load(Ordering::Relaxed);
        let start = range.start & !(page - 1);
        let end = range.end.min(self.map_len);
        if start >= end {
            return;
        }
        // SAFETY: the range lies inside our mapping.
        unsafe {
            libc::madvise(self.ptr.cast::<u8>().add(start).cast(), end - start, advice);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let r = &RANGES[self.slot];
        r.start.store(0, Ordering::Release);
        r.end.store(0, Ordering::Release);
        // SAFETY: our mapping, no longer used (we hold the only reference).
        unsafe {
            libc::munmap(self.ptr, self.map_len);
        }
        r.taken.store(false, Ordering::Release);
    }
}

/// What hashing through a mapping found.
pub(crate) enum Mapped {
    /// Root hash, length and tree.
    Hashed(blake3::Hash, u64, Outboard),
    /// A page vanished while it was hashed: the file shrank.
    Shrank,
}

/// Hash the first `len` bytes of `f` through a mapping. None if the file
/// cannot be mapped safely: read it instead.
pub(crate) fn hash_mapped(f: &File, len: u64) -> Option<Mapped> {
    let map = Mapping::new(f, len)?;
    #[cfg(test)]
    super::hooks::run(super::hooks::At::Mapped, f);
    let res = hash_mapping(&map);
    drop(map);
    #[cfg(test)]
    if matches!(res, Mapped::Hashed(..)) {
        super::hooks::run(super::hooks::At::Hashed, f);
    }
    Some(res)
}

/// Hash a whole mapping on every core.
///
/// The groups are handed out in order, [`CHUNK`] bytes at a time, from a
/// shared queue, so all threads work near the same offset and none waits
/// for another until the end (unlike a rayon pass per window, where every
/// window ends with all threads waiting for the slowest). The thread that
/// completes a window releases it (done by one thread while the others
/// waited, that cost a fifth of the time).
///
/// The thread that opens a window may map in the page tables of the next
/// one (`MADV_POPULATE_READ`), which pays off or not depending on how the
/// page cache holds the file: in small folios (a file read back from
/// disk here), populating cost ~6% less than taking the faults while
/// hashing; in large folios (a file just written), where one fault maps a
/// whole folio, populating (page by page) made a 1 GiB add 18% slower.
/// Userspace cannot see the folio size, so it is measured: windows 1 and 3
/// are populated, 2 and 4 are not, and the rest follow whichever pair took
/// less time (see [`Probe`]).
pub(crate) fn hash_mapping(map: &Mapping) -> Mapped {
    let data = map.bytes();
    let groups = data.len().div_ceil(GROUP);
    let per_chunk = CHUNK / GROUP;
    let per_window = WINDOW / CHUNK;
    let windows = data.len().div_ceil(WINDOW);
    let chunks_in = |w: usize| {
        let end = ((w + 1) * WINDOW).min(data.len());
        (end - w * WINDOW).div_ceil(CHUNK)
    };
    // The groups' chaining values and, as each chunk is a whole subtree,
    // the levels above them inside a chunk, built by the thread that
    // hashed it; what is above the chunks is left to build_tree.
    let depth = inner_levels(groups, per_chunk.trailing_zeros() as usize);
    let mut levels: Vec<Vec<ChainingValue>> = (0..=depth)
        .map(|k| vec![[0; 32]; groups.div_ceil(1 << k)])
        .collect();
    let mut per_level: Vec<_> = levels
        .iter_mut()
        .enumerate()
        .map(|(k, l)| l.chunks_mut(per_chunk >> k))
        .collect();
    let chunks: Vec<Vec<&mut [ChainingValue]>> = (0..groups.div_ceil(per_chunk))
        .map(|_| per_level.iter_mut().filter_map(Iterator::next).collect())
        .collect();
    drop(per_level);
    let queue = Mutex::new(chunks.into_iter().enumerate());
    let finished: Vec<AtomicUsize> = (0..windows).map(|_| AtomicUsize::new(0)).collect();
    let probe = Probe::new(windows);
    let work = || {
        loop {
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some((c, mut out)) = next else { break };
            if map.faulted() {
                break;
            }
            let w = c / per_window;
            if c % per_window == 0 && w + 1 < windows && probe.populate(w + 1) {
                let t = Instant::now();
                map.populate((w + 1) * WINDOW..(w + 2) * WINDOW);
                probe.spent(w + 1, t);
            }
            let t = Instant::now();
            hash_chunk(data, c * per_chunk, &mut out);
            probe.spent(w, t);
            if finished[w].fetch_add(1, Ordering::AcqRel) + 1 == chunks_in(w) {
                probe.finished(w);
                map.release(w * WINDOW..(w + 1) * WINDOW);
            }
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    drop(queue);
    if map.faulted() {
        return Mapped::Shrank;
    }
    let (hash, ob) = build_tree(levels);
    Mapped::Hashed(hash, data.len() as u64, ob)
}

/// Whether to populate a window ahead of its hashing, measured on the
/// file itself (see [`hash_mapping`]): the time spent on windows 1 and 3
/// (populated, the populating included) against windows 2 and 4 (faulted
/// in while hashed). Until all four are done, and for files too short to
/// tell, windows are populated.
struct Probe {
    /// Nanoseconds spent on each probe window (index 0 unused).
    spent: [AtomicU64; 5],
    /// Probe windows completely hashed.
    done: AtomicUsize,
    /// Whether probing applies (the file has more windows than the probe).
    probing: bool,
}

impl Probe {
    fn new(windows: usize) -> Self {
        Probe {
            spent: Default::default(),
            done: AtomicUsize::new(0),
            probing: windows > 5,
        }
    }

    /// Whether window `w` is to be populated.
    fn populate(&self, w: usize) -> bool {
        if !self.probing {
            return true;
        }
        match w {
            1..=4 => w % 2 == 1,
            _ if self.done.load(Ordering::Acquire) < 4 => true,
            _ => {
                let t = |w: usize| self.spent[w].load(Ordering::Relaxed);
                t(1) + t(3) <= t(2) + t(4)
            }
        }
    }

    /// Add the time since `since` to window `w`'s.
    fn spent(&self, w: usize, since: Instant) {
        if self.probing && (1..=4).contains(&w) {
            let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.spent[w].fetch_add(ns, Ordering::Relaxed);
        }
    }

    /// Window `w` is completely hashed.
    fn finished(&self, w: usize) {
        if self.probing && (1..=4).contains(&w) {
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Hash the groups of one chunk, starting at group `first`, into `out[0]`,
/// and build the levels above them into `out[1..]`.
fn hash_chunk(data: &[u8], first: usize, out: &mut [&mut [ChainingValue]]) {
    let Some((cvs, above)) = out.split_first_mut() else {
        return;
    };
    let start = first * GROUP;
    let end = ((first + cvs.len()) * GROUP).min(data.len());
    wide::group_cvs(&data[start..end], first as u64, cvs);
    let mut below: &[ChainingValue] = cvs;
    for level in above.iter_mut() {
        wide::merge_level(below, level);
        below = level;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `Instant` `d` ago.
    fn ago(d: Duration) -> Instant {
        Instant::now()
            .checked_sub(d)
            .expect("a clock older than the test")
    }

    fn probe_with(populated: Duration, faulted: Duration) -> Probe {
        let p = Probe::new(100);
        for w in 1..=4 {
            p.spent(w, ago(if w % 2 == 1 { populated } else { faulted }));
        }
        p
    }

    #[test]
    fn the_probe_populates_odd_windows_then_follows_the_faster_pair() {
        let p = probe_with(Duration::from_millis(10), Duration::from_millis(5));
        assert!(p.populate(1) && !p.populate(2) && p.populate(3) && !p.populate(4));
        // Until the four probe windows are done: populate.
        for w in 1..=3 {
            p.finished(w);
        }
        assert!(p.populate(5) && p.populate(50));
        p.finished(4);
        // Faulting was faster: no more populating.
        assert!(!p.populate(5) && !p.populate(99));

        let p = probe_with(Duration::from_millis(5), Duration::from_millis(10));
        (1..=4).for_each(|w| p.finished(w));
        assert!(p.populate(5) && p.populate(99));
    }

    #[test]
    fn files_too_short_to_probe_are_populated() {
        let p = Probe::new(5);
        assert!((1..5).all(|w| p.populate(w)));
        p.spent(2, ago(Duration::from_millis(1)));
        (1..=4).for_each(|w| p.finished(w));
        assert!(p.populate(4));
    }
}
