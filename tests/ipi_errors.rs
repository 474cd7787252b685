//! IPI errors: a bad CPU id, an offline target, a timed-out synchronous call (cancelled, never
//! run), a synchronous call with irqs masked, and a signal another handler already owns.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{serial, start_masked_spinner, wait_until, MaskCtl, PATIENCE};
use usmp::{Builder, IpiError, RuntimeError};

/// A closure that records whether it ran, and lets the test see whether it was dropped.
fn probe(ran: &Arc<AtomicBool>, token: &Arc<()>) -> impl FnOnce() + Send + Clone + 'static {
    let (r, t) = (ran.clone(), token.clone());
    move || {
        let _keep = &t;
        r.store(true, Ordering::SeqCst);
    }
}

#[test]
fn invalid_cpu_is_refused_and_counted() {
    let _g = serial();
    let rt = Builder::new().cpus(2).build().unwrap();
    let (ran, token) = (Arc::new(AtomicBool::new(false)), Arc::new(()));
    match rt.call_single(999, probe(&ran, &token), true) {
        Err(IpiError::InvalidCpu { cpu: 999, cpus: 2 }) => {}
        other => panic!("expected InvalidCpu, got {other:?}"),
    }
    assert!(matches!(
        rt.call_single_async(2, probe(&ran, &token)),
        Err(IpiError::InvalidCpu { cpu: 2, .. })
    ));
    assert!(matches!(
        rt.call_many(&"0,5".parse().unwrap(), probe(&ran, &token), true),
        Err(IpiError::InvalidCpu { cpu: 5, .. })
    ));
    assert!(matches!(
        rt.nmi_backtrace(7, Duration::from_millis(100)),
        Err(IpiError::InvalidCpu { cpu: 7, .. })
    ));
    assert!(matches!(
        rt.run_on(3, || ()),
        Err(RuntimeError::InvalidCpu { cpu: 3, cpus: 2 })
    ));
    assert_eq!(Arc::strong_count(&token), 1, "a refused closure was kept");
    let st = rt.stats();
    assert_eq!(st.invalid_ipis, 4, "{st:?}");
    assert_eq!(st.ipis_sent, 0, "call_many sent before validating its mask");
    assert_eq!(st.calls_failed, 3);
    let st = rt.shutdown();
    assert!(!ran.load(Ordering::SeqCst));
    assert_eq!(st.lost_calls, 0);
}

/// Since issue 19 (item 5) a handle that outlives its runtime gets `ShutDown`, not `Offline`
/// (which said "bring it up", and `cpu_up` then did); `call_many` no longer returns `Ok`
/// having skipped every CPU.
#[test]
fn calls_after_shutdown_are_refused_and_dropped_unrun() {
    let _g = serial();
    let rt = Builder::new().cpus(2).build().unwrap();
    let h = rt.handle();
    let st = rt.shutdown();
    assert!(
        st.per_cpu
            .iter()
            .all(|c| c.state == usmp::CpuRunState::Offline),
        "{st:?}"
    );
    assert!(h.online_mask().is_empty());
    let (ran, token) = (Arc::new(AtomicBool::new(false)), Arc::new(()));
    match h.call_single(0, probe(&ran, &token), true) {
        Err(IpiError::ShutDown) => {}
        other => panic!("expected ShutDown, got {other:?}"),
    }
    assert!(matches!(
        h.call_single_async(1, probe(&ran, &token)),
        Err(IpiError::ShutDown)
    ));
    assert!(matches!(
        h.call_many(&"0-1".parse().unwrap(), probe(&ran, &token), true),
        Err(IpiError::ShutDown)
    ));
    assert!(matches!(
        h.nmi_backtrace(1, Duration::from_millis(100)),
        Err(IpiError::ShutDown)
    ));
    assert!(matches!(h.run_on(0, || ()), Err(RuntimeError::ShutDown)));
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "a refused closure was not dropped"
    );
    assert!(
        !ran.load(Ordering::SeqCst),
        "a closure ran on an offline CPU"
    );
    let st = h.stats();
    assert_eq!(st.ipis_sent, 0);
    assert_eq!(st.lost_calls, 0);
}

#[test]
fn sync_call_to_masked_cpu_times_out_and_is_cancelled() {
    let _g = serial();
    let rt = Builder::new()
        .cpus(2)
        .call_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let ctl = MaskCtl::new();
    let job = start_masked_spinner(&rt, 1, &ctl);
    let token = Arc::new(());
    let t = token.clone();
    let c = ctl.clone();
    let t0 = Instant::now();
    let r = rt.call_single(
        1,
        move || {
            let _keep = &t;
            c.flag.store(true, Ordering::SeqCst);
        },
        true,
    );
    let waited = t0.elapsed();
    match r {
        Err(IpiError::Timeout {
            cpu: 1,
            started: false,
            waited_ms,
        }) => {
            assert!(waited_ms >= 150, "waited_ms {waited_ms}")
        }
        other => panic!("expected Timeout{{cpu:1, started:false}}, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(200) && waited < PATIENCE,
        "{waited:?}"
    );
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "the cancelled closure was not dropped by the sender"
    );
    let st = rt.stats();
    assert!(st.csd_timeouts >= 1 && st.ipis_cancelled >= 1, "{st:?}");
    assert_eq!(st.lost_calls, 0, "a cancelled call is accounted for");
    // Unmask: the cancelled call must not run, though its doorbells were deferred.
    ctl.release.store(true, Ordering::Release);
    let rep = job.join_timeout(PATIENCE).unwrap();
    assert!(rep.released && !rep.masked_after_restore, "{rep:?}");
    assert!(
        !rep.flag_after_restore,
        "a cancelled call ran at irq_restore"
    );
    // The CPU still works, and the cancelled call still does not run. (Async and a generous
    // wait: the 200 ms call timeout is for the call above, not for a loaded machine.)
    let ok = Arc::new(AtomicBool::new(false));
    let o = ok.clone();
    rt.call_single_async(1, move || o.store(true, Ordering::SeqCst))
        .unwrap();
    assert!(wait_until(PATIENCE, || ok.load(Ordering::SeqCst)));
    let st = rt.shutdown();
    assert!(
        !ctl.flag.load(Ordering::SeqCst),
        "a cancelled call ran at shutdown"
    );
    assert_eq!(st.lost_calls, 0, "{st:?}");
    assert_eq!(st.ipis_cancelled, 1);
    assert_eq!(st.ipis_handled, st.ipis_sent - 1);
}

#[test]
fn sync_call_with_irqs_masked_is_refused() {
    let _g = serial();
    let rt = Builder::new().cpus(2).build().unwrap();
    // From a job with irqs masked: sync calls are refused, an async one is accepted.
    let h = rt.handle();
    let ran = Arc::new(AtomicU32::new(0));
    let r = ran.clone();
    let (single, many, asynch) = rt
        .run_on(1, move || {
            let f = usmp::irq_save();
            let r1 = r.clone();
            let single = h.call_single(
                0,
                move || {
                    r1.fetch_add(1, Ordering::SeqCst);
                },
                true,
            );
            let r2 = r.clone();
            let many = h.call_many(
                &"0-1".parse().unwrap(),
                move || {
                    r2.fetch_add(1, Ordering::SeqCst);
                },
                true,
            );
            let r3 = r.clone();
            let asynch = h.call_single_async(0, move || {
                r3.fetch_add(100, Ordering::SeqCst);
            });
            usmp::irq_restore(f);
            (single, many, asynch)
        })
        .unwrap()
        .join_timeout(PATIENCE)
        .unwrap();
    assert!(
        matches!(single, Err(IpiError::IrqsDisabled { cpu: 1 })),
        "{single:?}"
    );
    assert!(
        matches!(many, Err(IpiError::IrqsDisabled { cpu: 1 })),
        "{many:?}"
    );
    asynch.unwrap();
    assert!(wait_until(PATIENCE, || ran.load(Ordering::SeqCst) == 100));
    // From IPI context (a callback on CPU 1 calling CPU 0 synchronously).
    let verdict = Arc::new(AtomicU32::new(0));
    let (v, h) = (verdict.clone(), rt.handle());
    rt.call_single(
        1,
        move || {
            let r = h.call_single(0, || {}, true);
            v.store(
                if matches!(r, Err(IpiError::IrqsDisabled { cpu: 1 })) {
                    1
                } else {
                    2
                },
                Ordering::SeqCst,
            );
        },
        true,
    )
    .unwrap();
    assert_eq!(
        verdict.load(Ordering::SeqCst),
        1,
        "sync call from IPI context was not refused"
    );
    let st = rt.shutdown();
    assert_eq!(st.lost_calls, 0);
    assert_eq!(ran.load(Ordering::SeqCst), 100, "a refused call ran");
}

extern "C" fn foreign_handler(_: libc::c_int) {}

fn handler_of(sig: i32) -> usize {
    // SAFETY: zeroed sigaction is a valid out-parameter; a null new action only queries.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(sig, std::ptr::null(), &mut old), 0);
        old.sa_sigaction
    }
}

#[test]
fn foreign_handler_is_not_replaced() {
    let _g = serial();
    let sig = libc::SIGRTMIN() + 10;
    // SAFETY: installs a handler that does nothing on a real-time signal nobody sends.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = foreign_handler as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut act.sa_mask);
        assert_eq!(libc::sigaction(sig, &act, std::ptr::null_mut()), 0);
    }
    match Builder::new().cpus(1).signals(sig, sig + 1).build() {
        Err(RuntimeError::Signal(IpiError::SignalInUse { sig: s })) => assert_eq!(s, sig),
        Err(e) => panic!("expected SignalInUse({sig}), got {e}"),
        Ok(_) => panic!("built a runtime on a signal another handler owns"),
    }
    // Foreign handler as the NMI signal.
    match Builder::new().cpus(1).signals(sig + 2, sig).build() {
        Err(RuntimeError::Signal(IpiError::SignalInUse { sig: s })) => assert_eq!(s, sig),
        Err(e) => panic!("expected SignalInUse({sig}), got {e}"),
        Ok(_) => panic!("built a runtime on a signal another handler owns"),
    }
    assert_eq!(
        handler_of(sig),
        foreign_handler as extern "C" fn(libc::c_int) as usize,
        "the foreign handler was replaced"
    );
    // Bad signal numbers are refused before anything is installed.
    assert!(matches!(
        Builder::new()
            .cpus(1)
            .signals(libc::SIGUSR1, sig + 1)
            .build(),
        Err(RuntimeError::Signal(IpiError::BadSignal {
            sig: libc::SIGUSR1,
            ..
        }))
    ));
    assert!(matches!(
        Builder::new().cpus(1).signals(sig + 3, sig + 3).build(),
        Err(RuntimeError::Signal(IpiError::BadSignal { .. }))
    ));
    // Other free signals work.
    let rt = Builder::new()
        .cpus(2)
        .signals(sig + 4, sig + 5)
        .build()
        .unwrap();
    let ok = Arc::new(AtomicBool::new(false));
    let o = ok.clone();
    rt.call_single(1, move || o.store(true, Ordering::SeqCst), true)
        .unwrap();
    assert!(ok.load(Ordering::SeqCst));
    assert_eq!(rt.shutdown().lost_calls, 0);
}

#[test]
fn sync_call_stuck_in_its_callback_reports_started() {
    let _g = serial();
    let rt = Builder::new()
        .cpus(2)
        .call_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    // A (badly behaved) callback that spins until the test lets it go. If CPU 1 does not even
    // start it within the call timeout (a stalled machine), the call is cancelled instead:
    // try again, a few times.
    let mut outcomes = Vec::new();
    let mut cancelled = 0;
    for _ in 0..5 {
        let ctl = MaskCtl::new();
        let c = ctl.clone();
        let r = rt.call_single(
            1,
            move || {
                c.masked.store(true, Ordering::SeqCst); // "started"
                c.spin_until_released(3 * PATIENCE);
                c.flag.store(true, Ordering::SeqCst);
            },
            true,
        );
        let started = ctl.masked.load(Ordering::SeqCst);
        let finished_early = ctl.flag.load(Ordering::SeqCst);
        ctl.release.store(true, Ordering::Release);
        match r {
            Err(IpiError::Timeout {
                cpu: 1,
                started: true,
                ..
            }) => {
                assert!(started && !finished_early);
                // It finishes once let go; its slot is released.
                assert!(wait_until(PATIENCE, || ctl.flag.load(Ordering::SeqCst)));
                outcomes.push("started");
                break;
            }
            Err(IpiError::Timeout {
                cpu: 1,
                started: false,
                ..
            }) => {
                cancelled += 1;
                outcomes.push("cancelled");
            }
            other => panic!("expected Timeout{{cpu:1, started:true}}, got {other:?}"),
        }
    }
    assert_eq!(outcomes.last(), Some(&"started"), "{outcomes:?}");
    // The CPU serves calls again.
    let ok = Arc::new(AtomicBool::new(false));
    let o = ok.clone();
    rt.call_single_async(1, move || o.store(true, Ordering::SeqCst))
        .unwrap();
    assert!(wait_until(PATIENCE, || ok.load(Ordering::SeqCst)));
    let st = rt.shutdown();
    assert_eq!(st.csd_timeouts, 1 + cancelled);
    assert_eq!(st.ipis_cancelled, cancelled);
    assert_eq!(st.lost_calls, 0, "{st:?}");
}

#[test]
fn call_many_reports_the_cpus_that_timed_out() {
    let _g = serial();
    let rt = Builder::new()
        .cpus(3)
        // Long enough that CPUs 0 and 2 answer in time even on a loaded machine.
        .call_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let ctl = MaskCtl::new();
    let job = start_masked_spinner(&rt, 1, &ctl);
    let ran = Arc::new(AtomicU32::new(0));
    let r = ran.clone();
    let res = rt.call_many(
        &"0-2".parse().unwrap(),
        move || {
            r.fetch_add(1 << (8 * usmp::this_cpu().unwrap()), Ordering::SeqCst);
        },
        true,
    );
    match res {
        Err(IpiError::Partial { failed, first }) => {
            assert_eq!(failed.to_string(), "1");
            assert!(
                matches!(
                    *first,
                    IpiError::Timeout {
                        cpu: 1,
                        started: false,
                        ..
                    }
                ),
                "{first:?}"
            );
        }
        other => panic!("expected Partial, got {other:?}"),
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0x01_00_01,
        "CPUs 0 and 2 run once, CPU 1 not"
    );
    ctl.release.store(true, Ordering::Release);
    job.join_timeout(PATIENCE).unwrap();
    let st = rt.shutdown();
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0x01_00_01,
        "the cancelled copy ran on CPU 1"
    );
    assert_eq!(st.lost_calls, 0);
    assert_eq!(st.ipis_cancelled, 1);
}

#[test]
fn exhausted_csd_pool_is_an_error() {
    let _g = serial();
    const POOL: usize = 4;
    let rt = Builder::new()
        .cpus(2)
        .csd_pool(POOL)
        .call_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let ctl = MaskCtl::new();
    let job = start_masked_spinner(&rt, 1, &ctl);
    // Every slot is linked on the masked CPU's queue.
    for _ in 0..POOL {
        rt.call_single_async(1, ctl.setter()).unwrap();
    }
    let (ran, token) = (Arc::new(AtomicBool::new(false)), Arc::new(()));
    let t0 = Instant::now();
    match rt.call_single_async(1, probe(&ran, &token)) {
        Err(IpiError::NoCsd { cpu: 1 }) => {}
        other => panic!("expected NoCsd, got {other:?}"),
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(100),
        "gave up before the call timeout"
    );
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "the refused closure was not dropped"
    );
    ctl.release.store(true, Ordering::Release);
    let rep = job.join_timeout(PATIENCE).unwrap();
    assert!(rep.flag_after_restore);
    assert_eq!(ctl.runs.load(Ordering::SeqCst), POOL as u32);
    // Slots are back: the pool serves again (one call in flight at a time, so the 100 ms
    // pool wait never matters).
    for i in 1..=3 * POOL as u32 {
        rt.call_single_async(1, ctl.setter()).unwrap();
        assert!(wait_until(PATIENCE, || ctl.runs.load(Ordering::SeqCst)
            == POOL as u32 + i));
    }
    let st = rt.shutdown();
    assert!(!ran.load(Ordering::SeqCst));
    assert_eq!(st.lost_calls, 0);
    assert_eq!(ctl.runs.load(Ordering::SeqCst), 4 * POOL as u32);
}

/// Issue 19, item 6: a csd pool smaller than the targets. `call_many`/`on_each_cpu` used to
/// publish a call per target before ringing any, and once the pool was dry waited the whole
/// call timeout for a slot that only its own unrung calls held, then failed with `NoCsd`
/// having run nothing. Now a dry pool ends the batch: it is rung (and, if sync, waited for)
/// first, so a pool of one serves any number of CPUs.
#[test]
fn a_csd_pool_smaller_than_the_targets_serves_them_all() {
    let _g = serial();
    let rt = Builder::new()
        .cpus(8)
        .csd_pool(1)
        .call_timeout(Duration::from_secs(2))
        .log_events(false)
        .build()
        .unwrap();
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let t0 = Instant::now();
    rt.on_each_cpu(
        move || {
            h.fetch_add(1, Ordering::Relaxed);
        },
        true,
    )
    .unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 8);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "on_each_cpu waited for its own slots: {:?}",
        t0.elapsed()
    );
    // Asynchronous: the batch is rung, and the next call waits for a slot its target frees.
    let h = hits.clone();
    rt.call_many(
        &"0-7".parse().unwrap(),
        move || {
            h.fetch_add(1, Ordering::Relaxed);
        },
        false,
    )
    .unwrap();
    assert!(wait_until(PATIENCE, || hits.load(Ordering::Relaxed) == 16));
    let st = rt.shutdown();
    assert_eq!(st.lost_calls, 0);
    assert_eq!(st.csd_in_use, 0);
}
