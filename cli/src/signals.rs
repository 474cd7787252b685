//! SIGINT and SIGQUIT for every command. [`Signals::block`] blocks both in the main thread
//! before anything else starts, so every thread (each logical CPU included) inherits the block.
//! A command then either takes them ([`Signals::take`]: one thread takes them with `sigwait`,
//! so no handler ever runs on a CPU thread, where it could nest inside an IPI handler on the
//! signal stack, and a Ctrl-C at any moment only sets the stop flag) or gives them back their
//! default actions ([`Signals::restore_default`]).
//!
//! Taken: the first SIGINT sets [`SignalState::stop`], a second exits at once with 130;
//! SIGQUIT (Ctrl-\) prints every CPU's state and NMI-sampled instruction pointer of the runtime
//! in [`SignalState::quit_target`] to stderr, and the run goes on.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use usmp::Handle;

/// SIGINT and SIGQUIT, blocked in the main thread; each command takes them or restores them.
pub struct Signals(SigSet);

/// What the signal thread shares with the command.
pub struct SignalState {
    /// Set by the first SIGINT.
    pub stop: Arc<AtomicBool>,
    /// The runtime SIGQUIT dumps, while there is one.
    pub quit_target: Arc<Mutex<Option<Handle>>>,
}

impl Signals {
    /// Blocks SIGINT and SIGQUIT in the calling (main) thread, before any other thread exists,
    /// so every thread started later inherits the block. (Blocking a valid set cannot fail.)
    pub fn block() -> Signals {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGQUIT);
        let _ = set.thread_block();
        Signals(set)
    }

    /// Unblocks them in this thread: their default actions are back, and a pending one is
    /// delivered now (for commands that do not take them: `kexec`, `latency`).
    pub fn restore_default(self) {
        let _ = self.0.thread_unblock();
    }

    /// Starts the thread that takes them with `sigwait`. That thread lives until the process
    /// exits: it holds no resource and is never joined.
    pub fn take(self) -> std::io::Result<SignalState> {
        let set = self.0;
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
            })?;
        announce("signals");
        Ok(SignalState { stop, quit_target })
    }
}

impl SignalState {
    /// Points SIGQUIT at `h` (`None`: at nothing).
    pub fn set_quit_target(&self, h: Option<Handle>) {
        *self.quit_target.lock().unwrap_or_else(|e| e.into_inner()) = h;
    }
}

/// `USMP_ANNOUNCE_PHASES=1` (for the Ctrl-C test): one `usmp: phase: NAME` line on stderr as the
/// run enters each phase, so a test can send SIGINT at a known point without sleeping.
pub fn announce(phase: &str) {
    if std::env::var_os("USMP_ANNOUNCE_PHASES").is_some() {
        let _ = writeln!(std::io::stderr(), "usmp: phase: {phase}");
    }
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
