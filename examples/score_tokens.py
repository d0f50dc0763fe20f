"""Score token sequences from hidden states and an LM head, without the logits.

A scoring service gets the final hidden states of a model, ``(tokens, D)``,
and its output head, ``(V, D)``, and wants each token's log-probability, the
model's entropy there, the target's rank and the top-5 alternatives, and the
perplexity of every sequence. ``fusedce.linear_token_stats`` computes all of
it chunk by chunk: the ``tokens x V`` logits (here 4096 x 32000, 500 MiB in
float32) never exist.

The data: a random head and hidden states; the "text" is sampled from the
model's own distribution at temperature 1.2, so its perplexity is that of a
model scoring text a little more random than its own. Sequences have
different lengths: the padding carries ``ignore_index`` and does not count.

    python examples/score_tokens.py

It prints the per-sequence perplexity and a few tokens' statistics, checks a
slice of 64 tokens against a float64 numpy computation from the full logits,
and exits non-zero if they disagree beyond float32 accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import fusedce

PAD = -100


def sample_text(rng, hidden, head, temperature, chunk=256):
    """Tokens drawn from softmax(hidden @ head.T / temperature) (Gumbel-max,
    chunk by chunk: data generation only)."""
    out = np.empty(len(hidden), np.int64)
    for i in range(0, len(hidden), chunk):
        z = hidden[i : i + chunk] @ head.T / temperature
        out[i : i + chunk] = np.argmax(z + rng.gumbel(size=z.shape), axis=1)
    return out


def reference(hidden, head, target):
    """Float64 log-prob, entropy and rank from the full logits of a few tokens."""
    z = hidden.astype(np.float64) @ head.astype(np.float64).T
    lse = np.logaddexp.reduce(z, axis=1)
    logp = z - lse[:, None]
    p = np.exp(logp)
    rows = np.arange(len(z))
    return logp[rows, target], lse - (p * z).sum(1), (z > z[rows, target][:, None]).sum(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    head = (rng.normal(size=(args.vocab, args.dim)) / np.sqrt(args.dim)).astype(np.float32)
    n = args.sequences * args.length
    hidden = (rng.normal(size=(n, args.dim)) * 6.0).astype(np.float32)
    tokens = sample_text(rng, hidden, head, temperature=1.2)
    lengths = rng.integers(args.length // 2, args.length + 1, size=args.sequences)
    target = tokens.reshape(args.sequences, args.length).copy()
    for s, length in enumerate(lengths):
        target[s, length:] = PAD
    target = target.reshape(-1)

    t0 = time.perf_counter()
    stats = fusedce.linear_token_stats(hidden, head, target, ignore_index=PAD, top_k=5)
    elapsed = time.perf_counter() - t0
    logprob = stats.logprob.reshape(args.sequences, args.length)
    real = target.reshape(args.sequences, args.length) != PAD
    ppl = np.exp(-(logprob * real).sum(1) / real.sum(1))
    print(f"scored {int(real.sum())} tokens ({n} with padding) against a {args.vocab}-token head "
          f"in {elapsed * 1e3:.0f} ms, without the {n} x {args.vocab} logits")
    for s in range(args.sequences):
        print(f"  sequence {s}: {int(real[s].sum()):4d} tokens, perplexity {ppl[s]:9.2f}")
    top1 = float((stats.rank[target != PAD] == 0).mean())
    print(f"the model's top-1 choice was the text's token {top1:.1%} of the time")
    for i in range(3):
        alts = ", ".join(f"{t}:{lp:.2f}" for t, lp in zip(stats.topk_ids[i], stats.topk_logprobs[i]))
        print(f"  token {i}: id {target[i]}, log-prob {stats.logprob[i]:.3f}, entropy {stats.entropy[i]:.3f}, "
              f"rank {stats.rank[i]}; top-5 {alts}")

    # Check a slice against float64 numpy from the full logits of those tokens.
    sl = slice(0, 64)
    want_lp, want_ent, want_rank = reference(hidden[sl], head, target[sl])
    err_lp = float(np.max(np.abs(stats.logprob[sl] - want_lp) / (1 + np.abs(want_lp))))
    err_ent = float(np.max(np.abs(stats.entropy[sl] - want_ent) / (1 + np.abs(want_ent))))
    ranks_ok = bool(np.array_equal(stats.rank[sl], want_rank))
    print(f"check against float64 on 64 tokens: max relative error log-prob {err_lp:.1e}, "
          f"entropy {err_ent:.1e}, ranks {'equal' if ranks_ok else 'DIFFER'}")
    if err_lp > 2e-5 or err_ent > 2e-5 or not ranks_ok:
        print("FAILED: disagreement with the float64 reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
