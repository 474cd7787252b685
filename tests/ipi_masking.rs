//! The soft irq mask: an IPI that reaches a masked CPU is deferred and replayed by the outermost
//! `irq_restore`; nesting keeps it masked; the NMI gets through the mask.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::{serial, start_masked_spinner, wait_until, MaskCtl, PATIENCE};
use usmp::Builder;

fn rt2() -> usmp::Runtime {
    Builder::new()
        .cpus(2)
        .call_timeout(2 * PATIENCE)
        .build()
        .unwrap()
}

#[test]
fn masked_ipi_is_deferred_then_replayed_by_restore() {
    let _g = serial();
    let rt = rt2();
    let ctl = MaskCtl::new();
    let job = start_masked_spinner(&rt, 1, &ctl);
    let before = rt.stats().per_cpu[1].deferred;
    rt.call_single_async(1, ctl.setter()).unwrap();
    // CPU 1 is busy in a job, so the doorbell is a signal, and its handler must defer.
    assert!(
        wait_until(PATIENCE, || rt.stats().per_cpu[1].deferred > before),
        "the doorbell never reached the masked CPU: {:?}",
        rt.stats().per_cpu[1]
    );
    ctl.wait_job_ran("the deferring handler");
    assert!(
        !ctl.flag.load(Ordering::SeqCst),
        "callback ran while irqs were masked"
    );
    assert_eq!(rt.stats().lost_calls, 1, "the call is queued, in flight");
    ctl.release.store(true, Ordering::Release);
    let rep = job.join_timeout(PATIENCE).unwrap();
    assert!(rep.masked_inside && rep.released, "{rep:?}");
    assert!(!rep.flag_before_restore, "{rep:?}");
    assert!(
        rep.flag_after_restore,
        "irq_restore did not replay the deferred IPI: {rep:?}"
    );
    assert!(!rep.masked_after_restore);
    assert_eq!(ctl.runs.load(Ordering::SeqCst), 1);
    let st = rt.shutdown();
    assert_eq!(st.lost_calls, 0);
    assert_eq!(ctl.runs.load(Ordering::SeqCst), 1);
}

#[test]
fn nested_save_keeps_masked_until_outermost_restore() {
    let _g = serial();
    let rt = rt2();
    let ctl = MaskCtl::new();
    // Set by the job once the inner restore is done and it is spinning, still masked.
    let inner_done = Arc::new(AtomicBool::new(false));
    let release_outer = Arc::new(AtomicBool::new(false));
    let (c, d, ro) = (ctl.clone(), inner_done.clone(), release_outer.clone());
    let job = rt
        .run_on(1, move || {
            let outer = usmp::irq_save();
            let inner = usmp::irq_save();
            c.masked.store(true, Ordering::SeqCst);
            let released = c.spin_until_released(3 * PATIENCE);
            usmp::irq_restore(inner);
            let after_inner = (c.flag.load(Ordering::SeqCst), usmp::irqs_disabled());
            // Still masked: the test queues a second call now, and neither may run yet.
            d.store(true, Ordering::SeqCst);
            let deadline = Instant::now() + 3 * PATIENCE;
            while !ro.load(Ordering::SeqCst) && Instant::now() < deadline {
                c.beats.fetch_add(1, Ordering::SeqCst);
                usmp::cpu_relax();
            }
            let released_outer = ro.load(Ordering::SeqCst);
            let still = (c.flag.load(Ordering::SeqCst), usmp::irqs_disabled());
            usmp::irq_restore(outer);
            let after_outer = (c.flag.load(Ordering::SeqCst), usmp::irqs_disabled());
            (released && released_outer, after_inner, still, after_outer)
        })
        .unwrap();
    assert!(wait_until(PATIENCE, || ctl.masked.load(Ordering::SeqCst)));
    rt.call_single_async(1, ctl.setter()).unwrap();
    assert!(
        wait_until(PATIENCE, || rt.stats().per_cpu[1].deferred >= 1),
        "the doorbell never reached the masked CPU: {:?}",
        rt.stats().per_cpu[1]
    );
    ctl.wait_job_ran("the deferring handler");
    assert!(!ctl.flag.load(Ordering::SeqCst));
    ctl.release.store(true, Ordering::Release);
    assert!(
        wait_until(PATIENCE, || inner_done.load(Ordering::SeqCst)),
        "the job never got past its inner restore"
    );
    // A second call while only the outer save holds the mask.
    rt.call_single_async(1, ctl.setter()).unwrap();
    ctl.wait_job_ran("the second call was queued");
    release_outer.store(true, Ordering::SeqCst);
    let (released, after_inner, still, after_outer) = job.join_timeout(PATIENCE).unwrap();
    assert!(released);
    assert_eq!(
        after_inner,
        (false, true),
        "inner restore unmasked or replayed"
    );
    assert_eq!(still, (false, true), "a call ran under the outer save");
    assert_eq!(
        after_outer,
        (true, false),
        "outermost restore did not replay"
    );
    // The second call ran once too (its doorbell may have been merged into the first's).
    assert!(
        wait_until(PATIENCE, || ctl.runs.load(Ordering::SeqCst) >= 2),
        "the second call never ran: {:?}",
        rt.stats().per_cpu[1]
    );
    assert_eq!(rt.shutdown().lost_calls, 0);
    assert_eq!(ctl.runs.load(Ordering::SeqCst), 2);
}

#[test]
fn sync_caller_waits_for_the_replay() {
    let _g = serial();
    let rt = rt2();
    let ctl = MaskCtl::new();
    let job = start_masked_spinner(&rt, 1, &ctl);
    let before = rt.stats().per_cpu[1].deferred;
    let (result, done_at, released_at) = std::thread::scope(|s| {
        let caller = s.spawn(|| {
            let r = rt.call_single(1, ctl.setter(), true);
            (r, Instant::now())
        });
        // The call has reached CPU 1 and its handler deferred it and returned.
        assert!(
            wait_until(PATIENCE, || rt.stats().per_cpu[1].deferred > before),
            "the doorbell never reached the masked CPU: {:?}",
            rt.stats().per_cpu[1]
        );
        ctl.wait_job_ran("the deferring handler");
        assert!(!ctl.flag.load(Ordering::SeqCst));
        assert!(
            !caller.is_finished(),
            "a sync call to a masked CPU returned early"
        );
        let released_at = Instant::now();
        ctl.release.store(true, Ordering::Release);
        let (r, done_at) = caller.join().unwrap();
        (r, done_at, released_at)
    });
    result.unwrap();
    assert!(
        done_at >= released_at,
        "the sync call completed before irqs were restored"
    );
    let rep = job.join_timeout(PATIENCE).unwrap();
    assert!(
        rep.flag_after_restore && !rep.flag_before_restore,
        "{rep:?}"
    );
    assert_eq!(rt.shutdown().lost_calls, 0);
}

/// Whether `ip` lies in an executable mapping of this process.
fn is_code(ip: u64) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|l| {
        let mut it = l.split_whitespace();
        let (range, perms) = (it.next().unwrap(), it.next().unwrap());
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        perms.contains('x') && (a..b).contains(&ip)
    })
}

#[test]
fn nmi_gets_through_the_soft_mask() {
    let _g = serial();
    let rt = rt2();
    let ctl = MaskCtl::new();
    let job = start_masked_spinner(&rt, 1, &ctl);
    rt.call_single_async(1, ctl.setter()).unwrap();
    let nmis = rt.stats().per_cpu[1].nmis;
    let ip = rt.nmi_backtrace(1, PATIENCE).expect("NMI to a masked CPU");
    assert_ne!(ip, 0);
    assert!(
        is_code(ip),
        "sampled ip {ip:#x} is not in an executable mapping"
    );
    assert!(rt.stats().per_cpu[1].nmis > nmis, "NMI not counted");
    // The NMI did not unmask or flush the queue: once the job runs again, both handlers (the
    // NMI's and the doorbell's, rung before it) have returned.
    ctl.wait_job_ran("the NMI");
    assert!(
        !ctl.flag.load(Ordering::SeqCst),
        "the NMI ran a maskable IPI"
    );
    assert!(rt.stats().per_cpu[1].deferred >= 1);
    // A second sample works too (the pending word was cleared).
    let ip2 = rt.nmi_backtrace(1, PATIENCE).expect("second NMI");
    assert!(is_code(ip2));
    ctl.release.store(true, Ordering::Release);
    let rep = job.join_timeout(PATIENCE).unwrap();
    assert!(
        !rep.flag_before_restore && rep.flag_after_restore,
        "{rep:?}"
    );
    // An idle (sleeping) CPU answers an NMI as well.
    let ip0 = rt.nmi_backtrace(0, PATIENCE).expect("NMI to idle CPU 0");
    assert!(is_code(ip0));
    assert_eq!(rt.shutdown().lost_calls, 0);
}

#[test]
fn irq_save_outside_the_runtime_is_a_no_op() {
    let _g = serial();
    let f = usmp::irq_save();
    assert!(!usmp::irqs_disabled());
    usmp::irq_restore(f);
    // And a CPU's callbacks always see irqs masked (IPI context).
    let rt = rt2();
    let seen = Arc::new(AtomicBool::new(false));
    let s = seen.clone();
    rt.call_single(
        1,
        move || s.store(usmp::irqs_disabled(), Ordering::SeqCst),
        true,
    )
    .unwrap();
    assert!(
        seen.load(Ordering::SeqCst),
        "callback ran with irqs enabled"
    );
    assert_eq!(rt.shutdown().lost_calls, 0);
}
