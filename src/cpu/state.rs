//! Per-CPU runtime state: what a logical CPU's thread, its signal handlers and the CPUs that
//! send it IPIs share. One `CpuState` per possible CPU, cache-padded, allocated at `build()` and
//! never freed while any thread of the runtime runs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::cpu::call_queue::CallQueue;
use crate::cpu::events::EventRing;
use crate::cpu::identity::CpuIdentity;
use crate::cpu::idle::IdleWord;
use crate::cpu::jobs::JobHandoff;
use crate::cpu::mask::CpuId;

/// Where a logical CPU is in its life (read it with [`crate::Handle::cpu_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u32)]
pub enum CpuRunState {
    /// No thread; the CPU can be brought up.
    Offline = 0,
    /// Thread spawned, bring-up handshake in progress.
    Booting = 1,
    /// Online and running its idle loop or jobs.
    Online = 2,
    /// Going down: teardown in progress.
    Dying = 3,
    /// Stopped by `send_stop`/`crash_stop` and parked with irqs masked, thread kept (`spin`).
    Parked = 4,
    /// Stopped and its thread has ended (`power-off`); can be brought up again.
    PoweredOff = 5,
    /// Timed out during bring-up and not yet confirmed dead: cannot be brought up.
    Limbo = 6,
}

impl CpuRunState {
    pub(crate) fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Booting,
            2 => Self::Online,
            3 => Self::Dying,
            4 => Self::Parked,
            5 => Self::PoweredOff,
            6 => Self::Limbo,
            _ => Self::Offline,
        }
    }
}

/// Counters a CPU keeps about itself (all Relaxed: statistics, not synchronisation).
#[derive(Default)]
pub(crate) struct CpuCounters {
    /// Calls queued to this CPU. Written by the senders, so it sits on its own cache line:
    /// sharing one with the counters this CPU writes would bounce that line on every call.
    pub calls_queued: crossbeam_utils::CachePadded<AtomicU64>,
    /// Calls this CPU ran.
    pub calls_handled: AtomicU64,
    /// Calls sent *by* this CPU (to others).
    pub calls_sent: AtomicU64,
    /// Doorbell signals rung at this CPU.
    pub doorbells: AtomicU64,
    /// IPI handler entries on this CPU.
    pub irqs: AtomicU64,
    /// Handler entries deferred because irqs were soft-masked.
    pub deferred: AtomicU64,
    /// Times the queue was served by the idle poller without a signal.
    pub polled: AtomicU64,
    /// Times a sleeping idle CPU was woken by futex.
    pub idle_wakes: AtomicU64,
    /// Times the idle CPU announced SLEEPING (then slept unless work had just arrived).
    pub sleeps: AtomicU64,
    /// NMIs received.
    pub nmis: AtomicU64,
    /// Nanoseconds spent with irqs soft-masked (when accounting is on).
    pub masked_ns: AtomicU64,
    /// Jobs run.
    pub jobs: AtomicU64,
    /// Jobs that ended with irqs masked (unmasked by the idle loop).
    pub irq_leaks: AtomicU64,
}

/// One logical CPU, as the bottom layer sees it: who runs it (`identity.rs`), its run state,
/// its idle word, call queue and job hand-off (each a protocol with its own type), the exit
/// request, its event ring and counters. The fields are private to the `cpu` layer; the layers
/// above use the methods. What the upper layers keep per CPU (the doorbell flag and the soft
/// irq mask: `ipi/percpu.rs`) they hold themselves.
pub(crate) struct CpuState {
    /// Which CPU this is and which OS thread runs it (`identity.rs`).
    pub(super) identity: CpuIdentity,
    /// `CpuRunState` as u32.
    pub(super) run_state: AtomicU32,
    /// The idle word (`cpu/idle.rs`), also the idle futex word; RMW-only by construction. On
    /// its own cache line: every sender RMW-reads it after each push, and a polling CPU does not
    /// touch it, so on the polling round trip it stays in the sender's cache.
    pub(super) idle: crossbeam_utils::CachePadded<IdleWord>,
    /// The call queue (closed while the CPU is offline). On its own cache line: senders CAS
    /// it and the CPU spins on it, and sharing the line with the idle word (senders) or the
    /// soft irq mask (this CPU) cost two extra line transfers per polled call.
    pub(super) queue: crossbeam_utils::CachePadded<CallQueue>,
    /// The thread should leave its idle loop (offline / shutdown).
    pub(super) exit_req: crate::sync::AtomicBool,
    /// The job channel, its gate, and what the thread says about the job it holds
    /// (`jobs.rs`).
    pub(super) jobs: JobHandoff,
    pub(super) ring: EventRing,
    pub(super) stats: CpuCounters,
    /// The name of the last callback found on this CPU after it went offline, copied in by the
    /// handler (atomics only) for the logger's "IPI on offline CPU" message.
    pub(super) offline_name: OfflineName,
}

/// A fixed buffer of atomics holding a callback's type name (truncated to 128 bytes).
pub(crate) struct OfflineName {
    words: [AtomicU64; 16],
    len: AtomicU64,
}

impl OfflineName {
    fn new() -> Self {
        OfflineName {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
            len: AtomicU64::new(0),
        }
    }

    /// Copies `name` in. Async-signal-safe.
    pub(crate) fn store(&self, name: &str) {
        let b = name.as_bytes();
        let n = b.len().min(self.words.len() * 8);
        for (i, w) in self.words.iter().enumerate() {
            let mut word = [0u8; 8];
            for (j, byte) in word.iter_mut().enumerate() {
                if let Some(&c) = b[..n].get(i * 8 + j) {
                    *byte = c;
                }
            }
            w.store(u64::from_le_bytes(word), Ordering::Relaxed);
        }
        self.len.store(n as u64, Ordering::Release);
    }

    /// Reads it back (a racing writer can garble it; it is only a log message).
    pub(crate) fn load(&self) -> String {
        let n = (self.len.load(Ordering::Acquire) as usize).min(self.words.len() * 8);
        let bytes: Vec<u8> = self
            .words
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .take(n)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl CpuState {
    pub(crate) fn new(id: CpuId, ring_cap: usize, log: bool) -> Self {
        Self {
            identity: CpuIdentity::new(id),
            run_state: AtomicU32::new(CpuRunState::Offline as u32),
            idle: crossbeam_utils::CachePadded::new(IdleWord::new()),
            queue: crossbeam_utils::CachePadded::new(CallQueue::new_closed()),
            exit_req: crate::sync::AtomicBool::new(false),
            jobs: JobHandoff::new(),
            ring: EventRing::with_enabled(ring_cap, log),
            stats: CpuCounters::default(),
            offline_name: OfflineName::new(),
        }
    }

    /// Before a new thread starts for this CPU (the controller, under the hotplug lock): clear
    /// what its previous life, or a stop that powered it off, left behind, and mark it booting.
    pub(crate) fn reset_for_bringup(&self) {
        self.exit_req.store(false, Ordering::SeqCst);
        self.jobs.reset();
        self.idle.reset_running();
        self.set_run_state(CpuRunState::Booting);
    }

    /// This CPU's number.
    #[inline]
    pub(crate) fn id(&self) -> CpuId {
        self.identity.id
    }

    /// Which OS thread runs this CPU: its tid, host core and join handle (`identity.rs`).
    #[inline]
    pub(crate) fn identity(&self) -> &CpuIdentity {
        &self.identity
    }

    /// The idle word (`idle.rs`): read-modify-write methods only.
    #[inline]
    pub(crate) fn idle(&self) -> &IdleWord {
        &self.idle
    }

    /// The call queue (`call_queue.rs`).
    #[inline]
    pub(crate) fn queue(&self) -> &CallQueue {
        &self.queue
    }

    /// This CPU's event ring.
    #[inline]
    pub(crate) fn ring(&self) -> &EventRing {
        &self.ring
    }

    /// This CPU's counters (Relaxed statistics).
    #[inline]
    pub(crate) fn stats(&self) -> &CpuCounters {
        &self.stats
    }

    /// The last callback name found after the CPU went offline (handler writes, logger reads).
    pub(crate) fn offline_name(&self) -> &OfflineName {
        &self.offline_name
    }

    // Leaving the idle loop.

    /// Whether the thread was asked to leave its idle loop.
    #[inline]
    pub(crate) fn exit_requested(&self) -> bool {
        self.exit_req.load(Ordering::SeqCst)
    }

    /// Asks the thread to leave without waking it (the caller is that thread, or wakes it:
    /// [`Machine::request_exit`](crate::cpu::machine::Machine::request_exit)).
    pub(crate) fn mark_exit(&self) {
        self.exit_req.store(true, Ordering::SeqCst);
    }

    /// The idle loop's poll: a job queued or an exit asked (plain loads).
    #[inline]
    pub(crate) fn jobs_or_exit_hint(&self) -> bool {
        self.jobs.queued_hint() || self.exit_req.load(Ordering::Relaxed)
    }

    /// The idle loop's last check before it sleeps (`idle.rs` step 3): the same, read with
    /// read-modify-writes so they are ordered with the senders' RMWs on the idle word.
    #[inline]
    pub(crate) fn jobs_or_exit_rmw(&self) -> bool {
        self.jobs.queued_rmw() || self.exit_req.fetch_or(false, Ordering::AcqRel)
    }

    /// The job hand-off (`jobs.rs`): `machine.rs` queues behind the gate; the idle loop takes.
    #[inline]
    pub(crate) fn jobs(&self) -> &JobHandoff {
        &self.jobs
    }

    /// Whether a stop has parked or powered off this CPU.
    pub(crate) fn is_stopped(&self) -> bool {
        matches!(
            self.run_state(),
            CpuRunState::Parked | CpuRunState::PoweredOff
        )
    }

    pub(crate) fn run_state(&self) -> CpuRunState {
        CpuRunState::from_u32(self.run_state.load(Ordering::SeqCst))
    }

    pub(crate) fn set_run_state(&self, s: CpuRunState) {
        self.run_state.store(s as u32, Ordering::SeqCst);
        self.ring
            .record(crate::cpu::events::EventKind::CpuState, s as u64, 0);
    }
}
