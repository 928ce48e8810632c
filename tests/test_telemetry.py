"""Vendor telemetry is off: a server run and a bench run record no vendor event, and the settings are in place.

The runs are real `livediff` processes with a fresh HOME (where the vendors keep their records) and
none of the opt-out variables inherited, so what they find is what livediff itself sets at start-up.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from livediff.telemetry import SETTINGS
from livediff.transport.loopback import free_port

pytestmark = pytest.mark.timeout(240)

ORT_DATABASE = Path(".cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db")
"""Where ONNX Runtime (1.29+, Linux) queues its usage events, under HOME."""


CI_MARKERS = (
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
)
"""Variables by which ONNX Runtime (1.32) recognises a CI machine and records nothing there: removed,
so that these runs see what a user's machine does, not what a CI runner does."""


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and k not in CI_MARKERS}
    env.update(HOME=str(home), **extra)
    return env


def vendor_records(home: Path) -> list[str]:
    """What vendors left under `home`: ONNX Runtime's database and device id, OpenVINO's client id and stats."""
    return sorted(
        str(p.relative_to(home))
        for folder in (".cache/Microsoft", "intel")
        for p in (home / folder).rglob("*")
        if p.is_file()
    )


def ort_events(home: Path) -> int:
    with sqlite3.connect(home / ORT_DATABASE) as db:
        return int(db.execute("select count(*) from events").fetchone()[0])


def python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_onnxruntime_records_usage_by_default_here(tmp_path: Path) -> None:
    """The control: without livediff, importing ONNX Runtime queues an event in that database."""
    python("import onnxruntime", clean_env(tmp_path))
    assert ort_events(tmp_path) >= 1, vendor_records(tmp_path)


def test_a_server_run_and_a_bench_run_record_no_vendor_event(tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_HUB_OFFLINE="1")
    livediff = [sys.executable, "-c", "import sys; from livediff.cli import main; sys.exit(main())"]
    engine = ["--model", "tiny", "--size", "64", "--backend", "torch"]
    bench = subprocess.run(
        [*livediff, "bench", *engine, "--frames", "3", "--warmup", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert vendor_records(tmp_path) == []

    port = free_port()
    server = subprocess.Popen(
        [*livediff, "serve", *engine, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the server was not ready in 120 s"
            time.sleep(0.3)
        assert vendor_records(tmp_path) == []  # while it runs (the database was kept open before)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    assert vendor_records(tmp_path) == []

    # OpenVINO imported after livediff (as its backend does): no analytics client id, no usage stats
    out = python(
        "import livediff, openvino, openvino.tools.ovc as ovc; openvino.Core();print(type(ovc.telemetry).__module__)",
        env,
    )
    assert out.strip() == "openvino.tools.ovc.telemetry_stub"
    assert vendor_records(tmp_path) == []


def test_the_settings_are_in_place_and_the_operator_decides(tmp_path: Path) -> None:
    import huggingface_hub.constants

    import livediff  # noqa: F401  (imported by the test session already: turn_off has run)

    assert {k: os.environ.get(k) for k in SETTINGS} == {
        "ORT_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    assert huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY is True
    with pytest.raises(ImportError):
        import openvino_telemetry  # noqa: F401

    # an operator's own choice wins: the variables they set, OpenVINO's consent file saying 1
    (tmp_path / "intel").mkdir()
    (tmp_path / "intel" / "openvino_telemetry").write_text("1")
    env = clean_env(tmp_path, ORT_DISABLE_TELEMETRY="0", RAY_USAGE_STATS_ENABLED="1")
    out = python(
        "import os, sys, livediff; print(os.environ['ORT_DISABLE_TELEMETRY'],"
        "os.environ['RAY_USAGE_STATS_ENABLED'], os.environ['HF_HUB_DISABLE_TELEMETRY'],"
        "sys.modules.get('openvino_telemetry', 'importable'))",
        env,
    )
    assert out.split() == ["0", "1", "1", "importable"]

    # a library user who imported ONNX Runtime and the hub client first still gets them turned off
    (tmp_path / "first").mkdir()
    out = python(
        "import onnxruntime, huggingface_hub.constants as c, diffusers.utils.hub_utils as d, livediff;"
        "print(c.HF_HUB_DISABLE_TELEMETRY, d.HF_HUB_DISABLE_TELEMETRY)",
        clean_env(tmp_path / "first"),
    )
    assert out.split() == ["True", "True"]
