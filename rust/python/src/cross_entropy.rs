//! `cross_entropy`, and the validated target plan the GPU backend reads.

use crate::convert::{
    add_io_spans, borrow_io, by_dtype, check_disjoint, io_slices, read, reduction, slice,
    slice_mut, span, write_as, Dtype, GradOutput, GradOutputArray, Storage, TargetArray,
};
use crate::error::CoreError;
use fusedce_core as core;
use fusedce_core::simd::Compute;
use numpy::{PyArray1, PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use std::ops::Range;

/// The loss problem of a request (`fusedce._request.Problem`): shapes,
/// targets and every option of the loss.
#[derive(FromPyObject)]
pub(crate) struct Problem<'py> {
    batch: usize,
    classes: usize,
    spatial: usize,
    target: Bound<'py, PyAny>,
    weight: Option<Bound<'py, PyArrayDyn<f64>>>,
    ignore_index: i64,
    reduction: String,
    label_smoothing: f64,
    softcap: Option<f64>,
    z_loss: f64,
    grad_output: GradOutput<'py>,
}

/// A problem's input arrays, borrowed.
pub(crate) struct ProblemArrays<'py, T: Storage> {
    target: TargetArray<'py, T>,
    weight: Option<PyReadonlyArrayDyn<'py, f64>>,
    grad_output: GradOutputArray<'py>,
}

impl<'py, T: Storage> ProblemArrays<'py, T> {
    pub fn borrow(p: &Problem<'py>) -> PyResult<Self> {
        Ok(ProblemArrays {
            target: TargetArray::borrow(&p.target)?,
            weight: p.weight.as_ref().map(|w| read("weight", w)).transpose()?,
            grad_output: GradOutputArray::borrow(&p.grad_output)?,
        })
    }

    /// The core's description of the problem, and its upstream gradient.
    pub fn core(
        &self,
        p: &Problem<'_>,
    ) -> PyResult<(core::CrossEntropy<'_, T>, core::GradOutput<'_>)> {
        let problem = core::CrossEntropy {
            batch: p.batch,
            classes: p.classes,
            spatial: p.spatial,
            targets: self.target.targets()?,
            weight: self
                .weight
                .as_ref()
                .map(|w| slice("weight", w))
                .transpose()?,
            ignore_index: p.ignore_index,
            reduction: reduction(&p.reduction)?,
            label_smoothing: p.label_smoothing,
            softcap: p.softcap,
            z_loss: p.z_loss,
        };
        Ok((problem, self.grad_output.get()?))
    }

    /// The inputs' memory, for overlap checks.
    pub fn spans(&self) -> PyResult<Vec<(&'static str, Range<usize>)>> {
        let mut v = vec![match &self.target {
            TargetArray::Index(a) => ("target", span(slice("target", a)?)),
            TargetArray::Probs(a) => ("target", span(slice("target", a)?)),
        }];
        if let Some(w) = &self.weight {
            v.push(("weight", span(slice("weight", w)?)));
        }
        if let GradOutputArray::PerSample(g) = &self.grad_output {
            v.push(("grad_output", span(slice("grad_output", g)?)));
        }
        Ok(v)
    }
}

/// `fusedce._request.CrossEntropyRequest`.
#[derive(FromPyObject)]
pub(crate) struct CeRequest<'py> {
    problem: Problem<'py>,
    input: Bound<'py, PyAny>,
    /// None, the input itself (in place), or a buffer of its shape.
    grad: Option<Bound<'py, PyAny>>,
    /// The per-sample losses, for `reduction='none'`.
    loss: Option<Bound<'py, PyAny>>,
}

/// Fused softmax cross-entropy of a `CrossEntropyRequest` (built and
/// checked by `fusedce.cross_entropy`). Returns the reduced loss (NaN for
/// `reduction='none'`, whose losses go to `request.loss`).
#[pyfunction]
pub(crate) fn cross_entropy(py: Python<'_>, request: CeRequest<'_>) -> PyResult<f64> {
    macro_rules! go {
        ($t:ty) => {
            run::<$t>(py, &request)
        };
    }
    by_dtype!(Dtype::of("input", &request.input)?, go)
}

fn run<T: Storage>(py: Python<'_>, r: &CeRequest<'_>) -> PyResult<f64>
where
    T::Acc: Compute,
{
    let arrays = ProblemArrays::<T>::borrow(&r.problem)?;
    let mut io = borrow_io::<T>(&r.input, r.grad.as_ref())?;
    let mut loss = r
        .loss
        .as_ref()
        .map(|l| write_as::<T>("loss", l))
        .transpose()?;
    let (problem, go) = arrays.core(&r.problem)?;
    let io = io_slices::<T>(&mut io)?;
    let losses = loss
        .as_mut()
        .map(|l| slice_mut("loss", l).map(T::view_mut))
        .transpose()?;

    let mut inputs = arrays.spans()?;
    let mut outputs = Vec::new();
    add_io_spans(&io, &mut inputs, &mut outputs);
    if let Some(l) = &losses {
        outputs.push(("loss", span(l)));
    }
    check_disjoint(&outputs, &inputs)?;
    Ok(py
        .detach(move || core::cross_entropy(&problem, io, go, losses))
        .map_err(CoreError)?)
}

/// A validated problem as a backend without the core's kernels needs it:
/// each sample's class (`int32`, -1 where ignored; None for probability
/// targets), each sample's upstream gradient after the reduction's scaling
/// (`float32`), and the reduction of per-sample losses.
#[pyclass(frozen, module = "fusedce._native")]
pub(crate) struct TargetPlan {
    #[pyo3(get)]
    targets: Option<Py<PyArray1<i32>>>,
    #[pyo3(get)]
    scale: Py<PyArray1<f32>>,
    #[pyo3(get)]
    denom: f64,
    reduction: core::Reduction,
}

#[pymethods]
impl TargetPlan {
    /// The loss from per-sample losses: their sum in float64, in order,
    /// reduced (the mean divided by `denom`; NaN for `none`).
    fn reduce(&self, losses: PyReadonlyArrayDyn<'_, f32>) -> PyResult<f64> {
        let total: f64 = slice("losses", &losses)?.iter().map(|&v| v as f64).sum();
        Ok(core::ce::plan::reduce(self.reduction, total, self.denom))
    }
}

/// Validates `problem` (class weights, smoothing, every target) exactly as
/// the CPU path does, and returns its [`TargetPlan`].
#[pyfunction]
pub(crate) fn plan(py: Python<'_>, problem: Problem<'_>) -> PyResult<TargetPlan> {
    macro_rules! go {
        ($t:ty) => {
            plan_typed::<$t>(py, &problem)
        };
    }
    match problem.target.cast::<PyArrayDyn<i64>>() {
        Ok(_) => plan_typed::<f32>(py, &problem),
        Err(_) => by_dtype!(Dtype::of("target", &problem.target)?, go),
    }
}

fn plan_typed<T: Storage>(py: Python<'_>, p: &Problem<'_>) -> PyResult<TargetPlan> {
    let arrays = ProblemArrays::<T>::borrow(p)?;
    let (problem, go) = arrays.core(p)?;
    let plan = core::Plan::<f64>::new(&problem, go).map_err(CoreError)?;
    let targets = plan
        .encoded_targets()
        .map(|t| PyArray1::from_iter(py, t.iter().map(|&y| y as i32)).unbind());
    let scale = PyArray1::from_iter(py, (0..plan.samples()).map(|i| plan.scale(i) as f32)).unbind();
    Ok(TargetPlan {
        targets,
        scale,
        denom: plan.denom(),
        reduction: reduction(&p.reduction)?,
    })
}
