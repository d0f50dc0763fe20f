//! The fused softmax cross-entropy kernels.
//!
//! For one sample with logits `x` over `C` classes, `m = max x`,
//! `s = sum exp(x - m)`, `lse = m + ln s`, `p = exp(x - m) / s`:
//!
//! * class index `y` (weight `w`, smoothing `eps`, `W = sum w`):
//!   `loss = (1-eps) w_y (lse - x_y) + eps/C * sum_c w_c (lse - x_c)`,
//!   `dloss/dx_c = p_c ((1-eps) w_y + eps/C W) - (1-eps) w_y [c = y] - eps/C w_c`;
//! * class probabilities `t` (smoothed `t' = (1-eps) t + eps/C`):
//!   `loss = sum_c w_c t'_c (lse - x_c)`,
//!   `dloss/dx_c = p_c sum_k w_k t'_k - w_c t'_c`.
//!
//! Each sample takes three passes over its logits, all while they sit in
//! cache: the maximum; the exponentials (kept in a per-thread scratch row),
//! their sum and the smoothing/probability sums; then the gradient, scaled
//! by the upstream gradient. Forward-only calls stop after the second pass.

pub(crate) mod columns;
pub(crate) mod rows;

use crate::elem::Real;

/// Vectors summed into a partial before it joins the running total.
pub(crate) const BLOCK: usize = 64;

/// Per-problem constants, in the compute type.
pub(crate) struct Consts<'a, F> {
    pub classes: usize,
    pub weight: Option<&'a [F]>,
    /// `sum_c w_c` (`C` without weights).
    pub w_total: F,
    /// `1 - label_smoothing`.
    pub keep: F,
    /// `label_smoothing / C`.
    pub eps_c: F,
    /// Whether the smoothing sum is needed (index targets, `eps > 0`).
    pub smooth: bool,
}

impl<F: Real> Consts<'_, F> {
    #[inline(always)]
    pub fn w(&self, c: usize) -> F {
        match self.weight {
            Some(w) => w[c],
            None => F::ONE,
        }
    }
}

/// What one sample is to be compared with.
#[derive(Clone, Copy)]
pub(crate) enum SampleTarget<F> {
    /// Ignored: zero loss, zero gradient.
    Ignored,
    /// A class index and its weight.
    Class { y: usize, w_y: F },
    /// Class probabilities (read from the target array beside the logits).
    Probs,
}

/// Loss and gradient coefficients of one sample once `m`, `s` and the sums
/// are known. Returns `(loss, k1)` where the gradient is
/// `exp(x - m) * k1 - scale * (weighted smoothed target)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish<F: Real>(
    k: &Consts<F>,
    t: SampleTarget<F>,
    x_y_minus_m: F,
    s: F,
    smooth_sum: F,
    pa: F,
    pb: F,
    scale: F,
) -> (F, F) {
    let ln_s = s.ln();
    match t {
        SampleTarget::Ignored => (F::ZERO, F::ZERO),
        SampleTarget::Class { w_y, .. } => {
            let mut loss = k.keep * w_y * (ln_s - x_y_minus_m);
            let mut a = k.keep * w_y;
            if k.smooth {
                loss += k.eps_c * (k.w_total * ln_s - smooth_sum);
                a += k.eps_c * k.w_total;
            }
            (loss, scale * (a / s))
        }
        SampleTarget::Probs => (pa * ln_s - pb, scale * (pa / s)),
    }
}
