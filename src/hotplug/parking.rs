//! A CPU thread's parking word: how a CPU taken down by `cpu_down` keeps its thread for the
//! next `cpu_up`, as the kernel keeps each CPU's idle task across hotplug (`idle_threads_get`)
//! and parks its per-CPU threads (`kthread_park`). After the dying steps and its DEAD report the
//! thread sleeps on this word (offline, its queue closed, tid 0 so that nobody signals it), and
//! `cpu_up` wakes it instead of spawning one. The bring-up handshake (`handshake.rs`) is
//! unchanged (KICKED, ALIVE, commit, ONLINE), so every bring-up race stays covered.
//!
//! One word per CPU, moved by compare-and-swap:
//!
//! ```text
//!   controller                            CPU thread
//!   1. cpu_down, before take_cpu_down:
//!      CAS RUN -> KEEP (KEEP -> RUN again
//!      if take_cpu_down fails); the dying
//!      step asks the thread to leave
//!                                         2. leaving its idle loop: CAS KEEP -> PARKED, then
//!                                            DEAD in the handshake, then sleep while PARKED
//!   3. cpu_up: DEAD -> KICKED in the
//!      handshake, then CAS PARKED -> UNPARK
//!      and wake                           4. UNPARK -> RUN, boot again (handshake step 2 on)
//!   5. shutdown / kexec retire:
//!      CAS KEEP or PARKED -> END, wake    6. END (or RUN: not asked to park, powered off by a
//!                                            stop, a failed boot): the thread ends
//! ```
//!
//! The controller reads PARKED only after DEAD (which the thread stores after its CAS), so a
//! thread it sees DEAD and PARKED is asleep or about to be, and is not joined. Every change the
//! sleeper waits for is a CAS away from PARKED followed by a wake, so no wake-up is lost.

use crate::sync::{AtomicU32, Ordering};

/// One CPU's parking word (the protocol above).
#[derive(Debug)]
pub(crate) struct Parking(AtomicU32);

/// The thread runs as its CPU, and ends when the CPU goes down.
const RUN: u32 = 0;
/// `cpu_down` asks it to park instead of ending.
const KEEP: u32 = 1;
/// Parked: offline and asleep on this word.
const PARKED: u32 = 2;
/// `cpu_up` kicked it: boot again.
const UNPARK: u32 = 3;
/// End the thread (shutdown, a kexec's retire).
const END: u32 = 4;

impl Parking {
    pub(crate) fn new() -> Self {
        Parking(AtomicU32::new(RUN))
    }

    /// Step 1 (controller, under the hotplug lock, the CPU running). A CAS, not a store: an
    /// `end` that came first (shutdown closed the threads) stands, and the thread ends.
    pub(crate) fn request_keep(&self) {
        let _ = self
            .0
            .compare_exchange(RUN, KEEP, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Step 1 undone (controller): `take_cpu_down` failed and the CPU stays online, so a later
    /// exit (shutdown) ends its thread. An `end` that came meanwhile stands.
    pub(crate) fn cancel_keep(&self) {
        let _ = self
            .0
            .compare_exchange(KEEP, RUN, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Step 2 (thread): true if it must park.
    pub(crate) fn begin_park(&self) -> bool {
        self.0
            .compare_exchange(KEEP, PARKED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether the thread parked (controller, after it reported DEAD).
    pub(crate) fn is_parked(&self) -> bool {
        self.0.load(Ordering::Acquire) == PARKED
    }

    /// Step 3 (controller, after the kick): true if a parked thread was woken to boot.
    pub(crate) fn unpark(&self) -> bool {
        let ok = self
            .0
            .compare_exchange(PARKED, UNPARK, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if ok {
            self.wake();
        }
        ok
    }

    /// Step 5: a thread asked to park, or parked, ends instead.
    pub(crate) fn end(&self) {
        for from in [KEEP, PARKED] {
            if self
                .0
                .compare_exchange(from, END, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.wake();
                return;
            }
        }
    }

    /// Step 4/6 (thread, parked): polls for `poll` (yielding its core to any other runnable
    /// thread), then sleeps until unparked (true) or ended (false). Unbounded by design: an
    /// offline CPU waits for `cpu_up`, a shutdown or a kexec, as long as that takes.
    pub(crate) fn wait(&self, poll: std::time::Duration) -> bool {
        #[cfg(not(loom))]
        let mut w = crate::cpu::wait::Waiter::new(
            // Forever: a parked thread waits for `unpark` or `end`, and both wake it.
            crate::cpu::wait::Deadline::forever(),
            crate::cpu::wait::Policy::spin(poll).yielding(),
        );
        #[cfg(loom)]
        let _ = poll;
        loop {
            match self.0.load(Ordering::Acquire) {
                UNPARK => {
                    self.0.store(RUN, Ordering::Release);
                    return true;
                }
                END => return false,
                #[cfg(not(loom))]
                v => {
                    let _ = w.wait_on(&self.0, v);
                }
                #[cfg(loom)]
                _ => loom::thread::yield_now(),
            }
        }
    }
}

impl Parking {
    fn wake(&self) {
        #[cfg(not(loom))]
        crate::cpu::futex::wake(&self.0, 1);
    }
}

#[cfg(all(test, loom))]
mod loom_parking {
    use super::*;
    use loom::sync::Arc;

    /// cpu_down asks the thread to park; its parking, cpu_up (unpark) and shutdown (end) race.
    /// Whatever the interleaving: the thread either boots again (only if unpark won) or ends
    /// (only if end won, before or after it parked); it never sleeps on after either, and both
    /// cannot win.
    #[test]
    fn loom_unpark_races_end() {
        loom::model(|| {
            let p = Arc::new(Parking::new());
            p.request_keep();
            let p2 = p.clone();
            let thread = loom::thread::spawn(move || {
                // An end that came first (KEEP -> END) means: do not park, end.
                p2.begin_park() && p2.wait(std::time::Duration::ZERO)
            });
            let p3 = p.clone();
            let ender = loom::thread::spawn(move || p3.end());
            // The controller's cpu_up: unpark succeeds only once the thread is PARKED and the
            // end has not won; a failed unpark spawns a new thread instead.
            let unparked = loop {
                if p.unpark() {
                    break true;
                }
                if p.0.load(Ordering::Acquire) == END {
                    break false;
                }
                loom::thread::yield_now();
            };
            ender.join().unwrap();
            let booted = thread.join().unwrap();
            assert_eq!(booted, unparked, "the thread and the controller disagree");
        });
    }

    /// cpu_down's keep and its undo (a failed take_cpu_down: the CPU stays online) race
    /// shutdown's `end`: whichever wins, the thread, which stays online, must end when a later
    /// exit makes it leave, never park where no cpu_up will wake it.
    #[test]
    fn loom_keep_and_its_undo_race_end() {
        loom::model(|| {
            let p = Arc::new(Parking::new());
            let p2 = p.clone();
            let ender = loom::thread::spawn(move || p2.end());
            p.request_keep();
            p.cancel_keep();
            ender.join().unwrap();
            assert!(
                !p.begin_park(),
                "a thread parked after shutdown or an undone keep"
            );
            assert!(!p.unpark());
        });
    }

    /// A thread not asked to park (RUN: a failed boot, a kexec shutdown) never parks.
    #[test]
    fn loom_unasked_thread_does_not_park() {
        loom::model(|| {
            let p = Parking::new();
            assert!(!p.begin_park());
            p.end();
            assert!(!p.unpark());
        });
    }
}
