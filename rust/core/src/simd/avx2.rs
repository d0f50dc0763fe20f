//! Eight float32 lanes on AVX2 + FMA + F16C.

use super::*;
use crate::elem::{Elem, ElemKind};
use std::arch::x86_64::*;

/// Token for AVX2 + FMA + F16C; only [`Avx2::new`] makes one, after checking
/// the CPU.
#[derive(Clone, Copy, Debug)]
pub struct Avx2 {
    _proof: (),
}

impl Avx2 {
    pub fn new() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx2 { _proof: () })
    }
}

/// Runs `task` with every generic kernel it calls compiled for AVX2.
pub(crate) fn run<F: Real, K: Task<F>>(task: K, l: Avx2) -> K::Output
where
    Avx2: Lanes<F = F>,
{
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn inner<F: Real, K: Task<F>>(task: K, l: Avx2) -> K::Output
    where
        Avx2: Lanes<F = F>,
    {
        task.run(l)
    }
    // SAFETY: an `Avx2` token exists only when the CPU has AVX2, FMA and F16C.
    unsafe { inner(task, l) }
}

// SAFETY (every `unsafe` block below): the intrinsics need AVX2/FMA/F16C,
// which the `Avx2` token proves present; memory is touched only through
// `loadu`/`storeu` on slices whose length was asserted to cover 8 elements.
impl Lanes for Avx2 {
    type F = f32;
    type V = __m256;
    type Tail = ScalarF32;
    const N: usize = 8;
    const REGS: usize = 16;

    #[inline(always)]
    fn tail(self) -> ScalarF32 {
        ScalarF32
    }
    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn max(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn exp(self, x: __m256) -> __m256 {
        unsafe {
            // max returns its second operand when either is NaN: NaN survives.
            let xc = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x);
            let t = _mm256_fmadd_ps(xc, _mm256_set1_ps(LOG2E), _mm256_set1_ps(EXP_SHIFT));
            let n = _mm256_sub_ps(t, _mm256_set1_ps(EXP_SHIFT));
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(EXP_P0);
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P1));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
            let y = _mm256_add_ps(
                _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                _mm256_set1_ps(1.0),
            );
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_castps_si256(t)));
            let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LO));
            _mm256_andnot_ps(under, _mm256_mul_ps(y, pow2))
        }
    }
    #[inline(always)]
    fn hsum(self, v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn hmax(self, v: __m256) -> f32 {
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn div(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_div_ps(a, b) }
    }
    #[inline(always)]
    fn abs(self, a: __m256) -> __m256 {
        unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), a) }
    }
    #[inline(always)]
    fn copysign(self, mag: __m256, sign: __m256) -> __m256 {
        unsafe {
            let s = _mm256_set1_ps(-0.0);
            _mm256_or_ps(_mm256_andnot_ps(s, mag), _mm256_and_ps(s, sign))
        }
    }
    #[inline(always)]
    fn select_lt(self, a: __m256, b: __m256, x: __m256, y: __m256) -> __m256 {
        unsafe { _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_LT_OQ>(a, b)) }
    }
    #[inline(always)]
    fn count_gt(self, a: __m256, b: __m256) -> u32 {
        unsafe { (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(a, b)) as u32).count_ones() }
    }
    #[inline(always)]
    fn transpose(self, src: &[f32], stride: usize, dst: &mut [f32], dst_stride: usize) {
        transpose8(src, stride, dst, dst_stride);
    }
    #[inline(always)]
    fn load<T: Elem>(self, src: &[T]) -> __m256 {
        assert!(src.len() >= 8);
        let p = src.as_ptr();
        unsafe {
            match T::KIND {
                ElemKind::F32 => _mm256_loadu_ps(p as *const f32),
                ElemKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                ElemKind::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                )),
                ElemKind::F64 => _mm256_set_m128(
                    _mm256_cvtpd_ps(_mm256_loadu_pd((p as *const f64).add(4))),
                    _mm256_cvtpd_ps(_mm256_loadu_pd(p as *const f64)),
                ),
            }
        }
    }
    #[inline(always)]
    fn store<T: Elem>(self, v: __m256, dst: &mut [T]) {
        assert!(dst.len() >= 8);
        let p = dst.as_mut_ptr();
        unsafe {
            match T::KIND {
                ElemKind::F32 => _mm256_storeu_ps(p as *mut f32, v),
                ElemKind::F16 => _mm_storeu_si128(
                    p as *mut __m128i,
                    _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v),
                ),
                ElemKind::BF16 => {
                    let bits = _mm256_castps_si256(v);
                    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
                    let rounded =
                        _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
                    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                    let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
                    let r = _mm256_srli_epi32::<16>(_mm256_blendv_epi8(rounded, quiet, nan));
                    let packed = _mm_packus_epi32(
                        _mm256_castsi256_si128(r),
                        _mm256_extracti128_si256::<1>(r),
                    );
                    _mm_storeu_si128(p as *mut __m128i, packed)
                }
                ElemKind::F64 => {
                    _mm256_storeu_pd(p as *mut f64, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
                    _mm256_storeu_pd(
                        (p as *mut f64).add(4),
                        _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
                    );
                }
            }
        }
    }
}

/// `dst[k · dst_stride + i] = src[i · stride + k]` for an 8 x 8 block, by
/// register shuffles. Callers hold an `Avx2` or `Avx512` token (both mean
/// AVX2 is present), and the bounds are asserted.
#[inline(always)]
pub(crate) fn transpose8(src: &[f32], stride: usize, dst: &mut [f32], dst_stride: usize) {
    assert!(src.len() >= 7 * stride + 8 && dst.len() >= 7 * dst_stride + 8);
    // SAFETY: AVX2 is present (see above); the 8 rows read and the 8 rows
    // written lie inside the slices (asserted).
    unsafe {
        transpose8_raw(
            src.as_ptr().cast(),
            4 * stride,
            dst.as_mut_ptr().cast(),
            4 * dst_stride,
        )
    }
}

/// [`transpose8`] of 32-bit elements at `s` and `d`, of any alignment, with
/// the strides between rows in bytes.
///
/// # Safety
/// AVX2 must be present; the 8 rows of 32 bytes from `s` (rows `stride`
/// bytes apart) must be readable and those from `d` writable.
#[inline(always)]
pub(crate) unsafe fn transpose8_raw(s: *const u8, stride: usize, d: *mut u8, dst_stride: usize) {
    // SAFETY: the caller's contract: AVX2, and the rows in bounds.
    unsafe {
        let r: [__m256; 8] =
            std::array::from_fn(|i| _mm256_loadu_ps(s.add(i * stride).cast::<f32>()));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let o = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (k, v) in o.into_iter().enumerate() {
            _mm256_storeu_ps(d.add(k * dst_stride).cast::<f32>(), v);
        }
    }
}
