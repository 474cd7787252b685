//! `Machine`: the bottom of a runtime's state, what every layer reads about its CPUs — the
//! per-CPU states, the possible / present / online / active masks, the event ring for threads
//! outside the runtime, the fault injector, the job queues, and the "retired" flag of an image
//! that has handed over (kexec).
//!
//! Each layer above holds the one below as a named field and reaches it through an accessor
//! (`ipi.machine()`, `stop.ipi()`, `hotplug.stop()`, `shared.hotplug()`), never through `Deref`:
//! a call site says which layer it touches, and a name defined at two layers cannot resolve to
//! the wrong one.

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_utils::CachePadded;

use super::events::EventRing;
use super::jobs::Job;
use super::mask::{AtomicCpuMask, CpuId};
use super::state::CpuState;

/// A section run with the calling CPU's interrupts held off, registered by the layer above
/// (the IPI layer's soft irq mask) at build: the job wake-up runs in it. Without one
/// registered the section runs as is.
pub(crate) type MaskedSection = fn(f: &mut dyn FnMut());

/// Why a job was not queued (the runtime turns it into its `RuntimeError`, with the same
/// message).
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobRefused {
    /// The CPU id is not below the CPU count.
    #[error("CPU {cpu} does not exist (runtime has {cpus} CPUs)")]
    InvalidCpu { cpu: CpuId, cpus: usize },
    /// The image has handed over to the next one.
    #[error(
        "generation {generation} has handed over to the next image (kexec); use the next runtime"
    )]
    Retired { generation: u64 },
    /// The CPU takes no jobs.
    #[error("CPU {cpu} is offline")]
    Offline { cpu: CpuId },
}

/// The CPUs of one runtime. Lives as long as any thread of the runtime.
pub(crate) struct Machine {
    /// Tells runtimes apart (a thread of one never acts as a CPU of another).
    pub(super) id: u64,
    pub(super) cpus: Box<[CachePadded<CpuState>]>,
    pub(super) possible: AtomicCpuMask,
    pub(super) present: AtomicCpuMask,
    pub(super) online: AtomicCpuMask,
    pub(super) active: AtomicCpuMask,
    /// Events written by threads outside the runtime.
    pub(super) ext_ring: EventRing,
    /// The host cores CPU threads may be pinned to.
    pub(super) cores: Vec<core_affinity::CoreId>,
    /// Fault-injection switches (inert without the `fault-injection` feature).
    pub(super) faults: crate::inject::FaultState,
    /// This image has handed over to the next one: it runs nothing and changes nothing any
    /// more; every mutating call fails with a typed `Retired` error.
    pub(super) retired: AtomicBool,
    /// Generation of this image (0 for the first; each kexec adds one).
    pub(super) generation: u64,
    masked_section: Option<MaskedSection>,
}

impl Machine {
    /// Every possible CPU's state, indexed by CPU number.
    #[inline]
    pub(crate) fn cpus(&self) -> &[CachePadded<CpuState>] {
        &self.cpus
    }

    /// The CPUs that exist (`cpu_possible_mask`).
    #[inline]
    pub(crate) fn possible(&self) -> &AtomicCpuMask {
        &self.possible
    }

    /// The CPUs that may be brought up (`cpu_present_mask`).
    #[inline]
    pub(crate) fn present(&self) -> &AtomicCpuMask {
        &self.present
    }

    /// The CPUs that take IPIs (`cpu_online_mask`).
    #[inline]
    pub(crate) fn online(&self) -> &AtomicCpuMask {
        &self.online
    }

    /// The CPUs that take jobs (`cpu_active_mask`).
    #[inline]
    pub(crate) fn active(&self) -> &AtomicCpuMask {
        &self.active
    }

    /// Events written by threads outside the runtime.
    #[inline]
    pub(crate) fn ext_ring(&self) -> &EventRing {
        &self.ext_ring
    }

    /// The host cores CPU threads may be pinned to.
    #[inline]
    pub(crate) fn cores(&self) -> &[core_affinity::CoreId] {
        &self.cores
    }

    /// The fault-injection switches (inert without the `fault-injection` feature).
    #[inline]
    pub(crate) fn faults(&self) -> &crate::inject::FaultState {
        &self.faults
    }

    /// Whether this image has handed over to the next one.
    #[inline]
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// The image hands over: from now on it runs nothing and changes nothing.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Generation of this image (0 for the first; each kexec adds one).
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

impl Machine {
    /// `n` CPUs, all offline, with empty masks.
    pub(crate) fn new(
        id: u64,
        n: usize,
        ring_cap: usize,
        log: bool,
        cores: Vec<core_affinity::CoreId>,
        generation: u64,
    ) -> Self {
        Machine {
            id,
            cpus: (0..n)
                .map(|c| CachePadded::new(CpuState::new(c, ring_cap, log)))
                .collect(),
            possible: AtomicCpuMask::new(n),
            present: AtomicCpuMask::new(n),
            online: AtomicCpuMask::new(n),
            active: AtomicCpuMask::new(n),
            ext_ring: EventRing::with_enabled(ring_cap, log),
            cores,
            faults: crate::inject::FaultState::new(n),
            retired: AtomicBool::new(false),
            generation,
            masked_section: None,
        }
    }

    /// Registers the masked section (at build, by the layer above, before any CPU runs).
    pub(crate) fn set_masked_section(&mut self, hook: MaskedSection) {
        self.masked_section = Some(hook);
    }

    /// `idle.rs` step 2 for a job or an exit request, with the caller's interrupts held off
    /// ([`MaskedSection`]) when it is a CPU: a WAKING idle word is a token that stops every
    /// other sender from waking `cpu`, so its holder must not be interrupted between the CAS
    /// and the futex wake (a handler that waits for `cpu` there would wait for good).
    fn wake_for_job(&self, cpu: &CpuState) {
        match self.masked_section {
            Some(section) => section(&mut || cpu.idle().wake_for_job()),
            None => cpu.idle().wake_for_job(),
        }
    }

    /// Asks CPU `cpu`'s thread to leave its idle loop, waking it if it sleeps (it checks
    /// between jobs, so a running job finishes first).
    pub(crate) fn request_exit(&self, cpu: CpuId) {
        let st = &self.cpus[cpu];
        st.mark_exit();
        self.wake_for_job(st);
    }

    /// The event ring of the calling thread: its CPU's, or the external one.
    #[inline]
    pub(crate) fn ring_here(&self) -> &EventRing {
        match super::context::current() {
            Some((m, c)) if m.id == self.id => &c.ring,
            _ => &self.ext_ring,
        }
    }

    /// The calling thread's CPU id if it is a CPU of *this* runtime.
    #[inline]
    pub(crate) fn this_cpu_here(&self) -> Option<CpuId> {
        match super::context::current() {
            Some((m, c)) if m.id == self.id => Some(c.id()),
            _ => None,
        }
    }

    pub(crate) fn cpu(&self, cpu: CpuId) -> Option<&CpuState> {
        self.cpus.get(cpu).map(|c| &**c)
    }

    /// Queues a job on an active CPU; on refusal the job is handed back, never dropped.
    pub(crate) fn queue_job(&self, cpu: CpuId, job: Job) -> Result<(), (JobRefused, Job)> {
        let Some(st) = self.cpu(cpu) else {
            let e = JobRefused::InvalidCpu {
                cpu,
                cpus: self.cpus.len(),
            };
            return Err((e, job));
        };
        if self.retired.load(Ordering::SeqCst) {
            let generation = self.generation;
            return Err((JobRefused::Retired { generation }, job));
        }
        let gate = st.jobs().lock_gate();
        if !*gate {
            return Err((JobRefused::Offline { cpu }, job));
        }
        let r = self.push_job(cpu, job);
        drop(gate);
        r
    }

    /// Queues a job whatever the gate says: hotplug's ONLINE steps run on a CPU that is not
    /// (or no longer) active.
    pub(crate) fn queue_job_internal(&self, cpu: CpuId, job: Job) -> Result<(), JobRefused> {
        self.push_job(cpu, job).map_err(|(e, _)| e)
    }

    fn push_job(&self, cpu: CpuId, job: Job) -> Result<(), (JobRefused, Job)> {
        let st = &self.cpus[cpu];
        if let Err(job) = st.jobs().push(job) {
            return Err((JobRefused::Offline { cpu }, job));
        }
        self.wake_for_job(st);
        Ok(())
    }
}
