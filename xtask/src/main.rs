//! Project automation, run as `cargo xtask <command>`.
//!
//! - `ci`: every check CI runs, in order, stopping at the first failure and
//!   naming it. Installs what it needs on a fresh machine (cargo-deny, and
//!   Debian's `b3sum` and `iproute2` when running as root).
//! - `bench [S1..S6]`: the benchmarks of `../shared/bench.md` (see `bench.rs`).
//! - `fuzz [SECONDS]`: runs every fuzz target (see `fuzz.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

mod fuzz;

mod bench;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    std::env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n  ci [--skip STEP]...   format, lint, test, deny, docs, fuzz smoke\n  bench [S1..S6] [--install]   benchmarks beside their baselines\n  fuzz [SECONDS]        run each fuzz target (default 60 s each)"
            );
            bail!("unknown or missing command")
        }
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs a command, failing with its name when it fails.
pub(crate) fn sh(step: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {step}: {cmd:?}");
    let started = std::time::Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("{step}: could not start {cmd:?}"))?;
    let took = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("step `{step}` failed ({status}) after {took:.1} s");
    }
    // The time of each step, so a slow CI run says where its time went.
    eprintln!("<== {step}: {took:.1} s");
    Ok(())
}

/// Where cargo puts what it builds (absolute: tests run in their
/// package's directory).
pub(crate) fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    project_root().join(dir)
}

/// Builds every target of the workspace (libraries, binaries, tests,
/// examples, the fuzz driver) in one cargo invocation, which the test,
/// example and fuzz steps then run. Cargo resolves dependency features by
/// the packages a command selects, so `build -p shoal-cli`, `run -p
/// shoal-node --example` and `run -p shoal-fuzz` each built their own
/// copies of clap, rustix, tempfile, regex and everything above them;
/// with `cargo()` below, this took a fresh CI run from 1342 s to 903 s.
/// (Cargo's
/// `resolver.feature-unification = "workspace"` would fix this at the
/// root, but is unstable.)
pub(crate) fn build_all() -> Result<()> {
    sh(
        "build",
        cargo().args(["build", "--workspace", "--all-targets"]),
    )
}

/// A cargo command, without the variables `cargo run` set for xtask
/// itself: ring's build script tracks CARGO_MANIFEST_DIR, so a build that
/// saw xtask's rebuilt ring, quinn, rustls and everything above them, and
/// the next `cargo build` from a shell (or a test's) rebuilt them again.
pub(crate) fn cargo() -> Command {
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || matches!(
                &*k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
            )
        {
            cargo.env_remove(&*k);
        }
    }
    cargo
}

pub(crate) fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Installs Debian packages (as root) that provide `programs` when missing.
pub(crate) fn apt_install(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(prog, _)| !have(prog))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        eprintln!("note: not root, cannot install {missing:?}; tests needing them will say so");
        return Ok(());
    }
    sh(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    sh(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn ci(args: &[String]) -> Result<()> {
    let skip: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--skip")
        .map(|w| w[1].as_str())
        .collect();
    let step = |name: &str| !skip.contains(&name);
    let started = std::time::Instant::now();

    // Setup: what the tests and checks need on a fresh machine.
    apt_install(&[("b3sum", "b3sum"), ("ip", "iproute2")])?;
    if step("deny") && !cargo_has("deny") {
        sh(
            "install cargo-deny",
            cargo().args(["install", "--locked", "cargo-deny"]),
        )?;
    }

    if step("fmt") {
        sh("fmt", cargo().args(["fmt", "--all", "--", "--check"]))?;
    }
    if step("clippy") {
        sh(
            "clippy",
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
    }
    if step("test") {
        build_all()?;
        // The end-to-end tests run the binary just built (their harness
        // would otherwise build it with `-p shoal-cli`, features of its
        // own: see `build_all`).
        sh(
            "test",
            cargo()
                .args(["test", "--workspace"])
                .env("SHOAL_BIN", target_dir().join("debug/shoal"))
                .env("RUST_BACKTRACE", "1"),
        )?;
        // The embedding example must keep working.
        sh(
            "example embed",
            &mut Command::new(target_dir().join("debug/examples/embed")),
        )?;
    }
    if step("deny") {
        // The advisory database cannot be fetched here: offline checks only.
        sh(
            "deny",
            cargo().args(["deny", "check", "bans", "licenses", "sources"]),
        )?;
    }
    if step("layers") {
        layers()?;
    }
    if step("doc") {
        sh(
            "doc",
            cargo()
                .args(["doc", "--workspace", "--no-deps"])
                .env("RUSTDOCFLAGS", "-D warnings"),
        )?;
    }
    if step("fuzz") {
        fuzz::smoke()?;
    }
    eprintln!(
        "==> ci: all steps passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cargo_has(sub: &str) -> bool {
    cargo()
        .args([sub, "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The layering invariants of ARCHITECTURE.md that the dependency graph can
/// show: the wire protocol does no I/O and knows no store; the store knows
/// no network; the transport knows no blobs.
fn layers() -> Result<()> {
    let rules: [(&str, &[&str]); 3] = [
        (
            "shoal-proto",
            &["tokio", "quinn", "shoal-store", "shoal-transport", "redb"],
        ),
        (
            "shoal-store",
            &["quinn", "shoal-transport", "shoal-discovery", "shoal-node"],
        ),
        (
            "shoal-transport",
            &["shoal-store", "redb", "bao-tree", "shoal-node"],
        ),
    ];
    for (krate, banned) in rules {
        eprintln!("==> layers: cargo tree -p {krate}");
        let out = cargo()
            .args([
                "tree", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}",
            ])
            .output()
            .with_context(|| format!("running cargo tree -p {krate}"))?;
        if !out.status.success() {
            bail!(
                "cargo tree -p {krate} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tree = String::from_utf8_lossy(&out.stdout);
        for line in tree.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if banned.contains(&name) {
                bail!(
                    "step `layers` failed: {krate} depends on {name}, which its layer must not know"
                );
            }
        }
    }
    Ok(())
}
