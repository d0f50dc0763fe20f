//! The buffers of one linear cross-entropy call: the weight (and bias) in
//! the compute type `G`, the logits chunk, the converted rows, and the
//! gradient accumulators. Every large buffer is reserved fallibly, before
//! anything is written: a call too large for the machine is an error.

use crate::elem::{same_type, Elem, Real};
use crate::error::CeError;
use crate::threads::filled;
use std::borrow::Cow;

const CONVERT_PIECE: usize = 1 << 16;

/// Bytes of one converted weight block (when the weight is not kept whole);
/// small under test, so that unit tests cover many blocks.
pub(crate) const WEIGHT_BLOCK_BYTES: usize = if cfg!(test) { 4096 } else { 64 << 20 };

/// A zeroed vector of `len` values, or an error naming `what` and the
/// option that makes the linear driver's buffers smaller.
pub(crate) fn zeros<G: Clone + Default>(len: usize, what: &str) -> Result<Vec<G>, CeError> {
    filled(len, G::default(), what)
        .map_err(|e| CeError::Resource(format!("{e}; choose a smaller batch_chunk_size")))
}

/// `dst[i] = src[i]` converted (through f64: exact for every pair of
/// supported types), in parallel pieces.
pub(crate) fn convert<A: Elem, B: Elem>(src: &[A], dst: &mut [B]) {
    crate::threads::for_pieces(dst, CONVERT_PIECE, |i, d| {
        for (d, &s) in d.iter_mut().zip(&src[i * CONVERT_PIECE..]) {
            *d = B::from_f64(s.to_f64());
        }
    });
}

/// `src` in type `G`: borrowed when it already is, else converted into
/// `buf` (which must have room for `src.len()` values: no reallocation).
pub(crate) fn widen_into<'b, T: Elem, G: Real>(src: &'b [T], buf: &'b mut [G]) -> &'b [G] {
    match same_type::<T, G>(src) {
        Some(s) => s,
        None => {
            let dst = &mut buf[..src.len()];
            convert(src, dst);
            dst
        }
    }
}

/// `src` in type `G`, borrowed or converted into a new vector.
pub(crate) fn widen<'a, T: Elem, G: Real + Default>(
    src: &'a [T],
    what: &str,
) -> Result<Cow<'a, [G]>, CeError> {
    Ok(match same_type::<T, G>(src) {
        Some(s) => Cow::Borrowed(s),
        None => {
            let mut v = zeros::<G>(src.len(), what)?;
            convert(src, &mut v);
            Cow::Owned(v)
        }
    })
}

/// The weight `(C·S, D)` in the compute type: whole (borrowed, or converted
/// once) or converted block by block of classes inside every chunk.
pub(crate) struct Weight<'a, T, G: Clone> {
    src: &'a [T],
    whole: Option<Cow<'a, [G]>>,
    block: Vec<G>,
    /// Classes per block.
    block_rows: usize,
    /// Classes in all (C * d1..dK).
    classes: usize,
    d: usize,
}

impl<'a, T: Elem, G: Real + Default> Weight<'a, T, G> {
    /// Keeps a converted copy when it needs at most `max_copy` bytes.
    pub fn new(src: &'a [T], classes: usize, d: usize, max_copy: usize) -> Result<Self, CeError> {
        let converts = same_type::<T, G>(src).is_none();
        let whole_copy = !converts || classes * d * std::mem::size_of::<G>() <= max_copy;
        let block_rows = (WEIGHT_BLOCK_BYTES / (d.max(1) * std::mem::size_of::<G>())).max(1);
        Ok(Weight {
            src,
            whole: if whole_copy {
                Some(widen(src, "a float32 copy of linear_weight")?)
            } else {
                None
            },
            block: if whole_copy {
                Vec::new()
            } else {
                zeros(
                    block_rows.min(classes) * d,
                    "a converted block of linear_weight",
                )?
            },
            block_rows,
            classes,
            d,
        })
    }

    /// Calls `f(j0, j1, w)` for consecutive class ranges covering all
    /// classes, with `w` the weight rows `j0..j1` in type `G`. There is
    /// always at least one call (with `d == 0` or no classes the products
    /// still have to write their zeros or bias).
    pub fn blocks(&mut self, mut f: impl FnMut(usize, usize, &[G])) {
        if let Some(w) = &self.whole {
            return f(0, self.classes, w);
        }
        if self.classes == 0 || self.d == 0 {
            return f(0, self.classes, &[]);
        }
        let d = self.d;
        let mut j0 = 0;
        while j0 < self.classes {
            let j1 = (j0 + self.block_rows).min(self.classes);
            let w = widen_into::<T, G>(&self.src[j0 * d..j1 * d], &mut self.block);
            f(j0, j1, w);
            j0 = j1;
        }
    }
}
