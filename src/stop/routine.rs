//! The common stop / crash-stop routine behind [`Handle::send_stop`](crate::Handle::send_stop)
//! and [`Handle::crash_stop`](crate::Handle::crash_stop) (seeds 000 and 001: one routine, small
//! backend hooks, retries that tell the backend the attempt number, and a deterministic catch of
//! starting CPUs).
//!
//! Protocol:
//! 1. Coordination (`coord.rs`): the first caller wins; a crash-stop upgrades a running plain
//!    stop; a losing caller that is a logical CPU parks itself, one outside the runtime gets
//!    `StopError::InProgress`.
//! 2. The winner raises the runtime's "stopping" flag (checked by a CPU at its ONLINE step in
//!    `StopMode::Deterministic`) and prints "SMP: stopping secondary CPUs".
//! 3. Up to `max_retries` attempts, each: re-read the online mask (so CPUs that came online
//!    since are included), call the backend with the attempt number (`crash_call` once the
//!    stop is a crash), and wait until every targeted CPU has left the online mask, up to the
//!    attempt's timeout (1 s for the first, 10 ms for NMI attempts, as x86 and arm64; or
//!    forever). Before a retry: "SMP: retry stop with NMI for CPUs 2-3".
//! 4. CPUs still online: "SMP: failed to stop secondary CPUs 3". Then the backend's
//!    `stop_complete`/`crash_complete`, and a typed outcome.
//!
//! The flag and the online mask are both accessed SeqCst, so a CPU that sets its online bit
//! and then reads the flag, and a stop that sets the flag and then reads the online mask,
//! cannot both miss each other: in deterministic mode every CPU is either targeted or parks
//! itself at its ONLINE step.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::backend::{StopBackend, StopSender};
use super::coord::{Coord, Entered};
use super::receive::{self, ParkPolicy};
use crate::cpu::clock::now_ns;
use crate::cpu::mask::{CpuId, CpuMask};
use crate::cpu::wait::{Deadline, Policy, Waiter};
use crate::ipi::signal::SavedRegs;

use super::layer::StopLayer;

/// How CPUs that come online during a stop are caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum StopMode {
    /// Each attempt re-reads the online mask; a CPU that comes online after the last attempt
    /// escapes (the seed-000 retry logic).
    #[default]
    BestEffort,
    /// Also a "stopping" flag checked at the ONLINE step: such a CPU parks itself instead.
    Deterministic,
}

/// Retry and wait settings (`smp_stop_set_max_retries`, `wait_timeout`, `wait_forever`).
#[derive(Debug, Clone)]
pub struct StopConfig {
    /// Attempts at most (default 3).
    pub max_retries: u32,
    /// Wait after the first attempt (default 1 s).
    pub first_wait: Duration,
    /// Wait after each later (NMI) attempt (default 10 ms).
    pub nmi_wait: Duration,
    /// Wait forever for each attempt instead.
    pub wait_forever: bool,
    /// Best-effort or deterministic catching of starting CPUs.
    pub mode: StopMode,
    /// The backend (default: maskable IPI, then NMI).
    pub backend: Arc<dyn StopBackend>,
}

impl Default for StopConfig {
    fn default() -> Self {
        StopConfig {
            max_retries: 3,
            first_wait: Duration::from_secs(1),
            nmi_wait: Duration::from_millis(10),
            wait_forever: false,
            mode: StopMode::BestEffort,
            backend: Arc::new(super::backend::DefaultBackend),
        }
    }
}

/// Per-runtime stop state.
pub(crate) struct StopState {
    pub(super) coord: Coord,
    /// Serializes `stop_machine` (the kernel's `stop_cpus_mutex`): two at once would each hold
    /// some CPUs in PREPARE while waiting for the others, and both would time out.
    pub(super) machine: std::sync::Mutex<()>,
    /// The winner has finished its attempts (the kernel's `cpus_stopped`).
    pub(super) done: std::sync::atomic::AtomicBool,
    /// Acknowledgements the winner still waits for in this attempt (targets minus acks; a
    /// CPU that parks without being targeted may take it below zero, which only costs a
    /// spurious wake-up). The futex word of the winner's wait (step 3).
    pub(super) pending: std::sync::atomic::AtomicU32,
    /// 0 until the winner has finished (then 1, for good): the futex word powered-off CPUs
    /// wait on before their thread's teardown (see `wait_for_stop_done`).
    pub(super) done_word: std::sync::atomic::AtomicU32,
    /// A crash kexec holds the teardown of powered-off CPUs until the next image is online
    /// (`hold_teardown`): `finish` then leaves `done_word` at 0 and `release_teardown` sets it.
    pub(super) teardown_held: std::sync::atomic::AtomicBool,
}

impl StopState {
    pub(crate) fn new() -> Self {
        StopState {
            coord: Coord::new(),
            machine: std::sync::Mutex::new(()),
            done: std::sync::atomic::AtomicBool::new(false),
            pending: std::sync::atomic::AtomicU32::new(0),
            done_word: std::sync::atomic::AtomicU32::new(0),
            teardown_held: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A stopped CPU has acknowledged (left the online mask; the caller did that first, SeqCst).
    /// Wakes the winner when it was the last one it waited for. Async-signal-safe.
    pub(crate) fn ack(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) as i32 <= 1 {
            crate::cpu::futex::wake(&self.pending, 1);
        }
    }

    /// Called by a powered-off CPU's thread before its teardown: waits until the stop that
    /// powered it off has finished, at most `STOP_DONE_WAIT`. The teardown (unmapping the
    /// signal stack, the thread's exit) takes the process's mmap lock and flushes the TLB of
    /// every core; hundreds of CPUs doing it while the stop still wakes the others made the
    /// stop itself slower by about 30 us per CPU (profile of send_stop at 256 CPUs:
    /// `rwsem_down_write_slowpath`, `smp_call_function_many_cond`, `native_write_msr`). The
    /// bound keeps a thread from lingering if the stop takes long (an unresponsive CPU holds
    /// it for its first-attempt wait). While a crash kexec holds the teardown the bound is
    /// `HELD_TEARDOWN_WAIT` instead (a safety net: the kexec path releases it in every case).
    pub(crate) fn wait_for_stop_done(&self) {
        let start = now_ns();
        let mut w = Waiter::new(Deadline::forever(), Policy::SLEEP);
        while self.done_word.load(Ordering::Acquire) == 0 {
            // The bound follows a hold taken or released meanwhile, counted from the start.
            let bound = if self.teardown_held.load(Ordering::SeqCst) {
                HELD_TEARDOWN_WAIT
            } else {
                STOP_DONE_WAIT
            };
            *w.deadline() = Deadline::at_ns(start.saturating_add(bound.as_nanos() as u64));
            if w.sleep_on(&self.done_word, 0).timed_out() {
                return;
            }
        }
        // Pass the wake-up on (see `finish`).
        crate::cpu::futex::wake(&self.done_word, 1);
    }

    /// The winner is done: powered-off CPUs may tear down. It wakes only one of them, which
    /// wakes the next before its own teardown, and so on: waking all at once cost the winner
    /// a syscall that woke hundreds of threads, which then preempted it with their teardown
    /// before `send_stop` could return (about 1 ms at 256 CPUs, 50-100 us at 4).
    fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        if !self.teardown_held.load(Ordering::SeqCst) {
            self.open_teardown();
        }
    }

    /// Before a crash kexec's stop: powered-off CPUs keep their threads (asleep) until
    /// `release_teardown`. 1023 threads tearing down (unmapping stacks: the mmap lock and a
    /// TLB flush of every core each) while the next image started its 1024 made that image's
    /// bring-up 190-330 ms instead of 60-100 ms on 2 cores.
    pub(crate) fn hold_teardown(&self) {
        self.teardown_held.store(true, Ordering::SeqCst);
    }

    /// Ends `hold_teardown`; if the stop has finished, its powered-off CPUs tear down now.
    /// Idempotent. SeqCst against `finish`: of the two, at least one opens the word.
    pub(crate) fn release_teardown(&self) {
        self.teardown_held.store(false, Ordering::SeqCst);
        if self.done.load(Ordering::SeqCst) {
            self.open_teardown();
        }
    }

    /// Lets the powered-off CPUs tear down: wakes one, which wakes the next (see `finish`).
    fn open_teardown(&self) {
        self.done_word.store(1, Ordering::Release);
        crate::cpu::futex::wake(&self.done_word, 1);
    }
}

/// How long a powered-off CPU's thread waits for the stop to finish before its teardown.
const STOP_DONE_WAIT: Duration = Duration::from_millis(50);

/// The same while a crash kexec holds the teardown (`hold_teardown`): longer than the next
/// image's bring-up of 1024 CPUs on a loaded 2-core host, short enough that a thread does not
/// linger for good if a release were ever missed.
const HELD_TEARDOWN_WAIT: Duration = Duration::from_secs(5);

/// The winner's longest nap between two looks at the online mask (step 3): a bound in case an
/// acknowledgement's wake-up was spent on a spurious one.
const ACK_NAP: Duration = Duration::from_millis(1);

/// How often the stopper polls the online mask while `pending` cannot tell it (step 3 of
/// `smp_stop_call`).
const ACK_POLL: Duration = Duration::from_micros(20);

/// One attempt of the retry loop.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    /// 1-based.
    pub attempt: u32,
    /// Whether the backend's crash hook was used.
    pub crash: bool,
    /// CPUs targeted (online at the start of the attempt, minus the caller).
    pub targeted: CpuMask,
    /// Targeted CPUs still online when the attempt's wait ended.
    pub remaining: CpuMask,
    /// Stop signals sent again because the CPU was inside the C library when one arrived and
    /// declined to park there (it could have held a malloc or loader lock for good).
    pub deferred: u32,
    /// How long the attempt took, in microseconds.
    pub took_us: u64,
}

/// A stopped CPU's crash note.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CrashNote {
    /// The stopped CPU.
    pub cpu: CpuId,
    /// Its registers as saved when it stopped.
    pub regs: SavedRegs,
}

/// What a stop did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StopOutcome {
    /// Whether it ended as a crash-stop (it was one, or was upgraded).
    pub crash: bool,
    /// CPUs stopped by this routine (they left the online mask).
    pub stopped: CpuMask,
    /// CPUs still online after the last attempt (the caller excluded).
    pub failed: CpuMask,
    /// The attempts, in order.
    pub attempts: Vec<Attempt>,
    /// Registers saved by crash-stopped CPUs.
    pub notes: Vec<CrashNote>,
    /// The caller, if it is a logical CPU (it keeps running).
    pub caller: Option<CpuId>,
    /// When some CPU failed to stop: the runtime's signals (IPI, NMI) whose handler was no
    /// longer usmp's, because another library replaced it after `build()`. Empty otherwise.
    pub replaced_signals: Vec<i32>,
}

/// Why a stop call did not run the stop.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StopError {
    /// Another caller is running the stop (this caller is not a CPU, so it does not park).
    #[error("SMP stop already in progress{}", if *upgraded { " (upgraded to a crash-stop)" } else { "" })]
    InProgress {
        /// Whether this call upgraded the running stop to a crash-stop.
        upgraded: bool,
    },
    /// The runtime has shut down (its `Runtime` was dropped or `shutdown()` called): a
    /// `Handle` that outlived it reaches no CPU and brings none up.
    #[error("SMP stop: the runtime has shut down")]
    ShutDown,
    /// This process is a `fork()` child of the one that built the runtime: it has none of the
    /// runtime's CPU threads, so nothing can run on them here.
    #[error("SMP stop: the runtime was built by process {builder_pid}; this is its fork() child {pid}, which has no CPU threads")]
    Forked {
        /// The process that built the runtime.
        builder_pid: u32,
        /// This process.
        pid: u32,
    },
}

impl StopLayer {
    /// Implements [`Handle::send_stop`](crate::Handle::send_stop).
    pub(crate) fn send_stop(&self) -> Result<StopOutcome, StopError> {
        self.smp_stop(false)
    }

    /// Implements [`Handle::crash_stop`](crate::Handle::crash_stop).
    pub(crate) fn crash_stop(&self) -> Result<StopOutcome, StopError> {
        self.smp_stop(true)
    }

    /// For a crash-kexec after a panic that already stopped the CPUs (the kernel's
    /// `cpus_stopped` guard): the outcome as the CPUs stand, without stopping again. `None` if
    /// no stop has finished in this image.
    pub(crate) fn stop_outcome_so_far(&self) -> Option<StopOutcome> {
        let s = self;
        if !s.stop.done.load(Ordering::SeqCst) {
            return None;
        }
        let me = s.machine().this_cpu_here();
        let stopped: CpuMask = (0..self.machine().cpus().len())
            .filter(|&c| s.machine().cpus()[c].is_stopped())
            .collect();
        let mut failed = s.machine().online().load();
        if let Some(me) = me {
            failed.clear(me);
        }
        Some(StopOutcome {
            crash: s.stop.coord.is_crash(),
            notes: stopped.iter().filter_map(|c| self.crash_note(c)).collect(),
            stopped,
            failed,
            attempts: Vec::new(),
            caller: me,
            replaced_signals: Vec::new(),
        })
    }

    /// Implements [`Handle::stop_in_progress`](crate::Handle::stop_in_progress).
    pub(crate) fn stop_in_progress(&self) -> bool {
        self.stop.coord.in_progress()
    }

    /// Implements [`Handle::crash_note`](crate::Handle::crash_note).
    pub(crate) fn crash_note(&self, cpu: CpuId) -> Option<CrashNote> {
        self.machine().cpu(cpu)?;
        let regs = self.stop_cpu(cpu).crash_regs()?;
        Some(CrashNote { cpu, regs })
    }

    /// Implements [`Handle::park_policy`](crate::Handle::park_policy).
    pub(crate) fn park_policy(&self) -> ParkPolicy {
        self.park
    }

    fn smp_stop(&self, crash: bool) -> Result<StopOutcome, StopError> {
        let s = self;
        let me = s.machine().this_cpu_here();
        // A CPU caller in a job: from here until it parks itself, a stop that parks it has
        // interrupted runtime code, which the teardown may resume (percpu.rs step 4). The
        // flag comes before the job's own `fault::resume_on_release` is cleared, so no
        // instant is covered by neither; from here the stop call's rule applies.
        let in_call = me.filter(|&c| {
            s.machine().cpus()[c].jobs().in_job_code() && s.ipi().ipi_cpu(c).handlers_active() == 0
        });
        if let Some(c) = in_call {
            if !s
                .machine()
                .faults()
                .is_broken(crate::inject::Broken::StopCallerStranded)
            {
                s.stop_cpu(c).set_in_stop_call(true);
            }
            s.machine().cpus()[c].jobs().set_resume_on_release(false);
            // The host may take the caller off its core here, and another caller's stop may
            // then catch it before it parks itself (the case step 4 of percpu.rs is for).
            s.machine().faults().stop_call_delay();
        }
        let out = self.smp_stop_call(me, crash);
        if let Some(c) = in_call {
            s.stop_cpu(c).set_in_stop_call(false);
        }
        out
    }

    fn smp_stop_call(&self, me: Option<CpuId>, crash: bool) -> Result<StopOutcome, StopError> {
        let s = self;
        // Step 1.
        match s.stop.coord.enter(crash) {
            Entered::Winner => {}
            Entered::Loser { upgraded } => {
                if upgraded {
                    // A CPU loser may be in IPI context: record, the logger prints it.
                    match me {
                        Some(_) => s.machine().ring_here().record(
                            crate::cpu::events::EventKind::StopUpgraded,
                            0,
                            0,
                        ),
                        None => tracing::warn!("SMP: stop upgraded to a crash-stop"),
                    }
                }
                if let Some(me) = me {
                    self.park_self(me);
                }
                return Err(StopError::InProgress { upgraded });
            }
        }
        // Step 2.
        s.stopping.store(true, Ordering::SeqCst);
        tracing::warn!("SMP: stopping secondary CPUs");
        let cfg = &s.config;
        let send = StopSender { ipi: s.ipi() };
        let mut attempts = Vec::new();
        let mut stopped = CpuMask::new();
        // Step 3.
        let attempts_max = if s
            .machine()
            .faults()
            .is_broken(crate::inject::Broken::StopWithoutRetries)
        {
            1
        } else {
            cfg.max_retries.max(1)
        };
        for attempt in 1..=attempts_max {
            let mut mask = s.machine().online().load();
            if let Some(me) = me {
                mask.clear(me);
            }
            if mask.is_empty() {
                break;
            }
            let crash_now = s.stop.coord.is_crash();
            if attempt > 1 {
                tracing::warn!("SMP: retry stop with NMI for CPUs {mask}");
            }
            let t0 = now_ns();
            // Before the first stop is sent: each acknowledgement counts down from here.
            s.stop.pending.store(mask.weight() as u32, Ordering::SeqCst);
            if crash_now {
                cfg.backend.crash_call(&send, &mask, attempt);
            } else {
                cfg.backend.stop_call(&send, &mask, attempt);
            }
            let wait = if attempt == 1 {
                cfg.first_wait
            } else {
                cfg.nmi_wait
            };
            // Sleep until the last acknowledgement wakes us (`StopState::ack`), re-checking
            // the mask at least every `ACK_NAP`. Reading `pending` before the mask: an ack
            // after that read changes the futex word, so the wait returns at once. Forever
            // only when the configuration asks for it (`wait_forever`).
            let mut w = Waiter::new(
                if cfg.wait_forever {
                    Deadline::forever()
                } else {
                    Deadline::at_ns(t0.saturating_add(wait.as_nanos() as u64))
                },
                Policy::SLEEP,
            );
            let mut deferred = 0u32;
            let remaining = loop {
                let p = s.stop.pending.load(Ordering::SeqCst);
                let left = mask.and(&s.machine().online().load());
                if left.is_empty() {
                    break left;
                }
                // CPUs that declined because they were inside the C library (parkable.rs
                // step 3): send again by this attempt's means, and look again soon.
                let again: CpuMask = left
                    .iter()
                    .filter(|&c| s.stop_cpu(c).take_deferred())
                    .collect();
                if !again.is_empty() {
                    deferred += again.weight() as u32;
                    if crash_now {
                        cfg.backend.crash_call(&send, &again, attempt);
                    } else {
                        cfg.backend.stop_call(&send, &again, attempt);
                    }
                }
                let step = if p as i32 > 0 {
                    w.set_nap(Some(if deferred > 0 {
                        super::parkable::DEFER_POLL
                    } else {
                        ACK_NAP
                    }));
                    w.sleep_on(&s.stop.pending, p)
                } else {
                    // Counted down by CPUs that were not targeted: the word no longer tells
                    // when the mask empties, so poll it.
                    w.set_nap(Some(ACK_POLL));
                    w.snooze()
                };
                if step.timed_out() {
                    break left;
                }
            };
            stopped = stopped.or(&mask.and_not(&remaining));
            attempts.push(Attempt {
                attempt,
                crash: crash_now,
                targeted: mask,
                remaining,
                deferred,
                took_us: now_ns().saturating_sub(t0) / 1_000,
            });
        }
        // Step 4.
        let mut failed = s.machine().online().load();
        if let Some(me) = me {
            failed.clear(me);
        }
        let mut replaced_signals = Vec::new();
        if !failed.is_empty() {
            tracing::error!("SMP: failed to stop secondary CPUs {failed}");
            replaced_signals = crate::ipi::handler::replaced_signals(s.ipi());
            if !replaced_signals.is_empty() {
                tracing::error!(
                    "SMP: signals {replaced_signals:?} no longer have usmp's handlers (replaced after build?): stops cannot reach those CPUs"
                );
            }
        }
        let crash = s.stop.coord.is_crash();
        if crash {
            cfg.backend.crash_complete();
        } else {
            cfg.backend.stop_complete();
        }
        let notes = stopped.iter().filter_map(|c| self.crash_note(c)).collect();
        let out = StopOutcome {
            crash,
            stopped,
            failed,
            attempts,
            notes,
            caller: me,
            replaced_signals,
        };
        s.stop.finish();
        Ok(out)
    }

    /// A losing caller that is a logical CPU parks itself (after its upgrade, if any). From a
    /// job it unwinds the job when it powers off; from IPI context it can only park for good.
    fn park_self(&self, me: CpuId) {
        let s = self;
        let st = &s.machine().cpus()[me];
        let in_job = st.jobs().in_job_code();
        let here = 0u8;
        let regs = SavedRegs {
            ip: park_marker as *const () as u64,
            sp: &here as *const u8 as u64,
            fp: 0,
        };
        let crash = s.stop.coord.is_crash();
        // A job (even with irqs soft-masked) can be unwound; a signal handler cannot.
        let unwindable = in_job && self.ipi().ipi_cpu(st.id()).handlers_active() == 0;
        receive::park(s, st, crash, regs, unwindable, unwindable);
    }
}

/// The instruction pointer recorded for a CPU that parked itself (no interrupted context).
#[inline(never)]
fn park_marker() {}
