//! One-lane "vectors": the portable fallback, and the ends of rows.

use super::{exp_f32, Lanes};
use crate::elem::Elem;

/// One float32 lane.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScalarF32;

/// One float64 lane; `exp` is the platform's correctly rounded-ish `f64::exp`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScalarF64;

macro_rules! scalar_lanes {
    ($name:ident, $f:ty, $exp:expr) => {
        impl Lanes for $name {
            type F = $f;
            type V = $f;
            type Tail = $name;
            const N: usize = 1;
            const REGS: usize = 16;
            #[inline(always)]
            fn tail(self) -> Self {
                self
            }
            #[inline(always)]
            fn splat(self, x: $f) -> $f {
                x
            }
            #[inline(always)]
            fn add(self, a: $f, b: $f) -> $f {
                a + b
            }
            #[inline(always)]
            fn sub(self, a: $f, b: $f) -> $f {
                a - b
            }
            #[inline(always)]
            fn mul(self, a: $f, b: $f) -> $f {
                a * b
            }
            #[inline(always)]
            fn max(self, a: $f, b: $f) -> $f {
                if b > a {
                    b
                } else {
                    a
                }
            }
            #[inline(always)]
            fn mul_add(self, a: $f, b: $f, c: $f) -> $f {
                // fused, as on the vector levels, whose ends of rows run here
                // (one rounding: a hardware FMA wherever this is inlined into
                // a vector level's code)
                a.mul_add(b, c)
            }
            #[inline(always)]
            fn exp(self, x: $f) -> $f {
                $exp(x)
            }
            #[inline(always)]
            fn hsum(self, v: $f) -> $f {
                v
            }
            #[inline(always)]
            fn hmax(self, v: $f) -> $f {
                v
            }
            #[inline(always)]
            fn div(self, a: $f, b: $f) -> $f {
                a / b
            }
            #[inline(always)]
            fn abs(self, a: $f) -> $f {
                a.abs()
            }
            #[inline(always)]
            fn copysign(self, mag: $f, sign: $f) -> $f {
                mag.copysign(sign)
            }
            #[inline(always)]
            fn select_lt(self, a: $f, b: $f, x: $f, y: $f) -> $f {
                if a < b {
                    x
                } else {
                    y
                }
            }
            #[inline(always)]
            fn tanh(self, u: $f) -> $f {
                u.tanh()
            }
            #[inline(always)]
            fn sech2(self, u: $f) -> $f {
                let c = u.cosh();
                1.0 / (c * c)
            }
            #[inline(always)]
            fn count_gt(self, a: $f, b: $f) -> u32 {
                u32::from(a > b)
            }
            #[inline(always)]
            fn load<T: Elem>(self, src: &[T]) -> $f {
                <$f as crate::elem::Real>::from_elem(src[0])
            }
            #[inline(always)]
            fn store<T: Elem>(self, v: $f, dst: &mut [T]) {
                dst[0] = <$f as crate::elem::Real>::to_elem(v);
            }
        }
    };
}

scalar_lanes!(ScalarF32, f32, exp_f32);
scalar_lanes!(ScalarF64, f64, f64::exp);
