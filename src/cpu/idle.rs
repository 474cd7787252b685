//! The idle loop's sleep and the doorbell decision (the kernel's `TIF_POLLING_NRFLAG` trick).
//!
//! Protocol (sender S publishes work for CPU C; C goes idle):
//! 1. S publishes with an RMW on the work word (queue push, job count, `exit_req`).
//! 2. S reads C's idle word with an RMW (`fetch_or(0)`) and acts on it:
//!    POLLING  -> nothing: C is spinning on its queue and will see the work;
//!    SLEEPING -> CAS SLEEPING -> WAKING and futex-wake C (one waker wins);
//!    WAKING   -> nothing: another sender is waking C;
//!    RUNNING  -> ring the doorbell signal, unless `kick_pending` says one is in flight.
//! 3. C announces POLLING, then SLEEPING, with `swap`, and after announcing SLEEPING re-checks
//!    every work word with an RMW read before it sleeps.
//! 4. C leaves POLLING, SLEEPING or WAKING for RUNNING with `swap` (`enter_running`), and when
//!    the old state was not RUNNING it re-checks its call queue and vectors with an RMW read and
//!    serves them *before* it starts anything that may take long (a job). A sender that saw
//!    POLLING, SLEEPING or WAKING rang no doorbell, so without this step a call queued while a
//!    job's futex wake was in flight would wait for the whole job (issue 8: a 300 ms job delayed
//!    an async call and a stop_machine by 300 ms).
//!
//! Every access the argument needs is an RMW. C also reads its own word with two plain loads
//! that only save work (the poll loop skips re-announcing POLLING when it already is; the sleep
//! loop leaves early when a sender has moved it to WAKING); each is followed by an RMW before C
//! decides anything. So either S's step-2 read comes after C's SLEEPING swap (S wakes C) or
//! C's step-3 re-check comes after S's publication (C does not sleep): no lost wake-up. And
//! either S's step-2 read comes after C's RUNNING swap (S rings the doorbell) or it comes before,
//! and then C's step-4 re-check sees S's publication: no call waits behind a job. RMWs are used
//! instead of SeqCst loads because RMW chains are what the loom model checks exactly.

use std::time::Duration;

#[cfg(not(loom))]
use super::wait::{Deadline, Policy, Waiter};
use crate::sync::{AtomicBool, AtomicU32, Ordering};

/// The CPU is running (a job, a callback, or its loop): it needs a signal to notice an IPI.
pub(crate) const RUNNING: u32 = 0;
/// The CPU is spinning on its queue: it needs nothing.
pub(crate) const POLLING: u32 = 1;
/// The CPU is asleep on the idle futex.
pub(crate) const SLEEPING: u32 = 2;
/// A sender won the right to wake it.
pub(crate) const WAKING: u32 = 3;

/// What step 2 decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kick {
    /// Nothing to do (polling, or someone else is waking it).
    None,
    /// Futex-wake the idle word.
    Wake,
    /// Ring the doorbell signal.
    Signal,
    /// A doorbell is already in flight.
    Coalesced,
}

/// One CPU's idle word, also its idle futex word. The protocol above is its only interface:
/// the word is private to this file, so no other file can store into it.
pub(crate) struct IdleWord(AtomicU32);

impl IdleWord {
    pub(crate) fn new() -> Self {
        IdleWord(AtomicU32::new(RUNNING))
    }

    /// Step 2 for a call queued on the CPU. Async-signal-safe.
    #[inline]
    pub(crate) fn kick_for_call(&self, kick_pending: &AtomicBool) -> Kick {
        match self.0.fetch_or(0, Ordering::AcqRel) {
            POLLING | WAKING => Kick::None,
            SLEEPING => self.wake_decision(),
            _ => {
                if kick_pending.swap(true, Ordering::AcqRel) {
                    Kick::Coalesced
                } else {
                    Kick::Signal
                }
            }
        }
    }

    /// Step 2 for a job or an exit request: a running CPU checks its job queue between jobs,
    /// so only a sleeper needs waking.
    #[inline]
    fn kick_for_job(&self) -> Kick {
        match self.0.fetch_or(0, Ordering::AcqRel) {
            SLEEPING => self.wake_decision(),
            _ => Kick::None,
        }
    }

    fn wake_decision(&self) -> Kick {
        if self
            .0
            .compare_exchange(SLEEPING, WAKING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            Kick::Wake
        } else {
            Kick::None
        }
    }

    /// Step 4: the CPU is about to run something (a job, its loop). Returns whether it left an
    /// idle state, in which case the caller must re-check the call queue (RMW) before anything
    /// long.
    #[inline]
    pub(crate) fn enter_running(&self) -> bool {
        self.0.swap(RUNNING, Ordering::AcqRel) != RUNNING
    }
}

#[cfg(not(loom))]
impl IdleWord {
    /// Step 2 for a job or an exit request, and the futex wake it may call for.
    /// Async-signal-safe.
    #[inline]
    pub(crate) fn wake_for_job(&self) {
        if self.kick_for_job() == Kick::Wake {
            self.wake();
        }
    }

    /// The futex wake a `Kick::Wake` decision calls for. Async-signal-safe.
    #[inline]
    pub(crate) fn wake(&self) {
        super::futex::wake(&self.0, 1);
    }

    /// The state's name, for a diagnostic (an RMW read, like every access to the word).
    pub(crate) fn state_name(&self) -> &'static str {
        match self.0.fetch_or(0, Ordering::AcqRel) {
            RUNNING => "running",
            POLLING => "polling",
            SLEEPING => "sleeping",
            WAKING => "waking",
            _ => "?",
        }
    }

    /// Forces RUNNING with a swap, outside the idle loop: before a new thread starts for the
    /// CPU, and when a stop powers it off (a restarted futex wait must see the word change).
    pub(crate) fn reset_running(&self) {
        self.0.swap(RUNNING, Ordering::AcqRel);
    }

    /// Step 3, on the idle CPU: waits until `has_work` may be true. `peek` is a cheap unordered
    /// check for the poll phase; `has_work` must use RMW reads. The final sleep is unbounded by
    /// design: it ends only when a sender wakes the CPU (step 2) or a signal arrives, which is what
    /// "idle" means; the loom model `loom_no_lost_wakeup` shows a sender always wakes it.
    ///
    /// Returns with the CPU still POLLING (a poll hit) or RUNNING (after a sleep); either way the
    /// caller owes step 4 before it runs a job.
    pub(crate) fn wait_for_work(
        &self,
        policy: IdlePolicy,
        peek: impl Fn() -> bool,
        has_work: impl Fn() -> bool,
        on_poll_hit: impl Fn(),
        on_sleep: impl Fn(),
    ) {
        let idle = &self.0;
        let window = policy.poll_window();
        // Yielding every 64 hints gives the core to another runnable thread, if any: with more
        // threads than cores a poller would otherwise hold a core that its sender or a hotplug
        // controller needs (this halves cpu_down with polling idle CPUs). With no other runnable
        // thread the yield returns at once and polling goes on. Deadline: forever (see above).
        let mut w = Waiter::new(Deadline::forever(), Policy::spin(window).yielding());
        if !window.is_zero() {
            // Back from a poll hit the word is still POLLING (only this CPU moves it away from
            // POLLING): re-announcing it would pull the line that every sender RMW-reads.
            if idle.load(Ordering::Relaxed) != POLLING {
                idle.swap(POLLING, Ordering::AcqRel);
            }
            loop {
                if peek() {
                    // Stay POLLING: the loop serves the queue and comes back here, so a sender
                    // that pushes meanwhile needs no signal. Running a job switches to RUNNING
                    // first (see `thread.rs`).
                    on_poll_hit();
                    return;
                }
                if !w.spin() {
                    break;
                }
            }
        }
        idle.swap(SLEEPING, Ordering::AcqRel);
        on_sleep();
        while !has_work() {
            if idle.load(Ordering::Acquire) != SLEEPING {
                break; // a sender moved us to WAKING
            }
            // The deadline is forever: the step never times out.
            let _ = w.sleep_on(idle, SLEEPING);
        }
        idle.swap(RUNNING, Ordering::AcqRel);
    }
}

/// How an idle CPU waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin on the queue for this long (IPIs arrive with no signal), then sleep.
    PollThenSleep(Duration),
    /// Sleep at once; every IPI to an idle CPU costs a wake-up.
    SleepOnly,
}

impl IdlePolicy {
    /// How long an idle CPU polls before it sleeps (zero for `SleepOnly`); a parked CPU thread
    /// polls as long (`hotplug/parking.rs`).
    pub(crate) fn poll_window(self) -> Duration {
        match self {
            IdlePolicy::PollThenSleep(window) => window,
            IdlePolicy::SleepOnly => Duration::ZERO,
        }
    }
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy::PollThenSleep(Duration::from_micros(50))
    }
}

#[cfg(all(test, loom))]
mod loom_idle {
    use super::*;
    use crate::cpu::call_queue::{CallQueue, Links, EMPTY};
    use crate::sync::AtomicUsize;
    use loom::sync::Arc;

    struct One(AtomicU32);
    impl Links for One {
        fn next(&self, _: u32) -> &AtomicU32 {
            &self.0
        }
    }

    /// Queue + doorbell + idle sleep: a sender pushing while the CPU goes to sleep never leaves
    /// the CPU asleep with work queued and nobody waking it.
    #[test]
    fn loom_no_lost_wakeup() {
        loom::model(|| {
            let q = Arc::new(CallQueue::new_open());
            let idle = Arc::new(IdleWord(AtomicU32::new(RUNNING)));
            let kick = Arc::new(AtomicBool::new(false));
            let l = Arc::new(One(AtomicU32::new(EMPTY)));
            let (q2, i2, k2, l2) = (q.clone(), idle.clone(), kick.clone(), l.clone());
            let sender = loom::thread::spawn(move || {
                q2.push(0, &*l2).unwrap();
                i2.kick_for_call(&k2)
            });
            // The CPU: poll briefly, then announce sleep and re-check.
            idle.0.swap(POLLING, Ordering::AcqRel);
            let saw_in_poll = q.has_work();
            let mut slept = false;
            if !saw_in_poll {
                idle.0.swap(SLEEPING, Ordering::AcqRel);
                slept = !q.has_work();
            }
            let k = sender.join().unwrap();
            if slept {
                assert_eq!(
                    k,
                    Kick::Wake,
                    "CPU slept with work queued and was not woken"
                );
            }
        });
    }

    /// The wake-for-a-job path (issue 8): a CPU sleeps; one sender queues a job and wakes it
    /// (SLEEPING -> WAKING); another queues a call and may see WAKING, so it rings nothing.
    /// When the CPU is about to start the job it must have served the call (step 4), or the
    /// call's sender must ring the doorbell. Without step 4 the call waits for the whole job.
    #[test]
    fn loom_call_not_stuck_behind_woken_job() {
        loom::model(|| {
            let q = Arc::new(CallQueue::new_open());
            let idle = Arc::new(IdleWord(AtomicU32::new(RUNNING)));
            let kick = Arc::new(AtomicBool::new(false));
            let jobs = Arc::new(AtomicUsize::new(0));
            let l = Arc::new(One(AtomicU32::new(EMPTY)));
            let (i1, j1) = (idle.clone(), jobs.clone());
            let mut job_sender = Some(loom::thread::spawn(move || {
                j1.fetch_add(1, Ordering::AcqRel);
                i1.kick_for_job()
            }));
            let (q2, i2, k2, l2) = (q.clone(), idle.clone(), kick.clone(), l.clone());
            let mut call_sender = Some(loom::thread::spawn(move || {
                q2.push(0, &*l2).unwrap();
                i2.kick_for_call(&k2)
            }));
            // The CPU: announce SLEEPING and re-check (step 3).
            idle.0.swap(SLEEPING, Ordering::AcqRel);
            let has_work = jobs.fetch_add(0, Ordering::AcqRel) > 0 || q.has_work();
            let mut call_kick = None;
            if !has_work {
                // It sleeps until a sender moves the word; the job's sender always runs (it is
                // the one whose wake the bug was about), the call's only if still needed.
                job_sender.take().unwrap().join().unwrap();
                if idle.0.load(Ordering::Acquire) == SLEEPING {
                    call_kick = Some(call_sender.take().unwrap().join().unwrap());
                    assert_ne!(idle.0.load(Ordering::Acquire), SLEEPING, "lost wake-up");
                }
            }
            // Step 4, then the job would start.
            let served = idle.enter_running() && q.has_work();
            // A call that is queued now and was not served must get a doorbell.
            let pending = q.has_work() && !served;
            if let Some(j) = job_sender {
                j.join().unwrap();
            }
            let ck = match call_kick {
                Some(k) => k,
                None => call_sender.take().unwrap().join().unwrap(),
            };
            if pending {
                assert_eq!(
                    ck,
                    Kick::Signal,
                    "a call queued before the job started got no doorbell and was not served"
                );
            }
        });
    }
}
