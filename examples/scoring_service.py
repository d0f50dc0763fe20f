"""A token-scoring service: a language-model head held in numpy, answering
``POST /score`` with per-token statistics computed by
``fusedce.linear_token_stats`` (the ``tokens x V`` logits never exist).

Request (JSON): the token ids and the final hidden states of one sequence,
the states either as nested lists or, cheaper to parse, as base64 of
little-endian float32::

    {"tokens": [17, 4, ...], "hidden": [[0.1, ...], ...], "top_k": 5}
    {"tokens": [17, 4, ...], "hidden_b64": "AAB...", "top_k": 5}

Response: per token ``logprob``, ``entropy``, ``rank`` (of the given token
among the vocabulary), ``topk_ids`` and ``topk_logprobs``, and the
sequence's ``perplexity``. ``GET /health`` answers ``{"status": "ok"}``.

The handler is a plain ``def``: FastAPI runs it on its thread pool, and
fusedce releases the GIL while it computes, so concurrent requests run on
different cores at once. Each request uses ``--threads-per-request`` worker
threads (``fusedce.threads``, a per-thread setting), 1 by default: with
many clients, requests are the parallelism.

    pip install 'fusedce[service]'
    python examples/scoring_service.py --port 8000 --vocab 32000 --hidden 1024

The head is random (``--seed``); a real service would load its model's.
"""

from __future__ import annotations

import argparse
import base64
import binascii
from typing import List, Optional

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

import fusedce


def make_head(vocab: int, hidden: int, seed: int = 0) -> np.ndarray:
    """A random ``(vocab, hidden)`` float32 head, scaled as a trained one."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((vocab, hidden), dtype=np.float32) / np.sqrt(hidden)).astype(np.float32)


class ScoreRequest(BaseModel):
    tokens: List[int] = Field(..., description="token ids, one per hidden state")
    hidden: Optional[List[List[float]]] = Field(None, description="(len(tokens), D) hidden states")
    hidden_b64: Optional[str] = Field(None, description="the same, as base64 of little-endian float32")
    top_k: int = Field(5, ge=0, le=100)


class ScoreResponse(BaseModel):
    logprob: List[float]
    entropy: List[float]
    rank: List[int]
    topk_ids: List[List[int]]
    topk_logprobs: List[List[float]]
    perplexity: float


def hidden_states(req: ScoreRequest, dim: int) -> np.ndarray:
    """The request's hidden states as a ``(tokens, dim)`` float32 array."""
    if (req.hidden is None) == (req.hidden_b64 is None):
        raise HTTPException(422, "give exactly one of hidden, hidden_b64")
    if req.hidden_b64 is not None:
        try:
            raw = base64.b64decode(req.hidden_b64, validate=True)
        except binascii.Error as e:
            raise HTTPException(422, f"hidden_b64: not base64 ({e})") from e
        if len(raw) != len(req.tokens) * dim * 4:
            raise HTTPException(422, f"hidden_b64: expected {len(req.tokens)} x {dim} float32 values, got {len(raw)} bytes")
        return np.frombuffer(raw, dtype="<f4").reshape(len(req.tokens), dim)
    h = np.asarray(req.hidden, dtype=np.float32)
    if h.shape != (len(req.tokens), dim):
        raise HTTPException(422, f"hidden: expected shape ({len(req.tokens)}, {dim}), got {h.shape}")
    return h


def score(head: np.ndarray, tokens: np.ndarray, hidden: np.ndarray, top_k: int) -> fusedce.TokenStats:
    """The statistics the service returns (also what a test compares with)."""
    return fusedce.linear_token_stats(hidden, head, tokens, top_k=top_k,
                                      stats=("logprob", "entropy", "rank"))


def create_app(head: np.ndarray, threads_per_request: int = 1) -> FastAPI:
    with fusedce.threads(threads_per_request):  # a bad count fails here, not per request
        pass
    app = FastAPI(title="fusedce scoring service")
    vocab, dim = head.shape

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "vocab": vocab, "hidden": dim}

    @app.post("/score", response_model=ScoreResponse)
    def score_tokens(req: ScoreRequest) -> ScoreResponse:
        tokens = np.asarray(req.tokens, dtype=np.int64)
        if tokens.size == 0:
            raise HTTPException(422, "tokens: expected at least one token")
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise HTTPException(422, f"tokens: expected ids in [0, {vocab})")
        h = hidden_states(req, dim)
        with fusedce.threads(threads_per_request):
            s = score(head, tokens, h, req.top_k)
        k = req.top_k
        return ScoreResponse(
            logprob=s.logprob.tolist(), entropy=s.entropy.tolist(), rank=s.rank.tolist(),
            topk_ids=s.topk_ids.tolist() if k else [[] for _ in tokens],
            topk_logprobs=s.topk_logprobs.tolist() if k else [[] for _ in tokens],
            perplexity=float(np.exp(-np.mean(s.logprob, dtype=np.float64))),
        )

    return app


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads-per-request", type=int, default=1)
    a = p.parse_args(argv)
    app = create_app(make_head(a.vocab, a.hidden, a.seed), a.threads_per_request)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
