//! fusedce-core: fused softmax cross-entropy (and linear-then-cross-entropy)
//! loss and gradient, with PyTorch's semantics, on SIMD lanes chosen at run
//! time and a thread pool whose size never changes a result's bits.
//!
//! Pure Rust, no Python: the `fusedce-python` crate binds it. See
//! `ARCHITECTURE.md` at the repository root for the layers.

pub mod ce;
pub mod config;
pub mod cpus;
pub mod elem;
pub mod error;
mod kernels;
pub mod linear;
pub mod simd;
pub mod stats;
pub mod threads;

pub use ce::{cross_entropy, CrossEntropy, GradOutput, Io, Logits, Plan, Reduction, Targets};
pub use elem::{Elem, ElemKind, Real};
pub use error::CeError;
pub use linear::{
    linear_cross_entropy, linear_token_stats, Linear, LinearCrossEntropy, LinearGrads,
    LinearTokenStats,
};
pub use stats::{token_stats, StatsGrad, StatsOut, TokenStats, Upstream, Wanted};

#[cfg(test)]
mod test_util {
    /// Deterministic pseudo-random numbers in [0, 1) for test data.
    pub fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64) / ((1u64 << 53) as f64)
    }
}
