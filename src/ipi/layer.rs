//! `IpiLayer`: the IPI layer's part of a runtime — the csd pool, the call counters, the NMI
//! hooks, the signal numbers and the call timeout — on top of the [`Machine`] it
//! holds (reached by `machine()`). And the thread-local that lets the signal handlers find it.

use std::cell::Cell;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crossbeam_utils::CachePadded;

use super::csd::CsdPool;
use super::nmi::NmiHooks;
use super::percpu::IpiCpu;
use super::signal::Signals;
use crate::cpu::machine::Machine;
use crate::cpu::mask::CpuId;
use crate::cpu::state::CpuState;

/// Runtime-wide counters (Relaxed: statistics).
#[derive(Default)]
pub(crate) struct Totals {
    /// Calls accepted into a queue (written by senders; padded away from `handled`, which
    /// the targets write, so the two sides do not bounce one cache line per call).
    pub queued: CachePadded<AtomicU64>,
    /// Callbacks run.
    pub handled: CachePadded<AtomicU64>,
    /// Calls cancelled by a sender that timed out before they ran.
    pub cancelled: AtomicU64,
    /// API calls that returned Ok / Err.
    pub api_ok: AtomicU64,
    pub api_err: AtomicU64,
    /// IPIs refused because the target was offline / out of range.
    pub offline_ipis: AtomicU64,
    pub invalid_ipis: AtomicU64,
    /// Calls found queued on a CPU that was no longer online (seed 002), run by the flush.
    pub ipi_on_offline: AtomicU64,
    /// Doorbell signals actually sent.
    pub signals: AtomicU64,
    /// Synchronous calls that timed out ("non-responsive CSD lock").
    pub csd_timeouts: AtomicU64,
}

/// The IPI layer's state of one runtime, over its machine.
pub(crate) struct IpiLayer {
    /// Read by the layers above as a field, so no call passes through this layer.
    pub(crate) machine: Machine,
    pub(super) pool: CsdPool,
    pub(super) totals: Totals,
    pub(super) next_call_id: AtomicU64,
    pub(super) nmi_hooks: NmiHooks,
    /// The IPI and NMI signal numbers.
    pub(super) signals: Signals,
    /// How long a synchronous call waits.
    pub(super) call_timeout: Duration,
    /// Whether `irq_save`/`irq_restore` account the time spent masked.
    irq_accounting: bool,
    /// Each CPU's NMI reasons, vectors, backtrace sample and handler count (`percpu.rs`).
    /// Padded: a CPU's handlers write its handler count on every IPI, and a neighbour's idle
    /// loop polls its own vectors word; unpadded, four CPUs' words share one line.
    percpu: Box<[CachePadded<IpiCpu>]>,
}

impl IpiLayer {
    /// The `cpu` layer below: CPUs, masks, jobs.
    #[inline]
    pub(crate) fn machine(&self) -> &Machine {
        &self.machine
    }
}

impl IpiLayer {
    /// The IPI layer over `machine`; registers the soft irq mask as the machine's masked
    /// section (the job wake-up runs with irqs masked).
    pub(crate) fn new(
        mut machine: Machine,
        csd_pool: usize,
        signals: Signals,
        call_timeout: Duration,
        irq_accounting: bool,
    ) -> Self {
        machine.set_masked_section(super::irq::masked_section);
        IpiLayer {
            percpu: (0..machine.cpus().len())
                .map(|_| CachePadded::new(IpiCpu::new()))
                .collect(),
            machine,
            pool: CsdPool::new(csd_pool),
            totals: Totals::default(),
            next_call_id: AtomicU64::new(1),
            nmi_hooks: NmiHooks::new(),
            signals,
            call_timeout,
            irq_accounting,
        }
    }
}

impl IpiLayer {
    /// How long a synchronous call waits.
    pub(crate) fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// Whether `irq_save`/`irq_restore` account the time spent masked.
    #[inline]
    pub(crate) fn irq_accounting(&self) -> bool {
        self.irq_accounting
    }

    /// The runtime-wide call counters (Relaxed statistics).
    pub(crate) fn totals(&self) -> &Totals {
        &self.totals
    }

    /// The csd pool's slots in use and its capacity.
    pub(crate) fn csd_usage(&self) -> (u64, usize) {
        (self.pool.in_use(), self.pool.capacity())
    }

    /// CPU `cpu`'s IPI state. Panics on an invalid CPU, as indexing `cpus` does.
    #[inline]
    pub(crate) fn ipi_cpu(&self, cpu: CpuId) -> &IpiCpu {
        &self.percpu[cpu]
    }

    /// Before a new thread starts for `cpu` (the controller, under the hotplug lock): nothing
    /// pending from its previous life, here and in the CPU's own state.
    pub(crate) fn reset_cpu_for_bringup(&self, cpu: CpuId) {
        self.percpu[cpu].reset();
        self.machine().cpus()[cpu].reset_for_bringup();
    }

    /// The `smpcfd:prepare` step: no doorbell marked in flight, no stale NMI reason.
    pub(crate) fn smpcfd_prepare(&self, cpu: CpuId) {
        self.percpu[cpu].clear_kick_pending();
        self.percpu[cpu].clear_nmi();
    }

    /// On the CPU's new thread, once committed: irqs unmasked, no doorbell in flight, nothing
    /// pending.
    pub(crate) fn reset_cpu_irq_state(&self, cpu: CpuId) {
        self.percpu[cpu].reset_irq_state();
    }

    /// Registers the stop receiver an upper layer provides (see [`NmiHooks::set_stop`]).
    pub(crate) fn set_stop_hook(&self, hook: super::nmi::NmiHook) {
        self.nmi_hooks.set_stop(hook);
    }
}

thread_local! {
    static CURRENT: Cell<(*const IpiLayer, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// Marks the calling thread as logical CPU `cpu` of `ipi` (`None` to clear), here and in the
/// layer below (`cpu::context`).
///
/// # Safety
/// Until it is cleared, `ipi` must stay alive (the CPU thread holds an `Arc` to the runtime
/// that contains it).
pub(crate) unsafe fn set_current(ipi: Option<&IpiLayer>, cpu: CpuId) {
    let p = ipi.map_or(std::ptr::null(), |i| i as *const IpiLayer);
    CURRENT.with(|c| c.set((p, cpu)));
    // SAFETY: the same contract, for the machine `ipi` contains.
    unsafe { crate::cpu::context::set_current(ipi.map(|i| &i.machine), cpu) };
}

/// The calling thread's IPI layer and CPU number, if it is a logical CPU, without indexing the
/// CPU's state (the soft irq mask's fast path needs only its `IpiCpu`). Async-signal-safe.
#[inline]
pub(super) fn current_id() -> Option<(&'static IpiLayer, CpuId)> {
    let (p, cpu) = CURRENT.with(|c| c.get());
    if p.is_null() {
        return None;
    }
    // SAFETY: as in `current`.
    let ipi: &'static IpiLayer = unsafe { &*p };
    Some((ipi, cpu))
}

/// The calling thread's IPI layer and CPU, if it is a logical CPU. Async-signal-safe: one
/// plain TLS load.
#[inline]
pub(crate) fn current() -> Option<(&'static IpiLayer, &'static CpuState)> {
    let (p, cpu) = CURRENT.with(|c| c.get());
    if p.is_null() {
        return None;
    }
    // SAFETY: `set_current`'s contract keeps the layer alive while the pointer is set, and the
    // pointer is cleared before the thread drops its Arc. The 'static lifetime never escapes the
    // thread: callers use it within the current call.
    let ipi: &'static IpiLayer = unsafe { &*p };
    Some((ipi, &ipi.machine().cpus()[cpu]))
}
