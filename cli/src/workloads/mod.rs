//! Workloads that drive a running runtime, for `usmp run --workload ...`. They use only the
//! library's public API.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the [`Workload`] and [`Outcome`] traits, the registry [`WORKLOADS`], `--workload`'s value parser |
//! | `report.rs` | what a report holds around the workload's own: the per-CPU table, the `--json` object |
//! | `lifecycle.rs` | `lifecycle`: boot, IPIs, hotplug churn, a crash-stop that needs the NMI, crash-kexec, traffic in the next generation |
//! | `demo.rs` | `demo`: every kind of IPI, CPU-to-CPU calls and irq-masked sections, with an exactly-once check |
//! | `hotplug.rs` | `hotplug`: the `onoff` stress scenario's churn (`stress::hotplug_churn`) with a fixed seed |
//! | `crash.rs` | `crash`: CPU 1 panics and crash-stops a busy runtime; a masked CPU needs the NMI attempt |
//!
//! # Adding a workload
//!
//! Write `cli/src/workloads/<name>.rs` with a unit struct implementing [`Workload`] and its
//! report implementing [`Outcome`], add `mod <name>;` below and one `&<name>::Struct,` line to
//! [`WORKLOADS`]. `--workload` takes its name from there, `--help` lists it with its `about`.

mod crash;
mod demo;
mod hotplug;
mod lifecycle;
mod report;

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use usmp::Handle;

pub use report::{Json, Table};

/// Every workload, in the order `--help` lists them. One line each.
pub static WORKLOADS: &[&dyn Workload] = &[
    &lifecycle::Lifecycle,
    &demo::Demo,
    &hotplug::Hotplug,
    &crash::Crash,
];

/// `usmp run`'s workload when `--workload` is not given, on at least its `min_cpus`...
pub static DEFAULT: &dyn Workload = &lifecycle::Lifecycle;
/// ...and below that (with a note on stderr).
pub static SMALL_DEFAULT: &dyn Workload = &demo::Demo;

/// What a workload failed with: its own typed error, which names the phase or step.
pub type WorkloadError = Box<dyn std::error::Error + Send + Sync>;

/// One `usmp run` workload. Implementations are unit structs registered in [`WORKLOADS`].
pub trait Workload: Sync {
    /// `--workload` name.
    fn name(&self) -> &'static str;
    /// One line for `--help`.
    fn about(&self) -> &'static str;
    /// The fewest CPUs it runs on (fewer is its own error); `usmp run` picks its default by it.
    fn min_cpus(&self) -> usize {
        1
    }
    /// The stop waits the runtime is built with (`--stop-wait` replaces the first).
    fn stop_waits(&self) -> StopWaits {
        StopWaits::KERNEL
    }
    /// Runs on `h` (every CPU online and idle) for `duration`, or until `stop` (Ctrl-C) is
    /// set. Called from a thread outside the runtime, which the caller shuts down afterwards.
    fn run(
        &self,
        h: &Handle,
        duration: Duration,
        stop: &AtomicBool,
    ) -> Result<Box<dyn Outcome>, WorkloadError>;
}

/// The two waits of a stop (`Builder::stop_waits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopWaits {
    /// How long the first attempt (the maskable stop vector) waits before the NMI attempt.
    pub first: Duration,
    /// How long each NMI attempt waits.
    pub nmi: Duration,
}

impl StopWaits {
    /// The kernel's: 1 s for the stop vector, 10 ms for the NMI.
    pub const KERNEL: StopWaits = StopWaits {
        first: Duration::from_secs(1),
        nmi: Duration::from_millis(10),
    };
}

/// What a workload reports, as text and as `--json`.
pub trait Outcome {
    /// The `--json` object, with its report under its own key (`json.write(out, KEY, self)`).
    fn write_json(&self, out: &mut dyn Write, json: &Json) -> std::io::Result<()>;
    /// Calls the runtime's shutdown found accepted but neither run nor cancelled. Losing one is
    /// an error unless the workload expects it (then it goes into the report).
    fn lost_calls(&mut self, n: u64) -> Result<(), WorkloadError> {
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} calls were accepted but neither ran nor were cancelled").into())
        }
    }
    /// The text report; `table` is the runtime's per-CPU table, for the workload to place.
    fn write_text(&self, out: &mut dyn Write, table: &Table) -> std::io::Result<()>;
}

/// `--workload NAME`: one of [`WORKLOADS`], by name.
pub fn parser() -> impl TypedValueParser<Value = &'static dyn Workload> {
    PossibleValuesParser::new(
        WORKLOADS
            .iter()
            .map(|w| PossibleValue::new(w.name()).help(w.about())),
    )
    .map(|name| find(&name).expect("PossibleValuesParser passes only a registered name"))
}

pub fn find(name: &str) -> Option<&'static dyn Workload> {
    WORKLOADS.iter().copied().find(|w| w.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_the_defaults_registered() {
        let mut names: Vec<_> = WORKLOADS.iter().map(|w| w.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), WORKLOADS.len());
        for w in [DEFAULT, SMALL_DEFAULT] {
            assert!(find(w.name()).is_some(), "{}", w.name());
        }
        assert!(SMALL_DEFAULT.min_cpus() < DEFAULT.min_cpus());
    }
}
