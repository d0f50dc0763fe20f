//! [`Io`]: the logits and where their gradient goes. It is the one
//! description of a gradient destination, used from the public API
//! ([`Logits`], over slices) down to the column kernel (over shared
//! pointers), so no layer re-encodes it.

use crate::elem::Elem;

/// The logits (`X`, read) and where their gradient goes (`G`, written).
#[derive(Clone, Copy, Debug)]
pub enum Io<X, G> {
    /// Loss only: no gradient work at all.
    Forward(X),
    /// The gradient goes to a separate buffer of the logits' size.
    Grad(X, G),
    /// The gradient is written over the logits.
    InPlace(G),
}

/// [`Io`] over slices: what the public API takes.
pub type Logits<'a, T> = Io<&'a [T], &'a mut [T]>;

impl<X, G> Io<X, G> {
    /// Whether a gradient is to be written.
    pub fn wants_grad(&self) -> bool {
        !matches!(self, Io::Forward(_))
    }
}

impl<'a, T> Io<&'a [T], &'a mut [T]> {
    /// The number of logits.
    pub fn len(&self) -> usize {
        self.input().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the gradient buffer keeps a row's exponentials between its
    /// passes, each replaced by its gradient in the second: a separate
    /// gradient (`Grad`) of a type that is its own compute type.
    pub(crate) fn keeps_exps_in_grad(&self) -> bool
    where
        T: Elem,
    {
        matches!(self, Io::Grad(..)) && T::is_own_acc()
    }

    /// Whether the logits keep a row's exponentials over themselves
    /// between its passes, each replaced by its gradient in the second: a
    /// gradient in place (`InPlace`) of a type that is its own compute type.
    pub(crate) fn keeps_exps_over_logits(&self) -> bool
    where
        T: Elem,
    {
        matches!(self, Io::InPlace(..)) && T::is_own_acc()
    }

    /// Whether a gradient is to be written whose exponentials need a
    /// scratch to be kept in.
    pub(crate) fn needs_scratch(&self) -> bool
    where
        T: Elem,
    {
        self.wants_grad() && !self.keeps_exps_in_grad() && !self.keeps_exps_over_logits()
    }

    /// The logits, for reading.
    pub fn input(&self) -> &[T] {
        match self {
            Io::Forward(x) | Io::Grad(x, _) => x,
            Io::InPlace(x) => x,
        }
    }

    /// The first `mid` logits (and their gradient) and the rest.
    pub fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            Io::Forward(x) => {
                let (a, b) = x.split_at(mid);
                (Io::Forward(a), Io::Forward(b))
            }
            Io::Grad(x, g) => {
                let (xa, xb) = x.split_at(mid);
                let (ga, gb) = g.split_at_mut(mid);
                (Io::Grad(xa, ga), Io::Grad(xb, gb))
            }
            Io::InPlace(x) => {
                let (a, b) = x.split_at_mut(mid);
                (Io::InPlace(a), Io::InPlace(b))
            }
        }
    }

    /// Consecutive pieces of `len` logits each (the last may be shorter).
    pub fn pieces(self, len: usize) -> Vec<Self> {
        let len = len.max(1);
        let mut out = Vec::with_capacity(self.len().div_ceil(len));
        let mut rest = self;
        while rest.len() > len {
            let (a, b) = rest.split_at(len);
            out.push(a);
            rest = b;
        }
        if !rest.is_empty() || out.is_empty() {
            out.push(rest);
        }
        out
    }
}
