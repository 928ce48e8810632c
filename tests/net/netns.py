"""Linux network namespaces as test hosts: create, wire with veth pairs, run things inside, remove.

Every namespace a test bed makes is named with this process's `PREFIX`, so a run that crashed
leaves names `sweep()` can find and remove before the next run. Addresses are only ever set
inside namespaces made here; the machine's own interfaces and tables are never touched.

Two ways to run something inside a namespace:

* a program: `popen(ns, [...])` / `run(ns, [...])` (`ip netns exec`);
* Python code of this process: `with entered(ns): ...` moves the *calling thread* into the
  namespace for the block (setns(2) is per thread). Sockets made in the block, and processes
  started from it (a browser, a driver), stay in that namespace after the block ends.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

PREFIX = "ldt"
"""Names of the namespaces this test bed makes start with this (and the process id)."""
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def missing() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, no permission), or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root (CI runs them as root)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 nftables)"
    probe = f"{PREFIX}probe{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot make network namespaces here: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result


def run(ns: str, command: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *command, check=check)


def popen(ns: str, command: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, *command], text=True, errors="backslashreplace", **kwargs)  # type: ignore[call-overload]


def names() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]


def add(ns: str) -> None:
    sh("ip", "netns", "add", ns)
    run(ns, ["ip", "link", "set", "lo", "up"])


def link(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair from `if_a` in `ns_a` to `if_b` in `ns_b` (both up, no address yet)."""
    sh("ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    run(ns_a, ["ip", "link", "set", if_a, "up"])
    run(ns_b, ["ip", "link", "set", if_b, "up"])


def address(ns: str, interface: str, cidr: str) -> None:
    run(ns, ["ip", "addr", "add", cidr, "dev", interface])


def route(ns: str, destination: str, via: str) -> None:
    run(ns, ["ip", "route", "add", destination, "via", via])


def nft(ns: str, ruleset: str) -> None:
    """Load an nftables ruleset (text) into `ns`."""
    result = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"nft in {ns} failed: {result.stderr.strip()}\n{ruleset}")


def remove(ns: str) -> None:
    """Kill whatever still runs in `ns`, then delete it (its interfaces go with it)."""
    for _ in range(3):
        pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    sh("ip", "netns", "del", ns, check=False)


def sweep(prefix: str = PREFIX) -> None:
    """Remove every namespace a test bed left behind: those of this process's id (a crashed earlier
    run with the same id) and of ids no process has; a bed another running test process owns stays."""
    for ns in names():
        if ns.startswith(prefix) and not _owned_by_another_live_process(ns[len(prefix) :].split("-")[0]):
            remove(ns)


def _owned_by_another_live_process(tag_id: str) -> bool:
    if not tag_id.isdigit() or int(tag_id) == os.getpid() % 100000:  # beds are tagged with the id mod 100000
        return False
    try:
        os.kill(int(tag_id), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def entered(ns: str) -> Iterator[None]:
    """Within the block, the calling thread is in network namespace `ns` (setns(2))."""
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")
    finally:
        os.close(target)
        os.close(own)
