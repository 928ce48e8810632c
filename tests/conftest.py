"""Shared fixtures: the built-in tiny model, loaded once per test session, with no network."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # imported here, at start-up, not by its plugin's end-of-run summary: pytest then rewrites its modules
    import hypothesis  # noqa: F401  deep in a call stack, where CPython 3.11.7's ast.parse fails with SystemError
except ImportError:  # (AST constructor recursion depth mismatch) and the run ends with a traceback
    pass

# No test may reach the hub: unknown ids must fail fast and clearly, not after network retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("LIVEDIFF_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "livediff"))


@pytest.fixture(scope="session")
def tiny_parts():  # type: ignore[no-untyped-def]
    from livediff.models import load_model

    return load_model("tiny")


@pytest.fixture()
def artifacts_dir() -> Iterator[Path]:
    """Where tests leave files worth looking at (screenshots, reports)."""
    folder = Path(__file__).resolve().parent.parent / "test-artifacts"
    folder.mkdir(exist_ok=True)
    yield folder


@pytest.fixture()
def loopback_ice() -> Iterator[None]:
    """ICE gathers 127.0.0.1 only (aioice skips loopback by default): server tests stay on loopback."""
    from livediff.transport.loopback import loopback_candidates

    with loopback_candidates():
        yield


@pytest.fixture()
async def http():  # type: ignore[no-untyped-def]
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session
