//! Workloads that drive a running runtime, for the CLI (`usmp run --workload ...`), examples
//! and tests.
//!
//! | file | what |
//! |---|---|
//! | `demo.rs` | `demo`: every kind of IPI, CPU-to-CPU calls and irq-masked sections, with an exactly-once check |

mod demo;

pub use demo::{demo, DemoError, DemoReport};
