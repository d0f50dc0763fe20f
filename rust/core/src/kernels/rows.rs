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

/// The partial of the piece `p` of the row `x`, whose maximum is `max`
/// ([`piece_max`]); its exponentials go to `scratch`, the piece's own
/// (`scratch[0]` is class `p.0`), when given.
#[inline(always)]
pub(crate) fn piece_partial<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &[T],
    probs: Option<&[T]>,
    (p, max): ((usize, usize), L::F),
    scratch: Option<&mut [L::F]>,
) -> Partial<L::F> {
    let shift = if max == L::F::NEG_INFINITY {
        L::F::ZERO
    } else {
        max
    };
    let sums = piece_sums(l, k, x, probs, p, shift, scratch);
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
/// `L::N`); stores `e = exp(x - m)` of class `i` into `scratch[i - base]`
/// when there is a scratch. The choices that hold for the whole pass are
/// made here, once, so that the loop runs without branches of its own.
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
    (scratch, base): (Option<&mut [L::F]>, usize),
) -> Sums<L::F> {
    let extra = k.smooth || probs.is_some();
    let pass = (x, probs, lo, hi, m);
    match (scratch, extra) {
        (Some(sc), false) => exp_loop::<L, T, true, false>(l, k, pass, (sc, base)),
        (Some(sc), true) => exp_loop::<L, T, true, true>(l, k, pass, (sc, base)),
        (None, false) => exp_loop::<L, T, false, false>(l, k, pass, (&mut [], base)),
        (None, true) => exp_loop::<L, T, false, true>(l, k, pass, (&mut [], base)),
    }
}

/// [`exp_pass`]'s loop: `KEEP`, whether it stores the exponentials into
/// `scratch`; `EXTRA`, whether it adds the sums of label smoothing or of
/// probability targets (else they stay zero).
#[inline(always)]
fn exp_loop<L: Lanes, T: Elem, const KEEP: bool, const EXTRA: bool>(
    l: L,
    k: &Consts<L::F>,
    (x, probs, lo, hi, m): (&[T], Option<&[T]>, usize, usize, L::F),
    (scratch, base): (&mut [L::F], usize),
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
            if KEEP {
                l.store(e, &mut scratch[i - base..]);
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
/// exponentials go to `scratch`, the piece's own (`scratch[0]` is class `p.0`).
#[inline(always)]
fn piece_sums<L: Lanes, T: Elem>(
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

/// The row's loss and gradient constants from its maximum `m`, its sums
/// and `e_y` ([`target_exp`]).
#[inline(always)]
pub(crate) fn conclude<T: Elem, F: Real>(
    k: &Consts<F>,
    r: &RowIn<'_, T, F>,
    x: &[T],
    (m, sums): (F, Sums<F>),
    e_y: F,
) -> (F, GradConsts<F>) {
    let xy = match r.target {
        SampleTarget::Class { y, .. } => F::from_elem(x[y]) - m,
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

/// The piece `p` of a row's scratch.
#[inline(always)]
fn piece_of<'s, F>(scratch: &'s mut Option<&mut [F]>, p: (usize, usize)) -> Option<&'s mut [F]> {
    scratch.as_deref_mut().map(|s| &mut s[p.0..p.1])
}

/// Fills `parts` with the partials of the pieces of the row `x`, in order;
/// the exponentials into `scratch` (room for `C` values) when given. Every
/// piece's maximum is taken first, in one pass over the row, then every
/// piece's sums: the order of the passes over a row of one piece.
#[inline(always)]
fn fill_partials<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    (x, probs): (&[T], Option<&[T]>),
    parts: &mut [Partial<L::F>],
    mut scratch: Option<&mut [L::F]>,
) {
    // Loops, not closures: a closure may not be inlined into the caller's
    // target features, and the lanes' intrinsics must be.
    for (part, p) in parts.iter_mut().zip(pieces(x.len())) {
        part.max = piece_max(l, x, p);
    }
    for (part, p) in parts.iter_mut().zip(pieces(x.len())) {
        let sc = piece_of(&mut scratch, p);
        *part = piece_partial(l, k, x, probs, (p, part.max), sc);
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
/// pieces (into `parts`); the exponentials into `keep` when given.
#[inline(always)]
fn row_partials<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    x: &[T],
    r: &RowIn<'_, T, L::F>,
    parts: &mut [Partial<L::F>],
    keep: Option<&mut [L::F]>,
) -> (L::F, GradConsts<L::F>) {
    fill_partials(l, k, (x, r.probs), parts, keep);
    let e_y = target_exp(l, x, r.target, parts);
    conclude(k, r, x, join(l, k, parts), e_y)
}

/// Loss of one row; writes its gradient when `io` asks for one. The
/// exponentials are kept between the passes in the gradient buffer when
/// `io` keeps them there ([`Io::keeps_exps_in_grad`]), else in `scratch`
/// (room for `C` values) when given; else computed again (same bits).
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
                None => {
                    let (loss, gc) = row_partials(l, k, x, &r, parts, scratch.as_deref_mut());
                    (loss, gc, Exps::in_scratch(scratch.as_deref()))
                }
            };
            row_gradient(l, k, &mut Separate(x, g), &r, e, gc, parts);
            loss
        }
        Io::InPlace(x) => {
            let (loss, gc) = row_partials(l, k, &x[..c], &r, parts, scratch.as_deref_mut());
            row_gradient(
                l,
                k,
                &mut Same(x),
                &r,
                Exps::in_scratch(scratch.as_deref()),
                gc,
                parts,
            );
            loss
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{Compute, Task};
    use crate::test_util::lcg;

    /// Where a row's exponentials are kept between its passes.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Keep {
        InGrad,
        Scratch,
        Nowhere,
    }

    /// One row's loss and gradient by [`row`], with its exponentials kept
    /// where `keep` says (the gradient written over the logits for a
    /// scratch or none: a separate float32 gradient keeps them itself).
    struct RowBits<'a> {
        k: &'a Consts<f32>,
        x: &'a [f32],
        r: RowIn<'a, f32, f32>,
        keep: Keep,
    }

    impl Task<f32> for RowBits<'_> {
        type Output = Vec<u32>;
        fn run<L: Lanes<F = f32>>(self, l: L) -> Vec<u32> {
            let mut g = vec![f32::NAN; self.x.len()];
            let mut sc = vec![f32::NAN; self.x.len()];
            let (io, scratch) = match self.keep {
                Keep::InGrad => (Io::Grad(self.x, &mut g[..]), None),
                Keep::Scratch | Keep::Nowhere => {
                    g.copy_from_slice(self.x);
                    let sc = (self.keep == Keep::Scratch).then_some(&mut sc[..]);
                    (Io::InPlace(&mut g[..]), sc)
                }
            };
            assert_eq!(io.keeps_exps_in_grad(), self.keep == Keep::InGrad);
            let loss = row(l, self.k, io, self.r, scratch);
            std::iter::once(loss).chain(g).map(f32::to_bits).collect()
        }
    }

    /// The six forms of the gradient loop (exponentials in the gradient, in
    /// a scratch or computed again; smoothing or probability targets, or
    /// neither) and the four of the exponentials' loop give a row of
    /// several pieces the same bits, with and without class weights.
    #[test]
    fn exponentials_in_the_gradient_a_scratch_or_none_give_the_same_bits() {
        let c = 2 * PIECE + 37;
        let mut sd = 9;
        let x: Vec<f32> = (0..c)
            .map(|_| (lcg(&mut sd) * 20.0 - 10.0) as f32)
            .collect();
        let probs: Vec<f32> = (0..c).map(|_| lcg(&mut sd) as f32 / c as f32).collect();
        let w: Vec<f64> = (0..c).map(|_| lcg(&mut sd) * 2.0).collect();
        let class = SampleTarget::Class {
            y: PIECE + 3,
            w_y: 0.7,
        };
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
            for (i, (k, target, probs)) in cases.iter().enumerate() {
                let bits = |keep| {
                    let r = RowIn {
                        target: *target,
                        probs: *probs,
                        scale: 0.5,
                    };
                    f32::dispatch(RowBits { k, x: &x, r, keep })
                };
                let in_grad = bits(Keep::InGrad);
                assert!(in_grad.iter().all(|b| f32::from_bits(*b).is_finite()));
                for keep in [Keep::Scratch, Keep::Nowhere] {
                    let w = weight.is_some();
                    assert!(bits(keep) == in_grad, "case {i}, {keep:?}, weight {w}");
                }
            }
        }
    }
}
