"""The HTTP side of `livediff serve`: thin aiohttp routes over the service, the scheduler and the transport."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `livediff serve` binds its port (server.listen) before loading
    # aiortc, torch and the model code that the app pulls in.
    if name == "create_app":
        from livediff.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
