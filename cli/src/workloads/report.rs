//! What a `usmp run` report holds around the workload's own: the per-CPU table of the text
//! report (a header line, one row per CPU with its IPI, idle and job counters, the totals, the
//! runtime's IPI and call totals) and the `--json` object.

use std::io::Write;

use serde::ser::{Serialize, SerializeMap, Serializer};
use usmp::RuntimeStats;

use crate::output::write_json;

/// The `--json` object: `workload`, `duration_ms`, the workload's report under its key, then
/// the runtime's statistics, in that order.
pub struct Json<'a> {
    pub workload: &'static str,
    pub duration_ms: u64,
    pub stats: &'a RuntimeStats,
}

impl Json<'_> {
    /// Writes the object with `report` under `key`, as one line.
    pub fn write<T: Serialize>(
        &self,
        mut out: &mut dyn Write,
        key: &'static str,
        report: &T,
    ) -> std::io::Result<()> {
        #[derive(serde::Serialize)]
        struct Object<'a, T: Serialize> {
            workload: &'static str,
            duration_ms: u64,
            #[serde(flatten)]
            report: Entry<'a, T>,
            #[serde(flatten)]
            stats: &'a RuntimeStats,
        }
        let obj = Object {
            workload: self.workload,
            duration_ms: self.duration_ms,
            report: Entry(key, report),
            stats: self.stats,
        };
        write_json(&mut out, &obj)
    }
}

/// One `key: value` entry, flattened into the object beside the fixed fields.
struct Entry<'a, T>(&'static str, &'a T);

impl<T: Serialize> Serialize for Entry<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.0, self.1)?;
        m.end()
    }
}

/// What the table shows: the runtime's statistics, taken once the workload drained.
pub struct Table<'a> {
    /// The workload's `--workload` name.
    pub workload: &'static str,
    pub host_cores: usize,
    pub stats: &'a RuntimeStats,
}

impl Table<'_> {
    /// Writes the table; `elapsed_ms` and `interrupted` are the workload's.
    pub fn write(
        &self,
        out: &mut dyn Write,
        elapsed_ms: u64,
        interrupted: bool,
    ) -> std::io::Result<()> {
        let s = self.stats;
        writeln!(
            out,
            "usmp run: workload {}, {} logical CPUs on {} host cores, {} ms{}",
            self.workload,
            s.cpus,
            self.host_cores,
            elapsed_ms,
            if interrupted { " (interrupted)" } else { "" }
        )?;
        writeln!(
            out,
            "{:>4} {:>8} {:>4} {:>9} {:>8} {:>9} {:>8} {:>8} {:>8} {:>5} {:>10} {:>6}",
            "cpu",
            "state",
            "core",
            "handled",
            "sent",
            "doorbells",
            "deferred",
            "polled",
            "wakes",
            "nmis",
            "masked-us",
            "jobs"
        )?;
        let mut tot = [0u64; 10];
        for c in &s.per_cpu {
            let row = [
                c.calls_handled,
                c.calls_sent,
                c.doorbells,
                c.deferred,
                c.polled,
                c.idle_wakes,
                c.nmis,
                c.masked_us,
                c.jobs,
            ];
            for (t, v) in tot.iter_mut().zip(row) {
                *t += v;
            }
            writeln!(
                out,
                "{:>4} {:>8} {:>4} {:>9} {:>8} {:>9} {:>8} {:>8} {:>8} {:>5} {:>10} {:>6}",
                c.cpu,
                format!("{:?}", c.state).to_lowercase(),
                c.core.map_or("-".to_string(), |k| k.to_string()),
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                row[6],
                row[7],
                row[8]
            )?;
        }
        writeln!(
            out,
            "{:>4} {:>8} {:>4} {:>9} {:>8} {:>9} {:>8} {:>8} {:>8} {:>5} {:>10} {:>6}",
            "all", "", "", tot[0], tot[1], tot[2], tot[3], tot[4], tot[5], tot[6], tot[7], tot[8]
        )?;
        writeln!(
            out,
            "ipis: {} sent, {} handled, {} cancelled, {} lost; calls: {} completed, {} failed; \
             doorbell signals: {}; csd timeouts: {}",
            s.ipis_sent,
            s.ipis_handled,
            s.ipis_cancelled,
            s.lost_calls,
            s.calls_completed,
            s.calls_failed,
            s.doorbell_signals,
            s.csd_timeouts
        )
    }
}
