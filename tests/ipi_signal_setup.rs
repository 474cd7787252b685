//! Issue 8, item 4: signal setup is all or nothing, and a handler replaced after `build()` is
//! named in the error instead of a bare timeout. Its own binary: it installs foreign handlers.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::serial;
use usmp::{Builder, IpiError, RuntimeError};

extern "C" fn foreign(_: libc::c_int) {}

fn set_foreign(sig: i32) -> libc::sigaction {
    // SAFETY: a zeroed sigaction with a plain extern "C" handler and an empty mask is valid; the
    // old action is returned to the caller.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = foreign as *const () as usize;
        libc::sigemptyset(&mut act.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(sig, &act, &mut old), 0);
        old
    }
}

fn restore(sig: i32, old: &libc::sigaction) {
    // SAFETY: `old` came from the kernel for this signal.
    unsafe { libc::sigaction(sig, old, std::ptr::null_mut()) };
}

#[test]
fn a_foreign_nmi_handler_fails_build_and_leaves_no_ipi_handler_behind() {
    let _g = serial();
    let (ipi, nmi) = (libc::SIGRTMIN() + 6, libc::SIGRTMIN() + 7);
    let old = set_foreign(nmi);
    let r = Builder::new().cpus(1).signals(ipi, nmi).build();
    assert!(
        matches!(r, Err(RuntimeError::Signal(IpiError::SignalInUse { sig })) if sig == nmi),
        "{:?}",
        r.err()
    );
    assert!(
        !usmp::ipi::has_handler(ipi),
        "build() failed but left its handler on the IPI signal"
    );
    restore(nmi, &old);
    // With the NMI signal free again, the same pair builds.
    let rt = Builder::new().cpus(1).signals(ipi, nmi).build().unwrap();
    drop(rt);
}

#[test]
fn a_handler_replaced_after_build_is_named_when_a_call_times_out() {
    let _g = serial();
    let (ipi, nmi) = (libc::SIGRTMIN() + 8, libc::SIGRTMIN() + 9);
    let rt = Builder::new()
        .cpus(2)
        .signals(ipi, nmi)
        .call_timeout(Duration::from_millis(300))
        .log_events(false)
        .build()
        .unwrap();
    // CPU 1 busy in a job: only the doorbell signal can reach it.
    let (ctl, job) = common::start_busy_spinner(&rt, 1);
    let old = set_foreign(ipi);
    let r = rt.call_single(1, || {}, true);
    restore(ipi, &old);
    ctl.release.store(true, Ordering::Release);
    job.join().unwrap();
    match r {
        Err(IpiError::HandlerReplaced { cpu: 1, sig, .. }) => assert_eq!(sig, ipi),
        other => panic!("expected HandlerReplaced, got {other:?}"),
    }
}

/// Blocks (`true`) or unblocks both signals on the calling thread, as an application might.
fn block_on_this_thread(sigs: [i32; 2], block: bool) {
    // SAFETY: a zeroed sigset_t initialised by sigemptyset, two valid signal numbers, and
    // pthread_sigmask on the calling thread with a valid `how`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in sigs {
            libc::sigaddset(&mut set, s);
        }
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        assert_eq!(libc::pthread_sigmask(how, &set, std::ptr::null_mut()), 0);
    }
}

/// Issue 19, item 2: a program that blocks the real-time signals before `build()` (and before
/// `cpu_up`) still gets CPUs that take IPIs and NMIs while busy: CPU threads unblock their own
/// signals at start instead of inheriting the builder's mask.
#[test]
fn cpus_take_ipis_and_nmis_when_the_builder_blocked_the_signals() {
    let _g = serial();
    let (ipi, nmi) = (libc::SIGRTMIN() + 10, libc::SIGRTMIN() + 11);
    block_on_this_thread([ipi, nmi], true);
    let rt = Builder::new()
        .cpus(2)
        .signals(ipi, nmi)
        .call_timeout(Duration::from_millis(2000))
        .log_events(false)
        .build()
        .unwrap();
    // Once for the CPU started by build(), once for one restarted by cpu_up on this thread.
    for round in ["build", "cpu_up"] {
        let (ctl, job) = common::start_busy_spinner(&rt, 1);
        let r = rt.call_single(1, || {}, true);
        let n = rt.nmi_backtrace(1, Duration::from_millis(2000));
        ctl.release.store(true, Ordering::Release);
        assert!(job.join().unwrap(), "{round}: the spinner was not released");
        r.unwrap_or_else(|e| panic!("{round}: IPI to a busy CPU: {e}"));
        n.unwrap_or_else(|e| panic!("{round}: NMI to a busy CPU: {e}"));
        rt.cpu_down(1).unwrap();
        rt.cpu_up(1).unwrap();
    }
    drop(rt);
    block_on_this_thread([ipi, nmi], false);
}

/// Issue 19, item 8: an NMI handler replaced after `build()` is named, as the IPI handler is:
/// `nmi_backtrace` fails with `HandlerReplaced` (it was a bare `Timeout`), and a crash-stop
/// that cannot stop a CPU lists the signal in `replaced_signals`.
#[test]
fn a_nmi_handler_replaced_after_build_is_named() {
    let _g = serial();
    let (ipi, nmi) = (libc::SIGRTMIN() + 12, libc::SIGRTMIN() + 13);
    let rt = Builder::new()
        .cpus(2)
        .signals(ipi, nmi)
        .log_events(false)
        .build()
        .unwrap();
    // CPU 1 spins with irqs masked: only the NMI can reach it.
    let ctl = common::MaskCtl::new();
    let job = common::start_masked_spinner(&rt, 1, &ctl);
    let old = set_foreign(nmi);
    let bt = rt.nmi_backtrace(1, Duration::from_millis(200));
    let stop = rt.crash_stop();
    restore(nmi, &old);
    ctl.release.store(true, Ordering::Release);
    // The stop vector deferred by the mask is taken at irq_restore: the job parks (stopped).
    let _ = job.join_timeout(Duration::from_secs(5));
    match bt {
        Err(IpiError::HandlerReplaced { cpu: 1, sig, .. }) => assert_eq!(sig, nmi),
        other => panic!("nmi_backtrace: expected HandlerReplaced, got {other:?}"),
    }
    let out = stop.unwrap();
    assert!(out.failed.contains(1), "{out:?}");
    assert_eq!(out.replaced_signals, vec![nmi], "{out:?}");
}
