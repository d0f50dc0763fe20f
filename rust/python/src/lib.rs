//! `fusedce._native`: the Python face of fusedce-core.
//!
//! Thin by design, one file per topic: `convert.rs` turns Python objects
//! into what the core reads (typed `FromPyObject` values, borrowed numpy
//! buffers, overlap checks), `error.rs` maps the core's errors onto Python
//! exceptions, `cross_entropy.rs`, `linear.rs` and `stats.rs` run the
//! operations on
//! a request object built by the Python package, with the GIL released
//! while the core computes. No math lives here.

mod convert;
mod cross_entropy;
mod dlpack;
mod error;
mod linear;
mod stats;

use error::CoreError;
use fusedce_core as core;
use pyo3::prelude::*;

/// Sets the number of worker threads (`1..=1024`) used by every later call;
/// the pool starts with the GIL released.
#[pyfunction]
fn set_num_threads(py: Python<'_>, n: i128) -> PyResult<()> {
    Ok(py
        .detach(|| core::threads::set_num_threads(n))
        .map_err(CoreError)?)
}

/// Sets (`n`) or clears (`None`) the thread count of the calls made from
/// the calling thread; returns the previous setting.
#[pyfunction]
#[pyo3(signature = (n))]
fn set_call_threads(n: Option<i128>) -> PyResult<Option<usize>> {
    Ok(core::threads::set_call_threads(n).map_err(CoreError)?)
}

/// The thread count of a call made now from the calling thread.
#[pyfunction]
fn get_num_threads(py: Python<'_>) -> PyResult<usize> {
    Ok(py.detach(core::threads::num_threads).map_err(CoreError)?)
}

/// Checks the loss options a module is built with, as every call checks
/// them: the reduction's name, `label_smoothing`, `softcap` and `z_loss`.
#[pyfunction]
#[pyo3(signature = (reduction, label_smoothing, softcap, z_loss))]
fn check_options(
    reduction: &str,
    label_smoothing: f64,
    softcap: Option<f64>,
    z_loss: f64,
) -> PyResult<()> {
    convert::reduction(reduction)?;
    Ok(core::ce::check_loss_options(label_smoothing, softcap, z_loss).map_err(CoreError)?)
}

/// The SIMD instruction set the kernels run on ("avx512+bf16", "avx512",
/// "avx2+fma", "scalar").
#[pyfunction]
fn simd_level() -> &'static str {
    core::simd::level().name()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy::cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy::plan, m)?)?;
    m.add_class::<cross_entropy::TargetPlan>()?;
    m.add_function(wrap_pyfunction!(linear::linear_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(stats::token_stats, m)?)?;
    m.add_function(wrap_pyfunction!(stats::linear_token_stats, m)?)?;
    m.add_function(wrap_pyfunction!(stats::stats_plan, m)?)?;
    m.add_function(wrap_pyfunction!(check_options, m)?)?;
    m.add_function(wrap_pyfunction!(dlpack::dlpack_view, m)?)?;
    m.add_class::<dlpack::DlpackView>()?;
    m.add_class::<dlpack::DlpackExport>()?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_call_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    Ok(())
}
