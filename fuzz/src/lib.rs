//! Fuzz targets for every decoder that reads bytes from a stranger: peer
//! frames and messages, the control socket, tickets, collection manifests
//! and the verified-stream receiver.
//!
//! Each target is a plain function from bytes to an [`Outcome`] label: it
//! must never panic, hang or allocate without bound, and it checks what the
//! decoder promises (round trips, safe paths, only verified bytes stored)
//! with assertions, so a broken promise is a crash like any other. The
//! labels give the mutation driver in [`driver`] a crude notion of
//! progress: an input that reaches a new label joins the corpus.
//!
//! Only the stable toolchain is available here, so instead of libFuzzer the
//! targets are driven by a small mutation loop (`shoal-fuzz` binary,
//! `cargo xtask fuzz`). Inputs that once crashed live in
//! `fuzz/regressions/<target>/` and are replayed by `cargo test -p
//! shoal-fuzz`.

pub mod driver;

use std::str::FromStr;
use std::sync::OnceLock;

use prost::Message;
use shoal_proto::frame::{self, decode_one};
use shoal_proto::{GroupRanges, Limit, hash_from_bytes, pb};
use shoal_store::Store;
use shoal_store::collection::{Entry, check_path, encode_manifest, parse_manifest};
use shoal_transport::{PeerId, Ticket};

/// What a target made of an input: a short label (which decoder, which
/// result) that the driver uses to tell inputs apart.
pub type Outcome = String;

/// One fuzz target.
#[derive(Clone, Copy)]
pub struct Target {
    /// Its name: the subcommand argument and the folder of its corpus,
    /// regressions and artifacts.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]) -> Outcome,
    /// Valid (or nearly valid) inputs to start mutating from.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame",
        run: frame,
        seeds: frame_seeds,
    },
    Target {
        name: "messages",
        run: messages,
        seeds: message_seeds,
    },
    Target {
        name: "control",
        run: control,
        seeds: control_seeds,
    },
    Target {
        name: "ticket",
        run: ticket,
        seeds: ticket_seeds,
    },
    Target {
        name: "manifest",
        run: manifest,
        seeds: manifest_seeds,
    },
    Target {
        name: "stream",
        run: stream,
        seeds: stream_seeds,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}

fn label<E: std::fmt::Debug>(what: &str, r: &Result<impl Sized, E>) -> String {
    match r {
        Ok(_) => format!("{what}:ok"),
        Err(e) => {
            let d = format!("{e:?}");
            let kind: String = d.chars().take_while(|c| c.is_alphanumeric()).collect();
            format!("{what}:{kind}")
        }
    }
}

// ------------------------------------------------------------------ frames

/// Re-encoding a decoded message and decoding it again gives it back.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: &M) {
    let again = frame::encode(m);
    let (back, used) = decode_one::<M>(&again, Limit::ControlResponse)
        .or_else(|_| M::decode(&again[frame::HEADER_LEN..]).map(|m| (m, again.len())))
        .expect("a re-encoded message decodes");
    assert_eq!(used, again.len());
    assert_eq!(&back, m, "re-encoded message decodes differently");
}

fn frames_of<M: Message + Default + PartialEq + std::fmt::Debug>(
    mut buf: &[u8],
    limit: Limit,
    what: &str,
    out: &mut Vec<String>,
    check: impl Fn(&M),
) {
    // At most a few frames: the point is the boundaries between them.
    for _ in 0..8 {
        let r = decode_one::<M>(buf, limit);
        out.push(label(what, &r));
        match r {
            Ok((m, used)) => {
                assert!(used >= frame::HEADER_LEN && used <= buf.len());
                assert!(used - frame::HEADER_LEN <= limit.bytes());
                round_trip(&m);
                check(&m);
                buf = &buf[used..];
                if buf.is_empty() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Whole frames (header and payload), read back to back as each peer
/// message kind, with the checks the node applies to what they carry.
pub fn frame(data: &[u8]) -> Outcome {
    let mut out = Vec::new();
    frames_of::<pb::Request>(data, Limit::Request, "req", &mut out, check_request);
    frames_of::<pb::Response>(data, Limit::Response, "resp", &mut out, check_response);
    frames_of::<pb::HaveUpdate>(data, Limit::HaveUpdate, "have", &mut out, |h| {
        check_ranges(h.added.as_ref());
        let _ = hash_from_bytes(&h.hash);
    });
    out.join(",")
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for r in sample_requests() {
        seeds.push(frame::encode(&r).to_vec());
    }
    for r in sample_responses() {
        seeds.push(frame::encode(&r).to_vec());
    }
    let mut two = frame::encode(&sample_requests()[1]).to_vec();
    two.extend_from_slice(&frame::encode(&sample_requests()[2]));
    seeds.push(two);
    seeds.push(frame::encode(&sample_have()).to_vec());
    seeds.push(vec![0xff, 0xff, 0xff, 0xff]);
    seeds.push(vec![0, 0, 0, 0]);
    seeds
}

/// Group ranges from the wire: accepted ones are sorted, disjoint and
/// survive a round trip.
fn check_ranges(p: Option<&pb::GroupRanges>) -> bool {
    let Ok(r) = GroupRanges::from_opt_pb(p) else {
        return false;
    };
    let mut last_end = None;
    for run in r.runs() {
        assert!(run.start < run.end, "empty run {run:?} in {r:?}");
        if let Some(e) = last_end {
            assert!(run.start > e, "runs overlap or touch in {r:?}");
        }
        last_end = Some(run.end);
    }
    let back = GroupRanges::from_pb(&r.to_pb()).expect("own ranges decode");
    assert_eq!(back, r);
    let _ = r.count();
    let _ = r.iter().take(64).count();
    let _ = r.intersection(&GroupRanges::from_range(0..100));
    let _ = r.union(&GroupRanges::from_range(5..7));
    let _ = r.difference(&GroupRanges::from_range(1..3));
    true
}

fn check_request(r: &pb::Request) {
    use pb::request::Kind;
    match &r.kind {
        Some(Kind::Get(g)) => {
            let _ = hash_from_bytes(&g.hash);
            check_ranges(g.ranges.as_ref());
        }
        Some(Kind::Who(w)) => w.hashes.iter().for_each(|h| {
            let _ = hash_from_bytes(h);
        }),
        Some(Kind::Subscribe(s)) => s.hashes.iter().for_each(|h| {
            let _ = hash_from_bytes(h);
        }),
        Some(Kind::GetBlobs(g)) => g.hashes.iter().for_each(|h| {
            let _ = hash_from_bytes(h);
        }),
        Some(Kind::Pex(p)) => {
            let _ = hash_from_bytes(&p.hash);
        }
        Some(Kind::Hello(h)) => {
            for a in &h.listen_addrs {
                let _ = a.parse::<std::net::SocketAddr>();
            }
        }
        None => {}
    }
}

fn check_response(r: &pb::Response) {
    use pb::response::Kind;
    match &r.kind {
        Some(Kind::Error(e)) => {
            let _ = shoal_proto::error_code_name(e.code);
        }
        Some(Kind::Who(w)) => {
            for a in &w.entries {
                if let Some(pb::availability::Have::Ranges(r)) = &a.have {
                    check_ranges(Some(r));
                }
            }
        }
        Some(Kind::Get(g)) => {
            check_ranges(g.ranges.as_ref());
        }
        Some(Kind::Pex(p)) => {
            for peer in &p.peers {
                let _ = PeerId::from_bytes(&peer.id);
                for a in &peer.addrs {
                    let _ = a.parse::<std::net::SocketAddr>();
                }
            }
        }
        Some(Kind::GetBlobs(g)) => {
            let _ = g
                .blobs
                .iter()
                .map(|b| b.size)
                .fold(0u64, u64::saturating_add);
        }
        Some(Kind::Hello(_) | Kind::Subscribe(_)) | None => {}
    }
}

fn hash32(b: u8) -> bytes::Bytes {
    vec![b; 32].into()
}

fn sample_ranges() -> pb::GroupRanges {
    GroupRanges::from_groups([0, 1, 2, 7, 9, 10, 1000]).to_pb()
}

fn sample_requests() -> Vec<pb::Request> {
    use pb::request::Kind;
    [
        Kind::Hello(pb::Hello {
            version: 1,
            agent: "shoal/0.0.0".into(),
            listen_addrs: vec!["127.0.0.1:4000".into(), "[::1]:4000".into()],
            capabilities: vec!["have".into(), "pex".into()],
            instance: vec![7; 16].into(),
        }),
        Kind::Who(pb::Who {
            hashes: vec![hash32(1), hash32(2)],
        }),
        Kind::Get(pb::Get {
            hash: hash32(3),
            ranges: Some(sample_ranges()),
        }),
        Kind::Subscribe(pb::Subscribe {
            hashes: vec![hash32(4)],
        }),
        Kind::Pex(pb::Pex { hash: hash32(5) }),
    ]
    .into_iter()
    .map(|k| pb::Request { kind: Some(k) })
    .collect()
}

fn sample_responses() -> Vec<pb::Response> {
    use pb::response::Kind;
    [
        Kind::Error(pb::Error {
            code: 1,
            message: "not here".into(),
        }),
        Kind::Who(pb::WhoAnswer {
            entries: vec![pb::Availability {
                hash: hash32(1),
                size: 123_456,
                have: Some(pb::availability::Have::Ranges(sample_ranges())),
                kind: 0,
            }],
        }),
        Kind::Get(pb::GetHeader {
            size: 1 << 20,
            ranges: Some(sample_ranges()),
        }),
        Kind::Subscribe(pb::SubscribeAccepted {}),
        Kind::Pex(pb::PexAnswer {
            peers: vec![pb::PeerInfo {
                id: hash32(9),
                addrs: vec!["127.0.0.1:1".into()],
            }],
        }),
    ]
    .into_iter()
    .map(|k| pb::Response { kind: Some(k) })
    .collect()
}

fn sample_have() -> pb::HaveUpdate {
    pb::HaveUpdate {
        hash: hash32(7),
        size: 99_999,
        added: Some(sample_ranges()),
        complete: false,
        fetching: Some(sample_ranges()),
    }
}

/// One message payload (no frame header) of the kind the first byte picks:
/// every message type of the peer, control, collection and ticket schemas.
pub fn messages(data: &[u8]) -> Outcome {
    let Some((&sel, payload)) = data.split_first() else {
        return "empty".into();
    };
    fn one<M: Message + Default + PartialEq + std::fmt::Debug>(
        what: &str,
        payload: &[u8],
        check: impl Fn(&M),
    ) -> Outcome {
        let r = frame::decode::<M>(payload);
        if let Ok(m) = &r {
            round_trip(m);
            check(m);
        }
        label(what, &r)
    }
    match sel % 10 {
        0 => one("Request", payload, check_request),
        1 => one("Response", payload, check_response),
        2 => one("HaveUpdate", payload, |h: &pb::HaveUpdate| {
            check_ranges(h.added.as_ref());
        }),
        3 => one("GroupRanges", payload, |r: &pb::GroupRanges| {
            check_ranges(Some(r));
        }),
        4 => one("ControlRequest", payload, |_: &pb::ControlRequest| {}),
        5 => one("ControlResponse", payload, |_: &pb::ControlResponse| {}),
        6 => one("Manifest", payload, |_: &pb::Manifest| {}),
        7 => one("Ticket", payload, |t: &pb::Ticket| {
            let _ = Ticket::from_proto(t.clone());
        }),
        8 => one("PeerInfo", payload, |p: &pb::PeerInfo| {
            let _ = PeerId::from_bytes(&p.id);
        }),
        _ => one("Availability", payload, |a: &pb::Availability| {
            if let Some(pb::availability::Have::Ranges(r)) = &a.have {
                check_ranges(Some(r));
            }
        }),
    }
}

fn message_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let with = |sel: u8, bytes: Vec<u8>| {
        let mut v = vec![sel];
        v.extend(bytes);
        v
    };
    for r in sample_requests() {
        seeds.push(with(0, r.encode_to_vec()));
    }
    for r in sample_responses() {
        seeds.push(with(1, r.encode_to_vec()));
    }
    seeds.push(with(2, sample_have().encode_to_vec()));
    seeds.push(with(3, sample_ranges().encode_to_vec()));
    for c in control_messages() {
        seeds.push(with(4, c.encode_to_vec()));
    }
    seeds.push(with(6, sample_manifest(4).encode_to_vec()));
    seeds.push(with(7, sample_ticket().to_proto().encode_to_vec()));
    seeds
}

// ----------------------------------------------------------------- control

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// The control socket's reader: frames read from a byte stream the way
/// the node reads a connection, as requests and as responses.
pub fn control(data: &[u8]) -> Outcome {
    runtime().block_on(async {
        let mut out = Vec::new();
        let mut r = data;
        for _ in 0..4 {
            let req = shoal_node::wire::read_frame::<pb::ControlRequest, _>(
                &mut r,
                Limit::ControlRequest,
            )
            .await;
            out.push(label("req", &req));
            match req {
                Ok(m) => {
                    round_trip(&m);
                    check_control(&m);
                }
                Err(_) => break,
            }
        }
        let mut r = data;
        let resp =
            shoal_node::wire::read_frame::<pb::ControlResponse, _>(&mut r, Limit::ControlResponse)
                .await;
        if let Ok(m) = &resp {
            round_trip(m);
        }
        out.push(label("resp", &resp));
        out.join(",")
    })
}

fn check_control(m: &pb::ControlRequest) {
    use pb::control_request::Kind;
    if let Some(Kind::Get(g)) = &m.kind {
        let _ = hash_from_bytes(&g.hash);
        for p in &g.peers {
            let _ = PeerId::from_bytes(&p.id);
        }
    }
}

fn control_messages() -> Vec<pb::ControlRequest> {
    // Whatever the schema offers today, by default value of each kind.
    let mut v = Vec::new();
    for tag in 1..=16u32 {
        // A field with tag `tag` holding an empty message selects that kind.
        let bytes = [(tag << 3 | 2) as u8, 0];
        if let Ok(m) = pb::ControlRequest::decode(&bytes[..])
            && m.kind.is_some()
        {
            v.push(m);
        }
    }
    v
}

fn control_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = control_messages()
        .iter()
        .map(|m| frame::encode(m).to_vec())
        .collect();
    let get = pb::ControlRequest {
        kind: Some(pb::control_request::Kind::Get(pb::GetRequest {
            hash: hash32(1),
            peers: vec![pb::PeerInfo {
                id: hash32(2),
                addrs: vec!["127.0.0.1:9".into()],
            }],
            out: "/tmp/x".into(),
            ..Default::default()
        })),
    };
    seeds.push(frame::encode(&get).to_vec());
    seeds.push(vec![0xff, 0xff, 0xff, 0xff]);
    seeds.push(vec![0, 0, 0, 3, 1, 2]);
    seeds
}

// ------------------------------------------------------------------ tickets

fn sample_ticket() -> Ticket {
    let t = "127.0.0.1:7000".parse().expect("addr");
    let six = "[::1]:7001".parse().expect("addr");
    Ticket {
        hash: [3; 32],
        kind: shoal_transport::TicketKind::Blob,
        providers: vec![shoal_transport::Provider {
            id: PeerId::from_bytes(&[
                // The Ed25519 base point: a valid public key.
                0x58, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66,
                0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66,
                0x66, 0x66, 0x66, 0x66,
            ])
            .expect("valid key"),
            addrs: vec![t, six],
        }],
    }
}

/// Ticket text (and, after a 0 byte, the ticket message): accepted tickets
/// print back to themselves.
pub fn ticket(data: &[u8]) -> Outcome {
    if let Some((0, msg)) = data.split_first() {
        let r = pb::Ticket::decode(msg)
            .map_err(|_| ())
            .and_then(|m| Ticket::from_proto(m).map_err(|_| ()));
        if let Ok(t) = &r {
            let back = Ticket::from_proto(t.to_proto()).expect("own ticket");
            assert_eq!(&back, t);
        }
        return label("proto", &r);
    }
    let text = String::from_utf8_lossy(data);
    let r = Ticket::from_str(&text);
    if let Ok(t) = &r {
        let printed = t.to_string();
        let back: Ticket = printed.parse().expect("a printed ticket parses");
        assert_eq!(&back, t, "ticket does not survive printing");
        let _ = hash_from_bytes(&t.hash);
    }
    label("text", &r)
}

fn ticket_seeds() -> Vec<Vec<u8>> {
    let t = sample_ticket();
    let mut p = vec![0];
    p.extend(t.to_proto().encode_to_vec());
    vec![
        t.to_string().into_bytes(),
        t.to_string().to_uppercase().into_bytes(),
        b"shoal".to_vec(),
        p,
    ]
}

// ---------------------------------------------------------------- manifests

fn sample_manifest(n: usize) -> pb::Manifest {
    let mut entries = Vec::new();
    for i in 0..n {
        entries.push(Entry {
            path: format!("dir{}/file{i}.txt", i % 2),
            size: i as u64 * 1000,
            hash: blake3::hash(&[i as u8]),
            executable: i % 3 == 0,
            empty_dir: false,
        });
    }
    entries.push(Entry {
        path: "empty".into(),
        size: 0,
        hash: blake3::hash(b""),
        executable: false,
        empty_dir: true,
    });
    pb::Manifest::decode(&encode_manifest(&entries)[..]).expect("own manifest")
}

/// A path is safe to join onto a target directory.
fn assert_safe(path: &str) {
    assert!(!path.is_empty());
    assert!(!path.starts_with('/'), "absolute path {path:?} accepted");
    assert!(!path.contains('\0'), "NUL in {path:?} accepted");
    assert!(!path.contains('\\'), "backslash in {path:?} accepted");
    for c in path.split('/') {
        assert!(
            !c.is_empty() && c != "." && c != "..",
            "component {c:?} of {path:?} accepted"
        );
    }
    let p = std::path::Path::new(path);
    assert!(
        p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_))),
        "{path:?} is not plain relative"
    );
}

/// A manifest blob and, separately, its bytes as one path: whatever is
/// accepted is safe, and re-encodes to the same entries.
pub fn manifest(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    let p = check_path(&text);
    if p.is_ok() {
        assert_safe(&text);
    }
    let r = parse_manifest(data);
    if let Ok(entries) = &r {
        let mut seen = std::collections::HashSet::new();
        for e in entries {
            assert_safe(&e.path);
            assert!(seen.insert(e.path.clone()), "duplicate {:?}", e.path);
        }
        let again = parse_manifest(&encode_manifest(entries)).expect("own manifest parses");
        assert_eq!(&again, entries);
    }
    format!("{},{}", label("path", &p), label("manifest", &r))
}

fn manifest_seeds() -> Vec<Vec<u8>> {
    let mut m = sample_manifest(5);
    let mut seeds = vec![m.encode_to_vec(), b"a/b/c".to_vec(), b"../x".to_vec()];
    m.entries[0].path = "../../etc/passwd".into();
    seeds.push(m.encode_to_vec());
    m.entries[0].path = "/abs".into();
    seeds.push(m.encode_to_vec());
    m.entries[0].path = "a\0b".into();
    seeds.push(m.encode_to_vec());
    seeds
}

// ---------------------------------------------------------- verified stream

/// The blob every stream input claims to be: 4 full groups and a partial one.
pub const STREAM_BLOB_LEN: usize = 4 * 16 * 1024 + 4321;

struct Blob {
    data: Vec<u8>,
    hash: blake3::Hash,
    source: Store,
}

fn blob() -> &'static Blob {
    static B: OnceLock<Blob> = OnceLock::new();
    B.get_or_init(|| {
        let data: Vec<u8> = (0..STREAM_BLOB_LEN)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
            .collect();
        let source = Store::in_memory();
        let hash = source.import_bytes(&data, "fuzz").expect("import");
        Blob { data, hash, source }
    })
}

/// The groups an input asks for: a bitmask over the blob's 5 groups in the
/// first byte, plus group 1000 (beyond the end) if its top bit is set.
fn stream_ranges(sel: u8) -> GroupRanges {
    let mut g: Vec<u64> = (0..5).filter(|i| sel & (1 << i) != 0).collect();
    if sel & 0x80 != 0 {
        g.push(1000);
    }
    GroupRanges::from_groups(g)
}

/// The verified-stream receiver, fed a stream from a stranger: whatever
/// it keeps is exactly the original data, and a blob only completes with
/// the true size.
pub fn stream(data: &[u8]) -> Outcome {
    let Some((&sel, body)) = data.split_first() else {
        return "empty".into();
    };
    let b = blob();
    let ranges = stream_ranges(sel);
    let store = Store::in_memory();
    let r = runtime().block_on(store.receive_ranges(&b.hash, &ranges, body));
    if let Ok(groups) = &r {
        assert!(
            groups.difference(&ranges).is_empty(),
            "verified {groups:?}, not asked for"
        );
    }
    if let Some(info) = store.info(&b.hash) {
        if info.complete {
            assert_eq!(
                info.size,
                b.data.len() as u64,
                "completed with a wrong size"
            );
        }
        for g in info
            .verified
            .iter()
            .chain(if info.complete { 0..5 } else { 0..0 })
        {
            let off = g * 16 * 1024;
            if let Ok(bytes) = store.read_at(&b.hash, off, 16 * 1024) {
                let start = (off as usize).min(b.data.len());
                let end = (start + bytes.len()).min(b.data.len());
                assert_eq!(
                    &bytes[..end - start],
                    &b.data[start..end],
                    "group {g} kept with bytes that are not the blob's"
                );
            }
        }
    }
    match &r {
        Ok(g) => format!("recv:ok:{}", g.count()),
        Err(e) => label("recv", &Err::<(), _>(e)),
    }
}

/// An honest stream of `ranges`.
pub fn honest_stream(sel: u8) -> Vec<u8> {
    let b = blob();
    let mut out = Vec::new();
    runtime()
        .block_on(b.source.send_ranges(&b.hash, &stream_ranges(sel), &mut out))
        .expect("send_ranges into a buffer");
    out
}

fn stream_seeds() -> Vec<Vec<u8>> {
    [0x1fu8, 0x01, 0x10, 0x0a, 0x9f]
        .into_iter()
        .map(|sel| {
            let mut v = vec![sel];
            v.extend(honest_stream(sel));
            v
        })
        .collect()
}
