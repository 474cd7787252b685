//! The runtime, the top layer and composition root: `Builder`/`Runtime`/`Handle`, the CPU
//! thread's entry and idle loop, per-CPU state, the soft irq mask, the event log and trace
//! export.
//!
//! | file | what |
//! |---|---|
//! | `builder.rs` | `Builder`, `Config`, defaults and validation |
//! | `rt.rs` | `Runtime`, `Handle`, `Shared`, statistics, jobs |
//! | `thread.rs` | the CPU thread: start, boot hook, idle loop, exit |
//! | `context.rs` | `this_cpu()`, `irq_save()`/`irq_restore()`, `cpu_relax()` |
//! | `percpu.rs` | `PerCpu<T>` |
//! | `logger.rs`, `trace.rs` | the event rings' drain to `tracing`, Perfetto export |
//! | `faults.rs` | `usmp::fault::Faults` (feature `fault-injection`) |
//! | `error.rs` | `RuntimeError` |
//!
//! The layers and the imports that still point the wrong way are listed once, in `lib.rs`.

mod api;
pub mod builder;
pub mod context;
pub mod error;
#[cfg(feature = "fault-injection")]
pub(crate) mod faults;
pub(crate) mod logger;
pub mod percpu;
pub mod rt;
pub(crate) mod thread;
pub mod trace;
