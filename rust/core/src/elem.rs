//! Element types the kernels read and write, and the real types they compute in.
//!
//! Storage types ([`Elem`]): `f32`, `f64`, [`half::f16`], [`half::bf16`].
//! Compute types ([`Real`]): `f32` for the first, third and fourth (half inputs
//! accumulate in float32), `f64` for `f64`.

use half::{bf16, f16};

/// The storage kinds, so that SIMD loads can pick a conversion at compile time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemKind {
    F32,
    F64,
    F16,
    BF16,
}

/// A floating-point storage type of an input, target or gradient array.
pub trait Elem: Copy + Send + Sync + 'static {
    const KIND: ElemKind;
    /// The type this element accumulates in (`f32` or `f64`).
    type Acc: Real;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    fn from_f32(x: f32) -> Self;
    fn from_f64(x: f64) -> Self;
    /// `s` as values of the compute type, when this type is its own
    /// compute type (`f32`, `f64`); else None.
    fn as_acc_mut(s: &mut [Self]) -> Option<&mut [Self::Acc]> {
        let _ = s;
        None
    }
    /// Whether this type is its own compute type ([`Elem::as_acc_mut`]).
    fn is_own_acc() -> bool {
        Self::as_acc_mut(&mut []).is_some()
    }
}

impl Elem for f32 {
    type Acc = f32;
    const KIND: ElemKind = ElemKind::F32;
    #[inline(always)]
    fn as_acc_mut(s: &mut [Self]) -> Option<&mut [Self]> {
        Some(s)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Elem for f64 {
    type Acc = f64;
    const KIND: ElemKind = ElemKind::F64;
    #[inline(always)]
    fn as_acc_mut(s: &mut [Self]) -> Option<&mut [Self]> {
        Some(s)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
}

impl Elem for f16 {
    type Acc = f32;
    const KIND: ElemKind = ElemKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
}

impl Elem for bf16 {
    type Acc = f32;
    const KIND: ElemKind = ElemKind::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
}

/// The type a kernel computes in: `f32` or `f64`.
pub trait Real:
    Elem<Acc = Self>
    + PartialOrd
    + core::ops::Add<Output = Self>
    + core::ops::Sub<Output = Self>
    + core::ops::Mul<Output = Self>
    + core::ops::Div<Output = Self>
    + core::ops::Neg<Output = Self>
    + core::ops::AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn cosh(self) -> Self;
    fn is_nan(self) -> bool;
    fn max_nan(self, other: Self) -> Self;
    /// The compute type a storage type `T` accumulates in.
    fn from_elem<T: Elem>(x: T) -> Self;
    fn to_elem<T: Elem>(self) -> T;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    #[inline(always)]
    fn cosh(self) -> Self {
        f32::cosh(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn max_nan(self, other: Self) -> Self {
        if self.is_nan() || other.is_nan() {
            f32::NAN
        } else if other > self {
            other
        } else {
            self
        }
    }
    #[inline(always)]
    fn from_elem<T: Elem>(x: T) -> Self {
        x.to_f32()
    }
    #[inline(always)]
    fn to_elem<T: Elem>(self) -> T {
        T::from_f32(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn cosh(self) -> Self {
        f64::cosh(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    #[inline(always)]
    fn max_nan(self, other: Self) -> Self {
        if self.is_nan() || other.is_nan() {
            f64::NAN
        } else if other > self {
            other
        } else {
            self
        }
    }
    #[inline(always)]
    fn from_elem<T: Elem>(x: T) -> Self {
        x.to_f64()
    }
    #[inline(always)]
    fn to_elem<T: Elem>(self) -> T {
        T::from_f64(self)
    }
}

/// `src` viewed as a slice of `G` when `T` is `G` itself (no copy), else `None`.
pub fn same_type<T: Elem, G: Elem>(src: &[T]) -> Option<&[G]> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<G>() {
        // SAFETY: T and G are the same type (equal TypeIds), so the pointer,
        // length and lifetime describe a valid &[G].
        Some(unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<G>(), src.len()) })
    } else {
        None
    }
}

/// The mutable twin of [`same_type`].
pub fn same_type_mut<T: Elem, G: Elem>(dst: &mut [T]) -> Option<&mut [G]> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<G>() {
        // SAFETY: as in `same_type`; the borrow of `dst` moves into the result.
        Some(unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<G>(), dst.len()) })
    } else {
        None
    }
}
