//! What `usmp stress` shows: a progress bar on a terminal (plain periodic lines otherwise), the
//! counters table or `--json`, and on failure the first violations, the replay command and the
//! Perfetto trace of the second before the first violation.
//!
//! The table and the JSON go to stdout; progress, and with `--json` the failure report, go to
//! stderr, so stdout stays one JSON object.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::ser::{SerializeMap, Serializer};

use super::args::{mode_name, Plan};
use super::check::Tally;
use super::host_sched::load_average;
use super::watchdog::FailureTrace;
use super::{Limit, ScenarioResult};

/// Plain progress lines this often when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// The first violations printed per scenario.
const SHOW: usize = 5;

/// Progress on stderr: a bar on a terminal, a line every few seconds otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    last_line: Instant,
}

impl Progress {
    pub fn new(_plan: &Plan) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(10));
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b
        });
        Progress {
            bar,
            last_line: Instant::now(),
        }
    }

    fn line(name: &str, t: &Tally) -> String {
        let secs = t.elapsed().as_secs_f64();
        format!(
            "{name}: {:.1}s, {} iterations ({:.0}/s), {} violations",
            secs,
            t.iterations(),
            t.iterations() as f64 / secs.max(1e-3),
            t.violations()
        )
    }

    pub fn update(&mut self, name: &str, t: &Tally) {
        match &self.bar {
            Some(b) => {
                b.set_message(Self::line(name, t));
                b.tick();
            }
            None if self.last_line.elapsed() >= PLAIN_EVERY => {
                self.last_line = Instant::now();
                let _ = writeln!(std::io::stderr(), "usmp stress: {}", Self::line(name, t));
            }
            None => {}
        }
    }

    /// A scenario ended: its last line stays.
    pub fn done(&mut self, name: &str, t: &Tally) {
        let line = format!("usmp stress: {} (done)", Self::line(name, t));
        match &self.bar {
            Some(b) => b.println(line),
            None => {
                let _ = writeln!(std::io::stderr(), "{line}");
            }
        }
        self.last_line = Instant::now();
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// The first line, on stderr: the seed (always printed), the width and what runs.
pub fn header(plan: &Plan) {
    let limit = match plan.limit {
        Limit::Duration(d) => format!("{:.1}s each", d.as_secs_f64()),
        Limit::Iterations(k) => format!("{k} iterations each"),
    };
    let modes: Vec<_> = plan.modes.iter().map(|m| mode_name(*m)).collect();
    let _ = writeln!(
        std::io::stderr(),
        "usmp stress: seed {:#x}, {} CPUs on {} host cores, host load {} busy thread(s), mode {}, {} scenario(s), {limit}{}",
        plan.seed,
        plan.cpus,
        plan.host_cores,
        plan.host_load,
        modes.join("+"),
        plan.scenarios.len(),
        plan.broken
            .map_or(String::new(), |(n, _, _)| format!(", broken {n}"))
    );
}

/// Writes the failure trace where `--trace-on-failure` says, or into the temp directory.
pub fn write_trace(plan: &Plan, t: &FailureTrace) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let path = plan.trace_on_failure.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "usmp-stress-{:x}-{}.json",
            plan.seed,
            std::process::id()
        ))
    });
    let f = std::fs::File::create(&path)
        .with_context(|| format!("cannot create trace file {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    usmp::trace::write_chrome_trace(&t.events, t.cpus, &mut w)
        .and_then(|()| w.flush())
        .with_context(|| format!("cannot write trace file {}", path.display()))?;
    Ok(path)
}

/// `{"name", "iterations", "min_iterations", "starved", "violations", "counters",
/// "first_violation"}`.
struct JsonScenario<'a>(&'a ScenarioResult);

impl serde::Serialize for JsonScenario<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_map(Some(7))?;
        m.serialize_entry("name", r.name)?;
        m.serialize_entry("iterations", &r.iterations)?;
        m.serialize_entry("min_iterations", &r.min_iterations)?;
        m.serialize_entry("starved", &r.starved)?;
        m.serialize_entry("violations", &r.violations)?;
        m.serialize_entry("counters", &Counters(&r.counters))?;
        m.serialize_entry("first_violation", &r.first.first().map(|v| v.to_string()))?;
        m.end()
    }
}

/// The counters as one JSON object, in the table's order.
struct Counters<'a>(&'a [(String, u64)]);

impl serde::Serialize for Counters<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

#[derive(serde::Serialize)]
struct JsonRun<'a> {
    seed: u64,
    /// `--host-load`: busy threads beside the runtime.
    host_load: usize,
    violations: u64,
    scenarios: Vec<JsonScenario<'a>>,
}

/// The table (or JSON) on stdout, then the failure report.
pub fn print(
    plan: &Plan,
    results: &[ScenarioResult],
    interrupted: bool,
    trace: Option<&Path>,
) -> anyhow::Result<()> {
    let total: u64 = results.iter().map(|r| r.violations).sum();
    let mut out = std::io::stdout().lock();
    if plan.json {
        let run = JsonRun {
            seed: plan.seed,
            host_load: plan.host_load,
            violations: total,
            scenarios: results.iter().map(JsonScenario).collect(),
        };
        serde_json::to_writer(&mut out, &run)?;
        writeln!(out)?;
        drop(out);
        let mut err = std::io::stderr().lock();
        failures(&mut err, plan, results, trace)?;
    } else {
        table(&mut out, plan, results, interrupted)?;
        failures(&mut out, plan, results, trace)?;
    }
    Ok(())
}

fn table(
    out: &mut impl Write,
    plan: &Plan,
    results: &[ScenarioResult],
    interrupted: bool,
) -> std::io::Result<()> {
    writeln!(
        out,
        "usmp stress: seed {:#x}, {} CPUs on {} host cores, host load {}",
        plan.seed, plan.cpus, plan.host_cores, plan.host_load
    )?;
    writeln!(
        out,
        "{:<22} {:>10} {:>9} {:>10} {:>8}",
        "scenario", "iterations", "it/s", "violations", "seconds"
    )?;
    for r in results {
        let secs = r.elapsed.as_secs_f64();
        let note = if r.abandoned {
            "  (hung: abandoned)".to_string()
        } else if r.interrupted {
            "  (interrupted)".to_string()
        } else if r.starved {
            format!("  (starved: fewer than {} iterations)", r.min_iterations)
        } else {
            String::new()
        };
        writeln!(
            out,
            "{:<22} {:>10} {:>9.0} {:>10} {:>8.1}{note}",
            r.name,
            r.iterations,
            r.iterations as f64 / secs.max(1e-3),
            r.violations,
            secs
        )?;
        // Counters, several to a line.
        let cells: Vec<String> = r.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for chunk in cells.chunks(4) {
            writeln!(out, "    {}", chunk.join("  "))?;
        }
    }
    let total: u64 = results.iter().map(|r| r.violations).sum();
    if interrupted {
        writeln!(
            out,
            "interrupted (Ctrl-C): {} of {} scenario(s) ran",
            results.len(),
            plan.scenarios.len()
        )?;
    }
    let starved = results.iter().filter(|r| r.starved).count();
    let not_caught = results
        .iter()
        .filter(|r| r.not_caught(plan.broken.is_some()))
        .count();
    let verdict = if total > 0 {
        format!("FAILED: {total} violation(s)")
    } else if starved > 0 {
        format!(
            "STARVED: {starved} scenario(s) ran too few iterations to judge; nothing was proven"
        )
    } else if not_caught > 0 {
        "FAILED: the --broken variant was not caught".to_string()
    } else {
        "every invariant held".to_string()
    };
    writeln!(out, "{verdict}")
}

fn failures(
    out: &mut impl Write,
    plan: &Plan,
    results: &[ScenarioResult],
    trace: Option<&Path>,
) -> std::io::Result<()> {
    for r in results.iter().filter(|r| r.violations > 0) {
        writeln!(
            out,
            "{}: {} violation(s), seed {:#x}; the first:",
            r.name, r.violations, plan.seed
        )?;
        for v in r.first.iter().take(SHOW) {
            writeln!(out, "  {v}")?;
        }
        writeln!(out, "replay: {}", r.replay)?;
    }
    for r in results {
        for n in r.notes.iter().take(SHOW) {
            writeln!(out, "{}: {n} (the host's doing, not a violation)", r.name)?;
        }
    }
    for r in results.iter().filter(|r| r.starved) {
        writeln!(
            out,
            "{}: starved: {} iteration(s) in {:.1}s, fewer than the minimum {}: the host was too \
             busy to run it (load average {}); rerun on a quieter host or with a longer --duration",
            r.name,
            r.iterations,
            r.elapsed.as_secs_f64(),
            r.min_iterations,
            load_average()
        )?;
    }
    if let Some((variant, _, owner)) = plan.broken {
        for r in results.iter().filter(|r| r.not_caught(true)) {
            writeln!(
                out,
                "{}: --broken {variant} was not caught in {} iteration(s) ({owner} must catch it)",
                r.name, r.iterations
            )?;
            writeln!(out, "replay: {}", r.replay)?;
        }
    }
    if let Some(p) = trace {
        writeln!(
            out,
            "trace of the second before the first violation: {} (open it at ui.perfetto.dev)",
            p.display()
        )?;
    }
    Ok(())
}
