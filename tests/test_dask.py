"""fusedce.dask on a LocalCluster of two one-thread worker processes: every
distributed result equals the one-machine call's to float32 rounding (the
tolerances of test_shard.py), over row chunkings and class shardings (one
class per shard, shards with no target, uneven shards) and the options;
argmax, rank and top-k exactly. The graph never holds an N x C array; a
worker killed in the middle of a job changes no bit of its result; workers
whose memory limit is below the whole head still finish the
vocabulary-parallel job."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from optional import need

dask = need("dask")
distributed = need("distributed")
da = need("dask.array")

import fusedce  # noqa: E402
import fusedce.dask as fdask  # noqa: E402
from test_shard import check_stats, close, close_grad  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            yield c


def grid(rng, *shape):
    """Multiples of 1/4: every product below is exact, so the logits of a
    shard equal the one-machine logits and the order statistics must match."""
    return (rng.integers(-4, 5, shape) / 4).astype(np.float32)


ROWS = [(40,), (7, 13, 20), (1, 39)]
SHARDS = [(37,), (1, 1, 35), (10, 17, 10), (30, 7)]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("options", [
    {},
    {"label_smoothing": 0.1, "weight": True, "reduction": "sum"},
    {"softcap": 3.0, "z_loss": 1e-3, "ignore_index": 5, "reduction": "none"},
    {"probs": True, "label_smoothing": 0.2},
])
def test_linear_cross_entropy_equals_the_one_machine_call(client, rows, shards, options):
    rng = np.random.default_rng(sum(rows) * 31 + len(shards))
    opts = dict(options)
    n, c, d = sum(rows), sum(shards), 12
    x, w, b = grid(rng, n, d), grid(rng, c, d), grid(rng, c)
    t = rng.integers(0, 3, n)  # targets in the first shard only: the others hold none
    t[::5] = opts.get("ignore_index", -100)
    if opts.pop("probs", False):
        t = rng.random((n, c)).astype(np.float32)
        t /= t.sum(1, keepdims=True)
    weight = (rng.random(c) + 0.5).astype(np.float32) if opts.pop("weight", False) else None
    want, grads = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, weight=weight, return_grad=True, **opts)
    loss, dgrads = fdask.linear_cross_entropy(
        da.from_array(x, chunks=(rows, d)), da.from_array(w, chunks=(shards, d)),
        da.from_array(t, chunks=(rows,) + ((shards,) if t.ndim == 2 else ())), linear_bias=da.from_array(b, chunks=(shards,)),
        weight=weight, return_grad=True, **opts)
    assert dgrads.input.chunks == ((rows), (d,)) and dgrads.linear_weight.chunks == (shards, (d,))
    got, gx, gw, gb = dask.compute(loss, *dgrads)
    close(got, want, scale=10.0 * n)
    unit = 1.0 if opts.get("reduction") in ("sum", "none") else 1.0 / n
    for g, ref in zip((gx, gw, gb), grads):
        assert g.dtype == ref.dtype
        close_grad(g, ref, unit=unit * n)


@pytest.mark.parametrize("rows,shards", [((40,), (37,)), ((7, 13, 20), (1, 1, 35)), ((25, 15), (10, 17, 10))])
def test_linear_token_stats_equal_the_one_machine_call(client, rows, shards):
    rng = np.random.default_rng(7)
    n, c, d = sum(rows), sum(shards), 9
    x, w = grid(rng, n, d), grid(rng, c, d)
    t = rng.integers(0, c, n)
    t[::4] = -100
    kw = dict(temperature=0.7, softcap=4.0, top_k=4)
    want, grads = fusedce.linear_token_stats(x, w, t, return_grad=True, grad_logprob=1.0, grad_entropy=-0.5, **kw)
    got, dgrads = fdask.linear_token_stats(da.from_array(x, chunks=(rows, d)), da.from_array(w, chunks=(shards, d)), t,
                                           return_grad=True, grad_logprob=1.0, grad_entropy=-0.5, **kw)
    got, dgrads = dask.compute(got, dgrads)
    check_stats(got, want)
    for g, ref in zip(dgrads, grads):
        if ref is not None:
            close_grad(g, ref, unit=n)


@pytest.mark.parametrize("chunks", [(40, 37), ((7, 13, 20), (1, 1, 35)), ((1, 39), (30, 7))])
def test_cross_entropy_and_token_stats_of_class_sharded_logits(client, chunks):
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(40, 37)) * 3).astype(np.float32)
    logits[2, 5:] = -np.inf
    t = rng.integers(0, 37, 40)
    t[::6] = -100
    x = da.from_array(logits, chunks=chunks)
    want, grad = fusedce.cross_entropy(logits, t, label_smoothing=0.1, reduction="none", return_grad=True,
                                       grad_output=np.arange(40.0))
    got, dgrad = dask.compute(*fdask.cross_entropy(x, t, label_smoothing=0.1, reduction="none", return_grad=True,
                                                   grad_output=np.arange(40.0)))
    close(got, want, scale=10.0)
    close_grad(dgrad, grad, unit=40.0)
    want_s, grad_s = fusedce.token_stats(logits, t, top_k=3, return_grad=True, grad_entropy=1.0)
    got_s, dgrad_s = dask.compute(*fdask.token_stats(x, t, top_k=3, return_grad=True, grad_entropy=1.0))
    check_stats(got_s, want_s)
    close_grad(dgrad_s, grad_s, unit=10.0)
    only = fdask.token_stats(x, stats=["lse", "argmax"])
    assert only.entropy is None and only.rank is None and only.topk_ids is None
    np.testing.assert_array_equal(only.argmax.compute(), want_s.argmax)


def test_bfloat16_results_keep_the_one_machine_dtypes(client):
    """Half inputs compute in float32: the loss and gradients come back in
    the input's dtype, within one bfloat16 rounding of the one-machine call."""
    ml_dtypes = need("ml_dtypes")
    rng = np.random.default_rng(4)
    bf16 = ml_dtypes.bfloat16
    x, w, t = grid(rng, 24, 8).astype(bf16), grid(rng, 30, 8).astype(bf16), rng.integers(0, 30, 24)
    want, grads = fusedce.linear_cross_entropy(x, w, t, reduction="none", return_grad=True)
    got, dgrads = fdask.linear_cross_entropy(da.from_array(x, chunks=(10, 8)), da.from_array(w, chunks=(7, 8)), t,
                                             reduction="none", return_grad=True)
    got, gx, gw = dask.compute(got, dgrads.input, dgrads.linear_weight)
    for g, ref in ((got, want), (gx, grads.input), (gw, grads.linear_weight)):
        assert g.dtype == ref.dtype == bf16
        np.testing.assert_allclose(g.astype(np.float32), ref.astype(np.float32), rtol=2**-7,
                                   atol=2**-7 * float(np.abs(ref.astype(np.float32)).max()))


def test_the_graph_holds_no_n_by_c_array():
    """Run on the local scheduler with a callback that sees every task's
    result: none is larger than one (row block x class shard) tile of logits."""
    n, c, d, rows, shards = 400, 1000, 32, 100, 250
    rs = da.random.default_rng(0)
    x = rs.standard_normal((n, d), chunks=(rows, d), dtype=np.float32)
    w = rs.standard_normal((c, d), chunks=(shards, d), dtype=np.float32)
    t = rs.integers(0, c, n, chunks=rows)
    loss, grads = fdask.linear_cross_entropy(x, w, t, return_grad=True)
    stats = fdask.linear_token_stats(x, w, t, top_k=5)
    logits = rs.standard_normal((n, c), chunks=(rows, shards), dtype=np.float32)
    ce = fdask.cross_entropy(logits, t, return_grad=True)
    largest = {}

    def record(key, result, dsk, state, worker_id):
        if not str(key).startswith("finalize-"):  # compute's own joining of the outputs' blocks
            largest[key] = nbytes(result)

    with dask.callbacks.Callback(posttask=record):
        dask.compute(loss, grads, stats, ce, scheduler="sync")
    tile = rows * shards * 4
    assert len(largest) > 100
    assert max(largest.values()) <= tile, max(largest.items(), key=lambda kv: kv[1])
    for arr in (grads.input, *[s for s in stats if s is not None], ce[1]):
        assert max(arr.chunks[0]) <= rows
    assert max(grads.linear_weight.chunks[0]) <= shards and max(ce[1].chunks[1]) <= shards


def nbytes(v):
    if isinstance(v, np.ndarray):
        return v.nbytes
    if isinstance(v, tuple):
        return sum(nbytes(f) for f in v)
    return 0


def test_a_worker_killed_mid_job_changes_no_bit(client):
    rng = np.random.default_rng(11)
    n, c, d = 600, 3000, 64
    x, w = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(c, d)).astype(np.float32)
    t = rng.integers(0, c, n)

    def slow(block):  # a data source that takes its time (defined here: pickled by value)
        time.sleep(0.25)
        return block

    def job():
        xs = da.from_array(x, chunks=(50, d)).map_blocks(slow, dtype=np.float32)
        loss, grads = fdask.linear_cross_entropy(xs, da.from_array(w, chunks=(1000, d)), t, return_grad=True)
        return [loss, grads.input, grads.linear_weight]

    undisturbed = dask.compute(*job())
    pids = client.run(os.getpid)
    futures = client.compute(job())
    time.sleep(1.0)
    assert not all(f.done() for f in futures), "the job ended before the worker was killed"
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    results = client.gather(futures)
    assert client.run(os.getpid) != pids, "no worker was replaced"
    for got, want in zip(results, undisturbed):
        np.testing.assert_array_equal(got, want)


def test_a_head_larger_than_a_worker_memory_limit_is_sharded_over_two():
    """A 512 MiB head, made shard by shard on the workers, each of which may
    use 384 MiB: the vocabulary-parallel loss finishes and equals the
    one-machine call on the same head."""
    c, d, n, shard = 65536, 2048, 32, 4096
    rs = np.random.default_rng(1)
    x = rs.normal(size=(n, d)).astype(np.float32)
    t = rs.integers(0, c, n)

    def head(block_info=None):
        lo = block_info[None]["array-location"][0][0]
        return np.random.default_rng(lo).normal(size=(shard, d)).astype(np.float32) * 0.02

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="384MiB",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as cl:
        w = da.map_blocks(head, chunks=((shard,) * (c // shard), (d,)), dtype=np.float32)
        assert w.nbytes > 384 << 20
        got = cl.compute(fdask.linear_cross_entropy(x, w, t)).result(timeout=300)
        whole = w.compute(scheduler="sync")
    np.testing.assert_allclose(got, fusedce.linear_cross_entropy(x, whole, t), rtol=1e-6)


def test_the_scoring_example_checks_itself():
    import runpy
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "dask_scoring.py"
    mod = runpy.run_path(str(path), run_name="example")
    assert mod["main"](["--sequences", "4", "--length", "64", "--vocab", "500", "--dim", "16"]) == 0


def test_errors_name_the_argument():
    x = da.zeros((4, 6), chunks=2, dtype=np.float32)
    with pytest.raises(ValueError, match="target"):
        fdask.cross_entropy(x, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="weight"):
        fdask.cross_entropy(x, np.zeros(4, np.int64), weight=np.ones(5))
    with pytest.raises(ValueError, match="reduction"):
        fdask.cross_entropy(x, np.zeros(4, np.int64), reduction="avg")
    with pytest.raises(ValueError, match="linear_weight"):
        fdask.linear_cross_entropy(x, da.zeros((3, 5), chunks=1), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="target"):
        fdask.token_stats(x, stats=["rank"])
    with pytest.raises(ValueError, match="grad_output"):
        fdask.cross_entropy(x, np.zeros(4, np.int64), return_grad=True, grad_output=np.ones(4))
    with pytest.raises(IndexError, match="target"):
        fdask.cross_entropy(x, np.array([0, 1, 2, 60])).compute(scheduler="sync")
