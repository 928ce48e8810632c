"""Webhooks: every state change of a job with a `callback_url` POSTed to it, signed as the Standard Webhooks
spec says (https://www.standardwebhooks.com: `webhook-id`, `webhook-timestamp`, `webhook-signature`
`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`), signed with the `standardwebhooks` package.

Delivery is at least once: events are rows written with the state change (`JobStore`), delivered by
`WebhookSender` until a 2xx (one job's events one after the other, in the order they happened; a
retried one comes after those delivered meanwhile), the same `webhook-id` on every attempt
(receivers drop repeats), retried after 1 s doubling to at most 60 s, with jitter,
`webhook_max_attempts` tries in all; each attempt is a row of its own (`JobStore.events`).

Callback URLs are checked against the operator's network: an address that is not global (loopback,
private, link-local, shared, reserved, multicast) is refused at submission (`check_callback_url`) and
again when connecting (`GlobalOnlyResolver`: a name that resolves elsewhere later is not followed),
unless `webhook_allow_private`.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from livediff.jobs.settings import JobSettings
from livediff.jobs.store import Event, JobStore
from livediff.jobs.worker import backoff_s

log = logging.getLogger(__name__)

SECRET_FILE = "webhook-secret"


def load_secret(state_dir: Path, given: str = "") -> str:
    """`given`, else the secret kept in `state_dir/webhook-secret`, made there (mode 0600) the first time:
    `whsec_` + base64 of 32 random bytes, the form Standard Webhooks libraries take."""
    if given:
        return given
    path = state_dir / SECRET_FILE
    if path.is_file():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    return secret


def _refused(address: str) -> str | None:
    """Why `address` is inside an operator's network, or None for a global address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for name in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return f"{name.replace('_', '-')} address {ip}"
    if not ip.is_global:
        return f"non-global address {ip}"
    return None


class CallbackRefused(ValueError):
    """A callback URL that may not be used; the message says why."""


def check_callback_url(url: str, allow_private: bool) -> str:
    """`url` when it is an http(s) URL whose host resolves to global addresses only (or `allow_private`);
    else `CallbackRefused`. Blocks on DNS: call from a thread."""
    if not isinstance(url, str) or len(url) > 2048:
        raise CallbackRefused("callback_url must be an http(s) URL of at most 2048 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused(f"callback_url must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise CallbackRefused("callback_url must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise CallbackRefused(f"callback_url has a bad port: {url!r}") from None
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CallbackRefused(f"callback_url: {parts.hostname} does not resolve ({exc.strerror})") from None
    if not allow_private:
        for info in infos:
            why = _refused(str(info[4][0]))
            if why is not None:
                raise CallbackRefused(
                    f"callback_url: {parts.hostname} resolves to a {why}, inside this server's network "
                    "(the operator can allow it with --webhook-allow-private)"
                )
    return url


class GlobalOnlyResolver(AbstractResolver):
    """aiohttp's resolver keeping global addresses only: a delivery never connects inside the network."""

    def __init__(self) -> None:
        self.inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:  # noqa: E501
        found = await self.inner.resolve(host, port, family)
        kept = [r for r in found if _refused(r["host"]) is None]
        if not kept:
            raise OSError(f"{host} resolves to no global address")
        return kept

    async def close(self) -> None:
        await self.inner.close()


class WebhookSender:
    """Delivers due webhook events from the store (see the module doc); `wake()` after a state change."""

    def __init__(self, store: JobStore, settings: JobSettings, secret: str,
                 on_attempt: Callable[[Event, bool], None] | None = None) -> None:  # fmt: skip
        from standardwebhooks.webhooks import Webhook

        self.store = store
        self.settings = settings
        self.signer = Webhook(secret)
        self.on_attempt = on_attempt
        """Called after each attempt with (event, delivered): metrics."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        if self._task is None:
            connector = aiohttp.TCPConnector(
                resolver=None if self.settings.webhook_allow_private else GlobalOnlyResolver(), limit=32
            )
            self._http = aiohttp.ClientSession(connector=connector)
            self._task = asyncio.create_task(self._loop(), name="livediff-webhooks")

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    def sign(self, event: Event, now: datetime) -> dict[str, str]:
        """The Standard Webhooks headers of `event` sent at `now`."""
        return {
            "webhook-id": event.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(event.id, now, event.payload),
            "content-type": "application/json",
        }

    async def _loop(self) -> None:
        hold = self.settings.webhook_timeout_s + 5
        while True:
            try:
                events = await asyncio.to_thread(self.store.due_events, hold)
                per_job: dict[str, list[Event]] = {}
                for event in events:  # oldest first: one job's events go in the order they happened
                    per_job.setdefault(event.job_id, []).append(event)
                await asyncio.gather(*(self._deliver_in_order(group) for group in per_job.values()))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a store hiccup: the events stay due
                log.exception("webhooks: delivery round failed")
                events = []
            if events:
                continue  # more may be due
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(1.0, self.settings.poll_s))
            except asyncio.TimeoutError:
                pass

    async def _deliver_in_order(self, events: list[Event]) -> None:
        for event in events:
            await self._deliver(event)

    async def _deliver(self, event: Event) -> None:
        assert self._http is not None
        status: int | None = None
        error: str | None = None
        try:
            headers = self.sign(event, datetime.now(timezone.utc))
            timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
            async with self._http.post(event.url, data=event.payload.encode(), headers=headers,
                                       timeout=timeout, allow_redirects=False) as response:  # fmt: skip
                status = response.status
                await response.read()
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        delivered = error is None
        attempt = event.attempts + 1
        again = None
        if not delivered and attempt < self.settings.webhook_max_attempts:
            again = time.time() + backoff_s(attempt, 1.0, 60.0)
        if not delivered:
            log.info("webhook %s (%s) attempt %d: %s", event.id, event.type, attempt, error)
        await asyncio.to_thread(self.store.record_attempt, event, status, error, delivered, again)
        if self.on_attempt is not None:
            self.on_attempt(event, delivered)


def describe_events(events: list[tuple[Event, list[Any]]]) -> list[dict[str, Any]]:
    """A job's webhook events and attempts, as `GET /api/jobs/{id}` shows them."""
    return [
        {
            "id": event.id,
            "type": event.type,
            "delivered_at": event.delivered_at,
            "failed_at": event.failed_at,
            "attempts": [{"attempt": a.attempt, "at": a.at, "status": a.status, "error": a.error} for a in attempts],
        }  # fmt: skip
        for event, attempts in events
    ]
