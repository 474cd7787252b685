//! The `hotplug` workload: random CPU online/offline churn while IPIs flow, with rcutorture's
//! onoff accounting (attempts, successes, and min/avg/max time of each direction).
//!
//! 1. A sender thread loops until the churn ends, sending `call_single` (sync or async) to a
//!    random CPU of the current online mask. `Offline` is expected (the CPU left between the
//!    snapshot and the send) and counted; any other error fails the run.
//! 2. The caller picks a random CPU and toggles it: `cpu_down` if it is online and not the last
//!    online CPU, `cpu_up` if it is offline. Every try is an attempt; a success is timed. A
//!    failed try is counted and the churn goes on (as rcutorture does); the first failure is
//!    kept for the report.
//! 3. At the end every offline CPU is brought back (a CPU in limbo is waited for first), the
//!    sender is joined, and the workload waits until every accepted callback has run and
//!    dropped its closure (the caller then holds the last reference to the counters, so nothing
//!    is freed in IPI context), then checks callbacks run against callbacks accepted.
//!
//! The sequence of choices comes from fixed-seed xorshifts; their timing is up to the host.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usmp::{CpuId, Handle, HotplugError, IpiError};

/// Bound on bringing CPUs back at the end, on a limbo wait, and on the final quiescence wait.
const SETTLE: Duration = Duration::from_secs(10);
const SEED: u64 = 0xD1B5_4A32_D192_ED03;

/// One direction of the churn (rcutorture's `n_online_attempts`, `n_online_successes`,
/// `sum_online`, `min_online`, `max_online`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OnOffStats {
    pub attempts: u64,
    pub successes: u64,
    /// Time of the fastest / slowest successful operation, and the mean of the successful ones.
    pub min_us: u64,
    pub avg_us: u64,
    pub max_us: u64,
    #[serde(skip)]
    sum_us: u64,
}

impl OnOffStats {
    fn record(&mut self, took: Option<Duration>) {
        self.attempts += 1;
        let Some(d) = took else { return };
        let us = d.as_micros() as u64;
        self.min_us = if self.successes == 0 {
            us
        } else {
            self.min_us.min(us)
        };
        self.max_us = self.max_us.max(us);
        self.successes += 1;
        self.sum_us += us;
        self.avg_us = self.sum_us / self.successes;
    }
}

/// What the hotplug workload did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OnOffReport {
    /// Wall time of the churn phase.
    pub elapsed_ms: u64,
    /// The stop flag ended the run before `duration` did.
    pub interrupted: bool,
    /// `cpu_up` during the churn (not counting the final bring-back).
    pub onlines: OnOffStats,
    /// `cpu_down` during the churn.
    pub offlines: OnOffStats,
    /// The first failed hotplug operation, if any (the churn went on).
    pub first_failure: Option<String>,
    /// CPUs that were offline when the churn ended and were brought back.
    pub brought_back: u64,
    /// Calls sent while churning: accepted (sync and async), refused because the target was
    /// offline, and callbacks that ran.
    pub calls_sync: u64,
    pub calls_async: u64,
    pub calls_offline: u64,
    pub callbacks_run: u64,
}

/// Why the hotplug workload failed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugChurnError {
    #[error("hotplug workload: needs at least 2 CPUs, the runtime has {cpus}")]
    TooFewCpus { cpus: usize },
    /// A CPU could not be brought back online at the end.
    #[error("hotplug workload: cannot bring CPU {cpu} back online: {source}")]
    BringBack {
        cpu: CpuId,
        #[source]
        source: HotplugError,
    },
    /// A call failed with something other than `Offline`.
    #[error("hotplug workload: call_single to CPU {cpu}: {source}")]
    Ipi {
        cpu: CpuId,
        #[source]
        source: IpiError,
    },
    #[error("hotplug workload: cannot start the IPI sender thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("hotplug workload: the IPI sender thread panicked")]
    SenderPanicked,
    /// Callbacks were accepted but did not run exactly once.
    #[error("hotplug workload: {expected} callbacks accepted, {ran} ran")]
    Mismatch { expected: u64, ran: u64 },
    #[error("hotplug workload: callbacks still pending after {}s", SETTLE.as_secs())]
    Unsettled,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// What the sender did.
#[derive(Default)]
struct Sent {
    sync: u64,
    asynchronous: u64,
    offline: u64,
}

/// Step 1: calls to random online CPUs until `done`. Callbacks only bump `ran` (IPI context).
fn send_calls(
    h: &Handle,
    ran: &Arc<AtomicU64>,
    done: &AtomicBool,
) -> Result<Sent, (CpuId, IpiError)> {
    let mut rng = SEED ^ 0x5555;
    let mut sent = Sent::default();
    while !done.load(Ordering::Relaxed) {
        let online = h.online_mask();
        let r = xorshift(&mut rng);
        let Some(cpu) = online
            .iter()
            .nth((r % online.weight().max(1) as u64) as usize)
        else {
            std::thread::yield_now();
            continue;
        };
        let wait = r & 0x100 != 0;
        let c = ran.clone();
        match h.call_single(
            cpu,
            move || {
                c.fetch_add(1, Ordering::Relaxed);
            },
            wait,
        ) {
            Ok(()) if wait => sent.sync += 1,
            Ok(()) => {
                sent.asynchronous += 1;
                // Async calls return at once: leave the CPUs and the csd pool some air.
                std::thread::yield_now();
            }
            Err(IpiError::Offline { .. }) => sent.offline += 1,
            Err(e) => return Err((cpu, e)),
        }
    }
    Ok(sent)
}

/// Runs the churn for `duration` (or until `stop`) on `h`; see the module doc.
pub fn hotplug_churn(
    h: &Handle,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<OnOffReport, HotplugChurnError> {
    let n = h.cpus();
    if n < 2 {
        return Err(HotplugChurnError::TooFewCpus { cpus: n });
    }
    let ran = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let (h, ran, done) = (h.clone(), ran.clone(), done.clone());
        std::thread::Builder::new()
            .name("usmp-hotplug-sender".into())
            .spawn(move || send_calls(&h, &ran, &done))
            .map_err(HotplugChurnError::Spawn)?
    };

    // Step 2.
    let mut rep = OnOffReport::default();
    let mut rng = SEED;
    let start = Instant::now();
    while start.elapsed() < duration {
        if stop.load(Ordering::Relaxed) {
            rep.interrupted = true;
            break;
        }
        let cpu = (xorshift(&mut rng) % n as u64) as usize;
        let (r, stats) = if h.is_online(cpu) {
            if h.online_mask().weight() <= 1 {
                continue;
            }
            let t = Instant::now();
            (h.cpu_down(cpu).map(|()| t.elapsed()), &mut rep.offlines)
        } else {
            let t = Instant::now();
            (h.cpu_up(cpu).map(|()| t.elapsed()), &mut rep.onlines)
        };
        match r {
            Ok(took) => stats.record(Some(took)),
            Err(e) => {
                stats.record(None);
                tracing::debug!("hotplug workload: CPU{cpu}: {e}");
                rep.first_failure.get_or_insert_with(|| e.to_string());
            }
        }
    }
    rep.elapsed_ms = start.elapsed().as_millis() as u64;

    // Step 3.
    let back = bring_all_back(h, &mut rep);
    done.store(true, Ordering::Relaxed);
    let sent = sender
        .join()
        .map_err(|_| HotplugChurnError::SenderPanicked)?;
    back?;
    let sent = sent.map_err(|(cpu, source)| HotplugChurnError::Ipi { cpu, source })?;
    rep.calls_sync = sent.sync;
    rep.calls_async = sent.asynchronous;
    rep.calls_offline = sent.offline;
    let expected = sent.sync + sent.asynchronous;
    let deadline = Instant::now() + SETTLE;
    while Arc::strong_count(&ran) > 1 || ran.load(Ordering::Acquire) < expected {
        if Instant::now() >= deadline {
            return Err(HotplugChurnError::Unsettled);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    rep.callbacks_run = ran.load(Ordering::Acquire);
    if rep.callbacks_run != expected {
        return Err(HotplugChurnError::Mismatch {
            expected,
            ran: rep.callbacks_run,
        });
    }
    Ok(rep)
}

/// Brings every offline CPU back online, waiting out a limbo first.
fn bring_all_back(h: &Handle, rep: &mut OnOffReport) -> Result<(), HotplugChurnError> {
    for cpu in 0..h.cpus() {
        if h.is_online(cpu) {
            continue;
        }
        let deadline = Instant::now() + SETTLE;
        loop {
            match h.cpu_up(cpu) {
                Ok(()) | Err(HotplugError::AlreadyOnline { .. }) => break,
                Err(HotplugError::Limbo { .. } | HotplugError::BootTimeout { .. })
                    if Instant::now() < deadline =>
                {
                    h.wait_limbo_clear(SETTLE);
                }
                Err(source) => return Err(HotplugChurnError::BringBack { cpu, source }),
            }
        }
        rep.brought_back += 1;
    }
    Ok(())
}
