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
/// `L::N`); stores `e = exp(x - m)` into `scratch` when there is one.
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
    mut scratch: Option<&mut [L::F]>,
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
                l.store(e, &mut sc[i..]);
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

/// The row's constants in the gradient pass.
#[derive(Clone, Copy)]
struct GradConsts<F> {
    m: F,
    k1: F,
    scale: F,
}

/// `g = scale * (e k1 - tw)` over `lo..hi` (a multiple of `L::N` long),
/// with `e` from the scratch row or computed again from the logits.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_pass<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    k: &Consts<L::F>,
    acc: &mut A,
    probs: Option<&[T]>,
    e: Option<&[L::F]>,
    lo: usize,
    hi: usize,
    gc: GradConsts<L::F>,
) {
    let (mv, k1v, sv) = (l.splat(gc.m), l.splat(gc.k1), l.splat(gc.scale));
    let mut i = lo;
    while i + L::N <= hi {
        let ev = match e {
            Some(e) => l.load(&e[i..]),
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

/// Both gradient passes and the target class's own gradient.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gradient<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    k: &Consts<L::F>,
    acc: &mut A,
    r: &RowIn<'_, T, L::F>,
    e: Option<&[L::F]>,
    gc: GradConsts<L::F>,
    e_y: L::F,
) {
    let c = k.classes;
    let body = c - c % L::N;
    grad_pass(l, k, acc, r.probs, e, 0, body, gc);
    grad_pass(l.tail(), k, acc, r.probs, e, body, c, gc);
    if let SampleTarget::Class { y, w_y } = r.target {
        acc.g(y)[0] = target_grad(k, e_y, gc.k1, w_y, gc.scale).to_elem();
    }
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
    let body = c - c % L::N;
    let tl = l.tail();
    if matches!(r.target, SampleTarget::Ignored) && !io.wants_grad() {
        return L::F::ZERO;
    }
    let mut scratch = if io.wants_grad() { scratch } else { None };
    let (gc, loss, e_y) = {
        let x = &io.input()[..c];
        let (m1, m2) = (max_of(l, x, 0, body), max_of(tl, x, body, c));
        let m = if m2 > m1 { m2 } else { m1 };
        let sums = exp_pass(l, k, x, r.probs, 0, body, m, scratch.as_deref_mut());
        let sums = sums.add(exp_pass(
            tl,
            k,
            x,
            r.probs,
            body,
            c,
            m,
            scratch.as_deref_mut(),
        ));
        let (xy, e_y) = match r.target {
            SampleTarget::Class { y, .. } => (L::F::from_elem(x[y]) - m, exp_at(l, x, body, y, m)),
            _ => (L::F::ZERO, L::F::ZERO),
        };
        let (loss, k1) = finish(k, r.target, xy, sums, m);
        let gc = GradConsts {
            m,
            k1,
            scale: sample_scale(r.target, r.scale),
        };
        (gc, loss, e_y)
    };
    let e = scratch.as_deref();
    match io {
        Io::Forward(_) => {}
        Io::Grad(x, g) => gradient(l, k, &mut Separate(x, g), &r, e, gc, e_y),
        Io::InPlace(x) => gradient(l, k, &mut Same(x), &r, e, gc, e_y),
    }
    loss
}
