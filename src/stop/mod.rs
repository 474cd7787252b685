//! Stopping CPUs: `stop_machine`, and (next) the common stop / crash-stop routine.
//!
//! | file | what |
//! |---|---|
//! | `machine.rs` | `stop_machine` / `multi_cpu_stop` |

pub mod machine;

pub use machine::{StopFn, StopMachineError};
