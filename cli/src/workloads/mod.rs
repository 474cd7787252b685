//! Workloads that drive a running runtime, for `usmp run --workload ...`. They use only the
//! library's public API. (`hotplug` is the `onoff` stress scenario: `stress::hotplug_churn`.)
//!
//! | file | what |
//! |---|---|
//! | `demo.rs` | `demo`: every kind of IPI, CPU-to-CPU calls and irq-masked sections, with an exactly-once check |
//! | `crash.rs` | `crash_demo`: CPU 1 panics and crash-stops a busy runtime; a masked CPU needs the NMI attempt |
//! | `lifecycle.rs` | `lifecycle`: boot, IPIs, hotplug churn, a crash-stop that needs the NMI, crash-kexec, traffic in the next generation |

mod crash;
mod demo;
mod lifecycle;

pub use crash::{crash_demo, CrashReport};
pub use demo::{demo, DemoError, DemoReport};
pub use lifecycle::{lifecycle, LifecycleConfig, LifecycleReport};
