//! `shoal`: the command line of shoal, as `../shared/cli.md` specifies it.
//!
//! This crate owns argument parsing, output formats (text and `--json`),
//! progress bars and exit codes. Everything else is a library call: the
//! store directly when no node runs on the data dir, or the running node
//! through its control socket (`shoal_node::control`).

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use shoal_node::control::{ControlClient, VERIFY_NOT_IN_STORE, verify_failure};
use shoal_node::{
    DiscoveryConfig, FetchOutput, FetchRequest, Hash, ImportMode, Node, NodeConfig, PeerAddr,
    Progress, Ticket,
};
use shoal_proto::pb;
use shoal_store::{HashedFile, Store};

/// Set once, at start, from `-q`.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A message on stderr that is neither a result nor an error (what a
/// command did, how long it took): none with `-q`, which leaves only
/// errors on stderr.
macro_rules! note {
    ($($t:tt)*) => {
        if !crate::QUIET.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($t)*);
        }
    };
}

mod demo;
mod dht_node;
mod output;

use output::Out;

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Share files by hash with verified, swarming peer-to-peer transfers"
)]
struct Cli {
    /// Where the identity, the store and the control socket live.
    #[arg(long, global = true, env = "SHOAL_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Machine-readable output: one JSON object per line on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print this node's peer id, creating the identity on first use.
    Id,
    /// Import files or directories into the store and serve them.
    Add {
        /// Files or directories (a directory becomes a collection).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Keep a private copy instead of referencing the files in place.
        #[arg(long)]
        copy: bool,
    },
    /// List what the store holds.
    Ls,
    /// Unpin blobs; `shoal gc` then frees their space.
    Rm {
        /// Hashes to unpin.
        #[arg(required = true, value_parser = check_hash)]
        hashes: Vec<String>,
    },
    /// Delete unpinned data that no pinned collection needs.
    Gc,
    /// Re-hash stored data; exit 1 naming every corrupt blob.
    Verify {
        /// Hashes to check (default: all).
        #[arg(value_parser = check_hash)]
        hashes: Vec<String>,
    },
    /// Run the node in the foreground until SIGINT/SIGTERM.
    Serve {
        #[command(flatten)]
        net: NetArgs,
        /// Addresses to listen on (IP:PORT; port 0 picks one).
        #[arg(long = "listen", value_name = "ADDR")]
        listen: Vec<SocketAddr>,
    },
    /// Print a ticket for HASH from the running node.
    Ticket {
        /// The hash.
        #[arg(value_parser = check_hash)]
        hash: String,
    },
    /// Add PATH, print its ticket and serve it until interrupted.
    Send {
        /// File or directory.
        path: PathBuf,
        #[command(flatten)]
        net: NetArgs,
        /// Addresses to listen on.
        #[arg(long = "listen", value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        /// Keep a private copy instead of referencing the files in place.
        #[arg(long)]
        copy: bool,
        /// Keep PATH pinned in the store once `send` stops (by default
        /// what `send` pinned is unpinned then, and `shoal gc` frees it;
        /// through a running `shoal serve`, PATH stays served and pinned).
        #[arg(long)]
        keep: bool,
    },
    /// Fetch content from every peer that has it, verifying every chunk.
    Get {
        /// A ticket, or a bare 64-hex hash (peers then come from discovery).
        #[arg(value_parser = check_target)]
        what: String,
        /// Output file (or directory for a collection); `-` streams to stdout.
        /// Without it the content stays in the store.
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Stream verified content to stdout (same as `get -o -`).
    Cat {
        /// A ticket or a hash.
        #[arg(value_parser = check_target)]
        what: String,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Peers the running node knows.
    Peers,
    /// Status of the running node.
    Status,
    /// A self-contained showcase: several nodes on loopback swarm a file.
    Demo(demo::DemoArgs),
    /// Run a bare Mainline DHT node (server mode) to bootstrap a private DHT.
    DhtNode(dht_node::DhtNodeArgs),
}

#[derive(Args, Debug, Clone, Default)]
struct NetArgs {
    /// A peer to use: IP:PORT or PEERID@IP:PORT.
    #[arg(long = "peer", value_name = "ADDR")]
    peers: Vec<PeerAddr>,
    /// Do not use multicast DNS on the LAN.
    #[arg(long)]
    no_mdns: bool,
    /// Do not use the Mainline DHT.
    #[arg(long)]
    no_dht: bool,
    /// DHT bootstrap nodes (default: the public ones).
    #[arg(long = "dht-bootstrap", value_name = "ADDR")]
    dht_bootstrap: Vec<SocketAddr>,
    /// Announce nothing (still downloads).
    #[arg(long)]
    no_announce: bool,
    /// Answer other DHT nodes' queries from the start (DHT server mode):
    /// faster lookups on a small private DHT; on the public DHT it keeps
    /// libtorrent nodes from using this node.
    #[arg(long)]
    dht_server: bool,
    /// Upload limit, e.g. 10MB/s, 800KiB/s, 100Mbit/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_upload: Option<u64>,
    /// Download limit.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_download: Option<u64>,
    /// Give up after this many seconds without progress.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout: u64,
}

/// `--timeout`'s default: seconds without progress before a get gives up.
const DEFAULT_TIMEOUT_SECS: u64 = 60;

fn parse_rate(s: &str) -> Result<u64, String> {
    shoal_transport::parse_rate(s).map_err(|e| e.to_string())
}

impl NetArgs {
    /// Says which of these options a node already running on `dir` does
    /// not take from this command (it runs with its own), so that they
    /// are not silently ignored. `get` passes `--peer` on (`peers_passed`);
    /// `listen` is `send`'s `--listen`.
    /// Warns of the flags given that the node running on `dir` does not
    /// take, and whose value differs from its own (asked of it: a get
    /// with `--no-mdns --no-dht` through another such get's node was
    /// warned that they apply only to a node it starts; a review).
    async fn warn_ignored_by(&self, dir: &Path, listen: &[SocketAddr], peers_passed: bool) {
        let node = node_status(dir).await;
        // Differs from the node's, or the node did not say.
        let differs = |f: &dyn Fn(&pb::NodeStatus) -> bool| node.as_ref().is_none_or(|s| !f(s));
        let given = [
            ("--peer", !peers_passed && !self.peers.is_empty()),
            ("--no-mdns", self.no_mdns && differs(&|s| !s.mdns)),
            ("--no-dht", self.no_dht && differs(&|s| !s.dht)),
            ("--dht-bootstrap", !self.dht_bootstrap.is_empty()),
            (
                "--no-announce",
                self.no_announce && differs(&|s| !s.announce),
            ),
            ("--dht-server", self.dht_server),
            (
                "--max-upload",
                self.max_upload
                    .is_some_and(|r| differs(&|s| s.max_upload == r)),
            ),
            (
                "--max-download",
                self.max_download
                    .is_some_and(|r| differs(&|s| s.max_download == r)),
            ),
            (
                "--timeout",
                self.timeout != DEFAULT_TIMEOUT_SECS
                    && differs(&|s| s.stall_timeout_secs == self.timeout.max(1)),
            ),
            ("--listen", !listen.is_empty()),
        ];
        let ignored: Vec<&str> = given.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect();
        if !ignored.is_empty() {
            tracing::warn!(
                "the node running on {} goes on with its own settings: {} {} only to a node \
                 this command starts (stop the node, or give {} to `shoal serve`)",
                dir.display(),
                ignored.join(", "),
                if ignored.len() == 1 {
                    "applies"
                } else {
                    "apply"
                },
                if ignored.len() == 1 { "it" } else { "them" }
            );
        }
    }

    fn node_config(&self, data_dir: &Path, listen: &[SocketAddr]) -> NodeConfig {
        let mut c = NodeConfig {
            data_dir: Some(data_dir.to_path_buf()),
            peers: self.peers.clone(),
            discovery: DiscoveryConfig {
                mdns: !self.no_mdns,
                dht: !self.no_dht,
                dht_bootstrap: self.dht_bootstrap.clone(),
                announce: !self.no_announce,
                dht_server_mode: self.dht_server,
                ..DiscoveryConfig::default()
            },
            upload_limit: self.max_upload,
            download_limit: self.max_download,
            stall_timeout: Duration::from_secs(self.timeout.max(1)),
            ..NodeConfig::default()
        };
        if !listen.is_empty() {
            c.listen = listen.to_vec();
        }
        c
    }
}

/// Keep freed buffers for reuse instead of returning them to the kernel.
///
/// A transfer allocates and frees buffers of a few hundred KiB to a few MiB
/// all the time (encoded pieces waiting for their acknowledgement, received
/// packets, write batches). glibc's defaults hand each freed one back
/// (`madvise`/`munmap`) and fault its pages in again on the next allocation:
/// 13% of a seeder's CPU in the S2 profile. With a fixed mmap threshold and
/// a high trim threshold the freed memory is reused; peak RSS stays what the
/// transfer needs at once (S5 measures it).
///
/// A heap also grows in steps of at least 16 MiB of address space (pages
/// are still only resident once touched): by default a thread's heap grows
/// by what each allocation lacks, one `mprotect` per page or two. A fresh
/// seeder's first get of 10,000 small files, whose contents it keeps
/// (`shoal-store`'s served cache), made 8,780 of those calls; with this,
/// 24, and the seeder's CPU for that get fell 150 -> 138 ms (8 alternating
/// rounds, a fresh seeder each).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it runs before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

/// Async worker threads for `cmd`, if not tokio's default (one per core):
/// a one-shot `get` or `cat` leaves a core to its blocking work (checking
/// and writing what arrives), which otherwise competes with a worker for
/// it. A 1 GiB get on 2 cores, 6 alternating rounds: 1336 -> 1233 ms, the
/// downloader's CPU 1.18 -> 1.06 s (the bare QUIC stream with a receiver of
/// one worker: +3%). `TOKIO_WORKER_THREADS`, when set, decides instead.
fn worker_threads(cmd: &Command) -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    match cmd {
        Command::Get { .. } | Command::Cat { .. } => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Some(cores.saturating_sub(1).max(1))
        }
        _ => None,
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging(&cli);
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads(&cli.command) {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(run(cli));
    if rt.metrics().num_alive_tasks() == 0 && Store::open_count() == 0 {
        // No task is left to drop and every store is closed: exit without
        // joining the runtime's threads, which took ~1.5 ms at the end of
        // every `shoal add` (12 alternating rounds of a 1 GiB add: 93.0 ->
        // 91.1 ms). A blocking task still running (not counted by tokio)
        // would be cut short; one that holds a store is waited for below.
        rt.shutdown_background();
    } else {
        // Let dropped tasks finish their destructors (a store saving its
        // partial downloads), but do not wait for stray blocking tasks (a
        // stalled disk read, say).
        rt.shutdown_timeout(Duration::from_secs(2));
    }
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, as `{:#}` writes them, but
/// without a cause the line already holds: the store's errors name their
/// I/O cause in their own message, which `{:#}` then printed twice
/// ("... No such file or directory (os error 2): No such file or directory
/// (os error 2)").
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_logging(cli: &Cli) {
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        // shoal-discovery reports an unreachable DHT once, in its own words;
        // mainline would add an error line of its own per attempt.
        (_, 0) => "warn,shoal=info,mainline=off",
        (_, 1) => {
            "info,shoal_node=debug,shoal_store=debug,shoal_transport=debug,shoal_discovery=debug"
        }
        _ => "debug,shoal_node=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn data_dir(cli: &Cli) -> Result<PathBuf> {
    if let Some(d) = &cli.data_dir {
        return Ok(d.clone());
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .context("no --data-dir given and neither XDG_DATA_HOME nor HOME is set")?;
    Ok(base.join("shoal"))
}

/// A HASH argument that is not one is a usage error (exit 2), as clap
/// says of any other malformed argument.
fn check_hash(s: &str) -> Result<String, String> {
    parse_hash(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// The same for a TICKET|HASH argument.
fn check_target(s: &str) -> Result<String, String> {
    parse_target(s)
        .map(|_| s.to_string())
        .map_err(|e| one_line(&e))
}

fn parse_hash(s: &str) -> Result<Hash> {
    Hash::from_hex(s.trim())
        .map_err(|_| anyhow::anyhow!("{s:?} is not a hash: expected 64 hex digits"))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// What a command on the data dir acts on: the node running there,
/// through its control socket, or else the store, opened directly.
enum Access {
    Node(ControlClient),
    Store(Store),
}

/// The node running on `dir`, or else its store. Another shoal process may
/// hold the store without a node to ask (an `add` or a `verify` of its
/// own, a get's node while it starts, or while it stops after closing its
/// socket): this waits for it (`wait`), looking for a node each time.
/// Commands run at once on one data dir used to fail on the store's lock.
async fn access(dir: &Path, wait: &Waiter<'_>) -> Result<Access> {
    loop {
        if let Some(c) = ControlClient::connect(dir).await {
            return Ok(Access::Node(c));
        }
        match open_store(dir) {
            Ok(store) => return Ok(Access::Store(store)),
            Err(e) => {
                let locked = matches!(e, shoal_store::StoreError::Locked(_));
                if locked && wait.may_wait() {
                    wait.pause().await?;
                    continue;
                }
                let e = anyhow::Error::from(e)
                    .context(format!("opening the store in {}", dir.display()));
                return Err(if locked { wait.gave_up(e) } else { e });
            }
        }
    }
}

/// What [`ask_or_open`] got.
enum Answer {
    /// The running node's answers to the request, all of them.
    Node(Vec<pb::control_response::Kind>),
    /// No node runs: the store, opened.
    Store(Store),
}

/// Makes `req` of the node running on `dir` and gathers its answers, or
/// else opens the store ([`access`]). A node that is stopping (it says so,
/// or its socket closes before its last answer) is asked again once
/// another runs, or its store is opened once it is gone: `req` must be one
/// that may be made twice (a listing, an unpin, a gc, a verify).
/// How long a command waits for a node's answer before it says it waits.
const PATIENCE: Duration = Duration::from_secs(10);

/// Awaits `f`, a request to the node running on `dir`, saying once that it
/// still waits if the node has not answered within [`PATIENCE`]: a node
/// stopped (SIGSTOP) or stuck left `ls` and `status` hanging without a
/// word (a review).
async fn patiently<T>(dir: &Path, f: impl Future<Output = T>) -> T {
    tokio::pin!(f);
    tokio::select! {
        r = &mut f => return r,
        () = tokio::time::sleep(PATIENCE) => {}
    }
    tracing::warn!(
        "the node running on {} has not answered for {} s; still waiting (it may be busy, or \
         stopped: Ctrl-C gives up)",
        dir.display(),
        PATIENCE.as_secs()
    );
    f.await
}

async fn ask_or_open(dir: &Path, req: pb::control_request::Kind) -> Result<Answer> {
    let wait = Waiter::new(dir);
    loop {
        let mut c = match access(dir, &wait).await? {
            Access::Node(c) => c,
            Access::Store(store) => return Ok(Answer::Store(store)),
        };
        let mut answers = Vec::new();
        let asked = async {
            c.send(req.clone()).await?;
            while let Some(k) = c.next().await? {
                answers.push(k);
            }
            Ok::<(), shoal_node::NodeError>(())
        };
        match patiently(dir, asked).await {
            Ok(()) => return Ok(Answer::Node(answers)),
            Err(e) if e.is_node_gone() && wait.may_wait() => {
                tracing::debug!("the node on {} stopped: {e}", dir.display());
            }
            Err(e) if e.is_node_gone() => return Err(wait.gave_up(e.into())),
            Err(e) => return Err(e.into()),
        }
        wait.pause().await?;
    }
}

/// What gc keeps on `dir` (pinned, or named by a pinned collection), asked
/// of the node there (or its store, if the node stopped meanwhile).
async fn kept_through_node(dir: &Path) -> Result<HashSet<Hash>> {
    Ok(
        match ask_or_open(dir, pb::control_request::Kind::List(pb::ListRequest {})).await? {
            // `pinned` in a listing is what gc keeps: pinned itself, or
            // named by a pinned collection; these were just unpinned.
            Answer::Node(answers) => answers
                .into_iter()
                .filter_map(|k| match k {
                    pb::control_response::Kind::Item(i) if i.pinned => {
                        shoal_proto::hash_from_bytes(&i.hash)
                            .ok()
                            .map(Hash::from_bytes)
                    }
                    _ => None,
                })
                .collect(),
            Answer::Store(store) => store.kept_by_collections(),
        },
    )
}

/// [`ask_or_open`], each answer given to `each` as it comes (a long
/// `verify` through a node printed nothing until it was done: a review).
/// A node that stops after answering some fails the command (it would
/// say them twice if asked again); before any, it is asked again. The
/// store, opened directly, if no node runs.
async fn ask_or_open_each(
    dir: &Path,
    req: pb::control_request::Kind,
    mut each: impl FnMut(pb::control_response::Kind) -> Result<()>,
) -> Result<Option<Store>> {
    let wait = Waiter::new(dir);
    loop {
        let mut c = match access(dir, &wait).await? {
            Access::Node(c) => c,
            Access::Store(store) => return Ok(Some(store)),
        };
        let mut answered = 0usize;
        let asked = async {
            c.send(req.clone()).await?;
            while let Some(k) = c.next().await? {
                answered += 1;
                each(k).map_err(|e| shoal_node::NodeError::Refused(format!("{e:#}")))?;
            }
            Ok::<(), shoal_node::NodeError>(())
        };
        match asked.await {
            Ok(()) => return Ok(None),
            Err(e) if e.is_node_gone() && answered > 0 => bail!(
                "the node on {} stopped part way ({e}); run the command again",
                dir.display()
            ),
            Err(e) if e.is_node_gone() && wait.may_wait() => {
                tracing::debug!("the node on {} stopped: {e}", dir.display());
            }
            Err(e) if e.is_node_gone() => return Err(wait.gave_up(e.into())),
            Err(e) => return Err(e.into()),
        }
        wait.pause().await?;
    }
}

async fn run(cli: Cli) -> Result<()> {
    let dir = data_dir(&cli)?;
    let out = Out::new(cli.json);
    match &cli.command {
        Command::Id => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let key = shoal_transport::SecretKey::load_or_create(&dir.join("identity.key"))?;
            out.id(&key.public().to_string())?;
        }
        Command::Add { paths, copy } => add(&dir, &out, paths, *copy).await?,
        Command::Ls => {
            match ask_or_open(&dir, pb::control_request::Kind::List(pb::ListRequest {})).await? {
                Answer::Node(answers) => {
                    let items: Vec<pb::StoreItem> = answers
                        .into_iter()
                        .filter_map(|k| match k {
                            pb::control_response::Kind::Item(i) => Some(i),
                            _ => None,
                        })
                        .collect();
                    out.list(&items)?;
                }
                Answer::Store(store) => {
                    let kept = store.kept_by_collections();
                    let items: Vec<pb::StoreItem> = store
                        .list()
                        .into_iter()
                        .map(|b| shoal_node::control::store_item(&store, &kept, b))
                        .collect();
                    out.list(&items)?;
                }
            }
        }
        Command::Rm { hashes } => {
            let hashes: Vec<Hash> = hashes
                .iter()
                .map(|h| parse_hash(h))
                .collect::<Result<_>>()?;
            let req = pb::control_request::Kind::Remove(pb::RemoveRequest {
                hashes: hashes
                    .iter()
                    .map(|h| h.as_bytes().to_vec().into())
                    .collect(),
            });
            let kept = match ask_or_open(&dir, req).await? {
                Answer::Store(store) => {
                    // Each one there is unpinned; those that are not are named.
                    let mut missing = Vec::new();
                    for h in &hashes {
                        match store.unpin(h) {
                            Ok(()) => {}
                            Err(shoal_store::StoreError::NotFound(_)) => {
                                missing.push(h.to_string());
                            }
                            Err(e) => return Err(e).with_context(|| format!("unpinning {h}")),
                        }
                    }
                    if !missing.is_empty() {
                        bail!(
                            "not in the store: {} (the others given were unpinned)",
                            missing.join(", ")
                        );
                    }
                    store.kept_by_collections()
                }
                // A note only: its failure does not fail the rm, which is
                // done.
                Answer::Node(_) => kept_through_node(&dir).await.unwrap_or_else(|e| {
                    tracing::debug!("cannot tell what a pinned collection keeps: {e:#}");
                    HashSet::new()
                }),
            };
            // Unpinned, yet kept: `ls` still shows it pinned, and gc keeps
            // it. Said, rather than nothing (a review).
            for h in hashes.iter().filter(|h| kept.contains(h)) {
                note!(
                    "{h} is unpinned, but a pinned collection names it: gc keeps it while that \
                     collection is pinned (`shoal rm` the collection to free both)"
                );
            }
        }
        Command::Gc => {
            let (blobs, bytes) =
                match ask_or_open(&dir, pb::control_request::Kind::Gc(pb::GcRequest {})).await? {
                    Answer::Node(answers) => answers
                        .into_iter()
                        .find_map(|k| match k {
                            pb::control_response::Kind::Gc(g) => Some((g.blobs, g.bytes)),
                            _ => None,
                        })
                        .unwrap_or((0, 0)),
                    Answer::Store(store) => {
                        let r = store.gc()?;
                        (r.blobs, r.bytes)
                    }
                };
            out.gc(blobs, bytes)?;
        }
        Command::Verify { hashes } => verify(&dir, &out, hashes).await?,
        Command::Serve { net, listen } => {
            let interrupt = Interrupt::install()?;
            let Some(node) = start_node(&dir, net, listen, &interrupt).await? else {
                bail!(
                    "a node is already running on data dir {} (`shoal status` shows it); stop it \
                     first, or give this one another --data-dir",
                    dir.display()
                );
            };
            out.ready(&node)?;
            interrupt.fired().await;
            note!("shutting down");
            node.shutdown().await;
        }
        Command::Ticket { hash } => {
            let hash = parse_hash(hash)?;
            let mut c = match lasting_node(&dir).await? {
                Lasting::Node(c) => c,
                Lasting::ShortLived => bail!(
                    "the node on {} is a get's own, which stops when its download is done: a \
                     ticket naming it would lead nowhere then; start `shoal serve` (commands then \
                     go through it)",
                    dir.display()
                ),
                Lasting::None => bail!(
                    "no node is running on {}: a ticket names a running node's addresses; start `shoal serve` first",
                    dir.display()
                ),
            };
            c.send(pb::control_request::Kind::Ticket(pb::TicketRequest {
                hash: hash.as_bytes().to_vec().into(),
            }))
            .await?;
            while let Some(k) = c.next().await? {
                if let pb::control_response::Kind::Ticket(t) = k {
                    out.ticket(&t)?;
                }
            }
        }
        Command::Send {
            path,
            net,
            listen,
            copy,
            keep,
        } => send(&dir, &out, path, net, listen, *copy, *keep).await?,
        Command::Get { what, output, net } => get(&dir, &out, what, output.as_deref(), net).await?,
        Command::Cat { what, net } => get(&dir, &out, what, Some(Path::new("-")), net).await?,
        Command::Peers => {
            let mut c = running_node(&dir).await?;
            let mut peers = Vec::new();
            patiently(&dir, async {
                c.send(pb::control_request::Kind::Peers(pb::PeersRequest {}))
                    .await?;
                while let Some(k) = c.next().await? {
                    if let pb::control_response::Kind::Peer(p) = k {
                        peers.push(p);
                    }
                }
                anyhow::Ok(())
            })
            .await?;
            out.peers(&peers)?;
        }
        Command::Status => {
            let mut c = running_node(&dir).await?;
            let mut status = None;
            patiently(&dir, async {
                c.send(pb::control_request::Kind::Status(pb::StatusRequest {}))
                    .await?;
                while let Some(k) = c.next().await? {
                    if let pb::control_response::Kind::Status(s) = k {
                        status = Some(s);
                    }
                }
                anyhow::Ok(())
            })
            .await?;
            if let Some(s) = status {
                out.status(&s)?;
            }
        }
        Command::Demo(args) => demo::run(args, &out).await?,
        Command::DhtNode(args) => dht_node::run(args, &out).await?,
    }
    Ok(())
}

async fn running_node(dir: &Path) -> Result<ControlClient> {
    ControlClient::connect(dir).await.with_context(|| {
        format!(
            "no node is running on {}; start one with `shoal serve`",
            dir.display()
        )
    })
}

/// Files at least this large are hashed while the store opens (see [`add`]).
const OVERLAP_MIN: u64 = 32 << 20;

async fn add(dir: &Path, out: &Out, paths: &[PathBuf], copy: bool) -> Result<()> {
    if let Some(c) = ControlClient::connect(dir).await {
        match add_through(c, out, paths, copy).await {
            Ok(()) => return Ok(()),
            Err(Failed::Other(e)) => return Err(e),
            // Stopping: added here, or through whichever node runs next.
            Err(Failed::NodeGone(e)) => {
                tracing::debug!("the node on {} stopped: {e:#}", dir.display());
            }
        }
    }
    // The store opens on another thread while the first file to be added
    // in place is hashed, if that takes long enough to hide redb's open (a
    // few fdatasyncs, ~4 ms on a new store) behind it. For a small file the
    // extra threads cost more (~0.5 ms) than the overlap saves.
    let overlap = match paths.first() {
        Some(p) if !copy => {
            let abs = absolute(p)?;
            std::fs::metadata(&abs)
                .is_ok_and(|m| m.is_file() && m.len() >= OVERLAP_MIN)
                .then_some(abs)
        }
        _ => None,
    };
    // `first` is the first path's hash, when it was computed here.
    let (opened, mut first) = if let Some(abs) = overlap {
        let opening = tokio::task::spawn_blocking({
            let dir = dir.to_path_buf();
            move || open_store(&dir)
        });
        let hashed = tokio::task::spawn_blocking(move || HashedFile::new(&abs)).await?;
        (opening.await?, Some(hashed))
    } else {
        (open_store(dir), None)
    };
    // Held by another process: wait for it, or for a node to ask. A store
    // that cannot open is the error to report, before any about the file.
    let store = match opened {
        Ok(store) => store,
        Err(shoal_store::StoreError::Locked(_)) => {
            let wait = Waiter::new(dir);
            loop {
                match access(dir, &wait).await? {
                    Access::Node(c) => match add_through(c, out, paths, copy).await {
                        Err(Failed::NodeGone(e)) if wait.may_wait() => {
                            tracing::debug!("the node on {} stopped: {e:#}", dir.display());
                        }
                        Err(Failed::NodeGone(e)) => return Err(wait.gave_up(e)),
                        Err(Failed::Other(e)) => return Err(e),
                        Ok(()) => return Ok(()),
                    },
                    Access::Store(store) => break store,
                }
                wait.pause().await?;
            }
        }
        Err(e) => {
            return Err(e).with_context(|| format!("opening the store in {}", dir.display()));
        }
    };
    let mode = if copy {
        ImportMode::Copy
    } else {
        ImportMode::InPlace
    };
    let mut failed = 0;
    for p in paths {
        let added = if let Some(hashed) = first.take() {
            match hashed {
                Ok(hashed) => {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || store.import_hashed(hashed))
                        .await?
                        .map(|h| (h, false))
                        .map_err(anyhow::Error::from)
                }
                Err(e) => Err(e.into()),
            }
        } else {
            let store = store.clone();
            let p = p.clone();
            tokio::task::spawn_blocking(move || -> Result<(Hash, bool)> {
                let abs = absolute(&p)?;
                let meta = std::fs::metadata(&abs)?;
                if meta.is_dir() {
                    Ok((store.import_dir(&abs, mode)?, true))
                } else {
                    Ok((store.import_file(&abs, mode)?, false))
                }
            })
            .await?
        };
        match added {
            Ok((hash, coll)) => out.added(&hash, p, coll)?,
            Err(e) => {
                add_failed(paths, p, &one_line(&e))?;
                failed += 1;
            }
        }
    }
    some_not_added(failed, paths.len())
}

/// `add` through the node running on the data dir. A node that stopped
/// before it answered anything is [`Failed::NodeGone`]: nothing was
/// printed, and the add may be made again (adding again is harmless).
async fn add_through(
    mut c: ControlClient,
    out: &Out,
    paths: &[PathBuf],
    copy: bool,
) -> Result<(), Failed> {
    let abs: Vec<String> = paths
        .iter()
        .map(|p| absolute(p).map(|p| p.to_string_lossy().into_owned()))
        .collect::<Result<_>>()
        .map_err(Failed::Other)?;
    let mut answered = false;
    let gone = |e: shoal_node::NodeError, answered: bool| {
        if e.is_node_gone() && !answered {
            Failed::NodeGone(e.into())
        } else {
            Failed::Other(e.into())
        }
    };
    c.send(pb::control_request::Kind::Add(pb::AddRequest {
        paths: abs,
        copy,
    }))
    .await
    .map_err(|e| gone(e, false))?;
    let (mut i, mut failed) = (0, 0);
    let printed = async {
        loop {
            let k = match c.next().await {
                Ok(Some(k)) => k,
                Ok(None) => break,
                Err(e) if answered && e.is_node_gone() && i < paths.len() => {
                    // Said as such: it was the bare "stream closed" (a
                    // review). What was printed is added.
                    let left = paths.len() - i;
                    return Err(Failed::Other(anyhow::anyhow!(
                        "the node stopped before it added {}{} ({e}): run `shoal add` again \
                         for {}",
                        paths[i].display(),
                        if left > 1 {
                            format!(" and {} other path(s)", left - 1)
                        } else {
                            String::new()
                        },
                        if left > 1 { "them" } else { "it" }
                    )));
                }
                Err(e) => return Err(gone(e, answered)),
            };
            answered = true;
            if let pb::control_response::Kind::Added(a) = k {
                let path = &paths[i.min(paths.len() - 1)];
                i += 1;
                if !a.error.is_empty() {
                    add_failed(paths, path, &a.error).map_err(Failed::Other)?;
                    failed += 1;
                    continue;
                }
                let hash =
                    shoal_proto::hash_from_bytes(&a.hash).map_err(|e| Failed::Other(e.into()))?;
                out.added(
                    &Hash::from_bytes(hash),
                    path,
                    a.kind == pb::BlobKind::Collection as i32,
                )
                .map_err(Failed::Other)?;
            }
        }
        Ok(())
    };
    printed.await?;
    some_not_added(failed, paths.len()).map_err(Failed::Other)
}

/// A path `add` could not add, said as b3sum says it (`shoal: PATH:
/// why`); the others are still added. With a single path, the error line
/// says it alone.
fn add_failed(paths: &[PathBuf], path: &Path, why: &str) -> Result<()> {
    if paths.len() == 1 {
        bail!("adding {}: {why}", path.display());
    }
    eprintln!("shoal: {}: {why}", path.display());
    Ok(())
}

/// The store of the data dir `dir`, opened directly (no node runs). The
/// data dir, which holds the secret key, is never added (see
/// [`Store::keep_private`]).
fn open_store(dir: &Path) -> Result<Store, shoal_store::StoreError> {
    let store = Store::open(&dir.join("store"))?;
    store.keep_private(dir)?;
    Ok(store)
}

/// The one error line of an `add` some of whose paths failed.
fn some_not_added(failed: usize, of: usize) -> Result<()> {
    if failed > 0 {
        bail!("{failed} of {of} paths could not be added (each is named above)");
    }
    Ok(())
}

/// What runs on a data dir, for a command whose result must outlive it
/// (`send`, `ticket`).
enum Lasting {
    /// A node that runs until stopped (`serve`, `send`), ready for the
    /// request.
    Node(ControlClient),
    /// A get's own node, which stops when its download is done.
    ShortLived,
    /// None.
    None,
}

/// The status of the node running on `dir`, or None (none runs, or it
/// did not answer).
async fn node_status(dir: &Path) -> Option<pb::NodeStatus> {
    let mut c = ControlClient::connect(dir).await?;
    c.send(pb::control_request::Kind::Status(pb::StatusRequest {}))
        .await
        .ok()?;
    let mut status = None;
    while let Ok(Some(k)) = c.next().await {
        if let pb::control_response::Kind::Status(s) = k {
            status = Some(s);
        }
    }
    status
}

async fn lasting_node(dir: &Path) -> Result<Lasting> {
    let Some(mut c) = ControlClient::connect(dir).await else {
        return Ok(Lasting::None);
    };
    c.send(pb::control_request::Kind::Status(pb::StatusRequest {}))
        .await?;
    let mut short_lived = false;
    loop {
        match c.next().await {
            Ok(Some(pb::control_response::Kind::Status(s))) => short_lived = s.short_lived,
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) if e.is_node_gone() => return Ok(Lasting::None),
            Err(e) => return Err(e.into()),
        }
    }
    if short_lived {
        return Ok(Lasting::ShortLived);
    }
    // One request per connection.
    Ok(match ControlClient::connect(dir).await {
        Some(c) => Lasting::Node(c),
        None => Lasting::None,
    })
}

/// Starts the node of `serve` or `send` on `dir`; None if a node that runs
/// until stopped is there already. A get's own node, or another process
/// holding the store (an `add`), is waited for (as long as other commands
/// wait, see [`Waiter`]): `send` and `serve` failed at once.
async fn start_node(
    dir: &Path,
    net: &NetArgs,
    listen: &[SocketAddr],
    interrupt: &Interrupt,
) -> Result<Option<Node>> {
    let wait = Waiter::interruptible(dir, interrupt);
    loop {
        match lasting_node(dir).await? {
            Lasting::Node(_) => return Ok(None),
            Lasting::ShortLived if wait.may_wait() => {}
            Lasting::ShortLived => {
                return Err(wait.gave_up(anyhow::anyhow!(
                    "a get's own node runs on {}, and stops when its download is done; try \
                     again then, or give this command another --data-dir",
                    dir.display()
                )));
            }
            Lasting::None => {
                let config = net.node_config(dir, listen);
                if let Some(node) = wait.try_spawn(config, "starting the node").await? {
                    return Ok(Some(node));
                }
            }
        }
        wait.pause().await?;
    }
}

/// `shoal send`: through the node that runs on the data dir until stopped
/// (it serves the path from then on), or with a node of its own, serving
/// until a signal.
async fn send(
    dir: &Path,
    out: &Out,
    path: &Path,
    net: &NetArgs,
    listen: &[SocketAddr],
    copy: bool,
    keep: bool,
) -> Result<()> {
    let interrupt = Interrupt::install()?;
    let abs = absolute(path)?;
    // Said before a node starts (it started, and left its socket behind).
    std::fs::metadata(&abs).with_context(|| format!("adding {}", path.display()))?;
    let Some(node) = start_node(dir, net, listen, &interrupt).await? else {
        let Lasting::Node(c) = lasting_node(dir).await? else {
            bail!(
                "the node on {} stopped as this command started; run it again",
                dir.display()
            );
        };
        return send_through(dir, out, path, &abs, c, net, listen, copy).await;
    };
    let mode = if copy {
        ImportMode::Copy
    } else {
        ImportMode::InPlace
    };
    // What was pinned before (by `add`, `get`, an earlier `send --keep`)
    // stays pinned when `send` stops, and so does what another command
    // added or got through this node meanwhile; what `send` itself pinned
    // does not, unless `--keep`: a one-shot share leaves nothing that a
    // later `serve` would serve and announce (as sendme forgets at exit).
    let pinned_before: HashSet<Hash> = node
        .store()
        .list()
        .into_iter()
        .filter(|i| i.pinned)
        .map(|i| i.hash)
        .collect();
    let added = tokio::select! {
        a = node.add_path(&abs, mode) => a.with_context(|| format!("adding {}", path.display())),
        () = interrupt.fired() => Err(anyhow::anyhow!("interrupted while adding {}", path.display())),
    };
    let hash = match added {
        Ok((hash, _)) => hash,
        Err(e) => {
            node.shutdown().await;
            return Err(e);
        }
    };
    let ticket = node.ticket(&hash)?;
    out.ticket(&ticket.to_string())?;
    note!(
        "serving {} ({hash}); to fetch it run:\n  shoal get {ticket}",
        path.display()
    );
    interrupt.fired().await;
    let unpinned = if keep || pinned_before.contains(&hash) || node.asked_through_control(&hash) {
        Ok(false)
    } else {
        node.unpin(&hash).map(|()| true)
    };
    node.shutdown().await;
    match unpinned {
        Ok(true) if copy => note!(
            "stopped; {} is no longer pinned here (`shoal gc` frees its copy; `send --keep` keeps it)",
            path.display()
        ),
        Ok(true) => note!(
            "stopped; {} is no longer pinned here (`shoal gc` forgets it; the files stay where they are; \
             `send --keep` keeps it pinned)",
            path.display()
        ),
        Ok(false) => note!("stopped; {} stays pinned here", path.display()),
        Err(e) => bail!("unpinning {} ({hash}): {e}", path.display()),
    }
    Ok(())
}

/// `send` through a node that runs until stopped: it serves the path from
/// now on, also after this command ends.
#[allow(clippy::too_many_arguments)]
async fn send_through(
    dir: &Path,
    out: &Out,
    path: &Path,
    abs: &Path,
    mut c: ControlClient,
    net: &NetArgs,
    listen: &[SocketAddr],
    copy: bool,
) -> Result<()> {
    net.warn_ignored_by(dir, listen, false).await;
    c.send(pb::control_request::Kind::Add(pb::AddRequest {
        paths: vec![abs.to_string_lossy().into_owned()],
        copy,
    }))
    .await?;
    let mut hash = None;
    while let Some(k) = c.next().await? {
        if let pb::control_response::Kind::Added(a) = k {
            if !a.error.is_empty() {
                // Its own words, as a send without a node says them.
                bail!("adding {}: {}", path.display(), a.error);
            }
            hash = Some(a.hash);
        }
    }
    let hash = hash.context("the node added nothing")?;
    let mut c = running_node(dir).await?;
    c.send(pb::control_request::Kind::Ticket(pb::TicketRequest {
        hash,
    }))
    .await?;
    while let Some(k) = c.next().await? {
        if let pb::control_response::Kind::Ticket(t) = k {
            out.ticket(&t)?;
            note!(
                "the node running on {} serves {}; to fetch it run:\n  shoal get {t}",
                dir.display(),
                path.display()
            );
        }
    }
    Ok(())
}

async fn verify(dir: &Path, out: &Out, hashes: &[String]) -> Result<()> {
    let hashes: Vec<Hash> = hashes
        .iter()
        .map(|h| parse_hash(h))
        .collect::<Result<_>>()?;
    let req = pb::control_request::Kind::Verify(pb::VerifyRequest {
        hashes: hashes
            .iter()
            .map(|h| h.as_bytes().to_vec().into())
            .collect(),
    });
    // Each blob's line as it is checked; one that is not in the store
    // (asked for by hash, or gone meanwhile) is named at the end, and the
    // others are still checked: the first such stopped the whole run and
    // printed nothing, also of the corrupt blobs found before it.
    let mut corrupt = Vec::new();
    let mut missing = Vec::new();
    // Blobs that could not be checked (an error reading an outboard, say),
    // and why: named at the end, the others still checked.
    let mut unchecked = Vec::new();
    let mut result = |h: Hash, ok: Result<bool, String>| -> Result<()> {
        match ok {
            Ok(ok) => {
                out.verified(&h, ok)?;
                if !ok {
                    corrupt.push(h.to_string());
                }
            }
            Err(why) if why == VERIFY_NOT_IN_STORE => missing.push(h.to_string()),
            Err(why) => unchecked.push(format!("{h} ({why})")),
        }
        Ok(())
    };
    let opened = ask_or_open_each(dir, req, |k| {
        if let pb::control_response::Kind::Verified(v) = k {
            let h = Hash::from_bytes(shoal_proto::hash_from_bytes(&v.hash)?);
            result(
                h,
                if v.detail.is_empty() {
                    Ok(v.ok)
                } else {
                    Err(v.detail)
                },
            )?;
        }
        Ok(())
    })
    .await?;
    match opened {
        None => {}
        Some(store) => {
            let list: Vec<Hash> = if hashes.is_empty() {
                store.list().into_iter().map(|b| b.hash).collect()
            } else {
                // A directory's members too (see `Store::with_members`).
                let s = store.clone();
                tokio::task::spawn_blocking(move || s.with_members(&hashes)).await?
            };
            for h in list {
                let s = store.clone();
                let ok = tokio::task::spawn_blocking(move || s.verify(&h)).await?;
                result(h, ok.map_err(|e| verify_failure(&e)))?;
            }
        }
    }
    let mut failed = Vec::new();
    if !corrupt.is_empty() {
        failed.push(format!(
            "corrupt: {}; `shoal get HASH` fetches a blob again from its peers, `shoal rm HASH` \
             and `shoal gc` give it up",
            corrupt.join(", ")
        ));
    }
    if !missing.is_empty() {
        failed.push(format!("not in the store: {}", missing.join(", ")));
    }
    if !unchecked.is_empty() {
        failed.push(format!("could not be checked: {}", unchecked.join(", ")));
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// Whether the file `path` holds the bytes whose BLAKE3 hash is `hash`
/// (an unreadable one does not).
async fn holds(path: &Path, hash: &Hash) -> Result<bool> {
    let path = path.to_path_buf();
    let hash = *hash;
    Ok(tokio::task::spawn_blocking(move || {
        blake3::Hasher::new()
            .update_mmap_rayon(&path)
            .is_ok_and(|h| h.finalize() == hash)
    })
    .await?)
}

/// What `get` was given: a ticket, or a hash.
fn parse_target(what: &str) -> Result<(Hash, Option<Ticket>)> {
    if what.len() == 64 && what.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok((parse_hash(what)?, None));
    }
    let t: Ticket = what
        .parse()
        .with_context(|| format!("{what:?} is neither a ticket nor a 64-hex hash"))?;
    Ok((Hash::from_bytes(t.hash), Some(t)))
}

async fn get(
    dir: &Path,
    out: &Out,
    what: &str,
    output: Option<&Path>,
    net: &NetArgs,
) -> Result<()> {
    let (hash, ticket) = parse_target(what)?;
    let to_stdout = output == Some(Path::new("-"));
    let output = match output {
        Some(p) if !to_stdout => Some(absolute(p)?),
        _ => None,
    };
    // A directory there is the node's to judge, once it has the manifest:
    // one holding exactly the collection is a get run again (nothing to
    // do), anything else is refused.
    if let Some(o) = &output
        && std::fs::symlink_metadata(o).is_ok()
        && !std::fs::symlink_metadata(o).is_ok_and(|m| m.is_dir())
    {
        // A get run again over the file it wrote (or a copy of the same
        // bytes) has nothing to do, as `wget -c` or `rsync` run again;
        // anything else there is never overwritten.
        if o.is_file() && holds(o, &hash).await? {
            let bytes = std::fs::metadata(o).map_or(0, |m| m.len());
            return out.fetched(&shoal_node::FetchReport {
                hash,
                kind: shoal_store::BlobKind::Raw,
                bytes,
                files: 1,
                elapsed: Duration::ZERO,
                received: 0,
            });
        }
        bail!(
            "{} exists already; choose another output path or remove it",
            o.display()
        );
    }
    // Said before anything is fetched (it failed at the end, naming the
    // temporary file it could not make there).
    if let Some(parent) = output.as_deref().and_then(Path::parent)
        && !parent.is_dir()
    {
        bail!(
            "cannot write {}: the directory {} does not exist (create it, or choose another \
             output path)",
            output.as_deref().unwrap_or(parent).display(),
            parent.display()
        );
    }
    let bar = output::ProgressBar::new(
        !out.json
            && std::io::stderr().is_terminal()
            && !QUIET.load(std::sync::atomic::Ordering::Relaxed),
    );
    // A node running on the data dir (`shoal serve`, or another get's
    // short-lived one) does the download. With none, this get runs one
    // of its own. Another get may be starting or stopping its node at
    // this very moment: then the socket answers that it is stopping, or
    // the store is still held. Either way this get waits (`Waiter`) and
    // looks again.
    let interrupt = Interrupt::install()?;
    let through = Through {
        dir,
        out,
        hash,
        ticket: ticket.as_ref(),
        output: output.as_deref(),
        to_stdout,
        net,
        bar: &bar,
        interrupt: &interrupt,
        warned: std::cell::Cell::new(false),
    };
    // A signal while it waits ends the get (`Waiter::pause`); one during a
    // download through a node is the download's own to report
    // (`Through::run`), and one while its own node starts is heard by the
    // download that follows.
    let wait = Waiter::interruptible(dir, &interrupt);
    let node = loop {
        if let Some(c) = ControlClient::connect(dir).await {
            match through.get(c).await {
                Ok(()) => return Ok(()),
                Err(Failed::NodeGone(e)) if wait.may_wait() => {
                    tracing::info!(
                        "the node on {} is stopping ({e:#}); trying again",
                        dir.display()
                    );
                }
                Err(Failed::NodeGone(e)) => return Err(wait.gave_up(e)),
                Err(Failed::Other(e)) => return Err(e),
            }
        } else {
            let mut config = net.node_config(dir, &[]);
            config.discovery.announce = false;
            config.short_lived = true;
            if let Some(node) = wait
                .try_spawn(config, "starting a node for the download")
                .await?
            {
                break node;
            }
        }
        wait.pause().await?;
    };
    // With no ticket, no peer and no discovery, what the store does not
    // hold could only be waited for until the timeout.
    if ticket.is_none()
        && net.peers.is_empty()
        && net.no_mdns
        && net.no_dht
        && !node.store().info(&hash).is_some_and(|i| i.complete)
    {
        stop_short_lived(&node, &interrupt).await;
        bail!(
            "nowhere to look for {hash}: give a ticket or --peer ADDR, or drop --no-mdns / \
             --no-dht to let discovery find peers"
        );
    }
    let mut req = match &ticket {
        Some(t) => FetchRequest::from_ticket(t, FetchOutput::Store),
        None => FetchRequest {
            hash,
            kind: None,
            peers: Vec::new(),
            out: FetchOutput::Store,
        },
    };
    req.peers.extend(net.peers.iter().copied());
    let (data_tx, mut data_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    req.out = if to_stdout {
        FetchOutput::Stream(data_tx)
    } else {
        drop(data_tx);
        match &output {
            Some(p) => FetchOutput::Path(p.clone()),
            None => FetchOutput::Store,
        }
    };
    let (ptx, mut prx) = tokio::sync::watch::channel(Progress::default());
    let n = node.clone();
    let mut task = tokio::spawn(async move { n.fetch(req, Some(ptx)).await });
    let writer = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut stdout = std::io::stdout().lock();
        while let Some(d) = data_rx.blocking_recv() {
            stdout.write_all(&d).context("writing to stdout")?;
        }
        stdout.flush().context("writing to stdout")
    });
    let res = loop {
        tokio::select! {
            r = &mut task => break r,
            Ok(()) = prx.changed() => bar.update(&prx.borrow_and_update().clone()),
            () = interrupt.fired() => {
                task.abort();
                node.shutdown().await;
                // A download is begun once a peer offers the content: before
                // that, there is nothing to keep.
                if node.store().info(&hash).is_none() {
                    bail!("interrupted before any peer offered {hash}; nothing was kept");
                }
                bail!("interrupted; the partial download is kept and resumes on the next get");
            }
        }
    };
    bar.finish();
    let finish = async {
        let fetched = res.context("download task failed")?;
        // A writer that failed is why the fetch stopped ("output closed"):
        // its error comes first, and a broken pipe (`| head`) ends quietly.
        writer.await.context("stdout writer")??;
        let report = fetched.with_context(|| format!("fetching {hash}"))?;
        if !to_stdout {
            out.fetched(&report)?;
        }
        anyhow::Ok(())
    }
    .await;
    stop_short_lived(&node, &interrupt).await;
    finish
}

/// Stops a get's short-lived node. Another command on this data dir (a
/// get, an add) may have gone through its control socket: it would fail
/// if the node stopped now. So the socket takes no more (one that comes is
/// told that the node is stopping, and asks whichever node runs next, or
/// the store itself), and those it took are answered first, unless a
/// signal says to stop now.
async fn stop_short_lived(node: &Node, interrupt: &Interrupt) {
    let others = node.close_control();
    if others > 0 {
        tracing::info!("waiting for {others} other request(s) on this data dir to be answered");
        tokio::select! {
            () = node.control_requests_done() => {}
            () = interrupt.fired() => {}
        }
    }
    node.shutdown().await;
}

/// What a get through a running node's control socket needs.
struct Through<'a> {
    dir: &'a Path,
    out: &'a Out,
    hash: Hash,
    ticket: Option<&'a Ticket>,
    output: Option<&'a Path>,
    to_stdout: bool,
    net: &'a NetArgs,
    bar: &'a output::ProgressBar,
    interrupt: &'a Interrupt,
    /// Whether the node was told of (what `warn_ignored_by` says, once).
    warned: std::cell::Cell<bool>,
}

/// Why a request through a running node failed.
enum Failed {
    /// The node stopped before the request was done, with nothing written
    /// to stdout yet: the request may be made again (a get's partial
    /// download is kept in the store, and resumes).
    NodeGone(anyhow::Error),
    /// Anything else.
    Other(anyhow::Error),
}

/// How long a command waits for another shoal process on its data dir to
/// stop or to take its request on (see [`Waiter`]).
const DATA_DIR_WAIT: Duration = Duration::from_secs(60);

/// A command's wait for another shoal process on its data dir (one that
/// holds the store without a node to ask, or whose node is stopping): at
/// most [`DATA_DIR_WAIT`] of pauses in all (time spent on a request a node
/// took does not count), said once after a second.
struct Waiter<'a> {
    dir: &'a Path,
    waited: std::cell::Cell<Duration>,
    told: std::cell::Cell<bool>,
    /// The command's signal handler, if it has one (without, a signal
    /// ends the process as usual).
    interrupt: Option<&'a Interrupt>,
}

impl<'a> Waiter<'a> {
    fn new(dir: &'a Path) -> Self {
        Waiter {
            dir,
            waited: std::cell::Cell::new(Duration::ZERO),
            told: std::cell::Cell::new(false),
            interrupt: None,
        }
    }

    /// A wait that a signal heard by `interrupt` ends.
    fn interruptible(dir: &'a Path, interrupt: &'a Interrupt) -> Self {
        Waiter {
            interrupt: Some(interrupt),
            ..Waiter::new(dir)
        }
    }

    /// The data dir was found busy: whether to try again (after
    /// [`Waiter::pause`]).
    fn may_wait(&self) -> bool {
        self.waited.get() < DATA_DIR_WAIT
    }

    /// Waits a little before the next try; an error if a signal came.
    async fn pause(&self) -> Result<()> {
        if !self.told.get() && self.waited.get() > Duration::from_secs(1) {
            tracing::info!(
                "waiting for the other shoal process on {} to stop or to take the request",
                self.dir.display()
            );
            self.told.set(true);
        }
        let pause = Duration::from_millis(50);
        let interrupted = async {
            match self.interrupt {
                Some(i) => i.fired().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = interrupted => bail!(
                "interrupted while waiting for the other shoal process on {}",
                self.dir.display()
            ),
        }
        self.waited.set(self.waited.get() + pause);
        Ok(())
    }

    /// Starts a node on the data dir; None while another process holds
    /// it and the wait goes on (pause, and try again). `doing` names the
    /// step in an error.
    async fn try_spawn(&self, config: NodeConfig, doing: &str) -> Result<Option<Node>> {
        match Node::spawn(config).await {
            Ok(node) => Ok(Some(node)),
            Err(e) if e.is_data_dir_busy() && self.may_wait() => {
                tracing::debug!("{} is busy: {e}", self.dir.display());
                Ok(None)
            }
            Err(e) => {
                let busy = e.is_data_dir_busy();
                let e = anyhow::Error::from(e).context(doing.to_string());
                Err(if busy { self.gave_up(e) } else { e })
            }
        }
    }

    /// `e`, the error of the last try once the wait is over, saying so.
    fn gave_up(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!(
            "gave up after waiting {} s for the other shoal process on {}",
            self.waited.get().as_secs(),
            self.dir.display()
        ))
    }
}

impl Through<'_> {
    async fn get(&self, mut c: ControlClient) -> Result<(), Failed> {
        let mut delivered = false;
        match self.run(&mut c, &mut delivered).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let gone = e
                    .downcast_ref::<shoal_node::NodeError>()
                    .is_some_and(shoal_node::NodeError::is_node_gone);
                if gone && !delivered {
                    Err(Failed::NodeGone(e))
                } else if gone {
                    Err(Failed::Other(e.context(format!(
                        "the node on {} stopped during the download; the part it verified is \
                         kept, and the next get resumes it",
                        self.dir.display()
                    ))))
                } else {
                    Err(Failed::Other(e))
                }
            }
        }
    }

    async fn run(&self, c: &mut ControlClient, delivered: &mut bool) -> Result<()> {
        let peers = self
            .ticket
            .map(|t| {
                t.providers
                    .iter()
                    .map(|p| pb::PeerInfo {
                        id: p.id.as_bytes().to_vec().into(),
                        addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let kind = match self.ticket.map(|t| t.kind) {
            Some(shoal_node::TicketKind::Collection) => pb::BlobKind::Collection as i32,
            _ => pb::BlobKind::Raw as i32,
        };
        let req = pb::GetRequest {
            hash: self.hash.as_bytes().to_vec().into(),
            kind,
            peers,
            out: self
                .output
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            stream: self.to_stdout,
            addrs: self.net.peers.iter().map(|p| p.to_string()).collect(),
        };
        c.send(pb::control_request::Kind::Get(req)).await?;
        // Stdout is written off the async workers, as by a get of its own:
        // written here, a reader that stopped reading blocked the loop, and
        // no signal could end the command.
        let (data_tx, mut data_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
        let writer = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut stdout = std::io::stdout().lock();
            while let Some(d) = data_rx.blocking_recv() {
                stdout.write_all(&d).context("writing to stdout")?;
            }
            stdout.flush().context("writing to stdout")
        });
        let interrupted = || {
            self.bar.finish();
            // The download is the node's: it goes on (as a daemon's does
            // when its remote client quits).
            anyhow::anyhow!(
                "interrupted; the node running on {} goes on with the download \
                 (`shoal status` shows it; `shoal rm {}` calls it off)",
                self.dir.display(),
                self.hash
            )
        };
        let mut report = None;
        loop {
            let k = tokio::select! {
                k = c.next() => match k {
                    Ok(k) => k,
                    // Its report came: the download is done, whatever
                    // became of the node after that.
                    Err(e) if report.is_some() && e.is_node_gone() => None,
                    Err(e) if e.is_node_gone() => return Err(e.into()),
                    // Prefixed as a get of its own says it.
                    Err(e) => {
                        return Err(anyhow::Error::from(e).context(format!("fetching {}", self.hash)));
                    }
                },
                () = self.interrupt.fired() => return Err(interrupted()),
            };
            // The node took the get on (a stopping one says so first).
            if !self.warned.replace(true) {
                self.net.warn_ignored_by(self.dir, &[], true).await;
            }
            let Some(k) = k else { break };
            match k {
                pb::control_response::Kind::Data(d) => {
                    *delivered = true;
                    tokio::select! {
                        sent = data_tx.send(d) => if sent.is_err() {
                            // The writer stopped: its error says why.
                            break;
                        },
                        () = self.interrupt.fired() => return Err(interrupted()),
                    }
                }
                pb::control_response::Kind::Fetched(r) => {
                    report = Some(shoal_node::FetchReport {
                        hash: Hash::from_bytes(shoal_proto::hash_from_bytes(&r.hash)?),
                        kind: if r.kind == pb::BlobKind::Collection as i32 {
                            shoal_store::BlobKind::Collection
                        } else {
                            shoal_store::BlobKind::Raw
                        },
                        bytes: r.bytes,
                        files: r.files,
                        elapsed: Duration::from_micros(r.micros),
                        received: r.received,
                    });
                }
                pb::control_response::Kind::Progress(p) => self.bar.update(&Progress {
                    verified: p.verified,
                    total: p.total,
                    peers: p.peers,
                    rate: p.rate,
                    files_done: p.files_done,
                    files_total: p.files_total,
                }),
                _ => {}
            }
        }
        drop(data_tx);
        tokio::select! {
            w = writer => w.context("stdout writer")??,
            () = self.interrupt.fired() => return Err(interrupted()),
        }
        self.bar.finish();
        // As a get without a running node says it (a node older than the
        // report says nothing).
        if let Some(r) = report.filter(|_| !self.to_stdout) {
            self.out.fetched(&r)?;
        }
        Ok(())
    }
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {},
    }
    Ok(())
}

/// SIGINT or SIGTERM, heard once for the whole command. A handler made
/// anew at each wait (as [`wait_for_signal`] is) misses a signal that comes
/// between two waits, and the process no longer dies of it either.
struct Interrupt(tokio::sync::watch::Receiver<bool>);

impl Interrupt {
    fn install() -> Result<Interrupt> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let _ = tx.send(true);
        });
        Ok(Interrupt(rx))
    }

    /// Resolves once a signal came (at once if one came before).
    async fn fired(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|fired| *fired).await.is_err() {
            // The listener is gone without a signal (the runtime stops).
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;
    use anyhow::Context;

    #[test]
    fn an_error_says_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let store = shoal_store::Store::in_memory()
            .import_file(
                std::path::Path::new("/nonexistent/x"),
                shoal_store::ImportMode::Copy,
            )
            .unwrap_err();
        // The store's message holds its cause; anyhow's chain holds it too.
        let err = Err::<(), _>(store).context("adding x").unwrap_err();
        let line = one_line(&err);
        let cause = std::error::Error::source(err.chain().nth(1).unwrap())
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(!cause.is_empty(), "{line}");
        assert_eq!(line.matches(&cause).count(), 1, "{line}");
        assert!(line.starts_with("adding x: "), "{line}");
        // Causes that add something are all kept, in order.
        let err = anyhow::Error::new(io)
            .context("reading y")
            .context("fetching z");
        assert_eq!(
            one_line(&err),
            format!(
                "fetching z: reading y: {}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            )
        );
    }
}
