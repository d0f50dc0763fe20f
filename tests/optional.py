"""Optional test dependencies (PyTorch, JAX, the web service stack): a test
module that needs one skips without it, unless FUSEDCE_REQUIRE_OPTIONAL=1
(CI sets it where it installs them), which turns the skip into a failure so
that those tests cannot silently stop running."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = os.environ.get("FUSEDCE_REQUIRE_OPTIONAL") == "1"


def need(name: str) -> ModuleType:
    """The module ``name``, or a skip of the calling test module (a failure
    when FUSEDCE_REQUIRE_OPTIONAL=1)."""
    if REQUIRED:
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (FUSEDCE_REQUIRE_OPTIONAL=1 fails instead)")
