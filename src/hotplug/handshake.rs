//! The bring-up handshake (the kernel's `cpuhp_ap_sync`), solving seed 003 once, in generic
//! code: after `cpu_up` returns, the CPU is either online and running or for-sure dead.
//!
//! One atomic state per CPU ([`Handshake`]), moved by compare-and-swap where both sides may
//! move it, by a plain store where only one side can be acting:
//!
//! ```text
//!   controller                          AP (the CPU's thread)
//!   1. DEAD -> KICKED, start (or unpark) the thread
//!                                       2. CAS KICKED -> ALIVE   (fails: see 4)
//!   3. sees ALIVE: CAS ALIVE -> SHOULD_ONLINE (always, at once)
//!                                       5. waits for SHOULD_ONLINE; only now touches shared
//!                                          state (takes its init_mm reference), runs the
//!                                          STARTING steps, and ends the boot in one store:
//!                                          ONLINE, or FAILED (a STARTING step failed and
//!                                          was undone), or PARKED (a deterministic stop is
//!                                          running: it parks instead of going online)
//!   4. timeout: CAS KICKED -> SHOULD_DIE
//!      - success: the AP never got past KICKED; the CPU is in limbo until the AP, on its
//!        failed step-2 CAS, leaves without touching anything and stores DEAD last;
//!      - failure (the AP reached ALIVE meanwhile): go on with step 3 as if in time.
//!   6. the AP's last act as this CPU, on every path (after dropping its reference): DEAD.
//!      From SHOULD_DIE, FAILED and PARKED at once; from ONLINE when it is taken down.
//! ```
//!
//! Russell King's race (the AP passes its check, the controller times out and kills it) cannot
//! happen: the controller can only give up on a CPU in KICKED, and an AP in ALIVE cannot go on
//! without the controller's SHOULD_ONLINE. A CPU in limbo cannot be brought up again until it
//! has reported DEAD (step 1 requires DEAD). Only the AP moves the word out of SHOULD_ONLINE,
//! SHOULD_DIE, ONLINE, FAILED and PARKED, so its plain stores cannot overwrite a controller's
//! transition; the loom models below check every path.
//!
//! Every transition is a method of [`Handshake`], and each one that the other side waits for
//! wakes it (futex): no caller touches the word.

#[cfg(not(loom))]
use crate::cpu::wait::{Wait, Waiter};
use crate::sync::{AtomicU32, Ordering};

/// A handshake state. `#[repr(u32)]`: the word is a futex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum HsState {
    /// No thread acts as this CPU: it may be kicked.
    Dead = 0,
    /// Step 1 done: the controller started the thread and waits for ALIVE.
    Kicked = 1,
    /// Step 4: the controller gave up on an AP that had not reached ALIVE.
    ShouldDie = 2,
    /// Step 2: the AP announced itself and waits for the commit.
    Alive = 3,
    /// Step 3: the controller committed the AP.
    ShouldOnline = 4,
    /// Step 5: the AP is online.
    Online = 5,
    /// Step 5: a STARTING step failed; the AP undid the ones before it and is leaving.
    Failed = 6,
    /// Step 5: the AP reached its ONLINE step during a deterministic stop and parked itself.
    Parked = 7,
}

impl HsState {
    fn from_word(v: u32) -> HsState {
        match v {
            0 => HsState::Dead,
            1 => HsState::Kicked,
            2 => HsState::ShouldDie,
            3 => HsState::Alive,
            4 => HsState::ShouldOnline,
            5 => HsState::Online,
            6 => HsState::Failed,
            7 => HsState::Parked,
            // Only this file stores the word, and only HsState values.
            _ => unreachable!("handshake word holds {v}"),
        }
    }
}

/// What the controller's timeout (step 4) found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// The AP had not reached ALIVE: it will die.
    WillDie,
    /// The AP reached ALIVE just in time: go on.
    Alive,
}

/// One CPU's handshake word.
#[derive(Debug)]
pub(crate) struct Handshake(AtomicU32);

impl Handshake {
    /// DEAD: no thread.
    pub(crate) fn new() -> Self {
        Handshake(AtomicU32::new(HsState::Dead as u32))
    }

    /// The current state (Acquire: what the other side did before its store is visible).
    pub(crate) fn state(&self) -> HsState {
        HsState::from_word(self.0.load(Ordering::Acquire))
    }

    fn cas(&self, from: HsState, to: HsState) -> bool {
        self.0
            .compare_exchange(from as u32, to as u32, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// A store by the side that alone may move the word now, then a wake for the other.
    fn announce(&self, to: HsState) {
        self.0.store(to as u32, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        #[cfg(not(loom))]
        crate::cpu::futex::wake(&self.0, 1);
    }

    /// Step 1 (controller). False if the CPU is not DEAD (e.g. in limbo).
    pub(crate) fn kick(&self) -> bool {
        self.cas(HsState::Dead, HsState::Kicked)
    }

    /// Step 1 undone (controller): the thread could not be started, so nothing else can have
    /// moved the word since the kick.
    pub(crate) fn unkick(&self) {
        self.announce(HsState::Dead);
    }

    /// Step 2 (AP). True: go on and wait for step 3. False: the controller gave up
    /// (SHOULD_DIE); the AP must leave without touching shared state and call [`Self::ap_exit`].
    pub(crate) fn ap_alive(&self) -> bool {
        let ok = self.cas(HsState::Kicked, HsState::Alive);
        if ok {
            self.wake();
        }
        ok
    }

    /// Step 3 (controller). True if the AP is now committed.
    pub(crate) fn commit(&self) -> bool {
        let ok = self.cas(HsState::Alive, HsState::ShouldOnline);
        if ok {
            self.wake();
        }
        ok
    }

    /// Step 4 (controller).
    pub(crate) fn give_up(&self) -> GiveUp {
        if self.cas(HsState::Kicked, HsState::ShouldDie) {
            GiveUp::WillDie
        } else {
            GiveUp::Alive
        }
    }

    /// Step 5 (AP): whether the controller has committed it.
    pub(crate) fn ap_committed(&self) -> bool {
        self.state() == HsState::ShouldOnline
    }

    /// Step 5, the end of the boot (AP): ONLINE, FAILED or PARKED.
    pub(crate) fn ap_report(&self, outcome: HsState) {
        debug_assert!(matches!(
            outcome,
            HsState::Online | HsState::Failed | HsState::Parked
        ));
        self.announce(outcome);
    }

    /// Step 6 (AP), the thread's last act as this CPU on every path: DEAD. Only the AP moves
    /// the word out of SHOULD_DIE, ONLINE, FAILED or PARKED, so a plain store cannot overwrite
    /// a controller's transition; and because it is last, a controller that sees DEAD may kick
    /// the CPU again.
    pub(crate) fn ap_exit(&self) {
        self.announce(HsState::Dead);
    }

    /// One step of `w` while the state is `seen` (spin, or sleep until a transition's wake,
    /// the nap's end or the deadline). Callers re-check the state after every step.
    #[cfg(not(loom))]
    pub(crate) fn wait_while(&self, seen: HsState, w: &mut Waiter) -> Wait {
        w.wait_on(&self.0, seen as u32)
    }

    /// Seed 003 before its fix, for `Broken::BringupWithoutCas`: the AP announces itself with
    /// a plain store, whatever the controller decided.
    pub(crate) fn broken_ap_alive(&self) {
        self.announce(HsState::Alive);
    }

    /// Seed 003 before its fix: the controller's timeout gives up with a blind store.
    pub(crate) fn broken_give_up(&self) {
        self.0.store(HsState::ShouldDie as u32, Ordering::Release);
    }
}

#[cfg(all(test, loom))]
mod loom_handshake {
    use super::*;
    use loom::sync::Arc;

    /// How the AP ends its boot once committed, in the models below.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Ends {
        Online,
        Failed,
        Parked,
    }

    /// One bring-up: the AP's thread (with `ends` as the outcome of its STARTING steps) against
    /// a controller that times out at once unless the AP is already alive (the worst case), then
    /// waits for the boot's end, and, for FAILED/PARKED, for DEAD. Returns whether the
    /// controller saw the CPU online, and the final word and reference count.
    fn one_bringup(ends: Ends) {
        let hs = Arc::new(Handshake::new());
        let refs = Arc::new(AtomicU32::new(0));
        assert!(hs.kick());
        let (h2, r2) = (hs.clone(), refs.clone());
        let ap = loom::thread::spawn(move || {
            if !h2.ap_alive() {
                h2.ap_exit();
                return None;
            }
            while !h2.ap_committed() {
                loom::thread::yield_now();
            }
            r2.fetch_add(1, Ordering::SeqCst);
            match ends {
                Ends::Online => {
                    h2.ap_report(HsState::Online);
                    Some(Ends::Online)
                }
                other => {
                    // A failed or parked AP reports, then (ap::ap_exit) drops its reference and
                    // stores DEAD last.
                    h2.ap_report(if other == Ends::Failed {
                        HsState::Failed
                    } else {
                        HsState::Parked
                    });
                    r2.fetch_sub(1, Ordering::SeqCst);
                    h2.ap_exit();
                    Some(other)
                }
            }
        });
        let committed = match hs.give_up() {
            GiveUp::WillDie => false,
            GiveUp::Alive => {
                assert!(hs.commit(), "an ALIVE AP must be committable");
                true
            }
        };
        // The controller's view of the boot's end (bringup_online): it may see FAILED or
        // PARKED, or already DEAD after them, but never a state before SHOULD_ONLINE.
        let seen = if committed {
            loop {
                match hs.state() {
                    HsState::ShouldOnline => loom::thread::yield_now(),
                    HsState::Online => break Some(Ends::Online),
                    HsState::Failed | HsState::Dead => break Some(Ends::Failed),
                    HsState::Parked => break Some(Ends::Parked),
                    s => panic!("a committed AP's word went back to {s:?}"),
                }
            }
        } else {
            None
        };
        let ap_end = ap.join().unwrap();
        match (seen, ap_end) {
            (None, None) => {}
            (Some(Ends::Failed), Some(Ends::Failed))
            | (Some(Ends::Parked), Some(Ends::Parked))
            | (Some(Ends::Online), Some(Ends::Online)) => {}
            // DEAD after PARKED is read as FAILED above; the controller's wait_dead covers it.
            (Some(Ends::Failed), Some(Ends::Parked)) => {}
            other => panic!("controller and AP disagree: {other:?}"),
        }
        let end = hs.state();
        if ap_end == Some(Ends::Online) {
            assert_eq!(end, HsState::Online);
            assert_eq!(refs.load(Ordering::SeqCst), 1);
            // Step 6 on the way down; then the CPU can be kicked again.
            hs.ap_exit();
            assert!(hs.kick(), "a DEAD CPU must be kickable");
        } else {
            assert_eq!(
                end,
                HsState::Dead,
                "a given-up/failed/parked AP must end DEAD"
            );
            assert_eq!(refs.load(Ordering::SeqCst), 0, "a reference was leaked");
            assert!(hs.kick(), "a DEAD CPU must be kickable");
        }
    }

    /// The controller's timeout racing the AP's progress, the AP going online. Whatever the
    /// interleaving: the AP goes online only if the controller committed it; the boot reference
    /// is taken at most once and only by a committed AP; a given-up AP ends DEAD.
    #[test]
    fn loom_timeout_races_ap() {
        loom::model(|| one_bringup(Ends::Online));
    }

    /// The same race, the committed AP failing a STARTING step: it ends DEAD with no
    /// reference, and the controller never sees it online.
    #[test]
    fn loom_timeout_races_failing_ap() {
        loom::model(|| one_bringup(Ends::Failed));
    }

    /// The same race, the committed AP parking itself (a deterministic stop is running).
    #[test]
    fn loom_timeout_races_parking_ap() {
        loom::model(|| one_bringup(Ends::Parked));
    }
}
