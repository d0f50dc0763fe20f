//! Validation of a [`TokenStats`] problem into a [`StatsPlan`].

use super::{StatsGrad, TokenStats, Upstream, Wanted};
use crate::ce::plan::{check_classes, check_len, encode_class_targets, IGNORED};
use crate::elem::Real;
use crate::error::CeError;
use crate::kernels::stats::Want;
use crate::kernels::transform::Transform;

/// A validated statistics problem: execution runs it without further checks.
#[derive(Debug)]
pub struct StatsPlan<'a, F> {
    pub(crate) classes: usize,
    pub(crate) spatial: usize,
    samples: usize,
    /// The class of each sample ([`IGNORED`] where ignored), if targets were given.
    targets: Option<Vec<u32>>,
    pub(crate) transform: Transform<F>,
    pub(crate) top_k: usize,
    pub(crate) wanted: Wanted,
    /// What the row kernel computes (the entropy also for its gradient).
    pub(crate) want: Want,
    grad: StatsGrad<'a>,
}

fn check_upstream(arg: &'static str, u: Upstream<'_>, samples: usize) -> Result<(), CeError> {
    if let Upstream::PerToken(g) = u {
        check_len(arg, g.len(), samples, "the target's shape")?;
    }
    Ok(())
}

impl<'a, F: Real> StatsPlan<'a, F> {
    /// Validates `p`: classes, temperature, softcap, `top_k` in `[0, C]`,
    /// every target, the statistics a target is needed for, and (for a
    /// gradient) the upstream gradients' lengths.
    pub fn new(p: &TokenStats<'_>, grad: StatsGrad<'a>, wants_grad: bool) -> Result<Self, CeError> {
        let (c, samples) = (p.classes, p.batch.saturating_mul(p.spatial));
        check_classes(c)?;
        let transform = Transform::new(p.softcap, p.temperature)?;
        if p.top_k > c {
            return Err(CeError::invalid(
                "top_k",
                format!(
                    "expected a value in [0, {c}] (the number of classes), got {}",
                    p.top_k
                ),
            ));
        }
        let targets = match p.targets {
            Some(t) => Some(encode_class_targets(t, samples, c, p.ignore_index, None)?.0),
            None => None,
        };
        let needs_target = p.wanted.logprob
            || p.wanted.rank
            || (wants_grad && !matches!(grad.logprob, Upstream::Zero));
        if needs_target && targets.is_none() {
            return Err(CeError::invalid(
                "target",
                "logprob, rank and the log-prob gradient need a target",
            ));
        }
        let grad = if wants_grad { grad } else { StatsGrad::NONE };
        check_upstream("grad_logprob", grad.logprob, samples)?;
        check_upstream("grad_entropy", grad.entropy, samples)?;
        Ok(StatsPlan {
            classes: c,
            spatial: p.spatial,
            samples,
            targets,
            transform,
            top_k: p.top_k,
            wanted: p.wanted,
            want: Want {
                entropy: p.wanted.entropy || !matches!(grad.entropy, Upstream::Zero),
                argmax: p.wanted.argmax,
                rank: p.wanted.rank,
                top_k: p.top_k,
            },
            grad,
        })
    }

    /// The validated class of each sample ([`IGNORED`] where ignored), if
    /// targets were given.
    pub fn encoded_targets(&self) -> Option<&[u32]> {
        self.targets.as_deref()
    }

    /// Samples: `batch * spatial`.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// The target class of sample `i`, `None` where ignored or absent.
    #[inline(always)]
    pub(crate) fn target(&self, i: usize) -> Option<usize> {
        match &self.targets {
            Some(t) if t[i] != IGNORED => Some(t[i] as usize),
            _ => None,
        }
    }

    /// `(gl, ge)` of sample `i`.
    #[inline(always)]
    pub(crate) fn upstream(&self, i: usize) -> (F, F) {
        let at = |u: Upstream<'_>| match u {
            Upstream::Zero => F::ZERO,
            Upstream::Scalar(g) => F::from_f64(g),
            Upstream::PerToken(g) => F::from_f64(g[i]),
        };
        (at(self.grad.logprob), at(self.grad.entropy))
    }
}
