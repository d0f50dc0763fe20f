"""Every cross_entropy case of the shared corpus, on the CPU path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fusedce
from conformance import ERRORS, assert_close, cases, ce_args, lce_args, load

CE = cases("cross_entropy")


def test_corpus_is_complete():
    assert len(CE) == 140
    assert len(cases("linear_cross_entropy")) == 43


@pytest.mark.parametrize("case", CE, ids=[c["id"] for c in CE])
def test_cross_entropy_case(case):
    x, t, w, kw = ce_args(case)
    dtype = case["input"]["dtype"]
    if "error" in case:
        with pytest.raises(ERRORS[case["error"]]) as info:
            fusedce.cross_entropy(x, t, w, **kw)
        assert str(info.value)
        return
    go = load(case["grad_output"]) if "grad_output" in case else None
    x_before = x.copy()
    if "grad_input" in case:
        loss, grad = fusedce.cross_entropy(x, t, w, **kw, return_grad=True, grad_output=go)
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert_close("grad_input", grad, load(case["grad_input"]), dtype)
        # the same loss from a forward-only call
        assert_close("loss (forward only)", fusedce.cross_entropy(x, t, w, **kw), load(case["loss"]), dtype)
        # and the same gradient written in place over a copy of the logits
        xi = x.copy()
        _, gi = fusedce.cross_entropy(xi, t, w, **kw, return_grad=True, grad_output=go, grad_out=xi)
        assert gi is xi
        np.testing.assert_array_equal(gi.view(np.uint8), grad.view(np.uint8))
    else:
        loss = fusedce.cross_entropy(x, t, w, **kw)
    assert loss.dtype == x.dtype
    assert_close("loss", loss, load(case["loss"]), dtype)
    np.testing.assert_array_equal(x.view(np.uint8), x_before.view(np.uint8))


# Narrower levels than this CPU's, each with the corpus cases it changes: the
# portable kernels (used on CPUs without AVX2) all of them; plain AVX-512 on
# a CPU with AVX512_BF16, the linear ones (its bfloat16 logits are float32
# FMAs instead of dot products).
NARROWER = {
    "scalar": "test_cross_entropy_case or test_linear_cross_entropy_case or test_simd_level_is_capped",
    "avx512": "test_linear_cross_entropy_case or test_simd_level_is_capped",
}


@pytest.mark.parametrize("cap", sorted(NARROWER))
def test_corpus_on_narrower_kernels(cap):
    if os.environ.get("FUSEDCE_SIMD"):
        pytest.skip("already a capped run")
    if cap == "avx512" and fusedce.simd_level() != "avx512+bf16":
        pytest.skip("the avx512 kernels are this run's own")
    env = dict(os.environ, FUSEDCE_SIMD=cap)
    here = os.path.dirname(__file__)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(here, "test_conformance.py"),
         "-k", NARROWER[cap]],
        env=env, capture_output=True, text=True, cwd=here,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_simd_level_is_capped():
    cap = os.environ.get("FUSEDCE_SIMD")
    if cap in ("scalar", "avx512"):
        assert fusedce.simd_level() in ("scalar", "avx2+fma", "avx512")
        if cap == "scalar":
            assert fusedce.simd_level() == "scalar"
    else:
        assert fusedce.simd_level() in ("scalar", "avx2+fma", "avx512", "avx512+bf16")


LCE = cases("linear_cross_entropy")


@pytest.mark.parametrize("chunk", [None, 1, 3])
@pytest.mark.parametrize("case", LCE, ids=[c["id"] for c in LCE])
def test_linear_cross_entropy_case(case, chunk):
    args, kw = lce_args(case)
    if chunk is not None:
        kw["options"] = fusedce.LinearCrossEntropyOptions(batch_chunk_size=chunk)
    dtype = case["input"]["dtype"]
    if "error" in case:
        with pytest.raises(ERRORS[case["error"]]) as info:
            fusedce.linear_cross_entropy(**args, **kw)
        # the same problem, named as PyTorch names it
        assert case["message"] in str(info.value)
        return
    go = load(case["grad_output"]) if "grad_output" in case else None
    loss, grads = fusedce.linear_cross_entropy(**args, **kw, return_grad=True, grad_output=go)
    assert loss.dtype == args["input"].dtype
    assert_close("loss", loss, load(case["loss"]), dtype)
    assert_close("grad_input", grads.input, load(case["grad_input"]), dtype)
    assert_close("grad_linear_weight", grads.linear_weight, load(case["grad_linear_weight"]), dtype)
    if "grad_linear_bias" in case:
        assert_close("grad_linear_bias", grads.linear_bias, load(case["grad_linear_bias"]), dtype)
    else:
        assert grads.linear_bias is None
    for g, a in ((grads.input, args["input"]), (grads.linear_weight, args["linear_weight"])):
        assert g.shape == a.shape and g.dtype == a.dtype
    # forward only: the same loss
    assert_close("loss (forward only)", fusedce.linear_cross_entropy(**args, **kw), load(case["loss"]), dtype)
