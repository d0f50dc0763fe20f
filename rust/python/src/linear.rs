//! `linear_cross_entropy`, and the linear part every linear request shares.

use crate::convert::{
    by_dtype, check_disjoint, read_as, slice, slice_mut, span, write_as, Dtype, Storage,
};
use crate::cross_entropy::{Problem, ProblemArrays};
use crate::error::CoreError;
use fusedce_core as core;
use numpy::PyReadonlyArrayDyn;
use numpy::PyReadwriteArrayDyn;
use pyo3::prelude::*;
use std::ops::Range;

/// `(grad_input, grad_linear_weight, grad_linear_bias)`: where the gradients go.
type GradBuffers<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
);

/// The linear part of a request (`LinearCrossEntropyRequest`,
/// `LinearTokenStatsRequest`): its arrays, chunking and gradient buffers.
#[derive(FromPyObject)]
pub(crate) struct LinearFields<'py> {
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
}

impl<'py> LinearFields<'py> {
    pub fn input(&self) -> &Bound<'py, PyAny> {
        &self.input
    }
}

/// The loss part of a `LinearCrossEntropyRequest`.
#[derive(FromPyObject)]
struct LossFields<'py> {
    problem: Problem<'py>,
    loss: Option<Bound<'py, PyAny>>,
}

/// Fused linear layer + softmax cross-entropy of a
/// `LinearCrossEntropyRequest` (built and checked by
/// `fusedce.linear_cross_entropy`). Returns the reduced loss (NaN for
/// `reduction='none'`); gradients go to `request.grads` when given.
#[pyfunction]
pub(crate) fn linear_cross_entropy(py: Python<'_>, request: &Bound<'_, PyAny>) -> PyResult<f64> {
    let linear: LinearFields<'_> = request.extract()?;
    let loss: LossFields<'_> = request.extract()?;
    macro_rules! go {
        ($t:ty) => {
            run::<$t>(py, &linear, &loss)
        };
    }
    by_dtype!(Dtype::of("input", &linear.input)?, go)
}

/// The linear part's arrays, borrowed.
pub(crate) struct LinearArrays<'py, T: Storage> {
    x: PyReadonlyArrayDyn<'py, T::Np>,
    w: PyReadonlyArrayDyn<'py, T::Np>,
    b: Option<PyReadonlyArrayDyn<'py, T::Np>>,
    grads: Option<GradArrays<'py, T::Np>>,
}

/// The gradient buffers, borrowed for writing.
struct GradArrays<'py, E: numpy::Element> {
    input: PyReadwriteArrayDyn<'py, E>,
    linear_weight: PyReadwriteArrayDyn<'py, E>,
    linear_bias: Option<PyReadwriteArrayDyn<'py, E>>,
}

impl<'py, T: Storage> LinearArrays<'py, T> {
    pub fn borrow(f: &LinearFields<'py>) -> PyResult<Self> {
        Ok(LinearArrays {
            x: read_as::<T>("input", &f.input)?,
            w: read_as::<T>("linear_weight", &f.linear_weight)?,
            b: f.linear_bias
                .as_ref()
                .map(|b| read_as::<T>("linear_bias", b))
                .transpose()?,
            grads: match &f.grads {
                Some((gx, gw, gb)) => Some(GradArrays {
                    input: write_as::<T>("grad_input", gx)?,
                    linear_weight: write_as::<T>("grad_linear_weight", gw)?,
                    linear_bias: gb
                        .as_ref()
                        .map(|g| write_as::<T>("grad_linear_bias", g))
                        .transpose()?,
                }),
                None => None,
            },
        })
    }

    /// The core's linear part over `(batch, classes, spatial)` logits, and
    /// the gradient destinations.
    #[allow(clippy::type_complexity)]
    pub fn core(
        &mut self,
        f: &LinearFields<'_>,
        (batch, classes, spatial): (usize, usize, usize),
    ) -> PyResult<(core::Linear<'_, T>, Option<core::LinearGrads<'_, T>>)> {
        let linear = core::Linear {
            batch,
            in_features: f.in_features,
            classes,
            spatial,
            input: T::view(slice("input", &self.x)?),
            linear_weight: T::view(slice("linear_weight", &self.w)?),
            linear_bias: self
                .b
                .as_ref()
                .map(|b| slice("linear_bias", b).map(T::view))
                .transpose()?,
            chunk_rows: f.chunk_rows,
            acc_f64: f.acc_f64,
            max_weight_copy: f.max_weight_copy,
        };
        let grads = match self.grads.as_mut() {
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
        Ok((linear, grads))
    }
}

fn run<T: Storage>(py: Python<'_>, f: &LinearFields<'_>, r: &LossFields<'_>) -> PyResult<f64> {
    let arrays = ProblemArrays::<T>::borrow(&r.problem)?;
    let mut lin = LinearArrays::<T>::borrow(f)?;
    let mut loss = r
        .loss
        .as_ref()
        .map(|l| write_as::<T>("loss", l))
        .transpose()?;
    let (ce, go) = arrays.core(&r.problem)?;
    let (linear, grads) = lin.core(f, (ce.batch, ce.classes, ce.spatial))?;
    let problem = core::LinearCrossEntropy {
        linear,
        targets: ce.targets,
        weight: ce.weight,
        ignore_index: ce.ignore_index,
        reduction: ce.reduction,
        label_smoothing: ce.label_smoothing,
        softcap: ce.softcap,
        z_loss: ce.z_loss,
    };
    let losses = loss
        .as_mut()
        .map(|l| slice_mut("loss", l).map(T::view_mut))
        .transpose()?;
    let mut outputs = Vec::new();
    if let Some(l) = &losses {
        outputs.push(("loss", span(l)));
    }
    check_linear_disjoint(arrays.spans()?, &linear, grads.as_ref(), outputs)?;
    Ok(py
        .detach(move || core::linear_cross_entropy(&problem, go, grads, losses))
        .map_err(CoreError)?)
}

/// No output of a linear call (its gradients, and `outputs`) overlaps an
/// input or another output.
pub(crate) fn check_linear_disjoint<T: Storage>(
    mut inputs: Vec<(&'static str, Range<usize>)>,
    linear: &core::Linear<'_, T>,
    grads: Option<&core::LinearGrads<'_, T>>,
    mut outputs: Vec<(&'static str, Range<usize>)>,
) -> PyResult<()> {
    inputs.push(("input", span(linear.input)));
    inputs.push(("linear_weight", span(linear.linear_weight)));
    if let Some(b) = linear.linear_bias {
        inputs.push(("linear_bias", span(b)));
    }
    if let Some(g) = grads {
        outputs.push(("grad_input", span(g.input)));
        outputs.push(("grad_linear_weight", span(g.linear_weight)));
        if let Some(b) = &g.linear_bias {
            outputs.push(("grad_linear_bias", span(b)));
        }
    }
    check_disjoint(&outputs, &inputs)
}
