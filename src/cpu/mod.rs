//! The bottom layer: per-CPU primitives that know nothing of IPIs, stops, hotplug or kexec.
//!
//! | file | what |
//! |---|---|
//! | `mask.rs` | `CpuMask`, `AtomicCpuMask` and the kernel's list format |
//! | `idle.rs` | poll-then-sleep and the doorbell decision (a loom-checked protocol) |
//! | `events.rs` | the NMI-safe per-CPU event rings |
//! | `futex.rs`, `clock.rs` | async-signal-safe sleep/wake and time |
//! | `affinity.rs` | the only user of the affinity API |

pub(crate) mod affinity;
pub(crate) mod clock;
pub mod events;
pub(crate) mod futex;
pub mod idle;
pub mod mask;
