//! Ctrl-C always gets its summary: SIGINT at every phase of `usmp run`'s life, from before the
//! runtime is built to after its shutdown, and the run prints its JSON summary and exits 0.
//!
//! The child announces each phase on stderr (`USMP_ANNOUNCE_PHASES`); the test sends SIGINT
//! when it reads the announcement, so where the signal lands is known, not slept for. A short
//! busy delay after the announcement adds load at different points of each phase; the
//! assertion holds for any delay.

use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
use cli::{run_reacting, usmp};

const BOUND: Duration = Duration::from_secs(30);

/// Phases, in order, as `main.rs` announces them, and whether the workload has ended by itself
/// there (so its duration must be short) or SIGINT is what ends it.
const PHASES: &[(&str, bool)] = &[
    ("signals", false),
    ("built", false),
    ("workload", false),
    ("drained", true),
    ("shutdown", true),
];

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Starts `usmp run`, sends SIGINT `delay` after it announces `phase`, and returns
/// (exit code, stdout, stderr).
fn interrupt_at(
    phase: &str,
    ends_by_itself: bool,
    delay: Duration,
    cpus: &str,
) -> (Option<i32>, String, String) {
    let duration = if ends_by_itself { "30ms" } else { "30s" };
    let mut cmd = usmp();
    cmd.args([
        "run",
        "--workload",
        "demo",
        "--cpus",
        cpus,
        "--duration",
        duration,
        "--json",
    ])
    .env("USMP_ANNOUNCE_PHASES", "1")
    .env("RUST_LOG", "error");
    let want = format!("usmp: phase: {phase}");
    // The run is bounded by the workload (30 s at most): reading stops at EOF.
    let r = run_reacting(&mut cmd, BOUND, |line, pid| {
        if line != want {
            return false;
        }
        spin(delay);
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGINT) };
        true
    });
    assert!(r.acted, "{phase}: never announced; stderr: {}", r.stderr);
    (r.status.code(), r.stdout, r.stderr)
}

#[test]
fn sigint_at_any_phase_still_prints_the_summary() {
    let mut runs = 0;
    for cpus in ["4", "1"] {
        for &(phase, ends) in PHASES {
            for delay_us in [0, 300, 3000] {
                let (code, stdout, stderr) =
                    interrupt_at(phase, ends, Duration::from_micros(delay_us), cpus);
                let what = format!("--cpus {cpus}, SIGINT {delay_us} us after {phase}");
                assert_eq!(code, Some(0), "{what}: exit {code:?}; stderr: {stderr}");
                let v: serde_json::Value =
                    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
                        panic!("{what}: no JSON summary ({e}): {stdout:?} {stderr}")
                    });
                assert_eq!(v["workload"], "demo", "{what}");
                if !ends {
                    assert_eq!(v["demo"]["interrupted"], true, "{what}: {stdout}");
                }
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 30);
}
