//! Softmax cross-entropy: a problem is validated once into a [`Plan`]
//! (`plan.rs`), then executed by the row and column kernels (`execute.rs`);
//! [`Io`] (`io.rs`) says where the gradient goes.

pub(crate) mod execute;
pub mod io;
mod long_rows;
pub mod plan;

pub use io::{Io, Logits};
pub use plan::{check_loss_options, CrossEntropy, GradOutput, Plan, Reduction, Targets, IGNORED};

use crate::elem::Elem;
use crate::error::CeError;
use crate::simd::Compute;
use crate::threads;
use execute::{execute, Outputs};
use plan::check_len;

/// Runs the fused softmax cross-entropy. Returns the reduced loss for `mean`
/// and `sum` (NaN for `none`, whose per-sample losses go to `losses`).
///
/// Every argument is validated before anything is written: on error the
/// output buffers are untouched.
pub fn cross_entropy<T: Elem>(
    p: &CrossEntropy<'_, T>,
    logits: Logits<'_, T>,
    grad_output: GradOutput<'_>,
    losses: Option<&mut [T]>,
) -> Result<f64, CeError>
where
    T::Acc: Compute,
{
    let plan = Plan::<T::Acc>::new(p, grad_output)?;
    let numel = plan.samples() * p.classes;
    check_len("input", logits.len(), numel, "N * C * d1..dK")?;
    if let Io::Grad(_, g) = &logits {
        check_len("grad_out", g.len(), numel, "the input's size")?;
    }
    plan.check_losses(losses.as_deref().map(<[T]>::len))?;
    let probs = match p.targets {
        Targets::Probs(t) => Some(t),
        Targets::Index(_) => None,
    };
    let total = threads::run(execute::is_small(numel), |threads| {
        let bufs = execute::gather_bufs(&plan, threads, logits.wants_grad(), probs.is_some())?;
        Ok(execute(&plan, 0, logits, probs, Outputs { losses }, &bufs))
    })?;
    Ok(plan.reduce(total))
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    /// Float64 reference: per-sample losses and the gradient for a unit
    /// upstream gradient per sample (before the reduction's scaling), of
    /// the logits `x` laid out as `p` says.
    fn reference(x: &[f64], p: &CrossEntropy<'_, f32>) -> (Vec<f64>, Vec<f64>) {
        let Targets::Index(t) = p.targets else {
            unreachable!("index targets")
        };
        let (n, c, sp) = (p.batch, p.classes, p.spatial);
        let (w, ignore, eps) = (p.weight, p.ignore_index, p.label_smoothing);
        let mut loss = vec![0.0; n * sp];
        let mut grad = vec![0.0; n * c * sp];
        for i in 0..n {
            for s in 0..sp {
                let at = |k: usize| i * c * sp + k * sp + s;
                let y = t[i * sp + s];
                if y == ignore {
                    continue;
                }
                let m = (0..c).map(|k| x[at(k)]).fold(f64::NEG_INFINITY, f64::max);
                let lse = m + (0..c).map(|k| (x[at(k)] - m).exp()).sum::<f64>().ln();
                let wk = |k: usize| w.map_or(1.0, |w| w[k]);
                for k in 0..c {
                    let tk = (1.0 - eps) * if k as i64 == y { 1.0 } else { 0.0 } * wk(y as usize)
                        + eps / c as f64 * wk(k);
                    loss[i * sp + s] += tk * (lse - x[at(k)]);
                }
                let a = (1.0 - eps) * wk(y as usize) + eps / c as f64 * (0..c).map(wk).sum::<f64>();
                for k in 0..c {
                    let b = (1.0 - eps) * wk(y as usize) * if k as i64 == y { 1.0 } else { 0.0 }
                        + eps / c as f64 * wk(k);
                    grad[at(k)] = (x[at(k)] - lse).exp() * a - b;
                }
            }
        }
        (loss, grad)
    }

    fn check(n: usize, c: usize, sp: usize, weighted: bool, eps: f64, seed: u64) {
        let mut sd = seed;
        let x64: Vec<f64> = (0..n * c * sp).map(|_| lcg(&mut sd) * 16.0 - 8.0).collect();
        let x: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let t: Vec<i64> = (0..n * sp)
            .map(|_| {
                let r = (lcg(&mut sd) * (c as f64 + 1.0)) as i64;
                if r == c as i64 {
                    -100
                } else {
                    r
                }
            })
            .collect();
        let w: Option<Vec<f64>> = weighted.then(|| (0..c).map(|_| lcg(&mut sd) * 2.0).collect());
        let p = CrossEntropy {
            batch: n,
            classes: c,
            spatial: sp,
            targets: Targets::Index(&t),
            weight: w.as_deref(),
            ignore_index: -100,
            reduction: Reduction::None,
            label_smoothing: eps,
            softcap: None,
            z_loss: 0.0,
        };
        let (want_loss, want_grad) = reference(&x64, &p);
        let mut loss = vec![0.0f32; n * sp];
        let mut grad = vec![0.0f32; n * c * sp];
        cross_entropy(
            &p,
            Logits::Grad(&x, &mut grad),
            GradOutput::Scalar(1.0),
            Some(&mut loss),
        )
        .unwrap();
        for (g, w) in loss.iter().zip(&want_loss) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * w.abs() + 1e-5,
                "loss {g} vs {w}"
            );
        }
        for (g, w) in grad.iter().zip(&want_grad) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * w.abs() + 1e-6,
                "grad {g} vs {w}"
            );
        }
        // In place: the same bits as the separate buffer.
        let mut xi = x.clone();
        let mut loss2 = vec![0.0f32; n * sp];
        cross_entropy(
            &p,
            Logits::InPlace(&mut xi),
            GradOutput::Scalar(1.0),
            Some(&mut loss2),
        )
        .unwrap();
        assert_eq!(xi, grad);
        assert_eq!(loss2, loss);
    }

    #[test]
    fn rows_match_float64_reference() {
        for (i, &c) in [1usize, 2, 7, 8, 17, 64, 100, 1000, 4099]
            .iter()
            .enumerate()
        {
            check(5, c, 1, i % 2 == 0, [0.0, 0.1, 1.0][i % 3], i as u64);
        }
    }

    #[test]
    fn columns_match_float64_reference() {
        for (i, &(c, sp)) in [(3usize, 2usize), (10, 7), (5, 16), (21, 37), (2, 1030)]
            .iter()
            .enumerate()
        {
            check(
                3,
                c,
                sp,
                i % 2 == 1,
                [0.05, 0.0, 0.3][i % 3],
                100 + i as u64,
            );
        }
    }

    #[test]
    fn reductions_are_bitwise_identical_for_any_thread_count() {
        let (n, c) = (300, 513);
        let mut sd = 7;
        let x: Vec<f32> = (0..n * c).map(|_| (lcg(&mut sd) * 10.0) as f32).collect();
        let t: Vec<i64> = (0..n).map(|i| (i % c) as i64).collect();
        let p = CrossEntropy {
            batch: n,
            classes: c,
            spatial: 1,
            targets: Targets::Index(&t),
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Sum,
            label_smoothing: 0.1,
            softcap: None,
            z_loss: 0.0,
        };
        let mut results = Vec::new();
        for threads in [1, 2, 3] {
            let mut g = vec![0.0f32; n * c];
            let l = crate::threads::with_threads(threads, || {
                cross_entropy(&p, Logits::Grad(&x, &mut g), GradOutput::Scalar(1.0), None)
            });
            results.push((l.unwrap().unwrap().to_bits(), g));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn bad_targets_are_reported_before_anything_is_written() {
        let x = vec![0.5f32; 12];
        let t = [0i64, 5, 1];
        let p = CrossEntropy {
            batch: 3,
            classes: 4,
            spatial: 1,
            targets: Targets::Index(&t),
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
            softcap: None,
            z_loss: 0.0,
        };
        let mut g = vec![7.0f32; 12];
        let err =
            cross_entropy(&p, Logits::Grad(&x, &mut g), GradOutput::Scalar(1.0), None).unwrap_err();
        assert!(matches!(
            err,
            CeError::TargetOutOfBounds {
                value: 5,
                position: 1,
                ..
            }
        ));
        assert!(g.iter().all(|&v| v == 7.0));
        let short = [0i64, 1];
        let p = CrossEntropy {
            targets: Targets::Index(&short),
            ..p
        };
        assert!(matches!(
            cross_entropy(&p, Logits::Forward(&x), GradOutput::Scalar(1.0), None),
            Err(CeError::Invalid { arg: "target", .. })
        ));
    }

    /// Softcap and z-loss against the plain loss of the capped logits (f64)
    /// plus `z lse²`, and the chain rule through `tanh`.
    #[test]
    fn softcap_and_z_loss_match_their_definition() {
        let (n, c, sp, cap, zl) = (5, 37, 3, 2.5, 0.03);
        let mut sd = 11;
        let x: Vec<f32> = (0..n * c * sp)
            .map(|_| (lcg(&mut sd) * 16.0 - 8.0) as f32)
            .collect();
        let t: Vec<i64> = (0..n * sp)
            .map(|i| if i == 4 { -100 } else { (i * 7 % c) as i64 })
            .collect();
        fn problem<T>(t: &[i64], n: usize, c: usize, sp: usize) -> CrossEntropy<'_, T> {
            CrossEntropy {
                batch: n,
                classes: c,
                spatial: sp,
                targets: Targets::Index(t),
                weight: None,
                ignore_index: -100,
                reduction: Reduction::None,
                label_smoothing: 0.1,
                softcap: None,
                z_loss: 0.0,
            }
        }
        let base = problem::<f64>(&t, n, c, sp);
        let z: Vec<f64> = x.iter().map(|&v| cap * (v as f64 / cap).tanh()).collect();
        let (mut lz, mut gz) = (vec![0.0; n * sp], vec![0.0; x.len()]);
        let ones = vec![1.0; n * sp];
        let up = GradOutput::PerSample(&ones);
        cross_entropy(&base, Logits::Grad(&z, &mut gz), up, Some(&mut lz)).unwrap();
        let p = CrossEntropy {
            softcap: Some(cap),
            z_loss: zl,
            ..problem::<f32>(&t, n, c, sp)
        };
        let (mut l, mut g) = (vec![0.0f32; n * sp], vec![0.0f32; x.len()]);
        cross_entropy(&p, Logits::Grad(&x, &mut g), up, Some(&mut l)).unwrap();
        for i in 0..n {
            for s in 0..sp {
                let at = |k: usize| i * c * sp + k * sp + s;
                let lse = (0..c).map(|k| z[at(k)].exp()).sum::<f64>().ln();
                let kept = t[i * sp + s] != -100;
                let want = lz[i * sp + s] + if kept { zl * lse * lse } else { 0.0 };
                assert!((l[i * sp + s] as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
                for k in 0..c {
                    let extra = if kept {
                        2.0 * zl * lse * (z[at(k)] - lse).exp()
                    } else {
                        0.0
                    };
                    let slope = 1.0 / (x[at(k)] as f64 / cap).cosh().powi(2);
                    let want = (gz[at(k)] + extra) * slope;
                    assert!(
                        (g[at(k)] as f64 - want).abs() < 2e-6,
                        "{} vs {want}",
                        g[at(k)]
                    );
                }
            }
        }
    }
}
