//! Hostile collection manifests served by a peer: `shoal get` refuses them
//! with a clear error, writes nothing, and the serving node stays up.

use std::time::Duration;

use prost::Message;
use shoal_proto::pb;
use shoal_transport::{Provider, Ticket, TicketKind};

use crate::harness::Dir;

fn file(path: &str, i: u64) -> pb::ManifestEntry {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&i.to_le_bytes());
    pb::ManifestEntry {
        path: path.to_string(),
        kind: Some(pb::manifest_entry::Kind::File(pb::FileEntry {
            size: 1,
            hash: hash.to_vec().into(),
            executable: false,
        })),
    }
}

/// Serves `manifest` as a collection and tries to fetch it.
fn refused(entries: Vec<pb::ManifestEntry>, what: &str) {
    let s = Dir::new();
    let m = s.path().join("manifest.bin");
    let manifest = pb::Manifest {
        entries,
        version: shoal_store::collection::MANIFEST_VERSION,
    };
    std::fs::write(&m, manifest.encode_to_vec()).expect("write manifest");
    let serve = s.serve(&[]);
    let line = s.ok(&["add", m.to_str().expect("utf-8")]);
    let hash = line.split_whitespace().next().expect("hash");
    let ticket = Ticket {
        hash: *blake3::Hash::from_hex(hash).expect("hex").as_bytes(),
        kind: TicketKind::Collection,
        providers: vec![Provider {
            id: serve.peer_id.parse().expect("peer id"),
            addrs: vec![serve.addrs[0].parse().expect("addr")],
        }],
    }
    .to_string();
    let d = Dir::new();
    let out = d.path().join("out");
    let o = d.run(
        &[
            "get",
            &ticket,
            "-o",
            out.to_str().expect("utf-8"),
            "--no-mdns",
            "--no-dht",
            "--timeout",
            "10",
        ],
        Duration::from_secs(90),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: the manifest was accepted: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && !stderr.contains("panicked"),
        "{what}: {stderr}"
    );
    assert!(!out.exists(), "{what}: output written");
    // Nothing escaped the output directory's parent either.
    for e in std::fs::read_dir(d.path()).expect("list") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(
            name == "node" || name.contains("shoal-tmp"),
            "{what}: stray {name}"
        );
    }
    assert!(
        !d.path().parent().expect("parent").join("evil").exists(),
        "{what}: wrote outside"
    );
    // The node that served it is still up.
    s.ok(&["status"]);
    drop(serve);
}

#[test]
fn traversal_absolute_nul_backslash_and_duplicates_are_refused() {
    refused(vec![file("ok", 1), file("../evil", 2)], "dot-dot");
    refused(vec![file("/tmp/evil", 1)], "absolute");
    refused(vec![file("a\0b", 1)], "nul");
    refused(vec![file("a\\..\\evil", 1)], "backslash");
    refused(vec![file("same", 1), file("same", 2)], "duplicate");
    refused(vec![file("d", 1), file("d/x", 2)], "file and directory");
}

#[test]
fn a_million_entries_are_refused_before_anything_is_fetched() {
    let entries: Vec<pb::ManifestEntry> = (0..1_000_001u64)
        .map(|i| file(&format!("f/{i:07}"), i))
        .collect();
    refused(entries, "a million entries");
}
