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

/// `dst = [dst +] lhs · rhs` on `threads` threads.
pub(crate) fn matmul<G: GemmReal>(
    dst: MatMut<'_, G>,
    accumulate: bool,
    lhs: MatRef<'_, G>,
    rhs: MatRef<'_, G>,
    threads: usize,
) {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    assert!(
        lhs.rows == m && rhs.cols == n && rhs.rows == k,
        "matmul: shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
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
