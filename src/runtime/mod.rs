//! The runtime: logical CPUs as pinned threads, their per-CPU state, idle, the soft irq mask,
//! the event log and trace export.
//!
//! | file | what |
//! |---|---|
//! | `builder.rs` | `Builder`, `Config`, defaults and validation |
//! | `rt.rs` | `Runtime`, `Handle`, `Shared`, statistics, jobs |
//! | `cpu.rs` | `CpuState`: everything one logical CPU shares with others |
//! | `thread.rs` | the CPU thread: start, boot hook, idle loop, exit |
//! | `idle.rs` | poll-then-sleep and the doorbell decision (a loom-checked protocol) |
//! | `context.rs` | `this_cpu()`, `irq_save()`/`irq_restore()`, `cpu_relax()` |
//! | `cpumask.rs` | `CpuMask` and the kernel's list format |
//! | `percpu.rs` | `PerCpu<T>` |
//! | `affinity.rs` | the only user of the affinity API |
//! | `futex.rs`, `clock.rs` | async-signal-safe sleep/wake and time |
//! | `lock.rs` | `lock_unpoisoned()`: the mutex lock that survives a panicking holder |
//! | `events.rs`, `logger.rs`, `trace.rs` | the NMI-safe event rings, their drain, Perfetto export |
//! | `error.rs` | `RuntimeError` |
//!
//! The runtime is the bottom layer. Its deliberate exceptions, each one the kernel also has:
//! - the idle loop and `irq_restore` serve the IPI queue (the kernel's idle loop calls
//!   `flush_smp_call_function_queue` too), and `build()` installs the IPI signal handlers;
//! - the CPU thread runs hotplug's AP side (`secondary_start_kernel` is arch code calling into
//!   `kernel/cpu.c`);
//! - `Config` and `Shared` hold every layer's settings and per-runtime storage (the hotplug
//!   table, the stop coordination word, the "stopping" flag), so one `Builder` configures a
//!   runtime; the logic stays in its own layer.

pub(crate) mod affinity;
pub mod builder;
pub(crate) mod clock;
pub mod context;
pub(crate) mod cpu;
pub mod cpumask;
pub mod error;
pub mod events;
pub(crate) mod futex;
pub mod idle;
pub(crate) mod lock;
pub(crate) mod logger;
pub mod percpu;
pub mod rt;
pub(crate) mod thread;
pub mod trace;
