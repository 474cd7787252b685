//! The common stop routine: from outside and from a CPU, crash notes, the NMI fallback for a
//! masked CPU, and a wedged CPU reported as failed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::serial;
use usmp::{Builder, CpuRunState, IpiOnlyBackend, ParkPolicy};

fn builder(n: usize) -> Builder {
    Builder::new()
        .cpus(n)
        .log_events(false)
        .stop_waits(Duration::from_millis(300), Duration::from_millis(100))
}

/// Waits at most 5 s for `f`.
fn wait_until(f: impl FnMut() -> bool) -> bool {
    common::wait_until(Duration::from_secs(5), f)
}

#[test]
fn stop_from_outside_the_runtime_powers_idle_cpus_off() {
    let _g = serial();
    let rt = builder(4).build().unwrap();
    let out = rt.send_stop().unwrap();
    assert_eq!(out.stopped.to_string(), "0-3");
    assert!(out.failed.is_empty());
    assert_eq!(
        out.attempts.len(),
        1,
        "idle CPUs take the first (maskable) attempt"
    );
    assert!(!out.crash && out.notes.is_empty());
    assert!(rt.online_mask().is_empty());
    for c in 0..4 {
        assert!(
            wait_until(|| rt.cpu_state(c) == Some(CpuRunState::PoweredOff)),
            "cpu {c}"
        );
    }
    assert!(matches!(
        rt.call_single(1, || {}, true),
        Err(usmp::IpiError::Offline { cpu: 1 })
    ));
    assert!(rt.stop_in_progress());
    assert!(matches!(
        rt.send_stop(),
        Err(usmp::StopError::InProgress { upgraded: false })
    ));
}

#[test]
fn stop_from_a_cpu_keeps_that_cpu_running() {
    let _g = serial();
    let rt = builder(4).build().unwrap();
    let h = rt.handle();
    let out = rt
        .run_on(2, move || h.send_stop())
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(out.caller, Some(2));
    assert_eq!(out.stopped.to_string(), "0-1,3");
    assert_eq!(rt.online_mask().to_string(), "2");
    assert_eq!(
        rt.run_on(2, usmp::this_cpu).unwrap().join().unwrap(),
        Some(2)
    );
}

#[test]
fn crash_stop_saves_each_cpus_registers() {
    let _g = serial();
    let rt = builder(3).build().unwrap();
    let spin = Arc::new(AtomicBool::new(true));
    let started = Arc::new(AtomicBool::new(false));
    let (s2, st2) = (spin.clone(), started.clone());
    // CPU 1 busy in a job: the stop signal interrupts real user code.
    let _busy = rt.run_on(1, move || {
        st2.store(true, Ordering::SeqCst);
        while s2.load(Ordering::Relaxed) {
            usmp::cpu_relax();
        }
    });
    assert!(
        wait_until(|| started.load(Ordering::SeqCst)),
        "the job on CPU 1 never started"
    );
    let out = rt.crash_stop().unwrap();
    assert!(out.crash);
    assert_eq!(out.stopped.to_string(), "0-2");
    assert_eq!(out.notes.len(), 3);
    for n in &out.notes {
        assert_ne!(n.regs.ip, 0, "cpu {} has no saved ip", n.cpu);
        assert_ne!(n.regs.sp, 0, "cpu {} has no saved sp", n.cpu);
    }
    assert_eq!(rt.crash_note(1).unwrap().cpu, 1);
    // Stopped inside a job: cannot power off, stays parked (lost).
    assert_eq!(rt.cpu_state(1), Some(CpuRunState::Parked));
    spin.store(false, Ordering::Relaxed);
}

fn masked_spinner(rt: &usmp::Runtime, cpu: usize, release: &Arc<AtomicBool>) {
    let (r, ready) = (release.clone(), Arc::new(AtomicBool::new(false)));
    let ready2 = ready.clone();
    let _ = rt.run_on(cpu, move || {
        let f = usmp::irq_save();
        ready2.store(true, Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(10);
        while !r.load(Ordering::Relaxed) && Instant::now() < end {
            usmp::cpu_relax();
        }
        usmp::irq_restore(f);
    });
    assert!(wait_until(|| ready.load(Ordering::SeqCst)));
}

#[test]
fn a_cpu_with_irqs_masked_is_stopped_only_by_the_nmi_attempt() {
    let _g = serial();
    let rt = builder(3).build().unwrap();
    let release = Arc::new(AtomicBool::new(false));
    masked_spinner(&rt, 2, &release);
    let out = rt.send_stop().unwrap();
    assert!(
        out.attempts[0].remaining.contains(2),
        "attempt 1 must not stop a masked CPU"
    );
    assert!(!out.attempts[0].remaining.contains(0));
    assert_eq!(out.attempts.len(), 2);
    assert!(
        out.attempts[1].remaining.is_empty(),
        "the NMI attempt stops it"
    );
    assert!(out.failed.is_empty());
    assert_eq!(rt.cpu_state(2), Some(CpuRunState::Parked));
    release.store(true, Ordering::Relaxed);
}

#[test]
fn without_the_nmi_fallback_a_masked_cpu_is_never_stopped() {
    let _g = serial();
    let rt = builder(3)
        .stop_backend(Arc::new(IpiOnlyBackend))
        .park_policy(ParkPolicy::PowerOff)
        .build()
        .unwrap();
    let release = Arc::new(AtomicBool::new(false));
    masked_spinner(&rt, 2, &release);
    let out = rt.send_stop().unwrap();
    assert_eq!(out.attempts.len(), 3);
    assert_eq!(out.failed.to_string(), "2");
    release.store(true, Ordering::Relaxed);
}

#[test]
fn a_wedged_cpu_is_reported_failed_after_all_retries_and_the_call_returns() {
    let _g = serial();
    let rt = builder(3)
        .stop_waits(Duration::from_millis(60), Duration::from_millis(30))
        .stop_max_retries(3)
        .build()
        .unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let (r, ready) = (release.clone(), Arc::new(AtomicBool::new(false)));
    let ready2 = ready.clone();
    let _job = rt.run_on(1, move || {
        assert!(usmp::fault::wedge_this_cpu(true));
        ready2.store(true, Ordering::SeqCst);
        // Wedged, it ignores every stop signal; it waits (bounded) for the test's release.
        common::wait_until(Duration::from_secs(10), || r.load(Ordering::Relaxed));
    });
    assert!(wait_until(|| ready.load(Ordering::SeqCst)));
    let t0 = Instant::now();
    let out = rt.send_stop().unwrap();
    let took = t0.elapsed();
    assert_eq!(out.failed.to_string(), "1");
    assert_eq!(out.attempts.len(), 3);
    assert!(out.attempts.iter().all(|a| a.remaining.contains(1)));
    assert!(
        took >= Duration::from_millis(60 + 30 + 30),
        "returned too early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(out.stopped.to_string(), "0,2");
    release.store(true, Ordering::Relaxed);
}
