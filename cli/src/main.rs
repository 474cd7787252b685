//! `usmp`: a user-space SMP runtime on the command line. Each command is a module with its
//! `Args` and a `run(args, signals) -> Result<ExitCode>`; this file parses the command line,
//! sets up logging and dispatches, and turns an error into one line and exit 2.
//!
//! | module | what |
//! |---|---|
//! | `run.rs` | `usmp run`: one workload on a runtime, a per-CPU summary |
//! | `workloads/` | the workloads `usmp run --workload` runs, one file each, and their registry |
//! | `stress/` | `usmp stress`: the torture harness, one file per scenario |
//! | `kexec.rs` | `usmp kexec`: orderly or crash kexec, the handoff timeline, `--exec` |
//! | `latency.rs` | `usmp latency`: the IPI latency map of the host's cores |
//! | `args.rs` | flag values more than one command takes (`--cpus`, `--park`, `--mode`) |
//! | `signals.rs` | SIGINT and SIGQUIT: blocked first, then taken or restored by each command |
//! | `output.rs` | inert text and one-line JSON for stdout |
//! | `rng.rs` | the seeded generator of the workloads and scenarios |
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

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod kexec;
mod latency;
mod output;
mod rng;
mod run;
mod signals;
mod stress;
mod workloads;

use signals::Signals;

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
    Run(run::Args),
    /// Kexec (orderly or --crash) to the next image; print the handoff timeline.
    Kexec(kexec::Args),
    /// Torture the runtime: scenarios that race IPIs, hotplug, stop and kexec with injected
    /// faults and check every invariant as they go (exit 1 on a violation).
    Stress(stress::Args),
    /// Map IPI latency between every pair of host cores: cache-line ping-pong (the floor) and
    /// call_single to a polling, a busy and a sleeping CPU, p50/p99 per pair.
    Latency(latency::Args),
}

fn main() -> ExitCode {
    // First, so a Ctrl-C during start-up (parsing, logger set-up) waits for the command to take
    // or restore it instead of killing the process.
    let signals = Signals::block();
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
        Cmd::Run(args) => run::run(args, signals),
        Cmd::Kexec(args) => kexec::run(args, signals),
        Cmd::Stress(args) => stress::run(args, signals),
        Cmd::Latency(args) => latency::run(args, signals),
    };
    match result {
        Ok(code) => code,
        // The reader of stdout went away: the output ends here, as `head` expects.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "usmp: error: {}", error_line(&e));
            ExitCode::from(2)
        }
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
