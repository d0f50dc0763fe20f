//! Execution of a [`StatsPlan`]: work items of consecutive samples, fixed
//! by the shape; each sample is computed from its own logits alone.
//!
//! A sample whose classes are contiguous and whose scores are the logits
//! themselves (`(N, C)`, no softcap, temperature 1) is read in place; any
//! other is gathered into a row of scores in the compute type
//! (`kernels/transform.rs`) and its gradient scattered back.

use super::{StatsOut, StatsPlan};
use crate::ce::execute::map_items;
use crate::ce::{Io, Logits};
use crate::elem::{Elem, Real};
use crate::error::CeError;
use crate::kernels::columns::{Shared, SharedIo};
use crate::kernels::stats::{self, Row, RowStats, Scratch};
use crate::kernels::transform::{gather, scatter, Strided};
use crate::kernels::{Same, Separate, SCRATCH_MAX};
use crate::simd::{Compute, Lanes, Task};
use crate::threads::{filled, PerThread};

/// Logits per work item.
const ITEM_ELEMS: usize = 1 << 16;

/// One thread's buffers: the kernel's scratch, the exponentials kept for
/// the gradient (when there is one and the row is at most `SCRATCH_MAX`),
/// and a gathered sample's logits, scores and their gradient.
pub(crate) struct ThreadBufs<F> {
    kernel: Scratch<F>,
    e: Vec<F>,
    x: Vec<F>,
    z: Vec<F>,
    dz: Vec<F>,
}

impl<F: Real> ThreadBufs<F> {
    fn new(plan: &StatsPlan<'_, F>, gathered: bool, grad: bool) -> Result<Self, CeError> {
        let c = plan.classes;
        let mut kernel = Scratch::new();
        kernel.reserve(c, plan.top_k, plan.want.argmax)?;
        let row = |on: bool| filled(if on { c } else { 0 }, F::ZERO, "a row of scores");
        Ok(ThreadBufs {
            kernel,
            e: row(grad && c <= SCRATCH_MAX)?,
            x: row(gathered)?,
            z: row(gathered && !plan.transform.is_identity())?,
            dz: row(gathered && grad)?,
        })
    }
}

/// Per-thread buffers for a call on `threads` threads, reserved before
/// anything is written.
pub(crate) fn thread_bufs<F: Real>(
    plan: &StatsPlan<'_, F>,
    threads: usize,
    grad: bool,
) -> Result<PerThread<ThreadBufs<F>>, CeError> {
    PerThread::new(threads, || ThreadBufs::new(plan, gathers(plan), grad))
}

/// The row of exponentials for a gradient, when one was reserved.
fn exps<F>(e: &mut [F], c: usize, grad: bool) -> Option<&mut [F]> {
    (grad && e.len() >= c).then(|| &mut e[..c])
}

/// Whether the samples must be gathered (strided classes, or a score map).
pub(crate) fn gathers<F: Real>(plan: &StatsPlan<'_, F>) -> bool {
    plan.spatial != 1 || !plan.transform.is_identity()
}

/// The outputs as shared pointers: items write disjoint samples.
#[derive(Clone, Copy)]
struct Outs<O> {
    lse: Option<Shared<O>>,
    logprob: Option<Shared<O>>,
    entropy: Option<Shared<O>>,
    argmax: Option<Shared<i64>>,
    rank: Option<Shared<i64>>,
    topk_ids: Option<Shared<i64>>,
    topk_logprobs: Option<Shared<O>>,
}

impl<O: Elem> Outs<O> {
    fn new(o: StatsOut<'_, O>) -> Self {
        Outs {
            lse: o.lse.map(Shared::new),
            logprob: o.logprob.map(Shared::new),
            entropy: o.entropy.map(Shared::new),
            argmax: o.argmax.map(Shared::new),
            rank: o.rank.map(Shared::new),
            topk_ids: o.topk_ids.map(Shared::new),
            topk_logprobs: o.topk_logprobs.map(Shared::new),
        }
    }

    /// Writes sample `j`'s results (`top`: the top-k as `(logprob, class)`).
    fn write<F: Real>(&self, j: usize, st: &RowStats<F>, top: &[(F, u32)]) {
        fn put<V: Copy>(s: &Option<Shared<V>>, at: usize, v: V) {
            if let Some(s) = s {
                // SAFETY: sample `j` belongs to the calling item alone.
                let dst = unsafe { s.get_mut(at, 1) };
                dst[0] = v;
            }
        }
        put(&self.lse, j, st.lse.to_elem());
        put(&self.logprob, j, st.logprob.to_elem());
        put(&self.entropy, j, st.entropy.to_elem());
        put(&self.argmax, j, st.argmax as i64);
        put(&self.rank, j, st.rank);
        let k = top.len();
        for (q, &(lp, id)) in top.iter().enumerate() {
            put(&self.topk_ids, j * k + q, i64::from(id));
            put(&self.topk_logprobs, j * k + q, lp.to_elem());
        }
    }
}

/// Runs the samples `sample0..` of `plan` whose logits are `io` (whole
/// images), writing their statistics to `out` (whose positions start at
/// the first of these samples) and their gradient where `io` says.
/// `bufs`: the call's per-thread buffers (see [`thread_bufs`]).
pub(crate) fn execute<T: Elem, O: Elem>(
    plan: &StatsPlan<'_, T::Acc>,
    sample0: usize,
    io: Logits<'_, T>,
    out: StatsOut<'_, O>,
    bufs: &PerThread<ThreadBufs<T::Acc>>,
) where
    T::Acc: Compute,
{
    let c = plan.classes;
    let n = io.len() / c;
    if n == 0 {
        return;
    }
    let io = SharedIo::from_logits(io);
    let outs = Outs::new(out);
    let per = (ITEM_ELEMS / c).max(1);
    let items: Vec<usize> = (0..n).step_by(per).collect();
    map_items(
        items,
        || (),
        |_, j0| {
            bufs.with(|b| {
                T::Acc::dispatch(StatsTask {
                    plan,
                    sample0,
                    io,
                    outs,
                    samples: (j0, (j0 + per).min(n)),
                    bufs: b,
                })
            })
        },
    );
}

struct StatsTask<'a, 'p, T, O, F> {
    plan: &'p StatsPlan<'p, F>,
    sample0: usize,
    io: SharedIo<T>,
    outs: Outs<O>,
    /// Local sample range of this item.
    samples: (usize, usize),
    bufs: &'a mut ThreadBufs<F>,
}

impl<T: Elem, O: Elem> Task<T::Acc> for StatsTask<'_, '_, T, O, T::Acc> {
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(mut self, l: L) {
        let (c, sp) = (self.plan.classes, self.plan.spatial);
        let outs = self.outs;
        let gathered = gathers(self.plan);
        for j in self.samples.0..self.samples.1 {
            let at = Strided {
                base: (j / sp) * c * sp + j % sp,
                stride: sp,
            };
            let i = self.sample0 + j;
            let (y, up) = (self.plan.target(i), self.plan.upstream(i));
            let (st, top) = if gathered {
                self.gathered(l, at, y, up)
            } else {
                self.direct(l, at.base, y, up)
            };
            outs.write(j, &st, top);
        }
    }
}

impl<'a, T: Elem, O, F: Real> StatsTask<'a, '_, T, O, F> {
    /// A contiguous sample read in place.
    #[inline(always)]
    fn direct<L: Lanes<F = F>>(
        &mut self,
        l: L,
        base: usize,
        y: Option<usize>,
        up: (F, F),
    ) -> (RowStats<F>, &[(F, u32)]) {
        let c = self.plan.classes;
        let x = self.io.logits();
        // SAFETY: the sample's logits are only read here (an in-place
        // gradient is written below, after this slice is gone).
        let xs = unsafe { x.get(base, c) };
        let ThreadBufs { kernel, e, .. } = &mut *self.bufs;
        let mut e = exps(e, c, self.io.wants_grad());
        let st = stats::row(
            l,
            Row { z: xs, x: xs },
            y,
            self.plan.want,
            kernel,
            e.as_deref_mut(),
        );
        let e = e.as_deref();
        match self.io {
            Io::Forward(_) => {}
            Io::Grad(x, g) => {
                // SAFETY: the sample's gradient positions belong to this item.
                let (xs, gs) = unsafe { (x.get(base, c), g.get_mut(base, c)) };
                stats::gradient(l, &mut Separate(xs, gs), c, y, &st, up, e);
            }
            Io::InPlace(g) => {
                // SAFETY: as above; the only live slice of these positions.
                let gs = unsafe { g.get_mut(base, c) };
                stats::gradient(l, &mut Same(gs), c, y, &st, up, e);
            }
        }
        (st, &self.bufs.kernel.top)
    }

    /// A sample gathered into a row of scores.
    #[inline(always)]
    fn gathered<L: Lanes<F = F>>(
        &mut self,
        l: L,
        at: Strided,
        y: Option<usize>,
        up: (F, F),
    ) -> (RowStats<F>, &[(F, u32)]) {
        let c = self.plan.classes;
        let t = &self.plan.transform;
        let ThreadBufs {
            kernel,
            e,
            x: xb,
            z,
            dz,
        } = &mut *self.bufs;
        let mut e = exps(e, c, self.io.wants_grad());
        let x = self.io.logits();
        // SAFETY (both closures): the sample's positions belong to this
        // item, and are touched one at a time, each read before written.
        let read = |p: usize| unsafe { x.get(p, 1) }[0];
        gather(read, at, &mut xb[..c]);
        // strided classes without a score map: the gathered logits are the scores
        let mapped = !t.is_identity();
        if mapped {
            t.scores(l, &xb[..c], &mut z[..c]);
        }
        let zs = if mapped { &z[..c] } else { &xb[..c] };
        let row = Row { z: zs, x: &xb[..c] };
        let st = stats::row(l, row, y, self.plan.want, kernel, e.as_deref_mut());
        if let Io::Grad(_, g) | Io::InPlace(g) = self.io {
            stats::gradient(
                l,
                &mut Separate(zs, &mut dz[..c]),
                c,
                y,
                &st,
                up,
                e.as_deref(),
            );
            if mapped {
                t.chain(l, &xb[..c], &mut dz[..c]);
            }
            let write = |p: usize, v: T| unsafe { g.get_mut(p, 1) }[0] = v;
            scatter(&dz[..c], at, write);
        }
        (st, &kernel.top)
    }
}
