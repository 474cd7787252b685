//! `usmp stress`, the second helper's scenarios: a short clean run of each exits 0 with its
//! invariant counters in the table, and `--broken bringup-without-cas` is caught by
//! `bringup-timeout`'s default run (exit 1, the violation and a replay command).
//!
//! The runs share two host cores, so they take turns (`serial`); every wait is bounded by
//! `run_bounded`.

use std::sync::Mutex;
use std::time::Duration;

#[path = "common/cli.rs"]
mod cli;
use cli::{run_bounded, usmp};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

/// Far beyond any run here (each is 2 s; a watchdog report would be 10 s more).
const BOUND: Duration = Duration::from_secs(90);

/// Each scenario and the invariant counters its table must show.
const SCENARIOS: &[(&str, &[&str])] = &[
    ("bringup-timeout", &["half_booted=0", "refcount_leaks=0"]),
    ("stop-during-bringup", &["escaped_cpus_deterministic=0"]),
    ("reboot-cpu", &["reboot_cpu_lost=0"]),
    (
        "kexec-cycle",
        &["cpus_lost=0", "threads_grew=0", "fds_grew=0", "rss_grew=0"],
    ),
    ("stop-machine", &["torn_reads=0", "stop_machine_hangs=0"]),
];

#[test]
fn a_short_clean_run_of_each_scenario_exits_0() {
    let _s = serial();
    for &(name, counters) in SCENARIOS {
        let r = run_bounded(
            usmp().args([
                "stress",
                "--scenario",
                name,
                "--cpus",
                "4",
                // Iterations, not a duration a loaded host can starve.
                "--iterations",
                "20",
                "--seed",
                "0x5eed",
            ]),
            BOUND,
        );
        assert_eq!(
            r.status.code(),
            Some(0),
            "{name}: stdout:\n{}\nstderr:\n{}",
            r.stdout,
            r.stderr
        );
        for c in counters {
            assert!(r.stdout.contains(c), "{name}: no {c} in\n{}", r.stdout);
        }
    }
}

#[test]
fn stop_during_bringup_runs_each_mode_alone() {
    let _s = serial();
    for mode in ["best-effort", "deterministic"] {
        let r = run_bounded(
            usmp().args([
                "stress",
                "--scenario",
                "stop-during-bringup",
                "--cpus",
                "4",
                "--iterations",
                "10",
                "--seed",
                "7",
                "--mode",
                mode,
                "--json",
            ]),
            BOUND,
        );
        assert_eq!(r.status.code(), Some(0), "{mode}: {}{}", r.stdout, r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let counters = &v["scenarios"][0]["counters"];
        let (m, other) = match mode {
            "best-effort" => ("best_effort", "deterministic"),
            _ => ("deterministic", "best_effort"),
        };
        assert!(
            counters[format!("rounds_{m}")].as_u64() >= Some(1),
            "{}",
            r.stdout
        );
        assert_eq!(counters[format!("rounds_{other}")], 0, "{}", r.stdout);
    }
}

#[test]
fn bringup_without_cas_is_caught_with_a_replay_command() {
    let _s = serial();
    let trace = std::env::temp_dir().join(format!(
        "usmp-stress-scenarios-bringup-{}.json",
        std::process::id()
    ));
    let r = run_bounded(
        usmp()
            .args([
                "stress",
                "--cpus",
                "4",
                "--seed",
                "0x5eed",
                // By iterations (caught after 16 here), not a duration load can eat.
                "--iterations",
                "400",
                "--broken",
                "bringup-without-cas",
            ])
            .arg("--trace-on-failure")
            .arg(&trace),
        BOUND,
    );
    let _ = std::fs::remove_file(&trace);
    assert_eq!(r.status.code(), Some(1), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("half_booted"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("replay: usmp stress --scenario bringup-timeout --seed 0x5eed --cpus 4")
            && r.stdout.contains("--broken bringup-without-cas"),
        "{}",
        r.stdout
    );
}
