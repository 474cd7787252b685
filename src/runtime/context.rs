//! "Which CPU am I?" and the soft irq mask, re-exported for users.
//!
//! A logical CPU's thread (and every signal handler that interrupts it) finds its CPU through a
//! const-initialised thread-local pointer: no lazy initialisation, no destructor, so reading it
//! is a plain TLS load and safe in a signal handler. Several runtimes can coexist because each
//! thread points at its own runtime's state.
//!
//! The soft irq mask (`irq_save`/`irq_restore`, powerpc's lazy masking): masking sets a per-CPU
//! flag; an IPI handler that finds the flag set records "pending" and returns; the outermost
//! `irq_restore` replays what was deferred. Only the CPU's own thread and its handlers touch the
//! flag, so Relaxed atomics plus a compiler fence (the C `atomic_signal_fence`) order it.

//!
//! The thread-local CPU lives in the bottom layer (`cpu/context.rs`), the soft irq mask in the
//! IPI layer that it masks (`ipi/irq.rs`), where every layer above can reach them.

pub use crate::cpu::context::{cpu_relax, this_cpu};
pub use crate::ipi::irq::{irq_restore, irq_save, irqs_disabled, IrqFlags};
