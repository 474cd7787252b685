//! The bring-up handshake (the kernel's `cpuhp_ap_sync`), solving seed 003 once, in generic
//! code: after `cpu_up` returns, the CPU is either online and running or for-sure dead.
//!
//! One atomic state per CPU, moved by compare-and-swap on both sides:
//!
//! ```text
//!   controller                          AP (the new CPU's thread)
//!   1. DEAD -> KICKED, spawn thread
//!                                       2. CAS KICKED -> ALIVE   (fails: see 4)
//!   3. sees ALIVE: CAS ALIVE -> SHOULD_ONLINE (always, at once)
//!                                       5. waits for SHOULD_ONLINE; only now touches shared
//!                                          state (takes its init_mm reference), runs the
//!                                          STARTING steps, and goes ONLINE in one step
//!   4. timeout: CAS KICKED -> SHOULD_DIE
//!      - success: the AP never got past KICKED; the CPU is in limbo until the AP, on its
//!        failed step-2 CAS, exits without touching anything and stores DEAD last;
//!      - failure (the AP reached ALIVE meanwhile): go on with step 3 as if in time.
//!   6. on the way down, the AP's last act is ONLINE -> DEAD (after dropping its reference).
//! ```
//!
//! Russell King's race (the AP passes its check, the controller times out and kills it) cannot
//! happen: the controller can only give up on a CPU in KICKED, and an AP in ALIVE cannot go on
//! without the controller's SHOULD_ONLINE. A CPU in limbo cannot be brought up again until it
//! has reported DEAD (step 1 requires DEAD).

use crate::sync::{AtomicU32, Ordering};

pub(crate) const DEAD: u32 = 0;
pub(crate) const KICKED: u32 = 1;
pub(crate) const SHOULD_DIE: u32 = 2;
pub(crate) const ALIVE: u32 = 3;
pub(crate) const SHOULD_ONLINE: u32 = 4;
pub(crate) const ONLINE: u32 = 5;
/// The AP failed a STARTING step, undid the ones before it, and is leaving.
pub(crate) const FAILED: u32 = 6;
/// The AP reached its ONLINE step during a deterministic stop and parked itself instead.
pub(crate) const PARKED: u32 = 7;

/// Step 1. False if the CPU is not DEAD (e.g. in limbo).
pub(crate) fn kick(sync: &AtomicU32) -> bool {
    sync.compare_exchange(DEAD, KICKED, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Step 2 (AP). True: go on and wait for step 3. False: the controller gave up (SHOULD_DIE);
/// the AP must exit without touching shared state and call [`ap_exit`] last.
pub(crate) fn ap_alive(sync: &AtomicU32) -> bool {
    sync.compare_exchange(KICKED, ALIVE, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Step 6 (AP), the thread's very last act on every path: DEAD. Only the AP moves the state out
/// of SHOULD_DIE, ONLINE or FAILED, so a plain store cannot overwrite a controller's transition;
/// and because it is last, a controller that sees DEAD may start a new thread for the CPU.
pub(crate) fn ap_exit(sync: &AtomicU32) {
    sync.store(DEAD, Ordering::Release);
}

/// What the controller's timeout (step 4) found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// The AP had not reached ALIVE: it will die.
    WillDie,
    /// The AP reached ALIVE just in time: go on.
    Alive,
}

/// Step 4 (controller).
pub(crate) fn give_up(sync: &AtomicU32) -> GiveUp {
    match sync.compare_exchange(KICKED, SHOULD_DIE, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => GiveUp::WillDie,
        Err(_) => GiveUp::Alive,
    }
}

/// Step 3 (controller). True if the AP is now committed.
pub(crate) fn commit(sync: &AtomicU32) -> bool {
    sync.compare_exchange(ALIVE, SHOULD_ONLINE, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Step 5 (AP): whether the controller has committed it.
pub(crate) fn ap_committed(sync: &AtomicU32) -> bool {
    sync.load(Ordering::Acquire) == SHOULD_ONLINE
}

#[cfg(all(test, loom))]
mod loom_handshake {
    use super::*;
    use loom::sync::Arc;

    /// The controller's timeout racing the AP's progress. Whatever the interleaving: the AP goes
    /// online only if the controller committed it; the boot reference is taken at most once and
    /// only by a committed AP; a given-up AP ends DEAD; nothing is left half-booted.
    #[test]
    fn loom_timeout_races_ap() {
        loom::model(|| {
            let sync = Arc::new(AtomicU32::new(DEAD));
            let refs = Arc::new(AtomicU32::new(0));
            assert!(kick(&sync));
            let (s2, r2) = (sync.clone(), refs.clone());
            let ap = loom::thread::spawn(move || {
                if !ap_alive(&s2) {
                    ap_exit(&s2);
                    return false;
                }
                while !ap_committed(&s2) {
                    loom::thread::yield_now();
                }
                r2.fetch_add(1, Ordering::SeqCst);
                s2.store(ONLINE, Ordering::Release);
                true
            });
            // The controller times out at once (the worst case) unless the AP is already alive.
            let up = match give_up(&sync) {
                GiveUp::WillDie => false,
                GiveUp::Alive => {
                    assert!(commit(&sync), "an ALIVE AP must be committable");
                    true
                }
            };
            let ap_online = ap.join().unwrap();
            assert_eq!(up, ap_online, "controller and AP disagree");
            let end = sync.load(Ordering::Acquire);
            if up {
                assert_eq!(end, ONLINE);
                assert_eq!(refs.load(Ordering::SeqCst), 1);
            } else {
                assert_eq!(end, DEAD, "a given-up AP must end DEAD, not half-booted");
                assert_eq!(
                    refs.load(Ordering::SeqCst),
                    0,
                    "a given-up AP took a reference"
                );
            }
        });
    }
}
