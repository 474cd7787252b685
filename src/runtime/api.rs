//! The public API of the layers below, on [`Handle`]: each method forwards to the layer that
//! implements it (`ipi/call.rs`, `stop/routine.rs`, `stop/machine.rs`, `hotplug/api.rs`), so `Handle` stays the
//! one place users look while every layer keeps its code and state to itself.

use std::time::Duration;

use super::rt::Handle;
use crate::cpu::mask::{CpuId, CpuMask};
use crate::hotplug::{HotplugError, Section, StateId, StepFn};
use crate::ipi::IpiError;
use crate::stop::{CrashNote, ParkPolicy, StopError, StopMachineError, StopOutcome};

/// IPIs (`ipi/call.rs`).
impl Handle {
    /// Runs `f` on `cpu` in IPI context (`smp_call_function_single`). With `wait`, returns when
    /// `f` has finished there; without, once it is queued. `f` obeys the IPI-context rules of
    /// [`crate::ipi`]. A call to the calling CPU itself runs at once with irqs masked.
    ///
    /// ```
    /// use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
    /// let rt = usmp::Builder::new().cpus(2).build().unwrap();
    /// let hits = Arc::new(AtomicUsize::new(0));
    /// let h = hits.clone();
    /// rt.call_single(1, move || { h.fetch_add(1, Ordering::Relaxed); }, true).unwrap();
    /// assert_eq!(hits.load(Ordering::Relaxed), 1);
    /// assert!(matches!(rt.call_single(7, || {}, true), Err(usmp::IpiError::InvalidCpu { cpu: 7, .. })));
    /// ```
    pub fn call_single<F>(&self, cpu: CpuId, f: F, wait: bool) -> Result<(), IpiError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.shared.usable()?;
        self.shared.ipi().call_single(cpu, f, wait)
    }

    /// Queues `f` on `cpu` and returns at once (`smp_call_function_single_async`). The csd
    /// comes from the pool, so unlike the kernel there is no caller-owned csd to keep locked.
    pub fn call_single_async<F>(&self, cpu: CpuId, f: F) -> Result<(), IpiError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.shared.usable()?;
        self.shared.ipi().call_single_async(cpu, f)
    }

    /// Runs a copy of `f` on every online CPU of `mask` except the calling one
    /// (`smp_call_function_many`). Offline CPUs in `mask` are skipped, as the kernel does; a
    /// CPU that goes offline while the call is being sent is reported in
    /// [`IpiError::Partial`]. An id past the CPU count is an error before anything is sent.
    /// Called in IPI context (from a callback, or with irqs masked), an error names only the
    /// first CPU that failed, without `Partial`'s mask: building one would allocate there.
    pub fn call_many<F>(&self, mask: &CpuMask, f: F, wait: bool) -> Result<(), IpiError>
    where
        F: FnOnce() + Clone + Send + 'static,
    {
        self.shared.usable()?;
        self.shared.ipi().call_many(mask, f, wait)
    }

    /// `call_many` to every online CPU but the caller (`smp_call_function`).
    pub fn call_all_but_self<F>(&self, f: F, wait: bool) -> Result<(), IpiError>
    where
        F: FnOnce() + Clone + Send + 'static,
    {
        self.shared.usable()?;
        self.shared.ipi().call_all_but_self(f, wait)
    }

    /// Runs `f` on every online CPU, the caller included (`on_each_cpu`).
    pub fn on_each_cpu<F>(&self, f: F, wait: bool) -> Result<(), IpiError>
    where
        F: FnOnce() + Clone + Send + 'static,
    {
        self.shared.usable()?;
        self.shared.ipi().on_each_cpu(f, wait)
    }

    /// Sends an NMI asking `cpu` to sample its instruction pointer, waits up to `timeout` for
    /// it, and returns the sample (`trigger_single_cpu_backtrace`). Works on a CPU with irqs
    /// masked; fails on one that blocks the NMI signal too.
    pub fn nmi_backtrace(&self, cpu: CpuId, timeout: Duration) -> Result<u64, IpiError> {
        self.shared.usable()?;
        self.shared.ipi().nmi_backtrace(cpu, timeout)
    }
}

/// Stopping CPUs (`stop/routine.rs`, `stop/machine.rs`).
impl Handle {
    /// Stops every other online CPU (`smp_send_stop`): they leave the online mask and park by
    /// the runtime's policy. Callable from a logical CPU (which keeps running) or from any
    /// thread. Never waits forever unless `StopConfig::wait_forever` is set.
    pub fn send_stop(&self) -> Result<StopOutcome, StopError> {
        self.shared.usable()?;
        self.shared.stop().send_stop()
    }

    /// Like [`Handle::send_stop`], but each stopped CPU first saves the registers of the code it
    /// interrupted into its crash note (`crash_smp_send_stop`). Upgrades a plain stop already
    /// running.
    pub fn crash_stop(&self) -> Result<StopOutcome, StopError> {
        self.shared.usable()?;
        self.shared.stop().crash_stop()
    }

    /// Whether a stop has started in this runtime (it is terminal: a stopped image stays so).
    pub fn stop_in_progress(&self) -> bool {
        self.shared.stop().stop_in_progress()
    }

    /// CPU `cpu`'s crash note, if a crash-stop saved one.
    pub fn crash_note(&self, cpu: CpuId) -> Option<CrashNote> {
        self.shared.stop().crash_note(cpu)
    }

    /// The park policy this runtime uses.
    pub fn park_policy(&self) -> ParkPolicy {
        self.shared.stop().park_policy()
    }

    /// Runs `f` on every CPU of `cpus` while all online CPUs spin with irqs masked, and returns
    /// when all have left (`stop_machine`). `f` runs in IPI context. Fails without running `f`
    /// if some online CPU does not join within the call timeout.
    pub fn stop_machine<F>(&self, f: F, cpus: &CpuMask) -> Result<(), StopMachineError>
    where
        F: Fn(CpuId) -> Result<(), i32> + Send + Sync + 'static,
    {
        self.shared.usable()?;
        self.shared.stop().stop_machine(f, cpus)
    }
}

/// CPU hotplug (`hotplug/api.rs`).
impl Handle {
    /// Brings `cpu` online through every hotplug step (`cpu_device_up`). On error every step
    /// done is undone and the CPU is offline — or, after a bring-up timeout, in limbo: its
    /// thread will exit without touching shared state, and it cannot be brought up until then.
    pub fn cpu_up(&self, cpu: CpuId) -> Result<(), HotplugError> {
        self.shared.usable()?;
        self.shared.hotplug().cpu_up(cpu)
    }

    /// Takes `cpu` offline through every hotplug step in reverse (`cpu_device_down`). Queued
    /// calls run before it goes (none is lost or run twice); queued jobs move to another online
    /// CPU; a job running there finishes first (bounded by the boot timeout).
    pub fn cpu_down(&self, cpu: CpuId) -> Result<(), HotplugError> {
        self.shared.usable()?;
        self.shared.hotplug().cpu_down(cpu)
    }

    /// `cpu_hotplug_disable`: while the count is non-zero, `cpu_up`/`cpu_down` fail with
    /// `Disabled`. Waits for an operation in progress to finish.
    pub fn hotplug_disable(&self) {
        self.shared.hotplug().hotplug_disable()
    }

    /// `cpu_hotplug_enable`. An enable without a matching disable is reported and ignored (the
    /// count never underflows).
    pub fn hotplug_enable(&self) -> Result<(), HotplugError> {
        self.shared.usable()?;
        self.shared.hotplug().hotplug_enable()
    }

    /// Adds a named step to the table and runs `startup` on every online CPU in its section's
    /// context (`cpuhp_setup_state`). If it fails on one CPU it is undone on the others and
    /// not added.
    pub fn setup_state(
        &self,
        name: &str,
        section: Section,
        startup: Option<StepFn>,
        teardown: Option<StepFn>,
    ) -> Result<StateId, HotplugError> {
        self.shared.usable()?;
        self.shared
            .hotplug()
            .setup_state(name, section, startup, teardown)
    }

    /// Runs the state's teardown on every online CPU and removes it (`cpuhp_remove_state`).
    pub fn remove_state(&self, id: StateId) -> Result<(), HotplugError> {
        self.shared.usable()?;
        self.shared.hotplug().remove_state(id)
    }

    /// The step names, in order (OFFLINE -> ONLINE). Refused (`Reentrant`) from inside a
    /// hotplug operation, which holds the table.
    pub fn hotplug_steps(&self) -> Result<Vec<String>, HotplugError> {
        self.shared.hotplug().hotplug_steps()
    }

    /// The `init_mm.mm_count` stand-in: references held by committed CPU threads. Equals the
    /// number of CPU threads past their handshake; never leaked, never dropped twice.
    pub fn init_mm_refs(&self) -> u64 {
        self.shared.hotplug().init_mm_refs()
    }

    /// Waits until no CPU is in limbo (every timed-out AP has reported dead), up to `timeout`.
    pub fn wait_limbo_clear(&self, timeout: Duration) -> bool {
        self.shared.hotplug().wait_limbo_clear(timeout)
    }
}
