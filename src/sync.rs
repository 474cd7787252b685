//! The loom facade: every atomic a protocol relies on is imported from here, so that
//! `RUSTFLAGS="--cfg loom" cargo test --lib loom_` can model-check the protocols with the same code.
//!
//! Only the protocol files (`cpu/call_queue.rs`, `ipi/csd.rs`, `cpu/idle.rs` doorbell decisions,
//! `cpu/wait.rs`'s futex model, `hotplug/handshake.rs`, `hotplug/parking.rs`, `stop/coord.rs`,
//! `stop/cpus_lock.rs`) go through here; plumbing that loom cannot model (signals, threads pinned
//! to cores) uses `std` directly.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

/// `thread_local!` that loom can model (its threads share one OS thread).
#[cfg(loom)]
macro_rules! protocol_thread_local {
    ($($t:tt)*) => { loom::thread_local!($($t)*); };
}
#[cfg(not(loom))]
macro_rules! protocol_thread_local {
    ($($t:tt)*) => { std::thread_local!($($t)*); };
}
pub(crate) use protocol_thread_local;
