//! The map from logits `x` to the scores `z` the softmax sees:
//! `z = softcap · tanh(x / softcap)` (Gemma's logit soft-capping) when a cap
//! is given, then `z / temperature`; and its derivative for the gradient.
//!
//! Samples whose logits need the map (or whose classes are strided) are
//! gathered into a contiguous row of scores in the compute type, run by the
//! row kernels there, and their gradient with respect to the scores is
//! scattered back times `dz/dx`. With no cap and temperature 1 the map is
//! the identity and no sample takes this path: the default costs nothing.

use crate::elem::{Elem, Real};
use crate::error::CeError;

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

    /// `z` of the logit `x`.
    #[inline(always)]
    pub fn apply(&self, x: F) -> F {
        let capped = match self.softcap {
            Some(c) => c * (x / c).tanh(),
            None => x,
        };
        if self.temperature == F::ONE {
            capped
        } else {
            capped / self.temperature
        }
    }

    /// `dz/dx` at the logit `x`: `sech²(x / softcap) / temperature`, with
    /// `sech² = 1 / cosh²` (accurate where `1 - tanh²` would cancel).
    #[inline(always)]
    pub fn slope(&self, x: F) -> F {
        let s = match self.softcap {
            Some(c) => {
                let ch = (x / c).cosh();
                F::ONE / (ch * ch)
            }
            None => F::ONE,
        };
        if self.temperature == F::ONE {
            s
        } else {
            s / self.temperature
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

/// `z[c] = t(x(at(c)))` for every class.
#[inline(always)]
pub(crate) fn gather<T: Elem, F: Real>(
    t: &Transform<F>,
    x: impl Fn(usize) -> T,
    s: Strided,
    z: &mut [F],
) {
    for (c, zc) in z.iter_mut().enumerate() {
        *zc = t.apply(F::from_elem(x(s.at(c))));
    }
}

/// `g[at(c)] = dz[c] · dz/dx(x[at(c)])` for every class; `x` is read at a
/// position before `g` is written there, so `x` and `g` may be one buffer.
#[inline(always)]
pub(crate) fn scatter<T: Elem, F: Real>(
    t: &Transform<F>,
    dz: &[F],
    s: Strided,
    x: impl Fn(usize) -> T,
    mut g: impl FnMut(usize, T),
) {
    for (c, &d) in dz.iter().enumerate() {
        let at = s.at(c);
        let slope = t.slope(F::from_elem(x(at)));
        g(at, (d * slope).to_elem());
    }
}
