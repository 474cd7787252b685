//! CPU hotplug: the state table, the bring-up handshake, `cpu_up` / `cpu_down`, the hotplug lock
//! and disable counter, and the flush of queued calls when a CPU dies.
//!
//! | file | what |
//! |---|---|
//! | `layer.rs` | `HotplugLayer`: this layer's state over the stop layer |
//! | `api.rs` | the public API: `cpu_up`, `cpu_down`, `setup_state`, disable/enable, probes |
//! | `states.rs` | the step table and `Section` (`cpuhp_hp_states[]`) |
//! | `engine.rs` | the step engine: walk the table up or down, roll back a failed walk |
//! | `handshake.rs` | the bring-up handshake (`cpuhp_ap_sync`), loom-checked |
//! | `bringup.rs` | the controller's side of bring-up and tear-down (spawn, handshake, reap) |
//! | `thread.rs` | the CPU's thread (smpboot): start-up, the idle loop, jobs, the dying flush, exit |
//! | `parking.rs` | the parking word: a CPU's thread sleeps across its offline time, loom-checked |
//! | `ap.rs` | what runs on the CPU itself: boot, STARTING steps, going online, DYING, exit |
//! | `migrate.rs` | `sched:active` teardown: queued jobs move to another CPU |
//! | `shutdown.rs` | the kexec path's shutdown of all non-boot CPUs, on the same engine |
//!
//! Kernel mapping: `cpuhp_setup_state` = [`Handle::setup_state`](crate::Handle::setup_state),
//! `cpu_device_up/down` = `cpu_up`/`cpu_down`, `cpu_hotplug_disable/enable` =
//! `hotplug_disable`/`hotplug_enable`, `st->fail` = `usmp::fault::Faults::fail_step` (feature `fault-injection`),
//! `smpcfd_dying_cpu` = the `ap:online` teardown, `init_mm.mm_count` = `init_mm_refs`.

pub(crate) mod ap;
mod api;
mod bringup;
mod engine;
pub(crate) mod handshake;
pub(crate) mod layer;
mod migrate;
mod parking;
mod shutdown;
pub mod states;
pub(crate) mod thread;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Mutex;

pub use states::{Section, StateId, StepFn, StepResult};

use crate::cpu::mask::CpuId;
use crate::stop::machine::StopMachineError;

/// Why a hotplug operation was refused or failed. A refusal leaves every state unchanged; a
/// failed step has been rolled back.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The CPU id is not below the runtime's CPU count; pass an id below `cpus`.
    #[error("cpu_up/down: CPU {cpu} does not exist (runtime has {cpus})")]
    InvalidCpu {
        /// The CPU asked for.
        cpu: CpuId,
        /// How many CPUs the runtime has.
        cpus: usize,
    },
    /// `cpu_up` on a CPU that is already online; nothing to do.
    #[error("cpu_up: CPU {cpu} is already online")]
    AlreadyOnline {
        /// The CPU asked for.
        cpu: CpuId,
    },
    /// `cpu_down` on a CPU that is already offline; nothing to do.
    #[error("cpu_down: CPU {cpu} is already offline")]
    AlreadyOffline {
        /// The CPU asked for.
        cpu: CpuId,
    },
    /// `cpu_down` would leave no CPU online; bring another CPU up first.
    #[error("cpu_down: CPU {cpu} is the last online CPU")]
    LastCpu {
        /// The last online CPU.
        cpu: CpuId,
    },
    /// Hotplug is disabled (`hotplug_disable`); retry after the matching `hotplug_enable`.
    #[error("CPU {cpu}: hotplug is disabled (busy)")]
    Disabled {
        /// The CPU asked for.
        cpu: CpuId,
    },
    /// The CPU is the reboot CPU of a kexec in progress and must stay up; retry after the kexec.
    #[error("cpu_down: CPU {cpu} is the reboot CPU of a kexec in progress (busy)")]
    RebootCpu {
        /// The reboot CPU.
        cpu: CpuId,
    },
    /// `cpu_down` was called on the CPU it would take down; call it from another CPU or thread.
    #[error("cpu_down: CPU {cpu} cannot take itself down; call from another CPU or thread")]
    SelfDown {
        /// The calling CPU, which is also the target.
        cpu: CpuId,
    },
    /// An earlier bring-up or teardown of the CPU timed out and its thread has not exited yet;
    /// retry once it has.
    #[error("cpu_up: CPU {cpu} timed out earlier and has not reported dead yet (limbo)")]
    Limbo {
        /// The CPU in limbo.
        cpu: CpuId,
    },
    /// The CPU was parked by a stop, or lost by the previous image; it cannot come back.
    #[error("cpu_up: CPU {cpu} is parked by a stop (or lost by the previous image) and cannot be brought up")]
    Parked {
        /// The parked CPU.
        cpu: CpuId,
    },
    /// The CPU's thread did not report ALIVE within the boot timeout; the CPU stays offline and
    /// its thread exits when it gets there.
    #[error(
        "cpu_up: CPU {cpu} did not reach ALIVE within {timeout_ms} ms; it will die on its own"
    )]
    BootTimeout {
        /// The CPU being brought up.
        cpu: CpuId,
        /// The boot timeout waited, in ms.
        timeout_ms: u64,
    },
    /// The CPU went offline but its thread did not exit within the timeout; it is in limbo until
    /// it does.
    #[error("cpu_down: CPU {cpu} did not exit within {timeout_ms} ms after going offline")]
    TeardownTimeout {
        /// The CPU being taken down.
        cpu: CpuId,
        /// The time waited for its thread to exit, in ms.
        timeout_ms: u64,
    },
    /// A hotplug state's step failed; the steps already done were rolled back.
    #[error("cpu_{}: step {step} failed on CPU {cpu}: {reason} (rolled back)", if *up { "up" } else { "down" })]
    StepFailed {
        /// The CPU being brought up or down.
        cpu: CpuId,
        /// Name of the hotplug state whose step failed.
        step: String,
        /// `true` for `cpu_up`, `false` for `cpu_down`.
        up: bool,
        /// What the step reported.
        reason: String,
    },
    /// The OS refused to start the CPU's thread (see `source`); the CPU stays offline.
    #[error("cpu_up: CPU {cpu}: could not spawn its thread")]
    Spawn {
        /// The CPU being brought up.
        cpu: CpuId,
        /// The error from spawning the thread.
        #[source]
        source: std::io::Error,
    },
    /// No hotplug state has this name or id.
    #[error("no hotplug state {0:?}")]
    UnknownState(String),
    /// `setup_state`: the startup callback failed on a CPU; it was undone on every CPU and the
    /// state was not added.
    #[error("setup_state {name}: startup failed on CPU {cpu}: {reason} (undone on all CPUs)")]
    SetupFailed {
        /// Name of the state being set up.
        name: String,
        /// The CPU whose startup callback failed.
        cpu: CpuId,
        /// What the callback reported.
        reason: String,
    },
    /// This image handed over to the next one (kexec); use the next runtime.
    #[error(
        "generation {generation} has handed over to the next image (kexec): no more hotplug here"
    )]
    Retired {
        /// Generation of this (retired) image.
        generation: u64,
    },
    /// The runtime has shut down (its `Runtime` was dropped or `shutdown()` called): a
    /// `Handle` that outlived it reaches no CPU and brings none up.
    #[error("hotplug: the runtime has shut down")]
    ShutDown,
    /// This process is a `fork()` child of the one that built the runtime: it has none of the
    /// runtime's CPU threads, so nothing can run on them here.
    #[error("hotplug: the runtime was built by process {builder_pid}; this is its fork() child {pid}, which has no CPU threads")]
    Forked {
        /// The process that built the runtime.
        builder_pid: u32,
        /// This process.
        pid: u32,
    },
    /// `hotplug_enable` was called more times than `hotplug_disable`.
    #[error("hotplug_enable without a matching hotplug_disable")]
    UnbalancedEnable,
    /// A system stop (`send_stop`/`crash_stop`) has run or is running in this image: its
    /// CPUs are stopped for good, and none may come back (the stop is terminal; kexec to a
    /// new image instead).
    #[error("CPU {cpu}: the image has been stopped (send_stop/crash_stop): no more hotplug here")]
    Stopped {
        /// The CPU asked for.
        cpu: CpuId,
    },
    /// A hotplug call made from inside a hotplug operation (one of its PREPARE or ONLINE steps,
    /// or a `stop_machine` function under it): it would wait for the operation it runs in.
    /// Make the call after the operation returns, from another thread.
    #[error("{op}: called from inside a hotplug operation, which it would wait for")]
    Reentrant {
        /// The call that was refused (`cpu_up`, `cpu_down`, `setup_state`, ...).
        op: &'static str,
    },
    /// The `stop_machine` step of a hotplug operation failed.
    #[error(transparent)]
    StopMachine(#[from] StopMachineError),
}

/// Per-CPU hotplug bookkeeping.
pub(crate) struct HpCpu {
    /// The handshake word (`handshake.rs`).
    pub(super) handshake: handshake::Handshake,
    /// Whether this CPU's thread holds an `init_mm` reference.
    pub(super) has_ref: AtomicBool,
    /// Fault injection: the step that fails next (one-shot, either direction).
    pub(super) fail: Mutex<Option<states::StepId>>,
    /// What the AP runs during bring-up, prepared by the controller.
    pub(super) plan: Mutex<Option<ap::ApPlan>>,
    /// A STARTING step the AP reported as failed: (step, reason).
    pub(super) ap_failed: Mutex<Option<(states::StepId, &'static str)>>,
}

/// Runtime-wide hotplug state (lives in the hotplug layer, `layer.rs`).
pub(crate) struct HotplugState {
    /// The hotplug mutex (`cpu_maps_update_begin`), guarding the table.
    pub(super) lock: Mutex<states::Table>,
    /// `cpu_hotplug_disable` depth.
    pub(super) disabled: AtomicU32,
    /// The `init_mm.mm_count` stand-in: one reference per committed CPU thread.
    pub(super) init_mm: AtomicU64,
    /// A kexec's reboot CPU, which `cpu_down` refuses (`usize::MAX` = none).
    pub(super) reboot_cpu: std::sync::atomic::AtomicUsize,
    pub(super) cpus: Box<[HpCpu]>,
}

impl HotplugState {
    pub(crate) fn new(n: usize) -> Self {
        HotplugState {
            lock: Mutex::new(states::Table::new()),
            disabled: AtomicU32::new(0),
            init_mm: AtomicU64::new(0),
            reboot_cpu: std::sync::atomic::AtomicUsize::new(usize::MAX),
            cpus: (0..n)
                .map(|_| HpCpu {
                    handshake: handshake::Handshake::new(),
                    has_ref: AtomicBool::new(false),
                    fail: Mutex::new(None),
                    plan: Mutex::new(None),
                    ap_failed: Mutex::new(None),
                })
                .collect(),
        }
    }
}

pub(crate) use api::boot_all;
