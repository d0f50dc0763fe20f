"""The CPU backend: the Rust core (``fusedce._native``) runs a request."""

from __future__ import annotations

import numpy as np

from . import _native
from ._request import (
    CrossEntropyRequest,
    LinearCrossEntropyRequest,
    LinearTokenStatsRequest,
    TokenStatsRequest,
)


def cross_entropy(req: CrossEntropyRequest) -> np.ndarray:
    """The loss of ``req`` (its gradient, if asked for, is written to ``req.grad``)."""
    value = _native.cross_entropy(req)
    return req.loss if req.loss is not None else np.asarray(value, dtype=req.input.dtype)


def linear_cross_entropy(req: LinearCrossEntropyRequest) -> np.ndarray:
    """The loss of ``req`` (its gradients, if asked for, go to ``req.grads``)."""
    value = _native.linear_cross_entropy(req)
    return req.loss if req.loss is not None else np.asarray(value, dtype=req.input.dtype)


def token_stats(req: TokenStatsRequest) -> None:
    """Writes the statistics of ``req`` to ``req.out`` (its gradient to ``req.grad``)."""
    _native.token_stats(req)


def linear_token_stats(req: LinearTokenStatsRequest) -> None:
    """Writes the statistics of ``req`` to ``req.out`` (its gradients to ``req.grads``)."""
    _native.linear_token_stats(req)
