//! Execution of a validated [`Plan`] by the row and column kernels, over
//! work items fixed by the shape (never by the thread count), with the
//! partial sums of the losses added in item order: bitwise reproducible.
//!
//! Nothing here checks anything: the plan was validated, and the buffers'
//! lengths were checked against it by the caller.

use super::io::{Io, Logits};
use super::long_rows;
use super::plan::Plan;
use crate::elem::{Elem, Real};
use crate::error::CeError;
use crate::kernels::columns::{self, Image, LaneIn, Shared, SharedIo};
use crate::kernels::rows::{self, RowIn};
use crate::kernels::transform::{gather, scatter, Strided};
use crate::kernels::{SampleTarget, SCRATCH_MAX};
use crate::simd::{Compute, Lanes, Task};
use crate::threads::{filled, PerThread};
use rayon::prelude::*;
use std::any::Any;
use std::cell::RefCell;

/// Logits per row work item, and spatial positions per column work item.
const ITEM_ELEMS: usize = 1 << 16;
const SPATIAL_PIECE: usize = 1024;

/// What an execution writes besides the gradient.
pub(crate) struct Outputs<'o, O> {
    /// Per-sample losses of the executed samples.
    pub losses: Option<&'o mut [O]>,
}

/// Runs the samples `sample0..` of `plan` whose logits are `io` (whole
/// images: `len / (C * spatial)` of them) on the current thread pool.
/// `probs` holds their class probabilities for probability targets; `bufs`
/// the call's per-thread rows for gathered samples ([`gather_bufs`]).
/// Returns the sum of their losses (in item order).
pub(crate) fn execute<T: Elem, O: Elem>(
    plan: &Plan<'_, T::Acc>,
    sample0: usize,
    io: Logits<'_, T>,
    probs: Option<&[T]>,
    out: Outputs<'_, O>,
    bufs: &PerThread<GatherBufs<T::Acc>>,
) -> f64
where
    T::Acc: Compute,
{
    if io.is_empty() {
        return 0.0;
    }
    if !plan.transform.is_identity() {
        run_gathered(plan, sample0, io, probs, out, bufs)
    } else if plan.spatial == 1 {
        let c = plan.k.classes;
        if long_rows::wants_split(io.len() / c, c) {
            long_rows::run(plan, sample0, io, probs, out, rows_per_item(c))
        } else {
            run_rows(plan, sample0, io, probs, out)
        }
    } else {
        run_columns(plan, sample0, io, probs, out)
    }
}

/// Logits a call must have for its work to be handed to the thread pool;
/// smaller calls are one work item, run on the calling thread (the same
/// bits: an item's result does not depend on the thread that runs it).
pub(crate) fn is_small(logits: usize) -> bool {
    logits <= ITEM_ELEMS
}

/// `f(scratch, item)` for every item, in parallel on the current pool (each
/// thread reusing one scratch from `init`) when there is more than one and
/// the call may run in parallel (`threads::parallel`); else on the calling
/// thread. Results in item order.
pub(crate) fn map_items<I: Send, S, R: Send>(
    items: Vec<I>,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, I) -> R + Sync + Send,
) -> Vec<R> {
    if items.len() <= 1 || !crate::threads::parallel() {
        let mut s = init();
        return items.into_iter().map(|i| f(&mut s, i)).collect();
    }
    items.into_par_iter().map_init(init, f).collect()
}

/// A scratch buffer of `len` values when it is small enough and the
/// allocation succeeds; else `None` (the kernels then compute again what
/// they would have kept: same bits, bounded memory). The kernels write
/// every value before they read it, so a buffer the thread kept from an
/// earlier call is reused as it is: a call on one long row does not
/// allocate and zero its row of scratch every time.
pub(crate) fn scratch<F: Real>(want: bool, len: usize) -> Option<Kept<F>> {
    if !want || len > SCRATCH_MAX {
        return None;
    }
    if let Some(v) = Kept::take(len) {
        return Some(v);
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, F::ZERO);
    Some(Kept(v, len))
}

thread_local! {
    /// The scratch buffers a thread keeps between calls: at most one per
    /// compute type, of at most `SCRATCH_MAX` values.
    static KEPT: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// A scratch buffer (its first `.1` values), given back to its thread's
/// [`KEPT`] when dropped.
pub(crate) struct Kept<F: 'static>(Vec<F>, usize);

impl<F: 'static> Kept<F> {
    /// The thread's kept buffer of `F`, if it holds at least `len` values.
    fn take(len: usize) -> Option<Self> {
        KEPT.try_with(|kept| {
            let mut kept = kept.borrow_mut();
            let i = kept
                .iter()
                .position(|b| b.downcast_ref::<Vec<F>>().is_some_and(|v| v.len() >= len))?;
            let v = kept.swap_remove(i).downcast::<Vec<F>>().ok()?;
            Some(Kept(*v, len))
        })
        .ok()
        .flatten()
    }
}

impl<F: 'static> Drop for Kept<F> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        let _ = KEPT.try_with(|kept| {
            let mut kept = kept.borrow_mut();
            // One buffer per type: the larger of the two.
            match kept
                .iter()
                .position(|b| b.downcast_ref::<Vec<F>>().is_some())
            {
                Some(i) if kept[i].downcast_ref::<Vec<F>>().map_or(0, Vec::len) >= v.len() => {}
                Some(i) => kept[i] = Box::new(v),
                None => kept.push(Box::new(v)),
            }
        });
    }
}

impl<F> std::ops::Deref for Kept<F> {
    type Target = [F];
    fn deref(&self) -> &[F] {
        &self.0[..self.1]
    }
}

impl<F> std::ops::DerefMut for Kept<F> {
    fn deref_mut(&mut self) -> &mut [F] {
        &mut self.0[..self.1]
    }
}

// ---- (N, C): rows ----------------------------------------------------------

/// Rows of `c` classes per row work item.
fn rows_per_item(c: usize) -> usize {
    (ITEM_ELEMS / c).max(1)
}

struct RowTask<'a, 'p, T: Elem, O> {
    plan: &'p Plan<'p, T::Acc>,
    /// Index (in the plan) of the item's first row.
    i0: usize,
    io: Logits<'a, T>,
    probs: Option<&'a [T]>,
    losses: Option<&'a mut [O]>,
    scratch: Option<&'a mut [T::Acc]>,
}

impl<T: Elem, O: Elem> Task<T::Acc> for RowTask<'_, '_, T, O> {
    type Output = f64;
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(self, l: L) -> f64 {
        let RowTask {
            plan,
            i0,
            mut io,
            probs,
            mut losses,
            mut scratch,
        } = self;
        let c = plan.k.classes;
        let mut total = 0.0f64;
        for r in 0..io.len() / c {
            let (row, rest) = io.split_at(c);
            io = rest;
            let i = i0 + r;
            let input = RowIn {
                target: plan.target(i),
                probs: probs.map(|t| &t[r * c..(r + 1) * c]),
                scale: T::Acc::from_f64(plan.scale(i)),
            };
            let loss = rows::row(l, &plan.k, row, input, scratch.as_deref_mut());
            if let Some(ls) = losses.as_deref_mut() {
                ls[r] = loss.to_elem();
            }
            total += loss.to_f64();
        }
        total
    }
}

fn run_rows<T: Elem, O: Elem>(
    plan: &Plan<'_, T::Acc>,
    sample0: usize,
    io: Logits<'_, T>,
    probs: Option<&[T]>,
    out: Outputs<'_, O>,
) -> f64
where
    T::Acc: Compute,
{
    let c = plan.k.classes;
    let rows_per = rows_per_item(c);
    let want_scratch = io.needs_scratch();
    let ios = io.pieces(rows_per * c);
    let mut loss_chunks: Vec<Option<&mut [O]>> = match out.losses {
        Some(l) => l.chunks_mut(rows_per).map(Some).collect(),
        None => Vec::new(),
    };
    loss_chunks.resize_with(ios.len(), || None);
    let items: Vec<_> = ios.into_iter().zip(loss_chunks).enumerate().collect();
    let partials: Vec<f64> = map_items(
        items,
        || scratch::<T::Acc>(want_scratch, c),
        |sc, (j, (io, losses))| {
            let r0 = j * rows_per;
            T::Acc::dispatch(RowTask {
                plan,
                i0: sample0 + r0,
                probs: probs.map(|t| &t[r0 * c..(r0 * c + io.len())]),
                io,
                losses,
                scratch: sc.as_deref_mut(),
            })
        },
    );
    partials.iter().sum()
}

// ---- (N, C, d1..dK): columns -------------------------------------------------

struct ColumnTask<'a, 'p, T: Elem, O> {
    plan: &'p Plan<'p, T::Acc>,
    img: Image<T>,
    /// Index (in the plan) of the image's first sample.
    i0: usize,
    s0: usize,
    s1: usize,
    losses: Option<Shared<O>>,
    /// Offset of the image's first sample in `losses`.
    loss0: usize,
    scratch: Option<&'a mut [T::Acc]>,
}

impl<T: Elem, O: Elem> ColumnTask<'_, '_, T, O> {
    #[inline(always)]
    fn blocks<L: Lanes<F = T::Acc>>(&mut self, l: L, from: usize, to: usize) -> f64 {
        let n = L::N;
        let plan = self.plan;
        let mut total = 0.0f64;
        let mut lanes = [LaneIn {
            target: SampleTarget::Ignored,
            scale: T::Acc::ZERO,
        }; 16];
        let mut loss = [T::Acc::ZERO; 16];
        let mut s = from;
        while s + n <= to {
            for (j, li) in lanes[..n].iter_mut().enumerate() {
                *li = LaneIn {
                    target: plan.target(self.i0 + s + j),
                    scale: T::Acc::from_f64(plan.scale(self.i0 + s + j)),
                };
            }
            let sc = self
                .scratch
                .as_deref_mut()
                .map(|sc| &mut sc[..plan.k.classes * n]);
            // SAFETY: this task alone owns spatial positions s0..s1 of its image.
            unsafe { columns::block(l, &plan.k, &self.img, s, &lanes[..n], sc, &mut loss[..n]) };
            for (j, &v) in loss[..n].iter().enumerate() {
                total += v.to_f64();
                if let Some(ls) = &self.losses {
                    // SAFETY: the loss positions of this task's samples are its own.
                    let dst = unsafe { ls.get_mut(self.loss0 + s + j, 1) };
                    dst[0] = v.to_elem();
                }
            }
            s += n;
        }
        total
    }
}

impl<T: Elem, O: Elem> Task<T::Acc> for ColumnTask<'_, '_, T, O> {
    type Output = f64;
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(mut self, l: L) -> f64 {
        let (s0, s1) = (self.s0, self.s1);
        let body_end = s0 + (s1 - s0) / L::N * L::N;
        let a = self.blocks(l, s0, body_end);
        let b = self.blocks(l.tail(), body_end, s1);
        a + b
    }
}

fn run_columns<T: Elem, O: Elem>(
    plan: &Plan<'_, T::Acc>,
    sample0: usize,
    io: Logits<'_, T>,
    probs: Option<&[T]>,
    out: Outputs<'_, O>,
) -> f64
where
    T::Acc: Compute,
{
    let (c, sp) = (plan.k.classes, plan.spatial);
    let batch = io.len() / (c * sp);
    let want_grad = io.wants_grad();
    let io = SharedIo::from_logits(io);
    let probs = probs.map(Shared::from_ref);
    let losses = out.losses.map(Shared::new);
    let items: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|n| {
            (0..sp)
                .step_by(SPATIAL_PIECE)
                .map(move |s0| (n, s0, (s0 + SPATIAL_PIECE).min(sp)))
        })
        .collect();
    let partials: Vec<f64> = map_items(
        items,
        || scratch::<T::Acc>(want_grad, c.saturating_mul(16)),
        |sc, (n, s0, s1)| {
            let img = Image {
                io,
                probs,
                base: n * c * sp,
                spatial: sp,
            };
            T::Acc::dispatch(ColumnTask {
                plan,
                img,
                i0: sample0 + n * sp,
                s0,
                s1,
                losses,
                loss0: n * sp,
                scratch: sc.as_deref_mut(),
            })
        },
    );
    partials.iter().sum()
}

// ---- softcapped samples: gathered into rows of scores -----------------------

/// A thread's rows for a gathered sample: its logits, scores, their
/// gradient and the sample's class probabilities, in the compute type.
pub(crate) struct GatherBufs<F> {
    x: Vec<F>,
    z: Vec<F>,
    dz: Vec<F>,
    probs: Vec<F>,
}

/// The per-thread rows a call on `threads` threads needs (none when no
/// sample is gathered), reserved before anything is written.
pub(crate) fn gather_bufs<F: Real>(
    plan: &Plan<'_, F>,
    threads: usize,
    grad: bool,
    probs: bool,
) -> Result<PerThread<GatherBufs<F>>, CeError> {
    let on = !plan.transform.is_identity();
    let row = |want: bool| {
        filled(
            if on && want { plan.k.classes } else { 0 },
            F::ZERO,
            "a row of scores",
        )
    };
    PerThread::new(if on { threads } else { 1 }, || {
        Ok(GatherBufs {
            x: row(true)?,
            z: row(true)?,
            dz: row(grad)?,
            probs: row(probs)?,
        })
    })
}

fn run_gathered<T: Elem, O: Elem>(
    plan: &Plan<'_, T::Acc>,
    sample0: usize,
    io: Logits<'_, T>,
    probs: Option<&[T]>,
    out: Outputs<'_, O>,
    bufs: &PerThread<GatherBufs<T::Acc>>,
) -> f64
where
    T::Acc: Compute,
{
    let c = plan.k.classes;
    let n = io.len() / c;
    let io = SharedIo::from_logits(io);
    let probs = probs.map(Shared::from_ref);
    let losses = out.losses.map(Shared::new);
    let per = (ITEM_ELEMS / c).max(1);
    let items: Vec<usize> = (0..n).step_by(per).collect();
    let partials: Vec<f64> = map_items(
        items,
        || (),
        |_, j0| {
            bufs.with(|b| {
                T::Acc::dispatch(GatherTask {
                    plan,
                    sample0,
                    io,
                    probs,
                    losses,
                    samples: (j0, (j0 + per).min(n)),
                    bufs: b,
                })
            })
        },
    );
    partials.iter().sum()
}

struct GatherTask<'a, 'p, T, O, F> {
    plan: &'p Plan<'p, F>,
    sample0: usize,
    io: SharedIo<T>,
    probs: Option<Shared<T>>,
    losses: Option<Shared<O>>,
    /// Local sample range of this item.
    samples: (usize, usize),
    bufs: &'a mut GatherBufs<F>,
}

impl<T: Elem, O: Elem> Task<T::Acc> for GatherTask<'_, '_, T, O, T::Acc> {
    type Output = f64;
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(self, l: L) -> f64 {
        let (plan, c, sp) = (self.plan, self.plan.k.classes, self.plan.spatial);
        let GatherBufs {
            x: xb,
            z,
            dz,
            probs,
        } = self.bufs;
        let (xb, z, t) = (&mut xb[..c], &mut z[..c], &plan.transform);
        let x = self.io.logits();
        // SAFETY (every closure below): the item's samples are its own, and
        // each position is touched alone, read before it is written.
        let read = |p: usize| unsafe { x.get(p, 1) }[0];
        let mut total = 0.0f64;
        for j in self.samples.0..self.samples.1 {
            let at = Strided {
                base: (j / sp) * c * sp + j % sp,
                stride: sp,
            };
            let i = self.sample0 + j;
            gather(read, at, xb);
            t.scores(l, xb, z);
            let pr = self.probs.map(|pr| {
                let row = &mut probs[..c];
                gather(|p| unsafe { pr.get(p, 1) }[0], at, row);
                &row[..]
            });
            let input = RowIn {
                target: plan.target(i),
                probs: pr,
                scale: T::Acc::from_f64(plan.scale(i)),
            };
            let loss = match self.io {
                Io::Forward(_) => rows::row(l, &plan.k, Io::Forward(&z[..]), input, None),
                Io::Grad(_, g) | Io::InPlace(g) => {
                    let loss = rows::row(l, &plan.k, Io::Grad(&z[..], &mut dz[..c]), input, None);
                    t.chain(l, xb, &mut dz[..c]);
                    let write = |p: usize, v: T| unsafe { g.get_mut(p, 1) }[0] = v;
                    scatter(&dz[..c], at, write);
                    loss
                }
            };
            if let Some(ls) = self.losses {
                // SAFETY: as above.
                let dst = unsafe { ls.get_mut(j, 1) };
                dst[0] = loss.to_elem();
            }
            total += loss.to_f64();
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::scratch;

    /// A thread keeps its scratch between calls: a request for no more
    /// values gets the same buffer back, a larger one a new buffer, which
    /// then replaces the kept one; each type has its own.
    #[test]
    fn scratch_is_kept_by_its_thread() {
        std::thread::spawn(|| {
            let first = scratch::<f32>(true, 100).unwrap();
            let at = first.as_ptr();
            drop(first);
            let again = scratch::<f32>(true, 60).unwrap();
            assert_eq!((again.as_ptr(), again.len()), (at, 60));
            drop(again);
            assert!(scratch::<f32>(false, 10).is_none());
            let other = scratch::<f64>(true, 100).unwrap();
            assert_ne!(other.as_ptr() as usize, at as usize);
            drop(other);
            let larger = scratch::<f32>(true, 200).unwrap();
            let at_larger = larger.as_ptr();
            drop(larger);
            assert_eq!(scratch::<f32>(true, 150).unwrap().as_ptr(), at_larger);
        })
        .join()
        .unwrap();
    }
}
