//! A few long rows split across the pool by their pieces (`rows::pieces`,
//! fixed by `C`): every piece's partial (its maximum and its sums from it;
//! the exponentials kept in a scratch row, as one thread keeps them), in
//! parallel; each row's partials joined in piece order; every piece's
//! gradient, in parallel. Each step is the row kernel's own arithmetic on
//! the same pieces, so a row gives here the bits it gives on one thread,
//! alone or in any batch.

use super::execute::{map_items, scratch, Outputs};
use super::io::{Io, Logits};
use super::plan::Plan;
use crate::elem::{Elem, Real};
use crate::kernels::rows::{self, Exps, GradConsts, Partial, RowIn, PIECE};
use crate::kernels::{Consts, Same, SampleTarget, Separate, Shifted, Sums};
use crate::simd::{Compute, Lanes, Task};

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
    fn row_x<'x>(&self, x: &'x [T], r: usize) -> &'x [T] {
        &x[r * self.c..(r + 1) * self.c]
    }

    fn row_in(&self, r: usize) -> RowIn<'a, T, T::Acc> {
        let (c, i) = (self.c, self.sample0 + r);
        RowIn {
            target: self.plan.target(i),
            probs: self.probs.map(|t| &t[r * c..(r + 1) * c]),
            scale: T::Acc::from_f64(self.plan.scale(i)),
        }
    }

    /// Every piece's partial, in parallel, piece by piece of row after
    /// row; their exponentials into `scratch` (`C` values per row) when
    /// there is one.
    fn partials(&self, x: &[T], scratch: Option<&mut [T::Acc]>) -> Vec<Partial<T::Acc>> {
        let k = &self.plan.k;
        let slices: Vec<Option<&mut [T::Acc]>> = match scratch {
            Some(sc) => sc
                .chunks_mut(self.c)
                .flat_map(|row| row.chunks_mut(PIECE))
                .map(Some)
                .collect(),
            None => self.items.iter().map(|_| None).collect(),
        };
        let items: Vec<_> = self.items.iter().copied().zip(slices).collect();
        map_items(
            items,
            || (),
            |_, ((r, p), scratch)| {
                T::Acc::dispatch(PiecePartial {
                    k,
                    x: self.row_x(x, r),
                    probs: self.row_in(r).probs,
                    p,
                    scratch,
                })
            },
        )
    }

    /// Every row's loss and gradient constants, from its pieces' partials
    /// joined in piece order.
    fn conclude(&self, x: &[T], parts: &[Partial<T::Acc>]) -> Vec<Concluded<T::Acc>> {
        let k = &self.plan.k;
        parts
            .chunks(self.per_row)
            .enumerate()
            .map(|(r, parts)| {
                let (x, r_in) = (self.row_x(x, r), self.row_in(r));
                let (joined, e_y) = T::Acc::dispatch(RowJoin {
                    k,
                    x,
                    target: r_in.target,
                    parts,
                });
                let (loss, gc) = rows::conclude(k, &r_in, x, joined, e_y);
                Concluded { loss, gc }
            })
            .collect()
    }

    /// Every piece's gradient, in parallel, from the exponentials where
    /// `exps` says they are (a scratch holds `C` values per row).
    fn gradients(
        self,
        io: Logits<'_, T>,
        rows: &[Concluded<T::Acc>],
        parts: &[Partial<T::Acc>],
        exps: Exps<'_, T::Acc>,
    ) {
        let pieces: Vec<Logits<'_, T>> = io
            .pieces(self.c)
            .into_iter()
            .flat_map(|row| row.pieces(PIECE))
            .collect();
        let es: Vec<Exps<'_, T::Acc>> = match exps {
            Exps::Kept(sc) => sc
                .chunks(self.c)
                .flat_map(|row| row.chunks(PIECE))
                .map(Exps::Kept)
                .collect(),
            other => pieces.iter().map(|_| other).collect(),
        };
        let items: Vec<_> = self
            .items
            .iter()
            .copied()
            .zip(parts)
            .zip(pieces.into_iter().zip(es))
            .collect();
        map_items(
            items,
            || (),
            |_, (((r, p), part), (io, e))| {
                T::Acc::dispatch(PieceGrad {
                    k: &self.plan.k,
                    io,
                    r: self.row_in(r),
                    gc: rows[r].gc,
                    part,
                    p,
                    e,
                })
            },
        );
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
        items,
        per_row: rows::pieces(c).count(),
    };
    let mut io = io;
    let in_grad = io.keeps_exps_in_grad();
    let mut scratch = scratch::<T::Acc>(io.needs_scratch(), io.len());
    let parts = match &mut io {
        Io::Grad(x, g) if in_grad => split.partials(x, T::as_acc_mut(g)),
        io => split.partials(io.input(), scratch.as_deref_mut()),
    };
    let rows = split.conclude(io.input(), &parts);
    let total = loss_total(&rows, plan, sample0, rows_per_item, out);
    if io.wants_grad() {
        let exps = if in_grad {
            Exps::InGrad
        } else {
            Exps::in_scratch(scratch.as_deref())
        };
        split.gradients(io, &rows, &parts, exps);
    }
    total
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
    x: &'a [T],
    probs: Option<&'a [T]>,
    p: (usize, usize),
    /// The piece's own scratch for its exponentials, or None.
    scratch: Option<&'a mut [T::Acc]>,
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
            scratch,
        } = self;
        let max = rows::piece_max(l, x, p);
        rows::piece_partial(l, k, x, probs, (p, max), scratch)
    }
}

/// A row's partials joined: its maximum, its sums from it, and
/// `exp(x_y - shift)` of its class target (from its piece's shift).
struct RowJoin<'a, T: Elem> {
    k: &'a Consts<T::Acc>,
    x: &'a [T],
    target: SampleTarget<T::Acc>,
    parts: &'a [Partial<T::Acc>],
}

impl<T: Elem> Task<T::Acc> for RowJoin<'_, T> {
    type Output = ((T::Acc, Sums<T::Acc>), T::Acc);
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(self, l: L) -> Self::Output {
        (
            rows::join(l, self.k, self.parts),
            rows::target_exp(l, self.x, self.target, self.parts),
        )
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

    /// Per-row losses and the gradient of `rows` rows, on `threads` threads.
    fn run(p: &CrossEntropy<'_, f32>, x: &[f32], threads: usize, in_place: bool) -> Vec<u32> {
        let mut loss = vec![0.0f32; p.batch];
        let mut g = vec![0.0f32; x.len()];
        let io = if in_place {
            g.copy_from_slice(x);
            Logits::InPlace(&mut g)
        } else {
            Logits::Grad(x, &mut g)
        };
        with_threads(threads, || {
            cross_entropy(p, io, GradOutput::Scalar(1.0), Some(&mut loss))
        })
        .unwrap()
        .unwrap();
        loss.iter().chain(&g).map(|v| v.to_bits()).collect()
    }

    /// A long row gives the same bits alone on 1, 2 or 3 threads (split by
    /// pieces on more than one) and inside a batch (one row per thread),
    /// with each kind of target and option, and pieces whose maxima differ
    /// from the row's (or are -inf).
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
            let batch = run(p, &x, 1, i % 2 == 1);
            let per = 1 + c;
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
                    let got = run(&row, &x[r * c..(r + 1) * c], threads, i % 2 == 0);
                    assert_eq!(got.len(), per);
                    assert!(got == want, "case {i}, row {r}, {threads} threads");
                }
            }
        }
    }
}
