//! The store commands end to end: add, ls, rm, gc, verify, with and
//! without a running node.

use std::time::Duration;

use shoal_proto::pb;

use crate::harness::{Dir, Serve, data};

/// What `node` answers a peer's `Who` for `hash` with.
fn who(node: &Serve, hash: &str) -> Option<pb::availability::Have> {
    let rt = crate::hostile::runtime();
    rt.block_on(async {
        let ep = crate::hostile::endpoint().await;
        let conn = ep
            .connect(
                node.addrs[0].parse().expect("addr"),
                Some(node.peer_id.parse().expect("peer id")),
            )
            .await
            .expect("dialing the node");
        let hash = blake3::Hash::from_hex(hash).expect("hash");
        let req = pb::Request {
            kind: Some(pb::request::Kind::Who(pb::Who {
                hashes: vec![hash.as_bytes().to_vec().into()],
            })),
        };
        match crate::hostile::ask(&conn, &req).await {
            Some(pb::Response {
                kind: Some(pb::response::Kind::Who(w)),
            }) => w.entries.first().and_then(|e| e.have.clone()),
            other => panic!("unexpected answer {other:?}"),
        }
    })
}

#[test]
fn add_prints_what_b3sum_prints_also_for_names_it_escapes() {
    // b3sum writes a name holding a newline or a backslash escaped, on a
    // line that starts with a backslash: one line per entry.
    let d = Dir::new();
    let names = [
        "plain.txt",
        "with space",
        "new\nline",
        "back\\slash",
        "cr\rname",
    ];
    let paths: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let p = d.path().join(n);
            std::fs::write(&p, data(1000 + i, i as u64)).unwrap();
            p.to_str().unwrap().to_string()
        })
        .collect();
    let mut args = vec!["add"];
    args.extend(paths.iter().map(String::as_str));
    let ours = d.ok(&args);
    let theirs = std::process::Command::new("b3sum")
        .args(&paths)
        .output()
        .expect("b3sum is installed (apt-get install b3sum)");
    assert!(theirs.status.success());
    assert_eq!(ours, String::from_utf8(theirs.stdout).unwrap());
    assert_eq!(ours.lines().count(), names.len(), "{ours}");
}

#[test]
fn add_goes_on_past_a_path_it_cannot_add_as_b3sum_does() {
    // b3sum names the bad path, prints the others' lines and exits 1;
    // add stopped at the first bad path. Without a node and through one.
    let d = Dir::new();
    let (a, b) = (d.path().join("a.txt"), d.path().join("b.txt"));
    std::fs::write(&a, b"a").unwrap();
    std::fs::write(&b, b"b").unwrap();
    let missing = d.path().join("missing");
    let args = [
        a.to_str().unwrap(),
        missing.to_str().unwrap(),
        b.to_str().unwrap(),
    ];
    let theirs = std::process::Command::new("b3sum")
        .args(args)
        .output()
        .expect("b3sum is installed (apt-get install b3sum)");
    assert_eq!(theirs.status.code(), Some(1));
    for through_node in [false, true] {
        let _node = through_node.then(|| d.serve(&[]));
        let o = d.run(&["add", args[0], args[1], args[2]], Duration::from_secs(60));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(o.stdout, theirs.stdout, "node: {through_node}; {err}");
        assert!(err.contains(&format!("shoal: {}: ", args[1])), "{err}");
        let last = err.lines().last().unwrap_or_default();
        assert_eq!(
            last,
            "error: 1 of 3 paths could not be added (each is named above)"
        );
    }
}

/// `get -o` into a directory that does not exist is refused before
/// anything is fetched, saying which directory is missing (it failed at
/// the end, naming the temporary file it could not make); `ls` shows a
/// name holding a newline on one line.
#[test]
fn get_into_a_missing_directory_says_so_and_ls_keeps_names_on_one_line() {
    let d = Dir::new();
    let out = d.path().join("nodir").join("sub").join("file");
    let o = d.run(
        &[
            "get",
            &blake3::hash(b"anything").to_hex(),
            "-o",
            out.to_str().expect("utf-8"),
            "--no-mdns",
            "--no-dht",
        ],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the directory {} does not exist",
            out.parent().expect("parent").display()
        )),
        "{stderr}"
    );
    assert!(!d.path().join("nodir").exists());
    let odd = d.path().join("two\nlines");
    std::fs::write(&odd, b"x").expect("write");
    d.ok(&["add", odd.to_str().expect("utf-8")]);
    let ls = d.ok(&["ls"]);
    assert_eq!(ls.lines().count(), 2, "{ls}");
    assert!(ls.contains("two\\nlines"), "{ls}");
}

#[test]
fn quiet_leaves_only_errors_on_stderr() {
    let d = Dir::new();
    let o = d.run(&["ls"], Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the store is empty"));
    let o = d.run(&["-q", "ls"], Duration::from_secs(30));
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr), "");
    let o = d.run(&["-q", "rm", &"1".repeat(64)], Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: "));
}

/// Shoal on `d`'s data dir run by a bash `script` (the harness pipes
/// stdout), as "$@": its exit status and stderr.
fn through(d: &Dir, script: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut c = std::process::Command::new("bash");
    c.arg("-c")
        .arg(script)
        .arg("bash")
        .arg(crate::harness::bin())
        .arg("--data-dir")
        .arg(d.path().join("node"))
        .args(args);
    let o = crate::harness::run_bounded(c, Duration::from_secs(30));
    (o.status, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn a_full_stdout_is_an_error_that_says_so_and_a_closed_one_is_not() {
    let d = Dir::new();
    let f = d.path().join("f.bin");
    std::fs::write(&f, data(300_000, 5)).unwrap();
    let hash = d.ok(&["add", f.to_str().unwrap()])[..64].to_string();
    let through = |script: &str, args: &[&str]| through(&d, script, args);
    for args in [vec!["cat", hash.as_str()], vec!["ls"]] {
        let (status, stderr) = through("exec \"$@\" > /dev/full", &args);
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("error: writing to stdout: No space left on device"),
            "{args:?}: {stderr}"
        );
        // A reader that stops early (`| head`) is no error.
        let (status, stderr) = through("set -o pipefail; \"$@\" | head -c 1 > /dev/null", &args);
        assert!(status.success(), "{args:?}: {stderr}");
        assert!(!stderr.contains("error"), "{args:?}: {stderr}");
    }
}

/// `cat` through a running node whose reader stops reading still ends on
/// a signal (as a `cat` without a node does): it wrote stdout on the
/// async loop, blocked, and SIGINT and SIGTERM went unheard (found by a
/// review). Its stdout errors are those of a `cat` without a node.
#[test]
fn a_stream_through_a_node_ends_on_a_signal_though_its_reader_stalls() {
    let d = Dir::new();
    let f = d.path().join("f.bin");
    std::fs::write(&f, data(4 << 20, 6)).unwrap();
    let hash = d.ok(&["add", f.to_str().unwrap()])[..64].to_string();
    let _node = d.serve(&[]);
    let through = |script: &str| through(&d, script, &["cat", &hash]);
    let (status, stderr) = through("exec \"$@\" > /dev/full");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let (status, stderr) = through("set -o pipefail; \"$@\" | head -c 1 > /dev/null");
    assert!(status.success() && !stderr.contains("error"), "{stderr}");
    // A reader that never reads: the pipe fills, and a write blocks.
    let child = d
        .cmd()
        .args(["cat", &hash])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = crate::harness::KillOnDrop(child);
    let pid = child.0.id();
    // Seen in the kernel's wait channel where it tells (`pipe_write`, or
    // `pipe_wait` on older kernels); else given two seconds, time enough
    // to fill 64 KiB of pipe from a 4 MiB blob.
    let started = std::time::Instant::now();
    crate::harness::eventually(Duration::from_secs(30), "a write to block", || {
        let chans: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("wchan")).ok())
            .collect();
        let told = chans
            .iter()
            .any(|w| w.trim() != "0" && !w.trim().is_empty());
        chans
            .iter()
            .any(|w| w.contains("pipe_write") || w.contains("pipe_wait"))
            || (!told && started.elapsed() > Duration::from_secs(2))
    });
    let status = crate::harness::signal_and_wait(&mut child.0, libc::SIGINT, "shoal cat");
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("interrupted"), "{err}");
}

#[test]
fn ls_shows_what_a_collection_holds_not_its_manifest() {
    let d = Dir::new();
    let tree = d.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a"), data(200_000, 1)).unwrap();
    std::fs::write(tree.join("sub/b"), data(50_000, 2)).unwrap();
    std::fs::write(tree.join("sub/b2"), data(50_000, 2)).unwrap();
    let hash = d.ok(&["add", tree.to_str().unwrap()])[..64].to_string();
    let row = |d: &Dir| -> serde_json::Value {
        let ls = d.ok(&["--json", "ls"]);
        let line = ls.lines().find(|l| l.contains(&hash)).expect("listed");
        serde_json::from_str(line).unwrap()
    };
    let r = row(&d);
    assert_eq!(r["kind"], "collection", "{r}");
    assert!(r["size"].as_u64().unwrap() < 1000, "the manifest's: {r}");
    // (The member named twice counted once.)
    assert_eq!(r["content_size"], 250_000, "{r}");
    assert_eq!(r["content_verified"], 250_000, "{r}");
    assert_eq!(r["files"], 3, "{r}");
    let table = d.ok(&["ls"]);
    let line = table.lines().find(|l| l.contains(&hash)).unwrap();
    assert!(line.contains("244.1 KiB  complete"), "{table}");
    // A member added in place and deleted: not all of it is here.
    std::fs::remove_file(tree.join("a")).unwrap();
    assert_eq!(row(&d)["content_verified"], 50_000);
    let table = d.ok(&["ls"]);
    let line = table.lines().find(|l| l.contains(&hash)).unwrap();
    assert!(line.contains("244.1 KiB  20%"), "{table}");
    // The same through a running node.
    let _node = d.serve(&[]);
    assert_eq!(row(&d)["content_size"], 250_000);
    assert_eq!(row(&d)["content_verified"], 50_000);
}

/// `rm` of a file a pinned directory holds unpins it, and says that gc
/// keeps it while the directory is pinned (it said nothing, and `ls`
/// still showed it pinned: a review). Directly and through a node; a file
/// no collection names is removed without a word.
#[test]
fn rm_of_a_member_of_a_pinned_directory_says_it_is_kept() {
    let d = Dir::new();
    let tree = d.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let member = data(100_000, 31);
    std::fs::write(tree.join("a"), &member).unwrap();
    std::fs::write(tree.join("b"), data(60_000, 32)).unwrap();
    let alone = d.path().join("alone.bin");
    std::fs::write(&alone, data(70_000, 33)).unwrap();
    let collection = d.ok(&["add", tree.to_str().unwrap()])[..64].to_string();
    let alone = d.ok(&["add", alone.to_str().unwrap()])[..64].to_string();
    let member = blake3::hash(&member).to_hex().to_string();
    let rm = |d: &Dir, hash: &str| -> String {
        let o = d.run(&["rm", hash], Duration::from_secs(30));
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    for through_a_node in [false, true] {
        let _node = through_a_node.then(|| d.serve(&[]));
        let err = rm(&d, &member);
        assert!(
            err.contains(&member) && err.contains("a pinned collection names it"),
            "node {through_a_node}: {err}"
        );
        let err = rm(&d, &alone);
        assert!(!err.contains("collection"), "node {through_a_node}: {err}");
    }
    // Once the directory is unpinned, gc frees it and its files.
    d.ok(&["rm", &collection]);
    d.ok(&["gc"]);
    assert_eq!(d.ok(&["ls"]).trim(), "");
}

#[test]
fn options_a_running_node_does_not_take_are_named() {
    // Through a running node, get's and send's node options were
    // silently ignored (the node runs with its own). Those the node has
    // already are not named (`--no-dht` to a node with the DHT off was:
    // a review), and `status` shows the node's own.
    let d = Dir::new();
    let f = d.path().join("f.bin");
    std::fs::write(&f, data(10_000, 5)).unwrap();
    let _node = d.serve(&[]);
    let hash = d.ok(&["add", f.to_str().unwrap()]);
    let hash = hash.split_whitespace().next().unwrap();
    let out = d.path().join("out.bin");
    let o = d.run(
        &[
            "get",
            hash,
            "-o",
            out.to_str().unwrap(),
            "--max-download",
            "1MB/s",
            "--no-dht",
        ],
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("--max-download applies only to a node this command starts"),
        "{err}"
    );
    assert!(!err.contains("--no-dht"), "{err}");
    let status = d.ok(&["status"]);
    assert!(
        status.contains("mDNS off, DHT off, announce on")
            && status.contains("upload none, download none"),
        "{status}"
    );
    let out2 = d.path().join("out2.bin");
    let o = d.run(
        &["get", hash, "-o", out2.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("apply only"));
}

/// `verify HASH` of a directory checks its members: the hash `add` prints
/// for a directory is its manifest's, and `verify` of it said `ok` with a
/// member corrupt (found by a review). Directly and through a node.
#[test]
fn verify_of_a_directory_checks_its_members() {
    let d = Dir::new();
    let tree = d.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("a.bin"), data(200_000, 21)).unwrap();
    std::fs::write(tree.join("b.bin"), data(300_000, 22)).unwrap();
    let out = d.ok(&["add", "--copy", tree.to_str().unwrap()]);
    let col = out.split_whitespace().next().unwrap().to_string();
    let b = blake3::hash(&data(300_000, 22)).to_string();
    let v = d.ok(&["verify", &col]);
    assert_eq!(v.lines().filter(|l| l.ends_with("  ok")).count(), 3, "{v}");
    // Flip a byte of b.bin's copy in the store.
    let copy = d.path().join(format!("node/store/data/{b}.data"));
    let mut bytes = std::fs::read(&copy).expect("the copy of b.bin");
    bytes[4321] ^= 1;
    std::fs::write(&copy, bytes).unwrap();
    let check = |d: &Dir| {
        let o = d.run(&["verify", &col], Duration::from_secs(30));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains(&format!("{b}  corrupt")), "{stdout}");
        assert!(stdout.contains(&format!("{col}  ok")), "{stdout}");
    };
    check(&d);
    let _node = d.serve(&[]);
    check(&d);
}

/// `verify` checks every blob and names every failure: a blob whose data
/// cannot be read (a directory where its file was) is corrupt, a hash not
/// in the store is named, and the others are still checked. The first
/// error stopped the run with nothing printed, not even the corrupt blobs
/// found before it. `rm` of several hashes unpins every one there and
/// names the others (it stopped at the first unknown one). Review
/// findings; with and without a node.
#[test]
fn verify_and_rm_go_on_past_a_blob_that_fails() {
    let d = Dir::new();
    let v = d.path().join("v");
    std::fs::create_dir(&v).unwrap();
    let paths: Vec<_> = (1..=3).map(|i| v.join(format!("a{i}"))).collect();
    for (i, p) in paths.iter().enumerate() {
        std::fs::write(p, data(50_000, 60 + i as u64)).unwrap();
    }
    let hashes: Vec<String> = (0..3)
        .map(|i| blake3::hash(&data(50_000, 60 + i as u64)).to_string())
        .collect();
    let args: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    d.ok(&[&["add"], &args[..]].concat());
    // a3: one byte changed in place, same size; a2: a directory now.
    let mut three = std::fs::read(&paths[2]).unwrap();
    three[10] ^= 1;
    std::fs::write(&paths[2], three).unwrap();
    std::fs::remove_file(&paths[1]).unwrap();
    std::fs::create_dir(&paths[1]).unwrap();
    let unknown = "00".repeat(32);
    let check = |d: &Dir| {
        let o = d.run(&["verify"], Duration::from_secs(30));
        let stdout = String::from_utf8_lossy(&o.stdout);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stdout}{stderr}");
        assert!(stdout.contains(&format!("{}  ok", hashes[0])), "{stdout}");
        for h in &hashes[1..] {
            assert!(stdout.contains(&format!("{h}  corrupt")), "{stdout}");
            assert!(stderr.contains(h.as_str()), "{stderr}");
        }
        let o = d.run(&["verify", &hashes[0], &unknown], Duration::from_secs(30));
        let stdout = String::from_utf8_lossy(&o.stdout);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stdout}{stderr}");
        assert_eq!(stdout.trim(), format!("{}  ok", hashes[0]));
        assert!(
            stderr.contains(&format!("not in the store: {unknown}")),
            "{stderr}"
        );
    };
    check(&d);
    {
        let _node = d.serve(&[]);
        check(&d);
        let o = d.run(&["rm", &unknown, &hashes[0]], Duration::from_secs(30));
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains(&unknown));
    }
    let o = d.run(&["rm", &unknown, &hashes[1]], Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&unknown));
    let ls = d.ok(&["--json", "ls"]);
    for l in ls.lines() {
        let l: serde_json::Value = serde_json::from_str(l).unwrap();
        let pinned = l["hash"] == hashes[2].as_str();
        assert_eq!(l["pinned"], pinned, "{l}");
    }
}

/// A directory holding the data dir is added without it: the node's
/// secret key (and its live database) went out with `shoal send ~`
/// (found by a review). The data dir itself is refused. With and without
/// a node.
#[test]
fn the_data_dir_is_never_shared() {
    let d = Dir::new();
    std::fs::write(d.path().join("mine.txt"), b"mine").unwrap();
    d.ok(&["id"]);
    assert!(d.path().join("node/identity.key").exists());
    let check = |d: &Dir| {
        d.ok(&["add", d.path().to_str().unwrap()]);
        let names: Vec<String> = d
            .ok(&["--json", "ls"])
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["name"].to_string())
            .collect();
        assert!(names.iter().any(|n| n.contains("mine.txt")), "{names:?}");
        assert!(
            !names.iter().any(|n| n.contains("identity.key")),
            "{names:?}"
        );
        let o = d.run(
            &["add", d.path().join("node").to_str().unwrap()],
            Duration::from_secs(30),
        );
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("never shared"));
    };
    check(&d);
    let _node = d.serve(&[]);
    check(&d);
}

#[test]
fn add_ls_rm_gc_verify() {
    let d = Dir::new();
    let a = d.path().join("a.bin");
    let b = d.path().join("b.bin");
    std::fs::write(&a, data(200_000, 11)).unwrap();
    std::fs::write(&b, data(300_000, 12)).unwrap();
    let out = d.ok(&["add", "--copy", a.to_str().unwrap(), b.to_str().unwrap()]);
    let hashes: Vec<String> = out
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(hashes.len(), 2);
    let ls = d.ok(&["--json", "ls"]);
    assert_eq!(ls.lines().count(), 2, "{ls}");
    for line in ls.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["complete"], true);
        assert_eq!(v["pinned"], true);
    }
    let v = d.ok(&["verify"]);
    assert_eq!(v.lines().filter(|l| l.ends_with("ok")).count(), 2, "{v}");

    // Unpin one: gc frees it and keeps the other.
    d.ok(&["rm", &hashes[0]]);
    let gc = d.ok(&["--json", "gc"]);
    let gc: serde_json::Value = serde_json::from_str(gc.trim()).unwrap();
    assert_eq!(gc["blobs"], 1);
    assert!(gc["bytes"].as_u64().unwrap() >= 200_000);
    let ls = d.ok(&["--json", "ls"]);
    assert!(!ls.contains(&hashes[0]) && ls.contains(&hashes[1]), "{ls}");

    // Flip a byte of the private copy: verify names it and exits 1.
    let store = d.path().join("node/store/data");
    let file = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .expect("the copy of b.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1234] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let o = d.run(&["verify"], Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(&format!("{}  corrupt", hashes[1])),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains(&hashes[1]), "{stderr}");
    // ls says so too, and what to do about it.
    let ls: serde_json::Value = serde_json::from_str(d.ok(&["--json", "ls"]).trim()).unwrap();
    assert_eq!(ls["corrupt"], true, "{ls}");
    let o = d.run(&["ls"], Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let row = stdout.lines().find(|l| l.starts_with(&hashes[1])).unwrap();
    assert!(row.contains(" corrupt "), "{stdout}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("1 blob(s) not served"),
        "{o:?}"
    );
}

#[test]
fn commands_go_through_a_running_node() {
    let d = Dir::new();
    let f = d.path().join("f.bin");
    std::fs::write(&f, data(100_000, 13)).unwrap();
    let node = d.serve(&[]);
    // A second node on the same data dir is refused, saying why.
    let second = d.run(
        &["serve", "--listen", "127.0.0.1:0", "--no-mdns", "--no-dht"],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains("a node is already running on data dir"),
        "{err}"
    );
    // With the node running, the store is the node's: commands use its
    // control socket instead of failing on the store lock.
    let out = d.ok(&["add", f.to_str().unwrap()]);
    let hash = out.split_whitespace().next().unwrap().to_string();
    assert!(d.ok(&["ls"]).contains(&hash));
    assert!(d.ok(&["verify"]).contains("ok"));
    // The file in place touched: listed as changed (not served) until its
    // bytes are found unchanged.
    let file = std::fs::File::options().write(true).open(&f).unwrap();
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(file);
    let ls: serde_json::Value = serde_json::from_str(d.ok(&["--json", "ls"]).trim()).unwrap();
    assert_eq!(
        (&ls["changed"], &ls["corrupt"]),
        (&true.into(), &false.into()),
        "{ls}"
    );
    assert!(d.ok(&["ls"]).contains(" changed "));
    // The first peer to ask is told nothing, and the node hashes the file
    // again (saying so, once): its bytes are unchanged, so it is served
    // again without the user's `verify`.
    let have = who(&node, &hash);
    assert_eq!(have, Some(pb::availability::Have::Nothing(true)));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut have = have;
    while have != Some(pb::availability::Have::Complete(true)) {
        assert!(
            std::time::Instant::now() < deadline,
            "never served again: {have:?}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
        have = who(&node, &hash);
    }
    // The log is read from the node's stderr by a thread: give it time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !node.log().contains("serving it again") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = node.log();
    assert_eq!(
        log.matches(&format!(
            "{hash} (f.bin): its file changed since it was added"
        ))
        .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("its bytes are unchanged; serving it again"),
        "{log}"
    );
    let ls: serde_json::Value = serde_json::from_str(d.ok(&["--json", "ls"]).trim()).unwrap();
    assert_eq!(
        (&ls["changed"], &ls["complete"]),
        (&false.into(), &true.into()),
        "{ls}"
    );
    assert!(d.ok(&["verify"]).contains(&format!("{hash}  ok")));
    let t = d.ok(&["ticket", &hash]);
    assert!(t.starts_with("shoal"));
    let status: serde_json::Value =
        serde_json::from_str(d.ok(&["--json", "status"]).trim()).unwrap();
    assert!(!status["addrs"].as_array().unwrap().is_empty());
    d.ok(&["peers"]);
    d.ok(&["rm", &hash]);
    d.ok(&["gc"]);
    // An in-place file is never deleted by gc.
    assert!(f.exists());
}

#[test]
fn status_shows_the_small_blobs_a_node_keeps_after_serving_them() {
    let seeder = Dir::new();
    let tree = seeder.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    for i in 0..5u64 {
        std::fs::write(tree.join(format!("f{i}")), data(4096, 100 + i)).unwrap();
    }
    let out = seeder.ok(&["add", tree.to_str().unwrap()]);
    let hash = out.split_whitespace().next().unwrap().to_string();
    let _node = seeder.serve(&[]);
    let cache = || -> serde_json::Value {
        let s: serde_json::Value =
            serde_json::from_str(seeder.ok(&["--json", "status"]).trim()).unwrap();
        s["served_cache"].clone()
    };
    let before = cache();
    assert_eq!(before["blobs"], 0, "{before}");
    assert_eq!(before["bytes"], 0, "{before}");
    assert_eq!(before["budget"], 64u64 << 20, "{before}");

    let ticket = seeder.ok(&["ticket", &hash]).trim().to_string();
    let downloader = Dir::new();
    let got = downloader.path().join("got");
    downloader.ok(&[
        "get",
        &ticket,
        "-o",
        got.to_str().unwrap(),
        "--no-mdns",
        "--no-dht",
    ]);
    assert_eq!(std::fs::read(got.join("f3")).unwrap(), data(4096, 103));
    // The five files went out whole and checked, and stay in memory.
    let after = cache();
    assert!(after["blobs"].as_u64().unwrap() >= 5, "{after}");
    assert!(after["bytes"].as_u64().unwrap() >= 5 * 4096, "{after}");
    assert_eq!(after["budget"], 64u64 << 20, "{after}");
    let text = seeder.ok(&["status"]);
    assert!(text.contains("small blobs served lately"), "{text}");
}

#[test]
fn a_large_file_added_in_place_is_hashed_while_the_store_opens() {
    // Above the CLI's overlap threshold (32 MiB): the file is hashed on one
    // thread while the store opens on another, then recorded.
    let d = Dir::new();
    let f = d.path().join("large.bin");
    let mut bytes = vec![0u8; 40 << 20];
    for (i, chunk) in bytes.chunks_mut(1 << 20).enumerate() {
        chunk[..4096].copy_from_slice(&data(4096, i as u64));
    }
    std::fs::write(&f, &bytes).unwrap();
    let out = d.ok(&["add", f.to_str().unwrap()]);
    let hash = out.split_whitespace().next().unwrap().to_string();
    assert_eq!(hash, blake3::hash(&bytes).to_hex().as_str());
    let ls: serde_json::Value = serde_json::from_str(d.ok(&["--json", "ls"]).trim()).unwrap();
    assert_eq!(ls["hash"], hash.as_str());
    assert_eq!(ls["complete"], true);
    assert_eq!(ls["size"], 40u64 << 20);
    assert!(d.ok(&["verify"]).contains(&format!("{hash}  ok")));

    // A store that cannot open is the error reported, not a hash.
    let d2 = Dir::new();
    std::fs::create_dir_all(d2.path().join("node")).unwrap();
    std::fs::write(d2.path().join("node/store"), b"not a directory").unwrap();
    let o = d2.run(&["add", f.to_str().unwrap()], Duration::from_secs(60));
    assert!(!o.status.success());
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("opening the store"), "{stderr}");
}

/// Store commands run at once on one data dir with no node: each waits
/// for the others' hold on the store instead of failing on its lock (two
/// `shoal add`s started together failed: "store ... is in use by another
/// process"). One add is large enough to hash while the store opens.
#[test]
fn store_commands_run_together_on_one_data_dir_all_succeed() {
    let src = Dir::new();
    let mut files = Vec::new();
    for i in 0..6u64 {
        let p = src.path().join(format!("f{i}.bin"));
        let size = if i == 0 {
            40 << 20
        } else {
            200_000 + i as usize
        };
        std::fs::write(&p, data(size, 700 + i)).expect("write");
        files.push(p.to_str().expect("utf-8").to_string());
    }
    let d = Dir::new();
    // The store exists (and is empty) before they start.
    d.ok(&["ls"]);
    let d = &d;
    let outs: Vec<(String, std::process::Output)> = std::thread::scope(|s| {
        let mut jobs = Vec::new();
        for f in &files {
            jobs.push(s.spawn(move || {
                (
                    format!("add {f}"),
                    d.run(&["add", f], Duration::from_secs(120)),
                )
            }));
        }
        for args in [&["ls"][..], &["verify"], &["gc"]] {
            jobs.push(s.spawn(move || (args.join(" "), d.run(args, Duration::from_secs(120)))));
        }
        jobs.into_iter()
            .map(|j| j.join().expect("a command thread"))
            .collect()
    });
    for (what, o) in &outs {
        assert!(
            o.status.success(),
            "shoal {what} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Every add is recorded, with the hash it printed.
    let ls = d.ok(&["ls"]);
    for (what, o) in outs.iter().filter(|(w, _)| w.starts_with("add ")) {
        let line = String::from_utf8_lossy(&o.stdout);
        let hash = line.split_whitespace().next().expect("a hash");
        assert!(ls.contains(hash), "{what}: {hash} not listed:\n{ls}");
    }
}

/// A node that does not answer (stopped with SIGSTOP) leaves `ls` waiting,
/// and saying so after 10 s (it hung without a word: a review); once the
/// node goes on, `ls` ends.
#[test]
fn a_command_waiting_on_a_silent_node_says_so() {
    use std::io::Read;
    let d = Dir::new();
    let node = d.serve(&[]);
    let pid = node.child.id() as i32;
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut ls = crate::harness::KillOnDrop(
        d.cmd()
            .arg("ls")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = ls.0.stderr.take().unwrap();
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let said2 = said.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            said2
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    crate::harness::eventually(Duration::from_secs(30), "ls to say it waits", || {
        said.lock().unwrap().contains("has not answered for 10 s")
    });
    assert!(ls.0.try_wait().unwrap().is_none(), "ls gave up");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    crate::harness::eventually(Duration::from_secs(30), "ls to end", || {
        ls.0.try_wait().unwrap().is_some()
    });
    assert!(ls.0.wait().unwrap().success(), "{}", said.lock().unwrap());
}
