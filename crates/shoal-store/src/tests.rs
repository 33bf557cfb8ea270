//! Store tests: hashes, streams between stores, corruption, partials,
//! collections, gc, in-place files and locking.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use proptest::prelude::*;
use shoal_proto::{GROUP_SIZE, GroupRanges, group_count};

use crate::{BlobKind, ImportMode, Presence, ReceiveError, Store, StoreError, StoreEvent};

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Encode `ranges` of `hash` from `from` into bytes.
fn encode(from: &Store, hash: &blake3::Hash, ranges: &GroupRanges) -> (GroupRanges, Vec<u8>) {
    let (_, have) = from.available(hash, ranges).unwrap();
    let mut out = Vec::new();
    rt().block_on(from.send_ranges(hash, &have, &mut out))
        .unwrap();
    (have, out)
}

fn receive(
    to: &Store,
    hash: &blake3::Hash,
    ranges: &GroupRanges,
    bytes: &[u8],
) -> Result<GroupRanges, ReceiveError> {
    rt().block_on(to.receive_ranges(hash, ranges, bytes))
}

#[test]
fn hashes_match_blake3_and_b3sum() {
    let b3sum = std::process::Command::new("b3sum")
        .arg("--version")
        .output()
        .is_ok();
    if !b3sum && std::env::var("CI").as_deref() == Ok("true") {
        panic!("b3sum is not installed (apt-get install b3sum)");
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let mem = Store::in_memory();
    let g = GROUP_SIZE as usize;
    let sizes = [
        0,
        1,
        1023,
        1024,
        1025,
        g - 1,
        g,
        g + 1,
        (1 << 20) + 7,
        3 * g + 77,
        123_456,
        2_000_003,
    ];
    for (i, size) in sizes.into_iter().enumerate() {
        let d = data(size, i as u64);
        let path = dir.path().join(format!("f{i}"));
        fs::write(&path, &d).unwrap();
        let expected = blake3::hash(&d);
        assert_eq!(
            store.import_file(&path, ImportMode::InPlace).unwrap(),
            expected,
            "size {size}"
        );
        assert_eq!(store.import_bytes(&d, "x").unwrap(), expected);
        assert_eq!(mem.import_file(&path, ImportMode::Copy).unwrap(), expected);
        if b3sum {
            let out = std::process::Command::new("b3sum")
                .arg(&path)
                .output()
                .unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            assert_eq!(
                text.split_whitespace().next(),
                Some(expected.to_hex().as_str()),
                "b3sum, size {size}"
            );
        }
        let info = store.info(&expected).unwrap();
        assert_eq!(info.size, size as u64);
        assert!(info.complete && info.pinned);
    }
}

fn roundtrip(from: &Store, to: &Store, size: usize, seed: u64, requests: &[GroupRanges]) {
    let d = data(size, seed);
    let hash = from.import_bytes(&d, "blob").unwrap();
    let n = group_count(size as u64);
    let mut got = GroupRanges::new();
    for req in requests {
        let req = req.intersection(&GroupRanges::from_range(0..n));
        let (have, bytes) = encode(from, &hash, &req);
        assert_eq!(have, req);
        let fresh = receive(to, &hash, &have, &bytes).unwrap();
        assert_eq!(fresh, have.difference(&got));
        got = got.union(&have);
        let info = to.info(&hash).unwrap();
        assert_eq!(info.verified, got);
        for g in got.iter() {
            let start = g * GROUP_SIZE;
            let b = to.read_at(&hash, start, GROUP_SIZE as usize).unwrap();
            let end = (start as usize + GROUP_SIZE as usize).min(size);
            assert_eq!(&b[..], &d[start as usize..end]);
        }
    }
    let (_, rest) = encode(from, &hash, &GroupRanges::from_range(0..n).difference(&got));
    receive(
        to,
        &hash,
        &GroupRanges::from_range(0..n).difference(&got),
        &rest,
    )
    .unwrap();
    let info = to.info(&hash).unwrap();
    assert!(info.complete, "complete after all groups");
    let mut out = Vec::new();
    to.export_blob(&hash, &mut out).unwrap();
    assert_eq!(out, d);
}

#[test]
fn streams_round_trip_between_stores() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Store::open(&dir.path().join("a")).unwrap();
    let disk2 = Store::open(&dir.path().join("b")).unwrap();
    let mem = Store::in_memory();
    fn r(g: impl IntoIterator<Item = u64>) -> GroupRanges {
        GroupRanges::from_groups(g)
    }
    roundtrip(&mem, &disk, 0, 1, &[]);
    roundtrip(&mem, &disk, 100, 2, &[r([0])]);
    roundtrip(&disk, &mem, 1 << 20, 3, &[r([0, 5, 6, 63]), r([5, 7, 8])]);
    roundtrip(&disk, &disk2, 3_000_001, 4, &[r([183]), r(0..20), r([100])]);
    roundtrip(
        &Store::in_memory(),
        &Store::in_memory(),
        200_000,
        5,
        &[r([12]), r([1, 3])],
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_ranges_round_trip(size in 0usize..600_000, seed: u64, reqs in proptest::collection::vec(proptest::collection::btree_set(0u64..40, 0..8), 0..4)) {
        let reqs: Vec<GroupRanges> = reqs.into_iter().map(GroupRanges::from_groups).collect();
        roundtrip(&Store::in_memory(), &Store::in_memory(), size, seed, &reqs);
    }
}

#[test]
fn every_flipped_bit_is_rejected_at_the_right_group() {
    let from = Store::in_memory();
    let size = 3 * GROUP_SIZE as usize + 100;
    let d = data(size, 9);
    let hash = from.import_bytes(&d, "x").unwrap();
    let all = GroupRanges::from_range(0..4);
    let (_, good) = encode(&from, &hash, &all);
    // Which group each byte of the stream belongs to: parents precede the
    // first group under them, so walk the encoding.
    let tree = crate::tree::bao_tree(size as u64);
    let chunks = crate::tree::chunk_ranges(&all);
    let mut owner = vec![0u64; 8];
    let mut is_parent = vec![true; 8];
    let mut pending_parents = 0usize;
    for c in tree.ranges_pre_order_chunks_iter_ref(&chunks, 0) {
        match c {
            bao_tree::iter::BaoChunk::Parent { .. } => pending_parents += 64,
            bao_tree::iter::BaoChunk::Leaf {
                start_chunk, size, ..
            } => {
                let g = start_chunk.0 / 16;
                owner.extend(std::iter::repeat_n(g, pending_parents + size));
                is_parent.extend(std::iter::repeat_n(true, pending_parents));
                is_parent.extend(std::iter::repeat_n(false, size));
                pending_parents = 0;
            }
        }
    }
    assert_eq!(owner.len(), good.len());
    let rt = rt();
    let mut checked = 0;
    for byte in 0..good.len() {
        // Every bit of the header and the parents, every bit of a sample of
        // data bytes (including the first and last of each group).
        let edge = || {
            byte + 1 == good.len()
                || owner[byte + 1] != owner[byte]
                || owner[byte - 1] != owner[byte]
        };
        if !is_parent[byte] && byte % 61 != 0 && !edge() {
            continue;
        }
        for bit in 0..8 {
            let mut bad = good.clone();
            bad[byte] ^= 1 << bit;
            let to = Store::in_memory();
            let res = rt.block_on(to.receive_ranges(&hash, &all, &bad[..]));
            checked += 1;
            if byte < 8 {
                assert!(res.is_err(), "size bit {byte}.{bit} accepted");
                continue;
            }
            match res {
                Err(ReceiveError::Corrupt { group }) => {
                    assert_eq!(group, owner[byte], "byte {byte} bit {bit}");
                    let info = to.info(&hash).unwrap();
                    assert_eq!(
                        info.verified,
                        GroupRanges::from_range(0..group),
                        "kept groups before {group}"
                    );
                }
                other => panic!("byte {byte} bit {bit}: {other:?}"),
            }
        }
    }
    assert!(checked > 3000, "{checked}");
}

#[test]
fn truncated_and_resized_streams() {
    let from = Store::in_memory();
    let d = data(5 * GROUP_SIZE as usize, 11);
    let hash = from.import_bytes(&d, "x").unwrap();
    let all = GroupRanges::from_range(0..5);
    let (_, good) = encode(&from, &hash, &all);
    let to = Store::in_memory();
    let res = receive(&to, &hash, &all, &good[..good.len() - 10]);
    assert!(
        matches!(res, Err(ReceiveError::Truncated { group: 4 })),
        "{res:?}"
    );
    assert_eq!(
        to.info(&hash).unwrap().verified,
        GroupRanges::from_range(0..4)
    );
    // A stream claiming another size resets the unproven partial (the
    // first four groups verify under either size: they sit in the same
    // left subtree)...
    let mut other = good.clone();
    other[..8].copy_from_slice(&(d.len() as u64 + 1).to_le_bytes());
    let res = receive(&to, &hash, &all, &other);
    assert!(
        matches!(res, Err(ReceiveError::Corrupt { group: 4 })),
        "{res:?}"
    );
    assert_eq!(to.info(&hash).unwrap().size, d.len() as u64 + 1);
    // ...and once the size is proven, another size is refused.
    receive(&to, &hash, &all, &good).unwrap();
    assert!(to.info(&hash).unwrap().complete);
    let to2 = Store::in_memory();
    let (_, last) = encode(&from, &hash, &GroupRanges::from_range(4..5));
    receive(&to2, &hash, &GroupRanges::from_range(4..5), &last).unwrap();
    let res = receive(&to2, &hash, &all, &other);
    assert!(
        matches!(res, Err(ReceiveError::SizeMismatch { .. })),
        "{res:?}"
    );
}

/// A stream whose size has no room for the groups it was to hold cannot
/// verify them. It was taken as Ok with nothing in it, after its size had
/// replaced the partial blob's: a peer proving the size of a download
/// could leave any size it liked in the store (one over the limit made
/// every later try of the hash fail as too large). It is refused now and
/// changes nothing.
#[test]
fn a_stream_too_short_for_its_groups_is_refused_and_changes_nothing() {
    let from = Store::in_memory();
    let d = data(5 * GROUP_SIZE as usize, 13);
    let hash = from.import_bytes(&d, "x").unwrap();
    let first = GroupRanges::from_range(0..2);
    let (_, good) = encode(&from, &hash, &first);
    let to = Store::in_memory();
    receive(&to, &hash, &first, &good).unwrap();
    let before = to.info(&hash).unwrap();
    assert_eq!(before.verified, first);
    let short = (2 * GROUP_SIZE).to_le_bytes();
    let res = receive(&to, &hash, &GroupRanges::from_range(1..5), &short);
    assert!(
        matches!(res, Err(ReceiveError::OutOfRange { group: 2, .. })),
        "{res:?}"
    );
    assert_eq!(to.info(&hash).unwrap(), before);
    // The size proof of a download told of an absurd size: the last group
    // of 2^50 bytes, in a stream of a bit over 1 TiB.
    let fresh = Store::in_memory();
    let last = group_count(1 << 50) - 1;
    let huge = ((1u64 << 40) + 1).to_le_bytes();
    let res = receive(
        &fresh,
        &hash,
        &GroupRanges::from_range(last..last + 1),
        &huge,
    );
    assert!(
        matches!(res, Err(ReceiveError::OutOfRange { group, .. }) if group == last),
        "{res:?}"
    );
    assert!(fresh.info(&hash).is_none(), "{:?}", fresh.info(&hash));
}

/// `<target>.shoal-partial` that this store did not start (another data
/// dir's download there, or the user's own file) was written into: the
/// download mixed with it, and what lay past the blob's size stayed in the
/// output, which then held other bytes than its hash names. It is refused
/// now and left as it was; an empty one (a stop before the record was
/// written) is taken, and the output is exactly the blob.
#[test]
fn a_partial_file_the_store_did_not_start_is_not_written_over() {
    let from = Store::in_memory();
    let d = data(3 * GROUP_SIZE as usize + 7, 14);
    let hash = from.import_bytes(&d, "x").unwrap();
    let all = GroupRanges::from_range(0..4);
    let (_, bytes) = encode(&from, &hash, &all);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.bin");
    let partial = dir.path().join("out.bin.shoal-partial");
    // Another data dir's download of a larger blob, stopped half-way.
    let other = Store::open(&dir.path().join("other")).unwrap();
    let big = data(9 * GROUP_SIZE as usize, 15);
    let big_hash = from.import_bytes(&big, "big").unwrap();
    other
        .begin_download(&big_hash, BlobKind::Raw, Some(&target), true)
        .unwrap();
    // Still empty, but theirs (locked while their download has it).
    assert_eq!(fs::metadata(&partial).unwrap().len(), 0);
    let early = Store::open(&dir.path().join("early")).unwrap();
    let res = early.begin_download(&hash, BlobKind::Raw, Some(&target), true);
    assert!(
        matches!(res, Err(StoreError::PartialInTheWay(_))),
        "{res:?}"
    );
    let half = GroupRanges::from_range(0..5);
    let (_, half_bytes) = encode(&from, &big_hash, &half);
    receive(&other, &big_hash, &half, &half_bytes).unwrap();
    let theirs = fs::read(&partial).unwrap();
    assert!(theirs.len() as u64 > 4 * GROUP_SIZE, "{}", theirs.len());
    let to = Store::open(&dir.path().join("mine")).unwrap();
    let res = to.begin_download(&hash, BlobKind::Raw, Some(&target), true);
    assert!(
        matches!(&res, Err(StoreError::PartialInTheWay(p)) if *p == partial),
        "{res:?}"
    );
    assert!(to.info(&hash).is_none());
    assert_eq!(
        fs::read(&partial).unwrap(),
        theirs,
        "their download changed"
    );
    // The user's own file, the same.
    let notes = dir.path().join("notes");
    let mine = dir.path().join("notes.shoal-partial");
    fs::write(&mine, b"my precious notes, longer than nothing").unwrap();
    let res = to.begin_download(&hash, BlobKind::Raw, Some(&notes), true);
    assert!(
        matches!(res, Err(StoreError::PartialInTheWay(_))),
        "{res:?}"
    );
    assert_eq!(
        fs::read(&mine).unwrap(),
        b"my precious notes, longer than nothing"
    );
    // An empty one is taken, and the output is exactly the blob.
    drop(other);
    fs::remove_file(&partial).unwrap();
    fs::write(&partial, b"").unwrap();
    to.begin_download(&hash, BlobKind::Raw, Some(&target), true)
        .unwrap();
    receive(&to, &hash, &all, &bytes).unwrap();
    assert!(to.info(&hash).unwrap().complete);
    assert_eq!(fs::read(&target).unwrap(), d);
}

/// A resumed download never writes through a symlink put in place of its
/// partial file: it wrote the blob over whatever the link named (a
/// review). The blob is left out at open, and a get again is refused.
#[test]
fn a_resumed_download_does_not_follow_a_symlink_in_place_of_its_file() {
    let from = Store::in_memory();
    let d = data(8 * GROUP_SIZE as usize, 16);
    let hash = from.import_bytes(&d, "x").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.bin");
    let partial = dir.path().join("out.bin.shoal-partial");
    let victim = dir.path().join("victim");
    fs::write(&victim, b"not yours").unwrap();
    let store_dir = dir.path().join("store");
    {
        let to = Store::open(&store_dir).unwrap();
        to.begin_download(&hash, BlobKind::Raw, Some(&target), true)
            .unwrap();
        let some = GroupRanges::from_range(0..3);
        let (_, bytes) = encode(&from, &hash, &some);
        receive(&to, &hash, &some, &bytes).unwrap();
        to.close().unwrap();
    }
    fs::remove_file(&partial).unwrap();
    std::os::unix::fs::symlink(&victim, &partial).unwrap();
    let to = Store::open(&store_dir).unwrap();
    assert!(to.info(&hash).is_none(), "taken through the link");
    let res = to.begin_download(&hash, BlobKind::Raw, Some(&target), true);
    assert!(
        matches!(&res, Err(StoreError::PartialInTheWay(p)) if *p == partial),
        "{res:?}"
    );
    let all = GroupRanges::from_range(0..8);
    let (_, bytes) = encode(&from, &hash, &all);
    // Received without a begin: into the store, not through the link.
    let _ = receive(&to, &hash, &all, &bytes);
    assert_eq!(fs::read(&victim).unwrap(), b"not yours");
    assert!(fs::symlink_metadata(&target).is_err());
}

/// A download of an 8-group blob into `out.bin` beside its store, its
/// first seven groups received.
struct SevenOfEight {
    from: Store,
    d: Vec<u8>,
    hash: blake3::Hash,
    to: Store,
    target: std::path::PathBuf,
    partial: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SevenOfEight {
    /// The last group, received: the download stops with four groups
    /// lost (3..7, cut off or in a hole), and its target is not made.
    fn last_group_finds_four_groups_lost(&self) {
        let last = GroupRanges::from_range(7..8);
        let (_, bytes) = encode(&self.from, &self.hash, &last);
        let res = receive(&self.to, &self.hash, &last, &bytes);
        assert!(
            matches!(
                &res,
                Err(ReceiveError::Store(StoreError::PartialCutShort {
                    lost: 4,
                    ..
                }))
            ),
            "{res:?}"
        );
        assert!(
            fs::symlink_metadata(&self.target).is_err(),
            "finished anyway"
        );
    }

    /// Receives `groups` again: the blob is then whole, at its target.
    fn fetch_again(&self, groups: std::ops::Range<u64>) {
        let lost = GroupRanges::from_range(groups);
        let (_, bytes) = encode(&self.from, &self.hash, &lost);
        receive(&self.to, &self.hash, &lost, &bytes).unwrap();
        assert!(self.to.info(&self.hash).unwrap().complete);
        assert_eq!(fs::read(&self.target).unwrap(), self.d);
    }
}

fn seven_of_eight(seed: u64) -> SevenOfEight {
    let from = Store::in_memory();
    let d = data(8 * GROUP_SIZE as usize, seed);
    let hash = from.import_bytes(&d, "x").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.bin");
    let partial = dir.path().join("out.bin.shoal-partial");
    let to = Store::open(&dir.path().join("store")).unwrap();
    to.begin_download(&hash, BlobKind::Raw, Some(&target), true)
        .unwrap();
    let first = GroupRanges::from_range(0..7);
    let (_, bytes) = encode(&from, &hash, &first);
    receive(&to, &hash, &first, &bytes).unwrap();
    SevenOfEight {
        from,
        d,
        hash,
        to,
        target,
        partial,
        _dir: dir,
    }
}

/// A partial download's file cut short while it downloads is not padded
/// back with zeros into a "complete" blob of the wrong bytes (a review):
/// the last group fails saying so, the groups lost are dropped, and
/// fetching them again completes the blob with the right bytes.
#[test]
fn a_partial_file_cut_short_while_it_downloads_is_not_taken_as_complete() {
    let b = seven_of_eight(17);
    // Someone cuts the file to its first three groups.
    let f = fs::OpenOptions::new().write(true).open(&b.partial).unwrap();
    f.set_len(3 * GROUP_SIZE).unwrap();
    drop(f);
    b.last_group_finds_four_groups_lost();
    let info = b.to.info(&b.hash).unwrap();
    assert!(!info.complete);
    assert_eq!(info.verified, GroupRanges::from_range(0..3));
    b.fetch_again(3..8);
}

/// A download of an 8-group blob into `f1` in a temporary directory, its
/// first three groups (`some`) received; `f2` is another output there.
struct ThreeOfEight {
    from: Store,
    d: Vec<u8>,
    hash: blake3::Hash,
    dir: tempfile::TempDir,
    f1: std::path::PathBuf,
    f2: std::path::PathBuf,
    to: Store,
    some: GroupRanges,
}

fn three_of_eight_into_f1(seed: u64) -> ThreeOfEight {
    let from = Store::in_memory();
    let d = data(8 * GROUP_SIZE as usize, seed);
    let hash = from.import_bytes(&d, "x").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (f1, f2) = (dir.path().join("f1"), dir.path().join("f2"));
    let to = Store::open(&dir.path().join("store")).unwrap();
    to.begin_download(&hash, BlobKind::Raw, Some(&f1), true)
        .unwrap();
    let some = GroupRanges::from_range(0..3);
    let (_, bytes) = encode(&from, &hash, &some);
    receive(&to, &hash, &some, &bytes).unwrap();
    ThreeOfEight {
        from,
        d,
        hash,
        dir,
        f1,
        f2,
        to,
        some,
    }
}

/// A partial download begun again for another output moves there and
/// finishes there alone: it resumed into the first output's file, which
/// appeared too once it finished (a review). One a download has in hand
/// stays, one begun again for the store stays, and a symlink put in its
/// place is not moved.
#[test]
fn a_partial_download_begun_again_elsewhere_moves_there() {
    let ThreeOfEight {
        from,
        d,
        hash,
        dir,
        f1,
        f2,
        to,
        some,
    } = three_of_eight_into_f1(18);
    let partial = partial_name;
    // In hand: stays.
    to.begin_download(&hash, BlobKind::Raw, Some(&f2), true)
        .unwrap();
    assert!(partial(&f1).exists() && !partial(&f2).exists());
    to.end_download(&hash);
    // Not into the store (a `cat`, a get without -o): it stays.
    to.begin_download(&hash, BlobKind::Raw, None, true).unwrap();
    to.end_download(&hash);
    assert!(partial(&f1).exists() && !partial(&f2).exists());
    // A symlink put in its place is not moved.
    let victim = dir.path().join("victim");
    fs::write(&victim, b"not yours").unwrap();
    let real = dir.path().join("real");
    fs::rename(partial(&f1), &real).unwrap();
    std::os::unix::fs::symlink(&victim, partial(&f1)).unwrap();
    to.begin_download(&hash, BlobKind::Raw, Some(&f2), true)
        .unwrap();
    to.end_download(&hash);
    assert!(!partial(&f2).exists(), "a symlink was moved");
    fs::remove_file(partial(&f1)).unwrap();
    fs::rename(&real, partial(&f1)).unwrap();
    // Out to f2.
    to.begin_download(&hash, BlobKind::Raw, Some(&f2), true)
        .unwrap();
    assert!(!partial(&f1).exists() && partial(&f2).exists());
    assert_eq!(to.info(&hash).unwrap().verified, some);
    let rest = GroupRanges::from_range(3..8);
    let (_, bytes) = encode(&from, &hash, &rest);
    receive(&to, &hash, &rest, &bytes).unwrap();
    assert!(to.info(&hash).unwrap().complete);
    assert_eq!(fs::read(&f2).unwrap(), d);
    assert!(fs::symlink_metadata(&f1).is_err());
    assert_eq!(fs::read(&victim).unwrap(), b"not yours");
    assert!(to.verify(&hash).unwrap());
    // And after a restart, where it went.
    to.close().unwrap();
    let to = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(to.read_all(&hash).unwrap(), d);
}

/// A move of a partial download to another output is recorded before it
/// is made: a move whose record fails is not made (made first, its file
/// was at the new place and its record at the old one, where the next open
/// made an empty file: a review), and a stop between the record and the
/// move leaves it to the next open, which makes it.
#[test]
fn a_partial_download_moved_part_way_is_found_at_open() {
    let ThreeOfEight {
        from,
        d,
        hash,
        dir,
        f1,
        f2,
        to,
        some,
    } = three_of_eight_into_f1(23);
    to.end_download(&hash);
    to.fail_commits(true);
    assert!(
        to.begin_download(&hash, BlobKind::Raw, Some(&f2), true)
            .is_err()
    );
    to.fail_commits(false);
    to.end_download(&hash);
    assert!(partial_name(&f1).exists(), "moved, its record failed");
    assert!(!partial_name(&f2).exists());
    // Recorded, not made: the next open makes it.
    to.record_move_only(&hash, &f2);
    to.crash();
    let to = Store::open(&dir.path().join("store")).unwrap();
    assert!(!partial_name(&f1).exists() && partial_name(&f2).exists());
    assert_eq!(to.info(&hash).unwrap().verified, some);
    // Made, the move is no longer recorded: a file put at the old place
    // afterwards (another data dir's download there) is not taken.
    to.crash();
    fs::write(partial_name(&f1), b"another download's").unwrap();
    let to = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(fs::read(partial_name(&f1)).unwrap(), b"another download's");
    assert_eq!(to.info(&hash).unwrap().verified, some);
    fs::remove_file(partial_name(&f1)).unwrap();
    to.begin_download(&hash, BlobKind::Raw, Some(&f2), true)
        .unwrap();
    let rest = GroupRanges::from_range(3..8);
    let (_, bytes) = encode(&from, &hash, &rest);
    receive(&to, &hash, &rest, &bytes).unwrap();
    assert_eq!(fs::read(&f2).unwrap(), d);
    assert!(fs::symlink_metadata(&f1).is_err());
    assert!(fs::symlink_metadata(partial_name(&f1)).is_err());
}

/// A partial download's file cut short and lengthened again over a hole
/// (a write past the cut, from a second stream) is not finished as the
/// wrong bytes: the groups in the hole are checked again at the end, and
/// fetched again (a review).
#[test]
fn a_hole_in_a_partial_file_is_found_before_it_is_finished() {
    let b = seven_of_eight(19);
    let f = fs::OpenOptions::new().write(true).open(&b.partial).unwrap();
    f.set_len(3 * GROUP_SIZE).unwrap();
    f.set_len(7 * GROUP_SIZE).unwrap();
    let holes_seen =
        rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0)).is_ok_and(|h| h < 7 * GROUP_SIZE);
    drop(f);
    if !holes_seen {
        eprintln!("skipping: this filesystem does not report holes (SEEK_HOLE)");
        return;
    }
    b.last_group_finds_four_groups_lost();
    b.fetch_again(3..7);
}

/// Two downloads of one blob at once (two gets of the same content on one
/// node) send it twice: the stream that came second wrote on into the
/// file after the first had finished it, renamed it into place and taken
/// its stamp, and the finished file was then refused as one the user
/// changed. Streams of a finished blob write nothing now.
#[test]
fn two_streams_of_one_blob_leave_its_finished_file_as_it_was_recorded() {
    let from = Store::in_memory();
    let d = data(64 * GROUP_SIZE as usize + 11, 16);
    let hash = from.import_bytes(&d, "x").unwrap();
    let all = GroupRanges::from_range(0..65);
    let (_, bytes) = encode(&from, &hash, &all);
    let rt = rt();
    for round in 0..12 {
        let dir = tempfile::tempdir().unwrap();
        let to = Store::open(&dir.path().join("s")).unwrap();
        let target = dir.path().join("out.bin");
        to.begin_download(&hash, BlobKind::Raw, Some(&target), true)
            .unwrap();
        rt.block_on(async {
            // The second stream comes slowly through a pipe: its last
            // pieces come after the first stream finished the blob.
            let (mut tx, rx) = tokio::io::duplex(64 * 1024);
            let slow = {
                let (to, all) = (to.clone(), all.clone());
                tokio::spawn(async move { to.receive_ranges(&hash, &all, rx).await })
            };
            let half = bytes.len() / 2;
            tokio::io::AsyncWriteExt::write_all(&mut tx, &bytes[..half])
                .await
                .unwrap();
            to.receive_ranges(&hash, &all, &bytes[..]).await.unwrap();
            for piece in bytes[half..].chunks(64 * 1024) {
                tokio::io::AsyncWriteExt::write_all(&mut tx, piece)
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(round % 3)).await;
            }
            drop(tx);
            slow.await.unwrap().unwrap();
        });
        let info = to.info(&hash).unwrap();
        assert!(info.complete && !info.corrupt, "round {round}: {info:?}");
        let mut out = Vec::new();
        let exported = to.export_blob(&hash, &mut out);
        assert!(exported.is_ok(), "round {round}: {exported:?}");
        assert!(out == d, "round {round}: wrong bytes");
        assert!(to.verify(&hash).unwrap(), "round {round}");
    }
}

#[test]
fn concurrent_receivers_with_disjoint_ranges() {
    let from = Store::in_memory();
    let size = 100 * GROUP_SIZE as usize + 3;
    let d = data(size, 12);
    let hash = from.import_bytes(&d, "x").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let to = Store::open(dir.path()).unwrap();
    let target = dir.path().join("out.bin");
    to.begin_download(&hash, BlobKind::Raw, Some(&target), true)
        .unwrap();
    let mut events = to.subscribe();
    let parts: Vec<GroupRanges> = (0..4)
        .map(|i| GroupRanges::from_groups((0..101).filter(|g| g % 4 == i)))
        .collect();
    let streams: Vec<(GroupRanges, Vec<u8>)> =
        parts.iter().map(|p| encode(&from, &hash, p)).collect();
    rt().block_on(async {
        let mut tasks = Vec::new();
        for (r, bytes) in streams {
            let to = to.clone();
            tasks.push(tokio::spawn(async move {
                to.receive_ranges(&hash, &r, &bytes[..]).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    let info = to.info(&hash).unwrap();
    assert!(info.complete);
    assert_eq!(fs::read(&target).unwrap(), d);
    assert!(!dir.path().join("out.bin.shoal-partial").exists());
    let mut verified = 0;
    let mut complete = false;
    while let Ok(e) = events.try_recv() {
        match e {
            StoreEvent::Verified { groups, .. } => verified += groups.count(),
            StoreEvent::Complete { hash: h } => complete = h == hash,
            StoreEvent::Added { hash: h } => assert_ne!(h, hash, "a download told as an import"),
        }
    }
    assert_eq!(verified, 101);
    assert!(complete);
    // The target is now an in-place reference.
    let mut out = Vec::new();
    to.export_blob(&hash, &mut out).unwrap();
    assert_eq!(out, d);
}

/// Large contiguous runs take the `O_DIRECT` path (batches of 1 MiB,
/// aligned), the file's unaligned end the page cache; both land right,
/// also from several streams at once and at offsets not on a batch edge.
#[test]
fn large_runs_to_a_file_round_trip() {
    let from = Store::in_memory();
    let size = 5 * (1 << 20) + 3;
    let d = data(size, 13);
    let hash = from.import_bytes(&d, "big").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let to = Store::open(dir.path()).unwrap();
    let target = dir.path().join("big.bin");
    to.begin_download(&hash, BlobKind::Raw, Some(&target), true)
        .unwrap();
    let groups = (size as u64).div_ceil(GROUP_SIZE);
    let cuts = [0, 37, 200, groups];
    let streams: Vec<(GroupRanges, Vec<u8>)> = cuts
        .windows(2)
        .map(|w| encode(&from, &hash, &GroupRanges::from_groups(w[0]..w[1])))
        .collect();
    rt().block_on(async {
        let mut tasks = Vec::new();
        for (r, bytes) in streams {
            let to = to.clone();
            tasks.push(tokio::spawn(async move {
                to.receive_ranges(&hash, &r, &bytes[..]).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    assert!(to.info(&hash).unwrap().complete);
    assert_eq!(fs::read(&target).unwrap(), d);
    let mut out = Vec::new();
    to.export_blob(&hash, &mut out).unwrap();
    assert_eq!(out, d);
}

fn partial_survives(crash: bool) {
    let from = Store::in_memory();
    let size = 40 * GROUP_SIZE as usize;
    let d = data(size, 13);
    let hash = from.import_bytes(&d, "x").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let some = GroupRanges::from_groups([0, 1, 2, 17, 39]);
    {
        let to = Store::open(dir.path()).unwrap();
        to.begin_download(&hash, BlobKind::Raw, None, true).unwrap();
        let (_, bytes) = encode(&from, &hash, &some);
        receive(&to, &hash, &some, &bytes).unwrap();
        if crash {
            to.crash();
        } else {
            to.close().unwrap();
        }
    }
    let to = Store::open(dir.path()).unwrap();
    let info = to.info(&hash).unwrap();
    assert!(!info.complete);
    assert_eq!(info.verified, some, "crash {crash}");
    let rest = GroupRanges::from_range(0..40).difference(&some);
    let (_, bytes) = encode(&from, &hash, &rest);
    assert_eq!(receive(&to, &hash, &rest, &bytes).unwrap(), rest);
    assert!(to.info(&hash).unwrap().complete);
    assert_eq!(to.read_all(&hash).unwrap(), d);
}

/// gc says what a partial download took on disk (its file, which may be
/// allocated whole up front, and its outboard), not its whole size on top
/// (it said 57 MiB freed for 29 MiB on disk).
#[test]
fn gc_of_a_partial_download_counts_what_it_took() {
    let from = Store::in_memory();
    let groups = 40u64;
    let size = groups as usize * GROUP_SIZE as usize;
    let hash = from.import_bytes(&data(size, 14), "x").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let to = Store::open(dir.path()).unwrap();
    to.begin_download(&hash, BlobKind::Raw, None, false)
        .unwrap();
    let some = GroupRanges::from_range(0..4);
    let (_, bytes) = encode(&from, &hash, &some);
    receive(&to, &hash, &some, &bytes).unwrap();
    to.end_download(&hash);
    let report = to.gc().unwrap();
    assert_eq!(report.blobs, 1);
    // At least the four groups written; at most the file allocated whole
    // and a small outboard.
    assert!(
        report.bytes >= 4 * GROUP_SIZE && report.bytes < size as u64 + 2 * GROUP_SIZE,
        "freed {} bytes of a partial holding 4 of {groups} groups",
        report.bytes
    );
}

#[test]
fn partial_blob_survives_reopen() {
    partial_survives(false);
}

#[test]
fn partial_blob_survives_crash() {
    partial_survives(true);
}

#[test]
fn claims_without_data_are_dropped_on_open() {
    let from = Store::in_memory();
    let d = data(8 * GROUP_SIZE as usize, 14);
    let hash = from.import_bytes(&d, "x").unwrap();
    let dir = tempfile::tempdir().unwrap();
    {
        let to = Store::open(dir.path()).unwrap();
        let all = GroupRanges::from_range(0..4);
        let (_, bytes) = encode(&from, &hash, &all);
        receive(&to, &hash, &all, &bytes).unwrap();
        to.close().unwrap();
    }
    // Simulate a power cut: the claims were saved but group 2's data is lost.
    let data_file = dir
        .path()
        .join("data")
        .join(format!("{}.data", hash.to_hex()));
    let mut bytes = fs::read(&data_file).unwrap();
    bytes[2 * GROUP_SIZE as usize + 5] ^= 1;
    fs::write(&data_file, bytes).unwrap();
    let to = Store::open(dir.path()).unwrap();
    assert_eq!(
        to.info(&hash).unwrap().verified,
        GroupRanges::from_groups([0, 1, 3])
    );
}

#[test]
fn second_open_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _a = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Locked(_)), "{err}");
    assert!(err.to_string().contains("in use"));
}

#[test]
fn gc_keeps_pinned_and_frees_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let keep = store.import_bytes(&data(100_000, 1), "keep").unwrap();
    let drop_big = store.import_bytes(&data(100_000, 2), "drop").unwrap();
    let drop_small = store.import_bytes(b"small", "small").unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/member"), data(50_000, 3)).unwrap();
    let col = store.import_dir(&tree, ImportMode::Copy).unwrap();
    let member = blake3::hash(&data(50_000, 3));
    store.unpin(&member).unwrap();
    store.unpin(&drop_big).unwrap();
    store.unpin(&drop_small).unwrap();
    let in_flight = blake3::hash(b"in flight");
    store
        .begin_download(&in_flight, BlobKind::Raw, None, true)
        .unwrap();
    store.unpin(&in_flight).unwrap();
    let report = store.gc().unwrap();
    assert_eq!(report.blobs, 2);
    assert!(report.bytes >= 100_005, "{report:?}");
    assert!(store.info(&keep).is_some());
    assert!(store.info(&col).is_some());
    assert!(
        store.info(&member).is_some(),
        "member of a pinned collection"
    );
    assert!(store.info(&in_flight).is_some(), "download in flight");
    assert!(store.info(&drop_big).is_none() && store.info(&drop_small).is_none());
    assert!(
        !dir.path()
            .join("s/data")
            .join(format!("{}.data", drop_big.to_hex()))
            .exists()
    );
    // Set aside under the lock, deleted after it.
    assert_eq!(tmp_names(&dir.path().join("s")), Vec::<String>::new());
    store.unpin(&col).unwrap();
    store.end_download(&in_flight);
    assert_eq!(store.gc().unwrap().blobs, 3);
    assert_eq!(store.list().len(), 1);
}

#[test]
fn flipped_byte_on_disk_is_reported_and_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let d = data(300_000, 5);
    let hash = store.import_bytes(&d, "precious.bin").unwrap();
    assert!(store.verify(&hash).unwrap());
    let f = dir
        .path()
        .join("s/data")
        .join(format!("{}.data", hash.to_hex()));
    let mut bytes = fs::read(&f).unwrap();
    bytes[200_000] ^= 0x10;
    fs::write(&f, bytes).unwrap();
    // Serving notices on the way (validating encoder) and refuses.
    let all = GroupRanges::from_range(0..group_count(d.len() as u64));
    let mut out = Vec::new();
    let err = rt()
        .block_on(store.send_ranges(&hash, &all, &mut out))
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("precious.bin"));
    // Nothing from the bad group (12) was sent.
    assert!(out.len() < 8 + 12 * GROUP_SIZE as usize + 64 * 20);
    assert!(store.available(&hash, &all).is_none());
    // Marked: listed as corrupt, not claimed to peers asking for blobs
    // whole, not servable; not a changed file in place (it is owned).
    assert!(store.info(&hash).unwrap().corrupt);
    assert!(!store.can_serve(&hash));
    assert!(!store.source_changed(&hash));
    assert!(matches!(store.presence(&[hash])[..], [Presence::Absent]));
    assert!(!store.verify(&hash).unwrap());
    assert_eq!(
        store.verify_all().unwrap(),
        vec![(hash, "precious.bin".to_string())]
    );
    assert!(store.export_blob(&hash, &mut Vec::new()).is_err());
}

/// `read_at` (what `shoal cat` streams) checks what it read against the
/// outboard: a good group reads back exactly, at any offset; one damaged
/// on disk is refused and the blob marked corrupt, never handed out.
#[test]
fn reading_a_blob_damaged_on_disk_hands_out_none_of_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let d = data(300_000, 7);
    let hash = store.import_bytes(&d, "streamed.bin").unwrap();
    for (offset, len) in [(0, 16_384), (1_000, 50_000), (290_000, 100_000)] {
        let got = store.read_at(&hash, offset, len).unwrap();
        let end = (offset as usize + len).min(d.len());
        assert!(got[..] == d[offset as usize..end], "at {offset}");
    }
    let f = dir
        .path()
        .join("s/data")
        .join(format!("{}.data", hash.to_hex()));
    let mut bytes = fs::read(&f).unwrap();
    bytes[200_000] ^= 0x10;
    fs::write(&f, bytes).unwrap();
    // A read that touches the damaged group, even a byte of it away
    // from the flip, is refused.
    let err = store.read_at(&hash, 199_000, 100).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(store.info(&hash).unwrap().corrupt);
    assert!(!store.can_serve(&hash));
}

/// `add --copy` of a file added in place before makes the store's copy
/// the blob's data: the file may then go. The copy was written and never
/// recorded: with the file gone the blob was lost, and gc never freed the
/// copy (a review). The other way round, the copy stays the data.
#[test]
fn a_copy_of_a_blob_held_in_place_becomes_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("s");
    let store = Store::open(&store_dir).unwrap();
    for (i, len) in [3_000usize, 300_000].into_iter().enumerate() {
        let d = data(len, 70 + i as u64);
        let path = dir.path().join(format!("f{i}.bin"));
        fs::write(&path, &d).unwrap();
        let hash = store.import_file(&path, ImportMode::InPlace).unwrap();
        assert_eq!(store.import_file(&path, ImportMode::Copy).unwrap(), hash);
        fs::remove_file(&path).unwrap();
        assert!(store.verify(&hash).unwrap(), "{len} bytes");
        assert_eq!(store.read_all(&hash).unwrap(), d);
        // In place again: the copy stays its data.
        fs::write(&path, &d).unwrap();
        assert_eq!(store.import_file(&path, ImportMode::InPlace).unwrap(), hash);
        fs::remove_file(&path).unwrap();
        assert!(store.verify(&hash).unwrap(), "{len} bytes");
        store.unpin(&hash).unwrap();
    }
    store.gc().unwrap();
    assert!(store.list().is_empty());
    let left: Vec<_> = fs::read_dir(store_dir.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files no record names: {left:?}");
}

/// A directory kept private (a node's data dir: its secret key) is left
/// out of a directory added around it, and cannot be added itself, nor a
/// file in it; the store's own directory is private from the start.
#[test]
fn private_directories_are_never_added() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let data_dir = home.join(".local/share/shoal");
    fs::create_dir_all(&data_dir).unwrap();
    fs::write(data_dir.join("identity.key"), b"secret").unwrap();
    fs::write(home.join("notes.txt"), b"mine").unwrap();
    let store = Store::open(&data_dir.join("store")).unwrap();
    store.keep_private(&data_dir).unwrap();
    let col = store.import_dir(&home, ImportMode::InPlace).unwrap();
    let paths: Vec<String> = store
        .read_manifest(&col)
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert!(paths.contains(&"notes.txt".to_string()), "{paths:?}");
    assert!(
        paths.iter().all(|p| !p.starts_with(".local/share/shoal/")),
        "{paths:?}"
    );
    for p in [data_dir.clone(), data_dir.join("store")] {
        let e = store.import_dir(&p, ImportMode::Copy).unwrap_err();
        assert!(matches!(e, StoreError::Private(_)), "{e}");
    }
    let e = store
        .import_file(&data_dir.join("identity.key"), ImportMode::Copy)
        .unwrap_err();
    assert!(matches!(e, StoreError::Private(_)), "{e}");
    // Another store, with nothing kept private but its own directory.
    let other = Store::open(&dir.path().join("other")).unwrap();
    assert!(
        other
            .import_file(&data_dir.join("identity.key"), ImportMode::Copy)
            .is_ok()
    );
    let e = other
        .import_dir(&dir.path().join("other"), ImportMode::Copy)
        .unwrap_err();
    assert!(matches!(e, StoreError::Private(_)), "{e}");
}

/// A file in place that grew is found corrupt by verify, small or large:
/// a small one's check read past its size and panicked (found by a
/// review, through `shoal verify` and a peer's get alike).
#[test]
fn an_in_place_file_that_grew_verifies_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    for (i, len) in [1_000usize, 200_000, crate::tree::BATCH + 5]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("grows{i}.bin"));
        fs::write(&path, data(len, 40 + i as u64)).unwrap();
        let hash = store.import_file(&path, ImportMode::InPlace).unwrap();
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, &data(crate::tree::BATCH * 2, 1)).unwrap();
        drop(f);
        assert!(!store.verify(&hash).unwrap(), "{len} bytes");
        assert!(store.info(&hash).unwrap().corrupt);
    }
}

#[test]
fn in_place_file_changed_after_import_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let path = dir.path().join("movie.bin");
    let d = data(200_000, 6);
    fs::write(&path, &d).unwrap();
    let hash = store.import_file(&path, ImportMode::InPlace).unwrap();
    // No second copy.
    assert!(
        !dir.path()
            .join("s/data")
            .join(format!("{}.data", hash.to_hex()))
            .exists()
    );
    let all = GroupRanges::from_range(0..group_count(d.len() as u64));
    assert!(store.available(&hash, &all).is_some());
    assert!(store.can_serve(&hash) && !store.source_changed(&hash));
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut changed = d.clone();
    changed[5] ^= 1;
    fs::write(&path, &changed).unwrap();
    assert!(store.available(&hash, &all).is_none());
    assert!(!store.can_serve(&hash) && store.source_changed(&hash));
    // Changed is not corrupt (yet): nothing has read the new bytes.
    assert!(!store.info(&hash).unwrap().corrupt);
    let err = rt()
        .block_on(store.send_ranges(&hash, &all, Vec::new()))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(_) | StoreError::SourceChanged(_)),
        "{err}"
    );
    assert!(matches!(
        store.read_at(&hash, 0, 10),
        Err(StoreError::SourceChanged(_))
    ));
    assert!(!store.verify(&hash).unwrap());
    // Same size and mtime but other bytes: the validating encoder refuses.
    let path2 = dir.path().join("b.bin");
    fs::write(&path2, &d).unwrap();
    let h2 = store.import_file(&path2, ImportMode::InPlace).unwrap();
    assert_eq!(h2, hash);
    let m = fs::metadata(&path2).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&path2).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &[d[70_000] ^ 1], 70_000).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(m.modified().unwrap()))
        .unwrap();
    drop(f);
    let res = rt().block_on(store.send_ranges(&hash, &all, Vec::new()));
    assert!(matches!(res, Err(StoreError::Corrupt { .. })), "{res:?}");
    // A vanished file is not served either.
    fs::remove_file(&path2).unwrap();
    assert!(store.available(&hash, &all).is_none());
}

#[test]
fn a_file_hashed_before_the_store_opens_is_recorded_as_by_import_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let d = data(1_000_000, 21);
    fs::write(&path, &d).unwrap();
    // Hashed with no store open yet, then recorded.
    let hashed = crate::HashedFile::new(&path).unwrap();
    assert_eq!(hashed.hash(), blake3::hash(&d));
    assert_eq!(hashed.size(), d.len() as u64);
    let store = Store::open(&dir.path().join("s")).unwrap();
    let hash = store.import_hashed(hashed).unwrap();
    assert_eq!(hash, blake3::hash(&d));
    let info = store.info(&hash).unwrap();
    assert!(info.complete && info.pinned);
    assert_eq!(info.name, "big.bin");
    assert_eq!(store.read_all(&hash).unwrap(), d);
    // The outboard was written: a range in the middle streams and verifies.
    let mid = GroupRanges::from_range(20..30);
    let (have, bytes) = encode(&store, &hash, &mid);
    assert_eq!(have, mid);
    let other = Store::in_memory();
    assert_eq!(receive(&other, &hash, &mid, &bytes).unwrap(), mid);
    // It survives a reopen like any in-place import.
    drop(store);
    let store = Store::open(&dir.path().join("s")).unwrap();
    assert!(store.verify(&hash).unwrap());

    // A file changed between hashing and recording is refused, and
    // nothing is recorded.
    let path2 = dir.path().join("moving.bin");
    fs::write(&path2, data(300_000, 22)).unwrap();
    let hashed = crate::HashedFile::new(&path2).unwrap();
    let h2 = hashed.hash();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&path2, data(300_001, 22)).unwrap();
    let err = store.import_hashed(hashed).unwrap_err();
    assert!(matches!(err, StoreError::ChangedDuringImport(_)), "{err}");
    assert!(store.info(&h2).is_none());

    // Only regular files.
    let err = crate::HashedFile::new(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Unsupported(_)), "{err}");
}

/// A FIFO named to add, or put where a file added in place was, is
/// refused or found changed at once: opening one for reading waited, for
/// ever, for a writer (`shoal add fifo` hung with no word).
#[test]
fn a_fifo_is_refused_at_once_not_waited_on() {
    use std::os::unix::ffi::OsStrExt;
    let mkfifo = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let file = dir.path().join("file");
    fs::write(&file, data(100_000, 3)).unwrap();
    let h = store.import_file(&file, ImportMode::InPlace).unwrap();
    fs::remove_file(&file).unwrap();
    mkfifo(&file);
    let (tx, rx) = std::sync::mpsc::channel();
    let s = store.clone();
    std::thread::spawn(move || {
        let add = s.import_file(&fifo, ImportMode::InPlace).map(|_| ());
        let copy = s.import_file(&fifo, ImportMode::Copy).map(|_| ());
        let hashed = crate::HashedFile::new(&fifo).map(|_| ());
        let read = s.read_all(&h).map(|_| ());
        let verify = s.verify(&h);
        let _ = tx.send((add, copy, hashed, read, verify));
    });
    let (add, copy, hashed, read, verify) = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("a FIFO was waited on");
    for r in [add, copy, hashed] {
        assert!(matches!(r, Err(StoreError::Unsupported(_))), "{r:?}");
    }
    assert!(read.is_err(), "{read:?}");
    assert!(!matches!(verify, Ok(true)), "{verify:?}");
}

/// A directory holding a name its collection cannot carry (a newline, a
/// backslash, bytes that are not UTF-8) is refused before anything is
/// hashed, naming the file: it failed at the end as a "bad manifest", and
/// the files hashed till then stayed recorded.
#[test]
fn a_directory_with_a_name_no_collection_carries_is_refused_first() {
    use std::os::unix::ffi::OsStrExt;
    let bad_names: [&std::ffi::OsStr; 3] = [
        "new\nline.txt".as_ref(),
        "back\\slash".as_ref(),
        std::ffi::OsStr::from_bytes(b"latin1-\xe9"),
    ];
    for (i, bad) in bad_names.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir_all(shared.join("sub")).unwrap();
        fs::write(shared.join("a.txt"), b"fine").unwrap();
        fs::write(shared.join("sub").join(bad), b"bad name").unwrap();
        let err = store.import_dir(&shared, ImportMode::InPlace).unwrap_err();
        match &err {
            StoreError::UnsharableName { path, .. } => {
                assert_eq!(path, &shared.join("sub").join(bad), "{i}")
            }
            other => panic!("{i}: {other}"),
        }
        assert!(err.to_string().contains("rename it"), "{err}");
        assert!(store.list().is_empty(), "{i}: {:?}", store.list());
    }
}

#[test]
fn a_pseudo_file_is_refused_as_one_not_as_a_changed_file() {
    // procfs says its files are empty and then gives bytes: not a file
    // that changed (its size and time held), and nothing is recorded.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let status = Path::new("/proc/self/status");
    assert_eq!(fs::metadata(status).unwrap().len(), 0);
    for mode in [ImportMode::InPlace, ImportMode::Copy] {
        let err = store.import_file(status, mode).unwrap_err();
        assert!(
            matches!(err, StoreError::SizeUntrue(_, 0)),
            "{mode:?}: {err}"
        );
        assert!(err.to_string().contains("/proc or /sys"), "{err}");
    }
    let err = crate::HashedFile::new(status).unwrap_err();
    assert!(matches!(err, StoreError::SizeUntrue(_, 0)), "{err}");
    assert!(store.list().is_empty());
}

#[test]
fn directories_round_trip_as_collections() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::create_dir_all(src.join("empty/inner")).unwrap();
    fs::write(src.join("a/b/big"), data(100_000, 7)).unwrap();
    fs::write(src.join("a/small"), b"hello").unwrap();
    fs::write(src.join("run.sh"), b"#!/bin/sh\n").unwrap();
    fs::write(src.join("zero"), b"").unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    for mode in [ImportMode::InPlace, ImportMode::Copy] {
        let col = store.import_dir(&src, mode).unwrap();
        assert_eq!(store.info(&col).unwrap().kind, BlobKind::Collection);
        let entries = crate::collection::parse_manifest(&store.read_all(&col).unwrap()).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["a/b/big", "a/small", "empty/inner", "run.sh", "zero"]
        );
        let out = dir.path().join(format!("out-{mode:?}"));
        store.export_collection(&col, &out).unwrap();
        assert_eq!(fs::read(out.join("a/b/big")).unwrap(), data(100_000, 7));
        assert_eq!(fs::read(out.join("a/small")).unwrap(), b"hello");
        assert!(out.join("empty/inner").is_dir());
        assert_eq!(fs::read(out.join("zero")).unwrap(), b"");
        assert!(
            fs::metadata(out.join("run.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o100
                != 0
        );
        assert!(
            fs::metadata(out.join("a/small"))
                .unwrap()
                .permissions()
                .mode()
                & 0o100
                == 0
        );
        assert!(matches!(
            store.export_collection(&col, &out),
            Err(StoreError::Exists(_))
        ));
        // No temporary directory is left behind.
        let leftovers = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("shoal-tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
    }
}

#[test]
fn hostile_collection_is_refused_on_export() {
    use prost::Message;
    use shoal_proto::pb;
    let store = Store::in_memory();
    let member = store.import_bytes(b"evil", "evil").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (i, path) in ["../escape", "/abs", "a/../../b", "a\\b"]
        .into_iter()
        .enumerate()
    {
        let m = pb::Manifest {
            entries: vec![pb::ManifestEntry {
                path: path.into(),
                kind: Some(pb::manifest_entry::Kind::File(pb::FileEntry {
                    size: 4,
                    hash: bytes::Bytes::copy_from_slice(member.as_bytes()),
                    executable: false,
                })),
            }],
            version: crate::collection::MANIFEST_VERSION,
        };
        let col = store.import_bytes(&m.encode_to_vec(), "col").unwrap();
        let out = dir.path().join(format!("out{i}"));
        let err = store.export_collection(&col, &out).unwrap_err();
        assert!(matches!(err, StoreError::Manifest(_)), "{path}: {err}");
        assert!(!out.exists());
    }
    assert!(!dir.path().join("escape").exists());
}

#[test]
fn import_of_a_missing_or_unreadable_file_is_a_clear_error() {
    let store = Store::in_memory();
    let err = store
        .import_file(Path::new("/nonexistent/x"), ImportMode::InPlace)
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = store.import_dir(dir.path(), ImportMode::InPlace);
    assert!(err.is_ok(), "an empty dir is an empty collection");
}

#[test]
fn many_small_files_import_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..500 {
        fs::write(src.join(format!("f{i:04}")), data(4096, i)).unwrap();
    }
    let store = Store::open(&dir.path().join("s")).unwrap();
    let col = store.import_dir(&src, ImportMode::Copy).unwrap();
    assert_eq!(store.list().len(), 501);
    drop(store);
    let store = Store::open(&dir.path().join("s")).unwrap();
    let out = dir.path().join("out");
    store.export_collection(&col, &out).unwrap();
    assert_eq!(fs::read(out.join("f0042")).unwrap(), data(4096, 42));
}

#[test]
fn a_store_in_redbs_v2_format_is_upgraded_and_keeps_its_blobs() {
    use crate::store::{CREATE_V2, open_db};
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("store");
    let d = data(100_000, 3);
    CREATE_V2.set(true);
    let hash = {
        let store = Store::open(&at).unwrap();
        store.import_bytes(&d, "old").unwrap()
    };
    CREATE_V2.set(false);
    let (db, upgraded) = open_db(&at, &at.join("meta.redb")).unwrap();
    assert!(upgraded, "a v2 database is upgraded");
    drop(db);
    let (db, upgraded) = open_db(&at, &at.join("meta.redb")).unwrap();
    assert!(!upgraded, "and only once");
    drop(db);
    let store = Store::open(&at).unwrap();
    assert_eq!(store.read_all(&hash).unwrap(), d);
    // And it takes new blobs after the upgrade, which outlive a reopen.
    let d2 = data(50_000, 4);
    let h2 = store.import_bytes(&d2, "new").unwrap();
    drop(store);
    let store = Store::open(&at).unwrap();
    assert_eq!(store.read_all(&hash).unwrap(), d);
    assert_eq!(store.read_all(&h2).unwrap(), d2);
}

/// A database cut short, or one a killed process left with no header,
/// is an error that says what to do, never a panic; moved away as it
/// says, the store's own copies are recorded again.
#[test]
fn a_damaged_database_is_an_error_that_says_what_to_do_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("store");
    let d = data(100_000, 8);
    let hash = Store::open(&at).unwrap().import_bytes(&d, "kept").unwrap();
    let db = at.join("meta.redb");
    let whole = fs::read(&db).unwrap();
    for damage in ["cut short", "no header"] {
        match damage {
            "cut short" => fs::write(&db, &whole[..whole.len() - 1]).unwrap(),
            _ => fs::write(&db, vec![0u8; whole.len()]).unwrap(),
        }
        let err = std::panic::catch_unwind(|| Store::open(&at))
            .unwrap_or_else(|_| panic!("{damage}: opening panicked"))
            .err()
            .unwrap_or_else(|| panic!("{damage}: opened"));
        assert!(matches!(err, StoreError::Damaged { .. }), "{damage}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains("meta.redb") && msg.contains("move it away"),
            "{msg}"
        );
    }
    fs::rename(&db, at.join("meta.redb.damaged")).unwrap();
    let store = Store::open(&at).unwrap();
    assert_eq!(store.read_all(&hash).unwrap(), d);
}

/// A new database is made under another name and linked into place: a
/// leftover of a process killed while making one is not the database,
/// and is cleared once its process is gone.
#[test]
fn a_half_made_database_of_a_killed_process_is_not_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("store");
    fs::create_dir_all(&at).unwrap();
    // No process has this id (above the kernel's pid_max limit).
    let leftover = at.join("meta.redb.new-4194305");
    fs::write(&leftover, vec![0u8; 1 << 20]).unwrap();
    let store = Store::open(&at).unwrap();
    let h = store.import_bytes(&data(1000, 9), "x").unwrap();
    drop(store);
    assert!(!leftover.exists(), "the leftover stayed");
    let names: Vec<String> = fs::read_dir(&at)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("meta.redb"))
        .collect();
    assert_eq!(names, vec!["meta.redb".to_string()]);
    assert!(Store::open(&at).unwrap().info(&h).unwrap().complete);
}

/// Files in `data/` of blobs the store has no record of (a process killed
/// between putting a copy there and recording it) are freed by gc; the
/// files of blobs it knows stay.
#[test]
fn gc_frees_files_the_store_has_no_record_of() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("store");
    let kept = data(200_000, 10);
    let store = Store::open(&at).unwrap();
    let h = store.import_bytes(&kept, "kept").unwrap();
    let stray = blake3::hash(b"never recorded");
    for ext in ["data", "obao"] {
        fs::write(
            at.join("data").join(format!("{}.{ext}", stray.to_hex())),
            vec![1u8; 50_000],
        )
        .unwrap();
    }
    // Names that are not a blob's are not the store's to free; nor is a
    // whole copy (one a recovery that ran out of space left: maybe the
    // only one).
    fs::write(at.join("data").join("notes.txt"), b"mine").unwrap();
    let whole = data(30_000, 12);
    let whole_at = at
        .join("data")
        .join(format!("{}.data", blake3::hash(&whole).to_hex()));
    fs::write(&whole_at, &whole).unwrap();
    let report = store.gc().unwrap();
    assert_eq!(report.blobs, 1);
    assert!(report.bytes >= 100_000, "{report:?}");
    assert!(
        !at.join("data")
            .join(format!("{}.data", stray.to_hex()))
            .exists()
    );
    assert!(at.join("data").join("notes.txt").exists());
    assert!(
        fs::read(&whole_at).unwrap() == whole,
        "a whole copy was freed"
    );
    assert_eq!(store.read_all(&h).unwrap(), kept);
    assert_eq!(store.gc().unwrap().blobs, 0);
}

/// gc deletes a blob's files before its record: when the record's removal
/// cannot be committed (a full disk), the records stay with their files
/// gone, the next gc frees them, and no file is left without a record
/// (one that came back at the next open, as a recovered blob, when it was
/// the store's last).
#[test]
fn gc_stopped_before_its_commit_leaves_no_file_without_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("store");
    let store = Store::open(&at).unwrap();
    let h = store.import_bytes(&data(300_000, 11), "gone").unwrap();
    store.unpin(&h).unwrap();
    store.fail_commits(true);
    assert!(store.gc().is_err());
    assert_eq!(tmp_names(&at), Vec::<String>::new(), "files set aside stay");
    // Its files gone, it is no longer taken as whole.
    assert!(store.info(&h).unwrap().corrupt);
    assert!(!store.can_serve(&h));
    store.crash();
    let blob_files = || {
        fs::read_dir(at.join("data"))
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().starts_with(&h.to_hex()[..])
            })
            .count()
    };
    assert_eq!(blob_files(), 0, "gc kept the files of a blob it removes");
    let store = Store::open(&at).unwrap();
    assert!(
        store
            .list()
            .iter()
            .all(|b| !b.name.starts_with("recovered-")),
        "the removed blob came back as recovered"
    );
    assert_eq!(store.gc().unwrap().blobs, 1);
    assert!(store.list().is_empty());
}

/// Names in the store's data directory that start with "tmp-".
fn tmp_names(store_dir: &Path) -> Vec<String> {
    fs::read_dir(store_dir.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tmp-"))
        .collect()
}

#[test]
fn a_failed_rename_into_the_store_leaves_no_temporary_file() {
    use crate::WholeBlob;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data_dir = dir.path().join("data");
    // A directory (not empty) where a blob's file or outboard goes makes
    // the rename into place fail.
    let block = |name: String| {
        let d = data_dir.join(name);
        fs::create_dir_all(d.join("x")).unwrap();
    };
    let refused = |err: StoreError| {
        assert!(err.to_string().contains("renaming"), "{err}");
        assert_eq!(tmp_names(dir.path()), Vec::<String>::new());
    };
    // import_bytes: its data file, then its outboard.
    for (seed, ext) in [(1, "data"), (2, "obao")] {
        let a = data(100_000, seed);
        let h = blake3::hash(&a);
        block(format!("{}.{ext}", h.to_hex()));
        refused(store.import_bytes(&a, "a").unwrap_err());
        assert!(store.info(&h).is_none());
    }
    // insert_whole: a store-owned file.
    let c = data(50_000, 3);
    let hc = blake3::hash(&c);
    block(format!("{}.data", hc.to_hex()));
    let err = store
        .insert_whole(vec![WholeBlob {
            hash: hc,
            data: c.into(),
            target: None,
            pin: true,
        }])
        .unwrap_err();
    refused(err);
    assert!(store.info(&hc).is_none());
    // The store goes on working.
    let d = data(100_000, 4);
    let hd = store.import_bytes(&d, "d").unwrap();
    assert_eq!(store.read_all(&hd).unwrap(), d);
}

#[test]
fn blobs_whose_files_vanished_or_changed_are_forgotten_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let kept = dir.path().join("kept.bin");
    let gone = dir.path().join("gone.bin");
    let edited = dir.path().join("edited.bin");
    for (i, p) in [&kept, &gone, &edited].into_iter().enumerate() {
        fs::write(p, data(50_000, i as u64 + 1)).unwrap();
    }
    let hashes = {
        let store = Store::open(&sdir).unwrap();
        let hashes: Vec<blake3::Hash> = [&kept, &gone, &edited]
            .into_iter()
            .map(|p| store.import_file(p, ImportMode::InPlace).unwrap())
            .collect();
        let owned = store.import_bytes(&data(40_000, 9), "owned").unwrap();
        fs::remove_file(&gone).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&edited, data(50_000, 7)).unwrap();
        let mut all = hashes.clone();
        all.push(owned);
        let forgotten = store.forget_vanished(&all).unwrap();
        assert_eq!(forgotten.len(), 2, "{forgotten:?}");
        assert!(forgotten.contains(&hashes[1]) && forgotten.contains(&hashes[2]));
        assert!(store.info(&hashes[0]).unwrap().complete);
        assert!(store.info(&owned).unwrap().complete);
        // Asked again: nothing more to forget.
        assert!(store.forget_vanished(&all).unwrap().is_empty());
        hashes
    };
    // For good: gone after reopening too.
    let store = Store::open(&sdir).unwrap();
    assert!(store.info(&hashes[0]).is_some());
    assert!(store.info(&hashes[1]).is_none() && store.info(&hashes[2]).is_none());
}

#[test]
fn blobs_found_corrupt_are_salvaged_or_forgotten_so_a_get_fetches_them_again() {
    // A store-owned copy damaged on disk, once found corrupt, stays so
    // (never served); a get used to take it as complete and fail. Then it
    // was forgotten, its file deleted, before any peer was found: a get
    // with no peer lost the copy, its pin and its name. Now what of it
    // still verifies is kept as a partial blob and only the damaged group
    // is fetched again. A file in place is forgotten, but never deleted:
    // it is the user's.
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let placed = dir.path().join("placed.bin");
    fs::write(&placed, data(80_000, 71)).unwrap();
    let copy_src = dir.path().join("copy.bin");
    let copied_bytes = data(10 * GROUP_SIZE as usize + 500, 72);
    fs::write(&copy_src, &copied_bytes).unwrap();
    let store = Store::open(&sdir).unwrap();
    let in_place = store.import_file(&placed, ImportMode::InPlace).unwrap();
    let copied = store.import_file(&copy_src, ImportMode::Copy).unwrap();
    let fine = store.import_bytes(&data(40_000, 73), "fine").unwrap();
    let copy_file = sdir.join("data").join(format!("{}.data", copied.to_hex()));
    let last = 10 * GROUP_SIZE as usize + 9;
    for (f, at) in [
        (&placed, vec![100]),
        (&copy_file, vec![3 * GROUP_SIZE as usize + 7, last]),
    ] {
        let mut b = fs::read(f).unwrap();
        for at in at {
            b[at] ^= 1;
        }
        // Same size and time: only a re-hash sees it.
        let m = fs::metadata(f).unwrap();
        fs::write(f, b).unwrap();
        let f = fs::File::options().write(true).open(f).unwrap();
        f.set_modified(m.modified().unwrap()).unwrap();
    }
    for h in [&in_place, &copied] {
        assert!(!store.verify(h).unwrap());
        assert!(store.info(h).unwrap().corrupt);
    }
    let forgotten = store.forget_vanished(&[in_place, copied, fine]).unwrap();
    assert_eq!(forgotten, vec![in_place]);
    assert!(store.info(&in_place).is_none());
    assert!(placed.exists(), "the user's file is never deleted");
    assert!(store.info(&fine).unwrap().complete);
    let all = GroupRanges::from_range(0..group_count(copied_bytes.len() as u64));
    let damaged = GroupRanges::from_groups([3, 10]);
    let good = all.difference(&damaged);
    let check = |store: &Store| {
        let info = store.info(&copied).unwrap();
        assert!(!info.complete && !info.corrupt, "{info:?}");
        assert!(info.pinned, "its pin stays");
        assert_eq!(info.name, "copy.bin", "its name stays");
        assert_eq!(info.verified, good, "all but the damaged group verify");
    };
    check(&store);
    assert!(copy_file.exists(), "the salvaged copy is kept");
    // Asked again: nothing more to do.
    assert!(store.forget_vanished(&[copied]).unwrap().is_empty());
    check(&store);
    drop(store);
    // For good: a partial after reopening too; the missing group from a
    // good copy completes it.
    let store = Store::open(&sdir).unwrap();
    check(&store);
    store
        .begin_download(&copied, BlobKind::Raw, None, true)
        .unwrap();
    // Its last group is damaged, but its size is known: a peer claiming
    // another one is refused, and what was salvaged stays.
    let liar = Store::in_memory();
    let other = liar
        .import_bytes(&data(3 * GROUP_SIZE as usize, 79), "o")
        .unwrap();
    let (_, lie) = encode(&liar, &other, &GroupRanges::from_groups([0]));
    let err = receive(&store, &copied, &GroupRanges::from_groups([0]), &lie).unwrap_err();
    assert!(matches!(err, ReceiveError::SizeMismatch { .. }), "{err}");
    check(&store);
    let seeder = Store::in_memory();
    seeder.import_bytes(&copied_bytes, "copy.bin").unwrap();
    let (_, bytes) = encode(&seeder, &copied, &damaged);
    receive(&store, &copied, &damaged, &bytes).unwrap();
    let info = store.info(&copied).unwrap();
    assert!(info.complete && !info.corrupt, "{info:?}");
    assert_eq!(store.read_all(&copied).unwrap(), copied_bytes);
    assert!(store.verify(&copied).unwrap());
}

#[test]
fn a_lost_outboard_is_rebuilt_from_whole_data_not_taken_for_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let store = Store::open(&sdir).unwrap();
    let bytes = data(6 * GROUP_SIZE as usize, 74);
    let a = store.import_bytes(&bytes, "a").unwrap();
    let b = store
        .import_bytes(&data(6 * GROUP_SIZE as usize, 75), "b")
        .unwrap();
    let ob = |h: &blake3::Hash| sdir.join("data").join(format!("{}.obao", h.to_hex()));
    let original = fs::read(ob(&a)).unwrap();
    // `verify` rebuilds a deleted outboard, and a damaged one.
    fs::remove_file(ob(&a)).unwrap();
    assert!(store.verify(&a).unwrap());
    assert_eq!(fs::read(ob(&a)).unwrap(), original);
    let mut damaged = original.clone();
    damaged[10] ^= 1;
    fs::write(ob(&a), &damaged).unwrap();
    assert!(store.verify(&a).unwrap());
    assert_eq!(fs::read(ob(&a)).unwrap(), original);
    assert_eq!(store.read_all(&a).unwrap(), bytes);
    // A read without its outboard marks the blob corrupt; a get's salvage
    // finds the data whole, rebuilds the outboard: complete again.
    fs::remove_file(ob(&b)).unwrap();
    assert!(store.read_all(&b).is_err());
    assert!(store.info(&b).unwrap().corrupt);
    assert!(store.forget_vanished(&[b]).unwrap().is_empty());
    let info = store.info(&b).unwrap();
    assert!(info.complete && !info.corrupt, "{info:?}");
    assert!(ob(&b).exists());
    assert!(store.verify(&b).unwrap());
}

#[test]
fn presence_answers_like_info_for_complete_partial_and_unknown_blobs() {
    let from = Store::in_memory();
    let big = data(40 * GROUP_SIZE as usize, 21);
    let small = data(3000, 22);
    let partial = from.import_bytes(&big, "big").unwrap();
    let to = Store::in_memory();
    let complete = to.import_bytes(&small, "small").unwrap();
    to.begin_download(&partial, BlobKind::Raw, None, true)
        .unwrap();
    let some = GroupRanges::from_groups([0, 3]);
    let (_, bytes) = encode(&from, &partial, &some);
    receive(&to, &partial, &some, &bytes).unwrap();
    let unknown = blake3::hash(b"not here");
    let hashes = [complete, partial, unknown, complete];
    assert_eq!(
        to.presence(&hashes),
        [
            Presence::Complete(3000),
            Presence::Partial,
            Presence::Absent,
            Presence::Complete(3000)
        ]
    );
    for (h, p) in hashes.iter().zip(to.presence(&hashes)) {
        let from_info = match to.info(h) {
            None => Presence::Absent,
            Some(i) if !i.complete => Presence::Partial,
            Some(i) => Presence::Complete(i.size),
        };
        assert_eq!(p, from_info);
    }
}

#[test]
fn imports_are_told_to_subscribers_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let mut events = store.subscribe();
    let a = store.import_bytes(&data(70_000, 31), "a").unwrap();
    let src = dir.path().join("tree");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("x"), data(1000, 32)).unwrap();
    fs::write(src.join("sub/y"), data(2000, 33)).unwrap();
    let col = store.import_dir(&src, ImportMode::InPlace).unwrap();
    // Adding what is here already is not news.
    store.import_bytes(&data(70_000, 31), "a again").unwrap();
    let mut added = Vec::new();
    while let Ok(e) = events.try_recv() {
        match e {
            StoreEvent::Added { hash } => added.push(hash),
            other => panic!("an import sent {other:?}"),
        }
    }
    let mut want = vec![
        a,
        blake3::hash(&data(1000, 32)),
        blake3::hash(&data(2000, 33)),
        col,
    ];
    want.sort_by_key(|h| *h.as_bytes());
    added.sort_by_key(|h| *h.as_bytes());
    assert_eq!(added, want);

    // verify: a blob that was whole already is no news; a file in place
    // that was touched (so not served) and found whole is.
    assert!(store.verify(&a).unwrap());
    let x = blake3::hash(&data(1000, 32));
    let f = fs::File::options().write(true).open(src.join("x")).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    assert!(!store.can_serve(&x));
    assert!(store.verify(&x).unwrap());
    assert!(store.can_serve(&x));
    let told: Vec<StoreEvent> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert_eq!(told, vec![StoreEvent::Added { hash: x }]);
}

#[test]
fn a_blob_unpinned_while_it_downloads_stays_unpinned_and_gc_frees_it() {
    // `shoal rm` during a download: the user's word stands when the
    // download completes (it used to pin the blob again).
    let from = Store::in_memory();
    let d = data(40 * GROUP_SIZE as usize, 14);
    let hash = from.import_bytes(&d, "x").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let to = Store::open(dir.path()).unwrap();
    to.begin_download(&hash, BlobKind::Raw, None, true).unwrap();
    assert!(to.info(&hash).unwrap().pinned);
    let first = GroupRanges::from_range(0..10);
    let (_, bytes) = encode(&from, &hash, &first);
    receive(&to, &hash, &first, &bytes).unwrap();
    to.unpin(&hash).unwrap();
    // In flight: gc keeps it.
    assert_eq!(to.gc().unwrap().blobs, 0);
    let rest = GroupRanges::from_range(10..40);
    let (_, bytes) = encode(&from, &hash, &rest);
    receive(&to, &hash, &rest, &bytes).unwrap();
    let info = to.info(&hash).unwrap();
    assert!(info.complete && !info.pinned, "{info:?}");
    to.end_download(&hash);
    assert_eq!(to.gc().unwrap().blobs, 1);
    assert!(to.info(&hash).is_none());
    // A download never unpinned is kept.
    to.begin_download(&hash, BlobKind::Raw, None, true).unwrap();
    let all = GroupRanges::from_range(0..40);
    let (_, bytes) = encode(&from, &hash, &all);
    receive(&to, &hash, &all, &bytes).unwrap();
    to.end_download(&hash);
    assert!(to.info(&hash).unwrap().pinned);
    assert_eq!(to.gc().unwrap().blobs, 0);
}

#[test]
fn rm_of_a_collection_lets_gc_free_its_members_but_not_a_file_added_alone() {
    // Members are kept by their collection, not pinned one by one: `rm`
    // of the collection, then gc, frees them (it freed only the manifest).
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("a.bin"), data(70_000, 31)).unwrap();
    fs::write(tree.join("sub/b.bin"), data(80_000, 32)).unwrap();
    fs::write(tree.join("sub/same.bin"), data(80_000, 32)).unwrap();
    fs::write(tree.join("alone.bin"), data(90_000, 33)).unwrap();
    // One file was added on its own first: that pin is the user's.
    let alone = store
        .import_file(&tree.join("alone.bin"), ImportMode::Copy)
        .unwrap();
    let col = store.import_dir(&tree, ImportMode::Copy).unwrap();
    let (a, b) = (
        blake3::hash(&data(70_000, 31)),
        blake3::hash(&data(80_000, 32)),
    );
    assert!(store.info(&col).unwrap().pinned);
    assert!(!store.info(&a).unwrap().pinned && !store.info(&b).unwrap().pinned);
    assert!(store.info(&alone).unwrap().pinned);
    let kept = store.kept_by_collections();
    assert!(kept.contains(&a) && kept.contains(&b) && kept.contains(&alone));
    // Kept while the collection is pinned.
    assert_eq!(store.gc().unwrap().blobs, 0);
    store.unpin(&col).unwrap();
    assert!(store.kept_by_collections().is_empty());
    let report = store.gc().unwrap();
    assert_eq!(report.blobs, 3, "{report:?}");
    assert!(report.bytes >= 150_000, "{report:?}");
    let left: Vec<_> = store.list().into_iter().map(|i| i.hash).collect();
    assert_eq!(left, vec![alone]);
}

#[test]
fn a_members_download_is_not_pinned_and_a_users_pin_of_it_stays() {
    // A collection's fetch downloads its members unpinned (the pinned
    // collection keeps them); the user's own get of one pins it, and the
    // collection's download of it does not take that pin away.
    let from = Store::in_memory();
    let d = data(8 * GROUP_SIZE as usize, 41);
    let hash = from.import_bytes(&d, "m").unwrap();
    let to = Store::in_memory();
    to.begin_download(&hash, BlobKind::Raw, None, false)
        .unwrap();
    let begun = to.info(&hash).unwrap();
    assert!(!begun.pinned);
    // Named from the start as it will be once complete (`ls`).
    assert_eq!(begun.name, hash.to_hex()[..16]);
    // The user's get of the same blob, meanwhile.
    to.begin_download(&hash, BlobKind::Raw, None, true).unwrap();
    assert!(to.info(&hash).unwrap().pinned);
    // The collection's fetch again (a resume): the pin stays.
    to.begin_download(&hash, BlobKind::Raw, None, false)
        .unwrap();
    let all = GroupRanges::from_range(0..8);
    let (_, bytes) = encode(&from, &hash, &all);
    receive(&to, &hash, &all, &bytes).unwrap();
    to.end_download(&hash);
    let info = to.info(&hash).unwrap();
    assert!(info.complete && info.pinned, "{info:?}");
    // Small members stored whole: unpinned unless asked.
    let (a, b) = (data(3_000, 42), data(3_000, 43));
    let outcomes = to
        .insert_whole(vec![
            crate::WholeBlob {
                hash: blake3::hash(&a),
                data: a.clone().into(),
                target: None,
                pin: false,
            },
            crate::WholeBlob {
                hash: blake3::hash(&b),
                data: b.clone().into(),
                target: None,
                pin: true,
            },
        ])
        .unwrap();
    assert_eq!(outcomes, vec![crate::WholeOutcome::Stored; 2]);
    assert!(!to.info(&blake3::hash(&a)).unwrap().pinned);
    assert!(to.info(&blake3::hash(&b)).unwrap().pinned);
    // Nothing keeps the unpinned one: gc frees it, and only it.
    assert_eq!(to.gc().unwrap().blobs, 1);
    assert!(to.info(&blake3::hash(&a)).is_none());
    assert!(to.info(&hash).is_some() && to.info(&blake3::hash(&b)).is_some());
}

#[test]
fn a_file_added_on_its_own_keeps_its_pin_when_a_directory_holding_it_is_imported() {
    // The import records members unpinned, but does not take away a pin
    // the file has already, complete or partial.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("a.bin"), data(70_000, 51)).unwrap();
    fs::write(tree.join("b.bin"), data(70_000, 52)).unwrap();
    let a = store
        .import_file(&tree.join("a.bin"), ImportMode::Copy)
        .unwrap();
    // b: a download of it was begun (pinned), not finished.
    let b = blake3::hash(&data(70_000, 52));
    store.begin_download(&b, BlobKind::Raw, None, true).unwrap();
    store.end_download(&b);
    let col = store.import_dir(&tree, ImportMode::Copy).unwrap();
    let (ia, ib) = (store.info(&a).unwrap(), store.info(&b).unwrap());
    assert!(ia.pinned && ib.pinned && ib.complete, "{ia:?} {ib:?}");
    store.unpin(&col).unwrap();
    assert_eq!(store.gc().unwrap().blobs, 1);
    assert!(store.info(&a).is_some() && store.info(&b).is_some());
}

#[test]
fn gc_running_beside_imports_never_takes_the_members_of_an_import() {
    // gc reads the collections' manifests without the store's lock; an
    // import that records its manifest meanwhile (and then lets its
    // members go: the manifest keeps them) must not lose its members to
    // that gc. Imports in copy mode, so a member gc took is gone for good.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    /// Stops the gc thread when dropped: also when an assertion fails
    /// (the scope waits for the thread before it passes the panic on).
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let gcs = s.spawn(|| {
            let mut runs = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match store.gc() {
                    Ok(_) | Err(StoreError::Busy) => runs += 1,
                    Err(e) => panic!("gc failed: {e}"),
                }
            }
            runs
        });
        let stopper = Stop(&stop);
        for round in 0..150u64 {
            let tree = dir.path().join(format!("tree{round}"));
            fs::create_dir_all(&tree).unwrap();
            let mut members = Vec::new();
            for i in 0..6u64 {
                let d = data(2_000 + i as usize, round * 100 + i + 1000);
                members.push(blake3::hash(&d));
                fs::write(tree.join(format!("f{i}")), d).unwrap();
            }
            let col = store.import_dir(&tree, ImportMode::Copy).unwrap();
            for m in &members {
                let info = store.info(m);
                assert!(
                    info.as_ref().is_some_and(|i| i.complete),
                    "round {round}: member {m} of {col} was taken: {info:?}"
                );
                assert!(
                    store.read_all(m).is_ok(),
                    "round {round}: member {m} unreadable"
                );
            }
        }
        drop(stopper);
        let runs = gcs.join().unwrap();
        assert!(runs > 0);
    });
}

#[test]
fn gc_stops_when_a_collections_manifest_cannot_be_read() {
    // gc cannot know what such a collection keeps: removing its members
    // on a passing read error would lose them. It removes nothing and
    // says which collection; `ls` still lists (with a warning).
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let store = Store::open(&sdir).unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    // Enough long names that the manifest is a file of its own, not inline.
    for i in 0..300u64 {
        fs::write(
            tree.join(format!(
                "a-rather-long-file-name-to-fill-the-manifest-{i:04}.bin"
            )),
            data(100, i + 7000),
        )
        .unwrap();
    }
    let col = store.import_dir(&tree, ImportMode::Copy).unwrap();
    let loose = store.import_bytes(&data(5_000, 61), "loose").unwrap();
    store.unpin(&loose).unwrap();
    let manifest = sdir.join("data").join(format!("{}.data", col.to_hex()));
    assert!(
        manifest.exists(),
        "the manifest was stored inline: make it larger"
    );
    fs::remove_file(&manifest).unwrap();
    let before = store.list().len();
    let err = store.gc().unwrap_err();
    assert!(
        matches!(&err, StoreError::CollectionUnreadable(h, _) if *h == col),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was removed"), "{err}");
    assert_eq!(store.list().len(), before);
    assert_eq!(
        store.read_all(&blake3::hash(&data(100, 7000))).unwrap(),
        data(100, 7000)
    );
    // The way out the error gives: `rm` of the collection, then gc frees
    // it, its members and the loose blob.
    store.unpin(&col).unwrap();
    assert_eq!(store.gc().unwrap().blobs, 302);
    assert!(store.list().is_empty());
}

/// A download into `target` (in a store of its own under `dir`) that has
/// every group but the last: the store, the blob's hash, its data, and the
/// last group's stream.
fn download_all_but_the_last_group(
    dir: &Path,
    target: &Path,
) -> (Store, blake3::Hash, Vec<u8>, GroupRanges, Vec<u8>) {
    let from = Store::in_memory();
    let d = data(40 * GROUP_SIZE as usize - 100, 71);
    let hash = from.import_bytes(&d, "x").unwrap();
    let to = Store::open(&dir.join("store")).unwrap();
    to.begin_download(&hash, BlobKind::Raw, Some(target), true)
        .unwrap();
    let first = GroupRanges::from_range(0..39);
    let (_, bytes) = encode(&from, &hash, &first);
    receive(&to, &hash, &first, &bytes).unwrap();
    let last = GroupRanges::from_range(39..40);
    let (_, last_bytes) = encode(&from, &hash, &last);
    (to, hash, d, last, last_bytes)
}

#[test]
fn names_beside_an_output_fit_a_file_name_and_stay_the_same() {
    let dir = Path::new("/d");
    assert_eq!(
        crate::beside(&dir.join("out.bin"), ".", ".shoal-tmp"),
        dir.join(".out.bin.shoal-tmp")
    );
    let long = "日本語のファイル名".repeat(9) + "ですx.txt";
    let other = "日本語のファイル名".repeat(9) + "ですy.txt";
    for name in [&long, &other, &"m".repeat(255)] {
        let b = crate::beside(&dir.join(name), "", ".shoal-partial");
        let n = b.file_name().unwrap().to_str().expect("still UTF-8");
        assert!(n.len() <= 255, "{} bytes", n.len());
        assert!(
            n.ends_with(".shoal-partial") && n.starts_with(&name[..30]),
            "{n}"
        );
        assert_eq!(b.parent(), Some(dir));
        assert_eq!(b, crate::beside(&dir.join(name), "", ".shoal-partial"));
    }
    assert_ne!(
        crate::beside(&dir.join(&long), "", ".shoal-partial"),
        crate::beside(&dir.join(&other), "", ".shoal-partial")
    );
}

fn partial_name(target: &Path) -> std::path::PathBuf {
    let mut s = target.as_os_str().to_os_string();
    s.push(".shoal-partial");
    s.into()
}

#[test]
fn a_download_whose_completion_could_not_be_recorded_is_finished_when_begun_again() {
    // The last group verifies, but its record fails (a full disk): the
    // blob stays partial, its data back under the partial name, and a
    // download begun again finishes it, in this process or after a crash.
    // (Before, it looked complete until the next start, which found a
    // partial record, no partial file, and started over; in the process,
    // a failure before the rename left it partial with no group to come.)
    for crash in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let (to, hash, d, last, bytes) = download_all_but_the_last_group(dir.path(), &target);
        to.fail_commits(true);
        assert!(receive(&to, &hash, &last, &bytes).is_err());
        to.fail_commits(false);
        let info = to.info(&hash).unwrap();
        assert!(!info.complete, "crash {crash}");
        assert!(info.verified.is_exactly(0..40));
        assert!(!target.exists());
        assert_eq!(fs::read(partial_name(&target)).unwrap(), d);
        let to = if crash {
            to.crash();
            Store::open(&dir.path().join("store")).unwrap()
        } else {
            to
        };
        to.begin_download(&hash, BlobKind::Raw, Some(&target), true)
            .unwrap();
        assert!(to.info(&hash).unwrap().complete, "crash {crash}");
        assert_eq!(fs::read(&target).unwrap(), d);
        assert!(!partial_name(&target).exists());
        assert_eq!(to.read_all(&hash).unwrap(), d);
    }
}

#[test]
fn a_download_renamed_into_place_but_not_recorded_is_found_finished_at_open() {
    // The state a kill leaves between the rename into the target and the
    // record: the next open hashes the target once and records it
    // complete; it neither downloads it again nor makes a partial file.
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.bin");
    let (to, hash, d, last, bytes) = download_all_but_the_last_group(dir.path(), &target);
    to.fail_commits(true);
    assert!(receive(&to, &hash, &last, &bytes).is_err());
    // (Moved back by the failed completion: the rename the kill came after.)
    if !target.exists() {
        fs::rename(partial_name(&target), &target).unwrap();
    }
    to.crash();
    let to = Store::open(&dir.path().join("store")).unwrap();
    let info = to.info(&hash).unwrap();
    assert!(info.complete);
    assert!(!partial_name(&target).exists());
    assert_eq!(to.read_all(&hash).unwrap(), d);
    drop(to);
    // Recorded: the next open finds it complete too (from the record).
    let to = Store::open(&dir.path().join("store")).unwrap();
    assert!(to.info(&hash).unwrap().complete);
    assert!(!partial_name(&target).exists());
}

#[test]
fn a_file_made_at_the_target_during_a_download_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.bin");
    let (to, hash, d, last, bytes) = download_all_but_the_last_group(dir.path(), &target);
    fs::write(&target, b"the user's own file").unwrap();
    receive(&to, &hash, &last, &bytes).unwrap();
    assert!(to.info(&hash).unwrap().complete);
    assert_eq!(fs::read(&target).unwrap(), b"the user's own file");
    // The download stays under its partial name, and is served from there.
    assert_eq!(fs::read(partial_name(&target)).unwrap(), d);
    assert_eq!(to.read_all(&hash).unwrap(), d);
    drop(to);
    let to = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(to.read_all(&hash).unwrap(), d);
}

#[test]
fn beginning_a_download_does_not_change_a_complete_blobs_kind() {
    // A ticket saying "file" for a pinned collection: were its kind
    // changed, gc would free the collection's members.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("a"), data(50_000, 81)).unwrap();
    let col = store.import_dir(&tree, ImportMode::Copy).unwrap();
    store
        .begin_download(&col, BlobKind::Raw, None, true)
        .unwrap();
    store.end_download(&col);
    assert_eq!(store.info(&col).unwrap().kind, BlobKind::Collection);
    assert_eq!(store.gc().unwrap().blobs, 0);
    assert_eq!(
        store.read_all(&blake3::hash(&data(50_000, 81))).unwrap(),
        data(50_000, 81)
    );
}

#[test]
fn a_collection_too_large_to_be_a_manifest_is_not_read() {
    // A blob called a collection (a ticket's word) can be of any size:
    // `ls` and `gc` read every pinned collection's manifest, whole. Its
    // size is checked first, and such a blob names nothing. Its file is
    // gone here: had it been read, that would be an I/O error, and gc
    // would refuse to run.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let big = dir.path().join("big");
    let f = fs::File::create(&big).unwrap();
    f.set_len(crate::collection::MAX_MANIFEST_BYTES as u64 + 1)
        .unwrap();
    drop(f);
    let hash = store.import_file(&big, ImportMode::InPlace).unwrap();
    store.pin(&hash, BlobKind::Collection).unwrap();
    fs::remove_file(&big).unwrap();
    let err = store.read_manifest(&hash).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Manifest(crate::collection::ManifestError::TooLarge(_))
        ),
        "{err}"
    );
    let loose = store.import_bytes(&data(5_000, 91), "loose").unwrap();
    store.unpin(&loose).unwrap();
    assert!(store.kept_by_collections().is_empty());
    assert_eq!(store.gc().unwrap().blobs, 1);
    assert!(store.info(&hash).is_some());
}

#[test]
fn gc_running_beside_adds_and_fetches_of_what_it_frees_leaves_their_files() {
    // A blob gc finds dead (unpinned), added again or fetched whole again
    // at that moment: its files are the hash's paths, and gc, unlinking
    // after its choice, took the new files from under the new record.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let big = data(40_000, 77);
    let small = data(30_000, 78);
    let (big_h, small_h) = (blake3::hash(&big), blake3::hash(&small));
    /// Stops the gc thread when dropped, also when the loop panics.
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = store.gc();
            }
        });
        let stopper = Stop(&stop);
        let mut failure = None;
        for round in 0..300 {
            store.import_bytes(&big, "big").unwrap();
            let outcome = store
                .insert_whole(vec![crate::WholeBlob {
                    hash: small_h,
                    data: bytes::Bytes::from(small.clone()),
                    target: None,
                    pin: true,
                }])
                .unwrap();
            // (Found still there, it is not pinned again: gc may free it.)
            let stored = outcome == [crate::WholeOutcome::Stored];
            let ok = store.read_all(&big_h).is_ok_and(|d| d == big)
                && (!stored || store.read_all(&small_h).is_ok_and(|d| d == small));
            if !ok {
                failure = Some(round);
                break;
            }
            // Let them go: the gc thread frees them, maybe while the next
            // round adds them again.
            store.unpin(&big_h).unwrap();
            // (Freed already if it was found there, unpinned.)
            let _ = store.unpin(&small_h);
        }
        drop(stopper);
        assert_eq!(failure, None, "a blob added again lost its files");
    });
}

#[test]
fn a_stored_file_gone_or_cut_short_is_corrupt_not_an_error_forever() {
    // The store's own files for a blob (its copy, its outboard) removed or
    // truncated behind its back: serving it marks it corrupt (no longer
    // offered to peers, fetched again by a get), and `verify` says it is
    // corrupt instead of failing (which stopped `shoal verify` there), or
    // rebuilds a lost outboard from whole data.
    // Before, every peer's request failed and it stayed on offer.
    /// Damage done to a blob's data file and outboard.
    type Damage = fn(&Path, &Path);
    let damages: [(&str, Damage); 3] = [
        ("data removed", |data, _| fs::remove_file(data).unwrap()),
        ("outboard removed", |_, ob| fs::remove_file(ob).unwrap()),
        ("data cut short", |data, _| {
            let f = fs::OpenOptions::new().write(true).open(data).unwrap();
            f.set_len(100_000).unwrap();
        }),
    ];
    for (what, damage) in damages {
        for serve in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("s")).unwrap();
            let d = data(300_000, 101);
            let input = dir.path().join("in");
            fs::write(&input, &d).unwrap();
            let hash = store.import_file(&input, ImportMode::Copy).unwrap();
            let base = dir
                .path()
                .join("s")
                .join("data")
                .join(hash.to_hex().as_str());
            let (data_file, ob_file) = (base.with_extension("data"), base.with_extension("obao"));
            assert!(data_file.exists() && ob_file.exists());
            damage(&data_file, &ob_file);
            if serve {
                let all = GroupRanges::from_range(0..group_count(d.len() as u64));
                let mut out = Vec::new();
                let r = rt().block_on(store.send_ranges(&hash, &all, &mut out));
                assert!(r.is_err(), "{what}: served");
            } else if what == "outboard removed" {
                // The data is whole: `verify` makes the outboard again.
                assert!(store.verify(&hash).unwrap(), "{what}: not rebuilt");
                assert!(ob_file.exists() && store.can_serve(&hash), "{what}");
                continue;
            } else {
                assert!(!store.verify(&hash).unwrap(), "{what}: verified");
            }
            assert!(!store.can_serve(&hash), "{what}: still offered");
            assert!(store.info(&hash).unwrap().corrupt, "{what}");
        }
    }
}

#[test]
fn rename_no_replace_never_replaces_a_file_or_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, empty, free) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("empty"),
        dir.path().join("free"),
    );
    fs::write(&a, b"new").unwrap();
    fs::write(&b, b"the user's").unwrap();
    fs::create_dir(&empty).unwrap();
    for to in [&b, &empty] {
        let err = crate::rename_no_replace(&a, to).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    }
    assert_eq!(fs::read(&b).unwrap(), b"the user's");
    assert!(fs::read_dir(&empty).unwrap().next().is_none());
    // A directory too (a collection's finished tree).
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("f"), b"x").unwrap();
    let err = crate::rename_no_replace(&tree, &empty).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    crate::rename_no_replace(&tree, &free).unwrap();
    assert_eq!(fs::read(free.join("f")).unwrap(), b"x");
    crate::rename_no_replace(&a, &dir.path().join("a2")).unwrap();
    assert!(!a.exists());
}

#[test]
fn copies_in_a_store_whose_records_were_lost_are_recovered_at_open() {
    // meta.redb cut to nothing: the store opened empty, its copies kept
    // but named by no record (gc would never free them, `ls` said empty).
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let (a, b) = (data(200_000, 111), data(70_000, 112));
    let (ha, hb) = (blake3::hash(&a), blake3::hash(&b));
    let c = data(300_000, 113);
    let hc = blake3::hash(&c);
    {
        let store = Store::open(&sdir).unwrap();
        for (name, d) in [("a", &a), ("b", &b)] {
            let p = dir.path().join(name);
            fs::write(&p, d).unwrap();
            store.import_file(&p, ImportMode::Copy).unwrap();
        }
        // A partial download's file: not whole, left alone.
        let from = Store::in_memory();
        from.import_bytes(&c, "c").unwrap();
        store
            .begin_download(&hc, BlobKind::Raw, None, true)
            .unwrap();
        let some = GroupRanges::from_range(0..3);
        let (_, bytes) = encode(&from, &hc, &some);
        receive(&store, &hc, &some, &bytes).unwrap();
        store.close().unwrap();
    }
    fs::OpenOptions::new()
        .write(true)
        .open(sdir.join("meta.redb"))
        .unwrap()
        .set_len(0)
        .unwrap();
    for round in 0..2 {
        let store = Store::open(&sdir).unwrap();
        // The partial download's file is put aside, not hashed at every open.
        assert!(
            sdir.join("data")
                .join("unrecovered")
                .join(format!("{}.data", hc.to_hex()))
                .exists()
        );
        let mut names: Vec<String> = store.list().into_iter().map(|i| i.name).collect();
        names.sort();
        let mut want = vec![
            format!("recovered-{}", &ha.to_hex()[..16]),
            format!("recovered-{}", &hb.to_hex()[..16]),
        ];
        want.sort();
        assert_eq!(names, want);
        assert_eq!(store.read_all(&ha).unwrap(), a);
        assert_eq!(store.read_all(&hb).unwrap(), b);
        assert!(store.is_pinned(&ha) && store.is_pinned(&hb));
        assert!(store.verify(&ha).unwrap() && store.verify(&hb).unwrap());
        // The recovered copies stay; the partial download's outboard, of
        // no record, is freed once.
        assert_eq!(store.gc().unwrap().blobs, if round == 0 { 1 } else { 0 });
        assert!(
            !sdir
                .join("data")
                .join(format!("{}.obao", hc.to_hex()))
                .exists()
        );
    }
}

/// A full disk under the database is reported as a full disk, with what
/// to do, not as a database error.
#[test]
fn a_full_disk_under_the_database_says_so() {
    let full = StoreError::db(redb::StorageError::Io(std::io::Error::from(
        std::io::ErrorKind::StorageFull,
    )));
    assert!(matches!(full, StoreError::DiskFull { .. }), "{full}");
    assert!(full.to_string().contains("free some space"), "{full}");
    let other = StoreError::db(redb::StorageError::Io(std::io::Error::other("bad sector")));
    assert!(matches!(other, StoreError::Db(_)), "{other}");
    // After such an error redb refuses every write until it is opened
    // again: said as such, with what to do (it was redb's own words,
    // "Previous I/O error occurred. Please close and re-open the database").
    let stopped = StoreError::db(redb::StorageError::PreviousIo);
    assert!(matches!(stopped, StoreError::DbStopped), "{stopped}");
    assert!(stopped.to_string().contains("restart"), "{stopped}");
}
