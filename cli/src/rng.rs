//! The CLI's one pseudo-random generator: a xorshift64, seeded, so a workload or a stress
//! scenario makes the same choices in the same order for the same seed (their timing on the
//! CPUs is up to the host). Not for anything that needs real randomness.

use usmp::CpuMask;

/// xorshift64 (Marsaglia). A zero state would stay zero, so the seed is forced odd.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// A generator for stream `stream` of `seed`: independent choices for each thread of one
    /// run, all fixed by the one seed (splitmix64 of the pair, so nearby streams differ).
    pub fn stream(seed: u64, stream: u64) -> Self {
        let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng::new(z ^ (z >> 31))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (`0` for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next() % n.max(1) == 0
    }

    /// A random non-empty subset of `0..n`.
    pub fn mask(&mut self, n: usize) -> CpuMask {
        let mut m = CpuMask::new();
        let mut bits = 0;
        for c in 0..n {
            if c % 64 == 0 {
                bits = self.next();
            }
            if bits & (1 << (c % 64)) != 0 {
                m.set(c);
            }
        }
        if m.is_empty() {
            m.set(self.below(n));
        }
        m
    }

    /// A random member of `m` (`None` if it is empty).
    pub fn pick(&mut self, m: &CpuMask) -> Option<usize> {
        let w = m.weight();
        (w > 0).then(|| m.iter().nth(self.below(w))).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn same_seed_same_choices_and_streams_differ() {
        let a: Vec<_> = (0..8)
            .map({
                let mut r = Rng::stream(7, 1);
                move |_| r.next()
            })
            .collect();
        let b: Vec<_> = (0..8)
            .map({
                let mut r = Rng::stream(7, 1);
                move |_| r.next()
            })
            .collect();
        let c: Vec<_> = (0..8)
            .map({
                let mut r = Rng::stream(7, 2);
                move |_| r.next()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = Rng::new(3);
        for _ in 0..100 {
            let m = r.mask(5);
            assert!(!m.is_empty() && m.iter().all(|c| c < 5));
            assert!(r.pick(&m).is_some_and(|c| m.contains(c)));
        }
    }
}
