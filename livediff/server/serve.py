"""`livediff serve`: run the app until SIGINT/SIGTERM, then close every peer and exit cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from aiohttp import web

from livediff.backends import resolve_backend
from livediff.config import EngineSettings, ServerSettings, StreamParams
from livediff.engine.device import resolve_device
from livediff.errors import LivediffError
from livediff.models import resolve_auto
from livediff.server import tls
from livediff.server.app import LOAD_TASK, create_app
from livediff.server.common import SERVICE
from livediff.transport.loopback import loopback_candidates


async def serve(engine_settings: EngineSettings, settings: ServerSettings, params: StreamParams) -> int:
    with loopback_candidates() if settings.ice_loopback else contextlib.nullcontext():
        return await _serve(engine_settings, settings, params)


async def _serve(engine_settings: EngineSettings, settings: ServerSettings, params: StreamParams) -> int:
    device = resolve_device(engine_settings.device)
    model = resolve_auto(engine_settings.model, device)  # each says which it picked
    engine_settings = engine_settings.replace(model=model, backend=resolve_backend(engine_settings.backend, device))
    settings, certificate = tls.prepare(settings)
    ssl_context = tls.context_for(settings)
    app = create_app(engine_settings, settings, default_params=params)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    url = f"{settings.scheme}://{_url_host(settings.host)}:{settings.port}/"
    print(f"livediff: serving {url} — model {model}, backend {engine_settings.backend}, device {device}, "
          f"size {engine_settings.width}x{engine_settings.height}", flush=True)
    if certificate is not None:
        print(tls.explain(certificate), flush=True)
    code = 0
    try:
        load = app[LOAD_TASK]
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([load, waiter], return_when=asyncio.FIRST_COMPLETED)
        if load.done() and load.exception() is not None:
            exc = load.exception()
            print(f"livediff: error: model load failed: {exc}", flush=True)
            code = 2 if isinstance(exc, LivediffError) else 1
        else:
            if load.done():
                print(f"livediff: ready ({app[SERVICE].engine_settings.model} warmed up)", flush=True)
            await stop.wait()
        waiter.cancel()
    finally:
        print("livediff: shutting down: closing every peer", flush=True)
        await runner.cleanup()
    return code


def _url_host(host: str) -> str:
    """The host part of the URL users open: this machine's name for a wildcard bind, IPv6 in brackets."""
    if host in ("0.0.0.0", "::", ""):
        import socket

        return socket.getfqdn()
    return f"[{host}]" if ":" in host else host
