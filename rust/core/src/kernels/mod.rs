//! The fused softmax cross-entropy kernels.
//!
//! For one sample with logits `x` over `C` classes, `m = max x`,
//! `s = sum exp(x - m)`, `lse = m + ln s`, `p = exp(x - m) / s`:
//!
//! * class index `y` (weight `w`, smoothing `eps`, `W = sum w`):
//!   `loss = (1-eps) w_y (lse - x_y) + eps/C * sum_c w_c (lse - x_c)`,
//!   `dloss/dx_c = g * (p_c a - (1-eps) w_y [c = y] - eps/C w_c)` with
//!   `a = (1-eps) w_y + eps/C W` (the smoothing terms only when `eps > 0`);
//! * class probabilities `t` (smoothed `t' = (1-eps) t + eps/C`):
//!   `loss = sum_c w_c t'_c (lse - x_c)`,
//!   `dloss/dx_c = g * (p_c sum_k w_k t'_k - w_c t'_c)`;
//!
//! where `g` is the sample's upstream gradient, applied last, so that an
//! infinite `g` gives infinities where the gradient is non-zero (as PyTorch).
//!
//! Each sample takes three passes over its logits, all while they sit in
//! cache: the maximum; the exponentials (kept in a scratch row when there is
//! one), their sum and the smoothing/probability sums; then the gradient,
//! which reads the exponentials from the scratch row or computes them again
//! (the same instructions on the same values: the same bits). Forward-only
//! calls stop after the second pass. A row longer than a piece of classes
//! (`rows::PIECE`) takes the first two passes piece by piece, each piece
//! from its own maximum, and joins the pieces' sums at the row's maximum
//! (`rows::join`), so that its pieces can run on different threads.

pub(crate) mod columns;
pub(crate) mod order;
pub(crate) mod rows;
pub(crate) mod stats;
pub(crate) mod transform;

use crate::elem::Real;

/// Vectors summed into a partial before it joins the running total.
pub(crate) const BLOCK: usize = 64;

/// Scratch values (per thread) above which the gradient pass computes the
/// exponentials again instead of keeping them: bounds scratch memory.
pub(crate) const SCRATCH_MAX: usize = 1 << 20;

/// Per-problem constants, in the compute type.
#[derive(Debug)]
pub(crate) struct Consts<F> {
    pub classes: usize,
    pub weight: Option<Vec<F>>,
    /// `sum_c w_c` (`C` without weights).
    pub w_total: F,
    /// `1 - label_smoothing`.
    pub keep: F,
    /// `label_smoothing / C`.
    pub eps_c: F,
    /// Whether the smoothing terms are needed (index targets, `eps > 0`).
    pub smooth: bool,
    /// The z-loss coefficient (`0`: no term, no extra arithmetic).
    pub z_loss: F,
    /// `sum_c w_c` over each piece of a row (`rows::pieces`), when `smooth`
    /// (else empty): a piece's smoothing sum moves by `shift - m` times its
    /// entry when the piece joins its row (`rows::join`).
    pub piece_w: Vec<F>,
}

impl<F: Real> Consts<F> {
    pub fn new(
        classes: usize,
        weight: Option<&[f64]>,
        eps: f64,
        index_targets: bool,
        z_loss: f64,
    ) -> Self {
        let smooth = eps > 0.0 && index_targets;
        let piece_w = rows::pieces(classes)
            .take_while(|_| smooth)
            .map(|(lo, hi)| {
                F::from_f64(weight.map_or((hi - lo) as f64, |w| w[lo..hi].iter().sum()))
            })
            .collect();
        Consts {
            classes,
            weight: weight.map(|w| w.iter().map(|&v| F::from_f64(v)).collect()),
            w_total: F::from_f64(weight.map_or(classes as f64, |w| w.iter().sum())),
            keep: F::from_f64(1.0 - eps),
            eps_c: F::from_f64(eps / classes as f64),
            smooth,
            z_loss: F::from_f64(z_loss),
            piece_w,
        }
    }

    #[inline(always)]
    pub fn w(&self, c: usize) -> F {
        match &self.weight {
            Some(w) => w[c],
            None => F::ONE,
        }
    }
}

/// What one sample is to be compared with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SampleTarget<F> {
    /// Ignored: zero loss, zero gradient.
    Ignored,
    /// A class index and its weight.
    Class { y: usize, w_y: F },
    /// Class probabilities (read from the target array beside the logits).
    Probs,
}

/// The sums of the second pass, relative to the maximum `m`
/// (`d = x - m`, `e = exp(d)`, `tw` the weighted smoothed target).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sums<F> {
    /// `sum e`
    pub s: F,
    /// `sum w d` (index targets with smoothing)
    pub smooth: F,
    /// `sum tw` (probabilities)
    pub pa: F,
    /// `sum tw d` (probabilities)
    pub pb: F,
}

impl<F: Real> Sums<F> {
    #[inline(always)]
    pub fn add(self, o: Self) -> Self {
        Sums {
            s: self.s + o.s,
            smooth: self.smooth + o.smooth,
            pa: self.pa + o.pa,
            pb: self.pb + o.pb,
        }
    }
}

/// Loss of one sample once `m` and the sums are known, and the factor `k1`
/// of its gradient `g * (e k1 - tw)`. `x_y_minus_m` is `x_y - m` for a
/// class target. An ignored sample has no loss and a zero upstream gradient
/// (see [`sample_scale`]); its `k1 = 0 / s` is NaN when the row holds a NaN,
/// which makes its gradient NaN as PyTorch's is (`0 * NaN`).
///
/// With a z-loss `z`, a sample that is not ignored adds `z lse²` to its loss
/// and `2 z lse p` to its gradient (`k1 += 2 z lse / s`).
#[inline(always)]
pub(crate) fn finish<F: Real>(
    k: &Consts<F>,
    t: SampleTarget<F>,
    x_y_minus_m: F,
    sums: Sums<F>,
    m: F,
) -> (F, F) {
    let (loss, k1) = ce_terms(k, t, x_y_minus_m, sums);
    if k.z_loss == F::ZERO || matches!(t, SampleTarget::Ignored) {
        return (loss, k1);
    }
    let lse = m + sums.s.ln();
    let z = k.z_loss * lse;
    (loss + z * lse, k1 + (z + z) / sums.s)
}

/// [`finish`] without the z-loss.
#[inline(always)]
fn ce_terms<F: Real>(k: &Consts<F>, t: SampleTarget<F>, x_y_minus_m: F, sums: Sums<F>) -> (F, F) {
    let ln_s = sums.s.ln();
    match t {
        SampleTarget::Ignored => (F::ZERO, F::ZERO / sums.s),
        SampleTarget::Class { w_y, .. } => {
            let mut loss = k.keep * w_y * (ln_s - x_y_minus_m);
            let mut a = k.keep * w_y;
            if k.smooth {
                loss += k.eps_c * (k.w_total * ln_s - sums.smooth);
                a += k.eps_c * k.w_total;
            }
            (loss, a / sums.s)
        }
        SampleTarget::Probs => (sums.pa * ln_s - sums.pb, sums.pa / sums.s),
    }
}

/// The gradient of a class target's own logit: `g * (e_y k1 - w_y (keep + eps_c))`
/// (`eps_c` only with smoothing).
#[inline(always)]
pub(crate) fn target_grad<F: Real>(k: &Consts<F>, e_y: F, k1: F, w_y: F, scale: F) -> F {
    let own = if k.smooth { k.keep + k.eps_c } else { k.keep };
    scale * (e_y * k1 - w_y * own)
}

/// The upstream gradient a sample's gradient is scaled by: zero for an
/// ignored sample (its loss does not count), else `scale`.
#[inline(always)]
pub(crate) fn sample_scale<F: Real>(t: SampleTarget<F>, scale: F) -> F {
    match t {
        SampleTarget::Ignored => F::ZERO,
        _ => scale,
    }
}

/// Reads the logits and writes their gradient position by position: from a
/// separate buffer, or over the logits themselves (each position is read
/// before it is written).
pub(crate) trait GradAccess<T> {
    fn x(&self, i: usize) -> &[T];
    fn g(&mut self, i: usize) -> &mut [T];
}

pub(crate) struct Separate<'r, T>(pub &'r [T], pub &'r mut [T]);
pub(crate) struct Same<'r, T>(pub &'r mut [T]);

impl<T> GradAccess<T> for Separate<'_, T> {
    #[inline(always)]
    fn x(&self, i: usize) -> &[T] {
        &self.0[i..]
    }
    #[inline(always)]
    fn g(&mut self, i: usize) -> &mut [T] {
        &mut self.1[i..]
    }
}

impl<T> GradAccess<T> for Same<'_, T> {
    #[inline(always)]
    fn x(&self, i: usize) -> &[T] {
        &self.0[i..]
    }
    #[inline(always)]
    fn g(&mut self, i: usize) -> &mut [T] {
        &mut self.0[i..]
    }
}

/// A piece of a row starting at its class `lo`, read and written by class
/// index (the piece's own slices hold classes `lo..`).
pub(crate) struct Shifted<A>(pub A, pub usize);

impl<T, A: GradAccess<T>> GradAccess<T> for Shifted<A> {
    #[inline(always)]
    fn x(&self, i: usize) -> &[T] {
        self.0.x(i - self.1)
    }
    #[inline(always)]
    fn g(&mut self, i: usize) -> &mut [T] {
        self.0.g(i - self.1)
    }
}
