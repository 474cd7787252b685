//! `usmp stress`: every `--broken` variant is caught by its scenario's default run (exit 1, a
//! replay command, a trace file), a clean short run of each scenario exits 0, bad input is one
//! line and exit 2, `--json` is the documented object, the watchdog reports a stall with every
//! CPU's IP and ends the run, and Ctrl-C ends it early with the table so far.
//!
//! The runs share two host cores, so they take turns (`serial`); every wait is bounded by
//! `run_bounded`, and nothing sleeps to synchronise.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
use cli::{run_bounded, usmp};

/// One `usmp stress` at a time: they are CPU-heavy and the machine is small.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

/// Far beyond any run here (a scenario's default is 5 s).
const BOUND: Duration = Duration::from_secs(90);
/// A `--broken` run's iterations: each variant is caught within its first 20 on this machine
/// (`bringup-without-cas` after 16); the run ends at the first violation.
const BROKEN_ITERATIONS: &str = "400";
/// A clean run's iterations: enough to exercise each scenario, and no wall-clock share that
/// host load could starve.
const CLEAN_ITERATIONS: &str = "20";

/// The scenarios this branch builds, and the variants with their catching scenario.
const SCENARIOS: &[&str] = &[
    "ipi-storm",
    "late-ipi-offline",
    "concurrent-stop",
    "irqs-off",
    "wedged",
    "onoff",
];
const BROKEN: &[(&str, &str)] = &[
    ("doorbell-never-rings", "ipi-storm"),
    ("skip-dying-flush", "late-ipi-offline"),
    ("stop-without-retries", "irqs-off"),
    ("bringup-without-cas", "bringup-timeout"),
    ("stop-caller-stranded", "concurrent-stop"),
];

#[test]
fn every_broken_variant_is_caught_with_a_replay_command() {
    let _s = serial();
    for &(variant, owner) in BROKEN {
        let trace = std::env::temp_dir().join(format!(
            "usmp-stress-test-{variant}-{}.json",
            std::process::id()
        ));
        let r = run_bounded(
            usmp()
                // By iterations, not a duration a loaded host can eat: the run ends at the
                // first violation, and one that never catches it exits 4, not 0.
                .args([
                    "stress",
                    "--cpus",
                    "4",
                    "--seed",
                    "0x5eed",
                    "--iterations",
                    BROKEN_ITERATIONS,
                    "--broken",
                    variant,
                ])
                .arg("--trace-on-failure")
                .arg(&trace),
            BOUND,
        );
        if r.status.code() == Some(2) && r.stderr.contains("is not built into this usmp") {
            // The scenario lives on another branch until it is merged.
            assert!(!SCENARIOS.contains(&owner), "{variant}: {}", r.stderr);
            eprintln!("{variant}: scenario {owner} not built here, skipped");
            continue;
        }
        let all = format!("{}{}", r.stdout, r.stderr);
        assert_eq!(r.status.code(), Some(1), "{variant} not caught: {all}");
        let replay = format!("replay: usmp stress --scenario {owner} --seed 0x5eed --cpus 4");
        assert!(all.contains(&replay), "{variant}: no replay command: {all}");
        assert!(
            all.contains(&format!("--broken {variant}")),
            "{variant}: {all}"
        );
        let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
        assert!(
            t.is_object() || t.is_array(),
            "{variant}: trace is not JSON"
        );
        let _ = std::fs::remove_file(&trace);
        eprintln!("{variant}: caught by {owner} in {:?}", r.took);
    }
}

#[test]
fn a_short_clean_run_of_each_scenario_exits_0() {
    let _s = serial();
    for sc in SCENARIOS {
        let r = run_bounded(
            usmp().args([
                "stress",
                "--cpus",
                "4",
                "--scenario",
                sc,
                "--iterations",
                CLEAN_ITERATIONS,
            ]),
            BOUND,
        );
        assert_eq!(r.status.code(), Some(0), "{sc}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stdout.contains("every invariant held"),
            "{sc}: {}",
            r.stdout
        );
        assert!(
            r.stderr.contains("usmp stress: seed 0x"),
            "{sc}: the seed is not printed"
        );
    }
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let _s = serial();
    for args in [
        &["--cpus", "1"][..],
        &["--cpus", "-3"],
        &["--scenario", "nope"],
        &["--duration", "soon"],
        &["--duration", "1s", "--iterations", "3"],
        &["--iterations", "0"],
        &["--seed", "0xzz"],
        &["--mode", "sometimes"],
        &["--faults", "gremlins"],
        &["--faults", "doorbell-drop=0"],
        &["--broken", "everything"],
        &["--broken", "skip-dying-flush", "--scenario", "onoff"],
        &["--hang-timeout", "0s"],
        &["--trace-on-failure", "/nonexistent-dir/t.json"],
    ] {
        let r = run_bounded(usmp().arg("stress").args(args), BOUND);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.starts_with("usmp: error: "),
            "{args:?}: {}",
            r.stderr
        );
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
    }
}

#[test]
fn json_is_the_documented_object() {
    let _s = serial();
    let trace = std::env::temp_dir().join(format!("usmp-json-test-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&trace);
    let r = run_bounded(
        usmp()
            .args([
                "stress",
                "--cpus",
                "4",
                "--scenario",
                "irqs-off",
                "--iterations",
                "3",
                "--seed",
                "42",
                "--json",
                "--host-load",
                "1",
                "--trace-on-failure",
            ])
            .arg(&trace),
        BOUND,
    );
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    // The path was checked at start, but a run that passes leaves no trace file behind.
    assert!(!trace.exists(), "{} left behind", trace.display());
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys.len(), 4, "{v}");
    assert_eq!(v["seed"], 42);
    assert_eq!(v["host_load"], 1);
    assert!(
        r.stderr.contains("host load 1 busy thread(s)"),
        "the header does not name the host load: {}",
        r.stderr
    );
    assert_eq!(v["violations"], 0);
    let sc = &v["scenarios"][0];
    assert_eq!(sc.as_object().unwrap().len(), 7, "{sc}");
    assert_eq!(sc["name"], "irqs-off");
    assert_eq!(sc["iterations"], 3);
    assert_eq!(sc["min_iterations"], 3);
    assert_eq!(sc["starved"], false);
    assert_eq!(sc["violations"], 0);
    assert!(sc["first_violation"].is_null());
    assert_eq!(sc["counters"]["failed_to_stop"], 0);
    assert!(sc["counters"]["nmi_stops"].as_u64().unwrap() > 0, "{sc}");
}

/// A stall longer than `--hang-timeout` is a `hangs` violation with every CPU's state and IP,
/// and the run ends there. The stall is a bring-up that `slow-boot` delays by seconds (the
/// seed makes one of the first few do so), not a bound shorter than a stop: a loaded host once
/// outlasted a 30 ms timeout while still building the runtime, which left no CPU to dump.
#[test]
fn the_watchdog_reports_a_stall_and_ends_the_run() {
    let _s = serial();
    let r = run_bounded(
        usmp().args([
            "stress",
            "--cpus",
            "4",
            "--duration",
            "60s",
            "--hang-timeout",
            "1s",
            "--scenario",
            "onoff",
            "--faults",
            "slow-boot=20s",
            "--seed",
            "0x5eed",
        ]),
        BOUND,
    );
    let all = format!("{}{}", r.stdout, r.stderr);
    assert_eq!(r.status.code(), Some(1), "{all}");
    assert!(all.contains("hangs at "), "{all}");
    assert!(
        all.contains("CPU0 ") && all.contains("ip="),
        "no per-CPU dump: {all}"
    );
    // And, for every CPU, what the host kernel says of its thread (state, core, system call).
    let dump = all.split("hangs at ").nth(1).unwrap_or_default();
    let dump = dump.lines().next().unwrap_or_default();
    for cpu in 0..4 {
        let one = dump
            .split(&format!(" CPU{cpu} "))
            .nth(1)
            .and_then(|r| r.split(';').next())
            .unwrap_or_else(|| panic!("CPU{cpu} missing from the dump: {dump}"));
        for field in [" tid=", " host=", "@core", " syscall="] {
            assert!(
                one.contains(field),
                "CPU{cpu} has no{field} in the dump: {dump}"
            );
        }
    }
    // Reported within --hang-timeout + 1 s of the last progress, however busy the host.
    let after: f64 = dump
        .split("reported ")
        .nth(1)
        .and_then(|r| r.split("s after the last progress").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no report delay in the dump: {dump}"));
    assert!(
        after <= 2.0,
        "reported {after} s after the last progress: {dump}"
    );
    assert!(
        r.took < Duration::from_secs(30),
        "the run went on after the watchdog fired"
    );
}

/// Ctrl-C after the first scenario has finished: the run ends early, prints the table so
/// far and exits 0. The signal is sent when the run reports the scenario done (no sleep).
#[test]
fn ctrl_c_ends_the_run_with_the_table_so_far() {
    let _s = serial();
    let mut child = usmp()
        .args([
            "stress",
            "--cpus",
            "4",
            "--duration",
            "120s",
            "--scenario",
            "all",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let t = Instant::now();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let (mut line, mut stderr, mut sent) = (String::new(), String::new(), false);
    while err.read_line(&mut line).unwrap_or(0) > 0 {
        stderr.push_str(&line);
        if !sent && line.contains("(done)") {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGINT) };
            sent = true;
        }
        line.clear();
        assert!(t.elapsed() < BOUND, "the run did not end: {stderr}");
    }
    let status = child.wait().unwrap();
    let stdout = out.join().unwrap();
    assert!(sent, "no scenario finished: {stderr}");
    assert_eq!(status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("every invariant held"), "{stdout}");
    assert!(stdout.contains("interrupted (Ctrl-C): "), "{stdout}");
    assert!(
        stdout.contains("ipi-storm ") && !stdout.contains("wedged "),
        "{stdout}"
    );
    // The run was to last 120 s; it ended within the second scenario.
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
}

/// A synchronous call that times out logs its target's state at warn, and says how long the
/// call waited: for every target of a `call_many`, the whole call timeout (the later targets
/// share the first one's deadline; they once said "after 0 ms").
#[test]
fn a_csd_timeout_logs_the_target_state_and_the_whole_wait() {
    let _s = serial();
    let r = run_bounded(
        usmp()
            .args([
                "stress",
                "--cpus",
                "4",
                "--seed",
                "0x5eed",
                "--iterations",
                BROKEN_ITERATIONS,
                "--broken",
                "doorbell-never-rings",
            ])
            .env("RUST_LOG", "usmp::ipi::call=warn"),
        BOUND,
    );
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("non-responsive CSD lock: CPU"))
        .collect();
    assert!(!lines.is_empty(), "no CSD timeout logged:\n{}", r.stderr);
    for l in &lines {
        assert!(l.contains("idle word") && l.contains("queue "), "{l}");
        let ms: u64 = l
            .rsplit_once("after ")
            .and_then(|(_, t)| t.trim_end().strip_suffix(" ms"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no wait in {l}"));
        // ipi-storm's call timeout is 2 s.
        assert!(ms >= 1_500, "a timed-out call says it waited {ms} ms: {l}");
    }
}
