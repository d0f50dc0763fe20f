//! Validation of a cross-entropy problem into a [`Plan`]: everything later
//! steps need, checked once, in the compute type.
//!
//! The plan keeps its own copy of the class-index targets (one `u32` per
//! sample, encoded once the range check has passed), so execution never
//! reads the caller's target array again: a target changed or overwritten
//! during the call cannot index out of bounds.

use crate::elem::{Elem, Real};
use crate::error::CeError;
use crate::kernels::transform::{check_positive, Transform};
use crate::kernels::{Consts, SampleTarget};

/// How per-sample losses are combined, as PyTorch's `reduction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    None,
    Mean,
    Sum,
}

impl std::str::FromStr for Reduction {
    type Err = CeError;
    fn from_str(s: &str) -> Result<Self, CeError> {
        match s {
            "none" => Ok(Reduction::None),
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            other => Err(CeError::invalid(
                "reduction",
                format!(
                    "{other} is not a valid value for reduction; expected 'none', 'mean' or 'sum'"
                ),
            )),
        }
    }
}

/// Targets: class indices (shape `(N, d1..dK)`) or class probabilities
/// (the shape of the input).
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a, T> {
    Index(&'a [i64]),
    Probs(&'a [T]),
}

/// A cross-entropy problem over logits laid out `(batch, classes, spatial)`,
/// C-contiguous (`spatial` is the product of `d1..dK`, 1 for `(N, C)`).
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy<'a, T> {
    pub batch: usize,
    pub classes: usize,
    pub spatial: usize,
    pub targets: Targets<'a, T>,
    pub weight: Option<&'a [f64]>,
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub label_smoothing: f64,
    /// `c`: the loss sees `c · tanh(x / c)` instead of the logits `x`.
    pub softcap: Option<f64>,
    /// Adds `z_loss · lse²` to the loss of every sample that is not ignored.
    pub z_loss: f64,
}

/// The upstream gradient.
#[derive(Clone, Copy, Debug)]
pub enum GradOutput<'a> {
    /// One number (the gradient of a mean or sum; or every sample's, for `none`).
    Scalar(f64),
    /// One per sample, for `reduction = none` (shape of the loss).
    PerSample(&'a [f64]),
}

/// Marks an ignored sample in [`Plan::encoded_targets`].
pub const IGNORED: u32 = u32::MAX;

/// What each sample is compared with, after validation.
#[derive(Debug)]
pub(crate) enum PlanTargets {
    /// A class per sample, or [`IGNORED`].
    Index(Vec<u32>),
    /// Class probabilities, given beside the logits at execution.
    Probs,
}

/// The upstream gradient of each sample's loss.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Scale<'a> {
    Const(f64),
    PerSample(&'a [f64]),
}

/// A validated problem: execution (`execute`) runs it without further checks.
#[derive(Debug)]
pub struct Plan<'a, F> {
    pub(crate) batch: usize,
    pub(crate) spatial: usize,
    pub(crate) targets: PlanTargets,
    pub(crate) k: Consts<F>,
    pub(crate) reduction: Reduction,
    pub(crate) denom: f64,
    pub(crate) scale: Scale<'a>,
    /// The softcap (temperature 1): samples are gathered when it is not
    /// the identity.
    pub(crate) transform: Transform<F>,
}

/// `got == want`, else an error naming `arg` (a length the caller derived
/// from shapes it was given: a consistency check of the core's API).
pub(crate) fn check_len(
    arg: &'static str,
    got: usize,
    want: usize,
    what: &str,
) -> Result<(), CeError> {
    if got != want {
        return Err(CeError::invalid(
            arg,
            format!("expected {want} elements ({what}), got {got}"),
        ));
    }
    Ok(())
}

/// At least one class.
pub(crate) fn check_classes(c: usize) -> Result<(), CeError> {
    if c == 0 {
        return Err(CeError::invalid(
            "input",
            "expected at least one class, got C = 0",
        ));
    }
    Ok(())
}

/// `label_smoothing` in `[0, 1]`.
fn check_label_smoothing(eps: f64) -> Result<(), CeError> {
    if !(0.0..=1.0).contains(&eps) {
        return Err(CeError::invalid(
            "label_smoothing",
            format!("must be between 0.0 and 1.0, got {eps}"),
        ));
    }
    Ok(())
}

/// The loss's options: `label_smoothing` in `[0, 1]`, `softcap` positive
/// and finite (or absent), `z_loss` finite and `>= 0`.
pub fn check_loss_options(eps: f64, softcap: Option<f64>, z_loss: f64) -> Result<(), CeError> {
    check_label_smoothing(eps)?;
    if let Some(c) = softcap {
        check_positive("softcap", c)?;
    }
    if !(z_loss.is_finite() && z_loss >= 0.0) {
        return Err(CeError::invalid(
            "z_loss",
            format!("expected a finite number >= 0, got {z_loss}"),
        ));
    }
    Ok(())
}

impl<'a, F: Real> Plan<'a, F> {
    /// Validates `p` and the upstream gradient: classes, label smoothing,
    /// class weights, every target (range, `ignore_index` with
    /// probabilities), the upstream gradient's length. Computes the mean's
    /// denominator (summed target weights, or the sample count for
    /// probabilities) in a fixed order, and each sample's gradient scale.
    pub fn new<T: Elem>(
        p: &CrossEntropy<'_, T>,
        grad_output: GradOutput<'a>,
    ) -> Result<Self, CeError> {
        let (c, samples) = (p.classes, p.batch.saturating_mul(p.spatial));
        check_classes(c)?;
        check_loss_options(p.label_smoothing, p.softcap, p.z_loss)?;
        let transform = Transform::new(p.softcap, 1.0)?;
        if let Some(w) = p.weight {
            check_len("weight", w.len(), c, "one weight per class")?;
        }
        let (targets, denom) = encode_targets(p, samples)?;
        let scale = scale_of(p.reduction, grad_output, denom, samples)?;
        Ok(Plan {
            batch: p.batch,
            spatial: p.spatial,
            targets,
            k: Consts::new(
                c,
                p.weight,
                p.label_smoothing,
                matches!(p.targets, Targets::Index(_)),
                p.z_loss,
            ),
            reduction: p.reduction,
            denom,
            scale,
            transform,
        })
    }

    pub fn classes(&self) -> usize {
        self.k.classes
    }

    /// Samples: `batch * spatial`.
    pub fn samples(&self) -> usize {
        self.batch * self.spatial
    }

    /// The mean's denominator.
    pub fn denom(&self) -> f64 {
        self.denom
    }

    /// The validated class of each sample ([`IGNORED`] where ignored), or
    /// `None` for probability targets.
    pub fn encoded_targets(&self) -> Option<&[u32]> {
        match &self.targets {
            PlanTargets::Index(t) => Some(t),
            PlanTargets::Probs => None,
        }
    }

    /// The upstream gradient of sample `i`'s loss (after the reduction's
    /// scaling: `grad_output / denom` for the mean).
    #[inline(always)]
    pub fn scale(&self, i: usize) -> f64 {
        match self.scale {
            Scale::Const(g) => g,
            Scale::PerSample(g) => g[i],
        }
    }

    /// The reduced loss from the sum of the per-sample losses (NaN for
    /// `none`, whose losses are the per-sample ones).
    pub fn reduce(&self, total: f64) -> f64 {
        reduce(self.reduction, total, self.denom)
    }

    /// The loss buffer fits the reduction: one value per sample exactly for
    /// `none`, none otherwise.
    pub fn check_losses(&self, losses_len: Option<usize>) -> Result<(), CeError> {
        match (self.reduction, losses_len) {
            (Reduction::None, Some(l)) => check_len("loss", l, self.samples(), "one per sample"),
            (Reduction::None, None) => Err(CeError::invalid(
                "loss",
                "reduction='none' needs an output for per-sample losses",
            )),
            _ => Ok(()),
        }
    }

    #[inline(always)]
    pub(crate) fn target(&self, i: usize) -> SampleTarget<F> {
        match &self.targets {
            PlanTargets::Probs => SampleTarget::Probs,
            PlanTargets::Index(t) => match t[i] {
                IGNORED => SampleTarget::Ignored,
                y => SampleTarget::Class {
                    y: y as usize,
                    w_y: self.k.w(y as usize),
                },
            },
        }
    }
}

/// The loss from the sum of the per-sample losses: divided by `denom` for
/// the mean, as is for the sum, NaN for `none`.
pub fn reduce(reduction: Reduction, total: f64, denom: f64) -> f64 {
    match reduction {
        Reduction::Mean => total / denom,
        Reduction::Sum => total,
        Reduction::None => f64::NAN,
    }
}

/// Checks the targets and encodes class indices; returns them with the
/// mean's denominator.
fn encode_targets<T: Elem>(
    p: &CrossEntropy<'_, T>,
    samples: usize,
) -> Result<(PlanTargets, f64), CeError> {
    let c = p.classes;
    match p.targets {
        Targets::Index(t) => {
            let (enc, total) = encode_class_targets(t, samples, c, p.ignore_index, p.weight)?;
            Ok((PlanTargets::Index(enc), total))
        }
        Targets::Probs(t) => {
            check_len(
                "target",
                t.len(),
                samples.saturating_mul(c),
                "class probabilities",
            )?;
            if p.ignore_index >= 0 {
                return Err(CeError::invalid(
                    "ignore_index",
                    format!(
                        "ignore_index is not supported for floating point target (class probabilities), got {}",
                        p.ignore_index
                    ),
                ));
            }
            Ok((PlanTargets::Probs, samples as f64))
        }
    }
}

/// Checks class-index targets (`samples` of them, each in `[0, classes)`
/// or `ignore_index`) and encodes them as `u32` ([`IGNORED`] where
/// ignored); returns them with the sum of the kept targets' weights.
pub(crate) fn encode_class_targets(
    t: &[i64],
    samples: usize,
    classes: usize,
    ignore_index: i64,
    weight: Option<&[f64]>,
) -> Result<(Vec<u32>, f64), CeError> {
    check_len("target", t.len(), samples, "N * d1..dK class indices")?;
    let mut enc = Vec::new();
    enc.try_reserve_exact(samples)
        .map_err(|_| CeError::Resource(format!("could not allocate {samples} targets")))?;
    let mut total = 0.0f64;
    for (i, &y) in t.iter().enumerate() {
        if y == ignore_index {
            enc.push(IGNORED);
            continue;
        }
        if y < 0 || y as u64 >= classes as u64 || y as u64 >= IGNORED as u64 {
            return Err(CeError::TargetOutOfBounds {
                position: i,
                value: y,
                classes,
                ignore_index,
            });
        }
        enc.push(y as u32);
        total += weight.map_or(1.0, |w| w[y as usize]);
    }
    Ok((enc, total))
}

fn scale_of(
    reduction: Reduction,
    grad_output: GradOutput<'_>,
    denom: f64,
    samples: usize,
) -> Result<Scale<'_>, CeError> {
    Ok(match (reduction, grad_output) {
        (Reduction::Mean, GradOutput::Scalar(g)) => Scale::Const(g / denom),
        (_, GradOutput::Scalar(g)) => Scale::Const(g),
        (Reduction::None, GradOutput::PerSample(g)) => {
            check_len("grad_output", g.len(), samples, "the loss's shape")?;
            Scale::PerSample(g)
        }
        (_, GradOutput::PerSample(_)) => {
            return Err(CeError::invalid(
                "grad_output",
                "a per-sample grad_output needs reduction='none'",
            ))
        }
    })
}
