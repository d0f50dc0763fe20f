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

fn check_len(arg: &'static str, got: usize, want: usize, what: &str) -> Result<(), CeError> {
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
    if c == 0 {
        return Err(CeError::invalid(
            "input",
            "expected at least one class, got C = 0",
        ));
    }
    let numel = samples * c;
    match &logits {
        Logits::Forward(x) => check_len("input", x.len(), numel, "N * C * d1..dK")?,
        Logits::Grad(x, g) => {
            check_len("input", x.len(), numel, "N * C * d1..dK")?;
            check_len("grad_out", g.len(), numel, "the input's size")?;
        }
        Logits::InPlace(x) => check_len("input", x.len(), numel, "N * C * d1..dK")?,
    }
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
    match (p.reduction, &losses) {
        (Reduction::None, Some(l)) => check_len("loss", l.len(), samples, "one per sample")?,
        (Reduction::None, None) => {
            return Err(CeError::invalid(
                "loss",
                "reduction='none' needs an output for per-sample losses",
            ))
        }
        _ => {}
    }
    if let GradOutput::PerSample(g) = grad_output {
        if p.reduction != Reduction::None {
            return Err(CeError::invalid(
                "grad_output",
                "a per-sample grad_output needs reduction='none'",
            ));
        }
        check_len("grad_output", g.len(), samples, "the loss's shape")?;
    }

    // Targets: range check and the mean's denominator, before any write.
    let denom = match p.targets {
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
    };
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
