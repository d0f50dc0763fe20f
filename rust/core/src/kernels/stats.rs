//! Per-token statistics of one contiguous row of scores `z` over `C`
//! classes, and the gradient of `gl · logprob + ge · entropy`.
//!
//! With `m = max z`, `d = z - m`, `e = exp(d)`, `s = Σ e`:
//! * `lse = m + ln s`, `logprob = d_y - ln s`;
//! * `entropy = ln s + Σ e·(-d) / s`: two non-negative terms, so no
//!   cancellation at any class count (`lse - Σ p z` loses two orders of
//!   magnitude in float32 at 50k classes). A class with `z = -inf` has
//!   `e = 0`; its `d` is clamped to [`D_FLOOR`] so that it
//!   contributes `0`, not `0 · inf`;
//! * `argmax`: the first class holding the maximum (a NaN counts as the
//!   largest); `rank`: classes with `z > z_y`; top-k: the `k` largest,
//!   ties to the lower index (NaN the largest, as PyTorch's `topk`). These
//!   three are taken on the logits `x` (the scores are a strictly increasing
//!   map of them, which rounding could make merely non-decreasing: a
//!   saturated `tanh` would turn distinct logits into ties).
//! * gradient: `G_c = p_c (ge (μ - d_c) - gl) + gl [c = y]`, with
//!   `p = e / s` and `μ = Σ p d = -(entropy - ln s)`.
//!
//! Passes over the row, all in cache: the maximum (with the maximum of each
//! block of classes when the order statistics need them, `order.rs`); the
//! exponentials and their sums; the rank and the top-k; the gradient, which
//! computes the exponentials again (same bits).

use super::order::{self, block_size, count_above, max_by_blocks, order, range_max, OrderWant};
use super::rows::exp_at;
use super::GradAccess;
use crate::elem::{Elem, Real};
use crate::simd::Lanes;

/// The floor `d = z - m` is clamped to where it multiplies `e`: below it
/// `e = exp(d)` is exactly 0 in both compute types, so the clamp changes no
/// non-zero term, and a masked class (`d = -inf`) contributes `0 · D_FLOOR
/// = 0` instead of `0 · inf = NaN` (a floor this modest keeps `ge · d`
/// finite for any reasonable upstream gradient).
const D_FLOOR: f64 = -1.0e4;

/// The statistics kernel's per-thread scratch (that of the order statistics).
pub(crate) type Scratch<F> = order::OrderScratch<F>;

/// What a row is asked for beyond `lse`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Want {
    pub entropy: bool,
    pub argmax: bool,
    pub rank: bool,
    pub top_k: usize,
}

/// The row's statistics (`logprob`/`rank` only with a target).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowStats<F> {
    pub lse: F,
    pub logprob: F,
    pub entropy: F,
    pub argmax: usize,
    pub rank: i64,
    /// What the gradient pass needs: `m`, `1 / s`, `μ`.
    pub m: F,
    pub inv_s: F,
    pub mu: F,
}

/// `(s, Σ e·(-d), n)` over `z[lo..hi]` (the second only when `entropy`;
/// `n`: how many scores are above `above`, when given), blocked like the
/// loss kernel's sums; `e` keeps the exponentials when given.
#[inline(always)]
fn exp_sums<L: Lanes, T: Elem>(
    l: L,
    z: &[T],
    (lo, hi): (usize, usize),
    m: L::F,
    entropy: bool,
    above: Option<L::F>,
    mut e_out: Option<&mut [L::F]>,
) -> (L::F, L::F, u64) {
    let n = L::N;
    let (zero, mv) = (l.splat(L::F::ZERO), l.splat(m));
    let floor = l.splat(L::F::from_f64(D_FLOOR));
    let av = l.splat(above.unwrap_or(L::F::ZERO));
    let (mut s, mut t, mut count) = (zero, zero, 0u64);
    let mut b0 = lo;
    while b0 < hi {
        let b1 = (b0 + super::BLOCK * n).min(hi);
        let (mut bs, mut bt) = (zero, zero);
        let mut i = b0;
        while i + n <= b1 {
            let zv = l.load(&z[i..]);
            if above.is_some() {
                count += u64::from(l.count_gt(zv, av));
            }
            let d = l.sub(zv, mv);
            let e = l.exp(d);
            bs = l.add(bs, e);
            if let Some(eo) = e_out.as_deref_mut() {
                l.store(e, &mut eo[i..]);
            }
            if entropy {
                // -d >= 0; a masked class (d = -inf) has e = 0: clamp d.
                let dc = l.max(d, floor);
                bt = l.mul_add(e, l.sub(zero, dc), bt);
            }
            i += n;
        }
        s = l.add(s, bs);
        t = l.add(t, bt);
        b0 = b1;
    }
    (l.hsum(s), l.hsum(t), count)
}

/// The row's two views: the scores `z` (for `lse`, `logprob`, `entropy`,
/// the gradient) and the logits `x` they are a strictly increasing map of
/// (for `argmax`, `rank`, top-k: ties are exact ties of the input). Without
/// a map they are one slice.
#[derive(Clone, Copy)]
pub(crate) struct Row<'r, T> {
    pub z: &'r [T],
    pub x: &'r [T],
}

impl<T> Row<'_, T> {
    fn mapped(&self) -> bool {
        !std::ptr::eq(self.z, self.x)
    }
}

/// The statistics of a row (`y`: the target class, if any and not
/// ignored). The top-k, when asked for, is left in `sc.top` as
/// `(logprob, class)`, best first. `e_out` (room for `C` values) keeps the
/// exponentials for [`gradient`].
#[inline(always)]
pub(crate) fn row<L: Lanes, T: Elem>(
    l: L,
    r: Row<'_, T>,
    y: Option<usize>,
    want: Want,
    sc: &mut Scratch<L::F>,
    e_out: Option<&mut [L::F]>,
) -> RowStats<L::F> {
    let (z, c) = (r.z, r.z.len());
    let body = c - c % L::N;
    let ow = OrderWant {
        argmax: want.argmax,
        top_k: want.top_k,
    };
    // without a score map the order pass can reuse this pass's block maxima
    let share = !r.mapped() && ow.any();
    let m = if share {
        max_by_blocks(l, z, block_size(c, ow.top_k), order::blocks(sc))
    } else {
        range_max(l, z, 0, c)
    };
    // without a score map the rank is counted in the same pass
    let x_y = y.map(|y| L::F::from_elem(r.x[y]));
    let fused_rank = x_y.filter(|_| want.rank && !r.mapped());
    let mut e_out = e_out;
    let (s1, t1, n1) = exp_sums(
        l,
        z,
        (0, body),
        m,
        want.entropy,
        fused_rank,
        e_out.as_deref_mut(),
    );
    let (s2, t2, n2) = exp_sums(l.tail(), z, (body, c), m, want.entropy, fused_rank, e_out);
    let (s, t) = (s1 + s2, t1 + t2);
    let ln_s = s.ln();
    let inv_s = L::F::ONE / s;
    // A row of -inf has lse -inf, one holding +inf has lse +inf, unless it
    // holds a NaN (the maximum skips NaN; s is NaN in all three cases).
    let lse = if m == L::F::NEG_INFINITY || -m == L::F::NEG_INFINITY {
        let nan = z.iter().any(|&v| L::F::from_elem(v).is_nan());
        if nan {
            s
        } else {
            m
        }
    } else {
        m + ln_s
    };
    // s is NaN when a score is NaN (then so is its logit) or +inf
    let argmax = order(l, r.x, !s.is_nan(), share.then_some(m), ow, sc);
    let (logprob, rank) = match (y, x_y) {
        (Some(y), Some(xy)) => {
            let rank = match (want.rank, fused_rank) {
                (false, _) => 0,
                (true, Some(_)) => (n1 + n2) as i64,
                (true, None) => count_above(l, r.x, xy),
            };
            (log_prob(L::F::from_elem(z[y]), m, ln_s, lse), rank)
        }
        _ => (L::F::ZERO, -1),
    };
    for v in sc.top.iter_mut() {
        v.0 = log_prob(L::F::from_elem(z[v.1 as usize]), m, ln_s, lse);
    }
    RowStats {
        lse,
        logprob,
        entropy: ln_s + t * inv_s,
        argmax,
        rank,
        m,
        inv_s,
        mu: L::F::ZERO - t * inv_s,
    }
}

/// `log p` of the score `zc`: `(zc - m) - ln s`, which keeps the digits of
/// `zc - m`; in a row holding `+inf` (where `s` is NaN) `zc - lse`, as
/// PyTorch's `log_softmax` (`-inf` for a finite score, NaN for `+inf`).
#[inline(always)]
fn log_prob<F: Real>(zc: F, m: F, ln_s: F, lse: F) -> F {
    if -m == F::NEG_INFINITY {
        zc - lse
    } else {
        (zc - m) - ln_s
    }
}

/// Writes the gradient of `gl · logprob + ge · entropy` with respect to the
/// row's scores through `acc` (`y`: the target, whose log-prob counts).
#[inline(always)]
pub(crate) fn gradient<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    acc: &mut A,
    c: usize,
    y: Option<usize>,
    st: &RowStats<L::F>,
    (gl, ge): (L::F, L::F),
    e: Option<&[L::F]>,
) {
    let gl = if y.is_some() { gl } else { L::F::ZERO };
    let a = ge * st.mu - gl;
    let body = c - c % L::N;
    // the target's own gradient, from its score read before the passes
    // write (in place they overwrite the scores)
    let own = y.map(|y| {
        let e_y = match e {
            Some(e) => e[y],
            None => exp_at(l, acc.x(0), body, y, st.m),
        };
        let d_y = (L::F::from_elem(acc.x(y)[0]) - st.m).max_nan(L::F::from_f64(D_FLOOR));
        (y, e_y * st.inv_s * (a - ge * d_y) + gl)
    });
    grad_pass(l, acc, (0, body), st, (a, ge), e);
    grad_pass(l.tail(), acc, (body, c), st, (a, ge), e);
    if let Some((y, g)) = own {
        acc.g(y)[0] = g.to_elem();
    }
}

/// `G = e / s · (a - ge · max(d, D_FLOOR))` over `lo..hi`, with `e` kept
/// by the sums' pass or computed again (the same instructions: same bits).
#[inline(always)]
fn grad_pass<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    acc: &mut A,
    (lo, hi): (usize, usize),
    st: &RowStats<L::F>,
    (a, ge): (L::F, L::F),
    e: Option<&[L::F]>,
) {
    let (mv, inv, av, gev) = (l.splat(st.m), l.splat(st.inv_s), l.splat(a), l.splat(ge));
    let floor = l.splat(L::F::from_f64(D_FLOOR));
    let mut i = lo;
    while i + L::N <= hi {
        let d = l.sub(l.load(acc.x(i)), mv);
        let ev = match e {
            Some(e) => l.load(&e[i..]),
            None => l.exp(d),
        };
        let p = l.mul(ev, inv);
        let dc = l.max(d, floor);
        let g = l.mul(p, l.sub(av, l.mul(gev, dc)));
        l.store(g, acc.g(i));
        i += L::N;
    }
}
