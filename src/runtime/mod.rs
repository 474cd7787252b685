//! The runtime, the composition root: `Builder`/`Runtime`/`Handle`, the CPU thread's entry
//! and idle loop, the event log and trace export.
//!
//! | file | what |
//! |---|---|
//! | `builder.rs` | `Builder`, `Config`, defaults and validation |
//! | `rt.rs` | `Runtime`, `Handle`, `Shared` (builds the layers' state and registers their hooks), statistics, jobs |
//! | `api.rs` | the lower layers' public API on `Handle`, forwarded to each layer |
//! | `thread.rs` | the CPU thread: start, boot hook, idle loop, exit |
//! | `context.rs` | re-exports `this_cpu()`, `irq_save()`/`irq_restore()`, `cpu_relax()` from `cpu/context.rs` |
//! | `percpu.rs` | `PerCpu<T>` |
//! | `logger.rs`, `trace.rs` | the event rings' drain to `tracing`, Perfetto export |
//! | `faults.rs` | `usmp::fault::Faults` (feature `fault-injection`) |
//! | `error.rs` | `RuntimeError` |
//! | `liveness.rs` | a handle of a shut-down runtime, or in a `fork()` child, fails fast |
//!
//! The layers are listed once, in `lib.rs`. This one sits above `hotplug` and imports from
//! every layer below; none of them imports from it.

mod api;
pub mod builder;
pub mod context;
pub mod error;
#[cfg(feature = "fault-injection")]
pub(crate) mod faults;
pub(crate) mod liveness;
pub(crate) mod logger;
pub mod percpu;
pub mod rt;
pub mod trace;
