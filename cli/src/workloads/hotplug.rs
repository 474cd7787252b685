//! The `hotplug` workload: random CPU online/offline churn while IPIs flow, with rcutorture's
//! onoff accounting. It is the `onoff` stress scenario's churn with a fixed seed
//! (`stress::hotplug_churn`), so the two cannot drift apart; a violated invariant is its error.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use usmp::Handle;

use super::{Json, Outcome, Table, Workload, WorkloadError};
use crate::stress::{hotplug_churn, OnOffReport};

/// `--workload hotplug`.
pub struct Hotplug;

impl Workload for Hotplug {
    fn name(&self) -> &'static str {
        "hotplug"
    }

    fn about(&self) -> &'static str {
        "random CPU online/offline churn while IPIs flow (the onoff stress scenario, fixed seed)"
    }

    fn min_cpus(&self) -> usize {
        2
    }

    fn run(
        &self,
        h: &Handle,
        duration: Duration,
        stop: &AtomicBool,
    ) -> Result<Box<dyn Outcome>, WorkloadError> {
        Ok(Box::new(hotplug_churn(h, duration, stop)?))
    }
}

impl Outcome for OnOffReport {
    fn write_json(&self, out: &mut dyn std::io::Write, json: &Json) -> std::io::Result<()> {
        json.write(out, "onoff", self)
    }

    /// The table, then rcutorture-style onoff accounting.
    fn write_text(&self, out: &mut dyn Write, table: &Table) -> std::io::Result<()> {
        table.write(out, self.elapsed_ms, self.interrupted)?;
        let o = self;
        writeln!(
            out,
            "onoff: {} onlines (min/avg/max {}/{}/{} us), {} offlines (min/avg/max {}/{}/{} us)",
            format_args!("{}/{}", o.onlines.successes, o.onlines.attempts),
            o.onlines.min_us,
            o.onlines.avg_us,
            o.onlines.max_us,
            format_args!("{}/{}", o.offlines.successes, o.offlines.attempts),
            o.offlines.min_us,
            o.offlines.avg_us,
            o.offlines.max_us,
        )?;
        writeln!(
            out,
            "hotplug: {} sync + {} async calls accepted, {} refused (offline), {} callbacks ran; \
             {} CPU(s) brought back at the end{}",
            o.calls_sync,
            o.calls_async,
            o.calls_offline,
            o.callbacks_run,
            o.brought_back,
            o.first_failure
                .as_ref()
                .map_or(String::new(), |f| format!("; first failure: {f}"))
        )
    }
}
