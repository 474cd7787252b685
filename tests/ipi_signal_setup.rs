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
        !usmp::ipi::signal::has_handler(ipi),
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
