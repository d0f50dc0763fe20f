//! Samples whose classes are contiguous in memory: `(N, C)` and `(C,)` inputs.

use super::{finish, Consts, SampleTarget};
use crate::elem::{Elem, Real};
use crate::simd::Lanes;

/// The logits of one row and where its gradient goes.
pub(crate) enum RowIo<'r, T> {
    Forward(&'r [T]),
    Grad(&'r [T], &'r mut [T]),
    InPlace(&'r mut [T]),
}

impl<T> RowIo<'_, T> {
    #[inline(always)]
    fn input(&self) -> &[T] {
        match self {
            RowIo::Forward(x) | RowIo::Grad(x, _) => x,
            RowIo::InPlace(x) => x,
        }
    }
}

#[inline(always)]
fn max_of<L: Lanes, T: Elem>(l: L, x: &[T]) -> L::F {
    let n = L::N;
    let neg = l.splat(L::F::NEG_INFINITY);
    let mut acc = [neg; 4];
    let mut i = 0;
    while i + 4 * n <= x.len() {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = l.max(*a, l.load(&x[i + j * n..]));
        }
        i += 4 * n;
    }
    while i + n <= x.len() {
        acc[0] = l.max(acc[0], l.load(&x[i..]));
        i += n;
    }
    l.hmax(l.max(l.max(acc[0], acc[1]), l.max(acc[2], acc[3])))
}

/// Sums of the second pass over `x` (length a multiple of `L::N`):
/// `[sum e, sum w d, sum w t', sum w t' d]` with `d = x - m`, `e = exp(d)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn exp_pass<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &[T],
    w: Option<&[L::F]>,
    t: Option<&[T]>,
    m: L::F,
    mut scratch: Option<&mut [L::F]>,
) -> [L::F; 4] {
    let n = L::N;
    let zero = l.splat(L::F::ZERO);
    let (mv, keep, eps_c) = (l.splat(m), l.splat(k.keep), l.splat(k.eps_c));
    // Blocked summation: partial sums over BLOCK elements are added into the
    // totals, which keeps float32 rounding error small for any C.
    let (mut s, mut sm, mut pa, mut pb) = (zero, zero, zero, zero);
    let mut lo = 0;
    while lo < x.len() {
        let hi = (lo + super::BLOCK * n).min(x.len());
        let (mut bs, mut bsm, mut bpa, mut bpb) = (zero, zero, zero, zero);
        let mut i = lo;
        while i + n <= hi {
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
            if let Some(t) = t {
                let tp = l.mul_add(l.load(&t[i..]), keep, eps_c);
                let tw = match w {
                    Some(w) => l.mul(l.load(&w[i..]), tp),
                    None => tp,
                };
                bpa = l.add(bpa, tw);
                bpb = l.mul_add(tw, d, bpb);
            }
            i += n;
        }
        s = l.add(s, bs);
        sm = l.add(sm, bsm);
        pa = l.add(pa, bpa);
        pb = l.add(pb, bpb);
        lo = hi;
    }
    [l.hsum(s), l.hsum(sm), l.hsum(pa), l.hsum(pb)]
}

/// `g = e * k1 - scale * (weighted smoothed target)` over a stretch whose
/// length is a multiple of `L::N`; the target class itself is fixed after.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_pass<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    g: &mut [T],
    e: &[L::F],
    w: Option<&[L::F]>,
    t: Option<&[T]>,
    k1: L::F,
    scale: L::F,
) {
    let n = L::N;
    let k1v = l.splat(k1);
    let (keep, eps_c) = (l.splat(k.keep), l.splat(k.eps_c));
    let neg_scale = l.splat(-scale);
    let neg_k2 = l.splat(-(scale * k.eps_c));
    let mut i = 0;
    while i + n <= g.len() {
        let ev = l.load(&e[i..]);
        let gv = match t {
            Some(t) => {
                let tp = l.mul_add(l.load(&t[i..]), keep, eps_c);
                let tw = match w {
                    Some(w) => l.mul(l.load(&w[i..]), tp),
                    None => tp,
                };
                l.mul_add(ev, k1v, l.mul(neg_scale, tw))
            }
            None => match w {
                Some(w) => l.mul_add(ev, k1v, l.mul(l.load(&w[i..]), neg_k2)),
                None => l.mul_add(ev, k1v, neg_k2),
            },
        };
        l.store(gv, &mut g[i..]);
        i += n;
    }
}

/// Loss of one row; writes its gradient when `io` asks for one.
/// `probs` holds the row's class probabilities when `target` is `Probs`;
/// `scratch` has room for `C` values when a gradient is wanted.
#[inline(always)]
pub(crate) fn row<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    io: RowIo<'_, T>,
    target: SampleTarget<L::F>,
    probs: Option<&[T]>,
    scale: L::F,
    scratch: &mut [L::F],
) -> L::F {
    let c = k.classes;
    let want_grad = !matches!(io, RowIo::Forward(_));
    let body = c - c % L::N;
    let tl = l.tail();
    let w = k.weight;
    let split_w = |lo: usize, hi: usize| w.map(|w| &w[lo..hi]);
    let split_t = |lo: usize, hi: usize| probs.map(|t| &t[lo..hi]);

    if let SampleTarget::Ignored = target {
        match io {
            RowIo::Forward(_) => {}
            RowIo::Grad(_, g) | RowIo::InPlace(g) => {
                g[..c].iter_mut().for_each(|v| *v = T::from_f32(0.0))
            }
        }
        return L::F::ZERO;
    }

    let (x_y_minus_m, sums) = {
        let x = &io.input()[..c];
        let m1 = max_of(l, &x[..body]);
        let m2 = max_of(tl, &x[body..]);
        let m = if m2 > m1 { m2 } else { m1 };
        let (sc_body, sc_tail) = if want_grad {
            let (a, b) = scratch[..c].split_at_mut(body);
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        let a = exp_pass(
            l,
            k,
            &x[..body],
            split_w(0, body),
            split_t(0, body),
            m,
            sc_body,
        );
        let b = exp_pass(
            tl,
            k,
            &x[body..],
            split_w(body, c),
            split_t(body, c),
            m,
            sc_tail,
        );
        let sums = [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]];
        let xy = match target {
            SampleTarget::Class { y, .. } => L::F::from_elem(x[y]) - m,
            _ => L::F::ZERO,
        };
        (xy, sums)
    };
    let (loss, k1) = finish(
        k,
        target,
        x_y_minus_m,
        sums[0],
        sums[1],
        sums[2],
        sums[3],
        scale,
    );

    let g = match io {
        RowIo::Forward(_) => return loss,
        RowIo::Grad(_, g) | RowIo::InPlace(g) => &mut g[..c],
    };
    let e = &scratch[..c];
    let (g_body, g_tail) = g.split_at_mut(body);
    grad_pass(
        l,
        k,
        g_body,
        &e[..body],
        split_w(0, body),
        split_t(0, body),
        k1,
        scale,
    );
    grad_pass(
        tl,
        k,
        g_tail,
        &e[body..],
        split_w(body, c),
        split_t(body, c),
        k1,
        scale,
    );
    if let SampleTarget::Class { y, w_y } = target {
        // The stretch wrote `e k1 - scale eps/C w_y` here; the target class
        // also carries `(1 - eps) w_y`.
        g[y] = (e[y] * k1 - scale * (w_y * (k.keep + k.eps_c))).to_elem();
    }
    loss
}
