//! `HotplugLayer`: the hotplug layer's part of a runtime — the step table and its lock, the
//! disable count, the per-CPU handshake words, the boot timeout, and what its CPU threads need
//! (`thread.rs`) — on top of the [`StopLayer`] it holds (reached by `stop()`).

use std::time::Duration;

use super::HotplugState;
use crate::cpu::machine::Machine;
use crate::cpu::mask::CpuId;
use crate::ipi::layer::IpiLayer;
use crate::stop::layer::StopLayer;

/// How long a hotplug handshake wait spins before it sleeps. On a VM, waking a thread whose
/// vCPU went idle costs tens of microseconds, and one bring-up has three such hand-offs
/// (ALIVE, commit, ONLINE); the other side usually answers within a few microseconds, so a
/// short spin saves the sleep and the wake-up. (The kernel's `cpuhp_wait_for_sync_state`
/// spins likewise before it sleeps.)
pub(crate) const HANDSHAKE_SPIN: Duration = Duration::from_micros(50);

/// The hotplug layer's state of one runtime, over its stop layer.
pub(crate) struct HotplugLayer {
    /// Read by the runtime's accessors as a field, so no call passes through this layer.
    pub(crate) stop_layer: StopLayer,
    /// Hotplug's table, lock and per-CPU handshake state.
    pub(super) hotplug: HotplugState,
    /// How long bring-up waits for a CPU (and teardown for its thread).
    pub(super) boot_timeout: Duration,
    /// The CPU threads' configuration and shared flags (`thread.rs`).
    pub(super) threads: super::thread::Threads,
}

impl HotplugLayer {
    /// A kexec pins its reboot CPU (`cpu_down` refuses it) or, with `None`, unpins it.
    pub(crate) fn pin_reboot_cpu(&self, cpu: Option<CpuId>) {
        self.hotplug.reboot_cpu.store(
            cpu.unwrap_or(usize::MAX),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Whether `cpu`'s bring-up handshake is at rest (DEAD): no thread of it runs or is
    /// coming, so it may be brought up.
    pub(crate) fn handshake_dead(&self, cpu: CpuId) -> bool {
        self.hotplug.cpus[cpu].handshake.state() == super::handshake::HsState::Dead
    }

    /// How long a handshake wait spins before it sleeps: [`HANDSHAKE_SPIN`] when every
    /// logical CPU can have a host core, none when they share cores (then a spinning AP or
    /// controller holds the core that the thread it waits for needs: with 8 CPUs on 2 cores a
    /// crash_kexec's parallel boot went from 1.4-1.8x to 2.6-2.9x its floor with the spin).
    pub(crate) fn handshake_spin(&self) -> Duration {
        if self.machine().cpus().len() <= self.machine().cores().len().max(1) {
            HANDSHAKE_SPIN
        } else {
            Duration::ZERO
        }
    }

    /// The next time step `step` runs on `cpu`, it fails (the kernel's `st->fail`), without
    /// checking the name: for the crate's own tests.
    #[cfg(test)]
    pub(crate) fn fail_next_step(&self, cpu: CpuId, step: &str) {
        let id = self.hotplug.lock.lock().unwrap().by_name(step);
        assert!(id.is_some(), "no hotplug step {step}");
        *self.hotplug.cpus[cpu].fail.lock().unwrap() = id;
    }
}

impl HotplugLayer {
    /// The `stop` layer below: stop routine, park policy, the CPU hotplug lock.
    #[inline]
    pub(crate) fn stop(&self) -> &StopLayer {
        &self.stop_layer
    }

    /// The `ipi` layer, through the stop layer.
    #[inline]
    pub(crate) fn ipi(&self) -> &IpiLayer {
        &self.stop_layer.ipi_layer
    }

    /// The `cpu` layer, through the stop layer.
    #[inline]
    pub(crate) fn machine(&self) -> &Machine {
        &self.stop_layer.ipi_layer.machine
    }
}

impl HotplugLayer {
    /// The hotplug layer over `stop`; its CPU threads are configured by `threads`.
    pub(crate) fn new(
        stop: StopLayer,
        boot_timeout: Duration,
        threads: super::thread::ThreadConfig,
    ) -> Self {
        let n = stop.machine().cpus().len();
        HotplugLayer {
            stop_layer: stop,
            hotplug: HotplugState::new(n),
            boot_timeout,
            threads: super::thread::Threads::new(threads, n),
        }
    }
}
