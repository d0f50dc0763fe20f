//! The thread pool every parallel kernel runs on.
//!
//! Work is always split into chunks whose boundaries depend on the problem's
//! shape only, and partial results are combined in chunk order, so the number
//! of threads changes the speed and never the bits of a result.

use crate::config;
use crate::error::CeError;
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The process-wide default thread count (`set_num_threads`); 0 until set.
static DEFAULT: AtomicUsize = AtomicUsize::new(0);

/// Pools by thread count, most recently used last; at most [`KEPT_POOLS`].
static POOLS: Mutex<Vec<Arc<ThreadPool>>> = Mutex::new(Vec::new());

/// How many pools of different sizes stay alive (a dropped pool's threads
/// end once the calls running on it finish).
const KEPT_POOLS: usize = 4;

thread_local! {
    /// The thread count of calls made from this thread (`with_threads`).
    static CALL_THREADS: Cell<Option<usize>> = const { Cell::new(None) };
}

/// `FUSEDCE_NUM_THREADS`, else the CPUs this process may use (its affinity
/// mask and its cgroup's CPU quota, see [`crate::cpus`]), read once.
fn initial_threads() -> Result<usize, CeError> {
    static CPUS: OnceLock<usize> = OnceLock::new();
    Ok(config::get()?
        .num_threads
        .unwrap_or_else(|| *CPUS.get_or_init(|| crate::cpus::available().min(config::MAX_THREADS))))
}

fn build(n: usize) -> Result<Arc<ThreadPool>, CeError> {
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("fusedce-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| CeError::Resource(format!("could not start {n} worker threads: {e}")))
}

/// The pool of `n` threads, started on first use.
fn pool_of(n: usize) -> Result<Arc<ThreadPool>, CeError> {
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = pools.iter().position(|p| p.current_num_threads() == n) {
        let p = pools.remove(i);
        pools.push(p.clone());
        return Ok(p);
    }
    let p = build(n)?;
    if pools.len() == KEPT_POOLS {
        pools.remove(0);
    }
    pools.push(p.clone());
    Ok(p)
}

/// The process-wide default: set by [`set_num_threads`], else
/// `FUSEDCE_NUM_THREADS` or the CPUs available. Also reports a malformed
/// environment (see [`config`]).
pub fn default_num_threads() -> Result<usize, CeError> {
    match DEFAULT.load(Ordering::Relaxed) {
        0 => initial_threads(),
        n => Ok(n),
    }
}

/// Sets the default thread count of every later call (`1..=MAX_THREADS`,
/// else an error naming `n`) and starts its pool. Calls already running
/// finish on their pool.
pub fn set_num_threads(n: i128) -> Result<(), CeError> {
    let n = config::check_threads("n", n)?;
    pool_of(n)?;
    DEFAULT.store(n, Ordering::Relaxed);
    Ok(())
}

/// The thread count of a call made now from this thread.
pub fn num_threads() -> Result<usize, CeError> {
    config::get()?;
    CALL_THREADS
        .with(Cell::get)
        .map_or_else(default_num_threads, Ok)
}

/// Sets (`Some`) or clears (`None`) the thread count of the calls made
/// from this thread, overriding the default; returns the previous setting.
/// `n` is checked here (`1..=MAX_THREADS`, else an error naming `n`).
pub fn set_call_threads(n: Option<i128>) -> Result<Option<usize>, CeError> {
    let n = n.map(|n| config::check_threads("n", n)).transpose()?;
    Ok(CALL_THREADS.with(|c| c.replace(n)))
}

/// `f()` with this thread's calls on `n` threads, then the previous setting.
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> Result<R, CeError> {
    let previous = set_call_threads(Some(n as i128))?;
    let out = f();
    CALL_THREADS.with(|c| c.set(previous));
    Ok(out)
}

/// `f(threads)` for a call: a `small` one on the calling thread (`threads`
/// = 1: handing it to the pool costs more than it does), any other inside
/// a pool of this thread's thread count — its home pool when it has one of
/// that size, else a shared one. Work items are fixed by the shape, so the
/// bits are the same either way. Also reports a malformed environment.
pub(crate) fn run<R: Send>(
    small: bool,
    f: impl FnOnce(usize) -> Result<R, CeError> + Send,
) -> Result<R, CeError> {
    let threads = num_threads()?;
    if small || threads == 1 {
        return with_parallel(false, || f(1));
    }
    let in_pool = || with_parallel(true, || f(threads));
    match home_pool(threads) {
        Some(home) => home.install(in_pool),
        None => pool_of(threads)?.install(in_pool),
    }
}

thread_local! {
    /// Whether the call running on this thread may hand work to the other
    /// threads of its pool (set by [`run`]).
    static PARALLEL: Cell<bool> = const { Cell::new(false) };
    /// This thread's home pool and its size, once it has been decided.
    static HOME: OnceLock<Option<(usize, &'static ThreadPool)>> = const { OnceLock::new() };
}

/// Whether a home pool has been given to a thread (one per process).
static HOME_GIVEN: AtomicBool = AtomicBool::new(false);

fn with_parallel<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let previous = PARALLEL.with(|p| p.replace(on));
    let out = f();
    PARALLEL.with(|p| p.set(previous));
    out
}

/// Whether the call running on this thread may run work items in parallel.
pub(crate) fn parallel() -> bool {
    PARALLEL.with(Cell::get)
}

/// The home pool of the calling thread if it is of `n` threads. The first
/// thread to make a parallel call (usually Python's main thread) gets one,
/// of that call's size, with itself as one of its threads: its calls run on
/// it without a hand-over, and it works beside the others instead of
/// sleeping until they finish (on a virtual machine, waking a sleeping
/// thread costs some ten microseconds each way). The pool lives as long as
/// the process.
fn home_pool(n: usize) -> Option<&'static ThreadPool> {
    HOME.with(|home| {
        let (size, pool) = (*home.get_or_init(|| {
            if HOME_GIVEN.swap(true, Ordering::SeqCst) {
                return None;
            }
            let built = ThreadPoolBuilder::new()
                .num_threads(n)
                .thread_name(|i| format!("fusedce-home-{i}"))
                .use_current_thread()
                .build()
                .ok()?;
            Some((n, &*Box::leak(Box::new(built))))
        }))?;
        (size == n).then_some(pool)
    })
}

/// `f(i, piece)` for the `len`-long pieces of `v`, in parallel when the
/// call running on this thread may be (see [`parallel`]).
pub(crate) fn for_pieces<V: Send>(v: &mut [V], len: usize, f: impl Fn(usize, &mut [V]) + Sync) {
    if parallel() {
        v.par_chunks_mut(len).enumerate().for_each(|(i, p)| f(i, p));
    } else {
        v.chunks_mut(len).enumerate().for_each(|(i, p)| f(i, p));
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

    /// `f` with the calling thread's buffers.
    pub fn with<R>(&self, f: impl FnOnce(&mut B) -> R) -> R {
        f(&mut self.lock())
    }

    /// The calling thread's buffers (a pool thread's own; the first for a
    /// thread outside the pool). A kernel takes them with this rather than
    /// [`Self::with`]: a closure is not always inlined, and code left outside
    /// the kernel's `target_feature` function calls every intrinsic (the
    /// logits ran 25–50 times slower when that happened).
    #[inline(always)]
    pub fn lock(&self) -> std::sync::MutexGuard<'_, B> {
        let slot = rayon::current_thread_index().unwrap_or(0) % self.0.len();
        self.0[slot].lock().unwrap_or_else(|e| e.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A call may use its pool only when it asked for more than one thread
    /// and is not small, on the thread that holds the home pool as on any
    /// other (the home thread is a pool thread even between calls).
    #[test]
    fn only_parallel_calls_may_use_the_pool() {
        let seen = |small: bool, n: usize| {
            with_threads(n, || {
                run(small, |_| Ok((parallel(), rayon::current_num_threads())))
            })
            .unwrap()
            .unwrap()
        };
        for _ in 0..2 {
            // the first parallel call here may make this thread a home pool's
            assert_eq!(seen(false, 2), (true, 2));
            assert!(!seen(false, 1).0);
            assert!(!seen(true, 2).0);
            assert_eq!(seen(false, 3), (true, 3));
            assert!(!parallel());
        }
        let mut v = vec![0u32; 10];
        with_threads(2, || {
            run(false, |_| {
                for_pieces(&mut v, 3, |i, p| p.fill(i as u32));
                Ok(())
            })
        })
        .unwrap()
        .unwrap();
        assert_eq!(v, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]);
    }
}
