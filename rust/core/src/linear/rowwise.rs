//! The two products whose rows are per-token results — the logits
//! `L = X · Wᵀ (+ b)` and the input gradient `dX = dL · W` — computed so that
//! every output element has one fixed sequence of operations, set by `D`
//! (and `C·S`) alone: never by the number of rows in the call, the chunk
//! size, the thread count, the tile an element falls in, or the weight's
//! class blocks. A row's logits and input gradient are therefore bitwise the
//! same whatever other rows share the call: the batch-invariance guarantee.
//!
//! * Logit `(r, j)`: one fused multiply-add chain `acc = x[r,k]·w[j,k] +
//!   acc` over `k = 0..D` in order, from zero, then the bias: the same
//!   sequence on every SIMD level. Vectors run across classes (a panel of
//!   `2·N` classes, its weight packed transposed into the thread's panel, `D` in
//!   blocks whose partial sums wait in the output), so no horizontal sum is
//!   needed: the product runs at the FMA rate.
//! * Input gradient `(r, k)`: `Σ_j dL[r, j] W[j, k]` accumulated in class
//!   order by fused multiply-adds, one lane per `k` (the one-lane ends of
//!   rows too), starting from zero. Class blocks store and
//!   reload the partial sums in the compute type, which is exact.
//!
//! Tiles of several rows and classes only interleave independent elements;
//! edge tiles run the same per-element sequence with fewer of them.

use super::gemm::GemmReal;
use crate::kernels::columns::Shared;
use crate::simd::{Lanes, Task};
use crate::threads::PerThread;
use rayon::prelude::*;

/// Classes per parallel piece of the logits.
const LOGIT_PIECE: usize = 256;
/// Bytes of the largest packed weight panel (one per thread, on the heap:
/// a kernel's stack frame must fit the smallest thread stack a caller may
/// run it on, since the calling thread works in its own pool). The larger the
/// panel, the fewer blocks `D` is cut into, and each block stores and
/// reloads the partial logits of every row: at (2048, 2048, 32000), 128 KiB
/// panels (two blocks) ran the forward in 1.36–1.44 s, 64 KiB in 1.40–1.47 s,
/// 32 KiB in 1.49–1.59 s and 16 KiB in 1.70–1.89 s.
const PANEL_BYTES: usize = 128 << 10;
/// Elements of the smaller panels, used when a whole panel of `D` fits one:
/// a call with a short `D` does not zero a large panel per task.
const SMALL_PANELS: [usize; 2] = [2048, 8192];
/// The widest vector, in lanes (AVX-512 float32).
const MAX_LANES: usize = 16;
/// Input-gradient columns per parallel piece.
const DX_COLS: usize = 128;
/// Input-gradient pieces wanted per thread, to even out their loads.
const DX_PIECES_PER_THREAD: usize = 4;
/// The fewest rows in an input-gradient piece. Every piece copies its
/// columns of the whole weight once, whatever its rows: at (2048, 2048,
/// 32000) forward+backward, perf gave the copies 6% of the samples with
/// pieces of 252 rows (three per chunk of 524), 3% with one piece per chunk.
const DX_MIN_ROWS: usize = 96;
/// Rows of an input-gradient piece are a multiple of both tiles' rows (6
/// and 4), so that only the last piece has an edge.
const DX_ROW_STEP: usize = 12;

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

/// Elements of the packed panel that [`logits`] needs for `D = d`, at most
/// (the panel [`LogitTask::sized`] picks for the widest lanes).
pub(crate) fn panel_len<G>(d: usize) -> usize {
    let need = 2 * MAX_LANES * d;
    if need <= SMALL_PANELS[0] {
        SMALL_PANELS[0]
    } else if need <= SMALL_PANELS[1] {
        SMALL_PANELS[1]
    } else {
        PANEL_BYTES / std::mem::size_of::<G>()
    }
}

/// `out[r * ld + j] = x_r · w_j (+ b_j)` for every row `r` of `x` and
/// class `j` (row `j` of `w`; `x` and `w` have `D` columns, `b` one value
/// per class). `panels`: one buffer of [`panel_len`] elements per thread.
pub(crate) fn logits<G: GemmReal>(
    x: Rows<'_, G>,
    w: Rows<'_, G>,
    bias: Option<&[G]>,
    (out, ld): (&mut [G], usize),
    threads: usize,
    panels: &PerThread<Vec<G>>,
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
            panels,
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
    panels: &'a PerThread<Vec<G>>,
}

impl<G: GemmReal> Task<G> for LogitTask<'_, G> {
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<F = G>>(self, l: L) {
        if L::REGS >= 32 {
            self.sized::<L, 8>(l);
        } else {
            self.sized::<L, 6>(l);
        }
    }
}

/// One packed panel: classes `j..j + nj` over `k0..k1` (`last`: the final
/// block of `D`, after which the bias is added).
#[derive(Clone, Copy)]
struct Panel<'a, G> {
    packed: &'a [G],
    j: usize,
    nj: usize,
    k0: usize,
    k1: usize,
    last: bool,
}

impl<G: GemmReal> LogitTask<'_, G> {
    /// [`Self::panels`] with the smallest of [`SMALL_PANELS`] that holds a
    /// whole panel of `D`, else a panel of [`PANEL_BYTES`].
    #[inline(always)]
    fn sized<L: Lanes<F = G>, const MR: usize>(&self, l: L) {
        const F32_PANEL: usize = PANEL_BYTES / 4;
        const F64_PANEL: usize = PANEL_BYTES / 8;
        const TINY: usize = SMALL_PANELS[0];
        const SMALL: usize = SMALL_PANELS[1];
        let need = 2 * L::N * self.d;
        if need <= TINY {
            self.panels::<L, MR, TINY>(l);
        } else if need <= SMALL {
            self.panels::<L, MR, SMALL>(l);
        } else if std::mem::size_of::<G>() == 4 {
            self.panels::<L, MR, F32_PANEL>(l);
        } else {
            self.panels::<L, MR, F64_PANEL>(l);
        }
    }

    /// The task's classes, `2·N` at a time (a panel), over `D` in blocks of
    /// `kc` (as many as fit `P` elements): each block of each panel is
    /// packed (transposed) once and used by every row tile. The blocks only
    /// store and reload exact partial sums: `P` never changes a bit.
    #[inline(always)]
    fn panels<L: Lanes<F = G>, const MR: usize, const P: usize>(&self, l: L) {
        self.panels_in::<L, MR>(l, &mut self.panels.lock()[..P]);
    }

    /// [`Self::panels`] with `packed` (`P` elements) as the panel.
    #[inline(always)]
    fn panels_in<L: Lanes<F = G>, const MR: usize>(&self, l: L, packed: &mut [G]) {
        let np = 2 * L::N;
        let kc = (packed.len() / np).max(1);
        let mut k0 = 0;
        loop {
            let k1 = (k0 + kc).min(self.d);
            let last = k1 == self.d;
            let mut j = self.j0;
            while j < self.j1 {
                let nj = np.min(self.j1 - j);
                self.pack(l, packed, j, nj, (k0, k1));
                let panel = Panel {
                    packed,
                    j,
                    nj,
                    k0,
                    k1,
                    last,
                };
                let full = self.rows - self.rows % MR;
                for r in (0..full).step_by(MR) {
                    self.tile::<L, MR>(l, &panel, r);
                }
                self.edge_tiles::<L>(l, &panel, full);
                j += nj;
            }
            if last {
                break;
            }
            k0 = k1;
        }
    }

    /// The rows from `r` on, fewer than a full tile: tiles of 4, 2 and 1
    /// rows (one row at a time would leave each chain waiting on its own
    /// latency).
    #[inline(always)]
    fn edge_tiles<L: Lanes<F = G>>(&self, l: L, panel: &Panel<'_, G>, mut r: usize) {
        if r + 4 <= self.rows {
            self.tile::<L, 4>(l, panel, r);
            r += 4;
        }
        if r + 2 <= self.rows {
            self.tile::<L, 2>(l, panel, r);
            r += 2;
        }
        if r < self.rows {
            self.tile::<L, 1>(l, panel, r);
        }
    }

    /// `packed[(k - k0)·np + q] = w[j + q, k]` (zero beyond the `nj` classes):
    /// `N x N` blocks transposed in registers, the edges one by one.
    #[inline(always)]
    fn pack<L: Lanes<F = G>>(
        &self,
        l: L,
        packed: &mut [G],
        j: usize,
        nj: usize,
        (k0, k1): (usize, usize),
    ) {
        let (n, d, np) = (L::N, self.d, 2 * L::N);
        let kn = k1 - k0;
        for q0 in (0..np).step_by(n) {
            let mut kk = 0;
            if q0 + n <= nj {
                while kk + n <= kn {
                    let src = &self.w[(j + q0) * d + k0 + kk..];
                    l.transpose(src, d, &mut packed[kk * np + q0..], np);
                    kk += n;
                }
            }
            for kk in kk..kn {
                for q in q0..q0 + n {
                    packed[kk * np + q] = if q < nj {
                        self.w[(j + q) * d + k0 + kk]
                    } else {
                        G::ZERO
                    };
                }
            }
        }
    }

    /// Logits of rows `r..r + NR` and the panel's classes `j..j + nj`, over
    /// `k0..k1`: each element's `mul_add` chain continues from what the block
    /// before left in `dst` (from zero for the first), in `k` order; the
    /// bias is added after the last block.
    #[inline(always)]
    fn tile<L: Lanes<F = G>, const NR: usize>(&self, l: L, p: &Panel<'_, G>, r: usize) {
        let (n, d) = (L::N, self.d);
        let Panel {
            packed,
            j,
            nj,
            k0,
            k1,
            last,
        } = *p;
        let mut acc = [[l.splat(G::ZERO); 2]; NR];
        let mut tmp = [G::ZERO; 2 * MAX_LANES];
        if k0 > 0 {
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: each task owns the columns j0..j1 of every row.
                let src = unsafe { self.dst.get((r + i) * self.ld + j, nj) };
                *a = load_pair(l, src, &mut tmp);
            }
        }
        let xs: [&[G]; NR] = std::array::from_fn(|i| &self.x[(r + i) * d + k0..(r + i) * d + k1]);
        for (kk, p) in packed.chunks_exact(2 * n).take(k1 - k0).enumerate() {
            let (w0, w1) = (l.load(p), l.load(&p[n..]));
            for i in 0..NR {
                // SAFETY: `kk < k1 - k0`, the length of every `xs[i]` (the
                // loop takes at most that many steps); unchecked, the row
                // pointers stay in registers instead of their lengths.
                let xb = l.splat(unsafe { *xs[i].get_unchecked(kk) });
                acc[i][0] = l.mul_add(xb, w0, acc[i][0]);
                acc[i][1] = l.mul_add(xb, w1, acc[i][1]);
            }
        }
        let bias = match self.bias {
            Some(b) if last => Some(load_pair(l, &b[j..j + nj], &mut tmp)),
            _ => None,
        };
        for (i, a) in acc.iter().enumerate() {
            let (mut v0, mut v1) = (a[0], a[1]);
            if let Some([b0, b1]) = bias {
                (v0, v1) = (l.add(v0, b0), l.add(v1, b1));
            }
            // SAFETY: as above.
            let out = unsafe { self.dst.get_mut((r + i) * self.ld + j, nj) };
            store_pair(l, [v0, v1], out, &mut tmp);
        }
    }
}

/// Two vectors from `src` (at most `2·N` values), zero past its end. A full
/// pair is loaded from `src` itself: a `memcpy` call per load through a
/// buffer took 4% of the (4096, 2048, 32000) forward.
#[inline(always)]
fn load_pair<G: GemmReal, L: Lanes<F = G>>(l: L, src: &[G], tmp: &mut [G]) -> [L::V; 2] {
    let n = L::N;
    if src.len() == 2 * n {
        return [l.load(src), l.load(&src[n..])];
    }
    tmp[..src.len()].copy_from_slice(src);
    tmp[src.len()..2 * n].fill(G::ZERO);
    [l.load(&tmp[..]), l.load(&tmp[n..])]
}

/// The first `out.len()` (at most `2·N`) values of a pair of vectors; a
/// full pair stored into `out` itself, as [`load_pair`] loads.
#[inline(always)]
fn store_pair<G: GemmReal, L: Lanes<F = G>>(
    l: L,
    [v0, v1]: [L::V; 2],
    out: &mut [G],
    tmp: &mut [G],
) {
    let n = L::N;
    if out.len() == 2 * n {
        l.store(v0, out);
        l.store(v1, &mut out[n..]);
        return;
    }
    l.store(v0, tmp);
    l.store(v1, &mut tmp[n..]);
    out.copy_from_slice(&tmp[..out.len()]);
}

/// `dx[r * D + k] = Σ_j dl[r, j] w[j, k]` for every row `r` of `dl` (`C`
/// columns) and column `k` of `w` (`C x D`). `accumulate`: added to what
/// `dx` holds, which continues the class order of an earlier call over the
/// classes before these. `panels`: each thread's buffer of [`panel_len`]
/// elements, into which the task's columns of a block of classes are
/// copied side by side (read from `w` itself, a class's columns are `D`
/// apart: every class a new page).
pub(crate) fn input_grad<G: GemmReal>(
    dl: Rows<'_, G>,
    w: Rows<'_, G>,
    dx: &mut [G],
    accumulate: bool,
    threads: usize,
    panels: &PerThread<Vec<G>>,
) {
    let (rows, classes, d, ld) = (dl.rows, w.rows, w.cols, dl.ld);
    assert!(dl.in_bounds() && w.in_bounds() && dl.cols == classes && dx.len() >= rows * d);
    let (dl, w) = (dl.data, w.data);
    let dst = Shared::new(dx);
    let piece_rows = dx_piece_rows(rows, d.div_ceil(DX_COLS), threads);
    let run = |(r0, k0): (usize, usize)| {
        G::dispatch(DxTask {
            dl,
            ld,
            w,
            classes,
            dst,
            d,
            accumulate,
            rows: (r0, (r0 + piece_rows).min(rows)),
            cols: (k0, (k0 + DX_COLS).min(d)),
            panels,
        })
    };
    let pieces: Vec<(usize, usize)> = (0..rows)
        .step_by(piece_rows)
        .flat_map(|r0| (0..d).step_by(DX_COLS).map(move |k0| (r0, k0)))
        .collect();
    if threads > 1 {
        pieces.into_par_iter().for_each(run);
    } else {
        pieces.into_iter().for_each(run);
    }
}

/// Rows per input-gradient piece: as many as leave [`DX_PIECES_PER_THREAD`]
/// pieces for each thread (fewer pieces, fewer copies of the weight), but
/// at least [`DX_MIN_ROWS`]. The pieces only share out the work: every
/// element's sequence over the classes is the same for any of them.
fn dx_piece_rows(rows: usize, col_pieces: usize, threads: usize) -> usize {
    let wanted = (DX_PIECES_PER_THREAD * threads).div_ceil(col_pieces.max(1));
    let rows = rows.div_ceil(wanted.max(1)).max(DX_MIN_ROWS);
    rows.next_multiple_of(DX_ROW_STEP)
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
    panels: &'a PerThread<Vec<G>>,
}

impl<G: GemmReal> Task<G> for DxTask<'_, G> {
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<F = G>>(self, l: L) {
        // tiles of R rows x Q vectors: R·Q accumulators, Q weight vectors
        // and a broadcast in the registers
        if L::REGS >= 32 {
            self.blocks::<L, 6, 4>(l, &mut self.panels.lock());
        } else {
            self.blocks::<L, 4, 3>(l, &mut self.panels.lock());
        }
    }
}

impl<G: GemmReal> DxTask<'_, G> {
    /// The task's rows and columns, over blocks of classes whose columns
    /// fill `packed`: each block copied in once, used by every row tile.
    #[inline(always)]
    fn blocks<L: Lanes<F = G>, const R: usize, const Q: usize>(&self, l: L, packed: &mut [G]) {
        let (k0, k1) = self.cols;
        let kw = k1 - k0;
        let block = (packed.len() / kw.max(1)).max(1);
        let (r0, r1) = self.rows;
        let full_rows = r1 - (r1 - r0) % R;
        let mut c0 = 0;
        loop {
            let c1 = (c0 + block).min(self.classes);
            for (c, dst) in packed.chunks_exact_mut(kw).take(c1 - c0).enumerate() {
                let at = (c0 + c) * self.d;
                dst.copy_from_slice(&self.w[at + k0..at + k1]);
            }
            let b = Block {
                packed,
                kw,
                c0,
                c1,
                fresh: c0 == 0 && !self.accumulate,
            };
            for r in (r0..full_rows).step_by(R) {
                self.strip::<L, R, Q>(l, r, &b);
            }
            for r in full_rows..r1 {
                self.strip::<L, 1, Q>(l, r, &b);
            }
            c0 = c1;
            if c0 >= self.classes {
                break;
            }
        }
    }
}

/// The task's columns of classes `c0..c1`, copied into `packed` (`kw`
/// values per class); `fresh`: the first block of a product that does not
/// accumulate.
struct Block<'a, G> {
    packed: &'a [G],
    kw: usize,
    c0: usize,
    c1: usize,
    fresh: bool,
}

impl<G: GemmReal> DxTask<'_, G> {
    /// The task's columns of rows `r..r + NR`, over the block's classes:
    /// `Q` vectors of `L` at a time, then single vectors up to the end of
    /// the row's body; the row's tail
    /// (`d mod N`) always goes to the one-lane type.
    #[inline(always)]
    fn strip<L: Lanes<F = G>, const NR: usize, const Q: usize>(
        &self,
        l: L,
        r: usize,
        b: &Block<'_, G>,
    ) {
        let (k0, k1) = self.cols;
        let vec_end = k1.min(self.d - self.d % L::N);
        let mut k = k0;
        while k + Q * L::N <= vec_end {
            self.tile::<L, NR, Q>(l, r, k, b);
            k += Q * L::N;
        }
        while k < vec_end {
            self.tile::<L, NR, 1>(l, r, k, b);
            k += L::N;
        }
        while k < k1 {
            self.tile::<L::Tail, NR, 1>(l.tail(), r, k, b);
            k += 1;
        }
    }

    /// `dx` of rows `r..r + NR`, columns `k..k + Q·N`, over the block's
    /// classes.
    #[inline(always)]
    fn tile<L: Lanes<F = G>, const NR: usize, const Q: usize>(
        &self,
        l: L,
        r: usize,
        k: usize,
        b: &Block<'_, G>,
    ) {
        let (n, d) = (L::N, self.d);
        let zero = l.splat(G::ZERO);
        let mut acc = [[zero; Q]; NR];
        if !b.fresh {
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: each task owns its rows x columns of dx.
                let src = unsafe { self.dst.get((r + i) * d + k, Q * n) };
                for (q, v) in a.iter_mut().enumerate() {
                    *v = l.load(&src[q * n..]);
                }
            }
        }
        let nc = b.c1 - b.c0;
        let dls: [&[G]; NR] = std::array::from_fn(|i| &self.dl[(r + i) * self.ld + b.c0..][..nc]);
        let at = k - self.cols.0;
        for (c, wr) in b.packed.chunks_exact(b.kw).take(nc).enumerate() {
            let wv: [L::V; Q] = std::array::from_fn(|q| l.load(&wr[at + q * n..]));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    /// Values in [-1, 1) from a fixed sequence.
    fn values(len: usize, mut seed: u64) -> Vec<f32> {
        (0..len)
            .map(|_| (2.0 * lcg(&mut seed) - 1.0) as f32)
            .collect()
    }

    /// `dx[r, k]`: one `mul_add` chain over the classes in order, from zero.
    fn chains(dl: &[f32], w: &[f32], rows: usize, classes: usize, d: usize) -> Vec<f32> {
        let mut dx = vec![0.0f32; rows * d];
        for r in 0..rows {
            for k in 0..d {
                let mut acc = 0.0f32;
                for j in 0..classes {
                    acc = dl[r * classes + j].mul_add(w[j * d + k], acc);
                }
                dx[r * d + k] = acc;
            }
        }
        dx
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn input_grad_is_each_elements_chain_however_it_is_split() {
        // d = 259: three column pieces, the last a one-lane tail; 350
        // classes per call: two blocks of the packed panel (256 classes)
        let (rows, classes, d) = (300, 700, 259);
        let (dl, w) = (values(rows * classes, 1), values(classes * d, 2));
        let want = bits(&chains(&dl, &w, rows, classes, d));
        // 1, 2 and 5 threads cut the rows into 2, 3 and 4 pieces
        for threads in [1, 2, 5] {
            let panels = PerThread::new(threads, || Ok(vec![0.0f32; panel_len::<f32>(d)])).unwrap();
            let (half, mut dx) = (classes / 2, vec![f32::NAN; rows * d]);
            // the classes in two calls, the second continuing the first
            for (j0, j1) in [(0, half), (half, classes)] {
                let dls = Rows {
                    data: &dl[j0..],
                    rows,
                    cols: j1 - j0,
                    ld: classes,
                };
                let ws = Rows {
                    data: &w[j0 * d..j1 * d],
                    rows: j1 - j0,
                    cols: d,
                    ld: d,
                };
                input_grad(dls, ws, &mut dx, j0 > 0, threads, &panels);
            }
            let got = bits(&dx);
            let differ = (0..got.len()).find(|&i| got[i] != want[i]);
            assert_eq!(
                differ.map(|i| (i / d, i % d)),
                None,
                "(row, column), {threads} threads"
            );
        }
    }

    #[test]
    fn logits_are_each_elements_chain_then_the_bias() {
        // 13 rows: full tiles and edge tiles (8 + 4 + 1 on AVX-512, 6 + 6 + 1
        // on AVX2); 100 classes: a last panel of 4; d = 2100: two or more
        // blocks of `D` on every vector level, so partial sums are stored
        // and reloaded
        let (rows, classes, d, ld) = (13, 100, 2100, 103);
        let (x, w, b) = (
            values(rows * d, 3),
            values(classes * d, 4),
            values(classes, 5),
        );
        let mut want = vec![f32::NAN; rows * ld];
        for r in 0..rows {
            for j in 0..classes {
                let chain = (0..d).fold(0.0f32, |acc, k| x[r * d + k].mul_add(w[j * d + k], acc));
                want[r * ld + j] = chain + b[j];
            }
        }
        for threads in [1, 2] {
            let panels = PerThread::new(threads, || Ok(vec![0.0f32; panel_len::<f32>(d)])).unwrap();
            let mut out = vec![f32::NAN; rows * ld];
            let xs = Rows {
                data: &x,
                rows,
                cols: d,
                ld: d,
            };
            let ws = Rows {
                data: &w,
                rows: classes,
                cols: d,
                ld: d,
            };
            logits(xs, ws, Some(&b), (&mut out, ld), threads, &panels);
            // the padding stays NaN in both, and NaN's bits are the same
            let (got, want) = (bits(&out), bits(&want));
            let differ = (0..got.len()).find(|&i| got[i] != want[i]);
            assert_eq!(
                differ.map(|i| (i / ld, i % ld)),
                None,
                "(row, class), {threads} threads"
            );
        }
    }

    #[test]
    fn input_grad_pieces_leave_each_thread_several_and_copy_the_weight_seldom() {
        // (2048, 2048, 32000) on 2 threads: one piece per chunk of 524 rows
        assert_eq!(dx_piece_rows(524, 16, 2), 528);
        // few columns: the rows are cut for the threads, in whole tiles
        assert_eq!(dx_piece_rows(1000, 2, 4), 132);
        // many threads: never fewer than DX_MIN_ROWS rows
        assert_eq!(dx_piece_rows(1000, 16, 64), 96);
        assert_eq!(dx_piece_rows(0, 0, 1), 96);
    }
}
