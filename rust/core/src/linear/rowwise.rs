//! The two products whose rows are per-token results — the logits
//! `L = X · Wᵀ (+ b)` and the input gradient `dX = dL · W` — computed so that
//! every output element has one fixed sequence of operations, set by `D`
//! (and `C·S`) alone: never by the number of rows in the call, the chunk
//! size, the thread count, the tile an element falls in, or the weight's
//! class blocks. A row's logits and input gradient are therefore bitwise the
//! same whatever other rows share the call: the batch-invariance guarantee.
//!
//! * Logit `(r, j)`: a dot product of `x_r` and `w_j` with `L::N` lane
//!   accumulators over the body of `D` (lane `i` takes `k ≡ i mod N`, in `k`
//!   order, fused multiply-add), summed across lanes in the fixed order of
//!   `hsum`, then the `D mod N` tail added one by one, then the bias.
//! * Input gradient `(r, k)`: `Σ_j dL[r, j] W[j, k]` accumulated in class
//!   order, one lane per `k`, starting from zero. Class blocks store and
//!   reload the partial sums in the compute type, which is exact.
//!
//! Tiles of several rows and classes only interleave independent elements;
//! edge tiles run the same per-element sequence with fewer of them.

use super::gemm::GemmReal;
use crate::kernels::columns::Shared;
use crate::simd::{Lanes, Task};
use rayon::prelude::*;

/// Rows per tile, and classes per tile of the logits.
const R: usize = 4;
const TJ: usize = 4;
/// Classes per parallel piece of the logits.
const LOGIT_PIECE: usize = 256;
/// Classes per cache block (their weight rows are reused by every row tile).
const CLASS_BLOCK: usize = 16;
/// Input-gradient columns per parallel piece, and rows per piece.
const DX_COLS: usize = 128;
const DX_ROWS: usize = 256;
/// Weight bytes per cache block of the input-gradient product.
const DX_BLOCK_BYTES: usize = 1 << 18;

/// A row-major `rows x cols` matrix whose rows are `ld` apart.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a, G> {
    pub data: &'a [G],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl<G> Rows<'_, G> {
    /// Every element lies in `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.ld + self.cols <= self.data.len()
    }
}

/// `out[r * ld + j] = x_r · w_j (+ b_j)` for every row `r` of `x` and
/// class `j` (row `j` of `w`; `x` and `w` have `D` columns, `b` one value
/// per class).
pub(crate) fn logits<G: GemmReal>(
    x: Rows<'_, G>,
    w: Rows<'_, G>,
    bias: Option<&[G]>,
    (out, ld): (&mut [G], usize),
    threads: usize,
) {
    let (rows, d, classes) = (x.rows, x.cols, w.rows);
    let (x, w) = (x.data, w.data);
    assert!(x.len() >= rows * d && w.len() >= classes * d);
    assert!(rows == 0 || classes == 0 || (rows - 1) * ld + classes <= out.len());
    let dst = Shared::new(out);
    let run = |j0: usize| {
        let j1 = (j0 + LOGIT_PIECE).min(classes);
        G::dispatch(LogitTask {
            x,
            rows,
            d,
            w,
            bias,
            dst,
            ld,
            j0,
            j1,
        })
    };
    let pieces: Vec<usize> = (0..classes).step_by(LOGIT_PIECE).collect();
    if threads > 1 {
        pieces.into_par_iter().for_each(run);
    } else {
        pieces.into_iter().for_each(run);
    }
}

struct LogitTask<'a, G> {
    x: &'a [G],
    rows: usize,
    d: usize,
    w: &'a [G],
    bias: Option<&'a [G]>,
    dst: Shared<G>,
    ld: usize,
    j0: usize,
    j1: usize,
}

impl<G: GemmReal> Task<G> for LogitTask<'_, G> {
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<F = G>>(self, l: L) {
        let mut b0 = self.j0;
        while b0 < self.j1 {
            let b1 = (b0 + CLASS_BLOCK).min(self.j1);
            let full_rows = self.rows - self.rows % R;
            for r in (0..full_rows).step_by(R) {
                let mut j = b0;
                while j + TJ <= b1 {
                    self.tile::<L, R, TJ>(l, r, j);
                    j += TJ;
                }
                for j in j..b1 {
                    self.tile::<L, R, 1>(l, r, j);
                }
            }
            for r in full_rows..self.rows {
                for j in b0..b1 {
                    self.tile::<L, 1, 1>(l, r, j);
                }
            }
            b0 = b1;
        }
    }
}

impl<G: GemmReal> LogitTask<'_, G> {
    /// Logits of rows `r..r + NR` and classes `j..j + NJ`.
    #[inline(always)]
    fn tile<L: Lanes<F = G>, const NR: usize, const NJ: usize>(&self, l: L, r: usize, j: usize) {
        let d = self.d;
        let body = d - d % L::N;
        let xs: [&[G]; NR] = std::array::from_fn(|i| &self.x[(r + i) * d..(r + i + 1) * d]);
        let ws: [&[G]; NJ] = std::array::from_fn(|q| &self.w[(j + q) * d..(j + q + 1) * d]);
        let zero = l.splat(G::ZERO);
        let mut acc = [[zero; NJ]; NR];
        let mut k = 0;
        while k < body {
            let wv: [L::V; NJ] = std::array::from_fn(|q| l.load(&ws[q][k..]));
            for i in 0..NR {
                let xv = l.load(&xs[i][k..]);
                for q in 0..NJ {
                    acc[i][q] = l.mul_add(xv, wv[q], acc[i][q]);
                }
            }
            k += L::N;
        }
        let tl = l.tail();
        for i in 0..NR {
            for q in 0..NJ {
                let mut s = l.hsum(acc[i][q]);
                for kk in body..d {
                    let (xk, wk) = (tl.load(&xs[i][kk..]), tl.load(&ws[q][kk..]));
                    s = tl.hsum(tl.mul_add(xk, wk, tl.splat(s)));
                }
                if let Some(b) = self.bias {
                    s += b[j + q];
                }
                // SAFETY: each task owns the columns j0..j1 of every row.
                let o = unsafe { self.dst.get_mut((r + i) * self.ld + j + q, 1) };
                o[0] = s;
            }
        }
    }
}

/// `dx[r * D + k] = Σ_j dl[r, j] w[j, k]` for every row `r` of `dl` (`C`
/// columns) and column `k` of `w` (`C x D`). `accumulate`: added to what
/// `dx` holds, which continues the class order of an earlier call over the
/// classes before these.
pub(crate) fn input_grad<G: GemmReal>(
    dl: Rows<'_, G>,
    w: Rows<'_, G>,
    dx: &mut [G],
    accumulate: bool,
    threads: usize,
) {
    let (rows, classes, d, ld) = (dl.rows, w.rows, w.cols, dl.ld);
    assert!(dl.in_bounds() && w.in_bounds() && dl.cols == classes && dx.len() >= rows * d);
    let (dl, w) = (dl.data, w.data);
    let dst = Shared::new(dx);
    let run = |(r0, k0): (usize, usize)| {
        G::dispatch(DxTask {
            dl,
            ld,
            w,
            classes,
            dst,
            d,
            accumulate,
            rows: (r0, (r0 + DX_ROWS).min(rows)),
            cols: (k0, (k0 + DX_COLS).min(d)),
        })
    };
    let pieces: Vec<(usize, usize)> = (0..rows)
        .step_by(DX_ROWS)
        .flat_map(|r0| (0..d).step_by(DX_COLS).map(move |k0| (r0, k0)))
        .collect();
    if threads > 1 {
        pieces.into_par_iter().for_each(run);
    } else {
        pieces.into_iter().for_each(run);
    }
}

struct DxTask<'a, G> {
    dl: &'a [G],
    ld: usize,
    w: &'a [G],
    classes: usize,
    dst: Shared<G>,
    d: usize,
    accumulate: bool,
    rows: (usize, usize),
    cols: (usize, usize),
}

impl<G: GemmReal> Task<G> for DxTask<'_, G> {
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<F = G>>(self, l: L) {
        let (k0, k1) = self.cols;
        let block = (DX_BLOCK_BYTES / (std::mem::size_of::<G>() * (k1 - k0).max(1))).max(1);
        let (r0, r1) = self.rows;
        let full_rows = r1 - (r1 - r0) % R;
        let mut c0 = 0;
        loop {
            let c1 = (c0 + block).min(self.classes);
            let fresh = c0 == 0 && !self.accumulate;
            for r in (r0..full_rows).step_by(R) {
                self.strip::<L, R>(l, r, (c0, c1), fresh);
            }
            for r in full_rows..r1 {
                self.strip::<L, 1>(l, r, (c0, c1), fresh);
            }
            c0 = c1;
            if c0 >= self.classes {
                break;
            }
        }
    }
}

impl<G: GemmReal> DxTask<'_, G> {
    /// The task's columns of rows `r..r + NR`, over classes `c0..c1`: whole
    /// vectors of `L` up to the end of the row's body; the row's tail
    /// (`d mod N`) always goes to the one-lane type.
    #[inline(always)]
    fn strip<L: Lanes<F = G>, const NR: usize>(
        &self,
        l: L,
        r: usize,
        cls: (usize, usize),
        fresh: bool,
    ) {
        let (k0, k1) = self.cols;
        let vec_end = k1.min(self.d - self.d % L::N);
        let mut k = k0;
        while k + 4 * L::N <= vec_end {
            self.tile::<L, NR, 4>(l, r, k, cls, fresh);
            k += 4 * L::N;
        }
        while k < vec_end {
            self.tile::<L, NR, 1>(l, r, k, cls, fresh);
            k += L::N;
        }
        while k < k1 {
            self.tile::<L::Tail, NR, 1>(l.tail(), r, k, cls, fresh);
            k += 1;
        }
    }

    /// `dx` of rows `r..r + NR`, columns `k..k + Q·N`, over classes `c0..c1`.
    #[inline(always)]
    fn tile<L: Lanes<F = G>, const NR: usize, const Q: usize>(
        &self,
        l: L,
        r: usize,
        k: usize,
        (c0, c1): (usize, usize),
        fresh: bool,
    ) {
        let (n, d) = (L::N, self.d);
        let zero = l.splat(G::ZERO);
        let mut acc = [[zero; Q]; NR];
        if !fresh {
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: each task owns its rows x columns of dx.
                let src = unsafe { self.dst.get((r + i) * d + k, Q * n) };
                for (q, v) in a.iter_mut().enumerate() {
                    *v = l.load(&src[q * n..]);
                }
            }
        }
        let dls: [&[G]; NR] = std::array::from_fn(|i| &self.dl[(r + i) * self.ld + c0..]);
        for (c, wr) in self.w[c0 * d..c1 * d].chunks_exact(d).enumerate() {
            let wv: [L::V; Q] = std::array::from_fn(|q| l.load(&wr[k + q * n..]));
            for i in 0..NR {
                let g = l.splat(dls[i][c]);
                for q in 0..Q {
                    acc[i][q] = l.mul_add(g, wv[q], acc[i][q]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: as above.
            let out = unsafe { self.dst.get_mut((r + i) * d + k, Q * n) };
            for (q, &v) in a.iter().enumerate() {
                l.store(v, &mut out[q * n..]);
            }
        }
    }
}
