//! `linear_cross_entropy`: logits = X·Wᵀ (+ b) followed by softmax
//! cross-entropy, fused and chunked over rows so that the `N x C` logits never
//! exist.
//!
//! The cross-entropy problem is validated once into a [`Plan`] (targets,
//! denominator, scales); then per chunk of `rows` rows (`chunk.rs`):
//! 1. `L = X_c · Wᵀ (+ b)` into one reused buffer (`rows x C·S`, the compute
//!    type `G`), by the GEMM (`gemm.rs`);
//! 2. the plan's execute step turns `L` into `dL` in place (or only reads it,
//!    for forward-only calls: then nothing below runs);
//! 3. `dX_c = dL · W`, `dW += dLᵀ · X_c`, `db += Σ_rows dL`.
//!
//! `G` is `f32` for `f32`, `f16` and `bf16` inputs (half inputs are widened
//! to `f32`: the weight once or block by block (`weight.rs`), each chunk of
//! rows) and `f64` for `f64` inputs; callers may ask for `f64` for any input.
//! The weight gradient of a half input accumulates in `f32` and is rounded
//! once at the end. On CPUs with AVX512_BF16, the logits of `bf16` inputs
//! computing in `f32` are instead bfloat16 dot products of the inputs as
//! they are (`bf16_dot.rs`); the weight is then converted only for the
//! backward.
//!
//! K-dimensional problems (`W` of shape `(C, d1..dK, D)`) are the same GEMMs
//! with `W` viewed as `(C·S, D)`: each row of `L` is then laid out
//! `(C, d1..dK)`, the cross-entropy kernel's `(N, C, S)` layout with
//! `N = rows`.
//!
//! Determinism: chunk boundaries depend on `rows` only; the GEMMs split their
//! output among threads without splitting any dot product, and the bias
//! gradient sums rows in order, so for a fixed chunk size the bits do not
//! depend on the thread count.

mod bf16_dot;
mod chunk;
mod gemm;
mod rowwise;
mod weight;

use crate::ce::execute::gather_bufs;
use crate::ce::execute::{execute, Outputs};
use crate::ce::plan::check_len;
use crate::ce::Logits;
use crate::ce::{CrossEntropy, GradOutput, Plan, Reduction, Targets};
use crate::elem::{Elem, ElemKind};
use crate::error::CeError;
use crate::stats::{self, StatsGrad, StatsOut, StatsPlan, TokenStats};
use crate::threads;
use chunk::{ChunkBufs, Ctx, DotInputs, Grads, Needs};
use gemm::GemmReal;
use weight::{widen, Weight};

/// Multiply-adds of the logits below which a call runs on the calling thread.
const SMALL_MACS: usize = 1 << 22;

/// The linear part of a fused problem: `logits = input · linear_weightᵀ
/// (+ linear_bias)`, computed chunk by chunk. Arrays are C-contiguous.
#[derive(Clone, Copy)]
pub struct Linear<'a, T> {
    /// `N` rows of `input` (1 for an unbatched input).
    pub batch: usize,
    /// `D`, the length of each input row.
    pub in_features: usize,
    /// `C`.
    pub classes: usize,
    /// `S = d1 * ... * dK` (1 without out_features).
    pub spatial: usize,
    /// `(N, D)`.
    pub input: &'a [T],
    /// `(C, d1..dK, D)`.
    pub linear_weight: &'a [T],
    /// `(C, d1..dK)`.
    pub linear_bias: Option<&'a [T]>,
    /// Rows per chunk (>= 1): the logits buffer holds `rows * C * S` values.
    pub chunk_rows: usize,
    /// Compute in `f64` whatever the input type.
    pub acc_f64: bool,
    /// When the weight must be converted to the compute type (half inputs,
    /// or `acc_f64`), the largest converted copy (bytes) kept for the whole
    /// call; a larger weight is converted block by block of classes inside
    /// every chunk instead (more conversions, memory bounded by a block).
    pub max_weight_copy: usize,
}

/// A linear-then-cross-entropy problem.
#[derive(Clone, Copy)]
pub struct LinearCrossEntropy<'a, T> {
    pub linear: Linear<'a, T>,
    /// Class indices `(N, d1..dK)` or probabilities `(N, C, d1..dK)`.
    pub targets: Targets<'a, T>,
    pub weight: Option<&'a [f64]>,
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub label_smoothing: f64,
    /// As [`CrossEntropy::softcap`] and [`CrossEntropy::z_loss`].
    pub softcap: Option<f64>,
    pub z_loss: f64,
}

/// Per-token statistics of the logits of a linear layer.
#[derive(Clone, Copy)]
pub struct LinearTokenStats<'a, T> {
    pub linear: Linear<'a, T>,
    /// The statistics; its `batch`, `classes` and `spatial` must be the
    /// linear part's.
    pub stats: TokenStats<'a>,
}

/// Where the gradients go: shapes of `input`, `linear_weight`, `linear_bias`.
pub struct LinearGrads<'a, T> {
    pub input: &'a mut [T],
    pub linear_weight: &'a mut [T],
    pub linear_bias: Option<&'a mut [T]>,
}

impl<'a, T: Elem> LinearCrossEntropy<'a, T> {
    /// The cross-entropy problem over all `N x C·S` logits.
    fn ce_problem(&self) -> CrossEntropy<'a, T> {
        let l = &self.linear;
        CrossEntropy {
            batch: l.batch,
            classes: l.classes,
            spatial: l.spatial,
            targets: self.targets,
            weight: self.weight,
            ignore_index: self.ignore_index,
            reduction: self.reduction,
            label_smoothing: self.label_smoothing,
            softcap: self.softcap,
            z_loss: self.z_loss,
        }
    }
}

impl<T: Elem> Linear<'_, T> {
    /// The arrays' lengths fit the shapes, and the chunk is not empty.
    fn check_buffers(&self, grads: Option<&LinearGrads<'_, T>>) -> Result<(), CeError> {
        let (n, d, cs) = (self.batch, self.in_features, self.classes * self.spatial);
        check_len("input", self.input.len(), n * d, "N * in_features")?;
        check_len(
            "linear_weight",
            self.linear_weight.len(),
            cs * d,
            "C * d1..dK * in_features",
        )?;
        if let Some(b) = self.linear_bias {
            check_len("linear_bias", b.len(), cs, "C * d1..dK")?;
        }
        if self.chunk_rows == 0 {
            return Err(CeError::invalid(
                "batch_chunk_size",
                "expected a positive number of rows per chunk, got 0",
            ));
        }
        let Some(g) = grads else { return Ok(()) };
        check_len("grad_input", g.input.len(), n * d, "the input's size")?;
        check_len(
            "grad_linear_weight",
            g.linear_weight.len(),
            cs * d,
            "linear_weight's size",
        )?;
        match (&g.linear_bias, self.linear_bias) {
            (Some(gb), Some(_)) => {
                check_len("grad_linear_bias", gb.len(), cs, "linear_bias's size")
            }
            (None, None) => Ok(()),
            _ => Err(CeError::invalid(
                "grad_linear_bias",
                "expected a bias gradient buffer exactly when linear_bias is given",
            )),
        }
    }

    /// Whether the call computes in `f64`.
    fn in_f64(&self) -> bool {
        self.acc_f64 || T::KIND == ElemKind::F64
    }
}

/// Runs the fused linear cross-entropy. Returns the reduced loss for `mean`
/// and `sum` (NaN for `none`, whose per-sample losses go to `losses`).
/// Gradients are computed only when `grads` is given; `grad_output` is the
/// upstream gradient as for [`crate::cross_entropy`].
///
/// Every argument is validated before anything is written.
pub fn linear_cross_entropy<T: Elem>(
    p: &LinearCrossEntropy<'_, T>,
    grad_output: GradOutput<'_>,
    grads: Option<LinearGrads<'_, T>>,
    losses: Option<&mut [T]>,
) -> Result<f64, CeError> {
    if p.linear.in_f64() {
        run_ce::<T, f64>(p, grad_output, grads, losses)
    } else {
        run_ce::<T, f32>(p, grad_output, grads, losses)
    }
}

fn run_ce<T: Elem, G: GemmReal + Default>(
    p: &LinearCrossEntropy<'_, T>,
    grad_output: GradOutput<'_>,
    grads: Option<LinearGrads<'_, T>>,
    mut losses: Option<&mut [T]>,
) -> Result<f64, CeError> {
    p.linear.check_buffers(grads.as_ref())?;
    let plan = Plan::<G>::new(&p.ce_problem(), grad_output)?;
    plan.check_losses(losses.as_deref().map(<[T]>::len))?;
    let probs = match p.targets {
        Targets::Probs(t) => Some(t),
        Targets::Index(_) => None,
    };
    let s = p.linear.spatial;
    threads::run(is_small(&p.linear), |threads| {
        let gather = gather_bufs(&plan, threads, grads.is_some(), probs.is_some())?;
        let total = drive::<T, G>(&p.linear, probs, grads, threads, |(r0, r1), io, probs| {
            let chunk_losses = losses.as_deref_mut().map(|l| &mut l[r0 * s..r1 * s]);
            let out = Outputs {
                losses: chunk_losses,
            };
            execute(&plan, r0 * s, io, probs, out, &gather)
        })?;
        Ok(plan.reduce(total))
    })
}

/// Computes the per-token statistics of the logits `input · Wᵀ (+ b)` (and
/// the gradients of `Σ gl · logprob + ge · entropy` with respect to the
/// input, weight and bias when `grads` is given), chunk by chunk. Float
/// outputs `O` are `f32`, or `f64` for a call computing in `f64`.
///
/// Every argument is validated before anything is written.
pub fn linear_token_stats<T: Elem, O: Elem>(
    p: &LinearTokenStats<'_, T>,
    grad: StatsGrad<'_>,
    grads: Option<LinearGrads<'_, T>>,
    out: StatsOut<'_, O>,
) -> Result<(), CeError> {
    if p.linear.in_f64() {
        run_stats::<T, f64, O>(p, grad, grads, out)
    } else {
        run_stats::<T, f32, O>(p, grad, grads, out)
    }
}

fn run_stats<T: Elem, G: GemmReal + Default, O: Elem>(
    p: &LinearTokenStats<'_, T>,
    grad: StatsGrad<'_>,
    grads: Option<LinearGrads<'_, T>>,
    mut out: StatsOut<'_, O>,
) -> Result<(), CeError> {
    let l = &p.linear;
    let st = &p.stats;
    if (st.batch, st.classes, st.spatial) != (l.batch, l.classes, l.spatial) {
        return Err(CeError::invalid(
            "stats",
            "the statistics' shape must be the linear part's",
        ));
    }
    l.check_buffers(grads.as_ref())?;
    let plan = StatsPlan::<G>::new(st, grad, grads.is_some())?;
    out.check(&plan)?;
    let (s, k) = (l.spatial, st.top_k);
    threads::run(is_small(l), |threads| {
        let bufs = stats::execute::thread_bufs(&plan, threads, grads.is_some())?;
        drive::<T, G>(l, None, grads, threads, |(r0, r1), io, _| {
            let chunk = out.samples(r0 * s, r1 * s, k);
            stats::execute::execute(&plan, r0 * s, io, chunk, &bufs);
            0.0
        })?;
        Ok(())
    })
}

/// Whether the call is small enough to run on the calling thread.
fn is_small<T>(l: &Linear<'_, T>) -> bool {
    let macs = l.batch.saturating_mul(l.classes * l.spatial);
    macs.saturating_mul(l.in_features.max(1)) <= SMALL_MACS
}

/// Runs the chunks of `l`: per chunk the logits, then `on_logits((r0, r1),
/// logits, probs)`, which turns them into their gradient in place when
/// `grads` is given, then the backward into `grads`. Returns the sum of
/// what `on_logits` returned, in chunk order.
fn drive<T: Elem, G: GemmReal + Default>(
    l: &Linear<'_, T>,
    probs: Option<&[T]>,
    grads: Option<LinearGrads<'_, T>>,
    threads: usize,
    mut on_logits: impl FnMut((usize, usize), Logits<'_, G>, Option<&[G]>) -> f64,
) -> Result<f64, CeError> {
    let (n, d, cs) = (l.batch, l.in_features, l.classes * l.spatial);
    let rows = l.chunk_rows.min(n.max(1));
    let dot = DotInputs::new::<T, G>(l.input, l.linear_weight);
    let mut weight = if chunk::widened(dot.is_some(), grads.is_some()) {
        Some(Weight::<T, G>::new(
            l.linear_weight,
            cs,
            d,
            l.max_weight_copy,
        )?)
    } else {
        None
    };
    let bias = l
        .linear_bias
        .map(|b| widen::<T, G>(b, "linear_bias"))
        .transpose()?;
    let needs = Needs {
        converts: T::KIND != G::KIND,
        probs: probs.is_some(),
        grad: grads.is_some(),
        dot: dot.is_some(),
    };
    let mut bufs = ChunkBufs::<G>::reserve((rows, d, cs), needs, threads)?;
    let mut grads = match grads {
        Some(g) => Some(Grads::<T, G>::new(g.input, g.linear_weight, g.linear_bias)?),
        None => None,
    };
    let ctx = Ctx {
        input: l.input,
        probs,
        bias: bias.as_deref(),
        d,
        cs,
        threads,
        dot,
    };
    let mut total = 0.0f64;
    for r0 in (0..n).step_by(rows) {
        let r1 = (r0 + rows).min(n);
        let chunk = (r0, r1);
        total += chunk::run(
            &ctx,
            weight.as_mut(),
            &mut bufs,
            chunk,
            &mut on_logits,
            grads.as_mut(),
        );
    }
    if let Some(g) = grads {
        g.finish();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;
    use crate::{cross_entropy, Logits};
    use half::bf16;

    struct Data {
        n: usize,
        d: usize,
        c: usize,
        s: usize,
        x: Vec<f64>,
        w: Vec<f64>,
        b: Vec<f64>,
        t: Vec<i64>,
    }

    fn data(n: usize, d: usize, c: usize, s: usize, seed: u64) -> Data {
        let mut r = seed;
        let x = (0..n * d).map(|_| lcg(&mut r) * 2.0 - 1.0).collect();
        let w = (0..c * s * d).map(|_| lcg(&mut r) * 2.0 - 1.0).collect();
        let b = (0..c * s).map(|_| lcg(&mut r) - 0.5).collect();
        let t = (0..n * s)
            .map(|i| {
                if i % 7 == 3 {
                    -100
                } else {
                    (lcg(&mut r) * c as f64) as i64
                }
            })
            .collect();
        Data {
            n,
            d,
            c,
            s,
            x,
            w,
            b,
            t,
        }
    }

    fn problem<'a, T: Elem>(
        dt: &'a Data,
        x: &'a [T],
        w: &'a [T],
        b: &'a [T],
        weight: &'a [f64],
        rows: usize,
    ) -> LinearCrossEntropy<'a, T> {
        LinearCrossEntropy {
            linear: Linear {
                batch: dt.n,
                in_features: dt.d,
                classes: dt.c,
                spatial: dt.s,
                input: x,
                linear_weight: w,
                linear_bias: Some(b),
                chunk_rows: rows,
                acc_f64: false,
                max_weight_copy: usize::MAX,
            },
            targets: Targets::Index(&dt.t),
            weight: Some(weight),
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.1,
            softcap: None,
            z_loss: 0.0,
        }
    }

    /// (loss, dx, dw, db) in f64: logits built naively, then the (separately
    /// tested) cross-entropy kernel in f64, then naive products.
    fn reference(dt: &Data, weight: &[f64]) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, d, cs) = (dt.n, dt.d, dt.c * dt.s);
        let mut l = vec![0.0; n * cs];
        for r in 0..n {
            for j in 0..cs {
                let dot: f64 = (0..d).map(|k| dt.x[r * d + k] * dt.w[j * d + k]).sum();
                l[r * cs + j] = dot + dt.b[j];
            }
        }
        let mut g = vec![0.0; n * cs];
        let ce = CrossEntropy {
            batch: n,
            classes: dt.c,
            spatial: dt.s,
            targets: Targets::Index(&dt.t),
            weight: Some(weight),
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.1,
            softcap: None,
            z_loss: 0.0,
        };
        let loss =
            cross_entropy(&ce, Logits::Grad(&l, &mut g), GradOutput::Scalar(1.0), None).unwrap();
        let mut dx = vec![0.0; n * d];
        let mut dw = vec![0.0; cs * d];
        let mut db = vec![0.0; cs];
        for r in 0..n {
            for j in 0..cs {
                let v = g[r * cs + j];
                db[j] += v;
                for k in 0..d {
                    dx[r * d + k] += v * dt.w[j * d + k];
                    dw[j * d + k] += v * dt.x[r * d + k];
                }
            }
        }
        (loss, dx, dw, db)
    }

    fn close(name: &str, got: &[f64], want: &[f64], tol: f64) {
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tol * scale,
                "{name}[{i}]: {a} vs {b} (scale {scale})"
            );
        }
    }

    /// `v` rounded to `T`.
    fn cast<T: Elem>(v: &[f64]) -> Vec<T> {
        v.iter().map(|&x| T::from_f64(x)).collect()
    }

    fn wide<T: Elem>(v: &[T]) -> Vec<f64> {
        v.iter().map(|x| x.to_f64()).collect()
    }

    /// The data's inputs rounded to `T`, and the data holding exactly those
    /// values (what the reference should see).
    fn rounded<T: Elem>(dt: &Data) -> (Data, Vec<T>, Vec<T>, Vec<T>) {
        let (x, w, b) = (cast::<T>(&dt.x), cast::<T>(&dt.w), cast::<T>(&dt.b));
        let dr = Data {
            x: wide(&x),
            w: wide(&w),
            b: wide(&b),
            t: dt.t.clone(),
            ..*dt
        };
        (dr, x, w, b)
    }

    /// Runs `p` with gradient buffers first filled with `fill`: the result
    /// and the gradients of input, weight and bias.
    fn run_grads<T: Elem>(
        p: &LinearCrossEntropy<'_, T>,
        fill: T,
    ) -> (Result<f64, CeError>, Vec<T>, Vec<T>, Vec<T>) {
        let l = &p.linear;
        let mut gx = vec![fill; l.input.len()];
        let mut gw = vec![fill; l.linear_weight.len()];
        let mut gb = vec![fill; l.linear_bias.map_or(0, <[T]>::len)];
        let r = linear_cross_entropy(
            p,
            GradOutput::Scalar(1.0),
            Some(LinearGrads {
                input: &mut gx,
                linear_weight: &mut gw,
                linear_bias: l.linear_bias.map(|_| &mut gb[..]),
            }),
            None,
        );
        (r, gx, gw, gb)
    }

    fn run_f32(dt: &Data, weight: &[f64], rows: usize) -> (f64, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (_, x, w, b) = rounded::<f32>(dt);
        // NaN first: every gradient is written, none added to what was there
        let (r, dx, dw, db) = run_grads(&problem(dt, &x, &w, &b, weight, rows), f32::NAN);
        (r.unwrap(), dx, dw, db)
    }

    #[test]
    fn matches_float64_reference_for_any_chunk_size() {
        for &(n, d, c, s) in &[(13, 7, 11, 1), (9, 5, 3, 4), (1, 1, 1, 1), (20, 33, 130, 1)] {
            let (dr, ..) = rounded::<f32>(&data(n, d, c, s, 7 + n as u64));
            let weight: Vec<f64> = (0..c).map(|j| 0.5 + (j % 3) as f64 * 0.25).collect();
            let (loss, dx, dw, db) = reference(&dr, &weight);
            for rows in [1, 2, 5, n] {
                let (l32, dx32, dw32, db32) = run_f32(&dr, &weight, rows);
                assert!(
                    (l32 - loss).abs() <= 1e-5 * loss.abs().max(1.0),
                    "{l32} vs {loss}"
                );
                close("dx", &wide(&dx32), &dx, 1e-5);
                close("dw", &wide(&dw32), &dw, 1e-5);
                close("db", &wide(&db32), &db, 1e-5);
            }
        }
    }

    #[test]
    fn bitwise_identical_for_any_thread_count() {
        // large enough for the GEMMs to split their work among threads
        let dt = data(260, 96, 1000, 1, 3);
        let weight = vec![1.0; 1000];
        let one = threads::with_threads(1, || run_f32(&dt, &weight, 128)).unwrap();
        for t in [2, 3] {
            let many = threads::with_threads(t, || run_f32(&dt, &weight, 128)).unwrap();
            assert_eq!(one.0.to_bits(), many.0.to_bits());
            assert!(one.1 == many.1 && one.2 == many.2 && one.3 == many.3);
        }
    }

    /// Per-sample losses and the input gradient of `rows` of `dt` (a
    /// sub-batch), with chunks of `chunk` rows.
    fn per_row(dt: &Data, rows: &[usize], chunk: usize, bias: bool) -> (Vec<f32>, Vec<f32>) {
        let d = dt.d;
        let sub = Data {
            n: rows.len(),
            x: rows
                .iter()
                .flat_map(|&r| dt.x[r * d..(r + 1) * d].to_vec())
                .collect(),
            t: rows.iter().map(|&r| dt.t[r]).collect(),
            w: dt.w.clone(),
            b: dt.b.clone(),
            ..*dt
        };
        let (_, x, w, b) = rounded::<f32>(&sub);
        let weight = vec![1.0; dt.c];
        let base = problem(&sub, &x, &w, &b, &weight, chunk);
        let p = LinearCrossEntropy {
            reduction: Reduction::None,
            linear: Linear {
                linear_bias: bias.then_some(&b[..]),
                ..base.linear
            },
            ..base
        };
        let mut losses = vec![0.0f32; rows.len()];
        let mut gx = vec![0.0f32; x.len()];
        let mut gw = vec![0.0f32; w.len()];
        let mut gb = vec![0.0f32; b.len()];
        let grads = LinearGrads {
            input: &mut gx,
            linear_weight: &mut gw,
            linear_bias: bias.then_some(&mut gb[..]),
        };
        linear_cross_entropy(&p, GradOutput::Scalar(1.0), Some(grads), Some(&mut losses)).unwrap();
        (losses, gx)
    }

    #[test]
    fn a_rows_results_do_not_depend_on_the_batch_around_it() {
        // d = 259: a SIMD body and a tail; c = 1000 spans class blocks; large
        // enough to run on the pool
        let dt = data(40, 259, 1000, 1, 21);
        let d = dt.d;
        let all: Vec<usize> = (0..dt.n).collect();
        for bias in [false, true] {
            let (alone_l, alone_g) = per_row(&dt, &[17], 1, bias);
            for (rows, chunk) in [(&all[..], 1), (&all, 7), (&all, 512), (&all[10..30], 3)] {
                let at = rows.iter().position(|&r| r == 17).unwrap();
                for threads in [1, 2] {
                    let (l, g) =
                        threads::with_threads(threads, || per_row(&dt, rows, chunk, bias)).unwrap();
                    assert_eq!(l[at].to_bits(), alone_l[0].to_bits(), "loss, chunk {chunk}");
                    assert_eq!(&g[at * d..(at + 1) * d], &alone_g[..], "dx, chunk {chunk}");
                }
            }
        }
    }

    #[test]
    fn half_inputs_compute_in_f32() {
        let weight = vec![1.0; 50];
        let (dr, x, w, b) = rounded::<bf16>(&data(10, 16, 50, 1, 11));
        let (loss, dx, dw, _) = reference(&dr, &weight);
        let (l, gx, gw, _) = run_grads(&problem(&dr, &x, &w, &b, &weight, 3), bf16::ZERO);
        let l = l.unwrap();
        assert!((l - loss).abs() < 1e-5 * loss.abs().max(1.0));
        close("dx", &wide(&gx), &dx, 1e-2);
        close("dw", &wide(&gw), &dw, 1e-2);
    }

    #[test]
    fn weight_converted_block_by_block_matches_the_whole_copy() {
        // under test a block holds 4096 / (4 * 8) = 128 classes: 5 blocks
        let (n, d, c) = (9, 8, 4 * 128 + 37);
        let weight = vec![1.0; c];
        let (dt, x, w, b) = rounded::<bf16>(&data(n, d, c, 1, 13));
        let run = |limit: usize| {
            let mut p = problem(&dt, &x, &w, &b, &weight, 4);
            p.linear.max_weight_copy = limit;
            let (l, gx, gw, gb) = run_grads(&p, bf16::ZERO);
            (l.unwrap(), gx, gw, gb)
        };
        let whole = run(usize::MAX);
        let blocks = run(0);
        assert!((whole.0 - blocks.0).abs() <= 1e-6 * whole.0.abs());
        close("dx", &wide(&blocks.1), &wide(&whole.1), 1e-2);
        close("dw", &wide(&blocks.2), &wide(&whole.2), 1e-2);
        assert_eq!(whole.3, blocks.3);
    }

    #[test]
    fn errors_come_before_any_write() {
        let mut dt = data(6, 3, 4, 1, 5);
        dt.t[5] = 4; // out of range, in the last chunk
        let (_, x, w, b) = rounded::<f32>(&dt);
        let weight = vec![1.0; 4];
        let p = problem(&dt, &x, &w, &b, &weight, 1);
        let (e, dx, dw, db) = run_grads(&p, 7.0);
        assert!(matches!(
            e,
            Err(CeError::TargetOutOfBounds { position: 5, .. })
        ));
        assert!(dx.iter().chain(&dw).chain(&db).all(|&v| v == 7.0));
        let mut bad = p;
        bad.linear.linear_weight = &w[1..];
        assert!(linear_cross_entropy(&bad, GradOutput::Scalar(1.0), None, None).is_err());
    }

    #[test]
    fn token_stats_match_the_statistics_of_float64_logits() {
        use crate::stats::{token_stats, Upstream, Wanted};
        use crate::Io;
        let dt = data(11, 9, 40, 1, 17);
        let (dr, x, w, b) = rounded::<f32>(&dt);
        let (n, d, c) = (dr.n, dr.d, dr.c);
        let mut l = vec![0.0; n * c];
        for r in 0..n {
            for j in 0..c {
                let dot: f64 = (0..d).map(|k| dr.x[r * d + k] * dr.w[j * d + k]).sum();
                l[r * c + j] = dot + dr.b[j];
            }
        }
        let stats = TokenStats {
            batch: n,
            classes: c,
            spatial: 1,
            targets: Some(&dr.t),
            ignore_index: -100,
            temperature: 0.8,
            softcap: Some(5.0),
            top_k: 3,
            wanted: Wanted {
                lse: true,
                logprob: true,
                entropy: true,
                argmax: false,
                rank: false,
            },
        };
        let up = StatsGrad {
            logprob: Upstream::Scalar(1.0),
            entropy: Upstream::Scalar(0.5),
        };
        /// lse, logprob, entropy, top-k ids, top-k log-probs.
        type Outs<O> = (Vec<O>, Vec<O>, Vec<O>, Vec<i64>, Vec<O>);
        fn outs<O: Elem>(n: usize, k: usize) -> Outs<O> {
            let z = O::from_f64(0.0);
            (
                vec![z; n],
                vec![z; n],
                vec![z; n],
                vec![0; n * k],
                vec![z; n * k],
            )
        }
        fn view<O>(o: &mut Outs<O>) -> StatsOut<'_, O> {
            StatsOut {
                lse: Some(&mut o.0),
                logprob: Some(&mut o.1),
                entropy: Some(&mut o.2),
                argmax: None,
                rank: None,
                topk_ids: Some(&mut o.3),
                topk_logprobs: Some(&mut o.4),
            }
        }
        let mut want = outs::<f64>(n, 3);
        let mut dl = vec![0.0; n * c];
        token_stats(&stats, Io::Grad(&l, &mut dl), up, view(&mut want)).unwrap();
        let mut got = outs::<f32>(n, 3);
        let p = LinearTokenStats {
            linear: problem(&dr, &x, &w, &b, &[], 4).linear,
            stats,
        };
        let (mut gx, mut gw, mut gb) = (vec![0.0f32; n * d], vec![0.0f32; c * d], vec![0.0f32; c]);
        let grads = LinearGrads {
            input: &mut gx,
            linear_weight: &mut gw,
            linear_bias: Some(&mut gb),
        };
        linear_token_stats(&p, up, Some(grads), view(&mut got)).unwrap();
        close("lse", &wide(&got.0), &want.0, 1e-5);
        close("logprob", &wide(&got.1), &want.1, 1e-5);
        close("entropy", &wide(&got.2), &want.2, 1e-5);
        assert_eq!(got.3, want.3);
        let (mut dx, mut dw) = (vec![0.0; n * d], vec![0.0; c * d]);
        for r in 0..n {
            for j in 0..c {
                for k in 0..d {
                    dx[r * d + k] += dl[r * c + j] * dr.w[j * d + k];
                    dw[j * d + k] += dl[r * c + j] * dr.x[r * d + k];
                }
            }
        }
        close("dx", &wide(&gx), &dx, 1e-5);
        close("dw", &wide(&gw), &dw, 1e-5);
    }
}
