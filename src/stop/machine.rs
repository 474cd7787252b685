//! `stop_machine`: run a function on some CPUs while every online CPU spins with irqs masked
//! (the kernel's `multi_cpu_stop`).
//!
//! Protocol (states are `MsState`, the kernel's `enum multi_stop_state`):
//! 1. The caller sets PREPARE with an ack count of N (online CPUs), and sends every other
//!    online CPU an async IPI that enters `multi_cpu_stop`; a caller that is itself a CPU enters
//!    it inline with irqs masked.
//! 2. Each CPU spins, then sleeps on the state word. On every new state it does that state's
//!    work (DISABLE_IRQ: nothing more to do, IPI context already has irqs masked; RUN: call `f`
//!    if it is in the target mask) and acks; the last of the N acks moves the state on, resets
//!    the count and wakes every sleeper: PREPARE -> DISABLE_IRQ -> RUN -> EXIT. A participant
//!    needs no timeout of its own: only the caller ends a round early (step 4), and it wakes
//!    them when it does.
//! 3. While the state is PREPARE the caller re-rings every CPU that has not arrived, once per
//!    millisecond, past any `kick_pending` mark (`ipi::call::ring_again`): its IPI is async, and
//!    a doorbell the host lost or merged, or one whose sender was descheduled, must cost a
//!    millisecond, not the round.
//! 4. PREPARE is bounded: if not all N CPUs arrived within the call timeout (one has irqs
//!    masked for good, say), the caller CASes PREPARE -> ABORT; arrived CPUs leave at once,
//!    late ones leave as soon as they arrive, and `f` runs nowhere. After PREPARE every CPU is
//!    present, so the rest cannot stall.
//! 5. Each participant's last access to the block is the `left` increment; the last one wakes
//!    the caller, which sleeps on `left` (by address: the block may be freed the moment the
//!    caller sees the count).
//!
//! The shared block belongs to the caller alone: participants get a raw pointer, and their
//! last access is the `left` increment, so the caller frees it only after all N have left and
//! a handler never frees memory. On abort the caller leaks it instead of waiting for CPUs still
//! to arrive (bounded, and only on a failed stop_machine).
//! If a system stop (`send_stop`/`crash_stop`) parks a participant midway, the others would
//! wait for its ack forever: the caller aborts as soon as it sees a stop in progress.
//!
//! No CPU comes or goes during a call: the caller first takes the CPU hotplug lock for reading
//! (`stop/cpus_lock.rs`, the kernel's `cpus_read_lock`), so the online mask of step 1 holds until
//! every participant has left and a CPU coming up cannot run between two words of an update.
//! Hotplug's own calls (`take_cpu_down`, steps that call this) hold the lock already and skip it.
//!
//! Calls are serialized by one mutex per runtime, as the kernel's `stop_cpus_mutex` does; a
//! second caller waits for the first to finish (bounded by the first's PREPARE timeout plus
//! the run time of its `f`). A caller that is itself a CPU keeps taking IPIs while it waits
//! (the wait is in thread context with irqs on), so it joins the first call's stop instead of
//! deadlocking against it; a caller with irqs masked, or in IPI context, could not, and gets
//! `IpiError::IrqsDisabled` at once.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cpu::clock::now_ns;
use crate::cpu::lock::LockUnpoisoned;
use crate::cpu::mask::{CpuId, CpuMask};
use crate::cpu::wait::{Deadline, Policy, Waiter};
use crate::ipi::irq::{irq_restore, irq_save};

use super::layer::StopLayer;

/// The rendezvous's states (the kernel's `enum multi_stop_state`), in the order acks move them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum MsState {
    /// Before the caller publishes the round.
    None = 0,
    /// Waiting for every CPU to arrive (step 1); the only state the caller may abort.
    Prepare = 1,
    /// Every CPU is here; irqs go off (already off in IPI context).
    DisableIrq = 2,
    /// `f` runs on the target CPUs.
    Run = 3,
    /// Final: participants leave.
    Exit = 4,
    /// Final, outside the sequence: the caller gave up in PREPARE or a system stop started.
    Abort = 100,
}

impl MsState {
    fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Prepare,
            2 => Self::DisableIrq,
            3 => Self::Run,
            4 => Self::Exit,
            100 => Self::Abort,
            _ => Self::None,
        }
    }

    /// The state the last ack of `self` moves to; `None` for the final ones.
    fn next(self) -> Option<Self> {
        match self {
            Self::None => Some(Self::Prepare),
            Self::Prepare => Some(Self::DisableIrq),
            Self::DisableIrq => Some(Self::Run),
            Self::Run => Some(Self::Exit),
            Self::Exit | Self::Abort => None,
        }
    }
}

/// Why `stop_machine` failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StopMachineError {
    /// Not every online CPU joined within the call timeout; `f` ran nowhere.
    #[error("stop_machine: CPUs {missing} did not join within {waited_ms} ms; nothing ran")]
    Timeout {
        /// The CPUs that did not join.
        missing: CpuMask,
        /// How long it waited, in ms.
        waited_ms: u64,
    },
    /// `f` returned an error on `cpu` (the first one to fail).
    #[error("stop_machine: function failed on CPU {cpu} with code {code}")]
    Failed {
        /// The first CPU on which `f` failed.
        cpu: CpuId,
        /// The error code `f` returned.
        code: i32,
    },
    /// A system stop (`send_stop`/`crash_stop`) started meanwhile; the machine is stopping.
    #[error("stop_machine: aborted, the system is being stopped")]
    Stopped,
    /// This image handed over to the next one (kexec).
    #[error("stop_machine: generation {generation} has handed over to the next image")]
    Retired {
        /// Generation of this (retired) image.
        generation: u64,
    },
    /// An IPI could not be sent.
    #[error("stop_machine: {0}")]
    Ipi(#[from] crate::ipi::IpiError),
}

/// The block pointer handed to participants (see the module comment for why not an `Arc`).
#[derive(Clone, Copy)]
struct BlockPtr(*const MultiStop);

// SAFETY: `MultiStop` is `Sync` (atomics, an immutable mask and a `Sync` closure), and the
// pointer's lifetime is managed by the caller as the module comment describes.
unsafe impl Send for BlockPtr {}

/// The function run under stop_machine, in IPI context (irqs masked, signal-handler rules).
pub type StopFn = dyn Fn(CpuId) -> Result<(), i32> + Send + Sync;

/// How often the caller re-rings CPUs that have not arrived (step 3).
const RERING: Duration = Duration::from_millis(1);
/// How long a caller sleeps on `left` after PREPARE before it looks for a system stop again.
const CALLER_NAP: Duration = Duration::from_millis(10);
/// How long a caller spins on `left` before it sleeps (yielding its core every 64 hints when it
/// has no core of its own).
const CALLER_SPIN: Duration = Duration::from_micros(20);
/// How long a participant spins on the state word before it sleeps, when every CPU has a
/// core of its own (a futex wake-up costs about that).
const PARTICIPANT_SPIN: Duration = Duration::from_micros(20);

/// The state word: every transition is one of these methods, and each wakes the sleepers.
struct StateWord(AtomicU32);

impl StateWord {
    fn load(&self) -> MsState {
        MsState::from_u32(self.0.load(Ordering::Acquire))
    }

    /// Step 2's move on (or step 1's start). Async-signal-safe.
    fn set(&self, s: MsState) {
        self.0.store(s as u32, Ordering::SeqCst);
        crate::cpu::futex::wake(&self.0, i32::MAX);
    }

    /// Step 4: PREPARE -> ABORT; false if the round had already moved on.
    fn abort_prepare(&self) -> bool {
        let ok = self
            .0
            .compare_exchange(
                MsState::Prepare as u32,
                MsState::Abort as u32,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if ok {
            crate::cpu::futex::wake(&self.0, i32::MAX);
        }
        ok
    }

    /// A system stop, or an IPI that could not be sent: abort whatever the state.
    fn force_abort(&self) {
        self.set(MsState::Abort);
    }
}

/// What only the caller does while the state is PREPARE (steps 3 and 4).
struct Caller<'a> {
    /// The PREPARE bound; it does not count time the caller was not running (a process
    /// stopped by Ctrl-Z stopped every participant too: `cpu/wait.rs` `Deadline`). The
    /// caller looks at least once per `RERING`, well inside the pause threshold.
    deadline: std::cell::Cell<Deadline>,
    next_ring: std::cell::Cell<u64>,
    rering: &'a dyn Fn(),
}

impl Caller<'_> {
    /// Re-rings the stragglers when due; true once the PREPARE deadline has passed.
    fn prepare_tick(&self) -> bool {
        let now = now_ns();
        let mut d = self.deadline.get();
        let passed = d.passed_at(now);
        self.deadline.set(d);
        if passed {
            return true;
        }
        if now >= self.next_ring.get() {
            (self.rering)();
            self.next_ring.set(now + RERING.as_nanos() as u64);
        }
        false
    }

    /// How long the caller may sleep in PREPARE: to its next re-ring or its deadline.
    fn nap(&self) -> Duration {
        let now = now_ns();
        let until = self.deadline.get().at().min(self.next_ring.get());
        Duration::from_nanos(until.saturating_sub(now).max(1_000))
    }
}

struct MultiStop {
    state: StateWord,
    ack: AtomicU32,
    num: u32,
    active: CpuMask,
    f: Box<StopFn>,
    /// `f`'s type name, for the fatal-panic line.
    f_name: &'static str,
    left: AtomicU32,
    arrived: Box<[AtomicU32]>,
    failed_cpu: AtomicUsize,
    failed_code: AtomicI32,
    /// How a participant waits for the next state (see `run`).
    policy: Policy,
}

impl MultiStop {
    fn set_state(&self, s: MsState) {
        self.ack.store(self.num, Ordering::SeqCst);
        self.state.set(s);
    }

    fn ack_state(&self, cur: MsState) {
        if self.ack.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(next) = cur.next() {
                self.set_state(next);
            }
        }
    }

    fn arrived(&self, cpu: CpuId) -> bool {
        self.arrived[cpu].load(Ordering::SeqCst) != 0
    }

    /// Step 2. Runs in IPI context on `cpu`. Async-signal-safe as far as `f` is. The caller,
    /// when it participates inline, passes its PREPARE duties (steps 3 and 4).
    fn run(&self, cpu: CpuId, caller: Option<&Caller<'_>>) {
        self.arrived[cpu].store(1, Ordering::SeqCst);
        let mut cur = MsState::None;
        // Forever: every move of the state wakes the sleepers, so a participant needs no
        // bound of its own (step 2); the caller wakes up for its own duties (`set_nap`).
        let mut w = Waiter::new(Deadline::forever(), self.policy);
        loop {
            let new = self.state.load();
            if new == MsState::Abort {
                break;
            }
            if new == MsState::Prepare && caller.is_some_and(|c| c.prepare_tick()) {
                self.state.abort_prepare();
                continue;
            }
            if new != cur {
                cur = new;
                // DISABLE_IRQ needs no work: IPI context already has irqs masked.
                if cur == MsState::Run && self.active.contains(cpu) {
                    self.run_f(cpu);
                }
                self.ack_state(cur);
                if cur == MsState::Exit {
                    break;
                }
                // A new state to wait out: spin afresh.
                w = Waiter::new(Deadline::forever(), self.policy);
                continue;
            }
            // Spin, then sleep on the state word (the Waiter is async-signal-safe).
            if w.spin() {
                continue;
            }
            w.set_nap(caller.filter(|_| cur == MsState::Prepare).map(Caller::nap));
            let _ = w.sleep_on(&self.state.0, cur as u32);
        }
        self.leave();
    }

    fn run_f(&self, cpu: CpuId) {
        let r = crate::ipi::fatal::run(cpu, "stop_machine function", self.f_name, || (self.f)(cpu));
        if let Err(code) = r {
            if self
                .failed_cpu
                .compare_exchange(usize::MAX, cpu, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.failed_code.store(code, Ordering::Release);
            }
        }
    }

    /// Step 5: the last access to the block; the last participant wakes the caller.
    fn leave(&self) {
        let word = self.left.as_ptr() as *const u32;
        if self.left.fetch_add(1, Ordering::AcqRel) + 1 == self.num {
            crate::cpu::futex::wake_addr(word, 1);
        }
    }
}

impl StopLayer {
    /// Implements [`Handle::stop_machine`](crate::Handle::stop_machine).
    pub(crate) fn stop_machine<F>(&self, f: F, cpus: &CpuMask) -> Result<(), StopMachineError>
    where
        F: Fn(CpuId) -> Result<(), i32> + Send + Sync + 'static,
    {
        let s = self;
        if let Some(cpu) = s
            .machine()
            .this_cpu_here()
            .filter(|_| crate::ipi::irq::irqs_disabled())
        {
            return Err(crate::ipi::IpiError::IrqsDisabled { cpu }.into());
        }
        // No CPU comes or goes until this returns (`stop/cpus_lock.rs`; a no-op inside a hotplug
        // operation, which holds it already). Bounded by the hotplug operation's own timeouts.
        let _cpus = s.cpus_lock.read(s.machine().this_cpu_here());
        // Checked under the lock: a kexec's shutdown holds it for writing while it takes the
        // CPUs offline and retires the image, so past this point the online mask is the one
        // this image runs on until the call returns.
        if s.machine().is_retired() {
            return Err(StopMachineError::Retired {
                generation: s.machine().generation(),
            });
        }
        // Unbounded only as long as the running stop_machine takes (module comment).
        let _serial = s.stop.machine.lock_unpoisoned();
        if s.stop.coord.in_progress() {
            return Err(StopMachineError::Stopped);
        }
        let online = s.machine().online().load();
        let me = s.machine().this_cpu_here().filter(|&c| online.contains(c));
        // With no more participants than cores, spin before sleeping; with more, spinners
        // would hold the cores the laggards need, so sleep at once. A caller that is not a CPU
        // is one thread more: with no core left over for it, a plain spin held the core a
        // participant is pinned to (`cpu_down` + `cpu_up` of a 2-CPU runtime on 2 cores from
        // the main thread: 89-102 us p50 with it, 75 us sleeping), and sleeping cost a
        // wake-up after the last participant left (32 us of a 47 us `cpu_down`), so it spins
        // yielding its core every 64 hints to whoever is runnable (8-10 us).
        let cores = s.machine().cores().len().max(1);
        let own_cores = online.weight() <= cores;
        let caller_own_core = online.weight() + usize::from(me.is_none()) <= cores;
        let policy = if own_cores {
            Policy::spin(PARTICIPANT_SPIN)
        } else {
            Policy::SLEEP
        };
        let caller_policy = if caller_own_core {
            Policy::spin(CALLER_SPIN)
        } else {
            Policy::spin(CALLER_SPIN).yielding()
        };
        let ms = Arc::new(MultiStop {
            state: StateWord(AtomicU32::new(MsState::None as u32)),
            ack: AtomicU32::new(0),
            num: online.weight() as u32,
            active: cpus.and(&online),
            f: Box::new(f),
            f_name: std::any::type_name::<F>(),
            left: AtomicU32::new(0),
            arrived: (0..s.machine().cpus().len())
                .map(|_| AtomicU32::new(0))
                .collect(),
            failed_cpu: AtomicUsize::new(usize::MAX),
            failed_code: AtomicI32::new(0),
            policy,
        });
        ms.set_state(MsState::Prepare);
        let start = now_ns();
        let block = BlockPtr(Arc::as_ptr(&ms));
        let sent = self.ipi().call_many(
            &online,
            move || {
                let block = block;
                if let Some(c) = crate::cpu::context::this_cpu() {
                    // SAFETY: the caller keeps the block alive until every participant has
                    // done its last access (`left`), or leaks it (module comment).
                    unsafe { &*block.0 }.run(c, None)
                }
            },
            false,
        );
        let mut missing_send = CpuMask::new();
        if let Err(e) = sent {
            // A CPU the IPI could not reach will never arrive: abort.
            if let crate::ipi::IpiError::Partial { failed, .. } = &e {
                missing_send = failed.clone();
            }
            ms.state.force_abort();
        }
        let rering = || {
            for c in online.iter() {
                if Some(c) != me && !ms.arrived(c) {
                    crate::ipi::call::ring_again(s.ipi(), &s.machine().cpus()[c]);
                }
            }
        };
        let caller = Caller {
            deadline: std::cell::Cell::new(Deadline::running_from(start, s.ipi().call_timeout())),
            next_ring: std::cell::Cell::new(start + RERING.as_nanos() as u64),
            rering: &rering,
        };
        if let Some(me) = me {
            let fl = irq_save();
            ms.run(me, Some(&caller));
            irq_restore(fl);
        }
        // Forever here: PREPARE is bounded by the caller's own deadline (`prepare_tick`), and
        // after it every CPU is present, so the rest takes as long as `f` (module comment).
        let mut w = Waiter::new(Deadline::forever(), caller_policy);
        loop {
            let left = ms.left.load(Ordering::Acquire);
            if left == ms.num {
                let fc = ms.failed_cpu.load(Ordering::Acquire);
                if fc != usize::MAX {
                    return Err(StopMachineError::Failed {
                        cpu: fc,
                        code: ms.failed_code.load(Ordering::Acquire),
                    });
                }
                return Ok(());
            }
            if s.stop.coord.in_progress() {
                // A system stop may have parked a participant: nobody would ever ack for it.
                ms.state.force_abort();
                std::mem::forget(ms);
                return Err(StopMachineError::Stopped);
            }
            let st = ms.state.load();
            if st == MsState::Abort {
                break;
            }
            if st == MsState::Prepare && caller.prepare_tick() {
                if ms.state.abort_prepare() {
                    break;
                }
                continue;
            }
            if w.spin() {
                continue;
            }
            // Step 5: the last participant to leave wakes us; in PREPARE we also wake for
            // steps 3 and 4, afterwards now and then to look for a system stop.
            w.set_nap(Some(if st == MsState::Prepare {
                caller.nap()
            } else {
                CALLER_NAP
            }));
            let _ = w.sleep_on(&ms.left, left);
        }
        // Aborted: report who never arrived, and leave the block to the late arrivals.
        let missing: CpuMask = online
            .iter()
            .filter(|&c| !ms.arrived(c))
            .collect::<CpuMask>()
            .or(&missing_send);
        std::mem::forget(ms);
        Err(StopMachineError::Timeout {
            missing,
            waited_ms: (now_ns() - start) / 1_000_000,
        })
    }
}
