//! Matrix views and the GEMM call of the weight gradient `dW += dLᵀ · X`
//! (the `gemm` crate: runtime-dispatched AVX-512 / AVX2+FMA / scalar
//! micro-kernels, split over threads without splitting any dot product, so
//! a fixed problem gives the same bits for any thread count). The per-row
//! products are in `rowwise.rs`.

use crate::elem::{Elem, Real};
use crate::simd::Compute;
use gemm::Parallelism;

/// A type the GEMM works in.
pub(crate) trait GemmReal: Real + Compute + Elem<Acc = Self> + Default {}
impl GemmReal for f32 {}
impl GemmReal for f64 {}

/// A read-only `rows x cols` view of `data` with element `(r, c)` at
/// `r * rs + c * cs`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, G> {
    data: &'a [G],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, G> MatRef<'a, G> {
    /// A row-major view: `rows x cols`, rows `rs` apart.
    pub fn rows(data: &'a [G], rows: usize, cols: usize, rs: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Columns `j0..j1`.
    pub fn cols(self, j0: usize, j1: usize) -> Self {
        MatRef {
            data: &self.data[(j0 * self.cs).min(self.data.len())..],
            cols: j1 - j0,
            ..self
        }
    }

    /// Rows `i0..i1`.
    fn row_range(self, i0: usize, i1: usize) -> Self {
        MatRef {
            data: &self.data[(i0 * self.rs).min(self.data.len())..],
            rows: i1 - i0,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// A writable row-major `rows x cols` view, rows `rs` apart.
pub(crate) struct MatMut<'a, G> {
    data: &'a mut [G],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a, G> MatMut<'a, G> {
    pub fn rows(data: &'a mut [G], rows: usize, cols: usize, rs: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            rs,
        }
    }
}

/// Rows of `dst` per call of the crate.
///
/// The crate works on the transpose of a row-major `dst`, and each call
/// allocates a buffer for its packed right operand: up to `kc` (at most 512)
/// times the columns of its `dst`, which are our rows, or as many of them as
/// fill the host's L3. At (4096, 2048, 32000) that buffer was 16 to 27 MB on
/// a 32 MB L3, and it grows with the host's L3. Calls of at most this many
/// rows bound it at 512 × 2048 × 4 bytes = 4 MiB for `f32` on any host. The
/// pieces split no dot product, so the bits are those of one call.
const DST_ROWS_PER_CALL: usize = 2048;

/// `dst = [dst +] lhs · rhs` on `threads` threads.
pub(crate) fn matmul<G: GemmReal>(
    dst: MatMut<'_, G>,
    accumulate: bool,
    lhs: MatRef<'_, G>,
    rhs: MatRef<'_, G>,
    threads: usize,
) {
    let (m, n) = (dst.rows, dst.cols);
    assert!(
        lhs.rows == m && rhs.cols == n && rhs.rows == lhs.cols,
        "matmul: shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    let rs = dst.rs;
    let mut rest = dst.data;
    for i0 in (0..m).step_by(DST_ROWS_PER_CALL) {
        let i1 = (i0 + DST_ROWS_PER_CALL).min(m);
        let len = if i1 < m { (i1 - i0) * rs } else { rest.len() };
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
        rest = tail;
        matmul_call(
            MatMut::rows(piece, i1 - i0, n, rs),
            accumulate,
            lhs.row_range(i0, i1),
            rhs,
            threads,
        );
    }
}

/// One call of the crate: `dst = [dst +] lhs · rhs`, `dst` not empty.
fn matmul_call<G: GemmReal>(
    dst: MatMut<'_, G>,
    accumulate: bool,
    lhs: MatRef<'_, G>,
    rhs: MatRef<'_, G>,
    threads: usize,
) {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    assert!(
        (m - 1) * dst.rs + (n - 1) < dst.data.len(),
        "matmul: dst bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst.data[r * dst.rs..r * dst.rs + n].fill(G::ZERO);
            }
        }
        return;
    }
    assert!(lhs.in_bounds() && rhs.in_bounds(), "matmul: operand bounds");
    // SAFETY: the asserts above keep every element the GEMM touches inside
    // the three slices; `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            G::ONE,
            G::ONE,
            false,
            false,
            false,
            if threads > 1 {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    /// `matmul` cuts `dst` into calls of `DST_ROWS_PER_CALL` rows: it must
    /// give one call's bits, add where asked, and leave the padding between
    /// rows alone.
    #[test]
    fn pieces_of_rows_give_one_calls_bits() {
        let (m, n, k, rs) = (2 * DST_ROWS_PER_CALL + 37, 19, 70, 23);
        let mut seed = 7;
        let mut values =
            |len: usize| -> Vec<f32> { (0..len).map(|_| lcg(&mut seed) as f32 - 0.5).collect() };
        // `lhs` is read through its transpose, as the weight gradient reads dL.
        let lhs_t = values(k * m);
        let rhs = values(k * n);
        let start = values(m * rs);
        let lhs = MatRef::rows(&lhs_t, k, m, m).t();
        let rhs = MatRef::rows(&rhs, k, n, n);
        type Product = fn(MatMut<'_, f32>, bool, MatRef<'_, f32>, MatRef<'_, f32>, usize);
        for threads in [1, 2] {
            for accumulate in [false, true] {
                let run = |product: Product| {
                    let mut out = start.clone();
                    let dst = MatMut::rows(&mut out, m, n, rs);
                    product(dst, accumulate, lhs, rhs, threads);
                    out
                };
                let (pieces, whole) = (run(matmul), run(matmul_call));
                assert!(pieces
                    .iter()
                    .zip(&whole)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
                for i in [0, DST_ROWS_PER_CALL - 1, DST_ROWS_PER_CALL, m - 1] {
                    let row = &pieces[i * rs..i * rs + rs];
                    for j in 0..n {
                        let dot: f64 = (0..k)
                            .map(|t| f64::from(lhs_t[t * m + i]) * f64::from(rhs.data[t * n + j]))
                            .sum();
                        let want = dot
                            + if accumulate {
                                f64::from(start[i * rs + j])
                            } else {
                                0.0
                            };
                        assert!((f64::from(row[j]) - want).abs() < 1e-4, "row {i} col {j}");
                    }
                    assert_eq!(
                        &row[n..],
                        &start[i * rs + n..i * rs + rs],
                        "padding of row {i}"
                    );
                }
            }
        }
    }
}
