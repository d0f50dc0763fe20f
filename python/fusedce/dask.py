"""fusedce over Dask arrays: losses and token statistics of a batch chunked
by rows (data parallel), of a head or logits chunked by classes (vocabulary
parallel), or both (``pip install 'fusedce[dask]'``).

Each function builds a task graph from :mod:`fusedce.shard`, one task per
(row block, class shard) pair::

    partial[i, j]  = shard.linear_partial(X[i], W[j], ...)   # or shard.partial(logits[i, j])
    merged[i]      = tree of shard.merge over j              # fixed order: shard.fold_tree
    loss           = tree of sums over i                     # lazily reduced
    grads[i, j]    = shard.linear_loss_grad(X[i], W[j], merged[i], ...)
    dX[i] = tree of sums over j,   dW[j], db[j] = tree of sums over i

so that no task holds more than its row block, its class shard and one tile
of logits (:data:`fusedce.shard.TILE_BYTES`), and the results do not depend
on which worker finished first. Each task computes on one thread (Dask runs
tasks side by side, one per worker thread). Outputs are dask arrays: per-token results
chunked like the rows, ``dX`` like the input, ``dW``/``db`` like the head,
the gradient of logits like the logits. Compute them with any scheduler;
``dask.distributed`` retries the tasks of a lost worker.

The feature axis ``D`` of the hidden states and head is taken as one chunk
(a rechunk is added when it is not). Everything is computed on the CPU.
"""

from __future__ import annotations

import math
import operator
from functools import partial as bind
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("fusedce.dask needs Dask: pip install 'fusedce[dask]'") from exc

import fusedce

from . import shard
from ._request import TokenStats as _NumpyStats, _stat_flags, reduction_arg
from .shard import LossTerms, Partial, ShardOptions, fold_tree

__all__ = ["cross_entropy", "linear_cross_entropy", "token_stats", "linear_token_stats", "LinearGrads", "TokenStats"]

Delayed = Any
Chunks = Tuple[int, ...]


def _on_one_thread(f: Callable, *args: Any, **kw: Any) -> Any:
    with fusedce.threads(1):
        return f(*args, **kw)


def _pure(f: Callable) -> Callable:
    """A task of ``f`` (bookkeeping: fields, sums, casts, the reduction)."""
    return dask.delayed(f, pure=True)


def _delayed(f: Callable, **kw: Any) -> Callable:
    """A task of the shard pass ``f`` with the job's constant keyword
    arguments bound, run on one thread: Dask runs tasks side by side, one
    per worker thread (and sets numpy's BLAS to one thread in its workers)."""
    return dask.delayed(bind(_on_one_thread, f, **kw), pure=True)


class LinearGrads(NamedTuple):
    """:class:`fusedce.LinearCrossEntropyGrads` as dask arrays."""

    input: da.Array
    linear_weight: da.Array
    linear_bias: Optional[da.Array]


class TokenStats(NamedTuple):
    """:class:`fusedce.TokenStats` as dask arrays (None for what was not asked for)."""

    lse: Optional[da.Array]
    logprob: Optional[da.Array]
    entropy: Optional[da.Array]
    argmax: Optional[da.Array]
    rank: Optional[da.Array]
    topk_ids: Optional[da.Array]
    topk_logprobs: Optional[da.Array]


assert TokenStats._fields == _NumpyStats._fields


# ----------------------------------------------------------------------------------------------
# Inputs as blocks


def _dask_array(arg: str, a: Any, ndim: int) -> da.Array:
    x = a if isinstance(a, da.Array) else da.asarray(a)
    if x.ndim != ndim:
        raise ValueError(f"{arg}: expected a {ndim}-d array, got shape {x.shape}")
    if any(math.isnan(s) for s in x.shape):
        raise ValueError(f"{arg}: the chunk sizes must be known (call compute_chunk_sizes() first)")
    return x


def _row_blocks(arg: str, a: Any, rows: Chunks) -> List[Delayed]:
    """A per-token ``(N,)`` array's blocks, chunked like the rows."""
    x = _dask_array(arg, a, 1)
    if x.shape[0] != sum(rows):
        raise ValueError(f"{arg}: expected {sum(rows)} tokens, got shape {x.shape}")
    return list(x.rechunk((rows,)).to_delayed())


def _class_blocks(arg: str, a: Any, classes: Chunks) -> List[Optional[Delayed]]:
    """A per-class ``(C,)`` array's blocks (None throughout for None)."""
    if a is None:
        return [None] * len(classes)
    x = _dask_array(arg, a, 1)
    if x.shape[0] != sum(classes):
        raise ValueError(f"{arg}: expected one value per class ({sum(classes)}), got shape {x.shape}")
    return list(x.rechunk((classes,)).to_delayed())


def _grid(x: da.Array, rows: Chunks, classes: Chunks) -> List[List[Delayed]]:
    g = x.rechunk((rows, classes)).to_delayed()
    return [list(r) for r in g]


def _offsets(classes: Chunks) -> List[int]:
    return [int(v) for v in np.cumsum((0,) + tuple(classes))[:-1]]


class _Targets(NamedTuple):
    """The targets by block: class indices per row block, or probabilities
    per (row block, class shard), or neither."""

    indices: List[Optional[Delayed]]
    probs: List[List[Optional[Delayed]]]
    dtype_probs: bool


def _targets(target: Any, rows: Chunks, classes: Chunks) -> _Targets:
    none_grid: List[List[Optional[Delayed]]] = [[None] * len(classes) for _ in rows]
    if target is None:
        return _Targets([None] * len(rows), none_grid, False)
    t = target if isinstance(target, da.Array) else da.asarray(target)
    if t.ndim == 2 and np.issubdtype(t.dtype, np.floating):
        if t.shape != (sum(rows), sum(classes)):
            raise ValueError(f"target: probabilities of shape {(sum(rows), sum(classes))} expected, got {t.shape}")
        return _Targets([None] * len(rows), _grid(t, rows, classes), True)
    return _Targets(_row_blocks("target", t, rows), none_grid, False)


# ----------------------------------------------------------------------------------------------
# The two sources of a shard's logits


class _Job:
    """What every graph needs: the blocks of rows and shards of classes,
    and the per-(row block, shard) tasks of the source of logits."""

    def __init__(self, rows: Chunks, classes: Chunks, opts: ShardOptions, targets: _Targets,
                 class_weight: List[Optional[Delayed]]):
        self.rows, self.classes, self.opts, self.targets = rows, classes, opts, targets
        self.los = _offsets(classes)
        self.class_weight = class_weight

    def pairs(self, f: Callable[[int, int], Delayed]) -> List[List[Delayed]]:
        return [[f(i, j) for j in range(len(self.classes))] for i in range(len(self.rows))]

    def merged(self) -> List[Delayed]:
        """Each row block's partial merged over the shards, in the fixed order."""
        merge = _delayed(shard.merge)
        return [fold_tree(row, merge) for row in self.pairs(self.partial)]

    def target_kw(self, i: int, j: int) -> dict:
        t = self.targets
        return {"target": t.indices[i], "probs": t.probs[i][j], "weight": self.class_weight[j]}

    def partial(self, i: int, j: int) -> Delayed:
        raise NotImplementedError

    def rank(self, i: int, j: int, merged: Delayed) -> Delayed:
        raise NotImplementedError


class _LogitsJob(_Job):
    def __init__(self, logits: da.Array, opts: ShardOptions, targets: _Targets, class_weight: List[Optional[Delayed]]):
        super().__init__(logits.chunks[0], logits.chunks[1], opts, targets, class_weight)
        self.blocks = _grid(logits, self.rows, self.classes)
        self.dtype = logits.dtype

    def partial(self, i: int, j: int) -> Delayed:
        return _delayed(shard.partial, options=self.opts)(self.blocks[i][j], self.los[j], **self.target_kw(i, j))

    def rank(self, i: int, j: int, merged: Delayed) -> Delayed:
        return _delayed(shard.rank_count)(self.blocks[i][j], merged)


class _LinearJob(_Job):
    def __init__(self, x: da.Array, head: da.Array, bias: Any, opts: ShardOptions, targets: _Targets,
                 class_weight: List[Optional[Delayed]]):
        super().__init__(x.chunks[0], head.chunks[0], opts, targets, class_weight)
        self.x = list(x.to_delayed()[:, 0])
        self.head = list(head.to_delayed()[:, 0])
        self.bias = _class_blocks("linear_bias", bias, self.classes)
        self.dtype = np.result_type(x.dtype, head.dtype)
        self.features = x.shape[1]

    def linear_kw(self, j: int) -> dict:
        return {"linear_bias": self.bias[j]}

    def partial(self, i: int, j: int) -> Delayed:
        return _delayed(shard.linear_partial, options=self.opts)(
            self.x[i], self.head[j], self.los[j], **self.target_kw(i, j), **self.linear_kw(j))

    def rank(self, i: int, j: int, merged: Delayed) -> Delayed:
        return _delayed(shard.linear_rank_count)(self.x[i], self.head[j], merged, **self.linear_kw(j))


def _logits_job(input: Any, target: Any, weight: Any, opts: ShardOptions) -> _LogitsJob:
    x = _dask_array("input", input, 2)
    return _LogitsJob(x, opts, _targets(target, x.chunks[0], x.chunks[1]), _class_blocks("weight", weight, x.chunks[1]))


def _linear_job(input: Any, linear_weight: Any, linear_bias: Any, target: Any, weight: Any,
                opts: ShardOptions) -> _LinearJob:
    x = _dask_array("input", input, 2).rechunk({1: -1})
    head = _dask_array("linear_weight", linear_weight, 2).rechunk({1: -1})
    if head.shape[1] != x.shape[1]:
        raise ValueError(f"linear_weight: expected (C, {x.shape[1]}) (input's features), got {head.shape}")
    rows, classes = x.chunks[0], head.chunks[0]
    return _LinearJob(x, head, linear_bias, opts, _targets(target, rows, classes), _class_blocks("weight", weight, classes))


# ----------------------------------------------------------------------------------------------
# Assembling outputs


def _float_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


def _column(parts: Sequence[Delayed], lengths: Chunks, dtype: Any, tail: Tuple[int, ...] = ()) -> da.Array:
    """Blocks of ``(n_i, *tail)`` stacked along the first axis."""
    return da.concatenate([da.from_delayed(p, (n,) + tail, dtype=dtype) for p, n in zip(parts, lengths)])


def _field(name: str, cast: Optional[np.dtype] = None) -> Callable:
    def get(obj: Any) -> Any:
        v = getattr(obj, name)
        return v if cast is None else v.astype(cast)

    get.__name__ = f"field_{name}"
    return get


def _tree_sum(parts: Sequence[Delayed]) -> Delayed:
    return fold_tree(list(parts), _pure(operator.add))


class _Totals(NamedTuple):
    total: float
    denominator: float


def _totals(t: LossTerms) -> _Totals:
    return _Totals(t.total, t.denominator)


def _add_totals(a: _Totals, b: _Totals) -> _Totals:
    return _Totals(a.total + b.total, a.denominator + b.denominator)


def _reduced(t: _Totals, reduction: str, dtype: np.dtype) -> np.ndarray:
    loss = t.total if reduction == "sum" else (t.total / t.denominator if t.denominator != 0 else math.nan)
    return np.asarray(loss, dtype)


def _loss_output(terms: List[Delayed], rows: Chunks, reduction: str, dtype: np.dtype) -> Tuple[da.Array, Optional[Delayed]]:
    """The loss (a dask array) and, for mean/sum, the tree-reduced totals."""
    if reduction == "none":
        return _column([_pure(_field("per_token", dtype))(t) for t in terms], rows, dtype), None
    totals = fold_tree([_pure(_totals)(t) for t in terms], _pure(_add_totals))
    return da.from_delayed(_pure(_reduced)(totals, reduction, dtype), (), dtype=dtype), totals


def _scale(totals: Optional[_Totals], reduction: str, upstream: Any) -> Any:
    """Each token's upstream gradient: that of ``sum`` as given, of ``mean``
    divided by the summed denominator, of ``none`` per token."""
    if reduction == "mean":
        assert totals is not None
        return np.float64(upstream) / totals.denominator if totals.denominator != 0 else math.nan
    return upstream


def _upstreams(arg: str, g: Any, rows: Chunks, per_token: bool) -> List[Any]:
    """An upstream gradient by row block: a number for every block, or the
    blocks of an ``(N,)`` array (``per_token`` only)."""
    if g is None:
        return [1.0] * len(rows)
    if np.ndim(g) == 0 and not isinstance(g, da.Array):
        return [float(g)] * len(rows)
    if not per_token:
        raise ValueError(f"{arg}: expected a number for reduction 'mean' or 'sum'")
    return _row_blocks(arg, g, rows)


# ----------------------------------------------------------------------------------------------
# Losses


def _loss_options(classes: int, ignore_index: Any, label_smoothing: float, softcap: Optional[float],
                  z_loss: float) -> ShardOptions:
    return ShardOptions(classes, ignore_index=-100 if ignore_index is None else ignore_index,
                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


def _loss_graph(job: _Job, reduction: str, dtype: np.dtype) -> Tuple[List[Delayed], da.Array, Optional[Delayed]]:
    r = reduction_arg(reduction)
    if r not in ("none", "mean", "sum"):
        raise ValueError(f"reduction: expected 'none', 'mean' or 'sum', got {reduction!r}")
    merged = job.merged()
    terms = [_delayed(shard.loss_terms, options=job.opts)(m) for m in merged]
    loss, totals = _loss_output(terms, job.rows, r, dtype)
    return merged, loss, totals


def _loss_scales(job: _Job, reduction: str, totals: Optional[Delayed], grad_output: Any) -> List[Any]:
    ups = _upstreams("grad_output", grad_output, job.rows, reduction == "none")
    return [_pure(_scale)(totals, reduction, u) for u in ups]


def cross_entropy(input: Any, target: Any, weight: Any = None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, return_grad: bool = False, grad_output: Any = None,
                  softcap: Optional[float] = None, z_loss: float = 0.0) -> Union[da.Array, Tuple[da.Array, da.Array]]:
    """:func:`fusedce.cross_entropy` of ``(N, C)`` logits chunked by rows
    and/or classes.

    Args:
        input: ``(N, C)`` dask (or numpy) array of logits, any chunking.
        target: ``(N,)`` int class indices, or ``(N, C)`` float probabilities.
        weight: ``(C,)`` class weights, or None.
        The others as :func:`fusedce.cross_entropy` (``grad_output``: a number,
        or ``(N,)`` for ``"none"``).

    Returns:
        The loss as a dask array (0-d, or ``(N,)`` chunked like the rows), and
        with ``return_grad`` the gradient of the logits, chunked like them.
    """
    x = _dask_array("input", input, 2)
    opts = _loss_options(x.shape[1], ignore_index, label_smoothing, softcap, z_loss)
    job = _logits_job(x, target, weight, opts)
    merged, loss, totals = _loss_graph(job, reduction, x.dtype)
    if not return_grad:
        return loss
    scales = _loss_scales(job, reduction, totals, grad_output)
    grad = job.pairs(lambda i, j: _delayed(shard.loss_grad, options=opts)(
        job.blocks[i][j], job.los[j], merged[i], scale=scales[i], **job.target_kw(i, j)))
    return loss, _block_grid(grad, job.rows, job.classes, x.dtype)


def _block_grid(grid: List[List[Delayed]], rows: Chunks, classes: Chunks, dtype: Any) -> da.Array:
    return da.block([[da.from_delayed(g, (n, c), dtype=dtype) for g, c in zip(row, classes)]
                     for row, n in zip(grid, rows)])


def linear_cross_entropy(input: Any, linear_weight: Any, target: Any, *, linear_bias: Any = None, weight: Any = None,
                         reduction: str = "mean", ignore_index: Optional[int] = None, label_smoothing: float = 0.0,
                         return_grad: bool = False, grad_output: Any = None, softcap: Optional[float] = None,
                         z_loss: float = 0.0) -> Union[da.Array, Tuple[da.Array, LinearGrads]]:
    """:func:`fusedce.linear_cross_entropy` of hidden states chunked by rows
    and a head chunked by classes (data and/or vocabulary parallel).

    Args:
        input: ``(N, D)`` dask (or numpy) array, chunked by rows.
        linear_weight: ``(C, D)`` head, chunked by classes (its shards).
        target: ``(N,)`` int class indices, or ``(N, C)`` float probabilities.
        linear_bias: ``(C,)`` or None; weight: ``(C,)`` class weights or None.
        The others as :func:`fusedce.linear_cross_entropy`.

    Returns:
        The loss (0-d, or ``(N,)`` chunked like the rows), and with
        ``return_grad`` the :class:`LinearGrads` of dask
        arrays: ``input`` chunked like the input, ``linear_weight`` and
        ``linear_bias`` like the head's shards.
    """
    head = _dask_array("linear_weight", linear_weight, 2)
    opts = _loss_options(head.shape[0], ignore_index, label_smoothing, softcap, z_loss)
    job = _linear_job(input, head, linear_bias, target, weight, opts)
    merged, loss, totals = _loss_graph(job, reduction, job.dtype)
    if not return_grad:
        return loss
    scales = _loss_scales(job, reduction, totals, grad_output)
    grads = job.pairs(lambda i, j: _delayed(shard.linear_loss_grad, options=opts)(
        job.x[i], job.head[j], job.los[j], merged[i], scale=scales[i], **job.target_kw(i, j), **job.linear_kw(j)))
    return loss, _linear_grads(job, grads, input, head, linear_bias)


def _linear_grads(job: _LinearJob, grads: List[List[Delayed]], input: Any, head: da.Array,
                  bias: Any) -> LinearGrads:
    """``dX`` summed over the shards, ``dW`` and ``db`` over the row blocks,
    each in the dtype of what it differentiates."""
    d, cols = job.features, list(zip(*grads))
    db = None if bias is None else _summed(cols, "db", job.classes, _dask_array("linear_bias", bias, 1).dtype)
    return LinearGrads(_summed(grads, "dx", job.rows, _dask_array("input", input, 2).dtype, (d,)),
                       _summed(cols, "dw", job.classes, head.dtype, (d,)), db)


def _summed(groups: Sequence[Sequence[Delayed]], name: str, lengths: Chunks, dtype: Any,
            tail: Tuple[int, ...] = ()) -> da.Array:
    """Field ``name`` of each group's gradient parts, summed in the fixed
    tree, cast to ``dtype`` and stacked (one block of ``lengths`` per group)."""
    totals = [_tree_sum([_pure(_field(name))(g) for g in group]) for group in groups]
    return _column([_pure(_cast)(t, dtype) for t in totals], lengths, dtype, tail)


def _cast(a: np.ndarray, dtype: Any) -> np.ndarray:
    return a.astype(dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# Token statistics


def _stats_options(classes: int, stats: Any, has_target: bool, temperature: float, softcap: Optional[float],
                   ignore_index: int, top_k: int) -> Tuple[ShardOptions, dict]:
    """The job's options and which statistics are wanted, by name (the
    one-machine call's defaults and checks)."""
    lse, logprob, entropy, argmax, rank = _stat_flags(stats, has_target, top_k)
    if (logprob or rank) and not has_target:
        raise ValueError("target: logprob and rank need a target")
    opts = ShardOptions(classes, ignore_index=ignore_index, temperature=temperature, softcap=softcap, top_k=top_k,
                        argmax=argmax)
    top = opts.top_k > 0  # both top-k arrays come together, as from the one-machine call
    return opts, dict(lse=lse, logprob=logprob, entropy=entropy, argmax=argmax, rank=rank, topk_ids=top,
                      topk_logprobs=top)


def _stats_graph(job: _Job, wanted: dict, dtype: np.dtype) -> Tuple[TokenStats, List[Delayed]]:
    """The wanted statistics as dask arrays, and the merged partials."""
    merged = job.merged()
    ranks: List[Optional[Delayed]] = [None] * len(merged)
    if wanted["rank"]:
        ranks = [_tree_sum(row) for row in job.pairs(lambda i, j: job.rank(i, j, merged[i]))]
    done = [_delayed(shard.finish_stats, options=job.opts)(m, rank=r) for m, r in zip(merged, ranks)]
    k = job.opts.top_k
    tails = {"topk_ids": (k,), "topk_logprobs": (k,)}
    dtypes = {"argmax": np.int64, "rank": np.int64, "topk_ids": np.int64}
    out = {f: _column([_pure(_field(f))(d) for d in done], job.rows, dtypes.get(f, dtype),
                      tails.get(f, ())) if wanted[f] else None for f in TokenStats._fields}
    return TokenStats(**out), merged


def _stats_grad_args(job: _Job, grad_logprob: Any, grad_entropy: Any) -> Tuple[List[Any], List[Any]]:
    return (_upstreams("grad_logprob", 0.0 if grad_logprob is None else grad_logprob, job.rows, True),
            _upstreams("grad_entropy", 0.0 if grad_entropy is None else grad_entropy, job.rows, True))


def token_stats(input: Any, target: Any = None, *, temperature: float = 1.0, softcap: Optional[float] = None,
                ignore_index: int = -100, top_k: int = 0, stats: Any = None, return_grad: bool = False,
                grad_logprob: Any = None, grad_entropy: Any = None) -> Union[TokenStats, Tuple[TokenStats, da.Array]]:
    """:func:`fusedce.token_stats` of ``(N, C)`` logits chunked by rows and/or
    classes. Returns :class:`fusedce.TokenStats` of dask arrays chunked like
    the rows (None for what was not asked for), and with ``return_grad`` the
    gradient of ``Σ grad_logprob · logprob + grad_entropy · entropy``
    (numbers or ``(N,)`` arrays) chunked like the logits."""
    x = _dask_array("input", input, 2)
    opts, wanted = _stats_options(x.shape[1], stats, target is not None, temperature, softcap, ignore_index, top_k)
    job = _logits_job(x, target, None, opts)
    out, merged = _stats_graph(job, wanted, _float_dtype(x.dtype))
    if not return_grad:
        return out
    gl, ge = _stats_grad_args(job, grad_logprob, grad_entropy)
    grad = job.pairs(lambda i, j: _delayed(shard.stats_grad, options=opts)(
        job.blocks[i][j], job.los[j], merged[i], job.targets.indices[i], grad_logprob=gl[i], grad_entropy=ge[i]))
    return out, _block_grid(grad, job.rows, job.classes, x.dtype)


def linear_token_stats(input: Any, linear_weight: Any, target: Any = None, *, linear_bias: Any = None,
                       temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                       top_k: int = 0, stats: Any = None, return_grad: bool = False, grad_logprob: Any = None,
                       grad_entropy: Any = None) -> Union[TokenStats, Tuple[TokenStats, LinearGrads]]:
    """:func:`fusedce.linear_token_stats` of hidden states ``(N, D)`` chunked
    by rows and a head ``(C, D)`` chunked by classes; with ``return_grad``
    also the :class:`LinearGrads` of
    ``Σ grad_logprob · logprob + grad_entropy · entropy``."""
    head = _dask_array("linear_weight", linear_weight, 2)
    opts, wanted = _stats_options(head.shape[0], stats, target is not None, temperature, softcap, ignore_index, top_k)
    job = _linear_job(input, head, linear_bias, target, None, opts)
    out, merged = _stats_graph(job, wanted, _float_dtype(job.dtype))
    if not return_grad:
        return out
    gl, ge = _stats_grad_args(job, grad_logprob, grad_entropy)
    grads = job.pairs(lambda i, j: _delayed(shard.linear_stats_grad, options=opts)(
        job.x[i], job.head[j], job.los[j], merged[i], job.targets.indices[i], grad_logprob=gl[i],
        grad_entropy=ge[i], **job.linear_kw(j)))
    return out, _linear_grads(job, grads, input, head, linear_bias)
