//! The job hand-off: how ordinary jobs (which may allocate and block) reach a CPU's thread,
//! and what the thread says about the job it holds.
//!
//! 1. A submitter takes the gate's lock, checks it is open, counts the job in `queued` and
//!    sends it (`Machine::queue_job`), then wakes the CPU (`idle.rs` step 2 for a job).
//! 2. The CPU's idle loop marks that it holds a job *before* it looks into the channel
//!    (`take`), so the `sched:active` teardown, which closes the gate and drains the channel,
//!    never sees it idle while it holds a job it just took.
//! 3. Around the job's own code the thread marks that it is in it; once that code has
//!    returned (or unwound) it clears the mark, then the rest of its bookkeeping, then "holds".
//!
//! The two flags differ in what they guard: `holds_job` keeps a CPU that is going down waiting
//! until its job (taken, run, accounted for) is over; `in_job_code` tells a stop that
//! interrupts the thread whether it interrupted user code, which it may not leave (so it
//! cannot power the CPU off there), or runtime code, which it may.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crossbeam_channel::{Receiver, Sender};

use super::lock::LockUnpoisoned;

/// An ordinary job queued on a CPU (may allocate and block).
pub(crate) struct Job {
    pub run: Box<dyn FnOnce() + Send + 'static>,
    /// Where the job is queued now, shared with its `JobHandle`; hotplug updates it when it
    /// moves the job off a dying CPU.
    pub at: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
}

impl Job {
    pub(crate) fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Job {
            run: Box::new(f),
            at: None,
        }
    }
}

/// One CPU's job channel, its gate, and the flags about the job its thread holds.
pub(crate) struct JobHandoff {
    /// Jobs queued and not yet taken (an RMW-read counter: a work word of `idle.rs`).
    queued: crate::sync::AtomicUsize,
    /// Open while the CPU takes jobs; submit and migration hold this lock, so a job is either
    /// queued before the gate closes (and run or moved) or refused.
    gate: Mutex<bool>,
    tx: Sender<Job>,
    rx: Receiver<Job>,
    /// Step 2: the thread has taken a job (or is about to look for one) and has not finished
    /// it; a CPU going down waits until this clears.
    holds_job: AtomicBool,
    /// Step 3: the thread is executing a job's own code right now, so a stop that interrupts
    /// it cannot power the CPU off (see `stop/receive.rs`).
    in_job_code: AtomicBool,
    /// The running job may be resumed when a park inside it is released at teardown
    /// (`fault::resume_on_release`); cleared when the job ends.
    resume_on_release: AtomicBool,
}

impl JobHandoff {
    pub(super) fn new() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        JobHandoff {
            queued: crate::sync::AtomicUsize::new(0),
            gate: Mutex::new(false),
            tx,
            rx,
            holds_job: AtomicBool::new(false),
            in_job_code: AtomicBool::new(false),
            resume_on_release: AtomicBool::new(false),
        }
    }

    /// Step 1: the gate's lock, held by a submitter across its check and its `push`.
    pub(super) fn lock_gate(&self) -> MutexGuard<'_, bool> {
        self.gate.lock_unpoisoned()
    }

    /// Opens or closes the gate (`sched:active`; the thread's `finish`).
    pub(crate) fn set_gate(&self, open: bool) {
        *self.gate.lock_unpoisoned() = open;
    }

    /// Step 1: counts and sends the job; hands it back if the channel is closed. The caller
    /// wakes the CPU.
    pub(super) fn push(&self, job: Job) -> Result<(), Job> {
        // Count before sending, so the counter never underflows when the CPU takes the job.
        self.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.tx.send(job) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(e.into_inner());
        }
        Ok(())
    }

    /// Whether a job is queued: a plain load, for the idle loop's polling.
    #[inline]
    pub(super) fn queued_hint(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > 0
    }

    /// Whether a job is queued, read with a read-modify-write (`idle.rs` step 3).
    #[inline]
    pub(super) fn queued_rmw(&self) -> bool {
        self.queued.fetch_add(0, Ordering::AcqRel) > 0
    }

    /// Step 2, on the CPU: takes its next job, marked as held before it looks.
    pub(crate) fn take(&self) -> Option<Job> {
        self.holds_job.store(true, Ordering::SeqCst);
        match self.rx.try_recv() {
            Ok(job) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Some(job)
            }
            Err(_) => {
                self.holds_job.store(false, Ordering::SeqCst);
                None
            }
        }
    }

    /// Takes a queued job without holding it (to drop it, or move it elsewhere).
    pub(crate) fn drain(&self) -> Option<Job> {
        let job = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(job)
    }

    /// Whether the thread holds a job (step 2).
    pub(crate) fn holds_job(&self) -> bool {
        self.holds_job.load(Ordering::SeqCst)
    }

    pub(crate) fn set_holds_job(&self, on: bool) {
        self.holds_job.store(on, Ordering::SeqCst);
    }

    /// Whether the thread is executing a job's own code right now (step 3). Relaxed: read on
    /// this CPU, by its own handlers. Async-signal-safe.
    #[inline]
    pub(crate) fn in_job_code(&self) -> bool {
        self.in_job_code.load(Ordering::Relaxed)
    }

    pub(crate) fn set_in_job_code(&self, on: bool) {
        self.in_job_code.store(on, Ordering::SeqCst);
    }

    /// Whether the running job may be resumed when its park is released (and cleared by it).
    pub(crate) fn resume_on_release(&self) -> bool {
        self.resume_on_release.load(Ordering::SeqCst)
    }

    pub(crate) fn set_resume_on_release(&self, on: bool) {
        self.resume_on_release.store(on, Ordering::SeqCst);
    }

    /// Before a new thread starts for the CPU: no job held or running from its previous life.
    pub(super) fn reset(&self) {
        self.in_job_code.store(false, Ordering::SeqCst);
        self.holds_job.store(false, Ordering::SeqCst);
    }
}
