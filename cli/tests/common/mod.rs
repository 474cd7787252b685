//! Helpers shared by the CLI's integration tests: a per-binary serial lock (these tests measure
//! timing on a 2-core machine, so they do not run concurrently). Running the binary itself is in
//! `cli.rs`.

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises the tests of one binary (a failed test must not poison the others).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
