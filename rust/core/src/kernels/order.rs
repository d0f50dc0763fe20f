//! Order statistics of a row of logits: `argmax`, the `rank` of a class,
//! and the top-k, with ties to the lower index and NaN as the largest value
//! (numpy's and PyTorch's rules).
//!
//! One pass computes the maximum of each block of classes. The argmax is
//! the first block holding the row's maximum, then the first class in it.
//! The top-k starts from a threshold no class of the top-k can lie below:
//! the k-th largest block maximum (k blocks each hold a class at least that
//! large), and only the blocks whose maximum reaches it (about `k` of
//! them) are read again, vector by vector, to feed a heap the candidates. Rows holding a NaN
//! or `+inf` take an exact scalar path.

use crate::elem::{Elem, Real};
use crate::error::CeError;
use crate::simd::Lanes;
use std::cmp::Ordering;

/// Classes per block when only the argmax needs the block maxima.
const ARG_BLOCK: usize = 256;

/// Per-thread scratch of the order statistics.
pub(crate) struct OrderScratch<F> {
    block_max: Vec<F>,
    /// A copy of the block maxima, for selecting the k-th largest.
    sel: Vec<F>,
    /// The top-k candidates: a binary heap whose root is the worst kept.
    heap: Vec<(F, u32)>,
    /// The row's top-k, best first (the statistics kernel then replaces
    /// each value by the class's log-prob).
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

fn best_first<F: Real>(a: &(F, u32), b: &(F, u32)) -> Ordering {
    if worse(*b, *a) {
        Ordering::Less
    } else if worse(*a, *b) {
        Ordering::Greater
    } else {
        Ordering::Equal
    }
}

/// Whether the top-k is cheaper by selection over every class than by the
/// filtered heap (`k` a sizeable fraction of `c`).
fn selects_all(c: usize, k: usize) -> bool {
    k.saturating_mul(32) > c
}

/// Classes per block: small enough that there are about `4k` blocks (so the
/// k-th largest block maximum is a tight threshold), 16 to 256.
pub(crate) fn block_size(c: usize, k: usize) -> usize {
    if k == 0 {
        return ARG_BLOCK;
    }
    (c / (4 * k) / 16 * 16).clamp(16, ARG_BLOCK)
}

impl<F: Real> OrderScratch<F> {
    pub fn new() -> Self {
        OrderScratch {
            block_max: Vec::new(),
            sel: Vec::new(),
            heap: Vec::new(),
            top: Vec::new(),
        }
    }

    /// Reserves room for a row of `c` classes (fallibly).
    pub fn reserve(&mut self, c: usize, k: usize, argmax: bool) -> Result<(), CeError> {
        let fail = |_| {
            CeError::Resource(format!(
                "could not allocate the order scratch for {c} classes"
            ))
        };
        if argmax || k > 0 {
            let blocks = c.div_ceil(block_size(c, k));
            self.block_max.try_reserve_exact(blocks).map_err(fail)?;
            self.sel.try_reserve_exact(blocks).map_err(fail)?;
        }
        let heap = if selects_all(c, k) { c } else { 4 * k + 16 };
        self.heap.try_reserve_exact(heap.min(c)).map_err(fail)?;
        self.top.try_reserve_exact(k).map_err(fail)?;
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

    /// Keeps `v` if fewer than `k` are kept or it beats the worst kept.
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
        self.top.sort_unstable_by(best_first);
    }
}

/// The maximum of `x[lo..hi]` (vectors, then the one-lane tail).
#[inline(always)]
pub(crate) fn range_max<L: Lanes, T: Elem>(l: L, x: &[T], lo: usize, hi: usize) -> L::F {
    let body = lo + (hi - lo) / L::N * L::N;
    let (a, b) = (
        super::rows::max_of(l, x, lo, body),
        super::rows::max_of(l.tail(), x, body, hi),
    );
    if b > a {
        b
    } else {
        a
    }
}

/// The row's maximum, and the maximum of each block of `bs` classes into
/// `blocks`.
#[inline(always)]
pub(crate) fn max_by_blocks<L: Lanes, T: Elem>(
    l: L,
    x: &[T],
    bs: usize,
    blocks: &mut Vec<L::F>,
) -> L::F {
    blocks.clear();
    let mut m = L::F::NEG_INFINITY;
    for lo in (0..x.len()).step_by(bs) {
        let v = range_max(l, x, lo, (lo + bs).min(x.len()));
        blocks.push(v);
        if v > m {
            m = v;
        }
    }
    m
}

/// The number of classes with `x > v` (ordered: a NaN is never counted).
#[inline(always)]
pub(crate) fn count_above<L: Lanes, T: Elem>(l: L, x: &[T], v: L::F) -> i64 {
    let c = x.len();
    let body = c - c % L::N;
    let (vv, tl) = (l.splat(v), l.tail());
    let mut n = 0u64;
    let mut i = 0;
    while i < body {
        n += u64::from(l.count_gt(l.load(&x[i..]), vv));
        i += L::N;
    }
    for j in body..c {
        n += u64::from(tl.count_gt(tl.load(&x[j..]), tl.splat(v)));
    }
    n as i64
}

/// The first class holding `m`, found through the block maxima.
fn first_max<F: Real, T: Elem>(x: &[T], m: F, block_max: &[F], bs: usize) -> usize {
    let b = block_max.iter().position(|&v| v == m).unwrap_or(0);
    let lo = b * bs;
    let hi = (lo + bs).min(x.len());
    (lo..hi).find(|&i| F::from_elem(x[i]) == m).unwrap_or(lo)
}

/// Argmax and top-k of a row holding a NaN or `+inf`: scalar, exact.
fn scalar_order<F: Real, T: Elem>(x: &[T], k: usize, sc: &mut OrderScratch<F>) -> usize {
    let mut best = (F::from_elem(x[0]), 0u32);
    sc.heap.clear();
    for (i, &v) in x.iter().enumerate() {
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

/// `a` before `b` in a row without NaN: larger, or equal with a lower index.
fn regular_first<F: Real>(a: &(F, u32), b: &(F, u32)) -> Ordering {
    b.0.partial_cmp(&a.0)
        .unwrap_or(Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Keeps the best `k` of the candidates in `sc.heap` (unordered); returns
/// the worst kept value, a floor for later candidates.
fn prune<F: Real>(sc: &mut OrderScratch<F>, k: usize) -> F {
    sc.heap.select_nth_unstable_by(k - 1, regular_first);
    sc.heap.truncate(k);
    sc.heap[k - 1].0
}

/// The top-k of a row without NaN, best first, into `sc.top`.
///
/// Candidates (classes at or above a floor) are collected in `sc.heap`;
/// when it holds `4k` the best `k` are kept and the floor rises to the
/// worst of them. The floor starts at the k-th largest block maximum.
#[inline(always)]
fn top_k<L: Lanes, T: Elem>(l: L, x: &[T], k: usize, sc: &mut OrderScratch<L::F>) {
    sc.heap.clear();
    let c = x.len();
    if selects_all(c, k) || sc.block_max.len() < k {
        sc.heap.extend(
            x.iter()
                .enumerate()
                .map(|(i, &v)| (L::F::from_elem(v), i as u32)),
        );
    } else {
        // at least k classes are >= the k-th largest block maximum
        sc.sel.clear();
        sc.sel.extend_from_slice(&sc.block_max);
        let by_value = |a: &L::F, b: &L::F| b.partial_cmp(a).unwrap_or(Ordering::Equal);
        let mut floor = *sc.sel.select_nth_unstable_by(k - 1, by_value).1;
        let bs = block_size(c, k);
        for b in 0..sc.block_max.len() {
            // only a block whose maximum reaches the floor holds candidates
            if sc.block_max[b] < floor {
                continue;
            }
            let (lo, hi) = (b * bs, ((b + 1) * bs).min(c));
            let mut i = lo;
            while i <= hi {
                let end = if i + L::N <= hi { i + L::N } else { hi };
                // a vector whose every lane is below the floor is skipped
                let skip =
                    end - i == L::N && l.count_gt(l.splat(floor), l.load(&x[i..])) == L::N as u32;
                if !skip {
                    for (j, &v) in x[i..end].iter().enumerate() {
                        let v = L::F::from_elem(v);
                        if v >= floor {
                            sc.heap.push((v, (i + j) as u32));
                        }
                    }
                    if sc.heap.len() >= 4 * k {
                        floor = prune(sc, k);
                    }
                }
                if end == hi {
                    break;
                }
                i = end;
            }
        }
    }
    if sc.heap.len() > k {
        prune(sc, k);
    }
    sc.top.clear();
    sc.top.append(&mut sc.heap);
    sc.top.sort_unstable_by(regular_first);
}

/// What the order pass is asked for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OrderWant {
    pub argmax: bool,
    pub top_k: usize,
}

impl OrderWant {
    pub fn any(&self) -> bool {
        self.argmax || self.top_k > 0
    }
}

/// The argmax (0 when not wanted) of the logits `x`, and their top-k (left
/// in `sc.top`, best first). `regular`: the row holds no NaN and no `+inf`.
/// `m`: the row's maximum when the block maxima of `x` are already in the
/// scratch (computed with [`block_size`]), else None.
#[inline(always)]
pub(crate) fn order<L: Lanes, T: Elem>(
    l: L,
    x: &[T],
    regular: bool,
    m: Option<L::F>,
    want: OrderWant,
    sc: &mut OrderScratch<L::F>,
) -> usize {
    sc.top.clear();
    if !want.any() {
        return 0;
    }
    let mut argmax = 0;
    if !regular {
        argmax = scalar_order(x, want.top_k, sc);
        if want.top_k > 0 {
            sc.finish_top();
        }
    } else {
        let bs = block_size(x.len(), want.top_k);
        let m = match m {
            Some(m) => m,
            None => max_by_blocks(l, x, bs, &mut sc.block_max),
        };
        if want.argmax {
            argmax = first_max(x, m, &sc.block_max, bs);
        }
        if want.top_k > 0 {
            top_k(l, x, want.top_k, sc);
        }
    }
    argmax
}

/// The block maxima scratch, for a caller computing them in its own pass.
pub(crate) fn blocks<F>(sc: &mut OrderScratch<F>) -> &mut Vec<F> {
    &mut sc.block_max
}
