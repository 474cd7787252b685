//! `usmp` — run a workload on a user-space SMP runtime and print what every logical CPU did, or
//! torture it (`usmp stress`, in `stress/`); `usmp run`'s workloads are in `workloads/`.
//!
//! Exit codes: 0 the run finished (also after Ctrl-C), or stdout was closed by its reader
//! (a broken pipe ends the output, quietly); 1 `usmp stress` saw an invariant violated; 2 bad
//! input (usage errors included), a runtime that could not start, or a workload that failed
//! (one line on stderr); 3 a `usmp stress` scenario was starved by the host (fewer than its
//! minimum iterations); 4 a `usmp stress --broken` variant was never caught. A second Ctrl-C
//! exits at once with 130.
//!
//! SIGQUIT (Ctrl-\) prints every CPU's state and NMI-sampled instruction pointer to stderr (in
//! `usmp stress`, of the running scenario's runtime) and the run goes on.
//!
//! Signals in `usmp run`: SIGINT and SIGQUIT are blocked in the main thread before anything else
//! starts, so every thread (each logical CPU included) inherits the block, and one thread takes
//! them with `sigwait`. No handler for them ever runs on a CPU thread (where it could nest inside
//! an IPI handler on the signal stack), and a Ctrl-C at any moment, even before the runtime is
//! built, only sets the stop flag: the run always ends with its summary.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};

mod args;
mod kexec_cmd;
mod latency;
mod rng;
mod stress;
mod workloads;
use usmp::{Handle, RuntimeStats};
use workloads::{Outcome, Workload};

#[derive(Parser)]
#[command(
    name = "usmp",
    version,
    about = "A user-space SMP runtime: pinned threads as logical CPUs, real-time-signal IPIs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a runtime, run a workload on it, print a per-CPU summary.
    Run(RunArgs),
    /// Kexec (orderly or --crash) to the next image; print the handoff timeline.
    Kexec(kexec_cmd::KexecArgs),
    /// Torture the runtime: scenarios that race IPIs, hotplug, stop and kexec with injected
    /// faults and check every invariant as they go (exit 1 on a violation).
    Stress(stress::StressArgs),
    /// Map IPI latency between every pair of host cores: cache-line ping-pong (the floor) and
    /// call_single to a polling, a busy and a sleeping CPU, p50/p99 per pair.
    Latency(latency::LatencyArgs),
}

#[derive(Args)]
struct RunArgs {
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
struct RunPlan {
    cpus: usize,
    host_cores: usize,
    workload: &'static dyn Workload,
    duration: Duration,
    stop_wait: Duration,
    call_timeout: Option<Duration>,
    json: bool,
    trace: Option<(PathBuf, File)>,
}

fn main() {
    // First, so a Ctrl-C during start-up (parsing, logger set-up) waits for the signal thread
    // instead of killing the process; only `run` takes it, `kexec` gets the default back.
    let signals = block_run_signals();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    // `usmp stress` provokes the runtime's warnings (stop retries, csd timeouts) on purpose and
    // reports what matters itself; its log is off unless RUST_LOG says otherwise.
    let default_level = match cli.cmd {
        Cmd::Stress(_) => "off",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr())
        .with_env_filter(filter)
        .init();
    let result = match cli.cmd {
        Cmd::Run(args) => start_signal_thread(signals).and_then(|sig| run(plan(args)?, sig)),
        Cmd::Stress(args) => start_signal_thread(signals).and_then(|sig| {
            if stress::stress(args, sig.stop, sig.quit_target)? {
                let _ = std::io::stdout().flush();
                std::process::exit(1);
            }
            Ok(())
        }),
        Cmd::Kexec(args) => {
            // Pending signals are delivered (with their default action) once unblocked.
            let _ = signals.thread_unblock();
            kexec_cmd::kexec(args)
        }
        Cmd::Latency(args) => {
            let _ = signals.thread_unblock();
            latency::latency(args)
        }
    };
    if let Err(e) = result {
        if is_broken_pipe(&e) {
            // The reader of stdout went away: the output ends here, as `head` expects.
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "usmp: error: {}", error_line(&e));
        std::process::exit(2);
    }
}

/// The error and its causes on one line, each cause once. anyhow's `{:#}` prints every
/// `source()` after the message, and many errors (ours, thiserror's `"...: {0}"` with
/// `#[from]`, io wrappers) already embed their source in their own message: the same cause
/// then appeared twice or more (`... os error 2): No such file or directory (os error 2)`).
/// A cause whose text the line already holds is left out.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// ANSI colour in log lines only on a terminal, and never when `NO_COLOR` is set and not empty
/// (no-color.org).
fn colour_on_stderr() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// Help and version print as clap formats them (exit 0); a usage error is one line on stderr
/// and exit 2, like every other bad input.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    // Asked-for help and version, and the help shown for a missing subcommand, are clap's.
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let code = if e.use_stderr() { 2 } else { 0 };
        let _ = e.print();
        std::process::exit(code);
    }
    let text = e.render().to_string();
    // The message is the first paragraph (a list after "...:" included), on one line; clap's
    // tips and usage follow it.
    let first = text
        .split("\n\n")
        .next()
        .unwrap_or("bad arguments")
        .trim_start_matches("error: ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let _ = writeln!(
        std::io::stderr(),
        "usmp: error: {first} (usmp --help for usage)"
    );
    std::process::exit(2);
}

/// Whether `e` is a write to a closed pipe, however deep in the chain.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `USMP_ANNOUNCE_PHASES=1` (for the Ctrl-C test): one `usmp: phase: NAME` line on stderr as the
/// run enters each phase, so a test can send SIGINT at a known point without sleeping.
fn announce(phase: &str) {
    if std::env::var_os("USMP_ANNOUNCE_PHASES").is_some() {
        let _ = writeln!(std::io::stderr(), "usmp: phase: {phase}");
    }
}

/// What the signal thread shares with the run.
struct SignalState {
    /// Set by the first SIGINT.
    stop: Arc<AtomicBool>,
    /// The runtime SIGQUIT dumps, while there is one.
    quit_target: Arc<Mutex<Option<Handle>>>,
}

/// Blocks SIGINT and SIGQUIT in the calling (main) thread, before any other thread exists, so
/// every thread started later inherits the block. (Blocking a valid set cannot fail.)
fn block_run_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGQUIT);
    let _ = set.thread_block();
    set
}

/// Starts the thread that takes `set` (blocked by [`block_run_signals`]) with `sigwait`. That
/// thread lives until the process exits: it holds no resource and is never joined.
fn start_signal_thread(set: SigSet) -> anyhow::Result<SignalState> {
    let stop = Arc::new(AtomicBool::new(false));
    let quit_target: Arc<Mutex<Option<Handle>>> = Arc::new(Mutex::new(None));
    let (s, q) = (stop.clone(), quit_target.clone());
    std::thread::Builder::new()
        .name("usmp-signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(Signal::SIGINT) => {
                    if s.swap(true, Ordering::SeqCst) {
                        std::process::exit(130);
                    }
                }
                Ok(_) => {
                    if let Some(h) = q.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        dump_cpus(h);
                    }
                }
                // sigwait fails only for an invalid set; do not spin on it.
                Err(_) => return,
            }
        })
        .context("cannot start the signal thread")?;
    announce("signals");
    Ok(SignalState { stop, quit_target })
}

/// Checks every argument (and opens the trace file) before anything starts.
fn plan(a: RunArgs) -> anyhow::Result<RunPlan> {
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
    Ok(RunPlan {
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

fn run(mut p: RunPlan, sig: SignalState) -> anyhow::Result<()> {
    let stop = sig.stop;

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
    *sig.quit_target.lock().unwrap_or_else(|e| e.into_inner()) = Some(h.clone());
    announce("built");

    announce("workload");
    let outcome = p.workload.run(&h, p.duration, &stop);
    announce("drained");
    // The runtime is idle now (the workload drained); snapshot it, then shut it down and check
    // that nothing was lost on the way out.
    let mut stats = h.stats();
    sig.quit_target
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
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
fn print_run(p: &RunPlan, outcome: &dyn Outcome, stats: &RuntimeStats) -> anyhow::Result<()> {
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

/// SIGQUIT: every CPU's state, idle counters and NMI-sampled instruction pointer, to stderr.
fn dump_cpus(h: &Handle) {
    let stats = h.stats();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "usmp: SIGQUIT: {} CPUs, online {}",
        h.cpus(),
        h.online_mask()
    );
    for c in &stats.per_cpu {
        let ip = match h.nmi_backtrace(c.cpu, Duration::from_millis(100)) {
            Ok(ip) => format!("{ip:#018x}"),
            Err(e) => format!("? ({e})"),
        };
        let _ = writeln!(
            err,
            "usmp:   CPU{} {:?} online={} polled={} idle_wakes={} jobs={} ip={ip}",
            c.cpu,
            c.state,
            h.is_online(c.cpu),
            c.polled,
            c.idle_wakes,
            c.jobs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::error_line;

    /// Shaped like the issue-19 report: a phase error that embeds its source and also returns
    /// it from `source()`, over an IPI error, under anyhow's context.
    #[derive(Debug, thiserror::Error)]
    enum Phase {
        #[error("hotplug workload: call_single to CPU 0: {0}")]
        Call(#[source] usmp::IpiError),
        #[error("trace: {0}")]
        Io(#[from] std::io::Error),
    }

    #[test]
    fn each_cause_is_printed_once() {
        let e = anyhow::Error::from(Phase::Call(usmp::IpiError::Offline { cpu: 0 }))
            .context("workload failed");
        assert_eq!(
            error_line(&e),
            "workload failed: hotplug workload: call_single to CPU 0: IPI to CPU 0: CPU is offline"
        );
        let io = std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::from(Phase::Io(io));
        let line = error_line(&e);
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
        // A cause not in the message is still printed.
        let e = anyhow::Error::from(std::io::Error::from_raw_os_error(2)).context("cannot open x");
        assert_eq!(
            error_line(&e),
            "cannot open x: No such file or directory (os error 2)"
        );
    }
}
