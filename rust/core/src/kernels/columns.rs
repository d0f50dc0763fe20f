//! Samples whose classes are strided: K-dimensional inputs `(N, C, d1..dK)`.
//! Lanes run along the contiguous spatial axis, one sample per lane, so no
//! transposing copy is made.

use super::{finish, sample_scale, target_grad, Consts, SampleTarget, Sums};
use crate::ce::io::{Io, Logits};
use crate::elem::{Elem, Real};
use crate::simd::Lanes;

/// A buffer shared by the threads of one call, each of which touches only
/// the positions of its own work items.
pub(crate) struct Shared<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}

// SAFETY: `Shared` is only a pointer and a length; the kernels that use it
// guarantee that no two threads write the same position and that no position
// is read while another thread writes it.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub fn new(s: &mut [T]) -> Self {
        Shared {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }
    pub fn from_ref(s: &[T]) -> Self {
        Shared {
            ptr: s.as_ptr() as *mut T,
            len: s.len(),
        }
    }
    /// The number of values.
    pub fn len(&self) -> usize {
        self.len
    }
    /// # Safety
    /// No thread writes `[at, at + n)` while the returned slice lives.
    #[inline(always)]
    pub unsafe fn get(&self, at: usize, n: usize) -> &[T] {
        assert!(at + n <= self.len);
        // SAFETY: in bounds (asserted); no concurrent writer (caller's contract).
        unsafe { std::slice::from_raw_parts(self.ptr.add(at), n) }
    }
    /// # Safety
    /// No other reference to `[at, at + n)` exists while the returned slice
    /// lives, and the buffer was created from a mutable slice.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_mut(&self, at: usize, n: usize) -> &mut [T] {
        assert!(at + n <= self.len);
        // SAFETY: in bounds (asserted); exclusive (caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), n) }
    }
}

/// [`Io`] over shared pointers: what work items running on several threads
/// hold (each touches only its own samples' positions).
pub(crate) type SharedIo<T> = Io<Shared<T>, Shared<T>>;

impl<T> SharedIo<T> {
    pub fn from_logits(io: Logits<'_, T>) -> Self {
        match io {
            Io::Forward(x) => Io::Forward(Shared::from_ref(x)),
            Io::Grad(x, g) => Io::Grad(Shared::from_ref(x), Shared::new(g)),
            Io::InPlace(x) => Io::InPlace(Shared::new(x)),
        }
    }

    /// The logits (over the gradient, for `InPlace`).
    pub fn logits(&self) -> Shared<T> {
        match *self {
            Io::Forward(x) | Io::Grad(x, _) | Io::InPlace(x) => x,
        }
    }

    /// Where the gradient goes, if anywhere.
    pub fn grad(&self) -> Option<Shared<T>> {
        match *self {
            Io::Forward(_) => None,
            Io::Grad(_, g) | Io::InPlace(g) => Some(g),
        }
    }
}

/// One image `n` of a K-dimensional problem: logits, probabilities and
/// gradient share the layout `(C, S)` starting at `base`.
pub(crate) struct Image<T> {
    /// The logits and where their gradient goes.
    pub io: SharedIo<T>,
    pub probs: Option<Shared<T>>,
    pub base: usize,
    pub spatial: usize,
}

impl<T> Image<T> {
    fn x(&self) -> Shared<T> {
        self.io.logits()
    }
    fn g(&self) -> Option<Shared<T>> {
        self.io.grad()
    }
}

/// Per-lane inputs of one block: target and upstream gradient scale.
#[derive(Clone, Copy)]
pub(crate) struct LaneIn<F> {
    pub target: SampleTarget<F>,
    pub scale: F,
}

/// Losses of the `L::N` samples at spatial positions `s..s + L::N` of one
/// image, written to `loss`; writes their gradient when the image has one.
/// `scratch` (room for `C * L::N` values) keeps the exponentials between
/// the passes; without it they are computed again (same bits).
///
/// # Safety
/// The calling thread owns positions `(c, s..s + L::N)` of this image for
/// every `c`: nobody else reads or writes them during the call.
#[inline(always)]
pub(crate) unsafe fn block<L: Lanes, T: Elem>(
    l: L,
    k: &Consts<L::F>,
    img: &Image<T>,
    s: usize,
    lanes: &[LaneIn<L::F>],
    mut scratch: Option<&mut [L::F]>,
    loss: &mut [L::F],
) {
    let n = L::N;
    let (c_all, sp) = (k.classes, img.spatial);
    let at = |c: usize| img.base + c * sp + s;
    let zero = l.splat(L::F::ZERO);
    let (keep, eps_c) = (l.splat(k.keep), l.splat(k.eps_c));
    let x = img.x();
    if img.g().is_none() {
        scratch = None;
    }

    // SAFETY (each `get`): the block's positions belong to this thread.
    let mut mv = l.splat(L::F::NEG_INFINITY);
    for c in 0..c_all {
        mv = l.max(mv, l.load(unsafe { x.get(at(c), n) }));
    }
    // Blocked summation over classes, as in the row kernel.
    let (mut sv, mut smv, mut pav, mut pbv) = (zero, zero, zero, zero);
    let mut lo = 0;
    while lo < c_all {
        let hi = (lo + super::BLOCK).min(c_all);
        let (mut bs, mut bsm, mut bpa, mut bpb) = (zero, zero, zero, zero);
        for c in lo..hi {
            let d = l.sub(l.load(unsafe { x.get(at(c), n) }), mv);
            let e = l.exp(d);
            bs = l.add(bs, e);
            if let Some(sc) = scratch.as_deref_mut() {
                l.store(e, &mut sc[c * n..]);
            }
            let wc = l.splat(k.w(c));
            if k.smooth {
                bsm = l.mul_add(wc, d, bsm);
            }
            if let Some(p) = &img.probs {
                let tp = l.mul_add(l.load(unsafe { p.get(at(c), n) }), keep, eps_c);
                let tw = l.mul(wc, tp);
                bpa = l.add(bpa, tw);
                bpb = l.mul_add(tw, d, bpb);
            }
        }
        sv = l.add(sv, bs);
        smv = l.add(smv, bsm);
        pav = l.add(pav, bpa);
        pbv = l.add(pbv, bpb);
        lo = hi;
    }
    let mut arr = [[L::F::ZERO; 16]; 5];
    for (a, v) in arr.iter_mut().zip([mv, sv, smv, pav, pbv]) {
        l.store(v, &mut a[..n]);
    }
    let [m, sum, sm, pa, pb] = arr;
    let mut k1 = [L::F::ZERO; 16];
    let mut e_y = [L::F::ZERO; 16];
    let mut lane_scale = [L::F::ZERO; 16];
    for j in 0..n {
        let li = lanes[j];
        let xy = match li.target {
            SampleTarget::Class { y, .. } => {
                // e_y by the same vector instructions as in the passes
                let mut ev = [L::F::ZERO; 16];
                let d = l.sub(l.load(unsafe { x.get(at(y), n) }), mv);
                l.store(l.exp(d), &mut ev[..n]);
                e_y[j] = ev[j];
                L::F::from_elem(unsafe { x.get(at(y) + j, 1) }[0]) - m[j]
            }
            _ => L::F::ZERO,
        };
        let sums = Sums {
            s: sum[j],
            smooth: sm[j],
            pa: pa[j],
            pb: pb[j],
        };
        let (lj, kj) = finish(k, li.target, xy, sums, m[j]);
        loss[j] = lj;
        k1[j] = kj;
        lane_scale[j] = sample_scale(li.target, li.scale);
    }
    let Some(g) = img.g() else { return };
    let (k1v, sv) = (l.load(&k1[..n]), l.load(&lane_scale[..n]));
    for c in 0..c_all {
        let e = match scratch.as_deref() {
            Some(sc) => l.load(&sc[c * n..]),
            None => l.exp(l.sub(l.load(unsafe { x.get(at(c), n) }), mv)),
        };
        let wc = l.splat(k.w(c));
        let p = l.mul(e, k1v);
        let gv = match &img.probs {
            Some(pr) => {
                let tp = l.mul_add(l.load(unsafe { pr.get(at(c), n) }), keep, eps_c);
                l.sub(p, l.mul(wc, tp))
            }
            None if k.smooth => l.sub(p, l.mul(wc, eps_c)),
            None => p,
        };
        // SAFETY: the block's positions belong to this thread, and no slice
        // of the logits is alive here.
        l.store(l.mul(sv, gv), unsafe { g.get_mut(at(c), n) });
    }
    for j in 0..n {
        if let SampleTarget::Class { y, w_y } = lanes[j].target {
            // SAFETY: as above.
            let dst = unsafe { g.get_mut(at(y) + j, 1) };
            dst[0] = target_grad(k, e_y[j], k1[j], w_y, lanes[j].scale).to_elem();
        }
    }
}
