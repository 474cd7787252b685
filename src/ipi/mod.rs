//! IPIs: real-time-signal doorbells, the per-CPU call queue, csds, and the NMI channel.
//!
//! | file | what |
//! |---|---|
//! | `layer.rs` | `IpiLayer`: this layer's state over the machine, and the handlers' thread-local |
//! | `signal.rs` | the only caller of `sigaction`, `tgkill`, `pthread_sigmask`; register capture |
//! | `csd.rs` | the preallocated csd pool and the slot lifetime protocol |
//! | `call.rs` | `call_single`, `call_many`, ...: publish, ring, wait |
//! | `fatal.rs` | a panic in IPI context aborts with one line (the policy for user code) |
//! | `percpu.rs` | `IpiCpu`: one CPU's doorbell flag, soft irq mask, NMI reasons and vectors |
//! | `irq.rs` | the soft irq mask: `irq_save`/`irq_restore` and the handler's side of it |
//! | `handler.rs` | the IPI signal handler and the queue flush (`flush_smp_call_function_queue`) |
//! | `nmi.rs` | the NMI signal: reasons, hooks for upper layers, backtrace sampling |
//!
//! Kernel mapping: `smp_call_function_single` = [`Handle::call_single`](crate::Handle::call_single),
//! `smp_call_function_many` = `call_many`, `smp_call_function` = `call_all_but_self`,
//! `on_each_cpu` = `on_each_cpu`; `-ENXIO` = [`IpiError::Offline`].
//!
//! **IPI context.** A callback runs inside a signal handler (or with irqs soft-masked on the
//! CPU's own thread, which is equivalent). Like hardirq context in the kernel it must only use
//! atomics and preallocated memory: no allocation, no locks, no printing, no panics, no blocking.
//! Its closure is also dropped there, so it must not own the last reference to anything that
//! frees memory when dropped. Anything else belongs in a job ([`crate::Handle::run_on`]).
//!
//! **Stack.** On a busy CPU a callback runs on the CPU's alternate signal stack, 64 KiB by
//! default ([`crate::Builder::signal_stack`]), with a guard page below it: a callback that
//! needs more overflows into the guard and the process dies with SIGSEGV. Keep big buffers out
//! of callbacks, or raise the size.

pub(crate) mod call;
pub(crate) mod csd;
pub(crate) mod fatal;
pub(crate) mod handler;
pub(crate) mod irq;
pub(crate) mod layer;
pub(crate) mod nmi;
pub(crate) mod percpu;
pub(crate) mod signal;
pub use signal::has_handler;

pub use csd::CSD_INLINE_BYTES;
pub use nmi::NmiReason;

use crate::cpu::mask::{CpuId, CpuMask};

/// Why an IPI was not delivered. An IPI is delivered exactly once, or its sender gets one of
/// these.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IpiError {
    /// The target id is not below the runtime's CPU count.
    #[error("IPI to CPU {cpu}: no such CPU (runtime has {cpus})")]
    InvalidCpu {
        /// The target CPU.
        cpu: CpuId,
        /// How many CPUs the runtime has.
        cpus: usize,
    },
    /// The target is offline or going down (`-ENXIO`); the callback did not run.
    #[error("IPI to CPU {cpu}: CPU is offline")]
    Offline {
        /// The target CPU.
        cpu: CpuId,
    },
    /// A synchronous call gave up. `started == false`: the call was cancelled and will never
    /// run. `started == true`: the callback is running and has not finished.
    #[error("IPI to CPU {cpu}: non-responsive CSD lock after {waited_ms} ms (callback {})",
        if *started { "started, not finished" } else { "cancelled, never ran" })]
    Timeout {
        /// The target CPU.
        cpu: CpuId,
        /// How long the caller waited, in ms.
        waited_ms: u64,
        /// Whether the callback had started when the caller gave up.
        started: bool,
    },
    /// No free csd in the pool within the call timeout.
    #[error("IPI to CPU {cpu}: csd pool exhausted")]
    NoCsd {
        /// The target CPU.
        cpu: CpuId,
    },
    /// A synchronous call from a CPU with irqs soft-masked (or from IPI context) could deadlock.
    #[error("synchronous IPI from CPU {cpu} with irqs disabled")]
    IrqsDisabled {
        /// The calling CPU.
        cpu: CpuId,
    },
    /// `call_many`: the callback did not run (or did not finish) on `failed`.
    #[error("IPI to CPUs {failed}: {first}")]
    Partial {
        /// The CPUs where the callback did not run or did not finish.
        failed: CpuMask,
        /// The first error met.
        first: Box<IpiError>,
    },
    /// The signal number is not a usable real-time signal.
    #[error("signal {sig} is not a usable real-time signal ({min}..={max}, IPI and NMI distinct)")]
    BadSignal {
        /// The signal number asked for.
        sig: i32,
        /// `SIGRTMIN` on this host.
        min: i32,
        /// `SIGRTMAX` on this host.
        max: i32,
    },
    /// A synchronous call (or an NMI backtrace) timed out and the IPI (or NMI) signal's handler
    /// is no longer usmp's: another library replaced it after `build()`, so no doorbell (or
    /// NMI) reaches a busy CPU any more.
    #[error("IPI to CPU {cpu}: no answer within {waited_ms} ms, and signal {sig} no longer has usmp's handler (another library replaced it); busy CPUs cannot be reached")]
    HandlerReplaced {
        /// The target CPU.
        cpu: CpuId,
        /// The IPI signal number.
        sig: i32,
        /// How long the caller waited, in ms.
        waited_ms: u64,
    },
    /// Another handler already owns the signal; usmp refuses to replace it.
    #[error("signal {sig} already has a handler that is not usmp's")]
    SignalInUse {
        /// The signal number.
        sig: i32,
    },
    /// The runtime has shut down (its `Runtime` was dropped or `shutdown()` called): a
    /// `Handle` that outlived it reaches no CPU and brings none up.
    #[error("the runtime has shut down")]
    ShutDown,
    /// This process is a `fork()` child of the one that built the runtime: it has none of the
    /// runtime's CPU threads, so nothing can run on them here.
    #[error("the runtime was built by process {builder_pid}; this is its fork() child {pid}, which has no CPU threads")]
    Forked {
        /// The process that built the runtime.
        builder_pid: u32,
        /// This process.
        pid: u32,
    },
    /// A system call failed.
    #[error("{op} failed: errno {errno}")]
    Sys {
        /// The call that failed, e.g. `"sigaction"`.
        op: &'static str,
        /// The `errno` it returned.
        errno: i32,
    },
}
