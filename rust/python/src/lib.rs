//! `fusedce._native`: the Python face of fusedce-core.
//!
//! Thin by design: it borrows numpy buffers, releases the GIL while the core
//! computes, and turns core errors into Python exceptions. Shapes, dtypes and
//! defaults are decided in the Python package (`python/fusedce`); the core
//! re-validates every size, so a wrong call here raises instead of crashing.

use fusedce_core::{self as core, CeError, Elem};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::exceptions::{PyIndexError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

fn to_py(e: CeError) -> PyErr {
    match e {
        CeError::TargetOutOfBounds { .. } => PyIndexError::new_err(e.to_string()),
        CeError::Invalid { .. } => PyValueError::new_err(e.to_string()),
        CeError::Resource(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// Calls `$go!(T)` with `T` the core storage type named by `$dtype`
/// ("float32", "float64", "float16", "bfloat16"), else raises TypeError.
macro_rules! by_dtype {
    ($dtype:expr, $go:ident) => {
        match $dtype {
            "float32" => $go!(f32),
            "float64" => $go!(f64),
            "float16" => $go!(f16),
            "bfloat16" => $go!(bf16),
            other => Err(PyTypeError::new_err(format!(
                "input: unsupported dtype {other}; expected float32, float64, float16 or bfloat16"
            ))),
        }
    };
}

/// A numpy element type and the core element type its buffer holds.
trait Storage: Elem {
    type Np: numpy::Element;
    fn view(s: &[Self::Np]) -> &[Self];
    fn view_mut(s: &mut [Self::Np]) -> &mut [Self];
}

impl Storage for f32 {
    type Np = f32;
    fn view(s: &[f32]) -> &[f32] {
        s
    }
    fn view_mut(s: &mut [f32]) -> &mut [f32] {
        s
    }
}
impl Storage for f64 {
    type Np = f64;
    fn view(s: &[f64]) -> &[f64] {
        s
    }
    fn view_mut(s: &mut [f64]) -> &mut [f64] {
        s
    }
}
impl Storage for f16 {
    type Np = u16;
    fn view(s: &[u16]) -> &[f16] {
        s.reinterpret_cast()
    }
    fn view_mut(s: &mut [u16]) -> &mut [f16] {
        s.reinterpret_cast_mut()
    }
}
impl Storage for bf16 {
    type Np = u16;
    fn view(s: &[u16]) -> &[bf16] {
        s.reinterpret_cast()
    }
    fn view_mut(s: &mut [u16]) -> &mut [bf16] {
        s.reinterpret_cast_mut()
    }
}

fn array<'py, E: numpy::Element>(
    arg: &'static str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<E>>> {
    obj.cast::<PyArrayDyn<E>>().cloned().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg}: expected a numpy array of {}, got {}",
            std::any::type_name::<E>(),
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into())
        ))
    })
}

fn contiguous<'a, E: numpy::Element>(
    arg: &str,
    a: &'a PyReadonlyArrayDyn<'_, E>,
) -> PyResult<&'a [E]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{arg}: expected a C-contiguous array")))
}

/// Borrows an optional array read-only (the guard must outlive the slice).
fn ro<'py, E: numpy::Element>(
    arg: &'static str,
    obj: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<PyReadonlyArrayDyn<'py, E>>> {
    obj.map(|o| array::<E>(arg, o).map(|a| a.readonly()))
        .transpose()
}

/// Borrows an optional array for writing.
fn rw<'py, E: numpy::Element>(
    arg: &'static str,
    obj: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<numpy::PyReadwriteArrayDyn<'py, E>>> {
    obj.map(|o| {
        array::<E>(arg, o)?
            .try_readwrite()
            .map_err(|e| PyValueError::new_err(format!("{arg}: {e}")))
    })
    .transpose()
}

/// Class indices or probabilities, exactly one of them.
fn targets_of<'a, T: Storage>(
    idx: &'a Option<PyReadonlyArrayDyn<'_, i64>>,
    probs: &'a Option<PyReadonlyArrayDyn<'_, T::Np>>,
) -> PyResult<core::Targets<'a, T>> {
    match (idx, probs) {
        (Some(i), None) => Ok(core::Targets::Index(contiguous("target", i)?)),
        (None, Some(p)) => Ok(core::Targets::Probs(T::view(contiguous("target", p)?))),
        _ => Err(PyValueError::new_err(
            "target: pass exactly one of class indices or probabilities",
        )),
    }
}

/// The upstream gradient: per sample when an array is given, else a scalar (default 1).
fn grad_output_of<'a>(
    scalar: Option<f64>,
    array: &'a Option<PyReadonlyArrayDyn<'_, f64>>,
) -> PyResult<core::GradOutput<'a>> {
    Ok(match array.as_ref() {
        Some(a) => core::GradOutput::PerSample(contiguous("grad_output", a)?),
        None => core::GradOutput::Scalar(scalar.unwrap_or(1.0)),
    })
}

#[allow(clippy::too_many_arguments)]
fn ce_typed<T: Storage>(
    py: Python<'_>,
    input: &Bound<'_, PyAny>,
    batch: usize,
    classes: usize,
    spatial: usize,
    target_index: Option<&Bound<'_, PyAny>>,
    target_probs: Option<&Bound<'_, PyAny>>,
    weight: Option<&Bound<'_, PyAny>>,
    ignore_index: i64,
    reduction: core::Reduction,
    label_smoothing: f64,
    grad_output: Option<f64>,
    grad_output_array: Option<&Bound<'_, PyAny>>,
    grad_mode: &str,
    grad_out: Option<&Bound<'_, PyAny>>,
    losses: Option<&Bound<'_, PyAny>>,
) -> PyResult<f64> {
    let idx = ro::<i64>("target", target_index)?;
    let probs = ro::<T::Np>("target", target_probs)?;
    let targets = targets_of::<T>(&idx, &probs)?;
    let w = ro::<f64>("weight", weight)?;
    let w = w.as_ref().map(|a| contiguous("weight", a)).transpose()?;
    let go = ro::<f64>("grad_output", grad_output_array)?;
    let go = grad_output_of(grad_output, &go)?;
    let problem = core::CrossEntropy {
        batch,
        classes,
        spatial,
        targets,
        weight: w,
        ignore_index,
        reduction,
        label_smoothing,
    };
    let losses = losses.map(|l| array::<T::Np>("loss", l)).transpose()?;
    let mut losses = losses
        .as_ref()
        .map(|a| a.try_readwrite())
        .transpose()
        .map_err(|e| PyValueError::new_err(format!("loss: {e}")))?;
    let losses = losses
        .as_mut()
        .map(|a| a.as_slice_mut().map(T::view_mut))
        .transpose()
        .map_err(|_| PyValueError::new_err("loss: expected a C-contiguous array"))?;

    let x = array::<T::Np>("input", input)?;
    let run = |logits: core::Logits<'_, T>| {
        py.detach(move || core::cross_entropy(&problem, logits, go, losses))
            .map_err(to_py)
    };
    match grad_mode {
        "none" => {
            let x = x.readonly();
            run(core::Logits::Forward(T::view(contiguous("input", &x)?)))
        }
        "separate" => {
            let g = array::<T::Np>(
                "grad_out",
                grad_out.ok_or_else(|| PyValueError::new_err("grad_out: missing"))?,
            )?;
            let x = x.readonly();
            let mut g = g
                .try_readwrite()
                .map_err(|e| PyValueError::new_err(format!("grad_out: {e}")))?;
            let g = g
                .as_slice_mut()
                .map_err(|_| PyValueError::new_err("grad_out: expected a C-contiguous array"))?;
            run(core::Logits::Grad(
                T::view(contiguous("input", &x)?),
                T::view_mut(g),
            ))
        }
        "inplace" => {
            let mut x = x.try_readwrite().map_err(|e| {
                PyValueError::new_err(format!("input: cannot write the gradient in place: {e}"))
            })?;
            let x = x.as_slice_mut().map_err(|_| {
                PyValueError::new_err("input: in-place gradient needs a C-contiguous array")
            })?;
            run(core::Logits::InPlace(T::view_mut(x)))
        }
        other => Err(PyValueError::new_err(format!(
            "grad_mode: expected 'none', 'separate' or 'inplace', got {other:?}"
        ))),
    }
}

/// Fused softmax cross-entropy on C-contiguous buffers laid out
/// `(batch, classes, spatial)`. See `fusedce.cross_entropy` for the public API.
/// Returns the reduced loss (NaN for `reduction='none'`, whose losses go to
/// `losses`).
#[pyfunction]
#[pyo3(signature = (input, dtype, batch, classes, spatial, target_index, target_probs, weight,
                    ignore_index, reduction, label_smoothing, grad_output, grad_output_array,
                    grad_mode, grad_out, losses))]
#[allow(clippy::too_many_arguments)]
fn cross_entropy(
    py: Python<'_>,
    input: &Bound<'_, PyAny>,
    dtype: &str,
    batch: usize,
    classes: usize,
    spatial: usize,
    target_index: Option<&Bound<'_, PyAny>>,
    target_probs: Option<&Bound<'_, PyAny>>,
    weight: Option<&Bound<'_, PyAny>>,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    grad_output: Option<f64>,
    grad_output_array: Option<&Bound<'_, PyAny>>,
    grad_mode: &str,
    grad_out: Option<&Bound<'_, PyAny>>,
    losses: Option<&Bound<'_, PyAny>>,
) -> PyResult<f64> {
    let reduction: core::Reduction = reduction.parse().map_err(to_py)?;
    macro_rules! go {
        ($t:ty) => {
            ce_typed::<$t>(
                py,
                input,
                batch,
                classes,
                spatial,
                target_index,
                target_probs,
                weight,
                ignore_index,
                reduction,
                label_smoothing,
                grad_output,
                grad_output_array,
                grad_mode,
                grad_out,
                losses,
            )
        };
    }
    by_dtype!(dtype, go)
}

fn slice_mut<'a, E: numpy::Element>(
    arg: &str,
    a: &'a mut numpy::PyReadwriteArrayDyn<'_, E>,
) -> PyResult<&'a mut [E]> {
    a.as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("{arg}: expected a C-contiguous array")))
}

#[allow(clippy::too_many_arguments)]
fn lce_typed<T: Storage>(
    py: Python<'_>,
    input: &Bound<'_, PyAny>,
    linear_weight: &Bound<'_, PyAny>,
    linear_bias: Option<&Bound<'_, PyAny>>,
    shape: (usize, usize, usize, usize),
    target_index: Option<&Bound<'_, PyAny>>,
    target_probs: Option<&Bound<'_, PyAny>>,
    weight: Option<&Bound<'_, PyAny>>,
    ignore_index: i64,
    reduction: core::Reduction,
    label_smoothing: f64,
    grad_output: Option<f64>,
    grad_output_array: Option<&Bound<'_, PyAny>>,
    chunk_rows: usize,
    acc_f64: bool,
    max_weight_copy: usize,
    grads: [Option<&Bound<'_, PyAny>>; 3],
    losses: Option<&Bound<'_, PyAny>>,
) -> PyResult<f64> {
    let (batch, in_features, classes, spatial) = shape;
    let x = array::<T::Np>("input", input)?.readonly();
    let w = array::<T::Np>("linear_weight", linear_weight)?.readonly();
    let b = ro::<T::Np>("linear_bias", linear_bias)?;
    let idx = ro::<i64>("target", target_index)?;
    let probs = ro::<T::Np>("target", target_probs)?;
    let targets = targets_of::<T>(&idx, &probs)?;
    let cw = ro::<f64>("weight", weight)?;
    let go = ro::<f64>("grad_output", grad_output_array)?;
    let go = grad_output_of(grad_output, &go)?;
    let problem = core::LinearCrossEntropy {
        batch,
        in_features,
        classes,
        spatial,
        input: T::view(contiguous("input", &x)?),
        linear_weight: T::view(contiguous("linear_weight", &w)?),
        linear_bias: b
            .as_ref()
            .map(|b| contiguous("linear_bias", b).map(T::view))
            .transpose()?,
        targets,
        weight: cw.as_ref().map(|a| contiguous("weight", a)).transpose()?,
        ignore_index,
        reduction,
        label_smoothing,
        chunk_rows,
        acc_f64,
        max_weight_copy,
    };
    let [gx, gw, gb] = grads;
    let mut gx = rw::<T::Np>("grad_input", gx)?;
    let mut gw = rw::<T::Np>("grad_linear_weight", gw)?;
    let mut gb = rw::<T::Np>("grad_linear_bias", gb)?;
    let grads = match (gx.as_mut(), gw.as_mut()) {
        (Some(gx), Some(gw)) => Some(core::LinearGrads {
            input: T::view_mut(slice_mut("grad_input", gx)?),
            linear_weight: T::view_mut(slice_mut("grad_linear_weight", gw)?),
            linear_bias: gb
                .as_mut()
                .map(|g| slice_mut("grad_linear_bias", g).map(T::view_mut))
                .transpose()?,
        }),
        (None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "grad_input: pass both grad_input and grad_linear_weight, or neither",
            ))
        }
    };
    let mut ls = rw::<T::Np>("loss", losses)?;
    let ls = ls
        .as_mut()
        .map(|a| slice_mut("loss", a).map(T::view_mut))
        .transpose()?;
    py.detach(move || core::linear_cross_entropy(&problem, go, grads, ls))
        .map_err(to_py)
}

/// Fused linear layer + softmax cross-entropy on C-contiguous buffers:
/// input `(batch, in_features)`, linear_weight `(classes * spatial,
/// in_features)`, bias `(classes * spatial,)`. Gradients are written when
/// `grad_input` and `grad_linear_weight` are given. See
/// `fusedce.linear_cross_entropy` for the public API.
#[pyfunction]
#[pyo3(signature = (input, linear_weight, linear_bias, dtype, batch, in_features, classes, spatial,
                    target_index, target_probs, weight, ignore_index, reduction, label_smoothing,
                    grad_output, grad_output_array, chunk_rows, acc_f64, max_weight_copy,
                    grad_input, grad_linear_weight, grad_linear_bias, losses))]
#[allow(clippy::too_many_arguments)]
fn linear_cross_entropy(
    py: Python<'_>,
    input: &Bound<'_, PyAny>,
    linear_weight: &Bound<'_, PyAny>,
    linear_bias: Option<&Bound<'_, PyAny>>,
    dtype: &str,
    batch: usize,
    in_features: usize,
    classes: usize,
    spatial: usize,
    target_index: Option<&Bound<'_, PyAny>>,
    target_probs: Option<&Bound<'_, PyAny>>,
    weight: Option<&Bound<'_, PyAny>>,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    grad_output: Option<f64>,
    grad_output_array: Option<&Bound<'_, PyAny>>,
    chunk_rows: usize,
    acc_f64: bool,
    max_weight_copy: usize,
    grad_input: Option<&Bound<'_, PyAny>>,
    grad_linear_weight: Option<&Bound<'_, PyAny>>,
    grad_linear_bias: Option<&Bound<'_, PyAny>>,
    losses: Option<&Bound<'_, PyAny>>,
) -> PyResult<f64> {
    let reduction: core::Reduction = reduction.parse().map_err(to_py)?;
    macro_rules! go {
        ($t:ty) => {
            lce_typed::<$t>(
                py,
                input,
                linear_weight,
                linear_bias,
                (batch, in_features, classes, spatial),
                target_index,
                target_probs,
                weight,
                ignore_index,
                reduction,
                label_smoothing,
                grad_output,
                grad_output_array,
                chunk_rows,
                acc_f64,
                max_weight_copy,
                [grad_input, grad_linear_weight, grad_linear_bias],
                losses,
            )
        };
    }
    by_dtype!(dtype, go)
}

/// Sets the number of worker threads (>= 1) used by every later call.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(PyValueError::new_err(
            "n: expected a positive number of threads, got 0",
        ));
    }
    core::threads::set_num_threads(n).map_err(to_py)
}

/// The number of worker threads.
#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    core::threads::num_threads().map_err(to_py)
}

/// The SIMD instruction set the kernels run on ("avx512", "avx2+fma", "scalar").
#[pyfunction]
fn simd_level() -> &'static str {
    core::simd::level().name()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(linear_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    Ok(())
}
