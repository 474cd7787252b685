//! The fault injector (`usmp::fault`, feature `fault-injection`): each fault does what it says
//! and the protocol survives it, and each broken variant really breaks the protocol it names,
//! so a checker that watches for it has something to catch.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{serial, start_busy_spinner, start_masked_spinner, wait_until, MaskCtl};
use usmp::fault::Broken;

/// A busy CPU is reached only by its doorbell signal. With half the signals dropped, every
/// synchronous call still completes: the waiting sender re-rings even though a doorbell is
/// marked in flight. (Without the forced re-ring the lost signal's mark would coalesce every
/// later ring and the first dropped call would time out.)
#[test]
fn a_sync_call_survives_dropped_doorbells() {
    let _s = serial();
    let rt = usmp::Builder::new()
        .cpus(2)
        .call_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    rt.faults().set_seed(1);
    rt.faults().set_doorbell_drop(2);
    let (ctl, spinner) = start_busy_spinner(&rt, 1);
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..20 {
        let r = ran.clone();
        rt.call_single(
            1,
            move || {
                r.fetch_add(1, Ordering::SeqCst);
            },
            true,
        )
        .expect("a sync call to a busy CPU with half its doorbells dropped");
    }
    ctl.release.store(true, Ordering::SeqCst);
    assert!(spinner.join().unwrap(), "spinner was never released");
    assert_eq!(ran.load(Ordering::SeqCst), 20);
    assert!(rt.faults().counters().doorbells_dropped >= 1);
}

/// The broken doorbell never rings: a call to a busy CPU is not served while the CPU is busy,
/// and its synchronous sender gets a timeout (never a silent loss: the call is cancelled).
#[test]
fn broken_doorbell_times_out_the_sender() {
    let _s = serial();
    let rt = usmp::Builder::new()
        .cpus(2)
        .call_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    rt.faults().set_broken(Broken::DoorbellNeverRings, true);
    let (ctl, spinner) = start_busy_spinner(&rt, 1);
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let res = rt.call_single(
        1,
        move || {
            r.fetch_add(1, Ordering::SeqCst);
        },
        true,
    );
    ctl.release.store(true, Ordering::SeqCst);
    assert!(spinner.join().unwrap());
    assert!(
        matches!(res, Err(usmp::IpiError::Timeout { .. })),
        "expected a timeout, got {res:?}"
    );
    rt.faults().set_broken(Broken::DoorbellNeverRings, false);
    assert_eq!(ran.load(Ordering::SeqCst), 0, "a cancelled call ran");
}

/// Without retries the stop's first (maskable) attempt is its only one: a CPU spinning with
/// irqs masked escapes it. The fixed protocol catches it with the NMI attempt.
#[test]
fn stop_without_retries_lets_a_masked_cpu_escape() {
    let _s = serial();
    for broken in [false, true] {
        let rt = usmp::Builder::new()
            .cpus(3)
            .stop_waits(Duration::from_millis(30), Duration::from_millis(500))
            .build()
            .unwrap();
        rt.faults().set_broken(Broken::StopWithoutRetries, broken);
        let ctl = MaskCtl::new();
        let _job = start_masked_spinner(&rt, 2, &ctl);
        let out = rt.send_stop().unwrap();
        assert_eq!(
            out.failed.contains(2),
            broken,
            "broken={broken}: failed={} attempts={}",
            out.failed,
            out.attempts.len()
        );
        ctl.release.store(true, Ordering::SeqCst);
    }
}

/// Seed 003: the AP is slower than the boot timeout. Fixed: `cpu_up` reports the timeout and
/// the CPU ends offline with no reference taken. Broken (no compare-and-swap): the same timeout
/// is reported, yet the CPU comes online anyway: half-booted.
#[test]
fn bringup_without_cas_leaves_a_half_booted_cpu() {
    let _s = serial();
    for broken in [false, true] {
        // The 20 ms timeout bounds the boot at build and the teardown too, which a loaded host
        // may overrun (beside `stress-ng --cpu 4`: `TeardownTimeout { cpu: 1, timeout_ms: 20 }`
        // from the cpu_down below). Neither is what this test checks: retry the build, and let
        // a teardown that timed out finish (its limbo clears when the thread exits).
        let rt = (0..5)
            .find_map(|_| {
                usmp::Builder::new()
                    .cpus(2)
                    .boot_timeout(Duration::from_millis(20))
                    .build()
                    .ok()
            })
            .expect("a 2-CPU runtime with a 20 ms boot timeout, in 5 tries");
        match rt.cpu_down(1) {
            Ok(()) => {}
            Err(usmp::HotplugError::TeardownTimeout { cpu: 1, .. }) => {
                assert!(rt.wait_limbo_clear(Duration::from_secs(10)));
            }
            Err(e) => panic!("cpu_down(1): {e}"),
        }
        assert!(!rt.online_mask().contains(1));
        rt.faults().set_broken(Broken::BringupWithoutCas, broken);
        rt.faults()
            .set_boot_delay(1, Duration::from_millis(120))
            .unwrap();
        let r = rt.cpu_up(1);
        assert!(
            matches!(r, Err(usmp::HotplugError::BootTimeout { cpu: 1, .. })),
            "broken={broken}: {r:?}"
        );
        if broken {
            assert!(
                wait_until(Duration::from_secs(3), || rt.online_mask().contains(1)),
                "the broken handshake should let the timed-out CPU come online"
            );
            assert_eq!(
                rt.init_mm_refs(),
                2,
                "the half-booted CPU holds a reference"
            );
        } else {
            assert!(rt.wait_limbo_clear(Duration::from_secs(3)));
            assert!(!rt.online_mask().contains(1));
            assert_eq!(rt.init_mm_refs(), 1);
        }
        assert_eq!(rt.faults().counters().boot_delays, 1);
    }
}
