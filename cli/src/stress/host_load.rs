//! `--host-load N`: N busy threads beside the runtime for the whole run, unpinned, so they
//! compete with its pinned CPU threads for the host's cores the way other programs on a
//! loaded host do. They spin and never block; dropping [`HostLoad`] stops and joins them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The busy threads; dropping it stops them.
pub struct HostLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HostLoad {
    /// Starts `n` busy threads (none for 0).
    pub fn start(n: usize) -> std::io::Result<HostLoad> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = HostLoad {
            stop: stop.clone(),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let s = stop.clone();
            let t = std::thread::Builder::new()
                .name(format!("usmp-host-load-{i}"))
                .spawn(move || {
                    let mut x = 0u64;
                    while !s.load(Ordering::Relaxed) {
                        for _ in 0..1024 {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                        }
                    }
                })?;
            load.threads.push(t);
        }
        Ok(load)
    }
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
