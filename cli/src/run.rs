//! `usmp run`: start a runtime, run one workload on it (`workloads/`), shut it down and print
//! what every logical CPU did: the workload's report around a per-CPU table, or one JSON
//! object.
//!
//! Every argument is checked, and the trace file opened, before anything starts. Ctrl-C only
//! sets the stop flag (`signals.rs`): the workload ends early, drains, and the run ends with
//! its summary as usual, wherever it was. `USMP_ANNOUNCE_PHASES=1` announces each step
//! (`signals`, `built`, `workload`, `drained`, `shutdown`) on stderr for the Ctrl-C tests.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use usmp::RuntimeStats;

use crate::args;
use crate::signals::{announce, SignalState, Signals};
use crate::workloads::{self, Outcome, Workload};

/// `usmp run`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Logical CPUs, 1 to 1024 [default: max(host cores, 4)].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = args::cpus::<1>)]
    cpus: Option<usize>,
    /// Workload to run [default: lifecycle; demo below 4 CPUs, which the lifecycle needs].
    #[arg(long, value_name = "NAME", value_parser = workloads::parser())]
    workload: Option<&'static dyn Workload>,
    /// How long the workload sends IPIs, e.g. "2s", "500ms" (lifecycle: split over its phases).
    #[arg(
        long,
        value_name = "D",
        default_value = "1s",
        allow_hyphen_values = true
    )]
    duration: String,
    /// How long a stop's first attempt (the maskable stop vector) waits before the NMI attempt
    /// [default: 100ms for lifecycle, the kernel's 1s otherwise].
    #[arg(long, value_name = "D", allow_hyphen_values = true)]
    stop_wait: Option<String>,
    /// How long a synchronous IPI waits for its callback before it fails, e.g. "300ms" [default:
    /// the library's 5s]. Time the process spends stopped (Ctrl-Z) does not count.
    #[arg(long, value_name = "D", allow_hyphen_values = true)]
    call_timeout: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Write a Chrome/Perfetto trace of the run to FILE (open it at ui.perfetto.dev).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

/// A validated `usmp run`.
struct Plan {
    cpus: usize,
    host_cores: usize,
    workload: &'static dyn Workload,
    duration: Duration,
    stop_wait: Duration,
    call_timeout: Option<Duration>,
    json: bool,
    trace: Option<(PathBuf, File)>,
}

/// Runs `usmp run`: takes SIGINT and SIGQUIT, checks the arguments, runs the workload.
pub fn run(a: Args, signals: Signals) -> anyhow::Result<ExitCode> {
    let sig = signals.take().context("cannot start the signal thread")?;
    execute(plan(a)?, sig)?;
    Ok(ExitCode::SUCCESS)
}

/// Checks every argument (and opens the trace file) before anything starts.
fn plan(a: Args) -> anyhow::Result<Plan> {
    let host_cores = args::host_cores();
    let cpus = a.cpus.unwrap_or(host_cores.max(4));
    let workload = match a.workload {
        Some(w) => w,
        None if cpus >= workloads::DEFAULT.min_cpus() => workloads::DEFAULT,
        None => {
            let (dflt, small) = (workloads::DEFAULT, workloads::SMALL_DEFAULT);
            let _ = writeln!(
                std::io::stderr(),
                "usmp: note: the {} workload needs {} CPUs; running the {} workload on {cpus}",
                dflt.name(),
                dflt.min_cpus(),
                small.name()
            );
            small
        }
    };
    let duration = positive_duration("--duration", &a.duration, "2s, 500ms, 1m")?;
    let stop_wait = match &a.stop_wait {
        Some(s) => positive_duration("--stop-wait", s, "100ms, 1s")?,
        None => workload.stop_waits().first,
    };
    let call_timeout = match &a.call_timeout {
        Some(s) => Some(positive_duration("--call-timeout", s, "300ms, 5s")?),
        None => None,
    };
    let trace = match a.trace {
        Some(p) => {
            let f = File::create(&p)
                .with_context(|| format!("cannot create trace file {}", p.display()))?;
            Some((p, f))
        }
        None => None,
    };
    Ok(Plan {
        cpus,
        host_cores,
        workload,
        duration,
        stop_wait,
        call_timeout,
        json: a.json,
        trace,
    })
}

/// A duration flag's value: a humantime duration above zero, with a message that says what
/// is wrong with it (a negative or zero value included; `usmp stress` says the same).
fn positive_duration(flag: &str, v: &str, examples: &str) -> anyhow::Result<Duration> {
    if v.trim_start().starts_with('-') {
        return Err(anyhow!(
            "{flag} '{v}': must not be negative (examples: {examples})"
        ));
    }
    let d = humantime::parse_duration(v)
        .map_err(|e| anyhow!("{flag} '{v}': {e} (examples: {examples})"))?;
    if d.is_zero() {
        return Err(anyhow!(
            "{flag} '{v}': must be more than 0 (examples: {examples})"
        ));
    }
    Ok(d)
}

/// Builds the runtime, runs the workload on it, shuts it down and prints the report.
fn execute(mut p: Plan, sig: SignalState) -> anyhow::Result<()> {
    let stop = sig.stop.clone();

    let mut b = usmp::Builder::new()
        .cpus(p.cpus)
        .irq_accounting(true)
        .collect_trace(p.trace.is_some())
        .stop_waits(p.stop_wait, p.workload.stop_waits().nmi);
    if let Some(d) = p.call_timeout {
        b = b.call_timeout(d);
    }
    let rt = b.build().context("cannot start the runtime")?;
    let h = rt.handle();
    sig.set_quit_target(Some(h.clone()));
    announce("built");

    announce("workload");
    let outcome = p.workload.run(&h, p.duration, &stop);
    announce("drained");
    // The runtime is idle now (the workload drained); snapshot it, then shut it down and check
    // that nothing was lost on the way out.
    let mut stats = h.stats();
    sig.set_quit_target(None);
    let fin = rt.shutdown();
    stats.lost_calls = fin.lost_calls;
    announce("shutdown");

    let mut outcome = outcome.map_err(|e| anyhow!(e)).context("workload failed")?;
    outcome.lost_calls(fin.lost_calls).map_err(|e| anyhow!(e))?;
    if let Some((path, file)) = p.trace.take() {
        let mut w = BufWriter::new(file);
        usmp::trace::write_chrome_trace(&h.take_trace(), p.cpus, &mut w)
            .and_then(|()| w.flush())
            .with_context(|| format!("cannot write trace file {}", path.display()))?;
    }

    print_run(&p, outcome.as_ref(), &stats).context("writing to stdout")
}

/// The run's report on stdout: the JSON object, or the workload's text around the per-CPU
/// table.
fn print_run(p: &Plan, outcome: &dyn Outcome, stats: &RuntimeStats) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if p.json {
        let json = workloads::Json {
            workload: p.workload.name(),
            duration_ms: p.duration.as_millis() as u64,
            stats,
        };
        outcome.write_json(&mut out, &json)?;
    } else {
        let table = workloads::Table {
            workload: p.workload.name(),
            host_cores: p.host_cores,
            stats,
        };
        outcome.write_text(&mut out, &table)?;
    }
    out.flush()?;
    Ok(())
}
