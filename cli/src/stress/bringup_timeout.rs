//! `bringup-timeout` (seed 003): after `cpu_up` returns, a CPU must be either running or
//! for-sure dead. Catches `--broken bringup-without-cas`.
//!
//! Each round builds a runtime whose handshake timeout `T` is taken from a sweep (`TIMEOUTS`),
//! then cycles random non-boot CPUs down and up. Before most bring-ups the AP gets a boot delay
//! swept around `T` (0.5 T to 2 T, so some bring-ups just make it and some just miss). After
//! every operation, with no other hotplug in flight:
//! 1. A `cpu_up` that returned `BootTimeout` is counted (`timeouts`); once the limbo has
//!    cleared (bounded wait), the CPU must be offline: online there means it booted half-way
//!    after its controller gave up (`half_booted`). A limbo that never clears is `limbo_stuck`.
//! 2. `init_mm_refs()` must equal the number of CPUs online (each committed CPU thread holds
//!    exactly one reference, a dead one none): otherwise `refcount_leaks`.
//!
//! Faults: default `preempt` (the library's `doorbell-delay`, `doorbell-drop` and `preempt`
//! also apply); `slow-boot=D` adds a random 0..=D delay to the bring-ups the sweep leaves
//! undelayed.

use std::time::Duration;

use usmp::{CpuId, CpuRunState, Handle, HotplugError};

use super::host_sched::Window;
use super::timeouts::{self, Failure, Wait};
use super::{Ctx, Scenario, ScenarioError};
use crate::rng::Rng;

/// Handshake timeouts swept over the rounds.
const TIMEOUTS: [Duration; 3] = [
    Duration::from_millis(20),
    Duration::from_millis(40),
    Duration::from_millis(80),
];
/// Boot delays, in percent of the round's timeout.
const DELAY_PCT: [u64; 8] = [50, 80, 95, 100, 105, 120, 150, 200];
/// Hotplug operations per runtime.
const OPS_PER_ROUND: u32 = 24;
/// A timed-out AP must have reported dead within its boot delay plus this.
const LIMBO_BOUND: Duration = Duration::from_secs(5);
/// Building a runtime under a short handshake timeout may itself time out on a loaded host.
const BUILD_TRIES: u32 = 3;

pub struct BringupTimeout;

impl Scenario for BringupTimeout {
    fn name(&self) -> &'static str {
        "bringup-timeout"
    }

    fn about(&self) -> &'static str {
        "AP boot delays swept around the handshake timeout, down/up cycles; half_booted, refcount_leaks, limbo_stuck stay 0"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "half_booted",
            "refcount_leaks",
            "limbo_stuck",
            "timeouts",
            "ups",
            "downs",
            "delayed_ups",
            "hotplug_errors",
            "hotplug_timeouts",
            "hotplug_refusals",
            "build_retries",
        ]
    }

    fn default_faults(&self) -> &'static str {
        "preempt"
    }

    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError> {
        let mut rng = ctx.rng(0);
        let mut round = 0u64;
        while ctx.running() {
            let timeout = TIMEOUTS[(round % TIMEOUTS.len() as u64) as usize];
            round += 1;
            let Some(rt) = build(ctx, timeout)? else {
                continue;
            };
            let h = rt.handle();
            for _ in 0..OPS_PER_ROUND {
                if !ctx.running() {
                    break;
                }
                one_op(ctx, &h, &mut rng, timeout);
                ctx.iteration();
            }
            // A CPU still in limbo would hold up the runtime's shutdown; it is bounded anyway.
            h.wait_limbo_clear(LIMBO_BOUND);
            ctx.unwatch();
            drop(rt);
        }
        Ok(())
    }
}

/// A runtime with handshake timeout `timeout`; `None` when every try timed out booting (the
/// host is too loaded for that timeout: counted, not a violation).
fn build(ctx: &Ctx, timeout: Duration) -> Result<Option<usmp::Runtime>, ScenarioError> {
    for _ in 0..BUILD_TRIES {
        match ctx.build(|b| b.boot_timeout(timeout)) {
            Ok(rt) => return Ok(Some(rt)),
            Err(ScenarioError::Build(usmp::RuntimeError::BootTimeout { .. })) => {
                ctx.count("build_retries", 1);
                ctx.heartbeat();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// One `cpu_down` or (possibly delayed) `cpu_up` of a random non-boot CPU, then the checks.
fn one_op(ctx: &Ctx, h: &Handle, rng: &mut Rng, timeout: Duration) {
    let n = h.cpus();
    let cpu: CpuId = 1 + rng.below(n - 1);
    if h.is_online(cpu) {
        let window = Window::open(h);
        match h.cpu_down(cpu) {
            Ok(()) => ctx.count("downs", 1),
            Err(e) => hotplug_error(ctx, Wait { h, window: &window }, "cpu_down", cpu, &e, None),
        }
    } else {
        let delay = pick_delay(ctx, rng, timeout);
        if let Some(d) = delay {
            // Refused only for a CPU in limbo, whose bring-up is refused anyway.
            if h.faults().set_boot_delay(cpu, d).is_ok() {
                ctx.count("delayed_ups", 1);
            }
        }
        let window = Window::open(h);
        let wait = Wait { h, window: &window };
        match h.cpu_up(cpu) {
            Ok(()) => ctx.count("ups", 1),
            Err(e @ HotplugError::BootTimeout { .. }) => {
                ctx.count("timeouts", 1);
                // The sweep's delays (half the timeout and more) may miss it; an undelayed or
                // slightly delayed AP must not.
                let excuse = delay
                    .is_some_and(|d| d >= timeout / 2)
                    .then_some("its boot was delayed by the sweep");
                timeouts::hotplug_failed(ctx, wait, "cpu_up", cpu, &e, excuse);
                let bound = delay.unwrap_or_default() + LIMBO_BOUND;
                if !h.wait_limbo_clear(bound) {
                    ctx.violation(
                        "limbo_stuck",
                        Some(cpu),
                        format!(
                            "CPU {cpu} timed out booting ({timeout:?}, delay {delay:?}) and has not reported dead after {bound:?} (state {:?})",
                            h.cpu_state(cpu)
                        ),
                    );
                    return;
                }
                if h.is_online(cpu) || h.cpu_state(cpu) == Some(CpuRunState::Online) {
                    ctx.violation(
                        "half_booted",
                        Some(cpu),
                        format!(
                            "cpu_up({cpu}) returned BootTimeout ({timeout:?}, delay {delay:?}) yet the CPU is online after the limbo cleared (init_mm_refs {}, online {})",
                            h.init_mm_refs(),
                            h.online_mask()
                        ),
                    );
                    return;
                }
            }
            Err(e) => hotplug_error(ctx, wait, "cpu_up", cpu, &e, None),
        }
    }
    check_refs(ctx, h);
}

/// The sweep's delay for the next bring-up (3 in 4), or `slow-boot`'s, or none.
fn pick_delay(ctx: &Ctx, rng: &mut Rng, timeout: Duration) -> Option<Duration> {
    if !rng.one_in(4) {
        let pct = DELAY_PCT[rng.below(DELAY_PCT.len())];
        return Some(timeout * pct as u32 / 100);
    }
    ctx.faults
        .slow_boot
        .map(|max| Duration::from_micros(rng.next() % (max.as_micros() as u64 + 1)))
}

/// Step 2: with no operation in flight and no limbo, one reference per online CPU.
fn check_refs(ctx: &Ctx, h: &Handle) {
    if !h.wait_limbo_clear(LIMBO_BOUND) {
        return; // reported by the operation that left it
    }
    let online = h.online_mask();
    let refs = h.init_mm_refs();
    if refs != online.weight() as u64 {
        ctx.violation(
            "refcount_leaks",
            None,
            format!(
                "init_mm_refs() = {refs} with {} CPUs online ({online}) and no hotplug in flight",
                online.weight()
            ),
        );
    }
}

/// A hotplug error other than the bring-up timeout: a timeout is a violation, a refusal is
/// counted, anything else is counted in `hotplug_errors`.
fn hotplug_error(
    ctx: &Ctx,
    wait: Wait<'_>,
    op: &str,
    cpu: CpuId,
    e: &HotplugError,
    excuse: Option<&str>,
) {
    if timeouts::hotplug_failed(ctx, wait, op, cpu, e, excuse) == Failure::Other {
        ctx.count("hotplug_errors", 1);
        tracing::debug!("bringup-timeout: CPU{cpu}: {e}");
    }
}
