//! Samples whose classes are contiguous in memory: `(N, C)` and `(C,)` inputs.

use super::{
    finish, sample_scale, target_grad, Consts, GradAccess, Same, SampleTarget, Separate, Sums,
};
use crate::ce::io::{Io, Logits};
use crate::elem::{Elem, Real};
use crate::simd::Lanes;

/// What one row is compared with, beyond its logits.
pub(crate) struct RowIn<'r, T, F> {
    pub target: SampleTarget<F>,
    /// The row's class probabilities, for `SampleTarget::Probs`.
    pub probs: Option<&'r [T]>,
    /// The upstream gradient of the row's loss.
    pub scale: F,
}

/// Classes per piece of a row. A row's maximum and sums are those of its
/// pieces (`[j PIECE, (j + 1) PIECE)`, the last one shorter), each taken on
/// its own and joined in piece order. The pieces are fixed by `C` alone (a
/// multiple of every lane count), so a long row split across threads by its
/// pieces (`ce/long_rows.rs`) gives the bits it gives on one thread.
pub(crate) const PIECE: usize = 1 << 14;

/// The pieces of a row of `c` classes, in order (one, empty, when `c = 0`).
pub(crate) fn pieces(c: usize) -> impl Iterator<Item = (usize, usize)> + Clone {
    (0..c.div_ceil(PIECE).max(1)).map(move |j| (j * PIECE, ((j + 1) * PIECE).min(c)))
}

/// Where the lanes of `L` stop in the piece `[lo, hi)` and its tail begins.
#[inline(always)]
fn piece_body<L: Lanes>((lo, hi): (usize, usize)) -> usize {
    lo + (hi - lo) / L::N * L::N
}

/// The maximum of the piece `p` of the row `x`.
#[inline(always)]
pub(crate) fn piece_max<L: Lanes, T: Elem>(l: L, x: &[T], p: (usize, usize)) -> L::F {
    let body = piece_body::<L>(p);
    let (m1, m2) = (max_of(l, x, p.0, body), max_of(l.tail(), x, body, p.1));
    if m2 > m1 {
        m2
    } else {
        m1
    }
}

/// The maximum of a row: its pieces' maxima joined in order (a NaN stays).
#[inline(always)]
fn row_max<L: Lanes, T: Elem>(l: L, x: &[T]) -> L::F {
    // Loops, not closures: a closure may not be inlined into the caller's
    // target features, and the lanes' intrinsics must be.
    let mut ps = pieces(x.len());
    let mut m = piece_max(l, x, ps.next().unwrap_or((0, 0)));
    for p in ps {
        m = m.max_nan(piece_max(l, x, p));
    }
    m
}

#[inline(always)]
pub(crate) fn max_of<L: Lanes, T: Elem>(l: L, x: &[T], lo: usize, hi: usize) -> L::F {
    let n = L::N;
    let neg = l.splat(L::F::NEG_INFINITY);
    let mut acc = [neg; 4];
    let mut i = lo;
    while i + 4 * n <= hi {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = l.max(*a, l.load(&x[i + j * n..]));
        }
        i += 4 * n;
    }
    while i + n <= hi {
        acc[0] = l.max(acc[0], l.load(&x[i..]));
        i += n;
    }
    l.hmax(l.max(l.max(acc[0], acc[1]), l.max(acc[2], acc[3])))
}

/// The weighted smoothed target `tw` of the classes at `i..i + L::N`
/// without the one-hot part: `w t'` for probabilities, `eps/C w` with
/// smoothing, `None` (zero) otherwise.
#[inline(always)]
fn target_weight<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    probs: Option<&[T]>,
    i: usize,
) -> Option<L::V> {
    let w = k.weight.as_deref();
    match probs {
        Some(t) => {
            let tp = l.mul_add(l.load(&t[i..]), l.splat(k.keep), l.splat(k.eps_c));
            Some(match w {
                Some(w) => l.mul(l.load(&w[i..]), tp),
                None => tp,
            })
        }
        None if k.smooth => Some(match w {
            Some(w) => l.mul(l.load(&w[i..]), l.splat(k.eps_c)),
            None => l.splat(k.eps_c),
        }),
        None => None,
    }
}

/// The sums of the second pass over `x[lo..hi]` (`hi - lo` a multiple of
/// `L::N`); stores `e = exp(x - m)` of class `i` into `scratch[i - base]`
/// when there is a scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn exp_pass<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &[T],
    probs: Option<&[T]>,
    lo: usize,
    hi: usize,
    m: L::F,
    (mut scratch, base): (Option<&mut [L::F]>, usize),
) -> Sums<L::F> {
    let n = L::N;
    let zero = l.splat(L::F::ZERO);
    let mv = l.splat(m);
    let w = k.weight.as_deref();
    // Blocked summation: partial sums over BLOCK vectors are added into the
    // totals, which keeps float32 rounding error small for any C.
    let (mut s, mut sm, mut pa, mut pb) = (zero, zero, zero, zero);
    let mut b0 = lo;
    while b0 < hi {
        let b1 = (b0 + super::BLOCK * n).min(hi);
        let (mut bs, mut bsm, mut bpa, mut bpb) = (zero, zero, zero, zero);
        let mut i = b0;
        while i + n <= b1 {
            let d = l.sub(l.load(&x[i..]), mv);
            let e = l.exp(d);
            bs = l.add(bs, e);
            if let Some(sc) = scratch.as_deref_mut() {
                l.store(e, &mut sc[i - base..]);
            }
            if k.smooth {
                bsm = match w {
                    Some(w) => l.mul_add(l.load(&w[i..]), d, bsm),
                    None => l.add(bsm, d),
                };
            }
            if probs.is_some() {
                let tw = target_weight(l, k, probs, i).unwrap_or(zero);
                bpa = l.add(bpa, tw);
                bpb = l.mul_add(tw, d, bpb);
            }
            i += n;
        }
        s = l.add(s, bs);
        sm = l.add(sm, bsm);
        pa = l.add(pa, bpa);
        pb = l.add(pb, bpb);
        b0 = b1;
    }
    Sums {
        s: l.hsum(s),
        smooth: l.hsum(sm),
        pa: l.hsum(pa),
        pb: l.hsum(pb),
    }
}

/// The sums of the piece `p` of the row `x` (see [`exp_pass`]); the
/// exponentials go to `scratch`, the piece's own (`scratch[0]` is class `p.0`).
#[inline(always)]
pub(crate) fn piece_sums<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &[T],
    probs: Option<&[T]>,
    p: (usize, usize),
    m: L::F,
    mut scratch: Option<&mut [L::F]>,
) -> Sums<L::F> {
    let body = piece_body::<L>(p);
    let a = exp_pass(l, k, x, probs, p.0, body, m, (scratch.as_deref_mut(), p.0));
    a.add(exp_pass(
        l.tail(),
        k,
        x,
        probs,
        body,
        p.1,
        m,
        (scratch, p.0),
    ))
}

/// `exp(x_y - m)` for a class target (as the passes compute it), else 0.
#[inline(always)]
pub(crate) fn target_exp<L: Lanes, T: Elem>(l: L, x: &[T], t: SampleTarget<L::F>, m: L::F) -> L::F {
    match t {
        SampleTarget::Class { y, .. } => exp_at(l, x, x.len() - x.len() % L::N, y, m),
        _ => L::F::ZERO,
    }
}

/// The row's loss and gradient constants from its maximum `m` and sums.
#[inline(always)]
pub(crate) fn conclude<T: Elem, F: Real>(
    k: &Consts<F>,
    r: &RowIn<'_, T, F>,
    x: &[T],
    m: F,
    sums: Sums<F>,
) -> (F, GradConsts<F>) {
    let xy = match r.target {
        SampleTarget::Class { y, .. } => F::from_elem(x[y]) - m,
        _ => F::ZERO,
    };
    let (loss, k1) = finish(k, r.target, xy, sums, m);
    let scale = sample_scale(r.target, r.scale);
    (loss, GradConsts { m, k1, scale })
}

/// The row's constants in the gradient pass.
#[derive(Clone, Copy)]
pub(crate) struct GradConsts<F> {
    m: F,
    k1: F,
    scale: F,
}

/// `g = scale * (e k1 - tw)` over `lo..hi` (a multiple of `L::N` long),
/// with `e` of class `i` from `e[i - base]` (a scratch) or computed again
/// from the logits.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_pass<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    k: &Consts<L::F>,
    acc: &mut A,
    probs: Option<&[T]>,
    (e, base): (Option<&[L::F]>, usize),
    lo: usize,
    hi: usize,
    gc: GradConsts<L::F>,
) {
    let (mv, k1v, sv) = (l.splat(gc.m), l.splat(gc.k1), l.splat(gc.scale));
    let mut i = lo;
    while i + L::N <= hi {
        let ev = match e {
            Some(e) => l.load(&e[i - base..]),
            None => l.exp(l.sub(l.load(acc.x(i)), mv)),
        };
        let p = l.mul(ev, k1v);
        let gv = match target_weight(l, k, probs, i) {
            Some(tw) => l.mul(sv, l.sub(p, tw)),
            None => l.mul(sv, p),
        };
        l.store(gv, acc.g(i));
        i += L::N;
    }
}

/// `exp(x[i] - m)` computed by the lanes that compute it in the passes
/// (a vector of `L` when `i` lies in the body, the tail's lane otherwise),
/// so that it has the same bits as there.
#[inline(always)]
pub(crate) fn exp_at<L: Lanes, T: Elem>(l: L, x: &[T], body: usize, i: usize, m: L::F) -> L::F {
    if i >= body {
        let tl = l.tail();
        return tl.hsum(tl.exp(tl.sub(tl.load(&x[i..]), tl.splat(m))));
    }
    let i0 = i - i % L::N;
    let mut lanes = [L::F::ZERO; 16];
    l.store(
        l.exp(l.sub(l.load(&x[i0..]), l.splat(m))),
        &mut lanes[..L::N],
    );
    lanes[i - i0]
}

/// The gradient of the piece `p` of a row: both passes, then the target
/// class's own gradient when it lies in the piece. `e`: the piece's
/// exponentials (`e[0]` is class `p.0`), or None to compute them again.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn piece_gradient<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    k: &Consts<L::F>,
    acc: &mut A,
    r: &RowIn<'_, T, L::F>,
    e: Option<&[L::F]>,
    gc: GradConsts<L::F>,
    e_y: L::F,
    p: (usize, usize),
) {
    let body = piece_body::<L>(p);
    grad_pass(l, k, acc, r.probs, (e, p.0), p.0, body, gc);
    grad_pass(l.tail(), k, acc, r.probs, (e, p.0), body, p.1, gc);
    if let SampleTarget::Class { y, w_y } = r.target {
        if (p.0..p.1).contains(&y) {
            acc.g(y)[0] = target_grad(k, e_y, gc.k1, w_y, gc.scale).to_elem();
        }
    }
}

/// The piece `p` of a row's scratch.
#[inline(always)]
fn piece_of<'s, F>(scratch: &'s mut Option<&mut [F]>, p: (usize, usize)) -> Option<&'s mut [F]> {
    scratch.as_deref_mut().map(|s| &mut s[p.0..p.1])
}

/// Loss of one row; writes its gradient when `io` asks for one. `scratch`
/// (room for `C` values) keeps the exponentials between the passes; without
/// it they are computed again (same bits).
#[inline(always)]
pub(crate) fn row<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    io: Logits<'_, T>,
    r: RowIn<'_, T, L::F>,
    scratch: Option<&mut [L::F]>,
) -> L::F {
    let c = k.classes;
    if matches!(r.target, SampleTarget::Ignored) && !io.wants_grad() {
        return L::F::ZERO;
    }
    let mut scratch = if io.wants_grad() { scratch } else { None };
    let (gc, loss, e_y) = {
        let x = &io.input()[..c];
        let m = row_max(l, x);
        let mut ps = pieces(c);
        let first = ps.next().unwrap_or((0, 0));
        let mut sums = piece_sums(l, k, x, r.probs, first, m, piece_of(&mut scratch, first));
        for p in ps {
            sums = sums.add(piece_sums(
                l,
                k,
                x,
                r.probs,
                p,
                m,
                piece_of(&mut scratch, p),
            ));
        }
        let e_y = target_exp(l, x, r.target, m);
        let (loss, gc) = conclude(k, &r, x, m, sums);
        (gc, loss, e_y)
    };
    let (e, whole) = (scratch.as_deref(), (0, c));
    match io {
        Io::Forward(_) => {}
        Io::Grad(x, g) => piece_gradient(l, k, &mut Separate(x, g), &r, e, gc, e_y, whole),
        Io::InPlace(x) => piece_gradient(l, k, &mut Same(x), &r, e, gc, e_y, whole),
    }
    loss
}
