//! `usmp stress` arguments ([`Args`]), and the checks that turn them into a [`Plan`] before
//! anything starts. Every refusal is one line on stderr and exit 2: clap's for a value its
//! parser refuses (`--cpus`, `--mode`), a [`StressArgError`] for the rest.

use std::path::PathBuf;
use std::time::Duration;

use usmp::fault::Broken;
use usmp::StopMode;

use crate::args::{cpus, host_cores, Mode};

use super::{FaultSet, Limit, Scenario, BROKEN, SCENARIOS};

/// Each scenario runs this long when neither `--duration` nor `--iterations` is given.
pub const DEFAULT_PER_SCENARIO: Duration = Duration::from_secs(5);

#[derive(clap::Args, Debug)]
#[command(after_help = scenario_help())]
pub struct Args {
    /// Scenario to run, or "all" (see the list below).
    #[arg(long, value_name = "NAME|all", default_value = "all")]
    pub scenario: String,
    /// Logical CPUs, 2 to 1024 [default: twice the host cores, at least 4].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = cpus::<2>)]
    pub cpus: Option<usize>,
    /// Total run time, split evenly over the scenarios, e.g. "60s", "10m"
    /// [default: 5s per scenario].
    #[arg(
        long,
        value_name = "D",
        conflicts_with = "iterations",
        allow_hyphen_values = true
    )]
    pub duration: Option<String>,
    /// Iterations per scenario, instead of a duration.
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    pub iterations: Option<i64>,
    /// Seed of every random choice, decimal or 0x-hex [default: from the clock; printed].
    #[arg(long, value_name = "S")]
    pub seed: Option<String>,
    /// Stop mode for the scenarios that stop CPUs: best-effort, deterministic or both.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = Mode::Both)]
    pub mode: Mode,
    /// Faults to inject, comma-separated, or "none" [default: each scenario's own set, below].
    /// doorbell-delay[=MAX], doorbell-drop[=N], preempt[=N], stop-call-delay[=D], slow-boot[=D],
    /// irq-spin[=D], nmi-block.
    #[arg(long, value_name = "LIST")]
    pub faults: Option<String>,
    /// Run a deliberately broken protocol that its scenario must catch (exit 1):
    /// skip-dying-flush, stop-without-retries, bringup-without-cas, doorbell-never-rings,
    /// stop-caller-stranded.
    #[arg(long, value_name = "VARIANT")]
    pub broken: Option<String>,
    /// A scenario that makes no progress this long is a violation: every CPU's state and
    /// NMI-sampled IP are reported and the run ends.
    #[arg(
        long,
        value_name = "D",
        default_value = "10s",
        allow_hyphen_values = true
    )]
    pub hang_timeout: String,
    /// Where a failed run writes the Perfetto trace of the second before the first violation
    /// [default: a file in the temp directory, whose path is printed].
    #[arg(long, value_name = "FILE")]
    pub trace_on_failure: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Run N unpinned busy threads beside the runtime for the whole run, competing with its
    /// CPU threads for the host's cores (a loaded host, reproducibly).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub host_load: usize,
}

fn scenario_help() -> String {
    let mut s = String::from("Scenarios (default faults in brackets):\n");
    for sc in SCENARIOS {
        s.push_str(&format!(
            "  {:<20} {} [{}]{}\n",
            sc.name(),
            sc.about(),
            sc.default_faults(),
            if sc.uses_stop_mode() {
                " (uses --mode)"
            } else {
                ""
            }
        ));
    }
    s.push_str("\nBroken variants and the scenario that catches each:\n");
    for (name, _, owner) in BROKEN {
        s.push_str(&format!("  {name:<22} {owner}\n"));
    }
    s.push_str(
        "\nExit: 0 every invariant held (also after Ctrl-C), 1 a violation (a --broken variant \
         caught), 2 bad input or a harness failure, 3 starved: a scenario ran fewer than its \
         minimum iterations (one per second of its share, at least 1; all of --iterations) \
         because the host was too busy, so nothing was judged, 4 a --broken variant not caught.",
    );
    s
}

/// Why `usmp stress` refused its arguments.
#[derive(Debug, thiserror::Error)]
pub enum StressArgError {
    #[error("unknown scenario '{name}' (valid: all, {valid})")]
    Scenario { name: String, valid: String },
    #[error("--duration '{value}': {why} (examples: 60s, 10m, 500ms)")]
    Duration { value: String, why: String },
    #[error("--iterations must be at least 1, got {0}")]
    Iterations(i64),
    #[error("--host-load must be at most {HOST_LOAD_MAX}, got {0}")]
    HostLoad(usize),
    #[error("--hang-timeout '{value}': {why} (examples: 10s, 2s)")]
    HangTimeout { value: String, why: String },
    #[error("--seed '{0}': expected a number, decimal or 0x-hex")]
    Seed(String),
    #[error(transparent)]
    Faults(#[from] super::faults::FaultListError),
    #[error("--broken '{name}': unknown variant (valid: {valid})")]
    Broken { name: String, valid: String },
    #[error(
        "--broken {variant} is caught by scenario {owner}, which is not in --scenario {chosen}"
    )]
    BrokenElsewhere {
        variant: String,
        owner: &'static str,
        chosen: String,
    },
    #[error("--broken {variant}: its scenario {owner} is not built into this usmp")]
    BrokenOwnerMissing {
        variant: String,
        owner: &'static str,
    },
    #[error("cannot create --trace-on-failure file {path}: {source}")]
    TraceFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A checked `usmp stress`.
pub struct Plan {
    pub scenarios: Vec<&'static dyn Scenario>,
    pub cpus: usize,
    pub host_cores: usize,
    pub seed: u64,
    /// Per scenario.
    pub limit: Limit,
    pub modes: Vec<StopMode>,
    pub mode_arg: Mode,
    /// `None`: each scenario's own.
    pub faults: Option<FaultSet>,
    pub broken: Option<(&'static str, Broken, &'static str)>,
    pub hang_timeout: Duration,
    pub trace_on_failure: Option<PathBuf>,
    pub json: bool,
    /// `--host-load`: busy threads beside the runtime.
    pub host_load: usize,
}

/// More busy threads than this is a typo, not a load.
pub const HOST_LOAD_MAX: usize = 1024;

fn parse_seed(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn clock_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
}

pub fn plan(a: Args) -> Result<Plan, StressArgError> {
    let host_cores = host_cores();
    let cpus = a.cpus.unwrap_or((2 * host_cores).max(4));
    let broken = match &a.broken {
        None => None,
        Some(name) => Some(
            BROKEN
                .iter()
                .copied()
                .find(|(n, _, _)| n == name)
                .ok_or_else(|| StressArgError::Broken {
                    name: name.clone(),
                    valid: BROKEN.iter().map(|b| b.0).collect::<Vec<_>>().join(", "),
                })?,
        ),
    };
    let scenarios: Vec<&'static dyn Scenario> = if a.scenario == "all" {
        match broken {
            // A broken run exercises the scenario that must catch it.
            Some((variant, _, owner)) => {
                vec![
                    super::find(owner).ok_or_else(|| StressArgError::BrokenOwnerMissing {
                        variant: variant.into(),
                        owner,
                    })?,
                ]
            }
            None => SCENARIOS.to_vec(),
        }
    } else {
        let sc = super::find(&a.scenario).ok_or_else(|| StressArgError::Scenario {
            name: a.scenario.clone(),
            valid: SCENARIOS
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        if let Some((variant, _, owner)) = broken {
            if owner != sc.name() {
                return Err(StressArgError::BrokenElsewhere {
                    variant: variant.into(),
                    owner,
                    chosen: a.scenario.clone(),
                });
            }
        }
        vec![sc]
    };
    let limit = match (&a.duration, a.iterations) {
        (_, Some(k)) if k < 1 => return Err(StressArgError::Iterations(k)),
        (_, Some(k)) => Limit::Iterations(k as u64),
        (Some(d), None) => {
            if d.trim_start().starts_with('-') {
                return Err(StressArgError::Duration {
                    value: d.clone(),
                    why: "must not be negative".into(),
                });
            }
            let total = humantime::parse_duration(d).map_err(|e| StressArgError::Duration {
                value: d.clone(),
                why: e.to_string(),
            })?;
            if total.is_zero() {
                return Err(StressArgError::Duration {
                    value: d.clone(),
                    why: "must be more than 0".into(),
                });
            }
            Limit::Duration(total / scenarios.len() as u32)
        }
        (None, None) => Limit::Duration(DEFAULT_PER_SCENARIO),
    };
    if a.hang_timeout.trim_start().starts_with('-') {
        return Err(StressArgError::HangTimeout {
            value: a.hang_timeout.clone(),
            why: "must not be negative".into(),
        });
    }
    let hang_timeout =
        humantime::parse_duration(&a.hang_timeout).map_err(|e| StressArgError::HangTimeout {
            value: a.hang_timeout.clone(),
            why: e.to_string(),
        })?;
    if hang_timeout.is_zero() {
        return Err(StressArgError::HangTimeout {
            value: a.hang_timeout.clone(),
            why: "must be more than 0".into(),
        });
    }
    let seed = match &a.seed {
        Some(s) => parse_seed(s).ok_or_else(|| StressArgError::Seed(s.clone()))?,
        None => clock_seed(),
    };
    let modes = a.mode.modes();
    let faults = a.faults.as_deref().map(FaultSet::parse).transpose()?;
    if a.host_load > HOST_LOAD_MAX {
        return Err(StressArgError::HostLoad(a.host_load));
    }
    if let Some(p) = &a.trace_on_failure {
        // Checked now, so a bad path is bad input rather than a lost trace at the end; a file
        // made only to check is removed again, so a run that passes leaves nothing behind.
        let existed = p.exists();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|source| StressArgError::TraceFile {
                path: p.clone(),
                source,
            })?;
        if !existed {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(Plan {
        scenarios,
        cpus,
        host_cores,
        seed,
        limit,
        modes,
        mode_arg: a.mode,
        faults,
        broken,
        hang_timeout,
        trace_on_failure: a.trace_on_failure,
        json: a.json,
        host_load: a.host_load,
    })
}

/// A stop mode's name in counters and output.
pub fn mode_name(m: StopMode) -> &'static str {
    match m {
        StopMode::Deterministic => "deterministic",
        _ => "best-effort",
    }
}

impl Plan {
    /// The command that replays `sc` as this run ran it.
    pub fn replay(&self, sc: &dyn Scenario, faults: &FaultSet) -> String {
        let limit = match self.limit {
            Limit::Duration(d) => format!("--duration {}ms", d.as_millis()),
            Limit::Iterations(k) => format!("--iterations {k}"),
        };
        let mut s = format!(
            "usmp stress --scenario {} --seed {:#x} --cpus {} {limit} --mode {} --faults {} --hang-timeout {}ms",
            sc.name(),
            self.seed,
            self.cpus,
            self.mode_arg.name(),
            faults,
            self.hang_timeout.as_millis()
        );
        if let Some((name, _, _)) = self.broken {
            s.push_str(" --broken ");
            s.push_str(name);
        }
        if self.host_load > 0 {
            s.push_str(&format!(" --host-load {}", self.host_load));
        }
        s
    }
}
