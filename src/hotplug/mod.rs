//! CPU hotplug: the state table, the bring-up handshake, `cpu_up` / `cpu_down`, the hotplug lock
//! and disable counter, and the flush of queued calls when a CPU dies.
//!
//! | file | what |
//! |---|---|
//! | `api.rs` | the public API: `cpu_up`, `cpu_down`, `setup_state`, disable/enable, probes |
//! | `states.rs` | the step table and `Section` (`cpuhp_hp_states[]`) |
//! | `engine.rs` | the step engine: walk the table up or down, roll back a failed walk |
//! | `handshake.rs` | the bring-up handshake (`cpuhp_ap_sync`), loom-checked |
//! | `bringup.rs` | the controller's side of bring-up and tear-down (spawn, handshake, reap) |
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
mod migrate;
mod shutdown;
pub mod states;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Mutex;

pub use states::{Section, StateId, StepFn, StepResult};

use crate::cpu::mask::CpuId;
use crate::stop::machine::StopMachineError;

/// Why a hotplug operation was refused or failed. A refusal leaves every state unchanged; a
/// failed step has been rolled back.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("cpu_up/down: CPU {cpu} does not exist (runtime has {cpus})")]
    InvalidCpu { cpu: CpuId, cpus: usize },
    #[error("cpu_up: CPU {cpu} is already online")]
    AlreadyOnline { cpu: CpuId },
    #[error("cpu_down: CPU {cpu} is already offline")]
    AlreadyOffline { cpu: CpuId },
    #[error("cpu_down: CPU {cpu} is the last online CPU")]
    LastCpu { cpu: CpuId },
    #[error("CPU {cpu}: hotplug is disabled (busy)")]
    Disabled { cpu: CpuId },
    #[error("cpu_down: CPU {cpu} is the reboot CPU of a kexec in progress (busy)")]
    RebootCpu { cpu: CpuId },
    #[error("cpu_down: CPU {cpu} cannot take itself down; call from another CPU or thread")]
    SelfDown { cpu: CpuId },
    #[error("cpu_up: CPU {cpu} timed out earlier and has not reported dead yet (limbo)")]
    Limbo { cpu: CpuId },
    #[error("cpu_up: CPU {cpu} is parked by a stop (or lost by the previous image) and cannot be brought up")]
    Parked { cpu: CpuId },
    #[error(
        "cpu_up: CPU {cpu} did not reach ALIVE within {timeout_ms} ms; it will die on its own"
    )]
    BootTimeout { cpu: CpuId, timeout_ms: u64 },
    #[error("cpu_down: CPU {cpu} did not exit within {timeout_ms} ms after going offline")]
    TeardownTimeout { cpu: CpuId, timeout_ms: u64 },
    #[error("cpu_{}: step {step} failed on CPU {cpu}: {reason} (rolled back)", if *up { "up" } else { "down" })]
    StepFailed {
        cpu: CpuId,
        step: String,
        up: bool,
        reason: String,
    },
    #[error("cpu_up: CPU {cpu}: could not spawn its thread")]
    Spawn {
        cpu: CpuId,
        #[source]
        source: std::io::Error,
    },
    #[error("no hotplug state {0:?}")]
    UnknownState(String),
    #[error("setup_state {name}: startup failed on CPU {cpu}: {reason} (undone on all CPUs)")]
    SetupFailed {
        name: String,
        cpu: CpuId,
        reason: String,
    },
    #[error(
        "generation {generation} has handed over to the next image (kexec): no more hotplug here"
    )]
    Retired { generation: u64 },
    #[error("hotplug_enable without a matching hotplug_disable")]
    UnbalancedEnable,
    #[error(transparent)]
    StopMachine(#[from] StopMachineError),
}

/// Per-CPU hotplug bookkeeping.
pub(crate) struct HpCpu {
    /// The handshake word (`handshake.rs`).
    pub handshake: crate::sync::AtomicU32,
    /// Whether this CPU's thread holds an `init_mm` reference.
    pub has_ref: AtomicBool,
    /// Fault injection: the step that fails next (one-shot, either direction).
    pub fail: Mutex<Option<String>>,
    /// What the AP runs during bring-up, prepared by the controller.
    pub plan: Mutex<Option<ap::ApPlan>>,
    /// A STARTING step the AP reported as failed: (step, reason).
    pub ap_failed: Mutex<Option<(String, String)>>,
}

/// Runtime-wide hotplug state (lives in the runtime's shared block).
pub(crate) struct HotplugState {
    /// The hotplug mutex (`cpu_maps_update_begin`), guarding the table.
    pub lock: Mutex<states::Table>,
    /// `cpu_hotplug_disable` depth.
    pub disabled: AtomicU32,
    /// The `init_mm.mm_count` stand-in: one reference per committed CPU thread.
    pub init_mm: AtomicU64,
    /// A kexec's reboot CPU, which `cpu_down` refuses (`usize::MAX` = none).
    pub reboot_cpu: std::sync::atomic::AtomicUsize,
    pub cpus: Box<[HpCpu]>,
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
                    handshake: crate::sync::AtomicU32::new(handshake::DEAD),
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
