//! `cargo xtask fuzz [SECONDS] [TARGET]...`: runs the fuzz targets of the
//! `shoal-fuzz` crate (every target by default, 60 s each) with its stable
//! mutation driver; crashing inputs are saved under `fuzz/artifacts/` and
//! the command fails. `ci` runs [`smoke`]: a few seconds per target.
//!
//! libFuzzer (cargo-fuzz) needs a nightly toolchain, which this project does
//! not assume; the driver in `fuzz/src/driver.rs` runs on stable.

use anyhow::{Result, bail};

use crate::{build_all, cargo, sh, target_dir};

/// Seconds per target in CI.
const SMOKE_SECONDS: &str = "4";

pub(crate) fn fuzz(args: &[String]) -> Result<()> {
    let mut seconds = "60".to_string();
    let mut targets = Vec::new();
    for a in args {
        if a.parse::<f64>().is_ok() {
            seconds.clone_from(a);
        } else if a.starts_with('-') {
            bail!("unknown option {a}; usage: cargo xtask fuzz [SECONDS] [TARGET]...");
        } else {
            targets.push(a.clone());
        }
    }
    run(&seconds, &targets)
}

/// The CI step: every target briefly, with the binary of the workspace
/// build the other steps share (see [`build_all`]).
pub(crate) fn smoke() -> Result<()> {
    build_all()?;
    sh(
        "fuzz",
        std::process::Command::new(target_dir().join("debug/shoal-fuzz"))
            .args(["--seconds", SMOKE_SECONDS]),
    )
}

fn run(seconds: &str, targets: &[String]) -> Result<()> {
    sh(
        "fuzz",
        cargo()
            .args(["run", "-q", "-p", "shoal-fuzz", "--bin", "shoal-fuzz", "--"])
            .args(targets)
            .args(["--seconds", seconds]),
    )
}
