"""Cross-entropy and token statistics over a vocabulary split into class
shards: the engine-agnostic partial/merge API that :mod:`fusedce.dask` runs
on Dask, and that runs as well over Ray, MPI or plain loops.

A **shard** is a contiguous range of classes ``[lo, hi)`` of ``C``: a slice
``logits[:, lo:hi]`` of an ``(N, C)`` logits array, or the rows
``W[lo:hi]`` (and ``b[lo:hi]``) of a linear head. For each shard and each
block of tokens:

1. :func:`partial` (logits) or :func:`linear_partial` (hidden states and a
   head shard) computes a :class:`Partial` per token: the shard's
   log-sum-exp as a running maximum ``m`` and sum ``s = Σ exp(z - m)``,
   ``t = Σ exp(z - m)(m - z)`` for the entropy, the target's logit when the
   target falls in the shard, the sums label smoothing and probability
   targets need, and the shard's top-k. The linear form works through tiles
   of rows (:data:`TILE_BYTES`): the shard's logits never exist in full.
2. :func:`merge` joins the partials of two adjacent shards (associative, up
   to float64 rounding); :func:`merge_all` joins any number in one fixed
   order (a balanced tree over the shards by position, :func:`fold_tree`), so
   the result does not depend on which shard finished first.
3. :func:`loss_terms` / :func:`reduce_loss` turn the partial merged over all
   ``C`` classes into the losses of each reduction, and :func:`finish_stats`
   into every statistic of :func:`fusedce.token_stats` (``rank`` needs
   :func:`rank_count` summed over the shards: a second pass, given the
   target's logit from the merged partial).
4. The backward of one shard, given the merged partial: :func:`loss_grad` /
   :func:`stats_grad` (the gradient of the shard's logits), and
   :func:`linear_loss_grad` / :func:`linear_stats_grad` (the shard's ``dW``
   and ``db``, and its part of ``dX``, which is summed over the shards).

The arithmetic (``z`` the scores: logits capped by ``softcap`` and divided by
``temperature``; ``p = exp(z - lse)``; ``w`` the class weights, ``eps`` the
smoothing, ``t'`` smoothed probabilities) is that of the one-machine calls::

    lse      = m + ln s                      entropy = ln s + t / s
    loss     = (1-eps) w_y (lse - z_y) + eps/C (Σ w) lse - eps/C Σ w z + z_loss lse²
             = (Σ w t') lse - Σ w t' z + z_loss lse²            (probabilities)

The partials are float64, so merging adds no error that float32 results
could see; the per-shard passes run on the Rust core (:func:`fusedce.token_stats`
for the log-sum-exp, entropy and top-k) and on numpy's BLAS (the head's
products). Results equal the one-machine call's to float32 rounding; argmax,
rank and top-k are compared on the logits themselves and are exact given the
same logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from . import functional
from ._arrays import FLOAT_DTYPES, as_array, is_floating, shape_str
from ._request import TokenStats, float_arg, int_arg, optional_float_arg, reduction_arg

#: Bytes of one tile of logits (float32) that the per-shard passes hold at a
#: time (a few such tiles while a gradient is computed).
TILE_BYTES = 32 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class ShardOptions:
    """What the shards compute, shared by every step of one job.

    Attributes:
        classes: ``C``, the classes of the whole vocabulary (every shard
            lies in ``[0, C)``; label smoothing spreads ``eps`` over ``C``).
        ignore_index: targets equal to it are ignored (no loss, no
            statistics that need a target, no gradient).
        label_smoothing: ``eps`` in ``[0, 1]`` (losses only).
        z_loss: the coefficient of ``lse²`` added to each token's loss.
        softcap: ``c > 0``: scores ``c tanh(x / c)``; None: the logits.
        temperature: ``T > 0``: scores divided by ``T`` (statistics only:
            the losses need ``T = 1``).
        top_k: how many of the largest classes each token keeps (``0``: none).
        argmax: whether the partials track the largest class.
    """

    classes: int
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    temperature: float = 1.0
    top_k: int = 0
    argmax: bool = False

    def __post_init__(self) -> None:
        c = int_arg("classes", self.classes)
        if c < 1:
            raise ValueError(f"classes: expected at least one class, got {c}")
        int_arg("ignore_index", self.ignore_index)
        eps = float_arg("label_smoothing", self.label_smoothing)
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {eps}")
        if not math.isfinite(float_arg("z_loss", self.z_loss)) or self.z_loss < 0:
            raise ValueError(f"z_loss: expected a finite value >= 0, got {self.z_loss}")
        cap = optional_float_arg("softcap", self.softcap)
        if cap is not None and not (cap > 0 and math.isfinite(cap)):
            raise ValueError(f"softcap: expected a finite value > 0 or None, got {cap}")
        temp = float_arg("temperature", self.temperature)
        if not (temp > 0 and math.isfinite(temp)):
            raise ValueError(f"temperature: expected a finite value > 0, got {temp}")
        k = int_arg("top_k", self.top_k)
        if not 0 <= k <= c:
            raise ValueError(f"top_k: expected a value in [0, classes = {c}], got {k}")
        if not isinstance(self.argmax, bool):
            raise TypeError(f"argmax: expected a bool, got {type(self.argmax).__name__}")

    @property
    def order_k(self) -> int:
        """How many of the largest classes the partials keep (the argmax is the first)."""
        return max(self.top_k, int(self.argmax))


class Partial(NamedTuple):
    """The per-token partial results of the classes ``[lo, hi)`` for a block
    of ``n`` tokens (arrays of length ``n``, float64 unless noted)."""

    lo: int
    hi: int
    #: the reference point of ``s`` and ``t`` (the shard's log-sum-exp; ``-inf`` when every score is)
    m: np.ndarray
    #: ``Σ exp(z - m)``
    s: np.ndarray
    #: ``Σ exp(z - m) (m - z)``: non-negative terms, for the entropy
    t: np.ndarray
    #: bool: the token's target is one of these classes (never for an ignored token)
    has_target: np.ndarray
    #: the target's logit and score (NaN where ``has_target`` is false) and its class weight (0 there)
    target_x: np.ndarray
    target_z: np.ndarray
    target_w: np.ndarray
    #: ``Σ w`` over the classes (a number)
    weight_total: float
    #: ``Σ w z`` (with label smoothing), else None
    smooth: Optional[np.ndarray]
    #: ``Σ w t`` and ``Σ w t z`` for probability targets, else None
    prob_mass: Optional[np.ndarray]
    prob_dot: Optional[np.ndarray]
    #: ``(n, k)``: the largest classes' logits, scores and indices (int64), best first; None without
    top_x: Optional[np.ndarray]
    top_z: Optional[np.ndarray]
    top_ids: Optional[np.ndarray]
    #: how many of the largest classes the job keeps (``ShardOptions.order_k``)
    order_k: int
    #: the dtype of the finished results (float64 for float64 inputs, else float32)
    dtype: np.dtype


class LossTerms(NamedTuple):
    """A block of tokens' losses, before the reduction."""

    #: ``(n,)`` float64, 0 for an ignored token
    per_token: np.ndarray
    #: what ``mean`` divides by: the targets' weights (class targets) or the token count (probabilities)
    denominator: float

    @property
    def total(self) -> float:
        return float(np.sum(self.per_token))


class ShardGrads(NamedTuple):
    """One shard's gradients for a block of rows of a linear head."""

    #: ``(n, D)``: this shard's part of ``dX`` (the sum over all shards is ``dX``)
    dx: np.ndarray
    #: ``(hi - lo, D)`` and ``(hi - lo,)`` (None without a bias): the shard's ``dW`` and ``db``
    dw: np.ndarray
    db: Optional[np.ndarray]


# ----------------------------------------------------------------------------------------------
# Checks


def _shard_range(lo: Any, width: int, opts: ShardOptions) -> Tuple[int, int]:
    if width < 1:
        raise ValueError("logits: a shard holds at least one class, got 0 columns")
    start = int_arg("lo", lo)
    if not (0 <= start and start + width <= opts.classes):
        raise ValueError(f"lo: the shard [{start}, {start + width}) is not within the {opts.classes} classes")
    return start, start + width


def _float_matrix(arg: str, a: Any) -> np.ndarray:
    x = as_array(arg, a)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{arg}: expected float32, float64, float16 or bfloat16, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{arg}: expected a 2-d array, got shape {shape_str(x.shape)}")
    return x


def _compute_dtype(*arrays: Optional[np.ndarray]) -> np.dtype:
    """float64 when every float input is float64, else float32."""
    present = [a for a in arrays if a is not None]
    return np.dtype(np.float64 if all(a.dtype == np.float64 for a in present) else np.float32)


def _targets(target: Any, n: int, opts: ShardOptions) -> Optional[np.ndarray]:
    """int64 class indices ``(n,)`` (each in ``[0, C)`` or ``ignore_index``), or None."""
    if target is None:
        return None
    t = as_array("target", target)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"target: expected integer class indices, got dtype {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"target: expected shape ({n},), got {shape_str(t.shape)}")
    t = t.astype(np.int64, copy=False)
    bad = (t != opts.ignore_index) & ((t < 0) | (t >= opts.classes))
    if bad.any():
        raise IndexError(f"target: Target {int(t[bad][0])} is out of bounds.")
    return t


def _class_weight(weight: Any, width: int) -> Optional[np.ndarray]:
    if weight is None:
        return None
    w = as_array("weight", weight)
    if not (is_floating(w) or np.issubdtype(w.dtype, np.integer)):
        raise TypeError(f"weight: expected a floating array, got dtype {w.dtype}")
    if w.shape != (width,):
        raise ValueError(f"weight: expected the shard's {width} class weights, got shape {shape_str(w.shape)}")
    return w.astype(np.float64)


def _probs(probs: Any, shape: Tuple[int, int]) -> Optional[np.ndarray]:
    if probs is None:
        return None
    p = as_array("probs", probs)
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"probs: expected a floating array of class probabilities, got dtype {p.dtype}")
    if p.shape != shape:
        raise ValueError(f"probs: expected the shard's probabilities of shape {shape_str(shape)}, got {shape_str(p.shape)}")
    return p


def _upstream(arg: str, g: Any, n: int) -> np.ndarray:
    """A per-token upstream gradient (a number or ``(n,)``) as float64 ``(n,)``."""
    a = as_array(arg, g)
    if not (np.issubdtype(a.dtype, np.number) or a.dtype in FLOAT_DTYPES) or np.iscomplexobj(a):
        raise TypeError(f"{arg}: expected a number or a real array, got dtype {a.dtype}")
    if a.ndim != 0 and a.shape != (n,):
        raise ValueError(f"{arg}: expected a number or shape ({n},), got {shape_str(a.shape)}")
    return np.broadcast_to(a.astype(np.float64), (n,))


def _no_temperature(opts: ShardOptions) -> None:
    if opts.temperature != 1.0:
        raise ValueError(f"temperature: the losses have no temperature; expected 1.0, got {opts.temperature}")


def _covers_all(p: Partial, opts: ShardOptions) -> None:
    if (p.lo, p.hi) != (0, opts.classes):
        raise ValueError(f"partial: covers the classes [{p.lo}, {p.hi}), not all {opts.classes}; merge every shard first")


# ----------------------------------------------------------------------------------------------
# Tiles of rows: the one loop every shard pass runs


def tile_rows(width: int) -> int:
    """Rows per tile for a shard of ``width`` classes (:data:`TILE_BYTES` of float32)."""
    return max(1, TILE_BYTES // (4 * max(width, 1)))


def _tiles(n: int, width: int) -> List[slice]:
    step = tile_rows(width)
    return [slice(r, min(r + step, n)) for r in range(0, n, step)] or [slice(0, 0)]


def _scores(x: np.ndarray, opts: ShardOptions) -> np.ndarray:
    """The scores ``z`` of logits ``x`` (the same dtype; float64 in, float64 out)."""
    z = x
    if opts.softcap is not None:
        z = opts.softcap * np.tanh(z / opts.softcap)
    if opts.temperature != 1.0:
        z = z / opts.temperature
    return z


# ----------------------------------------------------------------------------------------------
# Partials


def partial(logits: Any, lo: int, target: Any = None, *, options: ShardOptions, weight: Any = None,
            probs: Any = None) -> Partial:
    """The partial results of the classes ``[lo, lo + w)`` for ``n`` tokens.

    Args:
        logits: ``(n, w)`` float32, float64, float16 or bfloat16: the shard's
            logits (columns ``lo`` to ``lo + w`` of the full logits).
        lo: the shard's first class.
        target: ``(n,)`` int class indices into all ``C`` classes (or
            ``ignore_index``), or None (statistics without a target).
        options: the job's :class:`ShardOptions`.
        weight: the shard's ``w`` class weights, or None.
        probs: ``(n, w)`` the shard's columns of probability targets
            (then ``target`` must be None).
    """
    x = _float_matrix("logits", logits)
    n, width = x.shape
    lo, hi = _shard_range(lo, width, options)
    t, w, pr = _inputs(target, weight, probs, n, width, options)
    dtype = _compute_dtype(x)
    parts = [_tile_partial(np.asarray(x[r], dtype), lo, _rows(t, r), _rows(pr, r), w, options) for r in _tiles(n, width)]
    return _join_rows(parts, dtype)


def linear_partial(input: Any, linear_weight: Any, lo: int, target: Any = None, *, options: ShardOptions,
                   linear_bias: Any = None, weight: Any = None, probs: Any = None) -> Partial:
    """:func:`partial` of the logits ``input @ linear_weight.T + linear_bias``
    of a head shard, computed tile by tile of rows (never all ``n × w``).

    Args:
        input: ``(n, D)`` hidden states.
        linear_weight: ``(w, D)``: rows ``lo`` to ``lo + w`` of the head.
        linear_bias: ``(w,)`` the shard's bias, or None.
        The other arguments are those of :func:`partial`.
    """
    x, hw, hb = _linear_inputs(input, linear_weight, linear_bias)
    n, width = x.shape[0], hw.shape[0]
    lo, hi = _shard_range(lo, width, options)
    t, w, pr = _inputs(target, weight, probs, n, width, options)
    parts = [_tile_partial(_linear_tile(x[r], hw, hb), lo, _rows(t, r), _rows(pr, r), w, options)
             for r in _tiles(n, width)]
    return _join_rows(parts, hw.dtype)


def _inputs(target: Any, weight: Any, probs: Any, n: int, width: int,
            opts: ShardOptions) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    if probs is not None and target is not None:
        raise ValueError("probs: give class indices (target) or probabilities (probs), not both")
    return _targets(target, n, opts), _class_weight(weight, width), _probs(probs, (n, width))


def _linear_inputs(input: Any, linear_weight: Any, linear_bias: Any) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The hidden states, head shard and bias in the compute type (one copy
    of the shard when it is stored in a narrower type)."""
    x = _float_matrix("input", input)
    hw = _float_matrix("linear_weight", linear_weight)
    if hw.shape[1] != x.shape[1]:
        raise ValueError(f"linear_weight: expected (w, D) with D = {x.shape[1]} (input's features), got {shape_str(hw.shape)}")
    b = None
    if linear_bias is not None:
        b = as_array("linear_bias", linear_bias)
        if b.shape != (hw.shape[0],):
            raise ValueError(f"linear_bias: expected shape ({hw.shape[0]},), got {shape_str(b.shape)}")
    dtype = _compute_dtype(x, hw, b)
    return x, np.asarray(hw, dtype), None if b is None else np.asarray(b, dtype)


def _linear_tile(x: np.ndarray, hw: np.ndarray, hb: Optional[np.ndarray]) -> np.ndarray:
    """One tile of logits ``x @ hw.T (+ hb)`` in the head's compute type."""
    z = np.asarray(x, hw.dtype) @ hw.T
    if hb is not None:
        z += hb
    return z


def _rows(a: Optional[np.ndarray], r: slice) -> Optional[np.ndarray]:
    return None if a is None else a[r]


def _tile_partial(x: np.ndarray, lo: int, t: Optional[np.ndarray], probs: Optional[np.ndarray],
                  w: Optional[np.ndarray], opts: ShardOptions) -> Partial:
    """The partial of one tile of logits ``x`` (float32 or float64)."""
    width = x.shape[1]
    k = min(opts.order_k, width)
    r = functional.token_stats(x, None, softcap=opts.softcap, temperature=opts.temperature, top_k=k,
                               stats=("lse", "entropy", "topk_ids") if k else ("lse", "entropy"))
    m, s, tt = _logsumexp_parts(r)
    has, tx, tw = _target_parts(x, lo, t, w, opts)
    smooth, mass, dot = _target_sums(x, probs, w, opts)
    top_x, top_ids = _top(x, lo, r.topk_ids, opts)
    return Partial(lo, lo + width, m, s, tt, has, tx, _scores(tx, opts), tw,
                   float(width if w is None else w.sum()), smooth, mass, dot,
                   top_x, None if top_x is None else _scores(top_x, opts), top_ids, opts.order_k, x.dtype)


def _logsumexp_parts(r: TokenStats) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(m, s, t)`` of a tile from the core's fused pass: ``m`` the shard's
    log-sum-exp, so ``s = 1`` and ``t`` is the shard's entropy (``s = t = 0``
    where every score is ``-inf``)."""
    assert r.lse is not None and r.entropy is not None
    m = r.lse.astype(np.float64)
    empty = m == -np.inf
    return m, np.where(empty, 0.0, 1.0), np.where(empty, 0.0, r.entropy.astype(np.float64))


def _target_parts(x: np.ndarray, lo: int, t: Optional[np.ndarray], w: Optional[np.ndarray],
                  opts: ShardOptions) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whether each token's target is in the shard, its logit and its weight."""
    n, width = x.shape
    if t is None:
        return np.zeros(n, bool), np.full(n, np.nan), np.zeros(n)
    local = t - lo
    has = (t != opts.ignore_index) & (local >= 0) & (local < width)
    idx = np.where(has, local, 0)
    tx = np.where(has, x[np.arange(n), idx].astype(np.float64), np.nan)
    tw = np.where(has, 1.0 if w is None else w[idx], 0.0)
    return has, tx, tw


def _target_sums(x: np.ndarray, probs: Optional[np.ndarray], w: Optional[np.ndarray],
                 opts: ShardOptions) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """``Σ w z`` (label smoothing), ``Σ w t`` and ``Σ w t z`` (probabilities)."""
    need_smooth = opts.label_smoothing > 0
    if not need_smooth and probs is None:
        return None, None, None
    z = _scores(x, opts)
    wz = None if w is None else w.astype(x.dtype)
    smooth = (z.sum(axis=1) if wz is None else z @ wz).astype(np.float64) if need_smooth else None
    if probs is None:
        return smooth, None, None
    tw = np.asarray(probs, x.dtype) if wz is None else np.asarray(probs, x.dtype) * wz
    return smooth, tw.sum(axis=1, dtype=np.float64), np.einsum("ij,ij->i", tw, z).astype(np.float64)


def _top(x: np.ndarray, lo: int, ids: Optional[np.ndarray],
         opts: ShardOptions) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """The logits and class indices of the tile's largest classes (the
    core's top-k, on the logits: NaN largest, ties to the lower index)."""
    if opts.order_k == 0 or ids is None:
        return None, None
    return np.take_along_axis(x, ids, axis=1).astype(np.float64), ids + lo


def _join_rows(parts: Sequence[Partial], dtype: np.dtype) -> Partial:
    """The partials of consecutive row tiles of one shard as one."""
    first = parts[0]
    if len(parts) == 1:
        return first._replace(dtype=np.dtype(dtype))

    def cat(field: str) -> Any:
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    fixed = ("lo", "hi", "weight_total", "order_k", "dtype")
    fields = {f: cat(f) for f in Partial._fields if f not in fixed}
    return Partial(lo=first.lo, hi=first.hi, weight_total=first.weight_total, order_k=first.order_k,
                   dtype=np.dtype(dtype), **fields)


# ----------------------------------------------------------------------------------------------
# Merging


def merge(a: Partial, b: Partial) -> Partial:
    """The partial of classes ``[a.lo, b.hi)`` from those of ``[a.lo, a.hi)``
    and ``[b.lo, b.hi)`` (``a.hi == b.lo``, the same tokens and options).

    Associative up to float64 rounding; the top-k and argmax are exact."""
    _check_adjacent(a, b)
    mx = np.maximum(a.m, b.m)
    ka, kb = _rescale(a.m, mx), _rescale(b.m, mx)
    return Partial(
        lo=a.lo, hi=b.hi, m=mx,
        s=ka * a.s + kb * b.s,
        t=_shifted_t(a, ka, mx) + _shifted_t(b, kb, mx),
        has_target=a.has_target | b.has_target,
        target_x=np.where(b.has_target, b.target_x, a.target_x),
        target_z=np.where(b.has_target, b.target_z, a.target_z),
        target_w=np.where(b.has_target, b.target_w, a.target_w),
        weight_total=a.weight_total + b.weight_total,
        smooth=_add(a.smooth, b.smooth),
        prob_mass=_add(a.prob_mass, b.prob_mass),
        prob_dot=_add(a.prob_dot, b.prob_dot),
        **_merge_top(a, b),
        order_k=a.order_k,
        dtype=np.promote_types(a.dtype, b.dtype),
    )


def _check_adjacent(a: Partial, b: Partial) -> None:
    if a.hi != b.lo:
        raise ValueError(f"b: merge joins adjacent shards, got [{a.lo}, {a.hi}) and [{b.lo}, {b.hi})")
    if a.m.shape != b.m.shape:
        raise ValueError(f"b: the partials are of {a.m.shape[0]} and {b.m.shape[0]} tokens")
    if (a.smooth is None) != (b.smooth is None) or (a.prob_mass is None) != (b.prob_mass is None) \
            or a.order_k != b.order_k:
        raise ValueError("b: the partials were computed with different options")


def _rescale(m: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """``exp(m - mx)``, 0 where ``m = -inf`` (also when ``mx`` is)."""
    with np.errstate(invalid="ignore"):
        return np.where(m == -np.inf, 0.0, np.exp(m - mx))


def _shifted_t(p: Partial, k: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """``t`` of ``p`` moved to the reference point ``mx``: ``k (t + s (mx - m))``."""
    with np.errstate(invalid="ignore"):
        return np.where(k == 0.0, 0.0, k * (p.t + p.s * (mx - p.m)))


def _add(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if a is None or b is None else a + b


def _merge_top(a: Partial, b: Partial) -> dict:
    """The best ``k`` of both shards' candidates: NaN first, then the larger
    logit, ties to the lower class index (the core's order)."""
    if a.top_x is None or b.top_x is None or a.top_ids is None or b.top_ids is None:
        return {"top_x": None, "top_z": None, "top_ids": None}
    k = min(a.order_k, a.top_x.shape[1] + b.top_x.shape[1])
    x = np.concatenate([a.top_x, b.top_x], axis=1)
    ids = np.concatenate([a.top_ids, b.top_ids], axis=1)
    nan = np.isnan(x)
    order = np.lexsort((ids, np.where(nan, 0.0, -x), ~nan), axis=-1)[:, :k]
    z = np.concatenate([a.top_z, b.top_z], axis=1)  # type: ignore[list-item]
    return {"top_x": np.take_along_axis(x, order, 1), "top_z": np.take_along_axis(z, order, 1),
            "top_ids": np.take_along_axis(ids, order, 1)}


def fold_tree(items: Sequence[T], combine: Callable[[T, T], T]) -> T:
    """``items`` combined in a balanced binary tree by position (neighbours
    pairwise, level by level; an odd last item waits for the next level):
    the one order that :func:`merge_all` and the Dask graphs use."""
    if not items:
        raise ValueError("items: nothing to combine")
    level = list(items)
    while len(level) > 1:
        nxt = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merge_all(parts: Sequence[Partial]) -> Partial:
    """The partials of adjacent shards (in any order) merged in one fixed
    order: sorted by ``lo``, then :func:`fold_tree`. The result's bits do not
    depend on the order the partials are given in."""
    ordered = sorted(parts, key=lambda p: p.lo)
    return fold_tree(ordered, merge)


# ----------------------------------------------------------------------------------------------
# Finishing


def _lse(p: Partial) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return p.m + np.log(p.s)


def loss_terms(p: Partial, *, options: ShardOptions) -> LossTerms:
    """Each token's loss from a partial merged over all classes (float64),
    with the mean's denominator. ``temperature`` must be 1."""
    _covers_all(p, options)
    _no_temperature(options)
    lse, eps, c = _lse(p), options.label_smoothing, options.classes
    if p.prob_mass is not None:
        mass = (1 - eps) * p.prob_mass + eps / c * p.weight_total
        # Σ w t' z with t' = (1-eps) t + eps/C, each term only when its
        # coefficient is not 0 (a masked class's z = -inf times 0 is no term).
        dot = (1 - eps) * p.prob_dot if eps < 1 else 0.0  # type: ignore[operator]
        dot = dot + (eps / c * p.smooth if eps > 0 else 0.0)  # type: ignore[operator]
        loss = mass * lse - dot + options.z_loss * lse * lse
        return LossTerms(loss, float(p.m.shape[0]))
    with np.errstate(invalid="ignore"):
        loss = (1 - eps) * p.target_w * (lse - p.target_z)
        if eps > 0:
            loss = loss + eps / c * (p.weight_total * lse - p.smooth)  # type: ignore[operator]
        loss = loss + options.z_loss * lse * lse
    return LossTerms(np.where(p.has_target, loss, 0.0), float(np.sum(p.target_w)))


def reduce_loss(terms: Sequence[LossTerms], reduction: str = "mean") -> Union[float, np.ndarray]:
    """The loss of every block of tokens (in order): the per-token losses
    (``none``), their sum, or their sum over the summed denominators (``mean``)."""
    r = reduction_arg(reduction)
    if r == "none":
        return np.concatenate([t.per_token for t in terms])
    total = math.fsum(t.total for t in terms)
    if r == "sum":
        return total
    if r == "mean":
        den = math.fsum(t.denominator for t in terms)
        return total / den if den != 0 else math.nan
    raise ValueError(f"reduction: expected 'none', 'mean' or 'sum', got {reduction!r}")


def finish_stats(p: Partial, *, options: ShardOptions, rank: Optional[np.ndarray] = None) -> TokenStats:
    """The statistics of :func:`fusedce.token_stats` from a partial merged
    over all classes: ``lse``, ``entropy``, ``logprob`` (0 where the
    token has no target, as for an ignored one), ``argmax`` (with ``options.argmax``), ``topk_ids``
    and ``topk_logprobs`` (with ``options.top_k``), and ``rank`` when the
    summed :func:`rank_count` is given. float32 (float64 for float64 inputs)."""
    _covers_all(p, options)
    lse = _lse(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.log(p.s) + p.t / p.s
        logprob = np.where(p.has_target, p.target_z - lse, 0.0)
    out = p.dtype
    top = p.top_ids is not None and options.top_k > 0
    return TokenStats(
        lse=lse.astype(out),
        logprob=logprob.astype(out),
        entropy=entropy.astype(out),
        argmax=p.top_ids[:, 0].copy() if options.argmax and p.top_ids is not None else None,
        rank=None if rank is None else np.where(p.has_target, rank, -1).astype(np.int64),
        topk_ids=p.top_ids[:, : options.top_k].copy() if top else None,  # type: ignore[index]
        topk_logprobs=(p.top_z[:, : options.top_k] - lse[:, None]).astype(out) if top else None,  # type: ignore[index]
    )


def rank_count(logits: Any, merged: Partial) -> np.ndarray:
    """``(n,)`` int64: how many of the shard's classes have a logit above
    the token's target logit (``merged.target_x``, from the merged partial);
    summed over the shards, the target's rank. 0 for tokens without a target."""
    x = _float_matrix("logits", logits)
    _check_merged(merged, x.shape[0])
    return _sum_tiles(x.shape[0], x.shape[1], lambda r: _rank_tile(np.asarray(x[r]), merged.target_x[r]))


def linear_rank_count(input: Any, linear_weight: Any, merged: Partial, *, linear_bias: Any = None) -> np.ndarray:
    """:func:`rank_count` of a head shard's logits, tile by tile."""
    x, hw, hb = _linear_inputs(input, linear_weight, linear_bias)
    _check_merged(merged, x.shape[0])
    return _sum_tiles(x.shape[0], hw.shape[0], lambda r: _rank_tile(_linear_tile(x[r], hw, hb), merged.target_x[r]))


def _sum_tiles(n: int, width: int, f: Callable[[slice], np.ndarray]) -> np.ndarray:
    return np.concatenate([f(r) for r in _tiles(n, width)])


def _rank_tile(x: np.ndarray, target_x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.asarray(np.sum(x > target_x[:, None], axis=1, dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# Backward


def loss_grad(logits: Any, lo: int, merged: Partial, target: Any = None, *, options: ShardOptions,
              scale: Any = 1.0, weight: Any = None, probs: Any = None) -> np.ndarray:
    """The gradient of the loss with respect to the shard's logits ``(n, w)``
    (the logits' dtype), given the partial merged over all classes.

    ``scale`` is each token's upstream gradient (a number or ``(n,)``): the
    upstream gradient of ``none`` per token, of ``sum`` as it is, and of
    ``mean`` divided by the summed denominators (:func:`loss_terms`)."""
    x = _float_matrix("logits", logits)
    n, width = x.shape
    lo, _ = _shard_range(lo, width, options)
    t, w, pr = _inputs(target, weight, probs, n, width, options)
    g = _loss_scale(merged, scale, n, options)
    return _logits_backward(x, lambda r, z: _loss_tile_grad(z, lo, _rows_of(merged, r), _rows(t, r), _rows(pr, r), w, g[r], options))


def stats_grad(logits: Any, lo: int, merged: Partial, target: Any = None, *, options: ShardOptions,
               grad_logprob: Any = 0.0, grad_entropy: Any = 0.0) -> np.ndarray:
    """The gradient of ``Σ grad_logprob · logprob + grad_entropy · entropy``
    with respect to the shard's logits ``(n, w)``, given the merged partial."""
    x = _float_matrix("logits", logits)
    n, width = x.shape
    lo, _ = _shard_range(lo, width, options)
    t = _targets(target, n, options)
    gl, ge = _stats_upstream(merged, grad_logprob, grad_entropy, n, options)
    return _logits_backward(x, lambda r, z: _stats_tile_grad(z, lo, _rows_of(merged, r), _rows(t, r), gl[r], ge[r], options))


def linear_loss_grad(input: Any, linear_weight: Any, lo: int, merged: Partial, target: Any = None, *,
                     options: ShardOptions, scale: Any = 1.0, linear_bias: Any = None, weight: Any = None,
                     probs: Any = None) -> ShardGrads:
    """:func:`loss_grad` for a head shard, carried through the product: the
    shard's ``dW``, ``db`` and its part of ``dX``, tile by tile."""
    x, hw, hb = _linear_inputs(input, linear_weight, linear_bias)
    n, width = x.shape[0], hw.shape[0]
    lo, _ = _shard_range(lo, width, options)
    t, w, pr = _inputs(target, weight, probs, n, width, options)
    g = _loss_scale(merged, scale, n, options)
    return _linear_backward(x, hw, hb, lambda r, z: _loss_tile_grad(z, lo, _rows_of(merged, r), _rows(t, r), _rows(pr, r), w, g[r], options))


def linear_stats_grad(input: Any, linear_weight: Any, lo: int, merged: Partial, target: Any = None, *,
                      options: ShardOptions, grad_logprob: Any = 0.0, grad_entropy: Any = 0.0,
                      linear_bias: Any = None) -> ShardGrads:
    """:func:`stats_grad` for a head shard: its ``dW``, ``db`` and part of ``dX``."""
    x, hw, hb = _linear_inputs(input, linear_weight, linear_bias)
    n, width = x.shape[0], hw.shape[0]
    lo, _ = _shard_range(lo, width, options)
    t = _targets(target, n, options)
    gl, ge = _stats_upstream(merged, grad_logprob, grad_entropy, n, options)
    return _linear_backward(x, hw, hb, lambda r, z: _stats_tile_grad(z, lo, _rows_of(merged, r), _rows(t, r), gl[r], ge[r], options))


def _logits_backward(x: np.ndarray, tile_grad: Callable[[slice, np.ndarray], np.ndarray]) -> np.ndarray:
    """The gradient of a shard's logits ``x``, tile by tile, in ``x``'s dtype."""
    dtype = _compute_dtype(x)
    out = np.empty(x.shape, x.dtype)
    for r in _tiles(*x.shape):
        out[r] = tile_grad(r, np.asarray(x[r], dtype))
    return out


def _linear_backward(x: np.ndarray, hw: np.ndarray, hb: Optional[np.ndarray],
                     tile_grad: Callable[[slice, np.ndarray], np.ndarray]) -> ShardGrads:
    """``dX`` part, ``dW`` and ``db`` of a head shard: each tile's logits
    computed again, their gradient, and its products."""
    n, width = x.shape[0], hw.shape[0]
    dx = np.empty((n, hw.shape[1]), x.dtype)
    dw = np.zeros(hw.shape, hw.dtype)
    db = None if hb is None else np.zeros(width, hw.dtype)
    for r in _tiles(n, width):
        xr = np.asarray(x[r], hw.dtype)
        g = tile_grad(r, _linear_tile(xr, hw, hb))
        dx[r] = g @ hw
        dw += g.T @ xr
        if db is not None:
            db += g.sum(axis=0)
    return ShardGrads(dx, dw, db)


def _rows_of(p: Partial, r: slice) -> Partial:
    """The partial's tokens ``r`` (the fields a gradient reads)."""
    return p._replace(m=p.m[r], s=p.s[r], t=p.t[r], has_target=p.has_target[r], target_z=p.target_z[r],
                      target_w=p.target_w[r], prob_mass=_rows(p.prob_mass, r))


def _check_merged(merged: Any, n: int) -> None:
    if not isinstance(merged, Partial):
        raise TypeError(f"merged: expected a fusedce.shard.Partial, got {type(merged).__name__}")
    if merged.m.shape != (n,):
        raise ValueError(f"merged: a partial of {merged.m.shape[0]} tokens, for {n} rows")


def _loss_scale(merged: Partial, scale: Any, n: int, opts: ShardOptions) -> np.ndarray:
    _check_merged(merged, n)
    _covers_all(merged, opts)
    _no_temperature(opts)
    return _upstream("scale", scale, n)


def _stats_upstream(merged: Partial, gl: Any, ge: Any, n: int, opts: ShardOptions) -> Tuple[np.ndarray, np.ndarray]:
    _check_merged(merged, n)
    _covers_all(merged, opts)
    return np.where(merged.has_target, _upstream("grad_logprob", gl, n), 0.0), _upstream("grad_entropy", ge, n)


def _softmax(z: np.ndarray, p: Partial) -> np.ndarray:
    """``exp(z - lse)`` in ``z``'s dtype."""
    return np.exp(z - _lse(p).astype(z.dtype)[:, None])


def _loss_tile_grad(x: np.ndarray, lo: int, p: Partial, t: Optional[np.ndarray], probs: Optional[np.ndarray],
                    w: Optional[np.ndarray], g: np.ndarray, opts: ShardOptions) -> np.ndarray:
    """``d loss / d x`` of one tile: ``g (a p - tw)`` (see the kernels' formulas), through the softcap."""
    z = _scores(x, opts)
    eps, c, lse = opts.label_smoothing, opts.classes, _lse(p)
    wv = np.ones(x.shape[1], x.dtype) if w is None else w.astype(x.dtype)
    if probs is not None:
        gs, mass = g, (1 - eps) * p.prob_mass + eps / c * p.weight_total  # type: ignore[operator]
    else:
        gs, mass = np.where(p.has_target, g, 0.0), (1 - eps) * p.target_w + eps / c * p.weight_total
    a = (gs * (mass + 2 * opts.z_loss * lse)).astype(x.dtype)
    grad = a[:, None] * _softmax(z, p)
    if probs is not None:
        grad -= gs.astype(x.dtype)[:, None] * wv * (np.asarray(probs, x.dtype) * x.dtype.type(1 - eps) + x.dtype.type(eps / c))
    elif eps > 0:
        grad -= (gs * eps / c).astype(x.dtype)[:, None] * wv
    if t is not None:
        _subtract_target(grad, lo, t, p, gs * (1 - eps) * p.target_w)
    return _through_scores(grad, z, opts)


def _through_scores(grad: np.ndarray, z: np.ndarray, opts: ShardOptions) -> np.ndarray:
    """A gradient with respect to the scores ``z``, carried back to the
    logits: times ``sech²(x / c) = 1 - (z T / c)²`` with a softcap (the
    ``tanh`` read back from the scores, not computed again), divided by ``T``."""
    if opts.softcap is not None:
        th = z * z.dtype.type(opts.temperature / opts.softcap)
        grad *= 1 - th * th
    if opts.temperature != 1.0:
        grad /= z.dtype.type(opts.temperature)
    return grad


def _subtract_target(grad: np.ndarray, lo: int, t: np.ndarray, p: Partial, amount: np.ndarray) -> None:
    rows = np.flatnonzero(p.has_target & (t >= lo) & (t < lo + grad.shape[1]))
    grad[rows, t[rows] - lo] -= amount[rows].astype(grad.dtype)


def _stats_tile_grad(x: np.ndarray, lo: int, p: Partial, t: Optional[np.ndarray], gl: np.ndarray, ge: np.ndarray,
                     opts: ShardOptions) -> np.ndarray:
    """``G = p (ge (μ - z) - gl) + gl [c = y]`` of one tile, ``μ = Σ p z``,
    through the softcap and temperature (a class with ``z = -inf`` gives 0)."""
    z = _scores(x, opts)
    lse = _lse(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = p.m - p.t / p.s
    floor = (lse - 1e4).astype(x.dtype)[:, None]
    inner = ge.astype(x.dtype)[:, None] * (mu.astype(x.dtype)[:, None] - np.maximum(z, floor)) - gl.astype(x.dtype)[:, None]
    grad = _softmax(z, p) * inner
    if t is not None:
        _subtract_target(grad, lo, t, p, -gl)
    return _through_scores(grad, z, opts)
