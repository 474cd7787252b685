//! Issue 8, item 2: what happens when user code on a CPU panics (policy in `src/ipi/fatal.rs`).
//! In IPI context (callbacks, stop_machine functions, STARTING/DYING steps) the process aborts
//! with one line naming the CPU and the code; never a SIGSEGV, never a CPU that dies while it
//! still reports online. In a job (thread context) the panic is reported to the job's handle and
//! the CPU stays healthy, with its irq mask restored.
//!
//! The fatal cases run in a child process: this test binary re-executes itself with
//! `USMP_PANIC_CHILD` naming the scenario.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::serial;
use usmp::{Builder, HotplugError, IdlePolicy, RuntimeError, Section};

const CHILD: &str = "USMP_PANIC_CHILD";

/// Runs scenario `name` in a child; returns (signal that ended it, stderr).
fn run_child(name: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    (
        out.status.signal(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// In the parent: the child must die of SIGABRT with exactly one fatal line naming the CPU.
fn expect_fatal(name: &str, cpu: usize, what: &str) {
    let (sig, err) = run_child(name);
    assert_eq!(
        sig,
        Some(libc::SIGABRT),
        "{name}: expected SIGABRT, got signal {sig:?}; stderr:\n{err}"
    );
    let fatal: Vec<&str> = err.lines().filter(|l| l.contains("usmp: fatal")).collect();
    assert_eq!(
        fatal.len(),
        1,
        "{name}: want one fatal line; stderr:\n{err}"
    );
    let want = format!("usmp: fatal: CPU{cpu}: {what} `");
    assert!(
        fatal[0].starts_with(&want),
        "{name}: {:?} does not start with {want:?}",
        fatal[0]
    );
    assert!(
        fatal[0].contains("boom"),
        "{name}: the panic message is missing: {}",
        fatal[0]
    );
    // The hook aborted before std's default hook printed its own report.
    assert!(
        !err.contains("stack backtrace"),
        "{name}: std's hook ran:\n{err}"
    );
}

fn is_child(name: &str) -> bool {
    std::env::var(CHILD).is_ok_and(|v| v == name)
}

#[test]
fn callback_panic_on_a_busy_cpu_aborts_with_one_line() {
    let name = "callback_panic_on_a_busy_cpu_aborts_with_one_line";
    if is_child(name) {
        let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
        let _busy = common::start_busy_spinner(&rt, 1);
        let _ = rt.call_single(1, || panic!("boom"), true);
        unreachable!("the process should have aborted");
    }
    let _g = serial();
    expect_fatal(name, 1, "IPI callback");
}

#[test]
fn callback_panic_on_an_idle_cpu_aborts_with_one_line() {
    let name = "callback_panic_on_an_idle_cpu_aborts_with_one_line";
    if is_child(name) {
        let rt = Builder::new()
            .cpus(2)
            .idle(IdlePolicy::SleepOnly)
            .log_events(false)
            .build()
            .unwrap();
        let _ = rt.call_single(1, || panic!("boom {}", 42), true);
        unreachable!("the process should have aborted");
    }
    let _g = serial();
    expect_fatal(name, 1, "IPI callback");
}

#[test]
fn stop_machine_function_panic_aborts_with_one_line() {
    let name = "stop_machine_function_panic_aborts_with_one_line";
    if is_child(name) {
        let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
        let _ = rt.stop_machine(
            |c| {
                if c == 1 {
                    panic!("boom");
                }
                Ok(())
            },
            &"1".parse().unwrap(),
        );
        unreachable!("the process should have aborted");
    }
    let _g = serial();
    expect_fatal(name, 1, "stop_machine function");
}

#[test]
fn dying_step_panic_aborts_with_one_line() {
    let name = "dying_step_panic_aborts_with_one_line";
    if is_child(name) {
        let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
        rt.setup_state(
            "test:dying-panics",
            Section::Starting,
            None,
            Some(Arc::new(|_| panic!("boom"))),
        )
        .unwrap();
        let _ = rt.cpu_down(1);
        unreachable!("the process should have aborted");
    }
    let _g = serial();
    expect_fatal(name, 1, "hotplug DYING step");
}

/// A job that panics with irqs masked: the handle reports the panic, the CPU unmasks, and later
/// jobs and IPIs on it work; no csd is leaked.
#[test]
fn job_panic_with_irqs_masked_leaves_the_cpu_healthy() {
    let _g = serial();
    let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
    let r = rt
        .run_on(1, || {
            let _f = usmp::irq_save();
            panic!("job boom");
        })
        .unwrap()
        .join();
    match r {
        Err(RuntimeError::JobPanicked { cpu: 1, message }) => assert_eq!(message, "job boom"),
        other => panic!("expected JobPanicked on CPU 1, got {other:?}"),
    }
    let masked = rt.run_on(1, usmp::irqs_disabled).unwrap().join().unwrap();
    assert!(!masked, "the next job started with irqs masked");
    assert_eq!(rt.stats().per_cpu[1].irq_leaks, 1);
    // IPIs reach the CPU while it runs a job (signal path) and while it is idle.
    let (ctl, job) = common::start_busy_spinner(&rt, 1);
    let hit = Arc::new(AtomicBool::new(false));
    let h2 = hit.clone();
    rt.call_single(1, move || h2.store(true, Ordering::Release), true)
        .unwrap();
    assert!(hit.load(Ordering::Acquire));
    ctl.release.store(true, Ordering::Release);
    assert!(job.join().unwrap());
    rt.call_single(1, || {}, true).unwrap();
    rt.cpu_down(1).unwrap();
    rt.cpu_up(1).unwrap();
    let stats = rt.shutdown();
    assert_eq!(stats.csd_in_use, 0, "a csd leaked");
    assert_eq!(stats.lost_calls, 0);
}

/// PREPARE and ONLINE steps run in thread context: a panic fails the step, which is rolled back,
/// and hotplug keeps working.
#[test]
fn online_and_prepare_step_panics_fail_the_step_and_roll_back() {
    let _g = serial();
    let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
    rt.cpu_down(1).unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    for section in [Section::Online, Section::Prepare] {
        let a2 = armed.clone();
        let id = rt
            .setup_state(
                "test:panics",
                section,
                Some(Arc::new(move |_| {
                    if a2.load(Ordering::Acquire) {
                        panic!("step boom");
                    }
                    Ok(())
                })),
                None,
            )
            .unwrap();
        armed.store(true, Ordering::Release);
        match rt.cpu_up(1) {
            Err(HotplugError::StepFailed {
                cpu: 1,
                reason,
                up: true,
                ..
            }) => {
                assert!(
                    reason.contains("panicked: step boom"),
                    "{section:?}: {reason}"
                )
            }
            other => panic!("{section:?}: expected StepFailed, got {other:?}"),
        }
        assert!(
            !rt.is_online(1),
            "{section:?}: CPU 1 half up after a panicking step"
        );
        armed.store(false, Ordering::Release);
        rt.cpu_up(1).unwrap();
        rt.call_single(1, || {}, true).unwrap();
        rt.cpu_down(1).unwrap();
        rt.remove_state(id).unwrap();
    }
}

/// Issue 19, item 1: a job that panics while IPIs keep landing on its CPU is a job panic
/// (`JobPanicked`), not a fatal IPI-context one. The callbacks that ran on top of the panicking
/// job (during its panic hook or its unwind) used to see `thread::panicking()` and abort the
/// process naming "IPI callback". Runs in a child so that the old behaviour (an abort) fails
/// this test instead of killing the whole binary.
#[test]
fn job_panic_under_an_ipi_storm_is_job_panicked() {
    let name = "job_panic_under_an_ipi_storm_is_job_panicked";
    if is_child(name) {
        let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
        let h = rt.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let storm = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let _ = h.call_single_async(1, || {});
            }
        });
        for i in 0..20 {
            match rt.run_on(1, move || panic!("job boom {i}")).unwrap().join() {
                Err(RuntimeError::JobPanicked { cpu: 1, message }) => {
                    assert_eq!(message, format!("job boom {i}"))
                }
                other => panic!("round {i}: expected JobPanicked on CPU 1, got {other:?}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        storm.join().unwrap();
        return;
    }
    let _g = serial();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        // A backtrace makes std's hook slow: more IPIs land while the job is panicking.
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child failed ({:?}, signal {:?}); stderr:\n{err}",
        out.status.code(),
        out.status.signal()
    );
    assert!(!err.contains("usmp: fatal"), "stderr:\n{err}");
}
