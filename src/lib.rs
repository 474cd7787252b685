//! # usmp — a user-space SMP runtime
//!
//! Pinned OS threads act as logical CPUs; they receive IPIs as real-time signals; a controller
//! brings CPUs up and down, stops them all, and hands over to a new "image" the way kexec does.
//! It is modelled on Linux's `kernel/smp.c`, `kernel/cpu.c` and `kernel/stop_machine.c`.
//!
//! ## Map
//!
//! **Start here** — [`Builder`] → [`Runtime`] (owns the CPUs) → [`Handle`] (cheap clone).
//!
//! **Work on CPUs** — [`Handle::run_on`] (ordinary jobs, may block) · [`this_cpu`] ·
//! [`irq_save`]/[`irq_restore`] (soft irq mask, nestable) · [`cpu_relax`] · [`PerCpu`].
//!
//! **IPIs** ([`ipi`]) — [`Handle::call_single`] · [`Handle::call_single_async`] ·
//! [`Handle::call_many`] · [`Handle::call_all_but_self`] · [`Handle::on_each_cpu`] ·
//! [`Handle::nmi_backtrace`]; errors: [`IpiError`]. Callbacks run in IPI context: read the
//! rules in [`ipi`].
//!
//! **Hotplug** (`hotplug`) — [`Handle::cpu_up`] · [`Handle::cpu_down`] ·
//! [`Handle::setup_state`] / [`Handle::remove_state`] · [`Handle::hotplug_disable`] /
//! [`Handle::hotplug_enable`] · [`Handle::stop_machine`]; errors: [`HotplugError`].
//!
//! **Stop** (`stop`) — [`Handle::send_stop`] · [`Handle::crash_stop`] ([`StopOutcome`],
//! [`CrashNote`]) · [`StopBackend`] (told the attempt number) · [`ParkPolicy`] · [`StopMode`].
//!
//! **Kexec** (`kexec`) — [`Handle::kexec`] · [`Handle::crash_kexec`] ([`KexecOutcome`],
//! [`KexecReport`], [`CrashRecord`]).
//!
//! **Masks** — [`CpuMask`] (kernel list format "0-3,7" both ways) · possible / present / online
//! / active masks on [`Handle`].
//!
//! **Observability** — [`Handle::stats`] · event rings drained to `tracing` · Perfetto export
//! ([`trace::write_chrome_trace`]).
//!
//! ## Layers
//!
//! | layer | modules | what |
//! |---|---|---|
//! | 6 | `kexec` | the handoff from one runtime (image) to the next, which it builds |
//! | 5 | `runtime` | composition root: `Builder`, `Runtime`, `Handle` |
//! | 4 | `hotplug` | the step table, the bring-up handshake, `cpu_up`/`cpu_down`, the CPU thread and its idle loop (smpboot) |
//! | 3 | `stop` | `send_stop`/`crash_stop`, parking, `stop_machine` |
//! | 2 | [`ipi`] | call queue, doorbell signal and its in-flight flag, the soft irq mask, NMI, signal handlers |
//! | 1 | `cpu`, `inject` | per-CPU state and primitives (masks, call queue, idle word, job hand-off, event rings, futex, clock, the thread-local CPU); fault hooks |
//! | 0 | `sync` | the loom facade the protocol files import their atomics from |
//!
//! A module may use its own layer and the ones below, and names the module an item lives in
//! (never `crate::Item`); `tests/layering.rs` checks every `crate::` path against this table,
//! and no import points up. Each layer's state holds the one below as a named field, reached
//! by an accessor that names it (no `Deref` between layers): the `cpu` layer's `Machine` (CPUs,
//! masks, jobs) in the `ipi` layer's `IpiLayer` (csd pool, NMI hooks; `ipi.machine()`), in
//! `stop`'s `StopLayer` (`stop.ipi()`), in `hotplug`'s `HotplugLayer` (`hotplug.stop()`), in
//! the runtime's `Shared` (`shared.hotplug()`, and `stop()`/`ipi()`/`machine()` straight to the
//! lower ones), which [`Handle`] points at and forwards to. A lower layer that must act above it calls a
//! hook registered at build: the masked section the job wake-up runs in (`cpu` -> `ipi`'s
//! soft irq mask), the stop receiver (`ipi`'s handlers -> `stop`). The CPU thread belongs to `hotplug`, which starts it and
//! hands it an `Arc` of its own layer (no hook back into the runtime). Only
//! `ipi::signal` touches signals; only `cpu/affinity.rs` touches CPU affinity.
//!
//! ```
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//! let rt = usmp::Builder::new().cpus(4).build()?;
//! let hits = Arc::new(AtomicUsize::new(0));
//! let h = hits.clone();
//! // Runs on CPUs 1-3 in IPI context (the caller is not a CPU, so it is not excluded).
//! rt.call_many(&"1-3".parse()?, move || { h.fetch_add(1, Ordering::Relaxed); }, true)?;
//! assert_eq!(hits.load(Ordering::Relaxed), 3);
//! // An ordinary job may block and allocate.
//! let cpu = rt.run_on(2, || usmp::this_cpu())?.join()?;
//! assert_eq!(cpu, Some(2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]
#![cfg_attr(loom, allow(dead_code, unused_imports))]

mod sync;

#[cfg(not(loom))]
mod inject;

/// Fault injection for torture tests (feature `fault-injection`, off by default): the switches
/// of [`Handle::faults`] and the deliberately broken protocol variants a checker must catch.
#[cfg(all(not(loom), feature = "fault-injection"))]
pub mod fault {
    pub use crate::inject::{Broken, FaultCounters};
    pub use crate::runtime::faults::{resume_on_release, wedge_this_cpu, Faults};
}

#[cfg(not(loom))]
mod cpu;
#[cfg(not(loom))]
mod hotplug;
#[cfg(not(loom))]
pub mod ipi;
#[cfg(not(loom))]
mod kexec;
#[cfg(not(loom))]
mod runtime;
#[cfg(not(loom))]
mod stop;

#[cfg(not(loom))]
pub use cpu::events::{Event, EventKind};
#[cfg(not(loom))]
pub use cpu::idle::IdlePolicy;
#[cfg(not(loom))]
pub use cpu::mask::{CpuId, CpuMask};
#[cfg(not(loom))]
pub use cpu::state::CpuRunState;
#[cfg(not(loom))]
pub use hotplug::{HotplugError, Section, StateId, StepFn, StepResult};
#[cfg(not(loom))]
pub use ipi::IpiError;
#[cfg(not(loom))]
pub use kexec::exec;
#[cfg(not(loom))]
pub use kexec::{
    CrashRecord, Handoff, KexecError, KexecOutcome, KexecReport, RecordError, TimelineEntry,
};
#[cfg(not(loom))]
pub use runtime::builder::{Builder, Config, DEFAULT_SIGNAL_STACK, MAX_CPUS};
#[cfg(not(loom))]
pub use runtime::context::{cpu_relax, irq_restore, irq_save, irqs_disabled, this_cpu, IrqFlags};
#[cfg(not(loom))]
pub use runtime::error::RuntimeError;
#[cfg(not(loom))]
pub use runtime::percpu::PerCpu;
#[cfg(not(loom))]
pub use runtime::rt::{CpuStats, Handle, JobHandle, Runtime, RuntimeStats};
#[cfg(not(loom))]
pub use runtime::trace;
#[cfg(not(loom))]
pub use stop::{
    Attempt, CrashNote, DefaultBackend, IpiOnlyBackend, ParkPolicy, StopBackend, StopConfig,
    StopError, StopFn, StopMachineError, StopMode, StopOutcome, StopSender,
};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

// Under `--cfg loom` only the protocol files are compiled, with loom's atomics, and their
// `loom_*` model tests run (`RUSTFLAGS="--cfg loom" cargo test --lib --release loom_`).
#[cfg(loom)]
mod ipi {
    pub(crate) mod csd;
}
#[cfg(loom)]
mod cpu {
    pub(crate) mod call_queue;
    pub(crate) mod clock;
    pub(crate) mod futex;
    pub(crate) mod idle;
    pub(crate) mod wait;
    /// The CPU id type, as in `mask.rs` (the rest of that file is not a protocol).
    pub(crate) mod mask {
        pub type CpuId = usize;
    }
}
#[cfg(loom)]
mod hotplug {
    pub(crate) mod handshake;
    pub(crate) mod parking;
}
#[cfg(loom)]
mod stop {
    pub(crate) mod coord;
    pub(crate) mod cpus_lock;
}
