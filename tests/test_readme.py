"""The README's Python examples run as written (a wrong example cannot land):
each ```python block runs in a fresh namespace; a block that imports an
optional framework skips without it (fails with FUSEDCE_REQUIRE_OPTIONAL=1)."""

from __future__ import annotations

import os
import re

import pytest

from optional import need

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), flags=re.S)
OPTIONAL = {"torch": "torch", "jax": "jax", "dask": "dask"}


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code):
    for module in OPTIONAL:
        if re.search(rf"^import .*\b{module}\b", code, flags=re.M):
            need(OPTIONAL[module])
    exec(compile(code, README, "exec"), {"__name__": "readme"})
