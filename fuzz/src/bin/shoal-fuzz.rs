//! `shoal-fuzz [TARGET|all] [--seconds N] [--seed S]`: mutation-fuzz the
//! targets of `shoal-fuzz` (all by default) for N seconds each; crashing
//! inputs go to `fuzz/artifacts/<target>/` and the exit status is 1.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use shoal_fuzz::driver::{Options, fuzz, load_dir, quiet_panics};
use shoal_fuzz::{TARGETS, target};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seconds = 10.0f64;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => match it.next().and_then(|s| s.parse().ok()) {
                Some(s) => seconds = s,
                None => return usage("--seconds takes a number"),
            },
            "--seed" => match it.next().and_then(|s| s.parse().ok()) {
                Some(s) => seed = s,
                None => return usage("--seed takes a number"),
            },
            "all" => names.extend(TARGETS.iter().map(|t| t.name)),
            name => match target(name) {
                Some(t) => names.push(t.name),
                None => return usage(&format!("no target {name:?}")),
            },
        }
    }
    if names.is_empty() {
        names.extend(TARGETS.iter().map(|t| t.name));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    quiet_panics();
    let mut failed = false;
    for name in names {
        let Some(t) = target(name) else { continue };
        let extra = load_dir(&root.join("regressions").join(name))
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        let opts = Options {
            duration: Duration::from_secs_f64(seconds),
            seed,
            max_len: 256 * 1024,
            artifacts: root.join("artifacts"),
            extra,
            stop_on_crash: false,
        };
        let r = fuzz(t, &opts);
        eprintln!(
            "fuzz {name:<9} {:>8} execs in {seconds} s, {} outcomes, corpus {}, slowest input {:?}, seed {seed}",
            r.execs, r.outcomes, r.corpus, r.slowest
        );
        for (path, msg) in &r.crashes {
            failed = true;
            eprintln!("  CRASH {}: {msg}", path.display());
        }
    }
    if failed {
        eprintln!("crashing inputs saved; add each to fuzz/regressions/<target>/ once fixed");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("error: {msg}\nusage: shoal-fuzz [TARGET|all]... [--seconds N] [--seed S]");
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    eprintln!("targets: {}", names.join(" "));
    ExitCode::from(2)
}
