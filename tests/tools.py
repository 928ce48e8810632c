"""Optional tools of some tests (Ray Serve from the cluster extra, promtool from Debian's prometheus):
skipped with the command that installs them, or a failure where CI requires them
(LIVEDIFF_REQUIRE_TOOLS=1, set by .ci/run)."""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

REQUIRED = os.environ.get("LIVEDIFF_REQUIRE_TOOLS") == "1"


def import_or_skip(module: str, install: str) -> ModuleType:
    if REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed ({install})")


def which_or_skip(program: str, install: str) -> str:
    path = shutil.which(program)
    if path is None:
        if REQUIRED:
            pytest.fail(f"{program} is required here (LIVEDIFF_REQUIRE_TOOLS=1): {install}")
        pytest.skip(f"{program} is not installed ({install})")
    return path
