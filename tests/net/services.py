"""Programs the network tests run inside the test bed's hosts: `livediff serve` and coturn."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.net import netns

TURN_REALM = "livediff.test"


@dataclass
class Program:
    """A program running in a namespace; its output lines are kept (and readable while it runs)."""

    name: str
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, name=f"{self.name}-output", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def threads(self) -> str:
        """Where each of the program's threads waits, from the kernel (`/proc/PID/task/*/wchan`),
        and every thread's Python stack when py-spy is installed: what a failure report needs
        when a running server stops answering."""
        pid = self.process.pid
        rows = []
        for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda t: int(t.name)):
            try:
                name = (task / "comm").read_text().strip()
                wchan = (task / "wchan").read_text().strip() or "running"
            except OSError:
                continue
            rows.append(f"  thread {task.name} {name}: {wchan}")
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if spy:
            try:
                dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
                rows.append(dump.stdout + dump.stderr)
            except subprocess.TimeoutExpired:
                rows.append("py-spy dump: no answer in 30 s")
        return "\n".join(rows)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no line with {text!r} in {timeout} s; output:\n{self.output}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start(ns: str, name: str, command: list[str], env: dict[str, str] | None = None) -> Program:
    process = netns.popen(
        ns, command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    return Program(name, process)


def start_livediff(ns: str, host: str, port: int, state_dir: Path, *flags: str) -> Program:
    """`livediff serve` (tiny model, torch backend, 128x128, https with its self-signed
    certificate kept in `state_dir`) bound to `host` in `ns`; wait for its "ready" line."""
    command = [
        sys.executable,
        "-m",
        "livediff.cli",
        "serve",
        "--model",
        "tiny",
        "--backend",
        "torch",
        "--size",
        "128",
        "--host",
        host,
        "--port",
        str(port),
        "--tls",
        "self-signed",
        "--state-dir",
        str(state_dir),
        *flags,
    ]
    return start(ns, f"livediff@{ns}:{port}", command, env={"HF_HUB_OFFLINE": "1"})


def coturn(ns: str, ip: str, secret: str, work: Path) -> Program:
    """coturn on `ip`:3478 (UDP and TCP) with short-lived credentials (`use-auth-secret`)."""
    work.mkdir(parents=True, exist_ok=True)
    command = [
        "turnserver", "-n", "--listening-ip", ip, "--relay-ip", ip, "--listening-port", "3478",
        "--min-port", "49152", "--max-port", "49252", "--use-auth-secret", "--static-auth-secret", secret,
        "--realm", TURN_REALM, "--fingerprint", "--no-tls", "--no-dtls", "--no-cli", "--no-software-attribute",
        "--log-file", "stdout", "--simple-log", "--pidfile", str(work / "turnserver.pid"),
        "--userdb", str(work / "turndb"), "--verbose",
    ]  # fmt: skip
    program = start(ns, f"coturn@{ns}", command)
    try:
        program.wait_for("listener opened on", timeout=20)
    except BaseException:
        program.stop()
        raise
    return program
