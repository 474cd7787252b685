//! The stop backend: the small, per-"architecture" part of stopping CPUs (seed 000/001). The
//! common routine calls it with the attempt number, so a backend can change its means on
//! later attempts (x86 and arm64 send a maskable IPI first, then an NMI).

use std::fmt::Debug;

use crate::cpu::mask::CpuMask;
use crate::ipi::layer::IpiLayer;

/// How a backend reaches the CPUs it is asked to stop.
pub struct StopSender<'a> {
    pub(crate) ipi: &'a IpiLayer,
}

impl std::fmt::Debug for StopSender<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopSender").finish_non_exhaustive()
    }
}

impl StopSender<'_> {
    /// Sends the maskable stop IPI (a dedicated vector; a CPU with irqs soft-masked takes it
    /// only at `irq_restore`).
    pub fn ipi(&self, mask: &CpuMask) {
        for cpu in mask.iter() {
            crate::ipi::call::send_vector(self.ipi, cpu, crate::ipi::call::VECTOR_STOP);
        }
    }

    /// Sends the NMI stop (taken even with irqs soft-masked; not by a CPU that blocks the
    /// signal itself).
    pub fn nmi(&self, mask: &CpuMask) {
        for cpu in mask.iter() {
            if let Some(st) = self.ipi.machine().cpu(cpu) {
                crate::ipi::nmi::send(self.ipi, st, crate::ipi::NmiReason::Stop);
            }
        }
    }
}

/// The backend hooks (the seed's `arch_smp_stop_call` / `arch_smp_crash_call` /
/// `arch_smp_cpus_stop_complete`). `attempt` starts at 1. Within one attempt the routine may
/// call `stop_call`/`crash_call` again for CPUs that declined the stop because it found them
/// inside the C library (they would have parked holding its locks).
pub trait StopBackend: Send + Sync + Debug {
    /// Asks the CPUs in `mask` to stop.
    fn stop_call(&self, send: &StopSender<'_>, mask: &CpuMask, attempt: u32);
    /// Asks them to crash-stop (save registers, then stop). Defaults to `stop_call`; the
    /// receivers save registers whenever the stop is a crash, whatever the means.
    fn crash_call(&self, send: &StopSender<'_>, mask: &CpuMask, attempt: u32) {
        self.stop_call(send, mask, attempt)
    }
    /// Runs on the stopping thread after the last attempt of a plain stop.
    fn stop_complete(&self) {}
    /// Runs on the stopping thread after the last attempt of a crash-stop.
    fn crash_complete(&self) {}
}

/// The default: a maskable IPI on attempt 1, the NMI from attempt 2 on.
#[derive(Debug, Default)]
pub struct DefaultBackend;

impl StopBackend for DefaultBackend {
    fn stop_call(&self, send: &StopSender<'_>, mask: &CpuMask, attempt: u32) {
        if attempt <= 1 {
            send.ipi(mask)
        } else {
            send.nmi(mask)
        }
    }
}

/// A backend that only ever sends the maskable IPI (to compare against the default: CPUs with
/// irqs masked are never stopped by it).
#[derive(Debug, Default)]
pub struct IpiOnlyBackend;

impl StopBackend for IpiOnlyBackend {
    fn stop_call(&self, send: &StopSender<'_>, mask: &CpuMask, _attempt: u32) {
        send.ipi(mask)
    }
}
