//! Errors of the runtime layer (build, jobs, shutdown).

use crate::cpu::machine::JobRefused;
use crate::cpu::mask::CpuId;
use crate::ipi::IpiError;

/// Why building a runtime or running a job failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `cpus` outside `1..=MAX_CPUS`.
    #[error("cpus must be between 1 and {max}, got {got}")]
    BadCpuCount {
        /// The CPU count asked for.
        got: usize,
        /// `MAX_CPUS`.
        max: usize,
    },
    /// A configuration value is unusable.
    #[error("bad configuration: {0}")]
    BadConfig(String),
    /// Signal setup failed (bad number, or another handler already owns it).
    #[error(transparent)]
    Signal(#[from] IpiError),
    /// The OS refused to start CPU `cpu`'s thread.
    #[error("bring-up of CPU {cpu}: could not spawn its thread")]
    Spawn {
        /// The CPU being brought up.
        cpu: CpuId,
        /// The error from spawning the thread.
        #[source]
        source: std::io::Error,
    },
    /// CPU `cpu` did not come up within the boot timeout.
    #[error("bring-up of CPU {cpu}: no response within {timeout_ms} ms")]
    BootTimeout {
        /// The CPU being brought up.
        cpu: CpuId,
        /// The boot timeout waited, in ms.
        timeout_ms: u64,
    },
    /// The CPU id is not below `cpus`.
    #[error("CPU {cpu} does not exist (runtime has {cpus} CPUs)")]
    InvalidCpu {
        /// The CPU asked for.
        cpu: CpuId,
        /// How many CPUs the runtime has.
        cpus: usize,
    },
    /// The CPU is not online (or is going down), so it takes no jobs.
    #[error("CPU {cpu} is offline")]
    Offline {
        /// The CPU asked for.
        cpu: CpuId,
    },
    /// The job panicked; the CPU survived.
    #[error("job on CPU {cpu} panicked: {message}")]
    JobPanicked {
        /// The CPU the job ran on.
        cpu: CpuId,
        /// The panic message.
        message: String,
    },
    /// The job's CPU went away before running it and it could not be moved.
    #[error("job on CPU {cpu} was dropped unrun")]
    JobLost {
        /// The CPU the job was sent to.
        cpu: CpuId,
    },
    /// A stop parked or powered off the job's CPU before the job finished: it never will.
    #[error("job on CPU {cpu} will not finish: the CPU was stopped")]
    JobStopped {
        /// The stopped CPU.
        cpu: CpuId,
    },
    /// This image handed over to the next one (kexec): it runs no more jobs.
    #[error(
        "generation {generation} has handed over to the next image (kexec); use the next runtime"
    )]
    Retired {
        /// Generation of this (retired) image.
        generation: u64,
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
    /// A job joined a job queued on its own CPU: jobs are not preemptible, so the joined one
    /// could only start after the joining one returned, and the join would wait forever.
    #[error("job on CPU {cpu} is queued behind the job that joins it, on the same CPU (it would wait forever)")]
    JoinOnOwnCpu {
        /// The CPU both jobs are on.
        cpu: CpuId,
    },
    /// `join_timeout` ran out.
    #[error("job on CPU {cpu} did not finish within {timeout_ms} ms")]
    JobTimeout {
        /// The CPU the job runs on.
        cpu: CpuId,
        /// The time waited, in ms.
        timeout_ms: u64,
    },
}

impl From<JobRefused> for RuntimeError {
    fn from(e: JobRefused) -> Self {
        match e {
            JobRefused::InvalidCpu { cpu, cpus } => RuntimeError::InvalidCpu { cpu, cpus },
            JobRefused::Retired { generation } => RuntimeError::Retired { generation },
            JobRefused::Offline { cpu } => RuntimeError::Offline { cpu },
        }
    }
}
