//! The map from logits `x` to the scores `z` the softmax sees:
//! `z = softcap · tanh(x / softcap)` (Gemma's logit soft-capping) when a cap
//! is given, then `z / temperature`; and its derivative for the gradient.
//!
//! Samples whose logits need the map (or whose classes are strided) are
//! gathered into a contiguous row in the compute type, mapped to scores
//! there (vectorised: `Lanes::tanh`, `Lanes::sech2`), run by the row kernels,
//! and their gradient with respect to the scores is multiplied by `dz/dx`
//! and scattered back. With no cap and temperature 1 the map is the identity
//! and no `(N, C)` sample takes this path: the default costs nothing.

use crate::elem::{Elem, Real};
use crate::error::CeError;
use crate::simd::Lanes;

/// `softcap` and `temperature`, in the compute type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Transform<F> {
    pub softcap: Option<F>,
    pub temperature: F,
}

/// A positive finite number, else an error naming `arg`.
pub(crate) fn check_positive(arg: &'static str, v: f64) -> Result<(), CeError> {
    if !(v.is_finite() && v > 0.0) {
        return Err(CeError::invalid(
            arg,
            format!("expected a positive finite number, got {v}"),
        ));
    }
    Ok(())
}

impl<F: Real> Transform<F> {
    /// Validates `softcap` (positive, finite, or absent) and `temperature`
    /// (positive, finite).
    pub fn new(softcap: Option<f64>, temperature: f64) -> Result<Self, CeError> {
        if let Some(c) = softcap {
            check_positive("softcap", c)?;
        }
        check_positive("temperature", temperature)?;
        Ok(Transform {
            softcap: softcap.map(F::from_f64),
            temperature: F::from_f64(temperature),
        })
    }

    /// The map is the identity.
    pub fn is_identity(&self) -> bool {
        self.softcap.is_none() && self.temperature == F::ONE
    }

    /// `z` of the logits `x`, lane-wise.
    #[inline(always)]
    pub fn apply<L: Lanes<F = F>>(&self, l: L, x: L::V) -> L::V {
        let capped = match self.softcap {
            Some(c) => {
                let cv = l.splat(c);
                l.mul(cv, l.tanh(l.div(x, cv)))
            }
            None => x,
        };
        if self.temperature == F::ONE {
            capped
        } else {
            l.div(capped, l.splat(self.temperature))
        }
    }

    /// `dz/dx` at the logits `x`, lane-wise: `sech²(x / softcap) / temperature`.
    #[inline(always)]
    pub fn slope<L: Lanes<F = F>>(&self, l: L, x: L::V) -> L::V {
        let s = match self.softcap {
            Some(c) => l.sech2(l.div(x, l.splat(c))),
            None => l.splat(F::ONE),
        };
        if self.temperature == F::ONE {
            s
        } else {
            l.div(s, l.splat(self.temperature))
        }
    }

    /// `z = t(x)` over a row (vectors of `L`, then the one-lane tail).
    #[inline(always)]
    pub fn scores<L: Lanes<F = F>>(&self, l: L, x: &[F], z: &mut [F]) {
        let body = x.len() - x.len() % L::N;
        let tl = l.tail();
        for i in (0..body).step_by(L::N) {
            l.store(self.apply(l, l.load(&x[i..])), &mut z[i..]);
        }
        for i in body..x.len() {
            tl.store(self.apply(tl, tl.load(&x[i..])), &mut z[i..]);
        }
    }

    /// `dz *= dz/dx(x)` over a row: the gradient with respect to the logits.
    #[inline(always)]
    pub fn chain<L: Lanes<F = F>>(&self, l: L, x: &[F], dz: &mut [F]) {
        let body = x.len() - x.len() % L::N;
        let tl = l.tail();
        for i in (0..body).step_by(L::N) {
            let g = l.mul(l.load(&dz[i..]), self.slope(l, l.load(&x[i..])));
            l.store(g, &mut dz[i..]);
        }
        for i in body..x.len() {
            let g = tl.mul(tl.load(&dz[i..]), self.slope(tl, tl.load(&x[i..])));
            tl.store(g, &mut dz[i..]);
        }
    }
}

/// One sample's logits at `base + c * stride` (`c < classes`) of a buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided {
    pub base: usize,
    pub stride: usize,
}

impl Strided {
    #[inline(always)]
    pub fn at(&self, c: usize) -> usize {
        self.base + c * self.stride
    }
}

/// `xb[c] = x(at(c))` for every class: a sample's logits in the compute type.
#[inline(always)]
pub(crate) fn gather<T: Elem, F: Real>(x: impl Fn(usize) -> T, s: Strided, xb: &mut [F]) {
    for (c, v) in xb.iter_mut().enumerate() {
        *v = F::from_elem(x(s.at(c)));
    }
}

/// `g(at(c), g_c)` for every class: a sample's gradient written back.
#[inline(always)]
pub(crate) fn scatter<T: Elem, F: Real>(grad: &[F], s: Strided, mut g: impl FnMut(usize, T)) {
    for (c, &v) in grad.iter().enumerate() {
        g(s.at(c), v.to_elem());
    }
}
