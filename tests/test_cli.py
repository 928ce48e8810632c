"""`livediff` as a new user meets it: --help, mistyped flags, a busy port, an unknown model, the
first start, and the default size. Commands run as real processes where start-up order matters."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from livediff.cli import build_parser, engine_settings, main
from livediff.config import EngineSettings

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("serve", "bench", "build-engines")


def livediff(*argv: str, merged: bool = False) -> subprocess.Popen[str]:
    """`livediff ARGV` in its own process, offline like every test; stderr apart, or `merged` into stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "livediff.cli", *argv],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
    )


def help_entries(command: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """`livediff COMMAND --help` as {first option string: its help, whitespace joined}."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    entries: dict[str, str] = {}
    current = None
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


# -- --help and argparse errors --------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_shows_its_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    parser = subparsers.choices[command]  # type: ignore[index]
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    entries = help_entries(command, capsys)
    for action in flags:
        name = action.option_strings[0]
        assert action.help, f"{command} {name} has no help text"
        assert name in entries, f"{command} {name} is not in --help"
        assert "(default: " in entries[name], f"{command} {name} shows no default: {entries[name]}"
    assert "(default: 8080)" in entries.get("--port", "(default: 8080)")
    assert "(default: auto)" in entries["--size"]


def test_help_never_prints_a_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIVEDIFF_TOKEN", "s3cret-token")
    entries = help_entries("serve", capsys)
    assert "s3cret-token" not in entries["--token"] and "(default: set, not shown)" in entries["--token"]


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["serve", "--size", "abc"], ["--size", "512 or 640x480"]),
        (["serve", "--port", "http"], ["--port", "'http' is not an integer"]),
        (["serve", "--port", "70000"], ["--port", "0..65535"]),
        (["serve", "--backend", "warp"], ["--backend", "openvino"]),
        (["serve", "--prot", "8081"], ["--prot", "did you mean", "--port"]),
        (["serve", "--bitrate", "5"], ["--bitrate", "100000..50000000"]),
        (["bench", "--frames", "0"], ["--frames", "1..100000"]),
        (["build-engines", "--steps", "9"], ["--steps", "1..4"]),
        (["serve", "--video-window", "2"], ["--video-window", "4..64"]),
        (["serve", "--video-shift", "0"], ["--video-shift", "0.1"]),
        (["srve"], ["srve", "serve"]),
        ([], ["serve", "bench", "build-engines"]),
    ],
)
def test_a_mistyped_command_line_gets_one_line_naming_the_flag_and_the_fix(
    argv: list[str], names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert "error:" in err and all(name in err for name in names), err


def test_a_bad_environment_value_is_named_like_a_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIVEDIFF_PORT", "http")
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--port" in err and "LIVEDIFF_PORT is 'http'" in err


def test_video_cache_and_shift_flags_reach_the_engine_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from livediff.cli import build_parser, engine_settings
    from livediff.config import VideoSettings

    args = build_parser().parse_args(["serve", "--model", "tiny-video", "--video-sink", "2", "--video-window", "6",
                                      "--video-shift", "1"])  # fmt: skip
    assert engine_settings(args).video == VideoSettings(sink=2, window=6, shift=1.0)
    monkeypatch.setenv("LIVEDIFF_VIDEO_SHIFT", "3")
    assert engine_settings(build_parser().parse_args(["serve"])).video == VideoSettings(shift=3.0)


# -- --size auto -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_the_default_size_is_what_the_cpu_runs_live(command: str, caplog: pytest.LogCaptureFixture) -> None:
    from livediff.config import LIVE_SIZE

    caplog.set_level("INFO", logger="livediff")
    args = build_parser().parse_args([command, "--model", "tiny", "--device", "cpu"])
    settings = engine_settings(args, backend="onnx")
    assert (settings.width, settings.height) == (LIVE_SIZE["cpu"], LIVE_SIZE["cpu"]) == (256, 256)
    assert "--size auto picked 256x256 (device cpu; --size 512 for the full size" in caplog.text


@pytest.mark.parametrize(
    ("argv", "env", "size"), [(["--size", "512"], {}, (512, 512)), ([], {"LIVEDIFF_SIZE": "320x240"}, (320, 240))]
)
def test_another_size_is_one_flag_away(
    argv: list[str], env: dict[str, str], size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = engine_settings(build_parser().parse_args(["serve", *argv]), backend="onnx")
    assert (settings.width, settings.height) == size


def test_the_library_default_stays_512() -> None:
    from livediff.config import LIVE_SIZE

    assert (EngineSettings().width, EngineSettings().height) == (512, 512) == (LIVE_SIZE["cuda"],) * 2


# -- serve: busy port, unknown model, first start ---------------------------------------------


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_busy_port_is_named_at_once_before_anything_loads(busy_port: int) -> None:
    process = livediff("serve", "--model", "tiny", "--host", "127.0.0.1", "--port", str(busy_port))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, (out, err)
    assert err.splitlines() == [
        f"livediff: error: port {busy_port} is in use on 127.0.0.1 (another livediff?): choose another with --port"
    ]
    assert out == ""  # not even the `loading` line: nothing was loaded


@pytest.mark.parametrize(
    ("host", "says"),
    [("10.254.254.254", "is not an address of this machine"), ("no-such-host.invalid", "the name does not resolve")],
)
def test_a_host_that_cannot_be_listened_on_is_named(host: str, says: str) -> None:
    process = livediff("serve", "--host", host, "--port", "0")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and out == ""
    assert len(err.splitlines()) == 1 and f"--host {host}" in err and says in err, err


def test_an_unknown_model_is_said_once_with_the_command_that_fetches_it() -> None:
    process = livediff("serve", "--model", "does-not-exist/model", "--host", "127.0.0.1", "--port", "0")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2, (out, err)
    assert "http://" not in out + err  # no URL for a server that never served
    errors = [line for line in err.splitlines() if "does-not-exist/model" in line]
    assert len(errors) == 1 and errors[0].startswith("livediff: error: model 'does-not-exist/model'"), err
    assert "`hf download does-not-exist/model`" in errors[0] and "huggingface-cli" not in err
    assert "HF_HUB_OFFLINE" in errors[0] and "Traceback" not in err


def test_the_first_start_shows_each_build_step_and_prints_the_url_once_ready(tmp_path: Path) -> None:
    """Built from nothing (a fresh engines folder): the URL comes last and answers when it comes."""
    process = livediff(
        "serve",
        "--model",
        "tiny",
        "--size",
        "64",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--engines-dir",
        str(tmp_path / "engines"),
        merged=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            url = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
            if url:
                with urllib.request.urlopen(url.group(1) + "readyz", timeout=10) as response:
                    assert response.status == 200  # ready when said, not 45 s later
                break
            assert process.poll() is None, "\n".join(lines)
        else:
            pytest.fail("serve exited without printing its URL:\n" + "\n".join(lines))
    finally:
        process.terminate()
        process.wait(30)
    text = "\n".join(lines)
    assert lines[0].startswith("livediff: loading; the URL follows once the model is ready"), text
    assert re.search(
        r"^livediff: ready in \d+ s, open http://127\.0\.0\.1:\d+/ \(model tiny, backend \S+, device "
        r"cpu, \w+, size 64x64\)$",
        lines[-1],
    ), text
    step = re.compile(r"^\[ *\d+\.\d s\] (?:exporting|compiling) (vae_encoder|unet|vae_decoder)")
    built = {match.group(1) for line in lines if (match := step.match(line))}
    assert built == {"vae_encoder", "unet", "vae_decoder"}, text
    assert sum("http://" in line for line in lines) == 1, text


def test_a_long_step_gets_a_reminder_of_what_is_still_running(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging

    from livediff.server.startup import wait_loaded

    caplog.set_level("INFO", logger="livediff")

    async def run() -> bool:
        async def load() -> None:
            logging.getLogger("livediff.backends").info("compiling unet with OpenVINO...")
            await asyncio.sleep(0.5)

        return await wait_loaded(asyncio.ensure_future(load()), asyncio.Event(), time.monotonic(), remind_every_s=0.2)

    assert asyncio.run(run()) is True
    reminders = [r.getMessage() for r in caplog.records if r.getMessage().startswith("still loading")]
    assert reminders and all(m.endswith("the last step: compiling unet with OpenVINO...") for m in reminders)
    assert len(reminders) <= 3  # one per quiet spell, not a flood
