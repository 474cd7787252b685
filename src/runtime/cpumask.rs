//! `CpuMask`: a bitset of logical CPU ids of any width, with the kernel's list format
//! (`%*pbl`: "0-3,7") both ways, and `AtomicCpuMask` for the runtime's possible / present /
//! online / active masks, which CPUs and controllers update concurrently.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// A logical CPU id.
pub type CpuId = usize;

const WORD: usize = 64;

/// A set of logical CPUs. Any width; grows when a bit beyond its end is set.
#[derive(Clone, Default)]
pub struct CpuMask {
    words: Vec<u64>,
}

/// Why a cpulist string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// A piece was not a number or a range.
    #[error("bad cpulist element {0:?} (expected N or N-M)")]
    BadElement(String),
    /// A range ran backwards.
    #[error("bad cpulist range {0}-{1}: start is past end")]
    Backwards(usize, usize),
    /// A CPU id is past the limit given to `parse_bounded`.
    #[error("CPU {cpu} is out of range (limit {limit})")]
    OutOfRange { cpu: usize, limit: usize },
}

impl CpuMask {
    /// An empty mask.
    pub fn new() -> Self {
        Self::default()
    }

    /// CPUs `0..n`.
    pub fn first_n(n: usize) -> Self {
        let mut m = Self::new();
        for c in 0..n {
            m.set(c);
        }
        m
    }

    /// A mask holding one CPU.
    pub fn single(cpu: CpuId) -> Self {
        let mut m = Self::new();
        m.set(cpu);
        m
    }

    /// Adds `cpu`.
    pub fn set(&mut self, cpu: CpuId) {
        let w = cpu / WORD;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (cpu % WORD);
    }

    /// Removes `cpu`.
    pub fn clear(&mut self, cpu: CpuId) {
        if let Some(w) = self.words.get_mut(cpu / WORD) {
            *w &= !(1 << (cpu % WORD));
        }
    }

    /// Whether `cpu` is in the mask.
    pub fn contains(&self, cpu: CpuId) -> bool {
        self.words
            .get(cpu / WORD)
            .is_some_and(|w| w & (1 << (cpu % WORD)) != 0)
    }

    /// Number of CPUs in the mask.
    pub fn weight(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the mask is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The lowest CPU in the mask.
    pub fn first(&self) -> Option<CpuId> {
        self.iter().next()
    }

    /// One past the highest CPU in the mask (0 when empty).
    pub fn end(&self) -> usize {
        self.iter().last().map_or(0, |c| c + 1)
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = CpuId> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * WORD + b)
            })
        })
    }

    /// `self & other`.
    pub fn and(&self, other: &CpuMask) -> CpuMask {
        let n = self.words.len().min(other.words.len());
        CpuMask {
            words: (0..n).map(|i| self.words[i] & other.words[i]).collect(),
        }
    }

    /// `self & !other`.
    pub fn and_not(&self, other: &CpuMask) -> CpuMask {
        CpuMask {
            words: (0..self.words.len())
                .map(|i| self.words[i] & !other.words.get(i).copied().unwrap_or(0))
                .collect(),
        }
    }

    /// `self | other`.
    pub fn or(&self, other: &CpuMask) -> CpuMask {
        let n = self.words.len().max(other.words.len());
        let get = |v: &Vec<u64>, i: usize| v.get(i).copied().unwrap_or(0);
        CpuMask {
            words: (0..n)
                .map(|i| get(&self.words, i) | get(&other.words, i))
                .collect(),
        }
    }

    /// Parses a cpulist and rejects any CPU id `>= limit`.
    pub fn parse_bounded(s: &str, limit: usize) -> Result<CpuMask, CpuListError> {
        let m: CpuMask = s.parse()?;
        let bad = m.iter().find(|&c| c >= limit);
        match bad {
            Some(cpu) => Err(CpuListError::OutOfRange { cpu, limit }),
            None => Ok(m),
        }
    }
}

/// Masks are equal when they hold the same CPUs, whatever their allocated width.
impl PartialEq for CpuMask {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for CpuMask {}

impl FromIterator<CpuId> for CpuMask {
    fn from_iter<I: IntoIterator<Item = CpuId>>(iter: I) -> Self {
        let mut m = CpuMask::new();
        for c in iter {
            m.set(c);
        }
        m
    }
}

/// The kernel's `%*pbl` format: ascending ranges, "0-3,7"; empty prints as "".
impl fmt::Display for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut it = self.iter().peekable();
        let mut first = true;
        while let Some(start) = it.next() {
            let mut end = start;
            while it.peek() == Some(&(end + 1)) {
                end = it.next().unwrap_or(end);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuMask({self})")
    }
}

/// Parses the kernel's cpulist format ("0-3,7", whitespace around elements allowed, "" = empty).
impl FromStr for CpuMask {
    type Err = CpuListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut m = CpuMask::new();
        let s = s.trim();
        if s.is_empty() {
            return Ok(m);
        }
        for part in s.split(',') {
            let part = part.trim();
            let num = |x: &str| {
                x.trim()
                    .parse::<usize>()
                    .map_err(|_| CpuListError::BadElement(part.to_string()))
            };
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let a = num(part)?;
                    (a, a)
                }
            };
            if a > b {
                return Err(CpuListError::Backwards(a, b));
            }
            // Refuse absurd widths instead of allocating gigabytes for "0-999999999999".
            if b >= 1 << 20 {
                return Err(CpuListError::OutOfRange {
                    cpu: b,
                    limit: 1 << 20,
                });
            }
            for c in a..=b {
                m.set(c);
            }
        }
        Ok(m)
    }
}

/// A fixed-width mask whose bits are set and cleared with atomics, for the runtime's global
/// masks. Readers take a snapshot with [`AtomicCpuMask::load`]; a snapshot of more than 64 CPUs
/// is not atomic as a whole (like the kernel's cpumasks), each word is.
pub struct AtomicCpuMask {
    words: Box<[AtomicU64]>,
    width: usize,
}

impl AtomicCpuMask {
    /// An empty mask able to hold CPUs `0..width`.
    pub fn new(width: usize) -> Self {
        Self {
            words: (0..width.div_ceil(WORD))
                .map(|_| AtomicU64::new(0))
                .collect(),
            width,
        }
    }

    /// Sets `cpu`; returns whether it was already set.
    pub fn set(&self, cpu: CpuId) -> bool {
        debug_assert!(cpu < self.width);
        self.words[cpu / WORD].fetch_or(1 << (cpu % WORD), Ordering::SeqCst) & (1 << (cpu % WORD))
            != 0
    }

    /// Clears `cpu`; returns whether it was set.
    pub fn clear(&self, cpu: CpuId) -> bool {
        debug_assert!(cpu < self.width);
        self.words[cpu / WORD].fetch_and(!(1 << (cpu % WORD)), Ordering::SeqCst)
            & (1 << (cpu % WORD))
            != 0
    }

    /// Whether `cpu` is set (false when out of range).
    pub fn contains(&self, cpu: CpuId) -> bool {
        cpu < self.width && self.words[cpu / WORD].load(Ordering::SeqCst) & (1 << (cpu % WORD)) != 0
    }

    /// A snapshot.
    pub fn load(&self) -> CpuMask {
        CpuMask {
            words: self
                .words
                .iter()
                .map(|w| w.load(Ordering::SeqCst))
                .collect(),
        }
    }

    /// Number of CPUs set.
    pub fn weight(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::SeqCst).count_ones() as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn list_format_round_trips() {
        let m: CpuMask = "0-3,7, 9-10".parse().unwrap();
        assert_eq!(m.to_string(), "0-3,7,9-10");
        assert_eq!(m.weight(), 7);
        assert!(m.contains(7) && !m.contains(8));
        assert_eq!("".parse::<CpuMask>().unwrap().to_string(), "");
        assert_eq!(CpuMask::single(200).to_string(), "200");
    }

    #[test]
    fn bad_lists_are_rejected() {
        assert!(matches!(
            "3-1".parse::<CpuMask>(),
            Err(CpuListError::Backwards(3, 1))
        ));
        assert!(matches!(
            "x".parse::<CpuMask>(),
            Err(CpuListError::BadElement(_))
        ));
        assert!("1,,2".parse::<CpuMask>().is_err());
        assert!(matches!(
            CpuMask::parse_bounded("0-4", 4),
            Err(CpuListError::OutOfRange { cpu: 4, limit: 4 })
        ));
    }

    #[test]
    fn set_algebra() {
        let a: CpuMask = "0-5".parse().unwrap();
        let b: CpuMask = "4-9".parse().unwrap();
        assert_eq!(a.and(&b).to_string(), "4-5");
        assert_eq!(a.and_not(&b).to_string(), "0-3");
        assert_eq!(a.or(&b).to_string(), "0-9");
        assert_eq!(b.first(), Some(4));
        assert_eq!(b.end(), 10);
    }

    #[test]
    fn atomic_mask_snapshot() {
        let m = AtomicCpuMask::new(130);
        assert!(!m.set(129));
        assert!(m.set(129));
        m.set(0);
        assert_eq!(m.load().to_string(), "0,129");
        assert!(m.clear(0));
        assert!(!m.contains(0) && m.contains(129) && !m.contains(500));
        assert_eq!(m.weight(), 1);
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(cpus in proptest::collection::btree_set(0usize..300, 0..40)) {
            let m: CpuMask = cpus.iter().copied().collect();
            let back: CpuMask = m.to_string().parse().unwrap();
            prop_assert_eq!(back.iter().collect::<Vec<_>>(), cpus.into_iter().collect::<Vec<_>>());
        }
    }
}
