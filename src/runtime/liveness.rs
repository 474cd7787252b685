//! Whether a [`Handle`](crate::Handle) can still reach its runtime's CPUs: not after the
//! runtime shut down (a handle may outlive its `Runtime`), and not in a `fork()` child (which
//! inherits the runtime's memory but none of its threads).
//!
//! Fork detection: a `pthread_atfork` child handler bumps a process-wide epoch; a runtime
//! records the epoch at build and compares it at every call (one relaxed load, where a
//! `getpid()` would cost a system call on every IPI). A child made by a raw `clone`/`vfork`
//! that skips the atfork handlers is not detected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use super::error::RuntimeError;
use crate::hotplug::HotplugError;
use crate::ipi::IpiError;
use crate::stop::{StopError, StopMachineError};

/// How many `fork()`s this process's line of descent has gone through since the first build.
static FORK_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The atfork child handler: runs in the child right after `fork()`, on its only thread.
/// Async-signal-safe (one atomic add).
extern "C" fn forked_child() {
    FORK_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Registers the atfork handler, once per process (at the first build), and returns the
/// current epoch for the runtime being built.
pub(crate) fn register() -> u64 {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a plain extern "C" function that lives for the whole program and
        // only does an atomic add; no prepare or parent handler.
        let r = unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
        debug_assert_eq!(r, 0, "pthread_atfork failed");
    });
    FORK_EPOCH.load(Ordering::Relaxed)
}

/// The current epoch.
#[inline]
pub(crate) fn epoch() -> u64 {
    FORK_EPOCH.load(Ordering::Relaxed)
}

/// Why a handle cannot reach its runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// The runtime shut down.
    ShutDown,
    /// This process is a fork child of `builder_pid`.
    Forked { builder_pid: u32, pid: u32 },
}

macro_rules! from_gone {
    ($($t:ident),*) => {$(
        impl From<Gone> for $t {
            fn from(g: Gone) -> Self {
                match g {
                    Gone::ShutDown => $t::ShutDown,
                    Gone::Forked { builder_pid, pid } => $t::Forked { builder_pid, pid },
                }
            }
        }
    )*};
}

// `KexecError`'s conversion lives in `kexec`, the layer above this one.
from_gone!(IpiError, HotplugError, StopError, RuntimeError);

impl From<Gone> for StopMachineError {
    fn from(g: Gone) -> Self {
        StopMachineError::Ipi(g.into())
    }
}
