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
//! block of `ARG_BLOCK` classes when the argmax is wanted, so that finding
//! it reads one block); the exponentials and their sums; the rank and the
//! top-k (vectors with no lane above the running threshold are skipped);
//! the gradient, which computes the exponentials again (same bits).
//! A row holding a NaN or `+inf` takes a scalar path for argmax and top-k.

use super::rows::{exp_at, max_of};
use super::GradAccess;
use crate::elem::{Elem, Real};
use crate::error::CeError;
use crate::simd::Lanes;

/// The floor `d = z - m` is clamped to where it multiplies `e`: below it
/// `e = exp(d)` is exactly 0 in both compute types, so the clamp changes no
/// non-zero term, and a masked class (`d = -inf`) contributes `0 · D_FLOOR
/// = 0` instead of `0 · inf = NaN` (a floor this modest keeps `ge · d`
/// finite for any reasonable upstream gradient).
const D_FLOOR: f64 = -1.0e4;

/// Classes per block of the argmax search.
const ARG_BLOCK: usize = 256;

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

/// Per-thread scratch of the statistics.
pub(crate) struct Scratch<F> {
    block_max: Vec<F>,
    /// The top-k candidates: a binary heap whose root is the worst kept
    /// (smallest value; the highest index among equals).
    heap: Vec<(F, u32)>,
    /// The row's top-k, best first.
    pub top: Vec<(F, u32)>,
}

/// `a` ranks below `b`: smaller, or equal with a higher index (NaN largest).
#[inline(always)]
fn worse<F: Real>(a: (F, u32), b: (F, u32)) -> bool {
    match (a.0.is_nan(), b.0.is_nan()) {
        (true, true) => a.1 > b.1,
        (true, false) => false,
        (false, true) => true,
        (false, false) => a.0 < b.0 || (a.0 == b.0 && a.1 > b.1),
    }
}

impl<F: Real> Scratch<F> {
    pub fn new() -> Self {
        Scratch {
            block_max: Vec::new(),
            heap: Vec::new(),
            top: Vec::new(),
        }
    }

    /// Reserves room for a row of `c` classes (fallibly).
    pub fn reserve(&mut self, c: usize, k: usize, argmax: bool) -> Result<(), CeError> {
        let fail =
            |what: &str| CeError::Resource(format!("could not allocate {what} for {c} classes"));
        if argmax {
            self.block_max
                .try_reserve_exact(c.div_ceil(ARG_BLOCK))
                .map_err(|_| fail("the argmax blocks"))?;
        }
        self.heap
            .try_reserve_exact(k)
            .map_err(|_| fail("the top-k"))?;
        self.top
            .try_reserve_exact(k)
            .map_err(|_| fail("the top-k"))?;
        Ok(())
    }

    fn sift_down(&mut self, mut i: usize) {
        let h = &mut self.heap;
        loop {
            let (a, b) = (2 * i + 1, 2 * i + 2);
            let mut w = i;
            if a < h.len() && worse(h[a], h[w]) {
                w = a;
            }
            if b < h.len() && worse(h[b], h[w]) {
                w = b;
            }
            if w == i {
                return;
            }
            h.swap(i, w);
            i = w;
        }
    }

    fn push(&mut self, v: (F, u32)) {
        let h = &mut self.heap;
        h.push(v);
        let mut i = h.len() - 1;
        while i > 0 && worse(h[i], h[(i - 1) / 2]) {
            h.swap(i, (i - 1) / 2);
            i = (i - 1) / 2;
        }
    }

    /// Keeps `v` if it beats the worst of `k` kept.
    #[inline(always)]
    fn offer(&mut self, k: usize, v: (F, u32)) {
        if self.heap.len() < k {
            self.push(v);
        } else if worse(self.heap[0], v) {
            self.heap[0] = v;
            self.sift_down(0);
        }
    }

    /// Moves the kept candidates to `top`, best first.
    fn finish_top(&mut self) {
        self.top.clear();
        self.top.append(&mut self.heap);
        self.top.sort_unstable_by(|&a, &b| {
            if worse(b, a) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
    }
}

/// The maximum of `z[lo..hi]` (vectors, then the one-lane tail).
#[inline(always)]
fn range_max<L: Lanes, T: Elem>(l: L, z: &[T], lo: usize, hi: usize) -> L::F {
    let body = lo + (hi - lo) / L::N * L::N;
    let (a, b) = (max_of(l, z, lo, body), max_of(l.tail(), z, body, hi));
    if b > a {
        b
    } else {
        a
    }
}

/// `m`, and the maximum of each block when `blocks` is given.
#[inline(always)]
fn max_pass<L: Lanes, T: Elem>(l: L, z: &[T], blocks: Option<&mut Vec<L::F>>) -> L::F {
    let c = z.len();
    let Some(bm) = blocks else {
        return range_max(l, z, 0, c);
    };
    bm.clear();
    let mut m = L::F::NEG_INFINITY;
    for lo in (0..c).step_by(ARG_BLOCK) {
        let v = range_max(l, z, lo, (lo + ARG_BLOCK).min(c));
        bm.push(v);
        if v > m {
            m = v;
        }
    }
    m
}

/// `(s, Σ e·(-d))` (the second only when `entropy`), blocked like the loss
/// kernel's sums.
#[inline(always)]
fn exp_sums<L: Lanes, T: Elem>(
    l: L,
    z: &[T],
    lo: usize,
    hi: usize,
    m: L::F,
    entropy: bool,
) -> (L::F, L::F) {
    let n = L::N;
    let (zero, mv) = (l.splat(L::F::ZERO), l.splat(m));
    let floor = l.splat(L::F::from_f64(D_FLOOR));
    let (mut s, mut t) = (zero, zero);
    let mut b0 = lo;
    while b0 < hi {
        let b1 = (b0 + super::BLOCK * n).min(hi);
        let (mut bs, mut bt) = (zero, zero);
        let mut i = b0;
        while i + n <= b1 {
            let d = l.sub(l.load(&z[i..]), mv);
            let e = l.exp(d);
            bs = l.add(bs, e);
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
    (l.hsum(s), l.hsum(t))
}

/// The number of classes with `z > v` (ordered).
#[inline(always)]
fn count_above<L: Lanes, T: Elem>(l: L, z: &[T], v: L::F) -> i64 {
    let c = z.len();
    let body = c - c % L::N;
    let (vv, tl) = (l.splat(v), l.tail());
    let mut n = 0u64;
    let mut i = 0;
    while i < body {
        n += u64::from(l.count_gt(l.load(&z[i..]), vv));
        i += L::N;
    }
    for j in body..c {
        n += u64::from(tl.count_gt(tl.load(&z[j..]), tl.splat(v)));
    }
    n as i64
}

/// The first class holding `m` (finite or infinite, no NaN in the row),
/// found through the block maxima.
fn first_max<F: Real, T: Elem>(z: &[T], m: F, block_max: &[F]) -> usize {
    let b = block_max.iter().position(|&v| v == m).unwrap_or(0);
    let lo = b * ARG_BLOCK;
    let hi = (lo + ARG_BLOCK).min(z.len());
    (lo..hi).find(|&i| F::from_elem(z[i]) == m).unwrap_or(lo)
}

/// Argmax and top-k of a row holding a NaN (or `+inf`): scalar, exact.
fn scalar_order<F: Real, T: Elem>(z: &[T], k: usize, sc: &mut Scratch<F>) -> usize {
    let mut best = (F::from_elem(z[0]), 0u32);
    sc.heap.clear();
    for (i, &v) in z.iter().enumerate() {
        let cand = (F::from_elem(v), i as u32);
        if worse(best, cand) {
            best = cand;
        }
        if k > 0 {
            sc.offer(k, cand);
        }
    }
    best.1 as usize
}

/// Top-k of a row without NaN: the first `k` classes seed the heap; then
/// only vectors with a lane above the worst kept are looked at.
#[inline(always)]
fn top_k<L: Lanes, T: Elem>(l: L, z: &[T], k: usize, sc: &mut Scratch<L::F>) {
    sc.heap.clear();
    let c = z.len();
    let seed = k.min(c);
    for (i, &v) in z[..seed].iter().enumerate() {
        sc.offer(k, (L::F::from_elem(v), i as u32));
    }
    let mut i = seed;
    while i + L::N <= c {
        let v = l.load(&z[i..]);
        if l.count_gt(v, l.splat(sc.heap[0].0)) > 0 {
            for (j, &zj) in z.iter().enumerate().skip(i).take(L::N) {
                sc.offer(k, (L::F::from_elem(zj), j as u32));
            }
        }
        i += L::N;
    }
    for (j, &v) in z.iter().enumerate().skip(i) {
        sc.offer(k, (L::F::from_elem(v), j as u32));
    }
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
/// `(logprob, class)`, best first.
#[inline(always)]
pub(crate) fn row<L: Lanes, T: Elem>(
    l: L,
    r: Row<'_, T>,
    y: Option<usize>,
    want: Want,
    sc: &mut Scratch<L::F>,
) -> RowStats<L::F> {
    let (z, c) = (r.z, r.z.len());
    let body = c - c % L::N;
    let argmax_on_z = want.argmax && !r.mapped();
    let m = max_pass(l, z, argmax_on_z.then_some(&mut sc.block_max));
    let (s1, t1) = exp_sums(l, z, 0, body, m, want.entropy);
    let (s2, t2) = exp_sums(l.tail(), z, body, c, m, want.entropy);
    let (s, t) = (s1 + s2, t1 + t2);
    let ln_s = s.ln();
    let inv_s = L::F::ONE / s;
    // a row of -inf has lse -inf; one holding +inf has lse +inf
    let lse = if m == L::F::NEG_INFINITY || -m == L::F::NEG_INFINITY {
        m
    } else {
        m + ln_s
    };
    // s is NaN when a score is NaN (then so is its logit) or +inf
    let argmax = order_stats(l, r, m, !s.is_nan(), want, sc);
    let (logprob, rank) = match y {
        Some(y) => {
            let xy = L::F::from_elem(r.x[y]);
            let rank = if want.rank {
                count_above(l, r.x, xy)
            } else {
                0
            };
            ((L::F::from_elem(z[y]) - m) - ln_s, rank)
        }
        None => (L::F::ZERO, -1),
    };
    for v in sc.top.iter_mut() {
        v.0 = (L::F::from_elem(z[v.1 as usize]) - m) - ln_s;
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

/// The argmax (0 when not wanted) and the top-k (in `sc.top`, by logit) of
/// the row's logits; `m_z`: the scores' maximum; `regular`: no NaN and no
/// `+inf` among the scores.
#[inline(always)]
fn order_stats<L: Lanes, T: Elem>(
    l: L,
    r: Row<'_, T>,
    m_z: L::F,
    regular: bool,
    want: Want,
    sc: &mut Scratch<L::F>,
) -> usize {
    let mut argmax = 0;
    sc.top.clear();
    if !regular && (want.argmax || want.top_k > 0) {
        argmax = scalar_order(r.x, want.top_k, sc);
    } else {
        if want.argmax {
            let m = if r.mapped() {
                max_pass(l, r.x, Some(&mut sc.block_max))
            } else {
                m_z
            };
            argmax = first_max(r.x, m, &sc.block_max);
        }
        if want.top_k > 0 {
            top_k(l, r.x, want.top_k, sc);
        }
    }
    if want.top_k > 0 {
        sc.finish_top();
    }
    argmax
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
) {
    let gl = if y.is_some() { gl } else { L::F::ZERO };
    let a = ge * st.mu - gl;
    let body = c - c % L::N;
    grad_pass(l, acc, 0, body, st, a, ge);
    grad_pass(l.tail(), acc, body, c, st, a, ge);
    if let Some(y) = y {
        let e_y = exp_at(l, acc.x(0), body, y, st.m);
        let d_y = (L::F::from_elem(acc.x(y)[0]) - st.m).max_nan(L::F::from_f64(D_FLOOR));
        let g = e_y * st.inv_s * (a - ge * d_y) + gl;
        acc.g(y)[0] = g.to_elem();
    }
}

/// `G = e / s · (a - ge · max(d, D_FLOOR))` over `lo..hi`.
#[inline(always)]
fn grad_pass<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    acc: &mut A,
    lo: usize,
    hi: usize,
    st: &RowStats<L::F>,
    a: L::F,
    ge: L::F,
) {
    let (mv, inv, av, gev) = (l.splat(st.m), l.splat(st.inv_s), l.splat(a), l.splat(ge));
    let floor = l.splat(L::F::from_f64(D_FLOOR));
    let mut i = lo;
    while i + L::N <= hi {
        let d = l.sub(l.load(acc.x(i)), mv);
        let p = l.mul(l.exp(d), inv);
        let dc = l.max(d, floor);
        let g = l.mul(p, l.sub(av, l.mul(gev, dc)));
        l.store(g, acc.g(i));
        i += L::N;
    }
}
