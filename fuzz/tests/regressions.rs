//! Replays every saved input: the seeds of each target and the inputs that
//! once crashed it (`fuzz/regressions/<target>/`), which must now pass.

use std::path::Path;

use shoal_fuzz::TARGETS;
use shoal_fuzz::driver::{load_dir, run_one};

#[test]
fn seeds_and_regressions_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut failures = Vec::new();
    let mut replayed = 0;
    for t in TARGETS {
        for input in (t.seeds)() {
            replayed += 1;
            if let Err(msg) = run_one(*t, &input) {
                failures.push(format!("{} seed: {msg}", t.name));
            }
        }
        for (path, input) in load_dir(&root.join(t.name)) {
            replayed += 1;
            if let Err(msg) = run_one(*t, &input) {
                failures.push(format!("{}: {msg}", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(replayed > TARGETS.len());
}

#[test]
fn a_short_fuzz_run_of_each_target_is_clean() {
    use shoal_fuzz::driver::{Options, fuzz};
    for t in TARGETS {
        let opts = Options {
            duration: std::time::Duration::from_millis(200),
            seed: 42,
            max_len: 64 * 1024,
            artifacts: std::env::temp_dir().join("shoal-fuzz-test-artifacts"),
            extra: Vec::new(),
            stop_on_crash: true,
        };
        let r = fuzz(*t, &opts);
        assert!(r.crashes.is_empty(), "{}: {:?}", t.name, r.crashes);
        assert!(r.execs > 10, "{}: only {} execs", t.name, r.execs);
    }
}
