"""Score a corpus of token sequences on a Dask cluster: per-sequence perplexity.

An evaluation job holds a corpus's final hidden states, ``(tokens, D)``, and
the model's output head, ``(V, D)``. ``fusedce.dask.linear_token_stats``
splits the tokens into row blocks (data parallel) and the head into class
shards (vocabulary parallel): each task computes one block's partial
log-sum-exp over one shard, the partials are merged in a fixed tree, and no
task holds more than a row block, a head shard and one tile of logits.

The data: a random head and hidden states; the "text" is sampled from the
model's own distribution at temperature 1.2, in sequences of different
lengths (the padding carries ``ignore_index`` and does not count).

    pip install 'fusedce[dask]'
    python examples/dask_scoring.py [--workers 2] [--shards 4]

It starts a ``LocalCluster`` (a real deployment passes ``--scheduler`` the
address of its own), prints each sequence's perplexity, and checks every
token's log-prob against the one-machine ``fusedce.linear_token_stats``;
it exits non-zero if they disagree beyond float32 rounding.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import fusedce

PAD = -100


def corpus(rng: np.random.Generator, sequences: int, length: int, vocab: int, dim: int):
    """Hidden states, head, and target tokens (padded with PAD) of a corpus."""
    head = (rng.normal(size=(vocab, dim)) / np.sqrt(dim)).astype(np.float32)
    hidden = (rng.normal(size=(sequences * length, dim)) * 6.0).astype(np.float32)
    target = np.empty(len(hidden), np.int64)
    for i in range(0, len(hidden), 512):  # Gumbel-max draws at temperature 1.2 (data generation only)
        z = hidden[i : i + 512] @ head.T / 1.2
        target[i : i + 512] = np.argmax(z + rng.gumbel(size=z.shape), axis=1)
    target = target.reshape(sequences, length)
    for s, n in enumerate(rng.integers(length // 2, length + 1, size=sequences)):
        target[s, n:] = PAD
    return hidden, head, target.reshape(-1)


def perplexity(logprob: np.ndarray, target: np.ndarray, sequences: int) -> np.ndarray:
    real = (target != PAD).reshape(sequences, -1)
    return np.exp(-(logprob.reshape(sequences, -1) * real).sum(1) / real.sum(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4, help="class shards of the head")
    ap.add_argument("--scheduler", default=None, help="address of a running scheduler (default: a LocalCluster)")
    args = ap.parse_args(argv)

    import dask.array as da
    from dask.distributed import Client, LocalCluster

    import fusedce.dask as fdask

    rng = np.random.default_rng(0)
    hidden, head, target = corpus(rng, args.sequences, args.length, args.vocab, args.dim)
    rows = args.length * max(1, args.sequences // (2 * args.workers))  # whole sequences per row block

    cluster = None if args.scheduler else LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                                       dashboard_address=None)
    with Client(args.scheduler or cluster) as client:
        # The arrays go to the workers once, not inside the graph (a real job reads them there).
        x = da.from_delayed(client.scatter(hidden), hidden.shape, dtype=hidden.dtype).rechunk((rows, args.dim))
        w = da.from_delayed(client.scatter(head), head.shape, dtype=head.dtype).rechunk(
            (-(-args.vocab // args.shards), args.dim))
        stats = fdask.linear_token_stats(x, w, target, ignore_index=PAD, stats=["logprob", "entropy"])
        t0 = time.perf_counter()
        logprob, entropy = client.compute([stats.logprob, stats.entropy], sync=True)
        elapsed = time.perf_counter() - t0
    if cluster is not None:
        cluster.close()

    real = int((target != PAD).sum())
    print(f"scored {real} tokens against a {args.vocab}-token head on {args.workers} workers "
          f"({x.numblocks[0]} row blocks x {w.numblocks[0]} class shards) in {elapsed:.2f} s")
    for s, p in enumerate(perplexity(logprob, target, args.sequences)):
        print(f"  sequence {s:2d}: {int((target.reshape(args.sequences, -1)[s] != PAD).sum()):4d} tokens, "
              f"perplexity {p:9.2f}")
    print(f"mean entropy of the model's next-token distribution: {entropy[target != PAD].mean():.3f} nats")

    want = fusedce.linear_token_stats(hidden, head, target, ignore_index=PAD, stats=["logprob"]).logprob
    err = float(np.max(np.abs(logprob - want) / (1 + np.abs(want))))
    print(f"check against the one-machine call: max relative error of the log-probs {err:.1e}")
    if err > 1e-5:
        print("FAILED: the distributed log-probs disagree with the one-machine call", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
