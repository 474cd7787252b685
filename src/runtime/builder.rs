//! `Builder`: every knob of a runtime, with the defaults a user expects.

use std::time::Duration;

use super::error::RuntimeError;
use super::rt::Runtime;
use crate::cpu::idle::IdlePolicy;
use crate::ipi::signal::Signals;

/// The most logical CPUs a runtime may have.
pub const MAX_CPUS: usize = 1024;

/// The default size of each CPU's alternate signal stack (see [`Builder::signal_stack`]).
pub const DEFAULT_SIGNAL_STACK: usize = 64 * 1024;

/// The resolved configuration a runtime runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) cpus: usize,
    pub(crate) signals: Signals,
    pub(crate) idle: IdlePolicy,
    pub(crate) call_timeout: Duration,
    pub(crate) boot_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) csd_pool: usize,
    pub(crate) event_ring: usize,
    pub(crate) irq_accounting: bool,
    pub(crate) pin: bool,
    pub(crate) log_events: bool,
    pub(crate) collect_trace: bool,
    pub(crate) generation: u64,
    pub(crate) name: String,
    pub(crate) park: crate::stop::ParkPolicy,
    pub(crate) stop: crate::stop::StopConfig,
    pub(crate) signal_stack: usize,
}

/// Builds a [`Runtime`].
///
/// ```
/// let rt = usmp::Builder::new().cpus(2).build().unwrap();
/// assert_eq!(rt.online_mask().to_string(), "0-1");
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    cfg: Config,
    signals: Option<Signals>,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// Defaults: one logical CPU per host core this process may use, signals
    /// `SIGRTMIN()+2`/`+3`, poll-then-sleep idle (50 µs), 5 s call timeout, 10 s boot timeout.
    pub fn new() -> Self {
        let cores = crate::cpu::affinity::allowed_cores().len().max(1);
        Builder {
            cfg: Config {
                cpus: cores,
                signals: Signals { ipi: 0, nmi: 0 },
                idle: IdlePolicy::default(),
                call_timeout: Duration::from_secs(5),
                boot_timeout: Duration::from_secs(10),
                shutdown_timeout: Duration::from_secs(10),
                csd_pool: 0,
                event_ring: 0,
                irq_accounting: false,
                pin: true,
                log_events: true,
                collect_trace: false,
                generation: 0,
                name: "usmp".into(),
                park: crate::stop::ParkPolicy::default(),
                stop: crate::stop::StopConfig::default(),
                signal_stack: DEFAULT_SIGNAL_STACK,
            },
            signals: None,
        }
    }

    /// Number of logical CPUs, 1 to [`MAX_CPUS`]. More than host cores is fine
    /// (oversubscription).
    pub fn cpus(mut self, n: usize) -> Self {
        self.cfg.cpus = n;
        self
    }

    /// The IPI and NMI signal numbers (default `SIGRTMIN()+2` and `+3`).
    pub fn signals(mut self, ipi: i32, nmi: i32) -> Self {
        self.signals = Some(Signals { ipi, nmi });
        self
    }

    /// How idle CPUs wait.
    pub fn idle(mut self, policy: IdlePolicy) -> Self {
        self.cfg.idle = policy;
        self
    }

    /// How long a synchronous call waits before giving up with an error (default 5 s, the
    /// kernel's csd lock-wait debug threshold).
    pub fn call_timeout(mut self, d: Duration) -> Self {
        self.cfg.call_timeout = d;
        self
    }

    /// How long bring-up waits for a CPU (default 10 s, the kernel's handshake timeout).
    pub fn boot_timeout(mut self, d: Duration) -> Self {
        self.cfg.boot_timeout = d;
        self
    }

    /// How long shutdown waits for each CPU thread before reporting it stuck (default 10 s).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.cfg.shutdown_timeout = d;
        self
    }

    /// Number of preallocated csds shared by all senders (default 256 + 64 per CPU; 0 means
    /// the default). Any size from 1 works: a `call_many` with more targets than free csds
    /// goes round by round.
    pub fn csd_pool(mut self, n: usize) -> Self {
        self.cfg.csd_pool = n;
        self
    }

    /// Events per CPU ring (default 2048 up to 64 CPUs, 512 beyond).
    pub fn event_ring(mut self, n: usize) -> Self {
        self.cfg.event_ring = n;
        self
    }

    /// Account time spent irq-masked per CPU (two clock reads per outermost mask; off by
    /// default so `irq_save`/`irq_restore` stay a few nanoseconds).
    pub fn irq_accounting(mut self, on: bool) -> Self {
        self.cfg.irq_accounting = on;
        self
    }

    /// Pin CPU threads to host cores round-robin (default true).
    pub fn pin(mut self, on: bool) -> Self {
        self.cfg.pin = on;
        self
    }

    /// Run a logger thread that turns the event rings into `tracing` events (default true).
    /// With this off and no trace collected, nothing is recorded at all (the IPI path skips
    /// its clock reads).
    pub fn log_events(mut self, on: bool) -> Self {
        self.cfg.log_events = on;
        self
    }

    /// Keep every logged event for [`crate::Handle::take_trace`] (default false).
    pub fn collect_trace(mut self, on: bool) -> Self {
        self.cfg.collect_trace = on;
        self
    }

    /// Thread-name prefix (default "usmp").
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.cfg.name = name.into();
        self
    }

    /// What a stopped CPU does: stay parked (`Spin`) or end its thread (`PowerOff`, default).
    pub fn park_policy(mut self, p: crate::stop::ParkPolicy) -> Self {
        self.cfg.park = p;
        self
    }

    /// Stop retries (default 3).
    pub fn stop_max_retries(mut self, n: u32) -> Self {
        self.cfg.stop.max_retries = n;
        self
    }

    /// Stop waits: after the first attempt (default 1 s) and after each NMI attempt
    /// (default 10 ms).
    pub fn stop_waits(mut self, first: Duration, nmi: Duration) -> Self {
        self.cfg.stop.first_wait = first;
        self.cfg.stop.nmi_wait = nmi;
        self
    }

    /// Wait forever for each stop attempt (the kernel's `wait_forever`).
    pub fn stop_wait_forever(mut self, on: bool) -> Self {
        self.cfg.stop.wait_forever = on;
        self
    }

    /// Best-effort or deterministic catching of CPUs that come online during a stop.
    pub fn stop_mode(mut self, m: crate::stop::StopMode) -> Self {
        self.cfg.stop.mode = m;
        self
    }

    /// The size of each CPU's alternate signal stack, on which IPI callbacks, STARTING/DYING
    /// steps, stop_machine functions and NMI hooks run when they interrupt a busy CPU (default
    /// 64 KiB, 16 KiB to 64 MiB; a `PROT_NONE` guard page sits below it, so an overflow is a
    /// clean SIGSEGV, never silent corruption). Rounded up to whole pages. Callbacks served by an
    /// idle CPU run on its thread stack instead, so size this for the deepest callback.
    pub fn signal_stack(mut self, bytes: usize) -> Self {
        self.cfg.signal_stack = bytes;
        self
    }

    /// A custom stop backend (default: maskable IPI on attempt 1, NMI after).
    pub fn stop_backend(mut self, b: std::sync::Arc<dyn crate::stop::StopBackend>) -> Self {
        self.cfg.stop.backend = b;
        self
    }

    /// Checks the configuration and resolves defaults.
    pub(crate) fn resolve(&self) -> Result<Config, RuntimeError> {
        let mut cfg = self.cfg.clone();
        if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
            return Err(RuntimeError::BadCpuCount {
                got: cfg.cpus,
                max: MAX_CPUS,
            });
        }
        cfg.signals = self.signals.unwrap_or_else(Signals::default_pair);
        cfg.signals.validate()?;
        if cfg.call_timeout.is_zero() || cfg.boot_timeout.is_zero() {
            return Err(RuntimeError::BadConfig(
                "call and boot timeouts must be non-zero".into(),
            ));
        }
        let (lo, hi) = (
            crate::ipi::signal::MIN_SIGNAL_STACK,
            crate::ipi::signal::MAX_SIGNAL_STACK,
        );
        if !(lo..=hi).contains(&cfg.signal_stack) {
            return Err(RuntimeError::BadConfig(format!(
                "signal_stack must be {lo} to {hi} bytes, got {}",
                cfg.signal_stack
            )));
        }
        if cfg.csd_pool == 0 {
            cfg.csd_pool = 256 + 64 * cfg.cpus;
        }
        if cfg.event_ring == 0 {
            cfg.event_ring = if cfg.cpus <= 64 { 2048 } else { 512 };
        }
        Ok(cfg)
    }

    /// Installs the signal handlers, starts every CPU and returns the running runtime.
    pub fn build(self) -> Result<Runtime, RuntimeError> {
        Runtime::start(self.resolve()?)
    }
}
