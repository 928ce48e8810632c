"""`livediff serve`: run the app until SIGINT/SIGTERM, then close every peer and exit cleanly.

Start-up, in order: the port is bound and a `loading` line printed before anything loads
(`server.listen`, `server.startup`; the CLI does both before importing torch), the app starts
answering (/healthz at once, /readyz 503 while loading), the backends report each network they
export or compile, and the URL is printed once the model is warmed up and ready. From then on a
loop blocked for 10 s writes every thread's stack to stderr (`server.stall`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time

from aiohttp import web

from livediff.backends import resolve_backend
from livediff.backends.cache import stop_builds
from livediff.config import EngineSettings, ServerSettings, StreamParams
from livediff.engine.device import resolve_device
from livediff.engine.video import resolve_video_backend
from livediff.errors import LivediffError
from livediff.jobs.settings import JobSettings
from livediff.models import resolve_auto
from livediff.models.video import is_video_model
from livediff.server import tls
from livediff.server.app import create_app
from livediff.server.common import LOAD_TASK, SERVICE
from livediff.server.listen import bind, bound_port
from livediff.server.stall import StallReporter
from livediff.server.startup import print_loading, wait_loaded
from livediff.transport.loopback import loopback_candidates


async def serve(
    engine_settings: EngineSettings,
    settings: ServerSettings,
    params: StreamParams,
    sockets: list[socket.socket] | None = None,
    started: float | None = None,
    jobs: JobSettings | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean stop, 2 when the model cannot load (said once).

    `sockets`: bound already (`server.listen.bind`), else bound here from `settings`.
    `started`: the `time.monotonic()` the command started at, for the seconds-to-ready it prints.
    """
    started = time.monotonic() if started is None else started
    if sockets is None:
        sockets = bind(settings.host, settings.port)
        print_loading()
    with loopback_candidates() if settings.ice_loopback else contextlib.nullcontext():
        return await _serve(engine_settings, settings, params, sockets, started, jobs)


async def _serve(
    engine_settings: EngineSettings,
    settings: ServerSettings,
    params: StreamParams,
    sockets: list[socket.socket],
    started: float,
    jobs: JobSettings | None = None,
) -> int:
    device = resolve_device(engine_settings.device)
    model = resolve_auto(engine_settings.model, device)  # each says which it picked
    # a causal video model runs on torch (eager; on CUDA its step replayed from graphs)
    if is_video_model(model, engine_settings.video_weights):
        engine_settings = engine_settings.replace(
            model=model, backend=resolve_video_backend(engine_settings.backend, device)
        )
    else:
        engine_settings = engine_settings.replace(
            model=model, backend=resolve_backend(engine_settings.backend, device, engine_settings.engines_dir)
        )
    settings, certificate = tls.prepare(settings)
    ssl_context = tls.context_for(settings)
    app = create_app(engine_settings, settings, default_params=params, jobs=jobs)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()  # starts the model load in the background
    for sock in sockets:
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    if certificate is not None:
        print(tls.explain(certificate), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code, loaded, stall = 0, False, StallReporter()
    try:
        loaded = await wait_loaded(app[LOAD_TASK], stop, started)
        if not loaded:  # stopped while loading: the network being built finishes, no other starts
            stop_builds()
    except Exception as exc:  # noqa: BLE001 - said once, in one line, then a clean exit
        said = exc if isinstance(exc, LivediffError) else f"loading failed: {exc!r}"
        print(f"livediff: error: {said}", file=sys.stderr, flush=True)
        code = 2 if isinstance(exc, LivediffError) else 1
    try:
        if loaded:
            print_ready(app[SERVICE].describe(), url(settings, bound_port(sockets)), time.monotonic() - started)
            stall.start()  # from here on, a blocked loop writes every thread's stack to stderr
            await stop.wait()
    finally:
        stall.stop()
        if code == 0:
            print("livediff: shutting down: closing every peer", flush=True)
        await runner.cleanup()
    return code


def url(settings: ServerSettings, port: int) -> str:
    """The address to open the demo page at: https with a certificate, this machine's name for a
    wildcard bind (0.0.0.0 is not an address a browser can open), IPv6 in brackets."""
    host = socket.getfqdn() if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"{settings.scheme}://{host}:{port}/"


def print_ready(engine: dict[str, object], address: str, elapsed_s: float) -> None:
    """The line once the model is warmed up: the URL, and what runs behind it."""
    print(
        f"livediff: ready in {elapsed_s:.0f} s, open {address} (model {engine['model']}, backend "
        f"{engine['backend']}, device {engine['device']}, {engine['dtype']}, size {engine['size']})",
        flush=True,
    )
