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

/// Classes per piece of a row. A row's maximum and sums are joined from
/// those of its pieces (`[j PIECE, (j + 1) PIECE)`, the last one shorter),
/// each taken on its own from its own maximum ([`Partial`]) and joined in
/// piece order ([`join`]). The pieces are fixed by `C` alone (a multiple of
/// every lane count), so a long row split across threads by its pieces
/// (`ce/long_rows.rs`) gives the bits it gives on one thread.
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

/// One piece's share of its row: its maximum, and its sums (and kept
/// exponentials) taken from its own `shift`: the maximum, or zero for a
/// piece whose maximum is -inf (its exponentials are 0 from any finite
/// shift, and its masked classes give `d = -inf`, as from the row's).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Partial<F> {
    pub max: F,
    pub shift: F,
    pub sums: Sums<F>,
}

impl<F: Real> Partial<F> {
    const EMPTY: Self = Partial {
        max: F::NEG_INFINITY,
        shift: F::ZERO,
        sums: Sums {
            s: F::ZERO,
            smooth: F::ZERO,
            pa: F::ZERO,
            pb: F::ZERO,
        },
    };

    /// `exp(shift - m)`, which brings the piece's exponentials to the row's
    /// maximum `m`: exactly 1 for the piece that holds `m` and for a piece
    /// of -inf (whose exponentials are 0). It is the lanes' own `exp`,
    /// inlined: a call into libm here made LLVM reload the constants of the
    /// passes' `exp` inside their loops (4-10% slower rows).
    #[inline(always)]
    fn factor<L: Lanes<F = F>>(&self, l: L, m: F) -> F {
        if self.max == m || self.max == F::NEG_INFINITY {
            F::ONE
        } else {
            let t = l.tail();
            t.hsum(t.exp(t.splat(self.shift - m)))
        }
    }

    /// The piece's sums from the row's maximum `m` (`j`: the piece's index):
    /// `s` times the factor; the sums of `d` moved by `shift - m` times
    /// their weights.
    #[inline(always)]
    fn sums_at<L: Lanes<F = F>>(&self, l: L, k: &Consts<F>, j: usize, m: F) -> Sums<F> {
        if self.max == m {
            return self.sums;
        }
        let (d, s) = (self.shift - m, self.sums);
        Sums {
            s: s.s * self.factor(l, m),
            smooth: if k.smooth {
                s.smooth + d * k.piece_w[j]
            } else {
                s.smooth
            },
            pa: s.pa,
            pb: s.pb + d * s.pa,
        }
    }
}

/// Where the exponentials' pass keeps the exponentials of a piece of a
/// row (`[0]` is the piece's first class).
pub(crate) enum Keep<'k, F> {
    /// Nowhere.
    No,
    /// In a buffer of their own: a scratch, or a separate gradient.
    Into(&'k mut [F]),
    /// Over the piece's logits, which the pass reads from the same buffer
    /// (a gradient in place, of a type that is its own compute type).
    Over(&'k mut [F]),
}

impl<'k, F> From<Option<&'k mut [F]>> for Keep<'k, F> {
    /// Into the buffer when there is one, else nowhere.
    fn from(b: Option<&'k mut [F]>) -> Self {
        b.map_or(Keep::No, Keep::Into)
    }
}

impl<F> Keep<'_, F> {
    /// The part of a row's keep for its classes `p` (`[0]` becomes class
    /// `p.0`).
    #[inline(always)]
    fn piece(&mut self, p: (usize, usize)) -> Keep<'_, F> {
        match self {
            Keep::No => Keep::No,
            Keep::Into(b) => Keep::Into(&mut b[p.0..p.1]),
            Keep::Over(b) => Keep::Over(&mut b[p.0..p.1]),
        }
    }

    #[inline(always)]
    fn reborrow(&mut self) -> Keep<'_, F> {
        match self {
            Keep::No => Keep::No,
            Keep::Into(b) => Keep::Into(b),
            Keep::Over(b) => Keep::Over(b),
        }
    }
}

/// The maximum of the piece `p` of the row `x`, or of the piece's logits
/// in `keep` when they lie there ([`Keep::Over`], the piece's own).
#[inline(always)]
pub(crate) fn piece_max_in<L: Lanes, T: Elem>(
    l: L,
    x: &[T],
    keep: &Keep<'_, L::F>,
    p: (usize, usize),
) -> L::F {
    match keep {
        Keep::Over(xs) => piece_max(l, &xs[..], (0, p.1 - p.0)),
        _ => piece_max(l, x, p),
    }
}

/// The partial of the piece `p` of the row `x`, whose maximum is `max`
/// ([`piece_max_in`]); its exponentials kept as `keep` says (the piece's
/// own; over its logits, `x` is not read).
#[inline(always)]
pub(crate) fn piece_partial<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &[T],
    probs: Option<&[T]>,
    (p, max): ((usize, usize), L::F),
    keep: Keep<'_, L::F>,
) -> Partial<L::F> {
    let shift = if max == L::F::NEG_INFINITY {
        L::F::ZERO
    } else {
        max
    };
    let sums = piece_sums(l, k, x, probs, p, shift, keep);
    Partial { max, shift, sums }
}

/// The row's maximum `m` (a NaN stays) and its sums from `m`, from its
/// pieces' partials, added in piece order. A row of one piece is its
/// piece's partial as it is.
#[inline(always)]
pub(crate) fn join<L: Lanes>(
    l: L,
    k: &Consts<L::F>,
    parts: &[Partial<L::F>],
) -> (L::F, Sums<L::F>) {
    let first = &parts[0];
    if parts.len() == 1 {
        return (first.max, first.sums);
    }
    let m = parts[1..].iter().fold(first.max, |a, p| a.max_nan(p.max));
    let mut sums = first.sums_at(l, k, 0, m);
    for (j, p) in parts.iter().enumerate().skip(1) {
        sums = sums.add(p.sums_at(l, k, j, m));
    }
    (m, sums)
}

#[inline(always)]
pub(crate) fn max_of<L: Lanes, T: Elem>(l: L, x: &[T], lo: usize, hi: usize) -> L::F {
    let n = L::N;
    let neg = l.splat(L::F::NEG_INFINITY);
    // four named accumulators, not an array: LLVM kept an array's on the
    // stack in some callers (a load and a store around every maximum)
    let (mut a0, mut a1, mut a2, mut a3) = (neg, neg, neg, neg);
    let mut quads = x[lo..hi].chunks_exact(4 * n);
    for q in &mut quads {
        a0 = l.max(a0, l.load(q));
        a1 = l.max(a1, l.load(&q[n..]));
        a2 = l.max(a2, l.load(&q[2 * n..]));
        a3 = l.max(a3, l.load(&q[3 * n..]));
    }
    for v in quads.remainder().chunks_exact(n) {
        a0 = l.max(a0, l.load(v));
    }
    l.hmax(l.max(l.max(a0, a1), l.max(a2, a3)))
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
/// `L::N`); keeps `e = exp(x - m)` of class `i` at `[i - base]` of the
/// buffer `keep` names (over the logits, reads them there, not in `x`).
/// The choices that hold for the whole pass are made here, once, so that
/// the loop runs without branches of its own.
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
    (keep, base): (Keep<'_, L::F>, usize),
) -> Sums<L::F> {
    let extra = k.smooth || probs.is_some();
    let pass = (x, probs, lo, hi, m);
    match (keep, extra) {
        (Keep::No, false) => exp_loop::<L, T, NONE, false>(l, k, pass, (&mut [], base)),
        (Keep::No, true) => exp_loop::<L, T, NONE, true>(l, k, pass, (&mut [], base)),
        (Keep::Into(b), false) => exp_loop::<L, T, INTO, false>(l, k, pass, (b, base)),
        (Keep::Into(b), true) => exp_loop::<L, T, INTO, true>(l, k, pass, (b, base)),
        (Keep::Over(b), false) => exp_loop::<L, T, OVER, false>(l, k, pass, (b, base)),
        (Keep::Over(b), true) => exp_loop::<L, T, OVER, true>(l, k, pass, (b, base)),
    }
}

/// [`exp_loop`]'s forms of [`Keep`].
const NONE: u8 = 0;
const INTO: u8 = 1;
const OVER: u8 = 2;

/// [`exp_pass`]'s loop: `KEEP`, where it keeps the exponentials (`NONE`,
/// `INTO` the buffer `kept`, or `OVER` the logits, which it then reads
/// from `kept`); `EXTRA`, whether it adds the sums of label smoothing or of
/// probability targets (else they stay zero).
#[inline(always)]
fn exp_loop<L: Lanes, T: Elem, const KEEP: u8, const EXTRA: bool>(
    l: L,
    k: &Consts<L::F>,
    (x, probs, lo, hi, m): (&[T], Option<&[T]>, usize, usize, L::F),
    (kept, base): (&mut [L::F], usize),
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
            let xv = if KEEP == OVER {
                l.load(&kept[i - base..])
            } else {
                l.load(&x[i..])
            };
            let d = l.sub(xv, mv);
            let e = l.exp(d);
            bs = l.add(bs, e);
            if KEEP != NONE {
                l.store(e, &mut kept[i - base..]);
            }
            if EXTRA && k.smooth {
                bsm = match w {
                    Some(w) => l.mul_add(l.load(&w[i..]), d, bsm),
                    None => l.add(bsm, d),
                };
            }
            if EXTRA && probs.is_some() {
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
/// exponentials kept as `keep` says (the piece's own: `[0]` is class `p.0`).
#[inline(always)]
fn piece_sums<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &[T],
    probs: Option<&[T]>,
    p: (usize, usize),
    m: L::F,
    mut keep: Keep<'_, L::F>,
) -> Sums<L::F> {
    let body = piece_body::<L>(p);
    let a = exp_pass(l, k, x, probs, p.0, body, m, (keep.reborrow(), p.0));
    a.add(exp_pass(l.tail(), k, x, probs, body, p.1, m, (keep, p.0)))
}

/// `exp(x_y - shift)` for a class target, from the shift of its piece of
/// the row's `parts` (as the passes compute it), else 0.
#[inline(always)]
pub(crate) fn target_exp<L: Lanes, T: Elem>(
    l: L,
    x: &[T],
    t: SampleTarget<L::F>,
    parts: &[Partial<L::F>],
) -> L::F {
    match t {
        SampleTarget::Class { y, .. } => {
            exp_at(l, x, x.len() - x.len() % L::N, y, parts[y / PIECE].shift)
        }
        _ => L::F::ZERO,
    }
}

/// The logit `x_y` of a class target (read before the passes, which may
/// keep the exponentials over the logits), else 0.
#[inline(always)]
pub(crate) fn target_logit<T: Elem, F: Real>(x: &[T], t: SampleTarget<F>) -> F {
    match t {
        SampleTarget::Class { y, .. } => F::from_elem(x[y]),
        _ => F::ZERO,
    }
}

/// The row's loss and gradient constants from its target's logit `x_y`
/// ([`target_logit`]), its maximum `m`, its sums and `e_y`
/// ([`target_exp`]).
#[inline(always)]
pub(crate) fn conclude<T: Elem, F: Real>(
    k: &Consts<F>,
    r: &RowIn<'_, T, F>,
    x_y: F,
    (m, sums): (F, Sums<F>),
    e_y: F,
) -> (F, GradConsts<F>) {
    let xy = match r.target {
        SampleTarget::Class { .. } => x_y - m,
        _ => F::ZERO,
    };
    let (loss, k1) = finish(k, r.target, xy, sums, m);
    let scale = sample_scale(r.target, r.scale);
    (loss, GradConsts { m, k1, scale, e_y })
}

/// The row's constants in the gradient pass.
#[derive(Clone, Copy)]
pub(crate) struct GradConsts<F> {
    m: F,
    k1: F,
    scale: F,
    /// `exp(x_y - shift)` of a class target, from its piece's shift.
    e_y: F,
}

impl<F: Real> GradConsts<F> {
    /// The constants of the piece `part` of the row, whose maximum is
    /// `self.m`: its exponentials are taken from its own shift, so `k1` is
    /// scaled by its factor.
    #[inline(always)]
    pub(crate) fn of_piece<L: Lanes<F = F>>(self, l: L, part: &Partial<F>) -> Self {
        GradConsts {
            m: part.shift,
            k1: self.k1 * part.factor(l, self.m),
            ..self
        }
    }
}

/// Where the gradient pass finds a row's exponentials, which the first
/// pass kept (the same bits as computed again).
#[derive(Clone, Copy)]
pub(crate) enum Exps<'e, F> {
    /// Nowhere: computed again from the logits.
    Again,
    /// In a scratch (`e[0]` is the first class of the row or piece).
    Kept(&'e [F]),
    /// In the gradient buffer, where the pass replaces each by its
    /// gradient ([`Io::keeps_exps_in_grad`]).
    InGrad,
}

impl<'e, F> Exps<'e, F> {
    /// In `scratch` when there is one, else computed again.
    #[inline(always)]
    pub(crate) fn in_scratch(scratch: Option<&'e [F]>) -> Self {
        scratch.map_or(Exps::Again, Exps::Kept)
    }

    /// The exponentials of the classes `p` of a row (`e[0]` becomes class `p.0`).
    #[inline(always)]
    pub(crate) fn piece(self, p: (usize, usize)) -> Self {
        match self {
            Exps::Kept(e) => Exps::Kept(&e[p.0..p.1]),
            other => other,
        }
    }
}

/// [`grad_loop`]'s forms of [`Exps`].
const AGAIN: u8 = 0;
const KEPT: u8 = 1;
const IN_GRAD: u8 = 2;

/// `g = scale * (e k1 - tw)` over `lo..hi` (a multiple of `L::N` long),
/// with `e` of class `i` from where `e` says (a scratch holds it at
/// `i - base`). As in [`exp_pass`], the choices that hold for the whole
/// pass are made once, outside the loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_pass<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    k: &Consts<L::F>,
    acc: &mut A,
    probs: Option<&[T]>,
    (e, base): (Exps<'_, L::F>, usize),
    lo: usize,
    hi: usize,
    gc: GradConsts<L::F>,
) {
    let has_tw = k.smooth || probs.is_some();
    let pass = (probs, lo, hi, gc);
    match (e, has_tw) {
        (Exps::Kept(e), false) => grad_loop::<L, T, A, KEPT, false>(l, k, acc, pass, (e, base)),
        (Exps::Kept(e), true) => grad_loop::<L, T, A, KEPT, true>(l, k, acc, pass, (e, base)),
        (Exps::InGrad, false) => grad_loop::<L, T, A, IN_GRAD, false>(l, k, acc, pass, (&[], 0)),
        (Exps::InGrad, true) => grad_loop::<L, T, A, IN_GRAD, true>(l, k, acc, pass, (&[], 0)),
        (Exps::Again, false) => grad_loop::<L, T, A, AGAIN, false>(l, k, acc, pass, (&[], 0)),
        (Exps::Again, true) => grad_loop::<L, T, A, AGAIN, true>(l, k, acc, pass, (&[], 0)),
    }
}

/// [`grad_pass`]'s loop: `FROM`, where the exponentials are (`KEPT` in
/// `e`, `IN_GRAD` in the gradient buffer, or computed `AGAIN`); `TW`,
/// whether there is a target weight `tw` (label smoothing or probability
/// targets; else it is zero).
#[inline(always)]
fn grad_loop<L: Lanes, T: Elem, A: GradAccess<T>, const FROM: u8, const TW: bool>(
    l: L,
    k: &Consts<L::F>,
    acc: &mut A,
    (probs, lo, hi, gc): (Option<&[T]>, usize, usize, GradConsts<L::F>),
    (e, base): (&[L::F], usize),
) {
    let (mv, k1v, sv) = (l.splat(gc.m), l.splat(gc.k1), l.splat(gc.scale));
    let mut i = lo;
    while i + L::N <= hi {
        let ev = match FROM {
            KEPT => l.load(&e[i - base..]),
            IN_GRAD => l.load(&*acc.g(i)),
            _ => l.exp(l.sub(l.load(acc.x(i)), mv)),
        };
        let p = l.mul(ev, k1v);
        let tw = if TW {
            target_weight(l, k, probs, i)
        } else {
            None
        };
        let gv = match tw {
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
/// class's own gradient when it lies in the piece. `gc`: the row's
/// constants, moved to the piece's partial `part`. `e`: where the piece's
/// exponentials are (a scratch's `e[0]` is class `p.0`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn piece_gradient<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    k: &Consts<L::F>,
    acc: &mut A,
    r: &RowIn<'_, T, L::F>,
    e: Exps<'_, L::F>,
    (gc, part): (GradConsts<L::F>, &Partial<L::F>),
    p: (usize, usize),
) {
    let gc = gc.of_piece(l, part);
    let body = piece_body::<L>(p);
    grad_pass(l, k, acc, r.probs, (e, p.0), p.0, body, gc);
    grad_pass(l.tail(), k, acc, r.probs, (e, p.0), body, p.1, gc);
    if let SampleTarget::Class { y, w_y } = r.target {
        if (p.0..p.1).contains(&y) {
            acc.g(y)[0] = target_grad(k, gc.e_y, gc.k1, w_y, gc.scale).to_elem();
        }
    }
}

/// Fills `parts` with the partials of the pieces of the row `x`, in order;
/// the exponentials kept as `keep` says (the row's: room for `C` values;
/// over the logits, `x` is not read). Every piece's maximum is taken first,
/// in one pass over the row, then every piece's sums: the order of the
/// passes over a row of one piece.
#[inline(always)]
fn fill_partials<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    (x, probs): (&[T], Option<&[T]>),
    parts: &mut [Partial<L::F>],
    mut keep: Keep<'_, L::F>,
) {
    // Loops, not closures: a closure may not be inlined into the caller's
    // target features, and the lanes' intrinsics must be.
    for (part, p) in parts.iter_mut().zip(pieces(k.classes)) {
        part.max = piece_max_in(l, x, &keep.piece(p), p);
    }
    for (part, p) in parts.iter_mut().zip(pieces(k.classes)) {
        *part = piece_partial(l, k, x, probs, (p, part.max), keep.piece(p));
    }
}

/// The gradient of every piece of a row whose pieces are `parts`.
#[inline(always)]
fn row_gradient<L: Lanes, T: Elem, A: GradAccess<T>>(
    l: L,
    k: &Consts<L::F>,
    acc: &mut A,
    r: &RowIn<'_, T, L::F>,
    e: Exps<'_, L::F>,
    gc: GradConsts<L::F>,
    parts: &[Partial<L::F>],
) {
    for (p, part) in pieces(k.classes).zip(parts) {
        piece_gradient(l, k, acc, r, e.piece(p), (gc, part), p);
    }
}

/// The row `x`'s loss and gradient constants, from the partials of its
/// pieces (into `parts`); the exponentials kept into `keep` (not over the
/// logits).
#[inline(always)]
fn row_partials<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &[T],
    r: &RowIn<'_, T, L::F>,
    parts: &mut [Partial<L::F>],
    keep: Option<&mut [L::F]>,
) -> (L::F, GradConsts<L::F>) {
    fill_partials(l, k, (x, r.probs), parts, Keep::from(keep));
    let e_y = target_exp(l, x, r.target, parts);
    conclude(k, r, target_logit(x, r.target), join(l, k, parts), e_y)
}

/// [`row_partials`] with the exponentials kept in `scratch` when there is
/// one (else computed again), and where the gradient pass finds them.
#[inline(always)]
fn row_partials_scratch<'s, L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &[T],
    r: &RowIn<'_, T, L::F>,
    parts: &mut [Partial<L::F>],
    scratch: &'s mut Option<&mut [L::F]>,
) -> (L::F, GradConsts<L::F>, Exps<'s, L::F>) {
    let (loss, gc) = row_partials(l, k, x, r, parts, scratch.as_deref_mut());
    (loss, gc, Exps::in_scratch(scratch.as_deref()))
}

/// [`row_partials`] with the exponentials kept over the logits `x`, which
/// are left holding them: `x_y` is read first, and `e_y` is the one kept.
#[inline(always)]
fn row_partials_over<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &mut [L::F],
    r: &RowIn<'_, T, L::F>,
    parts: &mut [Partial<L::F>],
) -> (L::F, GradConsts<L::F>) {
    let x_y = target_logit(x, r.target);
    fill_partials::<L, T>(l, k, (&[], r.probs), parts, Keep::Over(x));
    conclude(k, r, x_y, join(l, k, parts), target_logit(x, r.target))
}

/// Loss of one row; writes its gradient when `io` asks for one. The
/// exponentials are kept between the passes in the gradient buffer when it
/// is of the compute type (a separate gradient, or one over the logits),
/// else in `scratch` (room for `C` values) when given; else computed again
/// (same bits).
#[inline(always)]
pub(crate) fn row<L: Lanes, T: Elem<Acc = L::F>>(
    l: L,
    k: &Consts<L::F>,
    io: Logits<'_, T>,
    r: RowIn<'_, T, L::F>,
    mut scratch: Option<&mut [L::F]>,
) -> L::F {
    let c = k.classes;
    if matches!(r.target, SampleTarget::Ignored) && !io.wants_grad() {
        return L::F::ZERO;
    }
    // a row of one piece (most rows) keeps its partial on the stack
    let (mut one, mut many) = ([Partial::EMPTY], Vec::new());
    let parts: &mut [Partial<L::F>] = if c <= PIECE {
        &mut one
    } else {
        many.resize(c.div_ceil(PIECE), Partial::EMPTY);
        &mut many
    };
    match io {
        Io::Forward(x) => row_partials(l, k, &x[..c], &r, parts, None).0,
        Io::Grad(x, g) => {
            let x = &x[..c];
            let (loss, gc, e) = match T::as_acc_mut(&mut *g) {
                Some(ge) => {
                    let (loss, gc) = row_partials(l, k, x, &r, parts, Some(&mut ge[..c]));
                    (loss, gc, Exps::InGrad)
                }
                None => row_partials_scratch(l, k, x, &r, parts, &mut scratch),
            };
            row_gradient(l, k, &mut Separate(x, g), &r, e, gc, parts);
            loss
        }
        Io::InPlace(x) => {
            let x = &mut x[..c];
            let (loss, gc, e) = match T::as_acc_mut(&mut *x) {
                Some(xa) => {
                    let (loss, gc) = row_partials_over(l, k, xa, &r, parts);
                    (loss, gc, Exps::InGrad)
                }
                None => row_partials_scratch(l, k, x, &r, parts, &mut scratch),
            };
            row_gradient(l, k, &mut Same(x), &r, e, gc, parts);
            loss
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{Compute, Task};
    use crate::test_util::lcg;

    /// Where a row's gradient goes, and whether the call gives a scratch.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Form {
        Grad { scratch: bool },
        InPlace { scratch: bool },
    }

    /// One row's loss and gradient by [`row`] in the form `form`, as the
    /// bits of their float32 values.
    struct RowBits<'a, T> {
        k: &'a Consts<f32>,
        x: &'a [T],
        r: RowIn<'a, T, f32>,
        form: Form,
    }

    impl<T: Elem<Acc = f32>> Task<f32> for RowBits<'_, T> {
        type Output = Vec<u32>;
        fn run<L: Lanes<F = f32>>(self, l: L) -> Vec<u32> {
            let mut g = self.x.to_vec();
            let mut sc = vec![f32::NAN; self.x.len()];
            let (io, scratch) = match self.form {
                Form::Grad { scratch } => (Io::Grad(self.x, &mut g[..]), scratch),
                Form::InPlace { scratch } => (Io::InPlace(&mut g[..]), scratch),
            };
            let own = T::is_own_acc();
            let in_place = matches!(self.form, Form::InPlace { .. });
            assert_eq!(io.keeps_exps_in_grad(), own && !in_place);
            assert_eq!(io.keeps_exps_over_logits(), own && in_place);
            let loss = row(l, self.k, io, self.r, scratch.then_some(&mut sc[..]));
            std::iter::once(loss)
                .chain(g.iter().map(|v| v.to_f32()))
                .map(f32::to_bits)
                .collect()
        }
    }

    /// A row of several pieces, with each kind of target and option, with
    /// and without class weights, in float32 (`T`) and bfloat16: the bits
    /// of every form in `forms`.
    fn bits_of_forms<T: Elem<Acc = f32>>(forms: &[Form]) -> Vec<Vec<Vec<u32>>> {
        let c = 2 * PIECE + 37;
        let mut sd = 9;
        let x: Vec<T> = (0..c)
            .map(|_| T::from_f64(lcg(&mut sd) * 20.0 - 10.0))
            .collect();
        let probs: Vec<T> = (0..c)
            .map(|_| T::from_f64(lcg(&mut sd) / c as f64))
            .collect();
        let w: Vec<f64> = (0..c).map(|_| lcg(&mut sd) * 2.0).collect();
        let class = SampleTarget::Class {
            y: PIECE + 3,
            w_y: 0.7,
        };
        let mut out = Vec::new();
        for weight in [None, Some(&w[..])] {
            let cases = [
                (Consts::new(c, weight, 0.0, true, 0.0), class, None),
                (Consts::new(c, weight, 0.1, true, 0.0), class, None),
                (
                    Consts::new(c, weight, 0.2, false, 0.0),
                    SampleTarget::Probs,
                    Some(&probs[..]),
                ),
            ];
            for (k, target, probs) in &cases {
                let bits = |form| {
                    let r = RowIn {
                        target: *target,
                        probs: *probs,
                        scale: 0.5,
                    };
                    f32::dispatch(RowBits { k, x: &x, r, form })
                };
                out.push(forms.iter().map(|&f| bits(f)).collect());
            }
        }
        out
    }

    /// Every form of the exponentials' loop (keeping them nowhere, into a
    /// buffer, over the logits; with smoothing or probability sums or
    /// without) and of the gradient loop (from a scratch, the gradient
    /// buffer, or computed again; with a target weight or without) gives
    /// a row the same bits: float32 keeps them in its gradient, separate
    /// or in place; bfloat16 in a scratch, or nowhere.
    #[test]
    fn every_place_of_the_exponentials_gives_the_same_bits() {
        let f32_forms = [
            Form::Grad { scratch: false },
            Form::InPlace { scratch: false },
            Form::InPlace { scratch: true },
        ];
        let bf16_forms = [
            Form::Grad { scratch: true },
            Form::Grad { scratch: false },
            Form::InPlace { scratch: true },
            Form::InPlace { scratch: false },
        ];
        let f = bits_of_forms::<f32>(&f32_forms);
        let b = bits_of_forms::<half::bf16>(&bf16_forms);
        for (case, bits) in f.iter().chain(&b).enumerate() {
            assert!(bits[0].iter().all(|v| f32::from_bits(*v).is_finite()));
            for (form, other) in bits.iter().enumerate().skip(1) {
                assert!(other == &bits[0], "case {case}, form {form}");
            }
        }
    }
}
