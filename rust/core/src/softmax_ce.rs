//! `cross_entropy`: validation, chunking over threads, and reduction.

use crate::elem::{Elem, Real};
use crate::error::CeError;
use crate::kernels::columns::{self, Image, LaneIn, Shared};
use crate::kernels::rows::{self, RowIo};
use crate::kernels::{Consts, SampleTarget};
use crate::simd::{Compute, Lanes, Task};
use crate::threads;
use rayon::prelude::*;

/// How per-sample losses are combined, as PyTorch's `reduction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    None,
    Mean,
    Sum,
}

impl std::str::FromStr for Reduction {
    type Err = CeError;
    fn from_str(s: &str) -> Result<Self, CeError> {
        match s {
            "none" => Ok(Reduction::None),
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            other => Err(CeError::invalid(
                "reduction",
                format!(
                    "{other} is not a valid value for reduction; expected 'none', 'mean' or 'sum'"
                ),
            )),
        }
    }
}

/// Targets: class indices (shape `(N, d1..dK)`) or class probabilities
/// (the shape of the input).
#[derive(Clone, Copy)]
pub enum Targets<'a, T> {
    Index(&'a [i64]),
    Probs(&'a [T]),
}

/// A cross-entropy problem over logits laid out `(batch, classes, spatial)`,
/// C-contiguous (`spatial` is the product of `d1..dK`, 1 for `(N, C)`).
#[derive(Clone, Copy)]
pub struct CrossEntropy<'a, T> {
    pub batch: usize,
    pub classes: usize,
    pub spatial: usize,
    pub targets: Targets<'a, T>,
    pub weight: Option<&'a [f64]>,
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub label_smoothing: f64,
}

/// The logits, and where their gradient goes.
pub enum Logits<'a, T> {
    /// Loss only: no gradient work at all.
    Forward(&'a [T]),
    /// Gradient into a separate buffer of the input's size.
    Grad(&'a [T], &'a mut [T]),
    /// Gradient written over the logits.
    InPlace(&'a mut [T]),
}

/// The upstream gradient.
#[derive(Clone, Copy, Debug)]
pub enum GradOutput<'a> {
    /// One number (the gradient of a mean or sum; or every sample's, for `none`).
    Scalar(f64),
    /// One per sample, for `reduction = none` (shape of the loss).
    PerSample(&'a [f64]),
}

/// Samples (rows, or spatial positions) per work item; fixed by the shape,
/// never by the thread count, so reductions are bitwise reproducible.
const ITEM_ELEMS: usize = 1 << 16;
const SPATIAL_PIECE: usize = 1024;

pub(crate) fn check_len(
    arg: &'static str,
    got: usize,
    want: usize,
    what: &str,
) -> Result<(), CeError> {
    if got != want {
        return Err(CeError::invalid(
            arg,
            format!("expected {want} elements ({what}), got {got}"),
        ));
    }
    Ok(())
}

/// Runs the fused softmax cross-entropy. Returns the reduced loss for `mean`
/// and `sum` (NaN for `none`, whose per-sample losses go to `losses`).
///
/// Every argument is validated before anything is written: on error the
/// output buffers are untouched.
pub fn cross_entropy<T: Elem>(
    p: &CrossEntropy<'_, T>,
    logits: Logits<'_, T>,
    grad_output: GradOutput<'_>,
    losses: Option<&mut [T]>,
) -> Result<f64, CeError>
where
    T::Acc: Compute,
{
    let (c, samples) = (p.classes, p.batch * p.spatial);
    let denom = validate_problem(p)?;
    let numel = samples * c;
    match &logits {
        Logits::Forward(x) => check_len("input", x.len(), numel, "N * C * d1..dK")?,
        Logits::Grad(x, g) => {
            check_len("input", x.len(), numel, "N * C * d1..dK")?;
            check_len("grad_out", g.len(), numel, "the input's size")?;
        }
        Logits::InPlace(x) => check_len("input", x.len(), numel, "N * C * d1..dK")?,
    }
    check_outputs(
        p.reduction,
        samples,
        losses.as_deref().map(<[T]>::len),
        grad_output,
    )?;
    let g_scalar = match grad_output {
        GradOutput::Scalar(g) => g,
        GradOutput::PerSample(_) => 1.0,
    };
    let scale = match p.reduction {
        Reduction::Mean => Scale::Const(g_scalar / denom),
        Reduction::Sum => Scale::Const(g_scalar),
        Reduction::None => match grad_output {
            GradOutput::PerSample(g) => Scale::PerSample(g),
            GradOutput::Scalar(g) => Scale::Const(g),
        },
    };

    let weight: Option<Vec<T::Acc>> = p
        .weight
        .map(|w| w.iter().map(|&v| T::Acc::from_f64(v)).collect());
    let w_total = p.weight.map_or(c as f64, |w| w.iter().sum());
    let k = Consts {
        classes: c,
        weight: weight.as_deref(),
        w_total: T::Acc::from_f64(w_total),
        keep: T::Acc::from_f64(1.0 - p.label_smoothing),
        eps_c: T::Acc::from_f64(p.label_smoothing / c as f64),
        smooth: p.label_smoothing > 0.0 && matches!(p.targets, Targets::Index(_)),
    };
    let job = Job {
        k: &k,
        targets: p.targets,
        ignore_index: p.ignore_index,
        scale,
        spatial: p.spatial,
    };

    let total = if samples == 0 {
        0.0
    } else if p.spatial == 1 {
        run_rows(&job, logits, losses)?
    } else {
        run_columns(&job, p.batch, logits, losses)?
    };
    Ok(match p.reduction {
        Reduction::Mean => total / denom,
        Reduction::Sum => total,
        Reduction::None => f64::NAN,
    })
}

/// Checks the per-sample outputs: a loss buffer of one value per sample
/// exactly for `reduction='none'`, and a per-sample upstream gradient only
/// with it.
pub(crate) fn check_outputs(
    reduction: Reduction,
    samples: usize,
    losses_len: Option<usize>,
    grad_output: GradOutput<'_>,
) -> Result<(), CeError> {
    match (reduction, losses_len) {
        (Reduction::None, Some(l)) => check_len("loss", l, samples, "one per sample")?,
        (Reduction::None, None) => {
            return Err(CeError::invalid(
                "loss",
                "reduction='none' needs an output for per-sample losses",
            ))
        }
        _ => {}
    }
    if let GradOutput::PerSample(g) = grad_output {
        if reduction != Reduction::None {
            return Err(CeError::invalid(
                "grad_output",
                "a per-sample grad_output needs reduction='none'",
            ));
        }
        check_len("grad_output", g.len(), samples, "the loss's shape")?;
    }
    Ok(())
}

/// Checks everything about a problem that does not depend on the buffers:
/// classes, label smoothing, weight, the targets (lengths, index range,
/// `ignore_index` with probabilities). Returns the denominator of the
/// `mean` reduction (summed target weights, or the sample count for
/// probabilities), computed in a fixed order.
pub(crate) fn validate_problem<T: Elem>(p: &CrossEntropy<'_, T>) -> Result<f64, CeError> {
    let (c, samples) = (p.classes, p.batch * p.spatial);
    if c == 0 {
        return Err(CeError::invalid(
            "input",
            "expected at least one class, got C = 0",
        ));
    }
    let numel = samples * c;
    if !(0.0..=1.0).contains(&p.label_smoothing) {
        return Err(CeError::invalid(
            "label_smoothing",
            format!("must be between 0.0 and 1.0, got {}", p.label_smoothing),
        ));
    }
    if let Some(w) = p.weight {
        if w.len() != c {
            return Err(CeError::invalid(
                "weight",
                format!(
                    "expected a weight for each of the {c} classes, got shape ({},)",
                    w.len()
                ),
            ));
        }
    }
    // Targets: range check and the mean's denominator, before any write.
    Ok(match p.targets {
        Targets::Index(t) => {
            check_len("target", t.len(), samples, "N * d1..dK class indices")?;
            let mut total = 0.0f64;
            for (i, &y) in t.iter().enumerate() {
                if y == p.ignore_index {
                    continue;
                }
                if y < 0 || y as u64 >= c as u64 {
                    return Err(CeError::TargetOutOfBounds {
                        position: i,
                        value: y,
                        classes: c,
                        ignore_index: p.ignore_index,
                    });
                }
                total += p.weight.map_or(1.0, |w| w[y as usize]);
            }
            total
        }
        Targets::Probs(t) => {
            check_len(
                "target",
                t.len(),
                numel,
                "class probabilities of the input's shape",
            )?;
            if p.ignore_index >= 0 {
                return Err(CeError::invalid(
                    "ignore_index",
                    "is not supported for class-probability targets",
                ));
            }
            samples as f64
        }
    })
}

#[derive(Clone, Copy)]
enum Scale<'a> {
    Const(f64),
    PerSample(&'a [f64]),
}

struct Job<'a, T, F> {
    k: &'a Consts<'a, F>,
    targets: Targets<'a, T>,
    ignore_index: i64,
    scale: Scale<'a>,
    spatial: usize,
}

impl<T: Elem, F: Real> Job<'_, T, F> {
    #[inline(always)]
    fn target(&self, i: usize) -> SampleTarget<F> {
        match self.targets {
            Targets::Probs(_) => SampleTarget::Probs,
            Targets::Index(t) => {
                let y = t[i];
                if y == self.ignore_index {
                    SampleTarget::Ignored
                } else {
                    SampleTarget::Class {
                        y: y as usize,
                        w_y: self.k.w(y as usize),
                    }
                }
            }
        }
    }
    #[inline(always)]
    fn scale(&self, i: usize) -> F {
        match self.scale {
            Scale::Const(g) => F::from_f64(g),
            Scale::PerSample(g) => F::from_f64(g[i]),
        }
    }
}

// ---- (N, C): rows ----------------------------------------------------------

struct RowItem<'a, T> {
    row0: usize,
    io: ItemIo<'a, T>,
    losses: Option<&'a mut [T]>,
}

enum ItemIo<'a, T> {
    Forward(&'a [T]),
    Grad(&'a [T], &'a mut [T]),
    InPlace(&'a mut [T]),
}

struct RowTask<'a, 'j, T: Elem> {
    job: &'j Job<'j, T, T::Acc>,
    item: RowItem<'a, T>,
    scratch: &'a mut [T::Acc],
}

impl<T: Elem> Task<T::Acc> for RowTask<'_, '_, T> {
    type Output = f64;
    #[inline(always)]
    fn run<L: Lanes<F = T::Acc>>(self, l: L) -> f64 {
        let RowTask { job, item, scratch } = self;
        let c = job.k.classes;
        let RowItem {
            row0,
            io,
            mut losses,
        } = item;
        let nrows = match &io {
            ItemIo::Forward(x) | ItemIo::Grad(x, _) => x.len() / c,
            ItemIo::InPlace(x) => x.len() / c,
        };
        let mut total = 0.0f64;
        let (mut xs, mut gs): (Option<&[T]>, Option<&mut [T]>) = (None, None);
        let mut inplace: Option<&mut [T]> = None;
        match io {
            ItemIo::Forward(x) => xs = Some(x),
            ItemIo::Grad(x, g) => {
                xs = Some(x);
                gs = Some(g);
            }
            ItemIo::InPlace(x) => inplace = Some(x),
        }
        for r in 0..nrows {
            let i = row0 + r;
            let span = r * c..(r + 1) * c;
            let rio = match (xs, gs.as_deref_mut(), inplace.as_deref_mut()) {
                (Some(x), None, _) => RowIo::Forward(&x[span]),
                (Some(x), Some(g), _) => RowIo::Grad(&x[span.clone()], &mut g[span]),
                (None, _, Some(x)) => RowIo::InPlace(&mut x[span]),
                (None, _, None) => unreachable!("an item always has logits"),
            };
            let probs = match job.targets {
                Targets::Probs(t) => Some(&t[i * c..(i + 1) * c]),
                Targets::Index(_) => None,
            };
            let loss = rows::row(l, job.k, rio, job.target(i), probs, job.scale(i), scratch);
            if let Some(ls) = losses.as_deref_mut() {
                ls[r] = loss.to_elem();
            }
            total += loss.to_f64();
        }
        total
    }
}

fn run_rows<T: Elem>(
    job: &Job<'_, T, T::Acc>,
    logits: Logits<'_, T>,
    losses: Option<&mut [T]>,
) -> Result<f64, CeError>
where
    T::Acc: Compute,
{
    let c = job.k.classes;
    let rows_per = (ITEM_ELEMS / c).max(1);
    let span = rows_per * c;
    let mut loss_chunks: Vec<Option<&mut [T]>> = match losses {
        Some(l) => l.chunks_mut(rows_per).map(Some).collect(),
        None => Vec::new(),
    };
    let ios: Vec<ItemIo<'_, T>> = match logits {
        Logits::Forward(x) => x.chunks(span).map(ItemIo::Forward).collect(),
        Logits::Grad(x, g) => x
            .chunks(span)
            .zip(g.chunks_mut(span))
            .map(|(x, g)| ItemIo::Grad(x, g))
            .collect(),
        Logits::InPlace(x) => x.chunks_mut(span).map(ItemIo::InPlace).collect(),
    };
    let want_grad = !matches!(ios.first(), Some(ItemIo::Forward(_)) | None);
    loss_chunks.resize_with(ios.len(), || None);
    let items: Vec<RowItem<'_, T>> = ios
        .into_iter()
        .zip(loss_chunks)
        .enumerate()
        .map(|(j, (io, losses))| RowItem {
            row0: j * rows_per,
            io,
            losses,
        })
        .collect();
    let scratch_len = if want_grad { c } else { 0 };
    let pool = threads::pool()?;
    let partials: Vec<f64> = pool.install(|| {
        items
            .into_par_iter()
            .map(|item| {
                T::Acc::with_scratch(scratch_len, |scratch| {
                    T::Acc::dispatch(RowTask { job, item, scratch })
                })
            })
            .collect()
    });
    Ok(partials.iter().sum())
}

// ---- (N, C, d1..dK): columns -------------------------------------------------

struct ColumnTask<'a, 'j, T: Elem> {
    job: &'j Job<'j, T, T::Acc>,
    img: Image<T>,
    n: usize,
    s0: usize,
    s1: usize,
    losses: Option<Shared<T>>,
    scratch: &'a mut [T::Acc],
}

impl<T: Elem> ColumnTask<'_, '_, T> {
    #[inline(always)]
    fn blocks<L: Lanes<F = T::Acc>>(&mut self, l: L, from: usize, to: usize) -> f64 {
        let n = L::N;
        let job = self.job;
        let mut total = 0.0f64;
        let mut s = from;
        let mut lanes = [LaneIn {
            target: SampleTarget::Ignored,
            scale: T::Acc::ZERO,
        }; 16];
        let mut loss = [T::Acc::ZERO; 16];
        while s + n <= to {
            let i0 = self.n * job.spatial + s;
            for (j, li) in lanes[..n].iter_mut().enumerate() {
                *li = LaneIn {
                    target: job.target(i0 + j),
                    scale: job.scale(i0 + j),
                };
            }
            // SAFETY: this task alone owns spatial positions s0..s1 of image n.
            unsafe {
                columns::block(
                    l,
                    job.k,
                    &self.img,
                    s,
                    &lanes[..n],
                    self.scratch,
                    &mut loss[..n],
                )
            };
            for (j, &v) in loss[..n].iter().enumerate() {
                total += v.to_f64();
                if let Some(ls) = &self.losses {
                    // SAFETY: the loss positions of this task's samples are its own.
                    let dst = unsafe { ls.get_mut(i0 + j, 1) };
                    dst[0] = v.to_elem();
                }
            }
            s += n;
        }
        total
    }
}

impl<T: Elem> Task<T::Acc> for ColumnTask<'_, '_, T> {
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

fn run_columns<T: Elem>(
    job: &Job<'_, T, T::Acc>,
    batch: usize,
    logits: Logits<'_, T>,
    losses: Option<&mut [T]>,
) -> Result<f64, CeError>
where
    T::Acc: Compute,
{
    let (c, sp) = (job.k.classes, job.spatial);
    let (x, g) = match logits {
        Logits::Forward(x) => (Shared::from_ref(x), None),
        Logits::Grad(x, g) => (Shared::from_ref(x), Some(Shared::new(g))),
        Logits::InPlace(x) => {
            let s = Shared::new(x);
            (s, Some(s))
        }
    };
    let probs = match job.targets {
        Targets::Probs(t) => Some(Shared::from_ref(t)),
        Targets::Index(_) => None,
    };
    let losses = losses.map(Shared::new);
    let items: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|n| {
            (0..sp)
                .step_by(SPATIAL_PIECE)
                .map(move |s0| (n, s0, (s0 + SPATIAL_PIECE).min(sp)))
        })
        .collect();
    let scratch_len = if g.is_some() { c * 16 } else { 0 };
    let pool = threads::pool()?;
    let partials: Vec<f64> = pool.install(|| {
        items
            .into_par_iter()
            .map(|(n, s0, s1)| {
                T::Acc::with_scratch(scratch_len, |scratch| {
                    T::Acc::dispatch(ColumnTask {
                        job,
                        img: Image {
                            x,
                            g,
                            probs,
                            base: n * c * sp,
                            spatial: sp,
                        },
                        n,
                        s0,
                        s1,
                        losses,
                        scratch,
                    })
                })
            })
            .collect()
    });
    Ok(partials.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    /// Float64 reference: per-sample losses and the gradient for a unit
    /// upstream gradient per sample (before the reduction's scaling).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f64],
        n: usize,
        c: usize,
        sp: usize,
        t: &[i64],
        w: Option<&[f64]>,
        ignore: i64,
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut loss = vec![0.0; n * sp];
        let mut grad = vec![0.0; n * c * sp];
        for i in 0..n {
            for s in 0..sp {
                let at = |k: usize| i * c * sp + k * sp + s;
                let y = t[i * sp + s];
                if y == ignore {
                    continue;
                }
                let m = (0..c).map(|k| x[at(k)]).fold(f64::NEG_INFINITY, f64::max);
                let lse = m + (0..c).map(|k| (x[at(k)] - m).exp()).sum::<f64>().ln();
                let wk = |k: usize| w.map_or(1.0, |w| w[k]);
                for k in 0..c {
                    let tk = (1.0 - eps) * if k as i64 == y { 1.0 } else { 0.0 } * wk(y as usize)
                        + eps / c as f64 * wk(k);
                    loss[i * sp + s] += tk * (lse - x[at(k)]);
                }
                let a = (1.0 - eps) * wk(y as usize) + eps / c as f64 * (0..c).map(wk).sum::<f64>();
                for k in 0..c {
                    let b = (1.0 - eps) * wk(y as usize) * if k as i64 == y { 1.0 } else { 0.0 }
                        + eps / c as f64 * wk(k);
                    grad[at(k)] = (x[at(k)] - lse).exp() * a - b;
                }
            }
        }
        (loss, grad)
    }

    fn check(n: usize, c: usize, sp: usize, weighted: bool, eps: f64, seed: u64) {
        let mut sd = seed;
        let x64: Vec<f64> = (0..n * c * sp).map(|_| lcg(&mut sd) * 16.0 - 8.0).collect();
        let x: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let t: Vec<i64> = (0..n * sp)
            .map(|_| {
                let r = (lcg(&mut sd) * (c as f64 + 1.0)) as i64;
                if r == c as i64 {
                    -100
                } else {
                    r
                }
            })
            .collect();
        let w: Option<Vec<f64>> = weighted.then(|| (0..c).map(|_| lcg(&mut sd) * 2.0).collect());
        let (want_loss, want_grad) = reference(&x64, n, c, sp, &t, w.as_deref(), -100, eps);
        let p = CrossEntropy {
            batch: n,
            classes: c,
            spatial: sp,
            targets: Targets::Index(&t),
            weight: w.as_deref(),
            ignore_index: -100,
            reduction: Reduction::None,
            label_smoothing: eps,
        };
        let mut loss = vec![0.0f32; n * sp];
        let mut grad = vec![0.0f32; n * c * sp];
        cross_entropy(
            &p,
            Logits::Grad(&x, &mut grad),
            GradOutput::Scalar(1.0),
            Some(&mut loss),
        )
        .unwrap();
        for (g, w) in loss.iter().zip(&want_loss) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * w.abs() + 1e-5,
                "loss {g} vs {w}"
            );
        }
        for (g, w) in grad.iter().zip(&want_grad) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * w.abs() + 1e-6,
                "grad {g} vs {w}"
            );
        }
        // In place: the same bits as the separate buffer.
        let mut xi = x.clone();
        let mut loss2 = vec![0.0f32; n * sp];
        cross_entropy(
            &p,
            Logits::InPlace(&mut xi),
            GradOutput::Scalar(1.0),
            Some(&mut loss2),
        )
        .unwrap();
        assert_eq!(xi, grad);
        assert_eq!(loss2, loss);
    }

    #[test]
    fn rows_match_float64_reference() {
        for (i, &c) in [1usize, 2, 7, 8, 17, 64, 100, 1000, 4099]
            .iter()
            .enumerate()
        {
            check(5, c, 1, i % 2 == 0, [0.0, 0.1, 1.0][i % 3], i as u64);
        }
    }

    #[test]
    fn columns_match_float64_reference() {
        for (i, &(c, sp)) in [(3usize, 2usize), (10, 7), (5, 16), (21, 37), (2, 1030)]
            .iter()
            .enumerate()
        {
            check(
                3,
                c,
                sp,
                i % 2 == 1,
                [0.05, 0.0, 0.3][i % 3],
                100 + i as u64,
            );
        }
    }

    #[test]
    fn reductions_are_bitwise_identical_for_any_thread_count() {
        let (n, c) = (300, 513);
        let mut sd = 7;
        let x: Vec<f32> = (0..n * c).map(|_| (lcg(&mut sd) * 10.0) as f32).collect();
        let t: Vec<i64> = (0..n).map(|i| (i % c) as i64).collect();
        let p = CrossEntropy {
            batch: n,
            classes: c,
            spatial: 1,
            targets: Targets::Index(&t),
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Sum,
            label_smoothing: 0.1,
        };
        let mut results = Vec::new();
        for threads in [1, 2, 3] {
            crate::threads::set_num_threads(threads).unwrap();
            let mut g = vec![0.0f32; n * c];
            let l =
                cross_entropy(&p, Logits::Grad(&x, &mut g), GradOutput::Scalar(1.0), None).unwrap();
            results.push((l.to_bits(), g));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn bad_targets_are_reported_before_anything_is_written() {
        let x = vec![0.5f32; 12];
        let t = [0i64, 5, 1];
        let p = CrossEntropy {
            batch: 3,
            classes: 4,
            spatial: 1,
            targets: Targets::Index(&t),
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
        };
        let mut g = vec![7.0f32; 12];
        let err =
            cross_entropy(&p, Logits::Grad(&x, &mut g), GradOutput::Scalar(1.0), None).unwrap_err();
        assert!(matches!(
            err,
            CeError::TargetOutOfBounds {
                value: 5,
                position: 1,
                ..
            }
        ));
        assert!(g.iter().all(|&v| v == 7.0));
        let short = [0i64, 1];
        let p = CrossEntropy {
            targets: Targets::Index(&short),
            ..p
        };
        assert!(matches!(
            cross_entropy(&p, Logits::Forward(&x), GradOutput::Scalar(1.0), None),
            Err(CeError::Invalid { arg: "target", .. })
        ));
    }
}
