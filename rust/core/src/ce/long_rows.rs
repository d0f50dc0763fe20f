//! A few long rows split across the pool by their pieces (`rows::pieces`,
//! fixed by `C`): every piece's maximum; every piece's sums with the row's
//! maximum, joined in piece order; every piece's gradient. Each step is the
//! row kernel's own arithmetic on the same pieces, so a row gives here the
//! bits it gives on one thread, alone or in any batch.

use super::execute::{map_items, Outputs};
use super::io::{Io, Logits};
use super::plan::Plan;
use crate::elem::{Elem, Real};
use crate::kernels::rows::{self, GradConsts, RowIn, PIECE};
use crate::kernels::{Consts, Same, SampleTarget, Separate, Shifted, Sums};
use crate::simd::{Compute, Lanes, Task};

/// Whether `rows` rows of `c` classes, in a call that may run in parallel,
/// are fewer than its pool's threads and long enough to split (only the
/// speed depends on it, never the bits).
pub(crate) fn wants_split(rows: usize, c: usize) -> bool {
    crate::threads::parallel() && c > PIECE && rows < rayon::current_num_threads()
}

/// A row's maximum, its sums and `exp(x_y - m)`, joined from its pieces.
struct Joined<F> {
    m: F,
    sums: Option<Sums<F>>,
    e_y: F,
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
    let (k, c) = (&plan.k, plan.k.classes);
    let x = io.input();
    let rows = x.len() / c;
    let row_in = |r: usize| RowIn {
        target: plan.target(sample0 + r),
        probs: probs.map(|t| &t[r * c..(r + 1) * c]),
        scale: T::Acc::from_f64(plan.scale(sample0 + r)),
    };
    let row_x = |r: usize| &x[r * c..(r + 1) * c];
    let items: Vec<(usize, (usize, usize))> = (0..rows)
        .flat_map(|r| rows::pieces(c).map(move |p| (r, p)))
        .collect();
    let per_row = rows::pieces(c).count();

    let maxima = map_items(
        items.clone(),
        || (),
        |_, (r, p)| T::Acc::dispatch(PieceMax { x: row_x(r), p }),
    );
    let row_max = |r: usize| {
        let ms = &maxima[r * per_row..(r + 1) * per_row];
        ms[1..].iter().fold(ms[0], |m, &v| m.max_nan(v))
    };
    let parts = map_items(
        items.clone(),
        || (),
        |_, (r, p)| {
            let (x, target) = (row_x(r), plan.target(sample0 + r));
            T::Acc::dispatch(PieceSums {
                k,
                x,
                probs: row_in(r).probs,
                p,
                m: row_max(r),
                target,
            })
        },
    );
    let joined: Vec<Joined<T::Acc>> = (0..rows)
        .map(|r| {
            let ps = &parts[r * per_row..(r + 1) * per_row];
            ps.iter().fold(
                Joined {
                    m: row_max(r),
                    sums: None,
                    e_y: T::Acc::ZERO,
                },
                |j, &(s, e_y)| Joined {
                    sums: Some(j.sums.map_or(s, |a| a.add(s))),
                    e_y: e_y.unwrap_or(j.e_y),
                    ..j
                },
            )
        })
        .collect();
    let concluded: Vec<(T::Acc, GradConsts<T::Acc>)> = (0..rows)
        .map(|r| {
            let j = &joined[r];
            let sums = j.sums.expect("a row has at least one piece");
            rows::conclude(k, &row_in(r), row_x(r), j.m, sums)
        })
        .collect();
    let total = loss_total(&concluded, plan, sample0, rows_per_item, out);
    if io.wants_grad() {
        let pieces: Vec<Logits<'_, T>> = io
            .pieces(c)
            .into_iter()
            .flat_map(|row| row.pieces(PIECE))
            .collect();
        map_items(
            items.into_iter().zip(pieces).collect(),
            || (),
            |_, ((r, p), io)| {
                T::Acc::dispatch(PieceGrad {
                    k,
                    io,
                    r: row_in(r),
                    gc: concluded[r].1,
                    e_y: joined[r].e_y,
                    p,
                })
            },
        );
    }
    total
}

/// Writes the losses and returns their sum: in `f64`, `rows_per_item` rows
/// at a time, then the groups' sums, as the row items of `execute` add them.
fn loss_total<F: Real, O: Elem>(
    concluded: &[(F, GradConsts<F>)],
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
            concluded[r].0
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

struct PieceMax<'a, T> {
    x: &'a [T],
    p: (usize, usize),
}

impl<T: Elem> Task<T::Acc> for PieceMax<'_, T> {
    type Output = T::Acc;
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(self, l: L) -> T::Acc {
        rows::piece_max(l, self.x, self.p)
    }
}

struct PieceSums<'a, T: Elem> {
    k: &'a Consts<T::Acc>,
    x: &'a [T],
    probs: Option<&'a [T]>,
    p: (usize, usize),
    m: T::Acc,
    target: SampleTarget<T::Acc>,
}

impl<T: Elem> Task<T::Acc> for PieceSums<'_, T> {
    /// The piece's sums, and `exp(x_y - m)` when the target lies in it.
    type Output = (Sums<T::Acc>, Option<T::Acc>);
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(self, l: L) -> Self::Output {
        let PieceSums {
            k,
            x,
            probs,
            p,
            m,
            target,
        } = self;
        let sums = rows::piece_sums(l, k, x, probs, p, m, None);
        let e_y = match target {
            SampleTarget::Class { y, .. } if (p.0..p.1).contains(&y) => {
                Some(rows::target_exp(l, x, target, m))
            }
            _ => None,
        };
        (sums, e_y)
    }
}

struct PieceGrad<'a, T: Elem> {
    k: &'a Consts<T::Acc>,
    io: Logits<'a, T>,
    r: RowIn<'a, T, T::Acc>,
    gc: GradConsts<T::Acc>,
    e_y: T::Acc,
    p: (usize, usize),
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
            e_y,
            p,
        } = self;
        match io {
            Io::Forward(_) => {}
            Io::Grad(x, g) => {
                let acc = &mut Shifted(Separate(x, g), p.0);
                rows::piece_gradient(l, k, acc, &r, None, gc, e_y, p);
            }
            Io::InPlace(x) => {
                let acc = &mut Shifted(Same(x), p.0);
                rows::piece_gradient(l, k, acc, &r, None, gc, e_y, p);
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
    /// with each kind of target and option.
    #[test]
    fn a_long_row_is_the_same_split_or_whole_alone_or_in_a_batch() {
        let (n, c) = (4, 4 * PIECE + 37);
        let mut sd = 5;
        let x: Vec<f32> = (0..n * c)
            .map(|_| (lcg(&mut sd) * 24.0 - 12.0) as f32)
            .collect();
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
