//! Host-core discovery and pinning: the only file that talks to the CPU affinity API.

/// The host cores this process may run on (its affinity mask), in ascending order.
pub(crate) fn allowed_cores() -> Vec<core_affinity::CoreId> {
    core_affinity::get_core_ids().unwrap_or_default()
}

/// Pins the calling thread to `core`. Returns false if the host refused (restricted cpuset,
/// container): the caller then runs unpinned.
pub(crate) fn pin_current(core: core_affinity::CoreId) -> bool {
    core_affinity::set_for_current(core)
}
