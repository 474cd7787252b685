//! Simulated kexec: migrate to the reboot CPU, shut the other CPUs down through hotplug (or
//! crash-stop them), and hand over to the next image, a new generation of the runtime that
//! reuses the CPU ids and host cores and brings up exactly the CPUs it safely can.
//!
//! | file | what |
//! |---|---|
//! | `path.rs` | `kexec` and `crash_kexec`, the handoff, the timeline |
//! | `record.rs` | `CrashRecord` and its validated wire format |
//! | `exec.rs` | exec mode: the record in a sealed memfd across `execve` |
//!
//! Kernel mapping: `kernel_kexec` = [`Handle::kexec`](crate::Handle::kexec),
//! `__crash_kexec` = `crash_kexec`, `migrate_to_reboot_cpu` and `smp_shutdown_nonboot_cpus`
//! are steps of the path, `/proc/vmcore` notes = [`CrashRecord`].

pub mod exec;
pub mod path;
pub mod record;

pub use path::{Handoff, KexecOutcome, KexecReport, TimelineEntry};
pub use record::{CrashRecord, RecordError};

/// Why a kexec did not happen.
#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    /// Another kexec or crash-kexec is already running in this image (exactly one proceeds).
    #[error("kexec: another kexec is already in progress")]
    InProgress,
    /// The crash-stop could not run (another stop owns the image).
    #[error("crash_kexec: {0}")]
    Stop(#[from] crate::stop::StopError),
    /// Taking a CPU down failed.
    #[error("kexec: shutting down CPU {cpu}")]
    Shutdown {
        /// The CPU being taken down.
        cpu: usize,
        /// Why `cpu_down` failed.
        #[source]
        source: crate::hotplug::HotplugError,
    },
    /// The next image could not boot.
    #[error("kexec: next image: {0}")]
    Boot(#[from] crate::runtime::error::RuntimeError),
    /// Called from a logical CPU that is not the reboot CPU: a running job cannot migrate, and
    /// shutting its CPU down would wait for the caller itself.
    #[error("kexec called on CPU {caller}, reboot CPU is {reboot}: call it on the reboot CPU or from outside the runtime")]
    WrongCpu {
        /// The calling CPU.
        caller: usize,
        /// The reboot CPU.
        reboot: usize,
    },
    /// This image already handed over to the next one.
    #[error("kexec: generation {generation} has already handed over to the next image")]
    Retired {
        /// Generation of this (retired) image.
        generation: u64,
    },
    /// The runtime has shut down (its `Runtime` was dropped or `shutdown()` called): a
    /// `Handle` that outlived it reaches no CPU and brings none up.
    #[error("kexec: the runtime has shut down")]
    ShutDown,
    /// This process is a `fork()` child of the one that built the runtime: it has none of the
    /// runtime's CPU threads, so nothing can run on them here.
    #[error("kexec: the runtime was built by process {builder_pid}; this is its fork() child {pid}, which has no CPU threads")]
    Forked {
        /// The process that built the runtime.
        builder_pid: u32,
        /// This process.
        pid: u32,
    },
    /// No online CPU to reboot on.
    #[error("kexec: no online CPU to run on")]
    NoCpu,
}

impl From<crate::runtime::liveness::Gone> for KexecError {
    fn from(g: crate::runtime::liveness::Gone) -> Self {
        use crate::runtime::liveness::Gone;
        match g {
            Gone::ShutDown => KexecError::ShutDown,
            Gone::Forked { builder_pid, pid } => KexecError::Forked { builder_pid, pid },
        }
    }
}
