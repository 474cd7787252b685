//! The logger thread: drains every CPU's event ring every 20 ms into `tracing`, with the
//! kernel's wording where the kernel has a message, and keeps the events for trace export when
//! asked to. It is an ordinary thread, so it may allocate and print; the rings are the only
//! thing it shares with signal handlers.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::rt::Shared;
use crate::cpu::events::{Event, EventKind, NO_CPU};
use crate::cpu::lock::LockUnpoisoned;
use crate::cpu::state::CpuRunState;

/// At most this many events are kept for a trace; older runs are truncated, and the trace says
/// how many were dropped.
const TRACE_CAP: usize = 4_000_000;

pub(crate) struct Logger {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    trace: Arc<Mutex<Vec<Event>>>,
}

impl Logger {
    pub(crate) fn start(shared: &Arc<Shared>) -> Logger {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let trace = Arc::new(Mutex::new(Vec::new()));
        let s = shared.clone();
        let t = trace.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{}-logger", shared.cfg.name))
            .spawn(move || run(s, rx, t))
            .ok();
        Logger {
            stop: Some(tx),
            thread,
            trace,
        }
    }

    /// Stops the thread after a last drain. Idempotent.
    pub(crate) fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub(crate) fn take_trace(&self) -> Vec<Event> {
        std::mem::take(&mut *self.trace.lock_unpoisoned())
    }
}

fn run(shared: Arc<Shared>, stop: Receiver<()>, trace: Arc<Mutex<Vec<Event>>>) {
    let mut buf = Vec::new();
    loop {
        let done = !matches!(
            stop.recv_timeout(Duration::from_millis(20)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        );
        buf.clear();
        for (i, c) in shared.machine().cpus().iter().enumerate() {
            c.ring().drain(i as u32, &mut buf);
        }
        shared
            .machine()
            .ext_ring()
            .drain(shared.machine().cpus().len() as u32, &mut buf);
        buf.sort_by_key(|e| e.ts_ns);
        if shared.cfg.log_events {
            for e in &buf {
                emit(&shared, e);
            }
        }
        if shared.cfg.collect_trace {
            let mut t = trace.lock_unpoisoned();
            let room = TRACE_CAP.saturating_sub(t.len());
            t.extend(buf.iter().take(room).copied());
        }
        if done {
            return;
        }
    }
}

fn who(shared: &Shared, ring: u32) -> String {
    if ring as usize >= shared.machine().cpus().len() {
        "ext".into()
    } else {
        format!("CPU{ring}")
    }
}

fn emit(shared: &Shared, e: &Event) {
    let w = who(shared, e.ring);
    match e.kind {
        EventKind::IpiSend => tracing::trace!("{w}: call #{} queued for CPU{}", e.b, e.a),
        EventKind::IpiHandle => {
            let from = if e.a == NO_CPU {
                "ext".to_string()
            } else {
                format!("CPU{}", e.a)
            };
            tracing::trace!("{w}: call #{} from {from} handled", e.b)
        }
        EventKind::Doorbell => tracing::trace!("{w}: doorbell -> CPU{}", e.a),
        EventKind::IdleWake => tracing::trace!("{w}: wake idle CPU{}", e.a),
        EventKind::IrqOff => tracing::trace!("{w}: irqs off"),
        EventKind::IrqOn => tracing::trace!("{w}: irqs on after {} ns", e.a),
        EventKind::IrqReplay => tracing::debug!("{w}: replayed {} deferred call(s)", e.a),
        EventKind::Nmi => tracing::debug!("{w}: NMI (reasons {:#x})", e.a),
        EventKind::CsdTimeout => tracing::warn!(
            "csd: Detected non-responsive CSD lock on {w}, waiting {} ns for CPU#{:02}",
            e.b,
            e.a
        ),
        EventKind::OfflineIpi => {
            let name = shared
                .machine()
                .cpus()
                .get(e.ring as usize)
                .map_or_else(String::new, |c| c.offline_name().load());
            tracing::warn!(
                "IPI on offline {w}: IPI callback {name} sent to offline CPU (call #{})",
                e.a
            );
        }
        EventKind::CpuState => {
            let st = CpuRunState::from_u32(e.a as u32);
            tracing::debug!("{w}: now {st:?}")
        }
        EventKind::HotplugStep => tracing::trace!(
            "{w}: hotplug step {} ({})",
            e.a,
            if e.b == 1 { "up" } else { "down" }
        ),
        EventKind::StopUpgraded => tracing::warn!("{w}: SMP: stop upgraded to a crash-stop"),
        EventKind::StopDeferred => tracing::debug!(
            "{w}: stop deferred: inside the C library at ip={:#x} (sent again)",
            e.b
        ),
        EventKind::Stopped => tracing::debug!(
            "{w}: stopped{} ip={:#x}",
            if e.a == 1 {
                " (crash, registers saved)"
            } else {
                ""
            },
            e.b
        ),
    }
}
