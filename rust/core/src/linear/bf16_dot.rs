//! The logits of bfloat16 linear calls by AVX512_BF16 dot products
//! (`vdpbf16ps`: each float32 lane adds the two products of a pair of
//! bfloat16 lanes), twice the float32 FMA's multiply-adds per instruction.
//! No float32 copy of the weight is made for them.
//!
//! * Logit `(r, j)`: `acc = dot(acc, x_r[2p..2p+2], w_j[2p..2p+2])` over the
//!   pairs `p = 0..⌈D/2⌉` in order, from zero (an odd `D`'s last pair is
//!   padded with zeros), then the bias added in float32. The sequence is
//!   fixed by `D` alone, so a row's logits are the same bits whatever the
//!   batch, chunk, tile or thread count: the batch-invariance guarantee of
//!   `rowwise.rs`, with another sequence than its float32 chain.
//! * The instruction reads bfloat16 subnormals as zero and flushes
//!   subnormal sums to zero, whatever the MXCSR says (as the bfloat16
//!   products of oneDNN, which PyTorch uses on these CPUs, do).
//! * Vectors run across classes: a panel of 32 classes holds, for each pair
//!   `p`, the 32 classes' pairs side by side (the weight's pairs transposed
//!   as 32-bit elements); each row's pair is broadcast. `D` is cut into
//!   blocks of at most [`KC`] pairs whose partial sums wait, exactly, in the
//!   output.
//!
//! Only CPUs with AVX512_BF16 run this (`simd::Bf16Dot`); elsewhere bfloat16
//! calls widen to float32 and take `rowwise.rs`.

use crate::threads::PerThread;
use half::bf16;

/// Pairs of `D` per panel block at most: 32 classes of 2048 pairs are a
/// 256 KiB panel (`D` = 4096 in one block; at (1024, 4096, 128256) it ran
/// 1% faster than 1024 pairs, within the noise).
const KC: usize = 2048;
/// Classes per packed panel: two vectors of 16 float32 lanes.
const NP: usize = 32;

/// The pairs of a row of `d` values.
pub(crate) fn pairs(d: usize) -> usize {
    d.div_ceil(2)
}

/// Elements of one thread's packed panel for `D = d`.
pub(crate) fn panel_len(d: usize) -> usize {
    NP * pairs(d).min(KC)
}

/// Rows per group of the packed rows, and per full tile.
const MR: usize = 8;

/// Elements of the packed form of `rows` rows of `d` values ([`pack_rows`]).
pub(crate) fn packed_rows_len(rows: usize, d: usize) -> usize {
    rows.div_ceil(MR) * MR * pairs(d)
}

/// The rows of `x` (`D = d`) as pairs, in groups of [`MR`] rows whose pairs
/// of one index lie side by side: `out[(g·P + p)·MR + i]` holds `x[r, 2p]`
/// in the low half and `x[r, 2p + 1]` (zero past `D`) in the high half, for
/// row `r = g·MR + i` (zero past the last row); `P` = [`pairs`]. A tile's
/// broadcasts then read consecutive words.
pub(crate) fn pack_rows(x: &[bf16], d: usize, out: &mut [u32]) {
    let p = pairs(d);
    if p == 0 {
        return;
    }
    let rows = x.len() / d;
    crate::threads::for_pieces(out, p * MR, |g, group| {
        for i in 0..MR {
            let r = g * MR + i;
            if r >= rows {
                (0..p).for_each(|k| group[k * MR + i] = 0);
                continue;
            }
            for (k, two) in x[r * d..(r + 1) * d].chunks(2).enumerate() {
                let hi = two.get(1).map_or(0, |h| h.to_bits());
                group[k * MR + i] = u32::from(two[0].to_bits()) | u32::from(hi) << 16;
            }
        }
    });
}

/// The dot-product path, when this CPU has it (a token that proves it).
#[derive(Clone, Copy)]
pub(crate) struct Dot {
    #[cfg(target_arch = "x86_64")]
    tok: crate::simd::Bf16Dot,
}

impl Dot {
    /// `Some` when the CPU has AVX512_BF16 and `FUSEDCE_SIMD` allows it.
    pub fn new() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            crate::simd::Bf16Dot::new().map(|tok| Dot { tok })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }
}

/// The operands of one logits product.
pub(crate) struct Operands<'a> {
    /// The rows as [`pack_rows`] packs them.
    pub x: &'a [u32],
    pub rows: usize,
    /// `classes x D` weight.
    pub w: &'a [bf16],
    pub classes: usize,
    pub d: usize,
    /// One value per class.
    pub bias: Option<&'a [f32]>,
}

impl Dot {
    /// `out[r · ld + j] = x_r · w_j (+ b_j)` for every row and class of
    /// `ops`. `panels`: one buffer of [`panel_len`] elements per thread.
    pub fn logits(
        self,
        ops: &Operands<'_>,
        (out, ld): (&mut [f32], usize),
        threads: usize,
        panels: &PerThread<Vec<u32>>,
    ) {
        #[cfg(target_arch = "x86_64")]
        kernel::logits(self.tok, ops, (out, ld), threads, panels);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (ops, out, ld, threads, panels);
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{Operands, KC, MR, NP};
    use crate::kernels::columns::Shared;
    use crate::simd::{transpose8_raw, Bf16Dot};
    use crate::threads::PerThread;
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Classes per parallel task: a task computes its classes of every row.
    const PIECE: usize = 256;

    pub(super) fn logits(
        tok: Bf16Dot,
        ops: &Operands<'_>,
        (out, ld): (&mut [f32], usize),
        threads: usize,
        panels: &PerThread<Vec<u32>>,
    ) {
        let p = super::pairs(ops.d);
        assert!(ops.x.len() >= super::packed_rows_len(ops.rows, ops.d));
        assert!(ops.w.len() >= ops.classes * ops.d);
        assert!(ops.bias.is_none_or(|b| b.len() >= ops.classes));
        assert!(
            ops.rows == 0 || ops.classes == 0 || (ops.rows - 1) * ld + ops.classes <= out.len()
        );
        let dst = Shared::new(out);
        let run = |j0: usize| {
            let task = Task {
                ops,
                p,
                dst,
                ld,
                j0,
                j1: (j0 + PIECE).min(ops.classes),
            };
            panels.with(|packed| {
                assert!(packed.len() >= super::panel_len(ops.d));
                // SAFETY: the token proves AVX-512F and AVX512_BF16 (and the
                // AVX2 of `Avx512`); the bounds the kernel relies on are
                // asserted above and here.
                unsafe { task.run(tok, packed) }
            })
        };
        let pieces: Vec<usize> = (0..ops.classes).step_by(PIECE).collect();
        if threads > 1 {
            pieces.into_par_iter().for_each(run);
        } else {
            pieces.into_iter().for_each(run);
        }
    }

    /// Classes `j0..j1` of every row.
    struct Task<'a> {
        ops: &'a Operands<'a>,
        /// Pairs per row.
        p: usize,
        dst: Shared<f32>,
        ld: usize,
        j0: usize,
        j1: usize,
    }

    /// One packed panel: classes `j..j + nj` over the pairs `k0..k1`
    /// (`last`: the final block of `D`, after which the bias is added).
    #[derive(Clone, Copy)]
    struct Panel {
        j: usize,
        nj: usize,
        k0: usize,
        k1: usize,
        last: bool,
    }

    impl Task<'_> {
        /// The task's classes, [`NP`] at a time, over `D` in blocks of
        /// [`KC`] pairs: each block of each panel is packed once and used
        /// by every row tile.
        ///
        /// # Safety
        /// The CPU has AVX-512F, AVX2 and AVX512_BF16; `packed` holds
        /// `panel_len(d)` elements; the operands' bounds were asserted.
        #[target_feature(enable = "avx512f,avx512bf16,avx2,fma")]
        unsafe fn run(&self, _tok: Bf16Dot, packed: &mut [u32]) {
            let mut k0 = 0;
            loop {
                let k1 = (k0 + KC).min(self.p);
                let last = k1 == self.p;
                let mut j = self.j0;
                while j < self.j1 {
                    let nj = NP.min(self.j1 - j);
                    let panel = Panel {
                        j,
                        nj,
                        k0,
                        k1,
                        last,
                    };
                    self.pack(packed, &panel);
                    let rows = self.ops.rows;
                    let full = rows - rows % MR;
                    for r in (0..full).step_by(MR) {
                        self.tile::<MR>(packed, &panel, r);
                    }
                    self.edge_tiles(packed, &panel, full);
                    j += nj;
                }
                if last {
                    break;
                }
                k0 = k1;
            }
        }

        /// The rows from `r` on, fewer than a full tile: tiles of 4, 2 and 1
        /// rows.
        #[inline(always)]
        fn edge_tiles(&self, packed: &[u32], panel: &Panel, mut r: usize) {
            let rows = self.ops.rows;
            if r + 4 <= rows {
                self.tile::<4>(packed, panel, r);
                r += 4;
            }
            if r + 2 <= rows {
                self.tile::<2>(packed, panel, r);
                r += 2;
            }
            if r < rows {
                self.tile::<1>(packed, panel, r);
            }
        }

        /// Class `c`'s pair `k` as one `u32` (low half first; zero past `D`).
        #[inline(always)]
        fn pair(&self, c: usize, k: usize) -> u32 {
            let (w, d) = (self.ops.w, self.ops.d);
            let lo = w[c * d + 2 * k].to_bits();
            let hi = if 2 * k + 1 < d {
                w[c * d + 2 * k + 1].to_bits()
            } else {
                0
            };
            u32::from(lo) | u32::from(hi) << 16
        }

        /// `packed[(k - k0)·NP + q]` = class `j + q`'s pair `k` (zero beyond
        /// the `nj` classes): 8 x 8 blocks of whole pairs transposed in
        /// registers, the edges one by one.
        #[inline(always)]
        fn pack(&self, packed: &mut [u32], p: &Panel) {
            let (w, d) = (self.ops.w, self.ops.d);
            let (kn, whole) = (p.k1 - p.k0, d / 2);
            assert!(packed.len() >= kn * NP);
            for q0 in (0..NP).step_by(8) {
                let mut kk = 0;
                if q0 + 8 <= p.nj {
                    while kk + 8 <= kn && p.k0 + kk + 8 <= whole {
                        let at = (p.j + q0) * d + 2 * (p.k0 + kk);
                        // SAFETY: AVX2 (the caller's feature); the 8 rows of
                        // 8 whole pairs read lie in `w` (classes `j + q0 + 7
                        // < classes`, pairs below `d / 2`), the 8 rows of 8
                        // written in `packed` (`kk + 8 <= kn`, `q0 + 8 <=
                        // NP`, the length asserted above).
                        unsafe {
                            transpose8_raw(
                                w.as_ptr().add(at).cast(),
                                2 * d,
                                packed.as_mut_ptr().add(kk * NP + q0).cast(),
                                4 * NP,
                            );
                        }
                        kk += 8;
                    }
                }
                for kk in kk..kn {
                    for q in q0..q0 + 8 {
                        packed[kk * NP + q] = if q < p.nj {
                            self.pair(p.j + q, p.k0 + kk)
                        } else {
                            0
                        };
                    }
                }
            }
        }

        /// Logits of rows `r..r + NR` and the panel's classes over its
        /// pairs: each element's chain continues from what the block before
        /// left in the output (from zero for the first), in pair order; the
        /// bias is added after the last block.
        #[inline(always)]
        fn tile<const NR: usize>(&self, packed: &[u32], p: &Panel, r: usize) {
            let kn = p.k1 - p.k0;
            // the rows' group, and the first row's place in it
            let (g, i0) = (r / MR, r % MR);
            assert!(packed.len() >= kn * NP && i0 + NR <= MR);
            assert!(((g * self.p + p.k1) * MR) <= self.ops.x.len());
            let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
            let (m0, m1) = (lanes(p.nj), lanes(p.nj.saturating_sub(16)));
            // SAFETY: AVX-512F and AVX512_BF16 (the caller's features). Each
            // task owns the columns `j0..j1` of every row of the output, and
            // `get`/`get_mut` check the `nj` columns are inside it; the masked
            // loads and stores touch only the first `nj` of them (masked-off
            // lanes are not accessed). The rows' pairs and the panel are in
            // bounds (asserted above); `bias` holds every class.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); 2]; NR];
                if p.k0 > 0 {
                    for (i, a) in acc.iter_mut().enumerate() {
                        let o = self.dst.get((r + i) * self.ld + p.j, p.nj).as_ptr();
                        *a = [
                            _mm512_maskz_loadu_ps(m0, o),
                            _mm512_maskz_loadu_ps(m1, o.wrapping_add(16)),
                        ];
                    }
                }
                let xs = self.ops.x.as_ptr().add((g * self.p + p.k0) * MR + i0);
                let wp = packed.as_ptr();
                for kk in 0..kn {
                    let w0: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(wp.add(kk * NP).cast()));
                    let w1: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(wp.add(kk * NP + 16).cast()));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xb: __m512bh =
                            std::mem::transmute(_mm512_set1_epi32(*xs.add(kk * MR + i) as i32));
                        *a = [
                            _mm512_dpbf16_ps(a[0], xb, w0),
                            _mm512_dpbf16_ps(a[1], xb, w1),
                        ];
                    }
                }
                if let Some(b) = self.ops.bias.filter(|_| p.last) {
                    let bp = b[p.j..p.j + p.nj].as_ptr();
                    let (b0, b1) = (
                        _mm512_maskz_loadu_ps(m0, bp),
                        _mm512_maskz_loadu_ps(m1, bp.wrapping_add(16)),
                    );
                    for a in acc.iter_mut() {
                        *a = [_mm512_add_ps(a[0], b0), _mm512_add_ps(a[1], b1)];
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    let o = self.dst.get_mut((r + i) * self.ld + p.j, p.nj).as_mut_ptr();
                    _mm512_mask_storeu_ps(o, m0, a[0]);
                    _mm512_mask_storeu_ps(o.wrapping_add(16), m1, a[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    struct Case {
        classes: usize,
        d: usize,
        x: Vec<bf16>,
        w: Vec<bf16>,
        bias: Option<Vec<f32>>,
    }

    /// Values `gen()` for an `(rows, classes, d)` problem, with a bias.
    fn case(rows: usize, classes: usize, d: usize, mut gen: impl FnMut() -> f32) -> Case {
        let mut v = |n: usize| -> Vec<bf16> { (0..n).map(|_| bf16::from_f32(gen())).collect() };
        let (x, w) = (v(rows * d), v(classes * d));
        let bias = Some(v(classes).into_iter().map(bf16::to_f32).collect());
        Case {
            classes,
            d,
            x,
            w,
            bias,
        }
    }

    /// The logits of rows `r0..r1` of `c` on `threads` threads (`None`
    /// without the CPU feature).
    fn logits(c: &Case, (r0, r1): (usize, usize), threads: usize) -> Option<Vec<f32>> {
        let dot = Dot::new()?;
        let (rows, d) = (r1 - r0, c.d);
        let mut x = vec![0u32; packed_rows_len(rows, d)];
        pack_rows(&c.x[r0 * d..r1 * d], d, &mut x);
        let panels = PerThread::new(threads, || Ok(vec![0u32; panel_len(d)])).unwrap();
        let mut out = vec![f32::NAN; rows * c.classes];
        let ops = Operands {
            x: &x,
            rows,
            w: &c.w,
            classes: c.classes,
            d,
            bias: c.bias.as_deref(),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| dot.logits(&ops, (&mut out, c.classes), threads, &panels));
        Some(out)
    }

    fn skip() {
        eprintln!("this CPU has no AVX512_BF16 dot products: nothing to test");
    }

    /// Small integers: every product and partial sum is exact in float32,
    /// so each logit must be the exact dot product plus the bias. Shapes
    /// cover edge tiles, a partial panel, pieces and several blocks of `D`
    /// (odd `D` included).
    #[test]
    fn small_integer_products_are_exact() {
        let mut seed = 3;
        let shapes = [
            (1, 1, 1),
            (3, 31, 7),
            (13, 33, 17),
            (9, 300, 2 * KC + 3),
            (8, 40, 2 * KC),
        ];
        for (rows, classes, d) in shapes {
            let c = case(rows, classes, d, || {
                (lcg(&mut seed) * 17.0).floor() as f32 - 8.0
            });
            let Some(got) = logits(&c, (0, rows), 2) else {
                return skip();
            };
            let bias = c.bias.as_ref().unwrap();
            for r in 0..rows {
                for j in 0..classes {
                    let dot: f64 = (0..d)
                        .map(|k| c.x[r * d + k].to_f64() * c.w[j * d + k].to_f64())
                        .sum();
                    let want = (dot + f64::from(bias[j])) as f32;
                    assert_eq!(
                        got[r * classes + j],
                        want,
                        "({rows}, {classes}, {d}) at ({r}, {j})"
                    );
                }
            }
        }
    }

    /// A row's logits are the same bits alone, in any batch, on any number
    /// of threads.
    #[test]
    fn a_rows_logits_do_not_depend_on_the_batch_or_threads() {
        let mut seed = 5;
        let (rows, classes, d) = (19, 300, 2 * KC + 5);
        let c = case(rows, classes, d, || (lcg(&mut seed) - 0.5) as f32);
        let Some(all) = logits(&c, (0, rows), 1) else {
            return skip();
        };
        assert_eq!(logits(&c, (0, rows), 3).unwrap(), all);
        for (r0, r1) in [(0, 1), (18, 19), (3, 12), (5, 10), (1, 19)] {
            let part = logits(&c, (r0, r1), 2).unwrap();
            assert_eq!(part, all[r0 * classes..r1 * classes], "rows {r0}..{r1}");
        }
    }

    /// The instruction reads a bfloat16 subnormal as zero: its product with
    /// a large weight, a normal float32, does not count.
    #[test]
    fn subnormal_inputs_count_as_zero() {
        let tiny = bf16::from_bits(0x0001); // the smallest subnormal, 9.2e-41
        let c = Case {
            classes: 1,
            d: 2,
            x: vec![tiny, bf16::ONE],
            w: vec![bf16::from_f32(2f32.powi(100)), bf16::ZERO],
            bias: None,
        };
        let Some(got) = logits(&c, (0, 1), 1) else {
            return skip();
        };
        assert!(tiny.to_f64() * 2f64.powi(100) > 1e-11);
        assert_eq!(got, [0.0]);
    }
}
