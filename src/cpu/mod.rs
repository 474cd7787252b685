//! The bottom layer: per-CPU primitives that know nothing of IPIs, stops, hotplug or kexec.
//!
//! | file | what |
//! |---|---|
//! | `machine.rs` | `Machine`: the CPUs of one runtime, their masks, job queueing (every layer's base) |
//! | `state.rs` | `CpuState`: what one logical CPU shares with others; `CpuRunState`; counters |
//! | `jobs.rs` | `Job`, `JobHandoff`: the job channel, its gate, and the held / in-job-code flags |
//! | `identity.rs` | `CpuIdentity`: the CPU's number and the OS thread that runs it (tid, core, handle) |
//! | `context.rs` | `this_cpu()`, `cpu_relax()`: the thread-local CPU |
//! | `call_queue.rs` | the per-CPU closable lock-free call queue (the kernel's llist), loom-checked |
//! | `mask.rs` | `CpuMask`, `AtomicCpuMask` and the kernel's list format |
//! | `idle.rs` | poll-then-sleep and the doorbell decision (a loom-checked protocol) |
//! | `events.rs` | the NMI-safe per-CPU event rings |
//! | `wait.rs` | the one wait primitive: `Deadline` on one clock, `Waiter` spin -> yield -> futex sleep |
//! | `futex.rs`, `clock.rs` | async-signal-safe sleep/wake (typed results) and time |
//! | `affinity.rs` | the only user of the affinity API |
//! | `lock.rs` | `lock_unpoisoned()`: the mutex lock that survives a panicking holder |

pub(crate) mod affinity;
pub(crate) mod call_queue;
pub(crate) mod clock;
pub(crate) mod context;
pub mod events;
pub(crate) mod futex;
pub(crate) mod identity;
pub mod idle;
pub(crate) mod jobs;
pub(crate) mod lock;
pub(crate) mod machine;
pub mod mask;
pub(crate) mod state;
pub(crate) mod wait;
