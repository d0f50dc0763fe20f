//! SIMD lanes with runtime dispatch.
//!
//! Kernels are written once, generic over [`Lanes`], and instantiated for each
//! instruction set inside a `#[target_feature]` entry function, so that one
//! binary uses the widest unit the CPU has (AVX-512, AVX2+FMA+F16C, or scalar).
//! A lanes value is a zero-sized token: holding one proves the CPU supports
//! its instructions, which is what makes its methods safe to call.

use crate::elem::{Elem, Real};
use std::sync::OnceLock;

mod scalar;
pub use scalar::{ScalarF32, ScalarF64};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::transpose8_raw;
#[cfg(target_arch = "x86_64")]
pub use avx2::Avx2;
#[cfg(target_arch = "x86_64")]
pub use avx512::{Avx512, Bf16Dot};

/// A vector of `N` lanes of the compute type `F`, with the operations the
/// cross-entropy kernels need.
pub trait Lanes: Copy + Send + Sync {
    type F: Real;
    type V: Copy;
    /// A one-lane type with the same compute type, for the ends of rows.
    type Tail: Lanes<F = Self::F>;
    const N: usize;
    /// Vector registers the instruction set has: kernels size their tiles
    /// of accumulators by it (a tile that does not fit spills to the stack).
    const REGS: usize;

    fn tail(self) -> Self::Tail;
    fn splat(self, x: Self::F) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum (NaN handling unspecified: a NaN input poisons the
    /// sum of exponentials later anyway).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c` with one rounding (fused), on every level: the same bits
    /// from the vectors' lanes and from the one-lane ends of rows.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `exp(x)` lane-wise; see [`exp_f32`] for the accuracy contract of the
    /// float32 versions.
    fn exp(self, x: Self::V) -> Self::V;
    /// Sum of the lanes, in a fixed order.
    fn hsum(self, v: Self::V) -> Self::F;
    /// Maximum of the lanes.
    fn hmax(self, v: Self::V) -> Self::F;
    /// How many lanes of `a` are greater than those of `b` (an ordered
    /// comparison: false where either is NaN).
    fn count_gt(self, a: Self::V, b: Self::V) -> u32;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// `|a|`.
    fn abs(self, a: Self::V) -> Self::V;
    /// `|mag|` with the sign of `sign`.
    fn copysign(self, mag: Self::V, sign: Self::V) -> Self::V;
    /// Lane-wise `a < b ? x : y`.
    fn select_lt(self, a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
    /// `tanh(u)` lane-wise: `(1 - e) / (1 + e)` with `e = exp(-2|u|)`, an odd
    /// polynomial below `|u| = 1/4` (where that form would cancel), the sign
    /// of `u`. Within a few ulp of float64 in float32 (tested); the one-lane
    /// types use the platform's `tanh`.
    #[inline(always)]
    fn tanh(self, u: Self::V) -> Self::V {
        let a = self.abs(u);
        let e = self.exp(self.mul(a, self.splat(Self::F::from_f64(-2.0))));
        let one = self.splat(Self::F::ONE);
        let large = self.div(self.sub(one, e), self.add(one, e));
        let a2 = self.mul(a, a);
        let mut p = self.splat(Self::F::from_f64(62.0 / 2835.0));
        p = self.mul_add(p, a2, self.splat(Self::F::from_f64(-17.0 / 315.0)));
        p = self.mul_add(p, a2, self.splat(Self::F::from_f64(2.0 / 15.0)));
        p = self.mul_add(p, a2, self.splat(Self::F::from_f64(-1.0 / 3.0)));
        let small = self.mul_add(self.mul(p, a2), a, a);
        let t = self.select_lt(a, self.splat(Self::F::from_f64(0.25)), small, large);
        self.copysign(t, u)
    }
    /// `sech²(u) = 1 - tanh²(u)` lane-wise, as `4e / (1 + e)²` with
    /// `e = exp(-2|u|)` (no cancellation, no overflow).
    #[inline(always)]
    fn sech2(self, u: Self::V) -> Self::V {
        let e = self.exp(self.mul(self.abs(u), self.splat(Self::F::from_f64(-2.0))));
        let d = self.add(self.splat(Self::F::ONE), e);
        self.div(
            self.mul(self.splat(Self::F::from_f64(4.0)), e),
            self.mul(d, d),
        )
    }
    /// Loads the first `N` elements of `src` (which must hold at least `N`),
    /// converting them to the compute type.
    fn load<T: Elem>(self, src: &[T]) -> Self::V;
    /// Transposes an `N x N` block: `dst[k · dst_stride + i] = src[i · stride
    /// + k]` (the vector kernels override this with register shuffles).
    #[inline(always)]
    fn transpose(self, src: &[Self::F], stride: usize, dst: &mut [Self::F], dst_stride: usize) {
        for k in 0..Self::N {
            for i in 0..Self::N {
                dst[k * dst_stride + i] = src[i * stride + k];
            }
        }
    }
    /// Stores the lanes into the first `N` elements of `dst` (which must hold
    /// at least `N`), rounding to nearest-even when `T` is narrower.
    fn store<T: Elem>(self, v: Self::V, dst: &mut [T]);
}

/// Work that can run on any lanes type with compute type `F`.
pub trait Task<F: Real> {
    type Output;
    fn run<L: Lanes<F = F>>(self, lanes: L) -> Self::Output;
}

/// A compute type that knows how to pick the widest lanes for a task.
pub trait Compute: Real {
    fn dispatch<K: Task<Self>>(task: K) -> K::Output;
}

/// Instruction sets a kernel can run on, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    Avx2,
    Avx512,
    /// AVX-512 with AVX512_BF16: the float32 kernels are [`Level::Avx512`]'s;
    /// the logits of bfloat16 linear calls use its dot products.
    Avx512Bf16,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2+fma",
            Level::Avx512 => "avx512",
            Level::Avx512Bf16 => "avx512+bf16",
        }
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if Avx512::new().is_some() {
            if avx512::has_bf16_dot() {
                return Level::Avx512Bf16;
            }
            return Level::Avx512;
        }
        if Avx2::new().is_some() {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The widest level this CPU supports, capped by the environment variable
/// `FUSEDCE_SIMD` (`scalar`, `avx2`, `avx512`, `avx512bf16`) when it is set: a way to test
/// the narrower kernels on a wide machine. (A malformed value is reported by
/// [`crate::threads::num_threads`], which every entry point calls first.)
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = crate::config::get()
            .ok()
            .and_then(|c| c.simd_cap)
            .unwrap_or(Level::Avx512Bf16);
        detect().min(cap)
    })
}

impl Compute for f32 {
    #[inline]
    fn dispatch<K: Task<f32>>(task: K) -> K::Output {
        #[cfg(target_arch = "x86_64")]
        match level() {
            Level::Avx512 | Level::Avx512Bf16 => {
                if let Some(l) = Avx512::new() {
                    return avx512::run(task, l);
                }
            }
            Level::Avx2 => {
                if let Some(l) = Avx2::new() {
                    return avx2::run(task, l);
                }
            }
            Level::Scalar => {}
        }
        task.run(ScalarF32)
    }
}

impl Compute for f64 {
    #[inline]
    fn dispatch<K: Task<f64>>(task: K) -> K::Output {
        task.run(ScalarF64)
    }
}

/// Scalar float32 `exp` with the same algorithm, operation for operation, as
/// the vector versions (so every SIMD level gives the same bits): `x = n ln2
/// + r`, `|r| <= ln2/2`, with `n` rounded by adding a shifter whose low
/// mantissa bits then hold `n + 127`, the exponent of `2^n`; a degree-7
/// polynomial for `e^r`.
///
/// Every caller takes the exponential of a non-positive number (`x - max`,
/// `-2|u|`), so there is no overflow handling: the contract is for
/// `x <= 88.37`. Accuracy (tested against float64 in `tests`): relative
/// error at most 2 ulp for `x` in `[-87.33, 88.37]`; exactly `0` below
/// `-87.33` (where the true value is subnormal) and for `-inf`; exactly 1 for
/// 0; NaN for NaN. Above 88.37 the result is unspecified (finite).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let t = xc.mul_add(LOG2E, EXP_SHIFT);
    let n = t - EXP_SHIFT;
    let r = (-n).mul_add(LN2_HI, xc);
    let r = (-n).mul_add(LN2_LO, r);
    let y = exp_poly(r);
    let pow2 = f32::from_bits(t.to_bits() << 23);
    if x < EXP_LO {
        0.0
    } else {
        y * pow2
    }
}

#[inline(always)]
fn exp_poly(r: f32) -> f32 {
    let mut p = EXP_P0;
    p = p.mul_add(r, EXP_P1);
    p = p.mul_add(r, EXP_P2);
    p = p.mul_add(r, EXP_P3);
    p = p.mul_add(r, EXP_P4);
    p = p.mul_add(r, EXP_P5);
    p.mul_add(r * r, r) + 1.0
}

// Range and reduction constants shared by every float32 exp.
/// The top of the accuracy contract (the tests' range; nothing clamps to it).
#[cfg(test)]
pub(crate) const EXP_HI: f32 = 88.376_26;
pub(crate) const EXP_LO: f32 = -87.336_55;
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `1.5 · 2^23 + 127`: adding it rounds to an integer `n`, and leaves
/// `n + 127` in the low mantissa bits (valid for `n` in `[-127, 128]`).
pub(crate) const EXP_SHIFT: f32 = 12_583_039.0;
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
// Minimax coefficients of (e^r - 1 - r) / r^2 on [-ln2/2, ln2/2].
pub(crate) const EXP_P0: f32 = 1.987_569_1e-4;
pub(crate) const EXP_P1: f32 = 1.398_199_9e-3;
pub(crate) const EXP_P2: f32 = 8.333_452e-3;
pub(crate) const EXP_P3: f32 = 4.166_579_6e-2;
pub(crate) const EXP_P4: f32 = 1.666_666_5e-1;
pub(crate) const EXP_P5: f32 = 0.5;

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `$check(lanes)` on the scalar float32 lanes and on every vector
    /// level this CPU has.
    macro_rules! on_every_level {
        ($check:ident) => {{
            $check(ScalarF32);
            #[cfg(target_arch = "x86_64")]
            {
                struct T;
                impl Task<f32> for T {
                    type Output = ();
                    fn run<L: Lanes<F = f32>>(self, l: L) {
                        $check(l)
                    }
                }
                if let Some(l) = Avx2::new() {
                    avx2::run(T, l);
                }
                if let Some(l) = Avx512::new() {
                    avx512::run(T, l);
                }
            }
        }};
    }

    fn check_mul_add<L: Lanes<F = f32>>(l: L) {
        // (1 + e)(1 - e) - 1 is -e² rounded once; rounded twice, it is 0
        let e = 2f32.powi(-12);
        let (a, b, c) = (l.splat(1.0 + e), l.splat(1.0 - e), l.splat(-1.0));
        let mut out = vec![1.0f32; L::N];
        l.store(l.mul_add(a, b, c), &mut out);
        assert!(out.iter().all(|&v| v == -e * e), "{out:?}");
    }

    #[test]
    fn mul_add_is_fused_on_every_level() {
        on_every_level!(check_mul_add);
    }

    fn ulp_err(got: f32, want: f64) -> f64 {
        let ulp = (want as f32).abs().max(f32::MIN_POSITIVE);
        let ulp = f32::from_bits(ulp.to_bits() + 1) - ulp;
        (got as f64 - want).abs() / ulp as f64
    }

    fn check_exp<L: Lanes<F = f32>>(l: L) {
        let mut worst = 0.0f64;
        let n = 2_000_000;
        let mut xs = vec![0.0f32; L::N];
        let mut out = vec![0.0f32; L::N];
        for i in 0..n {
            let x = EXP_LO + (EXP_HI - EXP_LO) * (i as f32 / n as f32);
            xs.iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = f32::from_bits(x.to_bits().wrapping_add(j as u32)));
            let v = l.exp(l.load(&xs));
            l.store(v, &mut out);
            for j in 0..L::N {
                let want = (xs[j] as f64).exp();
                assert_eq!(
                    out[j].to_bits(),
                    exp_f32(xs[j]).to_bits(),
                    "same bits as scalar"
                );
                if xs[j] >= EXP_LO && xs[j] <= EXP_HI {
                    worst = worst.max(ulp_err(out[j], want));
                }
            }
        }
        assert!(worst <= 2.0, "exp error {worst} ulp");
        let specials = [f32::NEG_INFINITY, -1000.0, -88.0, 0.0, f32::NAN];
        for &s in &specials {
            xs.iter_mut().for_each(|v| *v = s);
            l.store(l.exp(l.load(&xs)), &mut out);
            let got = out[0];
            match s {
                x if x.is_nan() => assert!(got.is_nan()),
                x if x < EXP_LO => assert_eq!(got, 0.0, "exp({x})"),
                _ => assert_eq!(got, 1.0, "exp(0) must be exactly 1"),
            }
        }
    }

    #[test]
    fn exp_against_f64_on_every_level() {
        on_every_level!(check_exp);
    }

    /// Worst error of the vector `tanh` (ulp) and `sech2` (relative) over
    /// `[-40, 40]`, and their special values.
    fn check_tanh<L: Lanes<F = f32>>(l: L) {
        let (mut worst_t, mut worst_s) = (0.0f64, 0.0f64);
        let n = 400_000;
        let (mut xs, mut t, mut s) = (vec![0.0f32; L::N], vec![0.0f32; L::N], vec![0.0f32; L::N]);
        for i in 0..n {
            let x = -40.0 + 80.0 * (i as f32 / n as f32);
            xs.iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = x * (1.0 + j as f32 * 1e-3));
            l.store(l.tanh(l.load(&xs)), &mut t);
            l.store(l.sech2(l.load(&xs)), &mut s);
            for j in 0..L::N {
                let u = xs[j] as f64;
                worst_t = worst_t.max(ulp_err(t[j], u.tanh()));
                let want = 1.0 / u.cosh().powi(2);
                if want > 1e-30 {
                    worst_s = worst_s.max((s[j] as f64 - want).abs() / want);
                }
            }
        }
        assert!(worst_t <= 8.0, "tanh error {worst_t} ulp");
        assert!(worst_s <= 1e-6, "sech2 relative error {worst_s}");
        let specials = [0.0f32, -0.0, 1e-30, f32::INFINITY, f32::NEG_INFINITY];
        for &v in &specials {
            l.store(l.tanh(l.splat(v)), &mut t);
            assert_eq!(t[0], v.tanh(), "tanh({v})");
            l.store(l.sech2(l.splat(v)), &mut s);
            assert!(
                (s[0] - 1.0 / (v.cosh() * v.cosh())).abs() <= 1e-7,
                "sech2({v})"
            );
        }
    }

    #[test]
    fn tanh_and_sech2_against_f64() {
        on_every_level!(check_tanh);
    }

    #[test]
    fn loads_and_stores_round_trip_every_type() {
        fn rt<L: Lanes<F = f32>>(l: L) {
            let src: Vec<f32> = (0..L::N).map(|i| i as f32 * 0.37 - 1.5).collect();
            let h: Vec<half::f16> = src.iter().map(|&x| half::f16::from_f32(x)).collect();
            let b: Vec<half::bf16> = src.iter().map(|&x| half::bf16::from_f32(x)).collect();
            let mut h2 = h.clone();
            let mut b2 = b.clone();
            l.store(l.load(&h), &mut h2);
            l.store(l.load(&b), &mut b2);
            assert_eq!(h, h2);
            assert_eq!(b, b2);
            // rounding of a value between two bf16 numbers: nearest-even
            let x = vec![1.0f32 + 3.0 * f32::EPSILON * 1024.0; L::N];
            let mut out = vec![half::bf16::ZERO; L::N];
            l.store(l.load(&x), &mut out);
            assert_eq!(out[0], half::bf16::from_f32(x[0]));
            let mut out = vec![half::f16::ZERO; L::N];
            l.store(l.load(&x), &mut out);
            assert_eq!(out[0], half::f16::from_f32(x[0]));
        }
        on_every_level!(rt);
    }

    #[test]
    fn transposes_match_the_scalar_definition() {
        fn check<L: Lanes<F = f32>>(l: L) {
            let (n, stride, dst_stride) = (L::N, L::N + 5, 2 * L::N + 3);
            let src: Vec<f32> = (0..n * stride).map(|i| i as f32 * 0.5 - 7.0).collect();
            let mut dst = vec![f32::NAN; n * dst_stride];
            l.transpose(&src, stride, &mut dst, dst_stride);
            for k in 0..n {
                for i in 0..n {
                    assert_eq!(dst[k * dst_stride + i], src[i * stride + k], "N = {n}");
                }
                assert!(dst[k * dst_stride + n].is_nan(), "wrote past the block");
            }
        }
        on_every_level!(check);
    }
}
