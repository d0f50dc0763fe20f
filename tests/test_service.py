"""examples/scoring_service.py under uvicorn on 127.0.0.1: a bounded burst of
concurrent requests, every answer bitwise equal to a direct call."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from optional import need

need("fastapi")
need("uvicorn")
httpx = need("httpx")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "scoring_service.py")
VOCAB, DIM, SEED = 3001, 48, 5


def _example():
    spec = importlib.util.spec_from_file_location("scoring_service", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, EXAMPLE, "--port", str(port), "--vocab", str(VOCAB), "--hidden", str(DIM),
         "--seed", str(SEED), "--threads-per-request", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the service did not start: {proc.stdout.read().decode(errors='replace')}")
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


def _requests(n: int, rng: np.random.Generator):
    out = []
    for i in range(n):
        length = int(rng.integers(1, 120))
        tokens = rng.integers(0, VOCAB, size=length)
        hidden = rng.standard_normal((length, DIM)).astype(np.float32)
        body = {"tokens": tokens.tolist(), "top_k": int(rng.choice([0, 1, 5]))}
        if i % 2:
            body["hidden_b64"] = base64.b64encode(hidden.astype("<f4").tobytes()).decode()
        else:
            body["hidden"] = hidden.tolist()
        out.append((body, tokens, hidden))
    return out


async def _burst(url: str, bodies, concurrency: int):
    limits = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(body):
            async with limits:
                return await client.post("/score", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_a_concurrent_burst_is_answered_bitwise_as_a_direct_call(server):
    mod = _example()
    head = mod.make_head(VOCAB, DIM, SEED)
    cases = _requests(40, np.random.default_rng(0))
    responses = asyncio.run(_burst(server, [c[0] for c in cases], concurrency=8))
    for (body, tokens, hidden), r in zip(cases, responses):
        assert r.status_code == 200, r.text
        got = r.json()
        want = mod.score(head, tokens, hidden, body["top_k"])
        np.testing.assert_array_equal(np.float32(got["logprob"]).view(np.uint32), want.logprob.view(np.uint32))
        np.testing.assert_array_equal(np.float32(got["entropy"]).view(np.uint32), want.entropy.view(np.uint32))
        np.testing.assert_array_equal(got["rank"], want.rank)
        if body["top_k"]:
            np.testing.assert_array_equal(got["topk_ids"], want.topk_ids)
            np.testing.assert_array_equal(np.float32(got["topk_logprobs"]), want.topk_logprobs)
        ppl = float(np.exp(-np.mean(want.logprob, dtype=np.float64)))
        assert got["perplexity"] == ppl


def test_malformed_requests_get_422(server):
    bad = [
        {"tokens": [1, 2], "hidden": [[0.0] * DIM]},  # one state for two tokens
        {"tokens": [VOCAB], "hidden": [[0.0] * DIM]},  # id out of range
        {"tokens": [1], "hidden_b64": "AAAA"},  # too few values
        {"tokens": [1], "hidden_b64": "not base64!"},
        {"tokens": [1]},  # no states
        {"tokens": [], "hidden": []},
        {"tokens": [1], "hidden": [[0.0] * DIM], "top_k": -1},
    ]
    for body in bad:
        r = httpx.post(server + "/score", json=body, timeout=30)
        assert r.status_code == 422, (body, r.text)
    assert httpx.get(server + "/health", timeout=5).json()["status"] == "ok"
