"""The end of a test run says which tests were skipped, why, and how to install what they need."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_run_without_browsers_ends_with_the_skip_reasons_and_the_install_command(tmp_path: Path) -> None:
    """The page tests, run for real with both browsers pointed at paths that do not exist."""
    env = {**os.environ, "LIVEDIFF_CHROMIUM": str(tmp_path / "chromium"), "LIVEDIFF_FIREFOX": str(tmp_path / "firefox")}
    env.pop("LIVEDIFF_REQUIRE_BROWSER", None)  # CI's guard would turn these skips into failures
    tests = ["tests/test_pages.py::test_latency_page_run_summary_and_downloads",
             "tests/test_pages_firefox.py::test_demo_page_in_firefox"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = run.stdout
    assert run.returncode == 0 and "2 skipped" in out, out
    summary = out[out.index("skipped: these tests did not run") :]
    assert f"1 skipped: {tmp_path / 'chromium'} is not installed (apt-get install chromium)" in summary, out
    assert "1 skipped: Firefox is not installed (apt-get install firefox-esr)" in summary, out
    assert "to run them: apt-get install chromium firefox-esr" in summary, out
