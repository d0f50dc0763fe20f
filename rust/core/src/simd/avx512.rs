//! Sixteen float32 lanes on AVX-512F.

use super::*;
use crate::elem::{Elem, ElemKind};
use std::arch::x86_64::*;

/// Token for AVX-512F (with AVX2, FMA and F16C); only [`Avx512::new`] makes
/// one, after checking the CPU.
#[derive(Clone, Copy, Debug)]
pub struct Avx512 {
    _proof: (),
}

impl Avx512 {
    pub fn new() -> Option<Self> {
        (is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx512 { _proof: () })
    }
}

/// Whether the CPU has AVX512_BF16 beside [`Avx512`]'s features.
pub(crate) fn has_bf16_dot() -> bool {
    Avx512::new().is_some() && is_x86_feature_detected!("avx512bf16")
}

/// Token for AVX512_BF16's dot products (`vdpbf16ps`) with everything
/// [`Avx512`] proves; only [`Bf16Dot::new`] makes one, when the CPU has them
/// and `FUSEDCE_SIMD` does not cap the level below [`Level::Avx512Bf16`].
#[derive(Clone, Copy, Debug)]
pub struct Bf16Dot {
    _proof: (),
}

impl Bf16Dot {
    pub fn new() -> Option<Self> {
        (level() >= Level::Avx512Bf16 && has_bf16_dot()).then_some(Bf16Dot { _proof: () })
    }
}

/// Runs `task` with every generic kernel it calls compiled for AVX-512.
pub(crate) fn run<F: Real, K: Task<F>>(task: K, l: Avx512) -> K::Output
where
    Avx512: Lanes<F = F>,
{
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn inner<F: Real, K: Task<F>>(task: K, l: Avx512) -> K::Output
    where
        Avx512: Lanes<F = F>,
    {
        task.run(l)
    }
    // SAFETY: an `Avx512` token exists only when the CPU has AVX-512F, AVX2,
    // FMA and F16C.
    unsafe { inner(task, l) }
}

// SAFETY (every `unsafe` block below): the intrinsics need AVX-512F, which
// the `Avx512` token proves present; memory is touched only through unaligned
// loads/stores on slices whose length was asserted to cover 16 elements.
impl Lanes for Avx512 {
    type F = f32;
    type V = __m512;
    type Tail = ScalarF32;
    const N: usize = 16;
    const REGS: usize = 32;

    #[inline(always)]
    fn tail(self) -> ScalarF32 {
        ScalarF32
    }
    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn max(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn exp(self, x: __m512) -> __m512 {
        unsafe {
            // max returns its second operand when either is NaN: NaN survives.
            let xc = _mm512_max_ps(_mm512_set1_ps(EXP_LO), x);
            let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(LOG2E), _mm512_set1_ps(EXP_SHIFT));
            let n = _mm512_sub_ps(t, _mm512_set1_ps(EXP_SHIFT));
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(EXP_P0);
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
            let y = _mm512_add_ps(
                _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                _mm512_set1_ps(1.0),
            );
            let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(t)));
            let kept = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(EXP_LO));
            _mm512_maskz_mul_ps(kept, y, pow2)
        }
    }
    #[inline(always)]
    fn hsum(self, v: __m512) -> f32 {
        unsafe {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            let s = _mm256_add_ps(lo, hi);
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn hmax(self, v: __m512) -> f32 {
        unsafe {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            let s = _mm256_max_ps(lo, hi);
            let s = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn div(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    fn abs(self, a: __m512) -> __m512 {
        unsafe { _mm512_abs_ps(a) }
    }
    #[inline(always)]
    fn copysign(self, mag: __m512, sign: __m512) -> __m512 {
        unsafe {
            let s = _mm512_set1_epi32(i32::MIN);
            let m = _mm512_andnot_si512(s, _mm512_castps_si512(mag));
            _mm512_castsi512_ps(_mm512_or_si512(
                m,
                _mm512_and_si512(s, _mm512_castps_si512(sign)),
            ))
        }
    }
    #[inline(always)]
    fn select_lt(self, a: __m512, b: __m512, x: __m512, y: __m512) -> __m512 {
        unsafe { _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b), y, x) }
    }
    #[inline(always)]
    fn count_gt(self, a: __m512, b: __m512) -> u32 {
        unsafe { u32::from(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b)).count_ones() }
    }
    #[inline(always)]
    fn transpose(self, src: &[f32], stride: usize, dst: &mut [f32], dst_stride: usize) {
        for (bi, bk) in [(0, 0), (0, 8), (8, 0), (8, 8)] {
            avx2::transpose8(
                &src[bi * stride + bk..],
                stride,
                &mut dst[bk * dst_stride + bi..],
                dst_stride,
            );
        }
    }
    #[inline(always)]
    fn load<T: Elem>(self, src: &[T]) -> __m512 {
        assert!(src.len() >= 16);
        let p = src.as_ptr();
        unsafe {
            match T::KIND {
                ElemKind::F32 => _mm512_loadu_ps(p as *const f32),
                ElemKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                ElemKind::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
                )),
                ElemKind::F64 => {
                    let lo = _mm512_cvtpd_ps(_mm512_loadu_pd(p as *const f64));
                    let hi = _mm512_cvtpd_ps(_mm512_loadu_pd((p as *const f64).add(8)));
                    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                        _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                        _mm256_castps_pd(hi),
                    ))
                }
            }
        }
    }
    #[inline(always)]
    fn store<T: Elem>(self, v: __m512, dst: &mut [T]) {
        assert!(dst.len() >= 16);
        let p = dst.as_mut_ptr();
        unsafe {
            match T::KIND {
                ElemKind::F32 => _mm512_storeu_ps(p as *mut f32, v),
                ElemKind::F16 => _mm256_storeu_si256(
                    p as *mut __m256i,
                    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v),
                ),
                ElemKind::BF16 => {
                    let bits = _mm512_castps_si512(v);
                    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
                    let rounded =
                        _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
                    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                    let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
                    let r = _mm512_srli_epi32::<16>(_mm512_mask_mov_epi32(rounded, nan, quiet));
                    _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(r))
                }
                ElemKind::F64 => {
                    let lo = _mm512_castps512_ps256(v);
                    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                    _mm512_storeu_pd(p as *mut f64, _mm512_cvtps_pd(lo));
                    _mm512_storeu_pd((p as *mut f64).add(8), _mm512_cvtps_pd(hi));
                }
            }
        }
    }
}
