"""The aiortc guards cost nothing per peer: the installed aiortc's version is read once per process
(importlib.metadata took ~0.7 ms a call, and the jitter-buffer swap ran it on every track event of
every receiver), while the structural checks still run and still fail loudly."""

from __future__ import annotations

import importlib.metadata

import pytest
from aiortc import RTCPeerConnection

from livediff.transport import aiortc_guard, marker_jitterbuffer


async def test_the_version_is_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = importlib.metadata.version

    def counting(name: str) -> str:
        calls.append(name)
        return real(name)

    aiortc_guard.aiortc_version.cache_clear()
    monkeypatch.setattr(importlib.metadata, "version", counting)
    for _ in range(10):
        marker_jitterbuffer.check_aiortc_internals()
    pc = RTCPeerConnection()  # a peer with three video receivers, swapped on every track event
    try:
        for _ in range(3):
            pc.addTransceiver("video")
        for _ in range(5):
            marker_jitterbuffer.enable_for(pc)
    finally:
        await pc.close()
    assert calls.count("aiortc") == 1, calls
    assert aiortc_guard.aiortc_version() == real("aiortc")
