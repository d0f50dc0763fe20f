//! `linear_cross_entropy`: logits = X·Wᵀ (+ b) followed by softmax
//! cross-entropy, fused and chunked over rows so that the `N x C` logits never
//! exist.
//!
//! Per chunk of `rows` rows:
//! 1. `L = X_c · Wᵀ (+ b)` into one reused buffer (`rows x C·S`, the compute
//!    type `G`), by a GEMM from the `gemm` crate (runtime-dispatched
//!    AVX-512 / AVX2+FMA / scalar micro-kernels);
//! 2. the fused cross-entropy kernel turns `L` into `dL` in place (or only
//!    reads it, for forward-only calls: then nothing below runs);
//! 3. `dX_c = dL · W`, `dW += dLᵀ · X_c`, `db += Σ_rows dL`.
//!
//! `G` is `f32` for `f32`, `f16` and `bf16` inputs (half inputs are widened
//! to `f32` once: the weight, and each chunk of rows) and `f64` for `f64`
//! inputs; callers may ask for `f64` for any input. The weight gradient of a
//! half input accumulates in `f32` and is rounded once at the end.
//!
//! K-dimensional problems (`W` of shape `(C, d1..dK, D)`) are the same GEMMs
//! with `W` viewed as `(C·S, D)`: each row of `L` is then laid out
//! `(C, d1..dK)`, which is exactly the cross-entropy kernel's `(N, C, S)`
//! layout with `N = rows`.
//!
//! Determinism: chunk boundaries depend on `rows` only; the GEMMs split their
//! output among threads without splitting any dot product, and the bias
//! gradient sums rows in order, so for a fixed chunk size the bits do not
//! depend on the thread count.

use crate::elem::{Elem, Real};
use crate::error::CeError;
use crate::simd::Compute;
use crate::softmax_ce::{
    check_len, check_outputs, cross_entropy, validate_problem, CrossEntropy, GradOutput, Logits,
    Reduction, Targets,
};
use crate::threads;
use gemm::Parallelism;
use rayon::prelude::*;
use std::any::TypeId;

/// A linear-then-cross-entropy problem. Arrays are C-contiguous.
#[derive(Clone, Copy)]
pub struct LinearCrossEntropy<'a, T> {
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
    /// Class indices `(N, d1..dK)` or probabilities `(N, C, d1..dK)`.
    pub targets: Targets<'a, T>,
    pub weight: Option<&'a [f64]>,
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub label_smoothing: f64,
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

/// Where the gradients go: shapes of `input`, `linear_weight`, `linear_bias`.
pub struct LinearGrads<'a, T> {
    pub input: &'a mut [T],
    pub linear_weight: &'a mut [T],
    pub linear_bias: Option<&'a mut [T]>,
}

/// A type the GEMM works in.
trait GemmReal: Real + Compute {}
impl GemmReal for f32 {}
impl GemmReal for f64 {}

/// `src` as a slice of `G` when `T` is `G` itself (no copy), else `None`.
fn same_type<T: Elem, G: Real>(src: &[T]) -> Option<&[G]> {
    if TypeId::of::<T>() == TypeId::of::<G>() {
        // SAFETY: T and G are the same type (equal TypeIds), so the pointer,
        // length and lifetime describe a valid &[G].
        Some(unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<G>(), src.len()) })
    } else {
        None
    }
}

fn same_type_mut<T: Elem, G: Real>(dst: &mut [T]) -> Option<&mut [G]> {
    if TypeId::of::<T>() == TypeId::of::<G>() {
        // SAFETY: as in `same_type`; the borrow of `dst` is moved into the result.
        Some(unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<G>(), dst.len()) })
    } else {
        None
    }
}

const CONVERT_PIECE: usize = 1 << 16;

fn reserve<G>(v: &mut Vec<G>, len: usize, what: &str) -> Result<(), CeError> {
    v.try_reserve_exact(len).map_err(|_| {
        CeError::Resource(format!(
            "could not allocate {what}: {} bytes; choose a smaller batch_chunk_size",
            len.saturating_mul(std::mem::size_of::<G>())
        ))
    })
}

/// `dst[i] = src[i]` converted, in parallel pieces.
fn convert<A: Elem, B: Elem>(src: &[A], dst: &mut [B]) {
    dst.par_chunks_mut(CONVERT_PIECE)
        .zip(src.par_chunks(CONVERT_PIECE))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d = B::from_f64(s.to_f64());
            }
        });
}

/// `src` in type `G`: borrowed when it already is, else converted into `buf`.
fn widen<'b, T: Elem, G: Real>(src: &'b [T], buf: &'b mut Vec<G>) -> &'b [G] {
    match same_type::<T, G>(src) {
        Some(s) => s,
        None => {
            buf.clear();
            buf.resize(src.len(), G::ZERO);
            if TypeId::of::<G>() == TypeId::of::<f32>() {
                // f32 from a half or f32: exact through to_f32.
                buf.par_chunks_mut(CONVERT_PIECE)
                    .zip(src.par_chunks(CONVERT_PIECE))
                    .for_each(|(d, s)| {
                        for (d, &s) in d.iter_mut().zip(s) {
                            *d = G::from_f32(s.to_f32());
                        }
                    });
            } else {
                convert(src, buf);
            }
            buf
        }
    }
}

/// Bytes of one converted weight block (when the weight is not kept whole);
/// small under test, so that unit tests cover many blocks.
const WEIGHT_BLOCK_BYTES: usize = if cfg!(test) { 4096 } else { 64 << 20 };

/// The weight in the compute type, whole or block by block of classes.
struct Weight<'a, T, G> {
    src: &'a [T],
    whole: Option<&'a [G]>,
    block: Vec<G>,
    /// Classes per block.
    rows: usize,
    /// Classes in all (C * d1..dK).
    classes: usize,
    d: usize,
}

impl<'a, T: Elem, G: Real> Weight<'a, T, G> {
    /// Calls `f(j0, j1, w)` for consecutive class ranges covering all
    /// classes, with `w` the weight rows `j0..j1` in type `G`.
    /// There is always at least one call (with `d == 0` or no classes the
    /// products still have to write their zeros or bias).
    fn blocks(&mut self, mut f: impl FnMut(usize, usize, &[G])) {
        let classes = self.classes;
        if let Some(w) = self.whole {
            f(0, classes, w);
            return;
        }
        if classes == 0 || self.d == 0 {
            f(0, classes, &[]);
            return;
        }
        let d = self.d;
        let mut j0 = 0;
        while j0 < classes {
            let j1 = (j0 + self.rows).min(classes);
            let w = widen::<T, G>(&self.src[j0 * d..j1 * d], &mut self.block);
            f(j0, j1, w);
            j0 = j1;
        }
    }
}

/// `dst = a · bᵀ`-style products through the `gemm` crate, with explicit
/// strides: `dst (m x n) = [dst +] lhs (m x k) · rhs (k x n)`.
#[allow(clippy::too_many_arguments)]
fn matmul<G: GemmReal>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [G],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[G],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[G],
    rhs_rs: usize,
    rhs_cs: usize,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(dst.len() > last(dst_rs, 1, m, n));
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(G::ZERO);
            }
        }
        return;
    }
    assert!(lhs.len() > last(lhs_rs, lhs_cs, m, k));
    assert!(rhs.len() > last(rhs_rs, rhs_cs, k, n));
    // SAFETY: the asserts above keep every element the GEMM touches inside
    // the three slices (the highest index of each is its (last, last)
    // element); dst is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            G::ONE,
            G::ONE,
            false,
            false,
            false,
            Parallelism::Rayon(threads),
        )
    }
}

/// Runs the fused linear cross-entropy. Returns the reduced loss for `mean`
/// and `sum` (NaN for `none`, whose per-sample losses go to `losses`).
/// Gradients are computed only when `grads` is given; `grad_output` is the
/// upstream gradient as for [`cross_entropy`].
///
/// Every argument is validated before anything is written.
pub fn linear_cross_entropy<T: Elem>(
    p: &LinearCrossEntropy<'_, T>,
    grad_output: GradOutput<'_>,
    grads: Option<LinearGrads<'_, T>>,
    losses: Option<&mut [T]>,
) -> Result<f64, CeError> {
    if p.acc_f64 || T::KIND == crate::elem::ElemKind::F64 {
        run::<T, f64>(p, grad_output, grads, losses)
    } else {
        run::<T, f32>(p, grad_output, grads, losses)
    }
}

fn run<T: Elem, G: GemmReal>(
    p: &LinearCrossEntropy<'_, T>,
    grad_output: GradOutput<'_>,
    grads: Option<LinearGrads<'_, T>>,
    mut losses: Option<&mut [T]>,
) -> Result<f64, CeError> {
    let (n, d, c, s) = (p.batch, p.in_features, p.classes, p.spatial);
    let cs = c * s;
    let samples = n * s;
    check_len("input", p.input.len(), n * d, "N * in_features")?;
    check_len(
        "linear_weight",
        p.linear_weight.len(),
        cs * d,
        "C * d1..dK * in_features",
    )?;
    if let Some(b) = p.linear_bias {
        check_len("linear_bias", b.len(), cs, "C * d1..dK")?;
    }
    if p.chunk_rows == 0 {
        return Err(CeError::invalid(
            "batch_chunk_size",
            "expected a positive number of rows per chunk, got 0",
        ));
    }
    if let Some(g) = &grads {
        check_len("grad_input", g.input.len(), n * d, "the input's size")?;
        check_len(
            "grad_linear_weight",
            g.linear_weight.len(),
            cs * d,
            "linear_weight's size",
        )?;
        match (&g.linear_bias, p.linear_bias) {
            (Some(gb), Some(_)) => {
                check_len("grad_linear_bias", gb.len(), cs, "linear_bias's size")?
            }
            (None, None) => {}
            _ => {
                return Err(CeError::invalid(
                    "grad_linear_bias",
                    "expected a bias gradient buffer exactly when linear_bias is given",
                ))
            }
        }
    }
    check_outputs(
        p.reduction,
        samples,
        losses.as_deref().map(<[T]>::len),
        grad_output,
    )?;
    let whole = CrossEntropy {
        batch: n,
        classes: c,
        spatial: s,
        targets: p.targets,
        weight: p.weight,
        ignore_index: p.ignore_index,
        reduction: p.reduction,
        label_smoothing: p.label_smoothing,
    };
    let denom = validate_problem(&whole)?;
    // Nothing has been written so far; from here on every call succeeds
    // (the chunks' targets were all checked above).

    let pool = threads::pool()?;
    let nthreads = pool.current_num_threads();
    let rows = p.chunk_rows.min(n.max(1));
    let converts = TypeId::of::<T>() != TypeId::of::<G>();
    pool.install(|| -> Result<f64, CeError> {
        // The large buffers are reserved up front, so that a chunk or weight
        // too large for this machine is an error, not an abort.
        let mut w_buf: Vec<G> = Vec::new();
        let mut dw_buf: Vec<G> = Vec::new();
        let mut logits: Vec<G> = Vec::new();
        let whole_copy = !converts || cs * d * std::mem::size_of::<G>() <= p.max_weight_copy;
        if converts && whole_copy {
            reserve(&mut w_buf, cs * d, "a float32 copy of linear_weight")?;
        }
        if converts && grads.is_some() {
            reserve(&mut dw_buf, cs * d, "the weight-gradient accumulator")?;
        }
        reserve(
            &mut logits,
            rows.saturating_mul(cs),
            "the logits chunk (rows x C x d1..dK)",
        )?;
        logits.resize(rows.saturating_mul(cs), G::ZERO);
        let mut weight = Weight {
            src: p.linear_weight,
            whole: if whole_copy {
                Some(widen::<T, G>(p.linear_weight, &mut w_buf))
            } else {
                None
            },
            block: Vec::new(),
            rows: (WEIGHT_BLOCK_BYTES / (d.max(1) * std::mem::size_of::<G>())).max(1),
            classes: cs,
            d,
        };
        let mut b_buf: Vec<G> = Vec::new();
        let bias = p.linear_bias.map(|b| widen::<T, G>(b, &mut b_buf));

        // Gradient accumulators: the outputs themselves when they are of
        // type G, else G buffers rounded into the outputs at the end.
        let want_grad = grads.is_some();
        let (mut gx, gw, gb) = match grads {
            Some(g) => (Some(g.input), Some(g.linear_weight), g.linear_bias),
            None => (None, None, None),
        };
        let mut db = if gb.is_some() {
            vec![0.0f64; cs]
        } else {
            Vec::new()
        };
        let mut gw_half: Option<&mut [T]> = None;
        let mut dw: Option<&mut [G]> = match gw {
            Some(gw) => Some(match same_type_mut::<T, G>(gw) {
                Some(out) => {
                    out.par_chunks_mut(CONVERT_PIECE)
                        .for_each(|c| c.fill(G::ZERO));
                    out
                }
                None => {
                    dw_buf.resize(cs * d, G::ZERO);
                    gw_half = Some(gw);
                    &mut dw_buf
                }
            }),
            None => None,
        };

        let mut x_buf: Vec<G> = Vec::new();
        let mut dx_buf: Vec<G> = Vec::new();
        let mut t_buf: Vec<G> = Vec::new();
        let mut loss_buf: Vec<G> = Vec::new();
        let g_scalar = match grad_output {
            GradOutput::Scalar(g) => g,
            GradOutput::PerSample(_) => 1.0,
        };
        let mut total = 0.0f64;

        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + rows).min(n);
            let nr = r1 - r0;
            let x = widen::<T, G>(&p.input[r0 * d..r1 * d], &mut x_buf);
            let l = &mut logits[..nr * cs];

            // 1. logits = x · Wᵀ (+ b)
            if let Some(b) = bias {
                l.par_chunks_mut(cs).for_each(|row| row.copy_from_slice(b));
            }
            weight.blocks(|j0, j1, w| {
                matmul(
                    nr,
                    j1 - j0,
                    d,
                    &mut l[j0..],
                    cs,
                    bias.is_some(),
                    x,
                    d,
                    1,
                    w,
                    1,
                    d,
                    nthreads,
                )
            });

            // 2. cross-entropy, gradient in place
            let targets = match p.targets {
                Targets::Index(t) => Targets::Index(&t[r0 * s..r1 * s]),
                Targets::Probs(t) => {
                    Targets::Probs(widen::<T, G>(&t[r0 * cs..r1 * cs], &mut t_buf))
                }
            };
            let chunk = CrossEntropy {
                batch: nr,
                classes: c,
                spatial: s,
                targets,
                weight: p.weight,
                ignore_index: p.ignore_index,
                reduction: if p.reduction == Reduction::None {
                    Reduction::None
                } else {
                    Reduction::Sum
                },
                label_smoothing: p.label_smoothing,
            };
            let go = match (p.reduction, grad_output) {
                (Reduction::Mean, _) => GradOutput::Scalar(g_scalar / denom),
                (_, GradOutput::PerSample(g)) => GradOutput::PerSample(&g[r0 * s..r1 * s]),
                (_, GradOutput::Scalar(g)) => GradOutput::Scalar(g),
            };
            let chunk_losses = if p.reduction == Reduction::None {
                loss_buf.resize(nr * s, G::ZERO);
                Some(&mut loss_buf[..nr * s])
            } else {
                None
            };
            let logits_io = if want_grad {
                Logits::InPlace(&mut *l)
            } else {
                Logits::Forward(&*l)
            };
            let part = cross_entropy::<G>(&chunk, logits_io, go, chunk_losses)?;
            if p.reduction == Reduction::None {
                if let Some(out) = losses.as_deref_mut() {
                    convert(&loss_buf[..nr * s], &mut out[r0 * s..r1 * s]);
                }
            } else {
                total += part;
            }

            // 3. gradients of x, W, b
            if let Some(gx) = gx.as_deref_mut() {
                let l = &*l;
                let dx_out = &mut gx[r0 * d..r1 * d];
                let direct = same_type_mut::<T, G>(&mut *dx_out).is_some();
                if !direct {
                    dx_buf.resize(nr * d, G::ZERO);
                }
                let mut dw = dw.as_deref_mut();
                weight.blocks(|j0, j1, w| {
                    // dX (nr x d) (+)= dL[:, j0..j1] · W[j0..j1]
                    let dx: &mut [G] = match same_type_mut::<T, G>(&mut *dx_out) {
                        Some(out) => out,
                        None => &mut dx_buf[..nr * d],
                    };
                    matmul(
                        nr,
                        d,
                        j1 - j0,
                        dx,
                        d,
                        j0 > 0,
                        &l[j0..],
                        cs,
                        1,
                        w,
                        d,
                        1,
                        nthreads,
                    );
                    // dW[j0..j1] (+)= dL[:, j0..j1]ᵀ · x (nr x d)
                    if let Some(dw) = dw.as_deref_mut() {
                        matmul(
                            j1 - j0,
                            d,
                            nr,
                            &mut dw[j0 * d..j1 * d],
                            d,
                            true,
                            &l[j0..],
                            1,
                            cs,
                            x,
                            d,
                            1,
                            nthreads,
                        );
                    }
                });
                if !direct {
                    convert(&dx_buf[..nr * d], dx_out);
                }
                if !db.is_empty() {
                    db.par_chunks_mut(BIAS_PIECE)
                        .enumerate()
                        .for_each(|(j, acc)| {
                            let j0 = j * BIAS_PIECE;
                            let len = acc.len();
                            for row in l.chunks_exact(cs) {
                                for (a, &v) in acc.iter_mut().zip(&row[j0..j0 + len]) {
                                    *a += v.to_f64();
                                }
                            }
                        });
                }
            }
            r0 = r1;
        }

        // (dw's borrow of dw_buf ends with its last use above)
        if let Some(out) = gw_half {
            convert(&dw_buf, out);
        }
        if let Some(gb) = gb {
            for (o, &v) in gb.iter_mut().zip(&db) {
                *o = T::from_f64(v);
            }
        }
        Ok(match p.reduction {
            Reduction::Mean => total / denom,
            Reduction::Sum => total,
            Reduction::None => f64::NAN,
        })
    })
}

const BIAS_PIECE: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;
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
            batch: dt.n,
            in_features: dt.d,
            classes: dt.c,
            spatial: dt.s,
            input: x,
            linear_weight: w,
            linear_bias: Some(b),
            targets: Targets::Index(&dt.t),
            weight: Some(weight),
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.1,
            chunk_rows: rows,
            acc_f64: false,
            max_weight_copy: usize::MAX,
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
        let mut gx = vec![fill; p.input.len()];
        let mut gw = vec![fill; p.linear_weight.len()];
        let mut gb = vec![fill; p.linear_bias.map_or(0, <[T]>::len)];
        let r = linear_cross_entropy(
            p,
            GradOutput::Scalar(1.0),
            Some(LinearGrads {
                input: &mut gx,
                linear_weight: &mut gw,
                linear_bias: p.linear_bias.map(|_| &mut gb[..]),
            }),
            None,
        );
        (r, gx, gw, gb)
    }

    fn run_f32(dt: &Data, weight: &[f64], rows: usize) -> (f64, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (_, x, w, b) = rounded::<f32>(dt);
        let (r, dx, dw, db) = run_grads(&problem(dt, &x, &w, &b, weight, rows), 0.0);
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
        threads::set_num_threads(1).unwrap();
        let one = run_f32(&dt, &weight, 128);
        for t in [2, 3] {
            threads::set_num_threads(t).unwrap();
            let many = run_f32(&dt, &weight, 128);
            assert_eq!(one.0.to_bits(), many.0.to_bits());
            assert!(one.1 == many.1 && one.2 == many.2 && one.3 == many.3);
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
            let p = LinearCrossEntropy {
                max_weight_copy: limit,
                ..problem(&dt, &x, &w, &b, &weight, 4)
            };
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
        let bad = LinearCrossEntropy {
            linear_weight: &w[1..],
            ..p
        };
        assert!(linear_cross_entropy(&bad, GradOutput::Scalar(1.0), None, None).is_err());
    }
}
