//! The loom facade: every atomic a protocol relies on is imported from here, so that
//! `RUSTFLAGS="--cfg loom" cargo test --lib loom_` can model-check the protocols with the same code.
//!
//! Only the protocol files (`cpu/call_queue.rs`, `ipi/csd.rs`, `cpu/idle.rs` doorbell decisions,
//! `hotplug/handshake.rs`, `stop/coord.rs`) go through here; plumbing that loom cannot model (signals,
//! threads pinned to cores) uses `std` directly.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
