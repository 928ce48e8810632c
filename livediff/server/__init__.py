"""The HTTP side of `livediff serve`: thin aiohttp routes over the service, the scheduler and the transport."""

from livediff.server.app import create_app

__all__ = ["create_app"]
