//! Edges a newcomer hits first: negative and zero durations say what is wrong with the value,
//! and a failed write to stdout says it was stdout.

use std::fs::OpenOptions;
use std::time::Duration;

#[path = "common/cli.rs"]
mod cli;
use cli::{run_bounded, usmp, wait_bounded};

const BOUND: Duration = Duration::from_secs(60);

#[test]
fn negative_and_zero_durations_say_what_is_wrong() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["stress", "--duration", "-1s"],
            "--duration '-1s': must not be negative",
        ),
        (
            &["stress", "--hang-timeout", "-2s"],
            "--hang-timeout '-2s': must not be negative",
        ),
        (
            &["stress", "--iterations", "-1"],
            "--iterations must be at least 1, got -1",
        ),
        (
            &["run", "--call-timeout", "-1s"],
            "--call-timeout '-1s': must not be negative",
        ),
        (
            &["run", "--duration", "-1s"],
            "--duration '-1s': must not be negative",
        ),
        (
            &["run", "--stop-wait", "-5ms"],
            "--stop-wait '-5ms': must not be negative",
        ),
        (
            &["run", "--duration", "0s"],
            "--duration '0s': must be more than 0",
        ),
        (
            &["run", "--stop-wait", "0s"],
            "--stop-wait '0s': must be more than 0",
        ),
        (
            &["stress", "--duration", "0s"],
            "--duration '0s': must be more than 0",
        ),
    ];
    for (args, want) in cases {
        let out = run_bounded(usmp().args(*args), BOUND);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
    }
}

/// `/dev/full` refuses every write with ENOSPC.
#[test]
fn a_failed_write_to_stdout_says_stdout() {
    for args in [
        &["kexec", "--cpus", "2"][..],
        &[
            "run",
            "--workload",
            "demo",
            "--cpus",
            "2",
            "--duration",
            "20ms",
        ][..],
    ] {
        let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let t = std::time::Instant::now();
        let child = usmp()
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(full)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_bounded(child, t, BOUND);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        let last = out.stderr.trim().lines().last().unwrap_or("").to_string();
        assert!(
            last.contains("writing to stdout: No space left on device"),
            "{args:?}: {last}"
        );
    }
}

/// The README's `run --cpus 2` works as written: below the lifecycle's 4 CPUs the default
/// workload is demo, and a note says so; asking for the lifecycle there is still an error.
#[test]
fn run_on_two_cpus_defaults_to_demo_with_a_note() {
    let out = run_bounded(
        usmp().args(["run", "--cpus", "2", "--duration", "50ms"]),
        BOUND,
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("running the demo workload on 2"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("workload demo"), "{}", out.stdout);
    let out = run_bounded(
        usmp().args([
            "run",
            "--cpus",
            "2",
            "--workload",
            "lifecycle",
            "--duration",
            "50ms",
        ]),
        BOUND,
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
}
