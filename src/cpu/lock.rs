//! The poison-recovering lock every mutex in the library takes.
//!
//! A mutex here is poisoned only when a job, callback or hook panicked while its thread held
//! the lock. What these mutexes guard (a join handle, a job gate, a bring-up plan, the logger,
//! the handler-install serialiser) is whole between any two statements, so the runtime keeps
//! going with the data as the panicking thread left it instead of turning one panic into many.

use std::sync::{Mutex, MutexGuard};

/// `lock_unpoisoned()` on a `std::sync::Mutex`.
pub(crate) trait LockUnpoisoned<T: ?Sized> {
    /// Locks, taking the guard even if a panicking holder poisoned the mutex.
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockUnpoisoned<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}
