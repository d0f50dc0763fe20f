//! Per-token statistics of the softmax over classes — `lse`, `logprob`,
//! `entropy`, `argmax`, `rank`, top-k — with temperature and softcap, and
//! the gradient of `Σ gl · logprob + ge · entropy`, in one fused pass per
//! sample (`kernels/stats.rs`). A problem is validated into a [`StatsPlan`]
//! (`plan.rs`) and executed over work items of samples (`execute.rs`).
//!
//! Every sample's results depend on its own logits only: the same bits
//! whatever the other samples of the call, the item split or the thread
//! count.

pub(crate) mod execute;
mod plan;

pub use plan::StatsPlan;

use crate::ce::plan::check_len;
use crate::ce::{Io, Logits};
use crate::elem::{Elem, Real};
use crate::error::CeError;
use crate::simd::Compute;
use crate::threads;

/// Which statistics are asked for (the top-k by [`TokenStats::top_k`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub lse: bool,
    pub logprob: bool,
    pub entropy: bool,
    pub argmax: bool,
    pub rank: bool,
}

/// A statistics problem over logits laid out `(batch, classes, spatial)`,
/// C-contiguous (`spatial` = `d1 * ... * dK`, 1 for `(N, C)`).
#[derive(Clone, Copy, Debug)]
pub struct TokenStats<'a> {
    pub batch: usize,
    pub classes: usize,
    pub spatial: usize,
    /// Class indices `(N, d1..dK)`; needed for `logprob`, `rank` and a
    /// log-prob gradient.
    pub targets: Option<&'a [i64]>,
    pub ignore_index: i64,
    pub temperature: f64,
    pub softcap: Option<f64>,
    pub top_k: usize,
    pub wanted: Wanted,
}

/// A per-token upstream gradient.
#[derive(Clone, Copy, Debug)]
pub enum Upstream<'a> {
    /// Absent: zero.
    Zero,
    /// The same for every token.
    Scalar(f64),
    /// One per token (the target's shape).
    PerToken(&'a [f64]),
}

/// The upstream gradients of `logprob` and `entropy`.
#[derive(Clone, Copy, Debug)]
pub struct StatsGrad<'a> {
    pub logprob: Upstream<'a>,
    pub entropy: Upstream<'a>,
}

impl StatsGrad<'_> {
    pub const NONE: StatsGrad<'static> = StatsGrad {
        logprob: Upstream::Zero,
        entropy: Upstream::Zero,
    };
}

/// Where the statistics go: one value per token (`top_k` per token for the
/// top-k), `None` for what was not asked for.
pub struct StatsOut<'a, O> {
    pub lse: Option<&'a mut [O]>,
    pub logprob: Option<&'a mut [O]>,
    pub entropy: Option<&'a mut [O]>,
    pub argmax: Option<&'a mut [i64]>,
    pub rank: Option<&'a mut [i64]>,
    pub topk_ids: Option<&'a mut [i64]>,
    pub topk_logprobs: Option<&'a mut [O]>,
}

impl<O> StatsOut<'_, O> {
    /// The outputs of samples `i0..i1` (`k` values each for the top-k).
    pub(crate) fn samples(&mut self, i0: usize, i1: usize, k: usize) -> StatsOut<'_, O> {
        fn part<'s, V>(v: &'s mut Option<&mut [V]>, a: usize, b: usize) -> Option<&'s mut [V]> {
            v.as_deref_mut().map(|v| &mut v[a..b])
        }
        StatsOut {
            lse: part(&mut self.lse, i0, i1),
            logprob: part(&mut self.logprob, i0, i1),
            entropy: part(&mut self.entropy, i0, i1),
            argmax: part(&mut self.argmax, i0, i1),
            rank: part(&mut self.rank, i0, i1),
            topk_ids: part(&mut self.topk_ids, i0 * k, i1 * k),
            topk_logprobs: part(&mut self.topk_logprobs, i0 * k, i1 * k),
        }
    }

    /// Every output has the length the plan needs, and is present exactly
    /// when asked for.
    pub(crate) fn check(&self, plan: &StatsPlan<'_, impl Real>) -> Result<(), CeError> {
        let (n, w) = (plan.samples(), plan.wanted);
        let k = plan.top_k;
        let lens = [
            ("lse", self.lse.as_ref().map(|v| v.len()), w.lse, n),
            (
                "logprob",
                self.logprob.as_ref().map(|v| v.len()),
                w.logprob,
                n,
            ),
            (
                "entropy",
                self.entropy.as_ref().map(|v| v.len()),
                w.entropy,
                n,
            ),
            ("argmax", self.argmax.as_ref().map(|v| v.len()), w.argmax, n),
            ("rank", self.rank.as_ref().map(|v| v.len()), w.rank, n),
            (
                "topk_ids",
                self.topk_ids.as_ref().map(|v| v.len()),
                k > 0,
                n * k,
            ),
            (
                "topk_logprobs",
                self.topk_logprobs.as_ref().map(|v| v.len()),
                k > 0,
                n * k,
            ),
        ];
        for (arg, got, wanted, want_len) in lens {
            match (got, wanted) {
                (Some(l), true) => check_len(arg, l, want_len, "one per token")?,
                (None, false) => {}
                _ => {
                    return Err(CeError::invalid(
                        arg,
                        "expected an output buffer exactly when the statistic is asked for",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Computes the statistics of `p` over `logits`, and their gradient when
/// `logits` asks for one (`Io::Grad` / `Io::InPlace`) with the upstream
/// gradients `grad`. Float outputs `O` are the compute type's width.
///
/// Every argument is validated before anything is written.
pub fn token_stats<T: Elem, O: Elem>(
    p: &TokenStats<'_>,
    logits: Logits<'_, T>,
    grad: StatsGrad<'_>,
    out: StatsOut<'_, O>,
) -> Result<(), CeError>
where
    T::Acc: Compute,
{
    let plan = StatsPlan::<T::Acc>::new(p, grad, logits.wants_grad())?;
    let numel = plan.samples() * p.classes;
    check_len("input", logits.len(), numel, "N * C * d1..dK")?;
    if let Io::Grad(_, g) = &logits {
        check_len("grad_out", g.len(), numel, "the input's size")?;
    }
    out.check(&plan)?;
    threads::run(crate::ce::execute::is_small(numel), |threads| {
        let bufs = execute::thread_bufs(&plan, threads, logits.wants_grad())?;
        execute::execute(&plan, 0, logits, out, &bufs);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    /// Float64 reference of one sample's scores `z`: (lse, logprob, entropy,
    /// argmax, rank, top-k ids, gradient of gl·logprob + ge·entropy wrt z).
    #[allow(clippy::type_complexity)]
    fn reference(
        z: &[f64],
        y: usize,
        k: usize,
        (gl, ge): (f64, f64),
    ) -> (f64, f64, f64, usize, i64, Vec<usize>, Vec<f64>) {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        let lse = m + s.ln();
        let p: Vec<f64> = z.iter().map(|v| (v - lse).exp()).collect();
        let mean: f64 = z
            .iter()
            .zip(&p)
            .filter(|(_, &p)| p > 0.0)
            .map(|(v, p)| p * v)
            .sum();
        let entropy = lse - mean;
        let argmax = (0..z.len()).find(|&i| z[i] == m).unwrap();
        let rank = z.iter().filter(|&&v| v > z[y]).count() as i64;
        let mut ids: Vec<usize> = (0..z.len()).collect();
        ids.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap().then(a.cmp(&b)));
        ids.truncate(k);
        let grad = (0..z.len())
            .map(|c| {
                let dz = if p[c] > 0.0 { z[c] - mean } else { 0.0 };
                gl * ((c == y) as u8 as f64 - p[c]) - ge * p[c] * dz
            })
            .collect();
        (lse, z[y] - lse, entropy, argmax, rank, ids, grad)
    }

    fn logits(n: usize, c: usize, seed: u64) -> Vec<f32> {
        let mut r = seed;
        (0..n * c)
            .map(|i| match i % 29 {
                3 => f32::NEG_INFINITY,
                7 => 2.5, // ties
                _ => (lcg(&mut r) * 12.0 - 6.0) as f32,
            })
            .collect()
    }

    struct Got {
        f: [Vec<f32>; 3],
        i: [Vec<i64>; 2],
        top: Vec<i64>,
        grad: Vec<f32>,
    }

    fn run(x: &[f32], n: usize, c: usize, t: &[i64], k: usize, tf: (f64, Option<f64>)) -> Got {
        let p = TokenStats {
            batch: n,
            classes: c,
            spatial: 1,
            targets: Some(t),
            ignore_index: -100,
            temperature: tf.0,
            softcap: tf.1,
            top_k: k,
            wanted: Wanted {
                lse: true,
                logprob: true,
                entropy: true,
                argmax: true,
                rank: true,
            },
        };
        let mut f = [vec![0.0f32; n], vec![0.0; n], vec![0.0; n]];
        let mut i = [vec![0i64; n], vec![0; n]];
        let (mut top, mut topl) = (vec![0i64; n * k], vec![0.0f32; n * k]);
        let mut grad = vec![0.0f32; n * c];
        let [lse, lp, ent] = &mut f;
        let [am, rk] = &mut i;
        let out = StatsOut {
            lse: Some(lse),
            logprob: Some(lp),
            entropy: Some(ent),
            argmax: Some(am),
            rank: Some(rk),
            topk_ids: (k > 0).then_some(&mut top[..]),
            topk_logprobs: (k > 0).then_some(&mut topl[..]),
        };
        let g = StatsGrad {
            logprob: Upstream::Scalar(0.7),
            entropy: Upstream::Scalar(-0.3),
        };
        token_stats(&p, Io::Grad(x, &mut grad), g, out).unwrap();
        Got { f, i, top, grad }
    }

    #[test]
    fn matches_float64_reference() {
        let (n, c, k) = (7, 301, 5);
        let x = logits(n, c, 3);
        let t: Vec<i64> = (0..n as i64).map(|i| (i * 37) % c as i64).collect();
        for tf in [(1.0, None), (0.7, None), (1.3, Some(4.0))] {
            let got = run(&x, n, c, &t, k, tf);
            for r in 0..n {
                let z: Vec<f64> = x[r * c..(r + 1) * c]
                    .iter()
                    .map(|&v| {
                        let v = v as f64;
                        let v = tf.1.map_or(v, |cap| cap * (v / cap).tanh());
                        v / tf.0
                    })
                    .collect();
                let (lse, lp, ent, am, rk, ids, g) = reference(&z, t[r] as usize, k, (0.7, -0.3));
                let close = |a: f32, b: f64| (a as f64 - b).abs() <= 2e-5 * b.abs().max(1.0);
                assert!(close(got.f[0][r], lse) && close(got.f[1][r], lp), "row {r}");
                assert!(close(got.f[2][r], ent), "entropy {} vs {ent}", got.f[2][r]);
                assert_eq!((got.i[0][r], got.i[1][r]), (am as i64, rk));
                let top: Vec<usize> = got.top[r * k..(r + 1) * k]
                    .iter()
                    .map(|&v| v as usize)
                    .collect();
                assert_eq!(top, ids);
                for cc in 0..c {
                    let slope = tf.1.map_or(1.0, |cap| {
                        1.0 / ((x[r * c + cc] as f64 / cap).cosh().powi(2))
                    }) / tf.0;
                    let want = g[cc] * slope;
                    let gotv = got.grad[r * c + cc] as f64;
                    assert!(
                        (gotv - want).abs() <= 4e-6,
                        "grad[{r},{cc}] {gotv} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_samples_results_do_not_depend_on_the_batch_or_threads() {
        let (n, c, k) = (300, 700, 3);
        let x = logits(n, c, 5);
        let t: Vec<i64> = (0..n as i64).map(|i| (i * 13) % c as i64).collect();
        let alone = run(&x[5 * c..6 * c], 1, c, &t[5..6], k, (0.9, Some(8.0)));
        for threads in [1, 2, 3] {
            let all =
                crate::threads::with_threads(threads, || run(&x, n, c, &t, k, (0.9, Some(8.0))))
                    .unwrap();
            for q in 0..3 {
                assert_eq!(all.f[q][5].to_bits(), alone.f[q][0].to_bits());
            }
            assert_eq!(&all.grad[5 * c..6 * c], &alone.grad[..]);
            assert_eq!(&all.top[5 * k..6 * k], &alone.top[..]);
        }
    }
}
