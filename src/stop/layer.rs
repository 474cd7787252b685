//! `StopLayer`: the stop layer's part of a runtime — the stop routine's state, the
//! deterministic-stop "stopping" flag, the park policy and the stop settings — on top of the
//! [`IpiLayer`] it holds (reached by `ipi()`). And the thread-local that lets the stop receiver,
//! called from the IPI layer's handlers through a hook, find it.

use std::cell::Cell;
use std::sync::atomic::AtomicBool;

use super::percpu::StopCpu;
use super::receive::ParkPolicy;
use super::routine::{StopConfig, StopState};
use crate::cpu::machine::Machine;
use crate::cpu::mask::CpuId;
use crate::ipi::layer::IpiLayer;

/// The stop layer's state of one runtime, over its IPI layer.
pub(crate) struct StopLayer {
    /// Read by the layers above as a field, so no call passes through this layer.
    pub(crate) ipi_layer: IpiLayer,
    /// The stop routine's coordination word and acknowledgement count (`routine.rs`).
    pub(super) stop: StopState,
    /// The deterministic-stop "stopping" flag (seed 000): set by a stop before it reads the
    /// online mask, read by a CPU right after it joins the online mask.
    pub(super) stopping: AtomicBool,
    /// What a stopped CPU does.
    pub(super) park: ParkPolicy,
    /// Retries, waits, mode and backend.
    pub(super) config: StopConfig,
    /// The CPU hotplug lock: `stop_machine` reads it, hotplug (the layer above) writes it.
    pub(crate) cpus_lock: crate::stop::cpus_lock::CpusLock,
    /// Each CPU's crash note, park word and power-off mark (`percpu.rs`).
    percpu: Box<[StopCpu]>,
}

impl StopLayer {
    /// The `ipi` layer below: csd pool, NMI hooks, signals.
    #[inline]
    pub(crate) fn ipi(&self) -> &IpiLayer {
        &self.ipi_layer
    }

    /// The `cpu` layer, through the IPI layer.
    #[inline]
    pub(crate) fn machine(&self) -> &Machine {
        &self.ipi_layer.machine
    }
}

impl StopLayer {
    /// The stop layer over `ipi`; registers the stop receiver for the stop vector and the NMI.
    pub(crate) fn new(ipi: IpiLayer, park: ParkPolicy, config: StopConfig) -> Self {
        ipi.set_stop_hook(super::receive::stop_this_cpu);
        // Before any CPU can be stopped: the receiver reads the table in handler context.
        super::parkable::init();
        let cpus_lock = crate::stop::cpus_lock::CpusLock::new(ipi.machine().cpus().len());
        StopLayer {
            cpus_lock,
            percpu: (0..ipi.machine().cpus().len())
                .map(|_| StopCpu::new())
                .collect(),
            ipi_layer: ipi,
            stop: StopState::new(),
            stopping: AtomicBool::new(false),
            park,
            config,
        }
    }
}

impl StopLayer {
    /// A powered-off CPU's thread, before it tears down: waits until the stop that powered it
    /// off has finished (bounded; see `StopState::wait_for_stop_done`).
    pub(crate) fn wait_for_stop_done(&self) {
        self.stop.wait_for_stop_done();
    }

    /// A crash kexec: powered-off CPUs keep their threads until `release_teardown` (see
    /// `StopState::hold_teardown`).
    pub(crate) fn hold_teardown(&self) {
        self.stop.hold_teardown();
    }

    /// The next image is up (or the kexec failed): powered-off CPUs may tear down.
    pub(crate) fn release_teardown(&self) {
        self.stop.release_teardown();
    }

    /// Whether the stop in progress is a crash stop (its receivers save a crash note).
    pub(crate) fn stop_is_crash(&self) -> bool {
        self.stop.coord.is_crash()
    }

    /// CPU `cpu`'s stop state. Panics on an invalid CPU, as indexing `cpus` does.
    #[inline]
    pub(crate) fn stop_cpu(&self, cpu: CpuId) -> &StopCpu {
        &self.percpu[cpu]
    }

    /// Before a new thread starts for `cpu` (the controller, under the hotplug lock): clears
    /// this layer's per-CPU state and the layers' below.
    pub(crate) fn reset_cpu_for_bringup(&self, cpu: CpuId) {
        self.percpu[cpu].reset();
        self.ipi_layer.reset_cpu_for_bringup(cpu);
    }

    /// Called by a CPU right after it joined the online mask (SeqCst): whether a deterministic
    /// stop is running, so the CPU must park itself instead of going online (seed 000; see the
    /// protocol comment in `routine.rs`). The flag is read SeqCst, after the online bit.
    pub(crate) fn must_park_coming_online(&self) -> bool {
        self.config.mode == super::StopMode::Deterministic
            && self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }
}

thread_local! {
    static CURRENT: Cell<*const StopLayer> = const { Cell::new(std::ptr::null()) };
}

/// Marks the calling thread as logical CPU `cpu` of `stop` (`None` to clear), here and in the
/// layers below.
///
/// # Safety
/// Until it is cleared, `stop` must stay alive (the CPU thread holds an `Arc` to the runtime
/// that contains it).
pub(crate) unsafe fn set_current(stop: Option<&StopLayer>, cpu: CpuId) {
    let p = stop.map_or(std::ptr::null(), |s| s as *const StopLayer);
    CURRENT.with(|c| c.set(p));
    // SAFETY: the same contract, for the IPI layer `stop` contains.
    unsafe { crate::ipi::layer::set_current(stop.map(|s| &s.ipi_layer), cpu) };
}

/// The calling thread's stop layer, if it is a logical CPU. Async-signal-safe: one plain TLS
/// load.
#[inline]
pub(crate) fn current() -> Option<&'static StopLayer> {
    let p = CURRENT.with(|c| c.get());
    // SAFETY: `set_current`'s contract keeps the layer alive while the pointer is set, and the
    // pointer is cleared before the thread drops its Arc. The 'static lifetime never escapes the
    // thread: callers use it within the current call.
    (!p.is_null()).then(|| unsafe { &*p })
}
