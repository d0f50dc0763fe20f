//! `linear_cross_entropy`.

use crate::convert::{
    by_dtype, check_disjoint, read_as, slice, slice_mut, span, write_as, Dtype, Storage,
};
use crate::cross_entropy::{Problem, ProblemArrays};
use crate::error::CoreError;
use fusedce_core as core;
use numpy::PyReadwriteArrayDyn;
use pyo3::prelude::*;
use std::ops::Range;

/// `(grad_input, grad_linear_weight, grad_linear_bias)`: where the gradients go.
type GradBuffers<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
);

/// `fusedce._request.LinearCrossEntropyRequest`.
#[derive(FromPyObject)]
pub(crate) struct LinearRequest<'py> {
    problem: Problem<'py>,
    /// `(N, in_features)`
    input: Bound<'py, PyAny>,
    /// `(C, d1..dK, in_features)`
    linear_weight: Bound<'py, PyAny>,
    linear_bias: Option<Bound<'py, PyAny>>,
    in_features: usize,
    chunk_rows: usize,
    acc_f64: bool,
    max_weight_copy: usize,
    /// `(grad_input, grad_linear_weight, grad_linear_bias)` buffers, or None.
    grads: Option<GradBuffers<'py>>,
    loss: Option<Bound<'py, PyAny>>,
}

/// Fused linear layer + softmax cross-entropy of a
/// `LinearCrossEntropyRequest` (built and checked by
/// `fusedce.linear_cross_entropy`). Returns the reduced loss (NaN for
/// `reduction='none'`); gradients go to `request.grads` when given.
#[pyfunction]
pub(crate) fn linear_cross_entropy(py: Python<'_>, request: LinearRequest<'_>) -> PyResult<f64> {
    macro_rules! go {
        ($t:ty) => {
            run::<$t>(py, &request)
        };
    }
    by_dtype!(Dtype::of("input", &request.input)?, go)
}

/// The gradient buffers, borrowed for writing.
struct GradArrays<'py, E: numpy::Element> {
    input: PyReadwriteArrayDyn<'py, E>,
    linear_weight: PyReadwriteArrayDyn<'py, E>,
    linear_bias: Option<PyReadwriteArrayDyn<'py, E>>,
}

fn run<T: Storage>(py: Python<'_>, r: &LinearRequest<'_>) -> PyResult<f64> {
    let arrays = ProblemArrays::<T>::borrow(&r.problem)?;
    let x = read_as::<T>("input", &r.input)?;
    let w = read_as::<T>("linear_weight", &r.linear_weight)?;
    let b = r
        .linear_bias
        .as_ref()
        .map(|b| read_as::<T>("linear_bias", b))
        .transpose()?;
    let mut grads = match &r.grads {
        Some((gx, gw, gb)) => Some(GradArrays {
            input: write_as::<T>("grad_input", gx)?,
            linear_weight: write_as::<T>("grad_linear_weight", gw)?,
            linear_bias: gb
                .as_ref()
                .map(|g| write_as::<T>("grad_linear_bias", g))
                .transpose()?,
        }),
        None => None,
    };
    let mut loss = r
        .loss
        .as_ref()
        .map(|l| write_as::<T>("loss", l))
        .transpose()?;

    let (ce, go) = arrays.core(&r.problem)?;
    let problem = core::LinearCrossEntropy {
        batch: ce.batch,
        in_features: r.in_features,
        classes: ce.classes,
        spatial: ce.spatial,
        input: T::view(slice("input", &x)?),
        linear_weight: T::view(slice("linear_weight", &w)?),
        linear_bias: b
            .as_ref()
            .map(|b| slice("linear_bias", b).map(T::view))
            .transpose()?,
        targets: ce.targets,
        weight: ce.weight,
        ignore_index: ce.ignore_index,
        reduction: ce.reduction,
        label_smoothing: ce.label_smoothing,
        chunk_rows: r.chunk_rows,
        acc_f64: r.acc_f64,
        max_weight_copy: r.max_weight_copy,
    };
    let grads = match grads.as_mut() {
        Some(g) => Some(core::LinearGrads {
            input: T::view_mut(slice_mut("grad_input", &mut g.input)?),
            linear_weight: T::view_mut(slice_mut("grad_linear_weight", &mut g.linear_weight)?),
            linear_bias: g
                .linear_bias
                .as_mut()
                .map(|b| slice_mut("grad_linear_bias", b).map(T::view_mut))
                .transpose()?,
        }),
        None => None,
    };
    let losses = loss
        .as_mut()
        .map(|l| slice_mut("loss", l).map(T::view_mut))
        .transpose()?;

    check_linear_disjoint(arrays.spans()?, &problem, grads.as_ref(), losses.as_deref())?;
    Ok(py
        .detach(move || core::linear_cross_entropy(&problem, go, grads, losses))
        .map_err(CoreError)?)
}

/// No output of a linear call overlaps an input or another output.
fn check_linear_disjoint<T: Storage>(
    mut inputs: Vec<(&'static str, Range<usize>)>,
    problem: &core::LinearCrossEntropy<'_, T>,
    grads: Option<&core::LinearGrads<'_, T>>,
    losses: Option<&[T]>,
) -> PyResult<()> {
    inputs.push(("input", span(problem.input)));
    inputs.push(("linear_weight", span(problem.linear_weight)));
    if let Some(b) = problem.linear_bias {
        inputs.push(("linear_bias", span(b)));
    }
    let mut outputs = Vec::new();
    if let Some(g) = grads {
        outputs.push(("grad_input", span(g.input)));
        outputs.push(("grad_linear_weight", span(g.linear_weight)));
        if let Some(b) = &g.linear_bias {
            outputs.push(("grad_linear_bias", span(b)));
        }
    }
    if let Some(l) = losses {
        outputs.push(("loss", span(l)));
    }
    check_disjoint(&outputs, &inputs)
}
