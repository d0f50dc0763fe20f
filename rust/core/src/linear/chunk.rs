//! One chunk of rows of a fused linear problem: the forward (the logits
//! `X_c · Wᵀ (+ b)`, then the caller's step over them — the cross-entropy
//! or the statistics — in place) and the backward (`dX_c`, `dW`, `db`) from
//! those logits, which by then hold their gradient.

use super::bf16_dot::{self, Dot, Operands};
use super::gemm::{matmul, GemmReal, MatMut, MatRef};
use super::rowwise::{self, Rows};
use super::weight::{convert, widen_into, zeros, Weight};
use crate::ce::{Io, Logits};
use crate::elem::{same_type, same_type_mut, Elem};
use crate::error::CeError;
use crate::threads::PerThread;
use half::bf16;

/// What every chunk of one call shares.
pub(crate) struct Ctx<'a, T, G> {
    /// `(N, D)` rows and their probability targets `(N, C·S)`, if any.
    pub input: &'a [T],
    pub probs: Option<&'a [T]>,
    pub bias: Option<&'a [G]>,
    pub d: usize,
    /// `C · S`: logits per row.
    pub cs: usize,
    pub threads: usize,
    /// Where the logits come from bfloat16 dot products.
    pub dot: Option<DotInputs<'a>>,
}

/// The bfloat16 rows and weight of a call whose logits are bfloat16 dot
/// products (`bf16_dot.rs`).
#[derive(Clone, Copy)]
pub(crate) struct DotInputs<'a> {
    dot: Dot,
    input: &'a [bf16],
    weight: &'a [bf16],
}

impl<'a> DotInputs<'a> {
    /// `Some` for bfloat16 inputs computing in float32 (`G`) on a CPU with
    /// the dot products (and `FUSEDCE_SIMD` not capping them).
    pub fn new<T: Elem, G: Elem>(input: &'a [T], weight: &'a [T]) -> Option<Self> {
        same_type::<G, f32>(&[])?; // the compute type is f32
        Some(DotInputs {
            dot: Dot::new()?,
            input: same_type::<T, bf16>(input)?,
            weight: same_type::<T, bf16>(weight)?,
        })
    }
}

/// Whether a call needs its rows and weight in the compute type `G`: for
/// the float32-FMA logits, or for the backward (the bfloat16 dot products
/// read them as they are).
pub(crate) fn widened(dot: bool, grad: bool) -> bool {
    !dot || grad
}

/// What the chunk buffers are for.
#[derive(Clone, Copy)]
pub(crate) struct Needs {
    /// Rows, probabilities and `dX` need `G` copies.
    pub converts: bool,
    pub probs: bool,
    pub grad: bool,
    /// The logits are bfloat16 dot products.
    pub dot: bool,
}

/// Buffers reused by every chunk (reserved once, at their largest).
pub(crate) struct ChunkBufs<G> {
    logits: Vec<G>,
    x: Vec<G>,
    probs: Vec<G>,
    dx: Vec<G>,
    /// Each thread's packed weight panel (`rowwise::panel_len`), for the
    /// logits and the input gradient.
    panels: PerThread<Vec<G>>,
    /// The rows as bfloat16 pairs, and each thread's panel of the weight's
    /// pairs (`bf16_dot.rs`), when the logits are dot products.
    pairs: Vec<u32>,
    pair_panels: PerThread<Vec<u32>>,
}

impl<G: GemmReal + Default> ChunkBufs<G> {
    /// For chunks of `rows` rows of `d` features and `cs` logits each.
    pub fn reserve(
        (rows, d, cs): (usize, usize, usize),
        needs: Needs,
        threads: usize,
    ) -> Result<Self, CeError> {
        let Needs {
            converts,
            probs,
            grad,
            dot,
        } = needs;
        let conv = |len: usize, what: &str| {
            if converts {
                zeros(len, what)
            } else {
                Ok(Vec::new())
            }
        };
        Ok(ChunkBufs {
            logits: zeros(
                rows.saturating_mul(cs),
                "the logits chunk (rows x C x d1..dK)",
            )?,
            x: if widened(dot, grad) {
                conv(rows * d, "a converted chunk of input")?
            } else {
                Vec::new()
            },
            probs: if probs {
                conv(rows.saturating_mul(cs), "a converted chunk of target")?
            } else {
                Vec::new()
            },
            dx: if grad {
                conv(rows * d, "the chunk's input gradient")?
            } else {
                Vec::new()
            },
            panels: PerThread::new(threads, || {
                zeros(
                    if widened(dot, grad) {
                        rowwise::panel_len::<G>(d)
                    } else {
                        0
                    },
                    "a packed weight panel",
                )
            })?,
            pairs: zeros(
                if dot {
                    bf16_dot::packed_rows_len(rows, d)
                } else {
                    0
                },
                "the chunk's rows as bfloat16 pairs",
            )?,
            pair_panels: PerThread::new(threads, || {
                zeros(
                    if dot { bf16_dot::panel_len(d) } else { 0 },
                    "a packed weight panel",
                )
            })?,
        })
    }
}

/// Where the gradients go: the outputs, and accumulators in `G` (or `f64`
/// for the bias) where the outputs are of another type.
pub(crate) struct Grads<'g, T, G> {
    pub dx: &'g mut [T],
    dw: &'g mut [T],
    /// The weight gradient in `G` when `T` is not `G` (rounded into `dw` once).
    dw_acc: Vec<G>,
    db: Option<(&'g mut [T], Vec<f64>)>,
}

impl<'g, T: Elem, G: GemmReal + Default> Grads<'g, T, G> {
    pub fn new(dx: &'g mut [T], dw: &'g mut [T], db: Option<&'g mut [T]>) -> Result<Self, CeError> {
        let dw_acc = match same_type_mut::<T, G>(dw) {
            Some(out) => {
                crate::threads::for_pieces(out, ZERO_PIECE, |_, p| p.fill(G::ZERO));
                Vec::new()
            }
            None => zeros(dw.len(), "the weight-gradient accumulator")?,
        };
        let db = match db {
            Some(b) => {
                let acc = zeros(b.len(), "the bias-gradient accumulator")?;
                Some((b, acc))
            }
            None => None,
        };
        Ok(Grads { dx, dw, dw_acc, db })
    }

    fn dw(&mut self) -> &mut [G] {
        match same_type_mut::<T, G>(self.dw) {
            Some(out) => out,
            None => &mut self.dw_acc,
        }
    }

    /// Rounds the accumulators into the outputs.
    pub fn finish(self) {
        if same_type_mut::<T, G>(&mut *self.dw).is_none() {
            convert(&self.dw_acc, self.dw);
        }
        if let Some((out, acc)) = self.db {
            for (o, &v) in out.iter_mut().zip(&acc) {
                *o = T::from_f64(v);
            }
        }
    }
}

/// Runs rows `r0..r1`: their logits, then `on_logits` (which turns them
/// into their gradient in place when `grads` is given), then their
/// gradients into `grads`. Returns what `on_logits` returned. `weight` is
/// `None` only when the logits are dot products and there are no `grads`.
pub(crate) fn run<T: Elem, G: GemmReal + Default>(
    ctx: &Ctx<'_, T, G>,
    mut weight: Option<&mut Weight<'_, T, G>>,
    bufs: &mut ChunkBufs<G>,
    (r0, r1): (usize, usize),
    on_logits: &mut impl FnMut((usize, usize), Logits<'_, G>, Option<&[G]>) -> f64,
    grads: Option<&mut Grads<'_, T, G>>,
) -> f64 {
    let (d, cs, nr) = (ctx.d, ctx.cs, r1 - r0);
    let ChunkBufs {
        logits,
        x,
        probs,
        dx,
        panels,
        pairs,
        pair_panels,
    } = bufs;
    let l = &mut logits[..nr * cs];
    let dot = ctx.dot.zip(same_type_mut::<G, f32>(l));
    let x =
        widened(dot.is_some(), grads.is_some()).then(|| widen_into(&ctx.input[r0 * d..r1 * d], x));
    if let Some((inputs, l)) = dot {
        dot_logits(ctx, &inputs, (r0, r1), (pairs, pair_panels), l);
    } else if let (Some(w), Some(x)) = (weight.as_deref_mut(), x) {
        forward_logits(ctx, w, x, l, nr, panels);
    }
    let probs = ctx.probs.map(|t| widen_into(&t[r0 * cs..r1 * cs], probs));
    let io = if grads.is_some() {
        Io::InPlace(&mut *l)
    } else {
        Io::Forward(&*l)
    };
    let part = on_logits((r0, r1), io, probs);
    if let (Some(g), Some(w), Some(x)) = (grads, weight, x) {
        backward(ctx, w, x, l, (r0, r1), g, (dx, panels));
    }
    part
}

/// `l = x · Wᵀ (+ b)` for rows `r0..r1` by bfloat16 dot products, each row
/// by itself (`bf16_dot.rs`).
fn dot_logits<T: Elem, G: Elem>(
    ctx: &Ctx<'_, T, G>,
    inputs: &DotInputs<'_>,
    (r0, r1): (usize, usize),
    (pairs, panels): (&mut [u32], &PerThread<Vec<u32>>),
    l: &mut [f32],
) {
    let (d, cs) = (ctx.d, ctx.cs);
    let x = &mut pairs[..bf16_dot::packed_rows_len(r1 - r0, d)];
    bf16_dot::pack_rows(&inputs.input[r0 * d..r1 * d], d, x);
    let ops = Operands {
        x,
        rows: r1 - r0,
        w: inputs.weight,
        classes: cs,
        d,
        bias: ctx.bias.and_then(same_type::<G, f32>),
    };
    inputs.dot.logits(&ops, (l, cs), ctx.threads, panels);
}

/// `l = x · Wᵀ (+ b)` for the `nr` rows of `x`, each row by itself
/// (`rowwise.rs`: the same bits whatever the other rows).
fn forward_logits<T: Elem, G: GemmReal + Default>(
    ctx: &Ctx<'_, T, G>,
    weight: &mut Weight<'_, T, G>,
    x: &[G],
    l: &mut [G],
    nr: usize,
    panels: &PerThread<Vec<G>>,
) {
    let (d, cs) = (ctx.d, ctx.cs);
    weight.blocks(|j0, j1, w| {
        let bias = ctx.bias.map(|b| &b[j0..j1]);
        let at = j0.min(l.len());
        let xs = Rows {
            data: x,
            rows: nr,
            cols: d,
            ld: d,
        };
        let ws = Rows {
            data: w,
            rows: j1 - j0,
            cols: d,
            ld: d,
        };
        rowwise::logits(xs, ws, bias, (&mut l[at..], cs), ctx.threads, panels);
    });
}

/// From the chunk's logits gradient `dl`: `dX_c = dL · W`,
/// `dW += dLᵀ · X_c`, `db += Σ_rows dL` (in `f64`, rows in order).
fn backward<T: Elem, G: GemmReal + Default>(
    ctx: &Ctx<'_, T, G>,
    weight: &mut Weight<'_, T, G>,
    x: &[G],
    dl: &[G],
    (r0, r1): (usize, usize),
    grads: &mut Grads<'_, T, G>,
    (dx_buf, panels): (&mut [G], &PerThread<Vec<G>>),
) {
    let (d, cs, nr) = (ctx.d, ctx.cs, r1 - r0);
    let dl_m = MatRef::rows(dl, nr, cs, cs);
    let x_m = MatRef::rows(x, nr, d, d);
    let direct = same_type_mut::<T, G>(&mut grads.dx[r0 * d..r1 * d]).is_some();
    weight.blocks(|j0, j1, w| {
        let dx: &mut [G] = match same_type_mut::<T, G>(&mut grads.dx[r0 * d..r1 * d]) {
            Some(out) => out,
            None => &mut dx_buf[..nr * d],
        };
        let dl_block = &dl[j0.min(dl.len())..];
        let dls = Rows {
            data: dl_block,
            rows: nr,
            cols: j1 - j0,
            ld: cs,
        };
        let ws = Rows {
            data: w,
            rows: j1 - j0,
            cols: d,
            ld: d,
        };
        rowwise::input_grad(dls, ws, dx, j0 > 0, ctx.threads, panels);
        let dw = &mut grads.dw()[j0 * d..j1 * d];
        matmul(
            MatMut::rows(dw, j1 - j0, d, d),
            true,
            dl_m.cols(j0, j1).t(),
            x_m,
            ctx.threads,
        );
    });
    if !direct {
        convert(&dx_buf[..nr * d], &mut grads.dx[r0 * d..r1 * d]);
    }
    if let Some((_, db)) = grads.db.as_mut() {
        add_column_sums(db, dl, cs);
    }
}

const BIAS_PIECE: usize = 4096;

/// Values per piece when the weight-gradient accumulator is zeroed.
const ZERO_PIECE: usize = 1 << 16;

/// `acc[j] += Σ_rows dl[r, j]`, rows in order (pieces of columns in parallel).
fn add_column_sums<G: GemmReal>(acc: &mut [f64], dl: &[G], cs: usize) {
    if cs == 0 {
        return;
    }
    crate::threads::for_pieces(acc, BIAS_PIECE, |j, acc| {
        let j0 = j * BIAS_PIECE;
        let len = acc.len();
        for row in dl.chunks_exact(cs) {
            for (a, &v) in acc.iter_mut().zip(&row[j0..j0 + len]) {
                *a += v.to_f64();
            }
        }
    });
}
