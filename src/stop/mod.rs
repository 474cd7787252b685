//! Stopping CPUs: `stop_machine`, and the common stop / crash-stop routine with retries, an NMI
//! fallback, parking, and a deterministic catch of starting CPUs.
//!
//! | file | what |
//! |---|---|
//! | `layer.rs` | `StopLayer`: this layer's state over the IPI layer, and the receiver's thread-local |
//! | `machine.rs` | `stop_machine` / `multi_cpu_stop` |
//! | `coord.rs` | first caller wins, crash upgrades (loom-checked) |
//! | `cpus_lock.rs` | the CPU hotplug lock: hotplug and kexec write, `stop_machine` reads (loom-checked) |
//! | `routine.rs` | `send_stop` / `crash_stop`: the retry loop and its outcome |
//! | `backend.rs` | `StopBackend` (told the attempt number) and the default backend |
//! | `receive.rs` | what a stopped CPU does: crash note, leave online, park / power off |
//! | `parkable.rs` | where a CPU may be parked for good: not inside the C library's locks |

pub mod backend;
pub(crate) mod coord;
pub(crate) mod cpus_lock;
pub(crate) mod layer;
pub mod machine;
pub(crate) mod parkable;
pub(crate) mod percpu;
pub(crate) mod receive;
pub mod routine;

pub use backend::{DefaultBackend, IpiOnlyBackend, StopBackend, StopSender};
pub use machine::{StopFn, StopMachineError};
pub use receive::ParkPolicy;
pub use routine::{Attempt, CrashNote, StopConfig, StopError, StopMode, StopOutcome};
