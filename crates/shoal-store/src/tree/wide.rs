//! BLAKE3 over runs of whole groups, computed wide: every 1 KiB chunk of a
//! run in one SIMD pass, then each level of parents in one pass, the way
//! b3sum's own tree hashing works.
//!
//! Why this is written here: blake3's documented `hazmat` API hashes one
//! subtree per `Hasher` and merges one pair of chaining values per call.
//! For 16 KiB groups that leaves most SIMD lanes idle: inside every group
//! the upper levels of parents and the group's own root go through the
//! one-block compression, each `Hasher` costs its set-up, and above the
//! groups every merge is one compression on its own. Hashing a 1 GiB file
//! that way took ~15% more CPU than b3sum; wide, `shoal add` of a 1 GiB
//! file went from 97.9 to 83.2 ms (median of 24 in ABBA order, b3sum
//! 88.2 ms in the same rounds).
//!
//! The wide compressions come from blake3's `platform` module, which blake3
//! keeps public but marks undocumented and unstable. So the dependency is
//! held to blake3 1.8.x, and at first use the wide path is checked against
//! `hazmat` on a fixed input (chunk counters above 2^32 included): if they
//! ever disagree, everything goes through `hazmat` instead, and a warning
//! says so. A wrong hash would name a blob wrongly; a slow one only costs
//! time.

use std::cell::RefCell;
use std::sync::OnceLock;

use blake3::IncrementCounter;
use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use blake3::platform::Platform;
use shoal_proto::GROUP_CHUNK_LOG;

use super::{GROUP, group_cv};

/// BLAKE3's chunk length.
const CHUNK_LEN: usize = 1024;

/// BLAKE3's initial value, the key words of plain (unkeyed) hashing
/// (section 2.1 of the BLAKE3 paper).
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];

/// BLAKE3's domain flags (section 2.1 of the paper).
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const PARENT: u8 = 4;

/// Groups hashed per pass: 1 MiB of input, whose 1,024 chunk chaining
/// values (32 KiB) stay in the core's cache while the levels above them
/// are built.
const PASS: usize = 64;

/// The platform to hash wide on, if its wide path agrees with `hazmat`
/// (checked once).
fn platform() -> Option<Platform> {
    static CHECKED: OnceLock<Option<Platform>> = OnceLock::new();
    *CHECKED.get_or_init(|| {
        let p = Platform::detect();
        let ok = agrees_with_hazmat(p);
        if !ok {
            tracing::warn!(
                "blake3's wide hashing disagrees with its hazmat API; hashing group by group"
            );
        }
        ok.then_some(p)
    })
}

/// Whether the wide path of `platform` agrees with `hazmat` (and many
/// small inputs hashed at once with `blake3::hash`).
fn agrees_with_hazmat(platform: Platform) -> bool {
    let lens = [
        0,
        1,
        1024,
        1025,
        2048,
        4096,
        5000,
        GROUP - 1,
        GROUP,
        GROUP + 1,
    ];
    let smalls: Vec<Vec<u8>> = lens
        .iter()
        .map(|&n| (0..n).map(|i| (i * 13 + n) as u8).collect())
        .collect();
    let refs: Vec<&[u8]> = smalls.iter().map(Vec::as_slice).collect();
    let narrow: Vec<blake3::Hash> = refs.iter().map(|d| blake3::hash(d)).collect();
    agrees(
        |d, first, out| wide_group_cvs(platform, d, first, out),
        |below, out| wide_merge(platform, below, out),
    ) && wide_small_many(platform, &refs) == narrow
}

/// Hash a fixed 5-group input at a group index whose chunk counters pass
/// 2^32 with `group_cvs`, and merge the chaining values with `merge`:
/// whether both give what `hazmat` gives.
fn agrees(
    group_cvs: impl Fn(&[u8], u64, &mut [ChainingValue]),
    merge: impl Fn(&[ChainingValue], &mut [ChainingValue]),
) -> bool {
    let first = (1u64 << 28) - 2;
    let data: Vec<u8> = (0..5 * GROUP).map(|i| (i * 7 + i / 251) as u8).collect();
    let narrow: Vec<ChainingValue> = data
        .chunks(GROUP)
        .enumerate()
        .map(|(i, g)| group_cv(first + i as u64, g))
        .collect();
    let mut wide = vec![[0; 32]; 5];
    group_cvs(&data, first, &mut wide);
    let merged_narrow: Vec<ChainingValue> = narrow.chunks(2).map(merge_pair).collect();
    let mut merged_wide = vec![[0; 32]; 3];
    merge(&narrow, &mut merged_wide);
    wide == narrow && merged_wide == merged_narrow
}

/// One parent of a level (or the odd last child, promoted).
fn merge_pair(pair: &[ChainingValue]) -> ChainingValue {
    match pair {
        [l, r] => hazmat::merge_subtrees_non_root(l, r, Mode::Hash),
        [single] => *single,
        _ => [0; 32],
    }
}

/// The chaining values of the groups of `data`, which starts at group
/// `first`, into `out` (one per group, the last group may be short). Each
/// is a non-root value: for a blob of one group it is not the blob's hash
/// (callers hash such a blob whole instead).
pub(crate) fn group_cvs(data: &[u8], first: u64, out: &mut [ChainingValue]) {
    group_cvs_on(platform(), data, first, out);
}

/// [`group_cvs`], wide on `platform` if there is one.
fn group_cvs_on(platform: Option<Platform>, data: &[u8], first: u64, out: &mut [ChainingValue]) {
    debug_assert_eq!(out.len(), data.len().div_ceil(GROUP));
    let whole = data.len() / GROUP;
    let (head, tail) = out.split_at_mut(whole);
    if let Some(p) = platform {
        wide_group_cvs(p, &data[..whole * GROUP], first, head);
    } else {
        for (i, cv) in head.iter_mut().enumerate() {
            *cv = group_cv(first + i as u64, &data[i * GROUP..(i + 1) * GROUP]);
        }
    }
    if let Some(cv) = tail.first_mut() {
        *cv = group_cv(first + whole as u64, &data[whole * GROUP..]);
    }
}

/// The next level up from `below` into `out` (`below.len().div_ceil(2)`
/// values): each pair merged as a non-root parent, an odd last one
/// promoted.
pub(crate) fn merge_level(below: &[ChainingValue], out: &mut [ChainingValue]) {
    merge_level_on(platform(), below, out);
}

/// [`merge_level`], wide on `platform` if there is one.
fn merge_level_on(platform: Option<Platform>, below: &[ChainingValue], out: &mut [ChainingValue]) {
    debug_assert_eq!(out.len(), below.len().div_ceil(2));
    if let Some(p) = platform {
        wide_merge(p, below, out);
    } else {
        for (node, pair) in out.iter_mut().zip(below.chunks(2)) {
            *node = merge_pair(pair);
        }
    }
}

/// The BLAKE3 hashes of many small inputs. Those of two chunks up to one
/// group (16 KiB) are hashed together, wide: chunk `c` of every input in
/// one pass, so that 4 KiB files fill all the SIMD lanes, which one 4 KiB
/// file alone leaves three quarters idle (in a 10,000-file fetch, hashing
/// was ~4% of all the CPU of both ends). Shorter and longer ones, and the
/// short last chunk and the parents of each, go the narrow way.
pub(crate) fn hash_small_many(inputs: &[&[u8]]) -> Vec<blake3::Hash> {
    hash_small_many_on(platform(), inputs)
}

/// [`hash_small_many`], wide on `platform` if there is one.
fn hash_small_many_on(platform: Option<Platform>, inputs: &[&[u8]]) -> Vec<blake3::Hash> {
    match platform {
        Some(p) => wide_small_many(p, inputs),
        None => inputs.iter().map(|d| blake3::hash(d)).collect(),
    }
}

/// Chunks in a group.
const GROUP_CHUNKS: usize = 1 << GROUP_CHUNK_LOG;

/// [`hash_small_many`], wide.
fn wide_small_many(platform: Platform, inputs: &[&[u8]]) -> Vec<blake3::Hash> {
    let wide = |d: &[u8]| d.len() > CHUNK_LEN && d.len() <= GROUP;
    // Input i's chunk c at i * GROUP_CHUNKS + c.
    let mut cvs: Vec<ChainingValue> = vec![[0; 32]; inputs.len() * GROUP_CHUNKS];
    let mut chunks: Vec<&[u8; CHUNK_LEN]> = Vec::with_capacity(inputs.len());
    let mut whose: Vec<usize> = Vec::with_capacity(inputs.len());
    let mut out = vec![0u8; inputs.len() * 32];
    for c in 0..GROUP_CHUNKS {
        chunks.clear();
        whose.clear();
        for (i, d) in inputs.iter().enumerate() {
            if wide(d)
                && let Some(chunk) = d.get(c * CHUNK_LEN..(c + 1) * CHUNK_LEN)
                && let Ok(chunk) = <&[u8; CHUNK_LEN]>::try_from(chunk)
            {
                chunks.push(chunk);
                whose.push(i);
            }
        }
        if chunks.is_empty() {
            // No input has a whole chunk `c`, so none has a later one.
            break;
        }
        // Chunk `c` of each input has counter `c`.
        platform.hash_many(
            &chunks,
            &IV,
            c as u64,
            IncrementCounter::No,
            0,
            CHUNK_START,
            CHUNK_END,
            &mut out[..chunks.len() * 32],
        );
        for (cv, &i) in out.as_chunks::<32>().0.iter().zip(&whose) {
            cvs[i * GROUP_CHUNKS + c] = *cv;
        }
    }
    inputs
        .iter()
        .zip(cvs.chunks_mut(GROUP_CHUNKS))
        .map(|(d, cvs)| {
            if !wide(d) {
                return blake3::hash(d);
            }
            let n = d.len().div_ceil(CHUNK_LEN);
            let whole = d.len() / CHUNK_LEN;
            if whole < n {
                let mut h = blake3::Hasher::new();
                h.set_input_offset((whole * CHUNK_LEN) as u64);
                h.update(&d[whole * CHUNK_LEN..]);
                cvs[whole] = h.finalize_non_root();
            }
            let cvs = &cvs[..n];
            // The root's children: the largest power of two of chunks
            // below `n` on the left, the rest on the right (n >= 2).
            let left = n.next_power_of_two() / 2;
            hazmat::merge_subtrees_root(&subtree(&cvs[..left]), &subtree(&cvs[left..]), Mode::Hash)
        })
        .collect()
}

/// The chaining value of a (non-root) subtree over the chunks `cvs`.
fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() <= 1 {
        return cvs.first().copied().unwrap_or([0; 32]);
    }
    let left = cvs.len().next_power_of_two() / 2;
    hazmat::merge_subtrees_non_root(&subtree(&cvs[..left]), &subtree(&cvs[left..]), Mode::Hash)
}

thread_local! {
    /// Each thread's two buffers for [`wide_group_cvs`], made once.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// [`group_cvs`] for whole groups only, wide.
fn wide_group_cvs(platform: Platform, data: &[u8], first: u64, out: &mut [ChainingValue]) {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            let (a, b) = &mut *s;
            wide_group_cvs_in(platform, data, first, out, a, b);
        }
        // Not reachable (nothing here calls back in), but not worth a panic.
        Err(_) => wide_group_cvs_in(platform, data, first, out, &mut Vec::new(), &mut Vec::new()),
    });
}

/// [`wide_group_cvs`] with the buffers `a` and `b`, grown as needed: the
/// chunks' chaining values, then each level of parents, alternately in
/// one and the other (either may hold the chunks' level on a next pass).
fn wide_group_cvs_in(
    platform: Platform,
    data: &[u8],
    first: u64,
    out: &mut [ChainingValue],
    a: &mut Vec<u8>,
    b: &mut Vec<u8>,
) {
    let per_group = 1usize << GROUP_CHUNK_LOG;
    let mut chunks: Vec<&[u8; CHUNK_LEN]> = Vec::with_capacity(PASS * per_group);
    for buf in [&mut *a, &mut *b] {
        if buf.len() < PASS * per_group * 32 {
            buf.resize(PASS * per_group * 32, 0);
        }
    }
    let (mut a, mut b) = (a, b);
    for (p, (input, cvs)) in data
        .chunks(PASS * GROUP)
        .zip(out.chunks_mut(PASS))
        .enumerate()
    {
        chunks.clear();
        chunks.extend(input.as_chunks::<CHUNK_LEN>().0);
        let mut n = chunks.len();
        let counter = (first + (p * PASS) as u64) << GROUP_CHUNK_LOG;
        platform.hash_many(
            &chunks,
            &IV,
            counter,
            IncrementCounter::Yes,
            0,
            CHUNK_START,
            CHUNK_END,
            &mut a[..n * 32],
        );
        for _ in 0..GROUP_CHUNK_LOG {
            parents(platform, &a[..n * 32], &mut b[..n * 16]);
            n /= 2;
            std::mem::swap(&mut a, &mut b);
        }
        cvs.as_flattened_mut().copy_from_slice(&a[..n * 32]);
    }
}

/// [`merge_level`], wide.
fn wide_merge(platform: Platform, below: &[ChainingValue], out: &mut [ChainingValue]) {
    let pairs = below.len() / 2;
    let (merged, promoted) = out.split_at_mut(pairs);
    parents(
        platform,
        below[..2 * pairs].as_flattened(),
        merged.as_flattened_mut(),
    );
    if let (Some(node), Some(last)) = (promoted.first_mut(), below.get(2 * pairs)) {
        *node = *last;
    }
}

/// Every 64 bytes of `children` (a pair of chaining values) compressed as a
/// non-root parent into 32 bytes of `out`.
fn parents(platform: Platform, children: &[u8], out: &mut [u8]) {
    let blocks: Vec<&[u8; 64]> = children.as_chunks::<64>().0.iter().collect();
    platform.hash_many(
        &blocks,
        &IV,
        0,
        IncrementCounter::No,
        PARENT,
        0,
        0,
        &mut out[..blocks.len() * 32],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::tests::data;
    use proptest::prelude::*;

    /// Every platform this machine can run, and none (group by group).
    fn platforms() -> Vec<Option<Platform>> {
        let mut all = vec![None, Some(Platform::Portable), Some(Platform::detect())];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("sse2") {
                all.push(Some(Platform::SSE2));
            }
            if std::arch::is_x86_feature_detected!("sse4.1") {
                all.push(Some(Platform::SSE41));
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                all.push(Some(Platform::AVX2));
            }
        }
        all
    }

    #[test]
    fn the_wide_path_agrees_with_hazmat_on_this_machine() {
        assert!(platform().is_some());
        for p in platforms().into_iter().flatten() {
            assert!(agrees_with_hazmat(p), "{p:?}");
        }
    }

    #[test]
    fn the_check_refuses_a_wide_path_that_hashes_differently() {
        let p = Platform::detect();
        let good_cvs =
            |d: &[u8], first: u64, out: &mut [ChainingValue]| wide_group_cvs(p, d, first, out);
        let good_merge = |b: &[ChainingValue], out: &mut [ChainingValue]| wide_merge(p, b, out);
        assert!(agrees(good_cvs, good_merge));
        // Chunk counters one group off.
        let off_by_one =
            |d: &[u8], first: u64, out: &mut [ChainingValue]| wide_group_cvs(p, d, first + 1, out);
        assert!(!agrees(off_by_one, good_merge));
        // Chunk counters truncated to 32 bits (groups past 2^28 wrap).
        let truncated = |d: &[u8], first: u64, out: &mut [ChainingValue]| {
            for (i, (g, o)) in d.chunks(GROUP).zip(out.chunks_mut(1)).enumerate() {
                wide_group_cvs(p, g, (first + i as u64) & ((1 << 28) - 1), o);
            }
        };
        assert!(!agrees(truncated, good_merge));
        // Parents merged as chunks would be (no PARENT flag).
        let no_parent_flag = |b: &[ChainingValue], out: &mut [ChainingValue]| {
            let blocks: Vec<&[u8; 64]> = b.as_flattened().as_chunks::<64>().0.iter().collect();
            p.hash_many(
                &blocks,
                &IV,
                0,
                IncrementCounter::No,
                0,
                0,
                0,
                out.as_flattened_mut(),
            );
            if let (Some(o), Some(l)) = (out.last_mut(), b.last()) {
                *o = *l;
            }
        };
        assert!(!agrees(good_cvs, no_parent_flag));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn group_cvs_equal_hazmats_on_every_platform(
            groups in 0usize..200,
            tail in prop_oneof![Just(0usize), 1usize..GROUP],
            first in prop_oneof![
                0u64..1_000,
                (1u64 << 28) - 300..(1u64 << 28) + 300,
                (1u64 << 40)..(1u64 << 40) + 10,
            ],
            seed in any::<u64>(),
        ) {
            let data = data(groups * GROUP + tail, seed);
            let narrow: Vec<_> = data
                .chunks(GROUP)
                .enumerate()
                .map(|(i, g)| group_cv(first + i as u64, g))
                .collect();
            for p in platforms() {
                let mut out = vec![[0; 32]; data.len().div_ceil(GROUP)];
                group_cvs_on(p, &data, first, &mut out);
                prop_assert_eq!(&out, &narrow, "{:?}", p);
            }
        }

        #[test]
        fn many_small_inputs_hash_as_blake3_does_on_every_platform(
            lens in proptest::collection::vec(
                prop_oneof![0usize..2100, Just(4096usize), 4000usize..GROUP + 1, GROUP..GROUP + 3000],
                0..40,
            ),
            seed in any::<u64>(),
        ) {
            let inputs: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| data(n, seed ^ i as u64))
                .collect();
            let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
            let narrow: Vec<blake3::Hash> = refs.iter().map(|d| blake3::hash(d)).collect();
            for p in platforms() {
                prop_assert_eq!(&hash_small_many_on(p, &refs), &narrow, "{:?}", p);
            }
        }

        #[test]
        fn merge_level_equals_hazmats_on_every_platform(len in 1usize..300, seed in any::<u64>()) {
            let below: Vec<ChainingValue> = data(len * 32, seed)
                .chunks(32)
                .map(|c| c.try_into().unwrap())
                .collect();
            let narrow: Vec<_> = below.chunks(2).map(merge_pair).collect();
            for p in platforms() {
                let mut out = vec![[0; 32]; len.div_ceil(2)];
                merge_level_on(p, &below, &mut out);
                prop_assert_eq!(&out, &narrow, "{:?}", p);
            }
        }
    }
}
