//! The thread pool every parallel kernel runs on.
//!
//! Work is always split into chunks whose boundaries depend on the problem's
//! shape only, and partial results are combined in chunk order, so the number
//! of threads changes the speed and never the bits of a result.

use crate::config;
use crate::error::CeError;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, Mutex, RwLock};

static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

fn default_threads() -> Result<usize, CeError> {
    Ok(config::get()?.num_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(config::MAX_THREADS)
    }))
}

fn build(n: usize) -> Result<Arc<ThreadPool>, CeError> {
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("fusedce-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| CeError::Resource(format!("could not start {n} worker threads: {e}")))
}

/// The pool, built on first use with `FUSEDCE_NUM_THREADS` threads (or one per
/// available core). Also reports a malformed environment (see [`config`]).
pub fn pool() -> Result<Arc<ThreadPool>, CeError> {
    if let Some(p) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return Ok(p.clone());
    }
    let mut guard = POOL.write().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = guard.as_ref() {
        return Ok(p.clone());
    }
    let p = build(default_threads()?)?;
    *guard = Some(p.clone());
    Ok(p)
}

/// Replaces the pool with one of `n` threads (`1..=MAX_THREADS`, else an
/// error naming `n`). Calls already running finish on the old pool.
pub fn set_num_threads(n: u64) -> Result<(), CeError> {
    let p = build(config::check_threads("n", n as i128)?)?;
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some(p);
    Ok(())
}

pub fn num_threads() -> Result<usize, CeError> {
    Ok(pool()?.current_num_threads())
}

/// `f(threads)` for a call: a `small` one on the calling thread (`threads`
/// = 1: handing it to the pool costs more than it does), any other inside
/// the pool, with its thread count. Work items are fixed by the shape, so
/// the bits are the same either way. Also reports a malformed environment.
pub(crate) fn run<R: Send>(
    small: bool,
    f: impl FnOnce(usize) -> Result<R, CeError> + Send,
) -> Result<R, CeError> {
    let pool = pool()?;
    if small {
        f(1)
    } else {
        let threads = pool.current_num_threads();
        pool.install(|| f(threads))
    }
}

/// One `B` (a thread's scratch buffers) per thread of a call, made before
/// the call writes anything, so that a refused allocation is an error and
/// not a half-written output.
pub(crate) struct PerThread<B>(Vec<Mutex<B>>);

impl<B> PerThread<B> {
    /// `make()` for each of `threads` threads (at least one).
    pub fn new(threads: usize, make: impl Fn() -> Result<B, CeError>) -> Result<Self, CeError> {
        let bufs = (0..threads.max(1))
            .map(|_| make().map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(PerThread(bufs))
    }

    /// `f` with the calling thread's buffers (a pool thread's own; the
    /// first for a thread outside the pool).
    pub fn with<R>(&self, f: impl FnOnce(&mut B) -> R) -> R {
        let slot = rayon::current_thread_index().unwrap_or(0) % self.0.len();
        let mut b = self.0[slot].lock().unwrap_or_else(|e| e.into_inner());
        f(&mut b)
    }
}

/// `v` with room for `len` values, all `fill`, or an error naming `what`.
pub(crate) fn filled<V: Clone>(len: usize, fill: V, what: &str) -> Result<Vec<V>, CeError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        CeError::Resource(format!(
            "could not allocate {what}: {} bytes",
            len.saturating_mul(std::mem::size_of::<V>())
        ))
    })?;
    v.resize(len, fill);
    Ok(v)
}
