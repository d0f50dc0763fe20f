//! `token_stats` and `linear_token_stats`.

use crate::convert::{
    add_io_spans, array, borrow_io, by_dtype, check_disjoint, io_slices, read, slice, slice_mut,
    span, write, Dtype, GradOutput, GradOutputArray, Storage,
};
use crate::error::CoreError;
use crate::linear::{check_linear_disjoint, LinearArrays, LinearFields};
use fusedce_core as core;
use fusedce_core::simd::Compute;
use numpy::{PyArray1, PyArrayDyn, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;
use std::ops::Range;

/// `fusedce._request.StatsProblem`: shapes, targets, the score map, what is
/// asked for, and the upstream gradients.
#[derive(FromPyObject)]
pub(crate) struct StatsProblem<'py> {
    batch: usize,
    classes: usize,
    spatial: usize,
    target: Option<Bound<'py, PyArrayDyn<i64>>>,
    ignore_index: i64,
    temperature: f64,
    softcap: Option<f64>,
    top_k: usize,
    lse: bool,
    logprob: bool,
    entropy: bool,
    argmax: bool,
    rank: bool,
    grad_logprob: Option<GradOutput<'py>>,
    grad_entropy: Option<GradOutput<'py>>,
}

/// `fusedce._request.StatsOutputs`: float outputs are float32 (float64 for
/// float64 input), indices int64; None for what was not asked for.
#[derive(FromPyObject)]
pub(crate) struct StatsOutputs<'py> {
    lse: Option<Bound<'py, PyAny>>,
    logprob: Option<Bound<'py, PyAny>>,
    entropy: Option<Bound<'py, PyAny>>,
    argmax: Option<Bound<'py, PyAny>>,
    rank: Option<Bound<'py, PyAny>>,
    topk_ids: Option<Bound<'py, PyAny>>,
    topk_logprobs: Option<Bound<'py, PyAny>>,
}

/// The problem's arrays, borrowed.
struct ProblemArrays<'py> {
    target: Option<PyReadonlyArrayDyn<'py, i64>>,
    grad_logprob: Option<GradOutputArray<'py>>,
    grad_entropy: Option<GradOutputArray<'py>>,
}

fn borrow_upstream<'py>(
    arg: &str,
    g: &Option<GradOutput<'py>>,
) -> PyResult<Option<GradOutputArray<'py>>> {
    g.as_ref()
        .map(|g| GradOutputArray::borrow_as(arg, g))
        .transpose()
}

/// A per-token upstream gradient passed as `arg`, for the core (absent: zero).
fn upstream<'a>(arg: &str, g: &'a Option<GradOutputArray<'_>>) -> PyResult<core::Upstream<'a>> {
    Ok(match g {
        None => core::Upstream::Zero,
        Some(GradOutputArray::Scalar(v)) => core::Upstream::Scalar(*v),
        Some(GradOutputArray::PerSample(a)) => core::Upstream::PerToken(slice(arg, a)?),
    })
}

impl<'py> ProblemArrays<'py> {
    fn borrow(p: &StatsProblem<'py>) -> PyResult<Self> {
        Ok(ProblemArrays {
            target: p.target.as_ref().map(|t| read("target", t)).transpose()?,
            grad_logprob: borrow_upstream("grad_logprob", &p.grad_logprob)?,
            grad_entropy: borrow_upstream("grad_entropy", &p.grad_entropy)?,
        })
    }

    fn core(&self, p: &StatsProblem<'_>) -> PyResult<(core::TokenStats<'_>, core::StatsGrad<'_>)> {
        let stats = core::TokenStats {
            batch: p.batch,
            classes: p.classes,
            spatial: p.spatial,
            targets: self
                .target
                .as_ref()
                .map(|t| slice("target", t))
                .transpose()?,
            ignore_index: p.ignore_index,
            temperature: p.temperature,
            softcap: p.softcap,
            top_k: p.top_k,
            wanted: core::Wanted {
                lse: p.lse,
                logprob: p.logprob,
                entropy: p.entropy,
                argmax: p.argmax,
                rank: p.rank,
            },
        };
        let grad = core::StatsGrad {
            logprob: upstream("grad_logprob", &self.grad_logprob)?,
            entropy: upstream("grad_entropy", &self.grad_entropy)?,
        };
        Ok((stats, grad))
    }

    fn spans(&self) -> PyResult<Vec<(&'static str, Range<usize>)>> {
        let mut v = Vec::new();
        if let Some(t) = &self.target {
            v.push(("target", span(slice("target", t)?)));
        }
        for (arg, u) in [
            ("grad_logprob", &self.grad_logprob),
            ("grad_entropy", &self.grad_entropy),
        ] {
            if let Some(GradOutputArray::PerSample(a)) = u {
                v.push((arg, span(slice(arg, a)?)));
            }
        }
        Ok(v)
    }
}

/// The output buffers, borrowed for writing.
struct OutArrays<'py, O: numpy::Element> {
    lse: Option<PyReadwriteArrayDyn<'py, O>>,
    logprob: Option<PyReadwriteArrayDyn<'py, O>>,
    entropy: Option<PyReadwriteArrayDyn<'py, O>>,
    argmax: Option<PyReadwriteArrayDyn<'py, i64>>,
    rank: Option<PyReadwriteArrayDyn<'py, i64>>,
    topk_ids: Option<PyReadwriteArrayDyn<'py, i64>>,
    topk_logprobs: Option<PyReadwriteArrayDyn<'py, O>>,
}

fn borrow_out<'py, E: numpy::Element>(
    arg: &str,
    a: &Option<Bound<'py, PyAny>>,
) -> PyResult<Option<PyReadwriteArrayDyn<'py, E>>> {
    a.as_ref()
        .map(|a| write(arg, &array::<E>(arg, a)?))
        .transpose()
}

fn out_slice<'a, E: numpy::Element>(
    arg: &str,
    a: &'a mut Option<PyReadwriteArrayDyn<'_, E>>,
) -> PyResult<Option<&'a mut [E]>> {
    a.as_mut().map(|a| slice_mut(arg, a)).transpose()
}

impl<'py, O: numpy::Element> OutArrays<'py, O> {
    fn borrow(o: &StatsOutputs<'py>) -> PyResult<Self> {
        Ok(OutArrays {
            lse: borrow_out("lse", &o.lse)?,
            logprob: borrow_out("logprob", &o.logprob)?,
            entropy: borrow_out("entropy", &o.entropy)?,
            argmax: borrow_out("argmax", &o.argmax)?,
            rank: borrow_out("rank", &o.rank)?,
            topk_ids: borrow_out("topk_ids", &o.topk_ids)?,
            topk_logprobs: borrow_out("topk_logprobs", &o.topk_logprobs)?,
        })
    }

    fn slices(&mut self) -> PyResult<core::StatsOut<'_, O>> {
        Ok(core::StatsOut {
            lse: out_slice("lse", &mut self.lse)?,
            logprob: out_slice("logprob", &mut self.logprob)?,
            entropy: out_slice("entropy", &mut self.entropy)?,
            argmax: out_slice("argmax", &mut self.argmax)?,
            rank: out_slice("rank", &mut self.rank)?,
            topk_ids: out_slice("topk_ids", &mut self.topk_ids)?,
            topk_logprobs: out_slice("topk_logprobs", &mut self.topk_logprobs)?,
        })
    }
}

/// The memory of every output buffer.
fn out_spans<O>(o: &core::StatsOut<'_, O>) -> Vec<(&'static str, Range<usize>)> {
    let mut v = Vec::new();
    let mut add = |arg, s: Option<Range<usize>>| {
        if let Some(s) = s {
            v.push((arg, s));
        }
    };
    add("lse", o.lse.as_deref().map(span));
    add("logprob", o.logprob.as_deref().map(span));
    add("entropy", o.entropy.as_deref().map(span));
    add("argmax", o.argmax.as_deref().map(span));
    add("rank", o.rank.as_deref().map(span));
    add("topk_ids", o.topk_ids.as_deref().map(span));
    add("topk_logprobs", o.topk_logprobs.as_deref().map(span));
    v
}

/// `fusedce._request.TokenStatsRequest`.
#[derive(FromPyObject)]
pub(crate) struct StatsRequest<'py> {
    problem: StatsProblem<'py>,
    input: Bound<'py, PyAny>,
    /// None, the input itself (in place), or a buffer of its shape.
    grad: Option<Bound<'py, PyAny>>,
    out: StatsOutputs<'py>,
}

/// Per-token statistics of a `TokenStatsRequest` (built and checked by
/// `fusedce.token_stats`), written to `request.out`; the gradient goes to
/// `request.grad` when given.
#[pyfunction]
pub(crate) fn token_stats(py: Python<'_>, request: StatsRequest<'_>) -> PyResult<()> {
    macro_rules! go {
        ($t:ty) => {
            run::<$t>(py, &request)
        };
    }
    by_dtype!(Dtype::of("input", &request.input)?, go)
}

fn run<T: Storage>(py: Python<'_>, r: &StatsRequest<'_>) -> PyResult<()>
where
    T::Acc: Compute + numpy::Element,
{
    let arrays = ProblemArrays::borrow(&r.problem)?;
    let mut io = borrow_io::<T>(&r.input, r.grad.as_ref())?;
    let mut outs = OutArrays::<T::Acc>::borrow(&r.out)?;
    let (stats, grad) = arrays.core(&r.problem)?;
    let io = io_slices::<T>(&mut io)?;
    let out = outs.slices()?;
    let mut inputs = arrays.spans()?;
    let mut outputs = out_spans(&out);
    add_io_spans(&io, &mut inputs, &mut outputs);
    check_disjoint(&outputs, &inputs)?;
    Ok(py
        .detach(move || core::token_stats(&stats, io, grad, out))
        .map_err(CoreError)?)
}

/// The statistics part of a `LinearTokenStatsRequest`.
#[derive(FromPyObject)]
struct StatsFields<'py> {
    problem: StatsProblem<'py>,
    out: StatsOutputs<'py>,
}

/// Per-token statistics of the logits of a linear layer, from a
/// `LinearTokenStatsRequest` (built and checked by
/// `fusedce.linear_token_stats`); gradients go to `request.grads`.
#[pyfunction]
pub(crate) fn linear_token_stats(py: Python<'_>, request: &Bound<'_, PyAny>) -> PyResult<()> {
    let linear: LinearFields<'_> = request.extract()?;
    let stats: StatsFields<'_> = request.extract()?;
    macro_rules! go {
        ($t:ty) => {
            run_linear::<$t>(py, &linear, &stats)
        };
    }
    by_dtype!(Dtype::of("input", linear.input())?, go)
}

fn run_linear<T: Storage>(py: Python<'_>, f: &LinearFields<'_>, r: &StatsFields<'_>) -> PyResult<()>
where
    T::Acc: numpy::Element,
{
    let arrays = ProblemArrays::borrow(&r.problem)?;
    let mut lin = LinearArrays::<T>::borrow(f)?;
    let mut outs = OutArrays::<T::Acc>::borrow(&r.out)?;
    let (stats, grad) = arrays.core(&r.problem)?;
    let (linear, grads) = lin.core(f, (stats.batch, stats.classes, stats.spatial))?;
    let out = outs.slices()?;
    check_linear_disjoint(arrays.spans()?, &linear, grads.as_ref(), out_spans(&out))?;
    let problem = core::LinearTokenStats { linear, stats };
    Ok(py
        .detach(move || core::linear_token_stats(&problem, grad, grads, out))
        .map_err(CoreError)?)
}

/// Validates a `StatsProblem` exactly as the CPU path does (temperature,
/// softcap, `top_k`, every target, what needs a target, the upstream
/// gradients' lengths) and returns its targets as `int32` (-1 where ignored),
/// or None without targets: what a backend without the core's kernels needs.
#[pyfunction]
pub(crate) fn stats_plan<'py>(
    py: Python<'py>,
    problem: StatsProblem<'py>,
    wants_grad: bool,
) -> PyResult<Option<Bound<'py, PyArray1<i32>>>> {
    let arrays = ProblemArrays::borrow(&problem)?;
    let (stats, grad) = arrays.core(&problem)?;
    let plan = core::stats::StatsPlan::<f32>::new(&stats, grad, wants_grad).map_err(CoreError)?;
    Ok(plan.encoded_targets().map(|t| {
        PyArray1::from_iter(
            py,
            t.iter()
                .map(|&y| if y == core::ce::IGNORED { -1 } else { y as i32 }),
        )
    }))
}
