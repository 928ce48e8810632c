"""Shared fixtures: the built-in tiny model, loaded once per test session, with no network."""

from __future__ import annotations

import os
import re
from collections import Counter
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


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker (`make test` runs two), torch computes on one thread: two workers of two
    spinning OpenMP threads each on a 2-core machine starve each other (and the codec threads)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (`make test`: `-n 2 --dist loadfile`) a test module runs whole on one worker (its
    module-scoped fixtures, a server, a network test bed, a browser, are built once), and the modules
    with a `slow` test are handed out first, so that no long module starts when the other worker has
    nothing left to do (`--no-loadscope-reorder` keeps this order). Without xdist nothing changes."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow_modules = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_modules)  # stable: a module stays in one piece


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """After the run, what was skipped and why, and the command that installs what was missing.

    A skip reason that names a package as `(apt-get install NAME)` adds NAME to that command;
    without this, `make test` said only "18 skipped" when the browsers were missing.
    """
    reports = terminalreporter.stats.get("skipped", [])
    if not reports:
        return
    reasons: Counter[str] = Counter()
    for report in reports:
        longrepr = report.longrepr
        text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[text.removeprefix("Skipped: ")] += 1
    terminalreporter.section("skipped: these tests did not run")
    for reason, count in reasons.most_common():
        terminalreporter.line(f"{count:4d} skipped: {reason}")
    named = [m for reason in reasons for m in re.findall(r"apt-get install ([\w.+ -]+)\)", reason)]
    packages = dict.fromkeys(p for m in named for p in m.split())
    if packages:
        terminalreporter.line(f"to run them: apt-get install {' '.join(packages)}", bold=True)


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: on a loaded 2-core machine two threads spin against each other
    (the video model's small convolutions ran tens of times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
