//! A few long rows split across the pool by their pieces (`rows::pieces`,
//! fixed by `C`), in one parallel region. Its threads claim shares of the
//! pieces (runs of consecutive pieces, one share per thread) and take each
//! piece's partial (its maximum and its sums from it; the exponentials
//! kept as the row kernel keeps them); the thread that finishes the last
//! partial joins each row's partials in piece order; then each thread
//! takes the gradients of the pieces it took, whose logits and
//! exponentials are in its cache. Each step is the row kernel's own
//! arithmetic on the same pieces, so a row gives here the bits it gives on
//! one thread, alone or in any batch.
//!
//! The threads wait for each other by spinning (then yielding, after some
//! thousand spins), not in the pool: a thread waiting in the pool yields to
//! the OS between looks, which cost about a microsecond at each end of
//! each pass here.

use super::execute::{scratch, Outputs};
use super::io::{Io, Logits};
use super::plan::Plan;
use crate::elem::{Elem, Real};
use crate::kernels::columns::{Shared, SharedIo};
use crate::kernels::rows::{self, Exps, GradConsts, Keep, Partial, RowIn, PIECE};
use crate::kernels::{Consts, Same, SampleTarget, Separate, Shifted, Sums};
use crate::simd::{Compute, Lanes, Task};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Whether `rows` rows of `c` classes, in a call that may run in parallel,
/// are fewer than its pool's threads and long enough to split (only the
/// speed depends on it, never the bits).
pub(crate) fn wants_split(rows: usize, c: usize) -> bool {
    crate::threads::parallel() && c > PIECE && rows < rayon::current_num_threads()
}

/// A row once its pieces are joined: its loss and the constants of its
/// gradient pass.
struct Concluded<F> {
    loss: F,
    gc: GradConsts<F>,
}

/// The rows of one call, and the pieces they are split into.
struct Split<'a, 'p, T: Elem> {
    plan: &'p Plan<'p, T::Acc>,
    sample0: usize,
    probs: Option<&'a [T]>,
    c: usize,
    /// `(row, piece)` for every piece of every row, row by row.
    items: Vec<(usize, (usize, usize))>,
    per_row: usize,
}

impl<'a, T: Elem> Split<'a, '_, T>
where
    T::Acc: Compute,
{
    fn row_in(&self, r: usize) -> RowIn<'a, T, T::Acc> {
        let (c, i) = (self.c, self.sample0 + r);
        RowIn {
            target: self.plan.target(i),
            probs: self.probs.map(|t| &t[r * c..(r + 1) * c]),
            scale: T::Acc::from_f64(self.plan.scale(i)),
        }
    }

    /// Where the item `i`'s classes start among the rows' logits, and how
    /// many it has.
    fn span(&self, i: usize) -> (usize, usize) {
        let (r, p) = self.items[i];
        (r * self.c + p.0, p.1 - p.0)
    }

    /// Every row's loss and gradient constants, from its pieces' partials
    /// joined in piece order. `x`: the rows' logits; or, with `x_ys` (each
    /// row's target logit, read before the partials), the exponentials
    /// kept over them.
    fn conclude(
        &self,
        x: &[T],
        parts: &[Partial<T::Acc>],
        x_ys: Option<&[T::Acc]>,
    ) -> Vec<Concluded<T::Acc>> {
        let k = &self.plan.k;
        parts
            .chunks(self.per_row)
            .enumerate()
            .map(|(r, parts)| {
                let (x, r_in) = (&x[r * self.c..(r + 1) * self.c], self.row_in(r));
                let at_y = rows::target_logit(x, r_in.target);
                // kept over the logits, the logit at `y` now holds its exponential
                let (x_y, kept_e_y) = match x_ys {
                    Some(x_ys) => (x_ys[r], Some(at_y)),
                    None => (at_y, None),
                };
                let (joined, e_y) = T::Acc::dispatch(RowJoin {
                    k,
                    x,
                    target: r_in.target,
                    parts,
                    kept_e_y,
                });
                let (loss, gc) = rows::conclude(k, &r_in, x_y, joined, e_y);
                Concluded { loss, gc }
            })
            .collect()
    }
}

/// The one parallel region of a call's split rows (see the module's
/// documentation). The buffers are shared by pointer: a thread writes only
/// the gradient and scratch (and, in place, the logits) of the pieces of
/// the shares it claimed. A thread reads the logits of other pieces only
/// when no thread writes them: while the partials are taken unless the
/// exponentials are kept over the logits, and in the conclusion.
struct Region<'s, 'a, 'p, T: Elem> {
    split: &'s Split<'a, 'p, T>,
    io: SharedIo<T>,
    /// Keeps the exponentials when the gradient does not
    /// ([`Io::keeps_exps_in_grad`]); `C` values per row.
    scratch: Option<Shared<T::Acc>>,
    in_grad: bool,
    /// With a gradient in place of the compute type: the exponentials are
    /// kept over the logits, and each row's target logit was read first.
    x_ys: Option<Vec<T::Acc>>,
    shares: usize,
    shares_claimed: AtomicUsize,
    parts: Vec<OnceLock<Partial<T::Acc>>>,
    parts_done: AtomicUsize,
    conclusion: OnceLock<Vec<Concluded<T::Acc>>>,
    grads_done: AtomicUsize,
    failed: AtomicBool,
}

/// Marks its region failed if its thread unwinds, so no other thread waits
/// for it.
struct FailOnUnwind<'f>(&'f AtomicBool);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

impl<T: Elem> Region<'_, '_, '_, T>
where
    T::Acc: Compute,
{
    /// The items of the share `s`: a run of consecutive pieces.
    fn share(&self, s: usize) -> Range<usize> {
        let n = self.parts.len();
        s * n / self.shares..(s + 1) * n / self.shares
    }

    /// One thread's part: the partials of the shares it claims while there
    /// are, then (once the rows are concluded) their gradients; returns
    /// when every share is done, or at once if it claimed none.
    fn work(&self) {
        let _unwind = FailOnUnwind(&self.failed);
        let mut mine = Vec::new();
        loop {
            let s = self.shares_claimed.fetch_add(1, Ordering::Relaxed);
            if s >= self.shares {
                break;
            }
            for i in self.share(s) {
                let _ = self.parts[i].set(self.partial(i));
            }
            mine.push(s);
            let len = self.share(s).len();
            let done = self.parts_done.fetch_add(len, Ordering::AcqRel) + len;
            if done == self.parts.len() {
                self.conclude();
            }
        }
        if mine.is_empty() {
            return;
        }
        if !self.io.wants_grad() {
            self.wait_until(|| self.parts_done.load(Ordering::Acquire) == self.parts.len());
            return;
        }
        if !self.wait_until(|| self.conclusion.get().is_some()) {
            return;
        }
        for &s in &mine {
            for i in self.share(s) {
                self.gradient(i);
            }
        }
        self.grads_done.fetch_add(mine.len(), Ordering::AcqRel);
        self.wait_until(|| self.grads_done.load(Ordering::Acquire) == self.shares);
    }

    /// Spins until `done()`, then true; false (at once) if another thread
    /// of the region unwound. Every thread waited on is running: a share
    /// is claimed only by a thread that takes it.
    fn wait_until(&self, done: impl Fn() -> bool) -> bool {
        let mut spins = 0u32;
        while !done() {
            if self.failed.load(Ordering::Acquire) {
                return false;
            }
            if spins < 1 << 12 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
        true
    }

    /// The rows' logits, for the partials (unless the exponentials are kept
    /// over them) and the conclusion.
    fn logits(&self) -> &[T] {
        let x = match &self.io {
            Io::Forward(x) | Io::Grad(x, _) | Io::InPlace(x) => x,
        };
        // SAFETY: while the partials are taken, the logits are written
        // only when the exponentials are kept over them, and then this is
        // not called; the conclusion comes after every partial and before
        // any gradient. The references made here do not outlive the
        // partial or the conclusion that made them.
        unsafe { x.get(0, x.len()) }
    }

    /// The item `i`'s partial; its exponentials kept in its part of the
    /// gradient (over its logits, in place) or scratch, when a gradient is
    /// wanted.
    fn partial(&self, i: usize) -> Partial<T::Acc> {
        let (r, p) = self.split.items[i];
        let (at, len) = self.split.span(i);
        let c = self.split.c;
        let over = self.x_ys.is_some();
        // SAFETY: the item's part of the gradient and scratch (and of the
        // logits, kept over in place) is written by the one thread that
        // claimed its share, and by nothing else; no thread reads the
        // logits of another's piece while the partials are taken, when
        // they are kept over.
        let keep = unsafe {
            match (&self.io, &self.scratch) {
                (Io::Grad(_, g), _) if self.in_grad => {
                    Keep::from(T::as_acc_mut(g.get_mut(at, len)))
                }
                (Io::InPlace(x), _) if over => {
                    T::as_acc_mut(x.get_mut(at, len)).map_or(Keep::No, Keep::Over)
                }
                (Io::Forward(_), _) | (_, None) => Keep::No,
                (_, Some(sc)) => Keep::Into(sc.get_mut(at, len)),
            }
        };
        T::Acc::dispatch(PiecePartial {
            k: &self.split.plan.k,
            x: if over {
                &[]
            } else {
                &self.logits()[r * c..(r + 1) * c]
            },
            probs: self.split.row_in(r).probs,
            p,
            keep,
        })
    }

    /// Joins the rows' partials, all taken.
    fn conclude(&self) {
        let parts: Option<Vec<Partial<T::Acc>>> =
            self.parts.iter().map(|p| p.get().copied()).collect();
        if let Some(parts) = parts {
            let rows = self
                .split
                .conclude(self.logits(), &parts, self.x_ys.as_deref());
            let _ = self.conclusion.set(rows);
        }
    }

    /// The item `i`'s gradient, once the rows are concluded.
    fn gradient(&self, i: usize) {
        let (Some(rows), Some(part)) = (self.conclusion.get(), self.parts[i].get()) else {
            return;
        };
        let (r, p) = self.split.items[i];
        let (at, len) = self.split.span(i);
        // SAFETY: the item's classes of the gradient (and of the logits, for
        // a gradient in place) are written by the one thread that claimed
        // its share, after the conclusion, when no other reference to them
        // is left; its scratch was written before the conclusion.
        let (io, e) = unsafe {
            let io: Logits<'_, T> = match &self.io {
                Io::Forward(_) => return,
                Io::Grad(x, g) => Io::Grad(x.get(at, len), g.get_mut(at, len)),
                Io::InPlace(x) => Io::InPlace(x.get_mut(at, len)),
            };
            let e = match &self.scratch {
                _ if self.in_grad || self.x_ys.is_some() => Exps::InGrad,
                Some(sc) => Exps::Kept(sc.get(at, len)),
                None => Exps::Again,
            };
            (io, e)
        };
        T::Acc::dispatch(PieceGrad {
            k: &self.split.plan.k,
            io,
            r: self.split.row_in(r),
            gc: rows[r].gc,
            part,
            p,
            e,
        });
    }
}

/// Runs the rows of `io` (samples `sample0..` of `plan`) split by pieces;
/// returns the sum of their losses, grouped as `execute` groups rows.
pub(crate) fn run<T: Elem, O: Elem>(
    plan: &Plan<'_, T::Acc>,
    sample0: usize,
    io: Logits<'_, T>,
    probs: Option<&[T]>,
    out: Outputs<'_, O>,
    rows_per_item: usize,
) -> f64
where
    T::Acc: Compute,
{
    let c = plan.k.classes;
    let items: Vec<(usize, (usize, usize))> = (0..io.len() / c)
        .flat_map(|r| rows::pieces(c).map(move |p| (r, p)))
        .collect();
    let split = Split {
        plan,
        sample0,
        probs,
        c,
        per_row: rows::pieces(c).count(),
        items,
    };
    let n = split.items.len();
    let shares = rayon::current_num_threads().clamp(1, n);
    let in_grad = io.keeps_exps_in_grad();
    let x_ys = io.keeps_exps_over_logits().then(|| {
        let x = io.input();
        (0..x.len() / c)
            .map(|r| rows::target_logit(&x[r * c..(r + 1) * c], split.row_in(r).target))
            .collect()
    });
    let mut scratch = scratch::<T::Acc>(io.needs_scratch(), io.len());
    let region = Region {
        split: &split,
        io: SharedIo::from_logits(io),
        scratch: scratch.as_deref_mut().map(Shared::new),
        in_grad,
        x_ys,
        shares,
        shares_claimed: AtomicUsize::new(0),
        parts: (0..n).map(|_| OnceLock::new()).collect(),
        parts_done: AtomicUsize::new(0),
        conclusion: OnceLock::new(),
        grads_done: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
    };
    (0..shares).into_par_iter().for_each(|_| region.work());
    let rows = region
        .conclusion
        .into_inner()
        .expect("every share was taken, so the rows were concluded");
    loss_total(&rows, plan, sample0, rows_per_item, out)
}

/// Writes the losses and returns their sum: in `f64`, `rows_per_item` rows
/// at a time, then the groups' sums, as the row items of `execute` add them.
fn loss_total<F: Real, O: Elem>(
    concluded: &[Concluded<F>],
    plan: &Plan<'_, F>,
    sample0: usize,
    rows_per_item: usize,
    out: Outputs<'_, O>,
) -> f64 {
    let loss = |r: usize| {
        let ignored = matches!(plan.target(sample0 + r), SampleTarget::Ignored);
        if ignored {
            F::ZERO
        } else {
            concluded[r].loss
        }
    };
    if let Some(ls) = out.losses {
        for (r, dst) in ls.iter_mut().enumerate() {
            *dst = loss(r).to_elem();
        }
    }
    let groups: Vec<f64> = (0..concluded.len())
        .step_by(rows_per_item)
        .map(|r0| {
            let mut t = 0.0f64;
            for r in r0..(r0 + rows_per_item).min(concluded.len()) {
                t += loss(r).to_f64();
            }
            t
        })
        .collect();
    groups.iter().sum()
}

struct PiecePartial<'a, T: Elem> {
    k: &'a Consts<T::Acc>,
    /// The row's logits (not read when they lie in `keep`).
    x: &'a [T],
    probs: Option<&'a [T]>,
    p: (usize, usize),
    /// Where the piece's exponentials are kept (the piece's own).
    keep: Keep<'a, T::Acc>,
}

impl<T: Elem> Task<T::Acc> for PiecePartial<'_, T> {
    type Output = Partial<T::Acc>;
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(self, l: L) -> Self::Output {
        let PiecePartial {
            k,
            x,
            probs,
            p,
            keep,
        } = self;
        let max = rows::piece_max_in(l, x, &keep, p);
        rows::piece_partial(l, k, x, probs, (p, max), keep)
    }
}

/// A row's partials joined: its maximum, its sums from it, and
/// `exp(x_y - shift)` of its class target (from its piece's shift), the
/// one kept when given.
struct RowJoin<'a, T: Elem> {
    k: &'a Consts<T::Acc>,
    x: &'a [T],
    target: SampleTarget<T::Acc>,
    parts: &'a [Partial<T::Acc>],
    kept_e_y: Option<T::Acc>,
}

impl<T: Elem> Task<T::Acc> for RowJoin<'_, T> {
    type Output = ((T::Acc, Sums<T::Acc>), T::Acc);
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(self, l: L) -> Self::Output {
        let e_y = match self.kept_e_y {
            Some(e_y) => e_y,
            None => rows::target_exp(l, self.x, self.target, self.parts),
        };
        (rows::join(l, self.k, self.parts), e_y)
    }
}

struct PieceGrad<'a, T: Elem> {
    k: &'a Consts<T::Acc>,
    io: Logits<'a, T>,
    r: RowIn<'a, T, T::Acc>,
    /// The row's constants, and the piece's partial they are moved to.
    gc: GradConsts<T::Acc>,
    part: &'a Partial<T::Acc>,
    p: (usize, usize),
    /// Where the piece's exponentials are.
    e: Exps<'a, T::Acc>,
}

impl<T: Elem> Task<T::Acc> for PieceGrad<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(self, l: L) {
        let PieceGrad {
            k,
            io,
            r,
            gc,
            part,
            p,
            e,
        } = self;
        match io {
            Io::Forward(_) => {}
            Io::Grad(x, g) => {
                let acc = &mut Shifted(Separate(x, g), p.0);
                rows::piece_gradient(l, k, acc, &r, e, (gc, part), p);
            }
            Io::InPlace(x) => {
                let acc = &mut Shifted(Same(x), p.0);
                rows::piece_gradient(l, k, acc, &r, e, (gc, part), p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ce::{cross_entropy, CrossEntropy, GradOutput, Logits, Reduction, Targets};
    use crate::kernels::rows::PIECE;
    use crate::test_util::lcg;
    use crate::threads::with_threads;

    /// What a call computes: the losses, or their gradient as well (into
    /// a separate buffer, or over the logits).
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Out {
        Loss,
        Grad,
        InPlace,
    }

    /// The bits of the per-row losses of `rows` rows, then of their
    /// gradient unless `out` is `Loss`, on `threads` threads.
    fn run(p: &CrossEntropy<'_, f32>, x: &[f32], threads: usize, out: Out) -> Vec<u32> {
        let mut loss = vec![0.0f32; p.batch];
        let mut g = vec![f32::NAN; x.len()];
        let io = match out {
            Out::Loss => Logits::Forward(x),
            Out::Grad => Logits::Grad(x, &mut g),
            Out::InPlace => {
                g.copy_from_slice(x);
                Logits::InPlace(&mut g)
            }
        };
        with_threads(threads, || {
            cross_entropy(p, io, GradOutput::Scalar(1.0), Some(&mut loss))
        })
        .unwrap()
        .unwrap();
        let grad = if out == Out::Loss { &[][..] } else { &g[..] };
        loss.iter().chain(grad).map(|v| v.to_bits()).collect()
    }

    /// A long row gives the same bits alone on 1, 2 or 3 threads (split by
    /// pieces on more than one) and inside a batch (one row per thread),
    /// with each kind of target and option, and pieces whose maxima differ
    /// from the row's (or are -inf); its loss alone, its gradient into a
    /// separate buffer (which keeps the exponentials) and over the logits
    /// (a scratch keeps them).
    #[test]
    fn a_long_row_is_the_same_split_or_whole_alone_or_in_a_batch() {
        let (n, c) = (4, 4 * PIECE + 37);
        let mut sd = 5;
        let mut x: Vec<f32> = (0..n * c)
            .map(|_| (lcg(&mut sd) * 24.0 - 12.0) as f32)
            .collect();
        // pieces at other heights than the row's first, and a masked one:
        // each piece's sums are moved from its own maximum to the row's
        x[3 * PIECE..4 * PIECE].iter_mut().for_each(|v| *v += 40.0);
        x[c + PIECE..c + 2 * PIECE]
            .iter_mut()
            .for_each(|v| *v -= 70.0);
        x[3 * c + 2 * PIECE..3 * c + 3 * PIECE].fill(f32::NEG_INFINITY);
        let probs: Vec<f32> = (0..n * c).map(|_| lcg(&mut sd) as f32 / c as f32).collect();
        let w: Vec<f64> = (0..c).map(|_| lcg(&mut sd) * 2.0).collect();
        let idx = [3i64, (PIECE + 5) as i64, -100, (c - 1) as i64];
        let base = CrossEntropy {
            batch: n,
            classes: c,
            spatial: 1,
            targets: Targets::Index(&idx),
            weight: None,
            ignore_index: -100,
            reduction: Reduction::None,
            label_smoothing: 0.0,
            softcap: None,
            z_loss: 0.0,
        };
        let cases = [
            base,
            CrossEntropy {
                weight: Some(&w),
                label_smoothing: 0.1,
                ..base
            },
            CrossEntropy {
                targets: Targets::Probs(&probs),
                label_smoothing: 0.2,
                ..base
            },
            CrossEntropy {
                z_loss: 1e-3,
                ..base
            },
        ];
        for (i, p) in cases.iter().enumerate() {
            let batch = run(p, &x, 1, [Out::Grad, Out::InPlace][i % 2]);
            for r in 0..n {
                let row = CrossEntropy {
                    batch: 1,
                    targets: match p.targets {
                        Targets::Index(t) => Targets::Index(&t[r..r + 1]),
                        Targets::Probs(t) => Targets::Probs(&t[r * c..(r + 1) * c]),
                    },
                    ..*p
                };
                let want: Vec<u32> = std::iter::once(batch[r])
                    .chain(batch[n + r * c..n + (r + 1) * c].iter().copied())
                    .collect();
                for threads in [1, 2, 3] {
                    for out in [Out::Loss, Out::Grad, Out::InPlace] {
                        let got = run(&row, &x[r * c..(r + 1) * c], threads, out);
                        let want = if out == Out::Loss {
                            &want[..1]
                        } else {
                            &want[..]
                        };
                        assert!(got == want, "case {i}, row {r}, {threads} threads, {out:?}");
                    }
                }
            }
        }
    }
}
