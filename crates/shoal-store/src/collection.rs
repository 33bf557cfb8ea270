//! Collections: a directory as a manifest blob (`shoal_proto::pb::Manifest`)
//! whose hash names the directory.
//!
//! Manifests come from strangers, so [`parse_manifest`] refuses anything
//! that could write outside the target directory or clash on disk before a
//! single byte is written.

use std::collections::HashSet;

use prost::Message;
use shoal_proto::pb;

/// Largest manifest blob accepted (256 MiB).
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;

/// Most entries a manifest may hold.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Longest path accepted in a manifest, in bytes.
pub const MAX_PATH_LEN: usize = 4096;

/// One file or empty directory of a collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative path with `/` separators, already checked to be safe.
    pub path: String,
    /// File size in bytes (0 for an empty directory).
    pub size: u64,
    /// BLAKE3 hash of the content (the hash of no bytes for a directory).
    pub hash: blake3::Hash,
    /// Whether the file is executable.
    pub executable: bool,
    /// True for an empty directory, false for a file.
    pub empty_dir: bool,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    /// The encoded manifest is larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {0} bytes, more than the limit")]
    TooLarge(usize),
    /// The manifest has more than [`MAX_ENTRIES`] entries.
    #[error("manifest has {0} entries, more than the limit")]
    TooManyEntries(usize),
    /// The bytes are not a protobuf `Manifest`.
    #[error("manifest does not decode: {0}")]
    Decode(String),
    /// No entries and no version: the bytes of an empty file (whose hash
    /// an empty directory's manifest once had).
    #[error("an empty blob is an empty file, not a manifest")]
    Empty,
    /// Written by a newer shoal.
    #[error("manifest version {0} is newer than this shoal reads ({MANIFEST_VERSION})")]
    UnknownVersion(u32),
    /// A path that could escape or confuse the target directory.
    #[error("unsafe path {path:?} in manifest: {reason}")]
    BadPath {
        /// The path as sent (possibly shortened).
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The same path twice.
    #[error("duplicate path {0:?} in manifest")]
    Duplicate(String),
    /// A file or empty directory that is also the parent of another entry.
    #[error("path {0:?} in manifest is both a file and a directory")]
    FileIsDir(String),
    /// Entries not sorted by path.
    #[error("manifest entries are not sorted by path at {0:?}")]
    Unsorted(String),
    /// An entry that is neither a file nor an empty directory.
    #[error("manifest entry {0:?} has no kind")]
    NoKind(String),
    /// A hash that is not 32 bytes.
    #[error("manifest entry {0:?} has a hash of the wrong length")]
    BadHash(String),
}

/// Check one path from a manifest.
pub fn check_path(path: &str) -> Result<(), ManifestError> {
    let bad = |reason| {
        let mut p: String = path.chars().take(200).collect();
        if p.len() < path.len() {
            p.push('…');
        }
        Err(ManifestError::BadPath { path: p, reason })
    };
    if path.is_empty() {
        return bad("empty path");
    }
    if path.len() > MAX_PATH_LEN {
        return bad("path too long");
    }
    if path.starts_with('/') {
        return bad("absolute path");
    }
    if path.contains('\0') {
        return bad("NUL byte");
    }
    if path.contains('\\') {
        return bad("backslash");
    }
    for c in path.split('/') {
        match c {
            "" => return bad("empty component"),
            "." => return bad("`.` component"),
            ".." => return bad("`..` component"),
            _ => {}
        }
        if c.chars().any(char::is_control) {
            return bad("control character");
        }
    }
    if path.len() >= 2 && path.as_bytes()[1] == b':' {
        return bad("drive prefix");
    }
    Ok(())
}

/// The manifest format this shoal writes (see `collection.proto`).
pub const MANIFEST_VERSION: u32 = 1;

/// Decode and check a manifest blob: sizes and entry counts are capped
/// before anything else, then every path is checked, duplicates and
/// file-vs-directory clashes are refused, and entries must be sorted.
pub fn parse_manifest(bytes: &[u8]) -> Result<Vec<Entry>, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(bytes.len()));
    }
    let m = pb::Manifest::decode(bytes).map_err(|e| ManifestError::Decode(e.to_string()))?;
    if m.version > MANIFEST_VERSION {
        return Err(ManifestError::UnknownVersion(m.version));
    }
    if m.version == 0 && m.entries.is_empty() {
        return Err(ManifestError::Empty);
    }
    if m.entries.len() > MAX_ENTRIES {
        return Err(ManifestError::TooManyEntries(m.entries.len()));
    }
    let mut seen: HashSet<&str> = HashSet::with_capacity(m.entries.len());
    let mut out = Vec::with_capacity(m.entries.len());
    for e in &m.entries {
        check_path(&e.path)?;
        if !seen.insert(&e.path) {
            return Err(ManifestError::Duplicate(e.path.clone()));
        }
    }
    for w in m.entries.windows(2) {
        if w[0].path > w[1].path {
            return Err(ManifestError::Unsorted(w[1].path.clone()));
        }
    }
    for e in &m.entries {
        // No ancestor of an entry may itself be an entry.
        for (i, _) in e.path.match_indices('/') {
            let parent = &e.path[..i];
            if seen.contains(parent) {
                return Err(ManifestError::FileIsDir(parent.to_owned()));
            }
        }
        if e.kind.is_none() {
            return Err(ManifestError::NoKind(e.path.clone()));
        }
    }
    drop(seen);
    // All checked: the paths move into the entries (not copied).
    for e in m.entries {
        let entry = match e.kind {
            Some(pb::manifest_entry::Kind::File(f)) => {
                let Ok(hash) = <[u8; 32]>::try_from(f.hash.as_ref()) else {
                    return Err(ManifestError::BadHash(e.path));
                };
                Entry {
                    path: e.path,
                    size: f.size,
                    hash: blake3::Hash::from_bytes(hash),
                    executable: f.executable,
                    empty_dir: false,
                }
            }
            Some(pb::manifest_entry::Kind::EmptyDir(_)) => Entry {
                path: e.path,
                size: 0,
                hash: blake3::hash(b""),
                executable: false,
                empty_dir: true,
            },
            None => return Err(ManifestError::NoKind(e.path)),
        };
        out.push(entry);
    }
    Ok(out)
}

/// Encode entries (sorted here) as a manifest blob.
pub fn encode_manifest(entries: &[Entry]) -> Vec<u8> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let m = pb::Manifest {
        entries: sorted
            .into_iter()
            .map(|e| pb::ManifestEntry {
                path: e.path.clone(),
                kind: Some(if e.empty_dir {
                    pb::manifest_entry::Kind::EmptyDir(true)
                } else {
                    pb::manifest_entry::Kind::File(pb::FileEntry {
                        size: e.size,
                        hash: bytes::Bytes::copy_from_slice(e.hash.as_bytes()),
                        executable: e.executable,
                    })
                }),
            })
            .collect(),
        version: MANIFEST_VERSION,
    };
    m.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> pb::ManifestEntry {
        pb::ManifestEntry {
            path: path.into(),
            kind: Some(pb::manifest_entry::Kind::File(pb::FileEntry {
                size: 1,
                hash: bytes::Bytes::copy_from_slice(&[7; 32]),
                executable: false,
            })),
        }
    }

    fn dir(path: &str) -> pb::ManifestEntry {
        pb::ManifestEntry {
            path: path.into(),
            kind: Some(pb::manifest_entry::Kind::EmptyDir(true)),
        }
    }

    fn check(entries: Vec<pb::ManifestEntry>) -> Result<Vec<Entry>, ManifestError> {
        let m = pb::Manifest {
            entries,
            version: MANIFEST_VERSION,
        };
        parse_manifest(&m.encode_to_vec())
    }

    /// An empty directory's manifest was zero bytes: the empty file's
    /// hash named both, and whichever the store met first decided what a
    /// get of it made (a directory where a file was shared).
    #[test]
    fn an_empty_directory_is_not_the_empty_file() {
        let empty_dir = encode_manifest(&[]);
        assert!(!empty_dir.is_empty());
        assert_ne!(blake3::hash(&empty_dir), blake3::hash(b""));
        assert_eq!(parse_manifest(&empty_dir).unwrap(), Vec::<Entry>::new());
        assert!(matches!(parse_manifest(b""), Err(ManifestError::Empty)));
    }

    #[test]
    fn manifest_versions() {
        let entry = pb::ManifestEntry {
            path: "a".into(),
            kind: Some(pb::manifest_entry::Kind::EmptyDir(true)),
        };
        // From before the version: read as before.
        let old = pb::Manifest {
            entries: vec![entry.clone()],
            version: 0,
        };
        assert_eq!(parse_manifest(&old.encode_to_vec()).unwrap().len(), 1);
        // From a newer shoal: refused, saying so.
        let newer = pb::Manifest {
            entries: vec![entry],
            version: MANIFEST_VERSION + 1,
        };
        let err = parse_manifest(&newer.encode_to_vec()).unwrap_err();
        assert!(matches!(err, ManifestError::UnknownVersion(2)), "{err}");
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let bad_paths = [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            ".",
            "..",
            "a//b",
            "a/",
            "a\\..\\b",
            "a\0b",
            "C:/x",
            "a/\nb",
        ];
        for p in bad_paths {
            assert!(
                matches!(check(vec![file(p)]), Err(ManifestError::BadPath { .. })),
                "{p:?} accepted"
            );
            assert!(check(vec![dir(p)]).is_err(), "dir {p:?} accepted");
        }
        let table: Vec<(Vec<pb::ManifestEntry>, ManifestError)> = vec![
            (
                vec![file("a"), file("a")],
                ManifestError::Duplicate("a".into()),
            ),
            (
                vec![file("a"), file("a/b")],
                ManifestError::FileIsDir("a".into()),
            ),
            (
                vec![file("a"), file("a-b"), file("a/b")],
                ManifestError::FileIsDir("a".into()),
            ),
            (
                vec![dir("d"), file("d/x")],
                ManifestError::FileIsDir("d".into()),
            ),
            (
                vec![file("b"), file("a")],
                ManifestError::Unsorted("a".into()),
            ),
            (
                vec![pb::ManifestEntry {
                    path: "x".into(),
                    kind: None,
                }],
                ManifestError::NoKind("x".into()),
            ),
        ];
        for (entries, err) in table {
            assert_eq!(check(entries), Err(err));
        }
        assert!(matches!(
            parse_manifest(b"\xff\xff\xff"),
            Err(ManifestError::Decode(_))
        ));
        let mut short_hash = file("x");
        if let Some(pb::manifest_entry::Kind::File(f)) = &mut short_hash.kind {
            f.hash = bytes::Bytes::from_static(&[1, 2, 3]);
        }
        assert_eq!(
            check(vec![short_hash]),
            Err(ManifestError::BadHash("x".into()))
        );
        let huge = vec![0u8; MAX_MANIFEST_BYTES + 1];
        assert_eq!(
            parse_manifest(&huge),
            Err(ManifestError::TooLarge(huge.len()))
        );
    }

    #[test]
    fn good_manifest_round_trips() {
        let entries = vec![
            Entry {
                path: "b/c.txt".into(),
                size: 3,
                hash: blake3::hash(b"abc"),
                executable: true,
                empty_dir: false,
            },
            Entry {
                path: "a".into(),
                size: 0,
                hash: blake3::hash(b""),
                executable: false,
                empty_dir: true,
            },
            Entry {
                path: "b/d é".into(),
                size: 0,
                hash: blake3::hash(b""),
                executable: false,
                empty_dir: false,
            },
        ];
        let parsed = parse_manifest(&encode_manifest(&entries)).unwrap();
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(parsed, sorted);
    }
}
