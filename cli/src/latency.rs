//! `usmp latency`: an IPI latency map of the host's cores.
//!
//! Tools such as core-to-core-latency and c2clat print the cache-line round trip between every
//! pair of cores, which shows a machine's topology (sockets, CCXs, SMT siblings) at a glance.
//! This does the same for inter-processor *interrupts*: for each ordered pair of host cores
//! the process may run on (its affinity mask, so `taskset` narrows it), a sender thread pinned
//! to one core measures round trips to a logical CPU pinned to the other, for each kind:
//!
//! - `pingpong`: a cache-line ping-pong between two plain threads (the floor);
//! - `polling`: `call_single` to an idle CPU that polls its queue (no signal);
//! - `busy`: `call_single` to a CPU running a job (the signal doorbell);
//! - `sleeping`: `call_single` to an idle CPU asleep on its futex (`IdlePolicy::SleepOnly`).
//!
//! Each (kind, pair) gets its own one-CPU runtime, built unpinned and then pinned to the
//! target core by a job, and an `hdrhistogram` of single round trips after a warm-up; p50 and
//! p99 are reported. Same-core pairs are left out: both ends would share one core, which
//! measures time slicing, not the interconnect.
//!
//! The SVG heatmap is written directly (one `<rect class="cell">` per pair and kind, labelled
//! axes, a colour scale in µs): plotters needs a font file at run time to lay out its labels,
//! which a fresh machine may not have; an SVG's text is laid out by whatever displays it.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::ValueEnum;
use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use usmp::{CpuMask, IdlePolicy};

use crate::signals::Signals;

/// `usmp latency`'s arguments.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Cost: pairs x kinds measurements, pairs = n x (n - 1) for n cores. Each takes about \
samples x its round trip plus a few milliseconds to build its runtime: on 2 cores the \
default is 2 pairs x 4 kinds and takes a few seconds; on 16 cores it is 240 pairs x 4 kinds, \
about a minute; narrow it with --cores or --kinds.

Exit: 0 done, 2 bad input (a core outside the affinity mask, fewer than two cores) or a \
failed measurement.")]
pub struct Args {
    /// Round trips measured per pair and kind, after a warm-up of a tenth as many.
    #[arg(long, value_name = "N", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(10..=10_000_000))]
    samples: u64,
    /// Kinds to measure, comma-separated [default: all four].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_enum)]
    kinds: Vec<Kind>,
    /// Host cores to measure between, in list format ("0-3,7") [default: every core this
    /// process may run on].
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    /// Print one JSON object instead of the matrices.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV (kind,from,to,p50_ns,p99_ns,samples) instead of the matrices.
    #[arg(long)]
    csv: bool,
    /// Also write an SVG heatmap per kind to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// What a round trip goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Cache-line ping-pong between two plain threads (the floor).
    Pingpong,
    /// `call_single` to a polling idle CPU.
    Polling,
    /// `call_single` to a CPU busy in a job (the signal doorbell).
    Busy,
    /// `call_single` to a sleeping idle CPU.
    Sleeping,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Pingpong, Kind::Polling, Kind::Busy, Kind::Sleeping];

    fn name(self) -> &'static str {
        match self {
            Kind::Pingpong => "pingpong",
            Kind::Polling => "polling",
            Kind::Busy => "busy",
            Kind::Sleeping => "sleeping",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::Pingpong => "cache-line ping-pong (floor)",
            Kind::Polling => "call_single to a polling idle CPU",
            Kind::Busy => "call_single to a CPU busy in a job (signal doorbell)",
            Kind::Sleeping => "call_single to a sleeping idle CPU",
        }
    }
}

/// One (kind, pair) result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cell {
    kind: Kind,
    from: usize,
    to: usize,
    p50_ns: u64,
    p99_ns: u64,
    samples: u64,
}

#[derive(serde::Serialize)]
struct Report<'a> {
    cores: &'a [usize],
    samples: u64,
    kinds: Vec<Kind>,
    results: &'a [Cell],
}

/// Runs `usmp latency`. SIGINT and SIGQUIT keep their default actions.
pub fn run(args: Args, signals: Signals) -> anyhow::Result<ExitCode> {
    signals.restore_default();
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        .ok_or_else(|| anyhow!("latency: cannot read this process's CPU affinity"))?
        .into_iter()
        .map(|c| c.id)
        .collect();
    let allowed_list: CpuMask = allowed.iter().copied().collect();
    let cores: Vec<usize> = match &args.cores {
        None => allowed.clone(),
        Some(list) => {
            let m: CpuMask = list
                .parse()
                .map_err(|e| anyhow!("latency: --cores {list:?}: {e}"))?;
            if let Some(bad) = m.iter().find(|c| !allowed.contains(c)) {
                bail!(
                    "latency: --cores: host core {bad} is outside this process's affinity mask ({})",
                    allowed_list.to_list_or_none()
                );
            }
            m.iter().collect()
        }
    };
    if cores.len() < 2 {
        bail!(
            "latency: needs at least two host cores to measure between; this run may use {} (see taskset, --cores)",
            cores.iter().copied().collect::<CpuMask>().to_list_or_none()
        );
    }
    let mut kinds = if args.kinds.is_empty() {
        Kind::ALL.to_vec()
    } else {
        args.kinds.clone()
    };
    kinds.sort();
    kinds.dedup();
    let pairs: Vec<(usize, usize)> = cores
        .iter()
        .flat_map(|&a| cores.iter().map(move |&b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect();
    let bar = progress((pairs.len() * kinds.len()) as u64, args.json || args.csv);
    let mut cells = Vec::with_capacity(pairs.len() * kinds.len());
    for &kind in &kinds {
        for &(from, to) in &pairs {
            bar.set_message(format!("{} {from}->{to}", kind.name()));
            let h = measure(kind, from, to, args.samples).with_context(|| {
                format!("latency: {} from core {from} to core {to}", kind.name())
            })?;
            cells.push(Cell {
                kind,
                from,
                to,
                p50_ns: h.value_at_quantile(0.5),
                p99_ns: h.value_at_quantile(0.99),
                samples: h.len(),
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if args.json {
        let r = Report {
            cores: &cores,
            samples: args.samples,
            kinds: kinds.clone(),
            results: &cells,
        };
        serde_json::to_writer_pretty(&mut out, &r).context("stdout")?;
        writeln!(out).context("stdout")?;
    } else if args.csv {
        writeln!(out, "kind,from,to,p50_ns,p99_ns,samples").context("stdout")?;
        for c in &cells {
            writeln!(
                out,
                "{},{},{},{},{},{}",
                c.kind.name(),
                c.from,
                c.to,
                c.p50_ns,
                c.p99_ns,
                c.samples
            )
            .context("stdout")?;
        }
    } else {
        write!(out, "{}", matrices(&cores, &kinds, &cells)).context("stdout")?;
    }
    out.flush().context("stdout")?;
    if let Some(path) = &args.svg {
        std::fs::write(path, svg(&cores, &kinds, &cells))
            .with_context(|| format!("latency: writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn progress(total: u64, quiet: bool) -> ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(10));
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}") {
        b.set_style(style);
    }
    b
}

fn pin(core: usize) -> anyhow::Result<()> {
    if core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        Ok(())
    } else {
        bail!("could not pin a thread to host core {core}")
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds")
}

/// Round trips of `kind` from host core `from` to host core `to`, warm-up excluded.
fn measure(kind: Kind, from: usize, to: usize, samples: u64) -> anyhow::Result<Histogram<u64>> {
    let warm = (samples / 10).max(10);
    // The measuring thread is pinned for this pair only; a fresh thread keeps the caller's
    // affinity as it was.
    std::thread::scope(|s| {
        s.spawn(|| {
            pin(from)?;
            match kind {
                Kind::Pingpong => pingpong(to, warm, samples),
                _ => ipi(kind, to, warm, samples),
            }
        })
        .join()
        .map_err(|_| anyhow!("the measuring thread panicked"))?
    })
}

fn pingpong(to: usize, warm: u64, samples: u64) -> anyhow::Result<Histogram<u64>> {
    // A cache line of its own, so the ping-pong moves exactly one line.
    let line = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let (l2, s2) = (line.clone(), stop.clone());
    let responder = std::thread::spawn(move || -> anyhow::Result<()> {
        pin(to)?;
        let mut seen = 0;
        while !s2.load(Ordering::Relaxed) {
            let v = l2.load(Ordering::Acquire);
            if v != seen && v % 2 == 1 {
                seen = v + 1;
                l2.store(seen, Ordering::Release);
            }
            std::hint::spin_loop();
        }
        Ok(())
    });
    let mut h = histogram();
    let mut v = 0u64;
    let bound = Instant::now() + Duration::from_secs(60);
    for i in 0..warm + samples {
        let t0 = Instant::now();
        v += 1;
        line.store(v, Ordering::Release);
        while line.load(Ordering::Acquire) != v + 1 {
            std::hint::spin_loop();
            if Instant::now() > bound {
                stop.store(true, Ordering::Relaxed);
                bail!("the responder on core {to} stopped answering");
            }
        }
        v += 1;
        if i >= warm {
            h.record(t0.elapsed().as_nanos() as u64)?;
        }
    }
    stop.store(true, Ordering::Relaxed);
    responder
        .join()
        .map_err(|_| anyhow!("the responder panicked"))??;
    Ok(h)
}

fn ipi(kind: Kind, to: usize, warm: u64, samples: u64) -> anyhow::Result<Histogram<u64>> {
    let idle = if kind == Kind::Sleeping {
        IdlePolicy::SleepOnly
    } else {
        IdlePolicy::default()
    };
    let rt = usmp::Builder::new()
        .cpus(1)
        .pin(false)
        .idle(idle)
        .log_events(false)
        .name("usmp-lat")
        .build()?;
    rt.run_on(0, move || pin(to))?.join()??;
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = if kind == Kind::Busy {
        let s = stop.clone();
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let j = rt.run_on(0, move || {
            r.store(true, Ordering::Release);
            while !s.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })?;
        let bound = Instant::now() + Duration::from_secs(10);
        while !ready.load(Ordering::Acquire) {
            if Instant::now() > bound {
                bail!("the busy job did not start");
            }
            std::thread::yield_now();
        }
        Some(j)
    } else {
        None
    };
    let hits = Arc::new(AtomicU64::new(0));
    let mut h = histogram();
    let result = (|| -> anyhow::Result<()> {
        for i in 0..warm + samples {
            if kind == Kind::Sleeping {
                settle_asleep(&rt)?;
            }
            let hh = hits.clone();
            let t0 = Instant::now();
            rt.call_single(
                0,
                move || {
                    hh.fetch_add(1, Ordering::Relaxed);
                },
                true,
            )?;
            if i >= warm {
                h.record(t0.elapsed().as_nanos() as u64)?;
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    if let Some(j) = spinner {
        j.join_timeout(Duration::from_secs(10))?;
    }
    result?;
    if hits.load(Ordering::Relaxed) != warm + samples {
        bail!(
            "{} of {} calls ran",
            hits.load(Ordering::Relaxed),
            warm + samples
        );
    }
    Ok(h)
}

/// Untimed, before each sleeping round trip: waits until the CPU has announced its sleep
/// since the last call (its `sleeps` count moved), then a little longer, so the call measures
/// a futex wake and not a CPU still on its way to sleep (a back-to-back call finds it awake).
fn settle_asleep(rt: &usmp::Runtime) -> anyhow::Result<()> {
    let sleeps = || rt.stats().per_cpu.first().map_or(0, |c| c.sleeps);
    let before = SLEEPS_SEEN.with(|c| c.get());
    let bound = Instant::now() + Duration::from_secs(10);
    let mut now = sleeps();
    while now <= before {
        if Instant::now() > bound {
            bail!("the CPU did not go back to sleep within 10 s");
        }
        std::thread::yield_now();
        now = sleeps();
    }
    SLEEPS_SEEN.with(|c| c.set(now));
    let t = Instant::now();
    while t.elapsed() < Duration::from_micros(20) {
        std::hint::spin_loop();
    }
    Ok(())
}

thread_local! {
    /// The `sleeps` count the last settle saw (one measuring thread per runtime).
    static SLEEPS_SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 10_000 {
        format!("{:.0}us", ns as f64 / 1e3)
    } else {
        format!("{ns}ns")
    }
}

/// The terminal view: one matrix per kind, rows = sender core, columns = target core.
fn matrices(cores: &[usize], kinds: &[Kind], cells: &[Cell]) -> String {
    let mut s = String::new();
    for &kind in kinds {
        let _ = writeln!(
            s,
            "{}: {} — round trip p50/p99 (row: sender core, column: target core)",
            kind.name(),
            kind.what()
        );
        let _ = write!(s, "{:>6}", "");
        for &c in cores {
            let _ = write!(s, " {:>15}", format!("core {c}"));
        }
        let _ = writeln!(s);
        for &a in cores {
            let _ = write!(s, "{:>6}", format!("{a}"));
            for &b in cores {
                let text = cells
                    .iter()
                    .find(|c| c.kind == kind && c.from == a && c.to == b)
                    .map_or("-".to_string(), |c| {
                        format!("{}/{}", fmt_ns(c.p50_ns), fmt_ns(c.p99_ns))
                    });
                let _ = write!(s, " {text:>15}");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s);
    }
    s
}

/// The heatmap: one panel per kind, each with its own colour scale (log of p50, in µs).
pub fn svg(cores: &[usize], kinds: &[Kind], cells: &[Cell]) -> String {
    const CELL: usize = 56;
    const PAD: usize = 60;
    let n = cores.len();
    let panel_w = (PAD + n * CELL + 20).max(300);
    let panel_h = PAD + n * CELL + 80;
    let width = panel_w * kinds.len().max(1);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{panel_h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (k, &kind) in kinds.iter().enumerate() {
        let x0 = k * panel_w;
        let mine: Vec<&Cell> = cells.iter().filter(|c| c.kind == kind).collect();
        let lo = mine.iter().map(|c| c.p50_ns).min().unwrap_or(1).max(1) as f64;
        // At least a factor of two end to end, so run-to-run noise between near-equal pairs
        // is not painted as the whole colour range.
        let hi = (mine.iter().map(|c| c.p50_ns).max().unwrap_or(1).max(1) as f64).max(2.0 * lo);
        let shade = |ns: u64| -> f64 {
            if hi <= lo {
                0.5
            } else {
                ((ns.max(1) as f64).ln() - lo.ln()) / (hi.ln() - lo.ln())
            }
        };
        let _ = writeln!(
            s,
            r#"<g class="panel" data-kind="{}"><text x="{}" y="18" font-size="13" font-weight="bold">{}: p50 round trip (µs)</text>"#,
            kind.name(),
            x0 + 8,
            kind.name()
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">target core</text><text x="{}" y="{}" transform="rotate(-90 {} {})" text-anchor="middle">sender core</text>"#,
            x0 + PAD + n * CELL / 2,
            PAD - 22,
            x0 + 16,
            PAD + n * CELL / 2,
            x0 + 16,
            PAD + n * CELL / 2
        );
        for (i, &c) in cores.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{c}</text><text x="{}" y="{}" text-anchor="end">{c}</text>"#,
                x0 + PAD + i * CELL + CELL / 2,
                PAD - 6,
                x0 + PAD - 6,
                PAD + i * CELL + CELL / 2 + 4
            );
        }
        for (r, &a) in cores.iter().enumerate() {
            for (col, &b) in cores.iter().enumerate() {
                let (x, y) = (x0 + PAD + col * CELL, PAD + r * CELL);
                match mine.iter().find(|c| c.from == a && c.to == b) {
                    Some(c) => {
                        let t = shade(c.p50_ns);
                        // Light yellow (fast) to dark red (slow).
                        let (red, green, blue) =
                            (255.0 - 100.0 * t, 240.0 - 200.0 * t, 160.0 - 130.0 * t);
                        let _ = writeln!(
                            s,
                            r#"<rect class="cell" data-kind="{}" data-from="{a}" data-to="{b}" data-p50-ns="{}" data-p99-ns="{}" x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="rgb({:.0},{:.0},{:.0})" stroke="white"/><text x="{}" y="{}" text-anchor="middle" fill="{}">{:.2}</text>"#,
                            kind.name(),
                            c.p50_ns,
                            c.p99_ns,
                            red,
                            green,
                            blue,
                            x + CELL / 2,
                            y + CELL / 2 + 4,
                            if t > 0.6 { "white" } else { "black" },
                            c.p50_ns as f64 / 1e3
                        );
                    }
                    None => {
                        let _ = writeln!(
                            s,
                            r#"<rect class="diagonal" x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="rgb(235,235,235)" stroke="white"/>"#
                        );
                    }
                }
            }
        }
        // The colour scale: its two ends, in µs.
        let ly = PAD + n * CELL + 16;
        let _ = writeln!(
            s,
            r#"<defs><linearGradient id="scale{k}"><stop offset="0" stop-color="rgb(255,240,160)"/><stop offset="1" stop-color="rgb(155,40,30)"/></linearGradient></defs><rect x="{}" y="{ly}" width="{}" height="12" fill="url(#scale{k})"/><text x="{}" y="{}">{:.2} µs</text><text x="{}" y="{}" text-anchor="end">{:.2} µs (log scale)</text></g>"#,
            x0 + PAD,
            n * CELL,
            x0 + PAD,
            ly + 26,
            lo / 1e3,
            x0 + PAD + n * CELL,
            ly + 42,
            hi / 1e3
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}
