//! `PerCpu<T>`: one cache-padded `T` per logical CPU (the kernel's `DEFINE_PER_CPU`).

use crossbeam_utils::CachePadded;

use super::context::this_cpu;
use crate::cpu::mask::CpuId;

/// One `T` per logical CPU, each on its own cache line so CPUs do not false-share.
#[derive(Debug)]
pub struct PerCpu<T> {
    slots: Box<[CachePadded<T>]>,
}

impl<T> PerCpu<T> {
    /// `n` values made by `init(cpu)`.
    pub fn new(n: usize, mut init: impl FnMut(CpuId) -> T) -> Self {
        Self {
            slots: (0..n).map(|c| CachePadded::new(init(c))).collect(),
        }
    }

    /// CPU `cpu`'s value (`per_cpu(var, cpu)`), or `None` if out of range.
    pub fn get(&self, cpu: CpuId) -> Option<&T> {
        self.slots.get(cpu).map(|s| &**s)
    }

    /// The calling CPU's value (`this_cpu_ptr`), or `None` outside the runtime.
    /// Async-signal-safe.
    pub fn this(&self) -> Option<&T> {
        this_cpu().and_then(|c| self.get(c))
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// `(cpu, value)` for every CPU.
    pub fn iter(&self) -> impl Iterator<Item = (CpuId, &T)> {
        self.slots.iter().enumerate().map(|(c, s)| (c, &**s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_padded_apart() {
        let p = PerCpu::new(3, |c| c as u8);
        assert_eq!(p.get(2), Some(&2));
        assert_eq!(p.get(3), None);
        let a = p.get(0).unwrap() as *const u8 as usize;
        let b = p.get(1).unwrap() as *const u8 as usize;
        assert!(b - a >= 64, "slots share a cache line");
        assert!(p.this().is_none(), "the test thread is not a logical CPU");
    }
}
