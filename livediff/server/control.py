"""Live control of one session: the `control` data channel and `PATCH /api/sessions/{id}`.

The rule (docs/api.md#live-control says the same):

1. Every message gets one answer. `{"type": "ack", ...}` once its change has been applied (with
   the session's params then); `{"type": "superseded", "request_id", "by"}` when every field it
   set was overwritten by a newer message before it could apply (`by`: that message's
   `request_id`); `{"type": "error", "error", "field"?}` when it is not a JSON object of valid
   params: binary, not UTF-8, longer than the limit (`ServerSettings.max_body_bytes`, the same as
   a request body), not JSON, not an object, an unknown field, a value out of range or one the
   engine cannot serve (`temporal.bank` without the feature bank). A
   `{"type": "ping"}` is answered with a `pong` at once.
2. One update at a time, newest values first. While an update runs (it waits for the engine's
   worker thread, behind at most one engine step), the messages that arrive are merged field by
   field into one pending update (a strength change is not lost behind a later prompt change);
   when the running update ends, the pending one applies as a whole. The newest value of every
   field therefore applies within two updates of arriving, whatever came before it.
3. Bounded memory, whatever the message rate: one pending update (one value per field) and the
   answers it owes, at most one per field (a message whose fields were all overwritten is
   answered `superseded` at once) plus at most `MAX_WAITING` messages that set no field.

`PATCH /api/sessions/{id}` joins the same queue, so it never waits behind a burst of data-channel
messages: it answers once its own values applied (or were superseded by newer ones).

The other way, the session sends a `stats` message for every frame it sends (`frame_sent`):
its times, the probe ids of the frames the session dropped on purpose since the message before
(`livediff.server.drops`) and its live temporal quality (`livediff.server.quality`). A
client that stops reading (a frozen tab, a congested downlink) leaves them in the channel's send
queue, which has no limit in aiortc: while the channel holds more than `BACKED_UP_BYTES` unsent,
stats are dropped and counted (`SessionStats.stats_dropped`) rather than queued; the dropped ids
a message carried go with the next one sent. Answers are never dropped: there is at most one
per message received, and the pending update bounds them. A ControlNet the session names that is
still loading is told once its load ends (`{"type": "controlnet", "name", "state"}`,
`livediff.server.controlnets`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCDataChannel

from livediff.config import StreamParams
from livediff.server.drops import DropLog
from livediff.server.params import ParamError, parse_update
from livediff.session import FrameOut, Session, SessionClosed
from livediff.transport.sctp_text import InvalidText

log = logging.getLogger(__name__)

STATS_DELAY_S = 0.008
"""A frame's stats message leaves this long after the frame went to its encoder, once the frame's
own packets are out (the encode takes 2-4 ms at 512x512): sent at once, the message's SCTP/DTLS
work on both event loops delayed the frame it describes (`livediff bench --g2g` passthrough
p50 13.0 ms with the message sent at once, 11.6-12.0 deferred, 10.0-11.6 with no message)."""

BACKED_UP_BYTES = 16 * 1024
"""Unsent bytes in the channel (`RTCDataChannel.bufferedAmount`) above which stats are dropped:
about 2 s of stats at 30 fps (~270 bytes each). A channel that keeps up holds none of them."""

MAX_WAITING = 32
"""Messages that set no field (e.g. `{}` or only a `request_id`) waiting for the next update; more are refused."""

Apply = Callable[[Session, StreamParams, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Applies checked params and session fields to a session; returns the ack's body (params, warnings)."""
Check = Callable[[StreamParams, StreamParams], None]
"""(params, the session's params now) -> None; raises `ParamError` when the engine cannot serve
params that parse (e.g. `temporal.bank` without the bank, a ControlNet it does not have)."""
Send = Callable[[dict[str, Any]], None]


def _ms(t: float) -> float:
    return round(t * 1000.0, 3)


def stats_message(
    out: FrameOut,
    dropped: dict[str, list[int]],
    quality: dict[str, Any] | None,
    loss: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The `stats` message of a frame just handed to its encoder (times on this process's monotonic clock, ms).

    `dropped`: probe ids of the frames dropped on purpose since the message before, by slot
    (`DropLog.take`); `quality`: the session's live temporal quality (`LiveQuality.as_dict`), None
    until sampled; `loss`: the input's loss-recovery counters since the session began
    (`livediff.transport.loss_recovery.LossStats`), None without loss recovery.
    """
    return {
        "type": "stats",
        "frame_id": out.source.frame_id,  # None unless the session probes
        "received_ms": _ms(out.source.received),
        "scheduled_ms": _ms(out.scheduled),
        "finished_ms": _ms(out.finished),
        "sent_ms": _ms(time.monotonic()),
        "stages_ms": {k: round(v, 3) for k, v in out.stages_ms.items()},
        "batch_size": out.batch_size,
        "skipped": out.skipped,
        "dropped": dropped,
        "quality": quality,
        "loss": loss,
    }


def fields_of(data: Mapping[str, Any]) -> frozenset[str]:
    """The fields a message sets, `blend` split into `blend.prompt` and `blend.weight`."""
    names: set[str] = set()
    for name, value in data.items():
        if name == "blend" and isinstance(value, Mapping):
            names.update(f"blend.{key}" for key in value)
        else:
            names.add(name)
    return frozenset(names)


def merge(pending: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """`pending` with `data`'s fields on top (`blend` merged key by key)."""
    merged = dict(pending)
    for name, value in data.items():
        if name == "blend" and isinstance(value, Mapping) and isinstance(merged.get("blend"), Mapping):
            merged["blend"] = {**merged["blend"], **value}
        else:
            merged[name] = value
    return merged


class ControlMessageError(ValueError):
    """A data-channel message that is not a JSON object (binary, not UTF-8, too long, not JSON)."""


def decode_message(raw: str | bytes, max_bytes: int) -> dict[str, Any]:
    """A data-channel message as a JSON object, or `ControlMessageError` saying what is wrong with it."""
    if isinstance(raw, InvalidText):
        raise ControlMessageError(f"a text message that is not UTF-8 ({len(raw)} bytes)")
    if isinstance(raw, bytes):
        raise ControlMessageError(f"binary messages are not accepted ({len(raw)} bytes): send JSON as text")
    size = len(raw.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise ControlMessageError(f"message is {size} bytes, over the limit of {max_bytes}")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ControlMessageError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ControlMessageError(f"a control message must be a JSON object, got {type(data).__name__}")
    return data


@dataclass
class _Waiter:
    """A message waiting for its answer: the fields it still sets (not yet overwritten by a newer one)."""

    request_id: Any
    fields: frozenset[str]
    send: Send | None = None
    """The data channel's answer; None for a PATCH, answered through `future`."""
    future: asyncio.Future[dict[str, Any]] | None = None

    def ok(self, ack: dict[str, Any]) -> None:
        if self.send is not None:
            self.send({"type": "ack", "request_id": self.request_id, **ack})
        elif self.future is not None and not self.future.done():
            self.future.set_result(ack)

    def superseded(self, by: Any, state: dict[str, Any]) -> None:
        if self.send is not None:
            self.send({"type": "superseded", "request_id": self.request_id, "by": by})
        elif self.future is not None and not self.future.done():
            self.future.set_result(
                {
                    **state,
                    "superseded_by": by,
                    "warnings": ["a newer update overwrote every field of this one before it applied"],
                }
            )

    def failed(self, exc: Exception) -> None:
        if self.send is not None:
            body: dict[str, Any] = {"type": "error", "request_id": self.request_id, "error": str(exc)}
            if isinstance(exc, ParamError):
                body.update(error=exc.message, field=exc.field)
            self.send(body)
        elif self.future is not None and not self.future.done():
            self.future.set_exception(exc)


@dataclass
class Control:
    """One session's live control (see the module docstring for the rule)."""

    session: Session
    apply: Apply
    max_bytes: int
    describe: Callable[[], dict[str, Any]]
    """The session's current control state (the ack's body without the update), for superseded PATCHes."""
    check: Check | None = None
    """What the engine cannot serve is refused with the message, before it merges with others."""
    _pending: dict[str, Any] = field(default_factory=dict)
    _waiters: list[_Waiter] = field(default_factory=list)
    _runner: asyncio.Task[None] | None = None
    channel: RTCDataChannel | None = None
    """The client's `control` channel, once it opened one (WHIP publishers have none)."""
    updates: int = 0
    """Updates applied (each one merged every message that arrived while the one before ran)."""
    drops: DropLog = field(init=False)
    """The probe ids of frames the session dropped on purpose, for its next stats message."""

    def __post_init__(self) -> None:
        self.drops = DropLog(self.session)

    @property
    def waiting(self) -> int:
        """Messages waiting for an answer (pending, not yet applying)."""
        return len(self._waiters)

    # -- the data channel ------------------------------------------------------------------------

    def attach(self, channel: RTCDataChannel) -> None:
        """Take the client's `control` channel: its messages come here, the session's messages go there."""

        def send(message: dict[str, Any]) -> None:
            if channel.readyState == "open":
                channel.send(json.dumps(message))

        self.channel = channel
        channel.on("message", lambda raw: self.on_message(raw, send))

    def tell(self, message: dict[str, Any]) -> None:
        """Send a message of the session's own (not an answer: `controlnet` load states) when the
        channel is open; without one it is not sent (`livediff.server.controlnets.tell_states`
        repeats the states when a channel opens)."""
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps(message))

    def frame_sent(self, out: FrameOut) -> None:
        """Send `out`'s stats message `STATS_DELAY_S` from now, unless the channel is backed up then."""
        if self.channel is not None:
            quality = self.session.quality.as_dict() if self.session.quality is not None else None
            loss = self.session.loss() if self.session.loss is not None else None
            message = stats_message(out, self.drops.take(), quality, loss)
            asyncio.get_running_loop().call_later(STATS_DELAY_S, self._send_stats, message)

    def _send_stats(self, message: dict[str, Any]) -> None:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return
        if channel.bufferedAmount > BACKED_UP_BYTES:
            self.session.stats.stats_dropped += 1
            self.drops.restore(message["dropped"])  # the next message sent carries them
            return
        channel.send(json.dumps(message))

    def on_message(self, raw: str | bytes, send: Send) -> None:
        """Handle one data-channel message; every answer goes through `send`."""
        request_id = None
        try:
            data = decode_message(raw, self.max_bytes)
            request_id = data.pop("request_id", None)
            if data.get("type") == "ping":  # clock sync: the client pairs its send/receive times with ours
                send({"type": "pong", "client_ms": data.get("client_ms"), "server_ms": _ms(time.monotonic())})
                return
            self._submit(data, _Waiter(request_id, fields_of(data), send=send))
        except ControlMessageError as exc:
            send({"type": "error", "error": str(exc), "request_id": request_id})
        except ParamError as exc:
            send({"type": "error", "error": exc.message, "field": exc.field, "request_id": request_id})
        except SessionClosed:
            pass  # the channel closes with its session

    # -- PATCH -----------------------------------------------------------------------------------

    async def patch(self, data: dict[str, Any]) -> dict[str, Any]:
        """Apply `data` (a PATCH body) in turn with the data channel's messages; the ack's body.

        Raises `ParamError` (422) for invalid params and `SessionClosed` (404) once the session ended.
        """
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._submit(dict(data), _Waiter(None, fields_of(data), future=future))
        return await future

    # -- the queue -------------------------------------------------------------------------------

    def _submit(self, data: dict[str, Any], waiter: _Waiter) -> None:
        self.session.ensure_open()
        merged = merge(self._pending, data)
        params, _ = parse_update(self.session.params, merged)  # a bad message is refused now, never merged
        if self.check is not None:
            self.check(params, self.session.params)
        if not waiter.fields and sum(not w.fields for w in self._waiters) >= MAX_WAITING:
            raise ParamError(None, f"{MAX_WAITING} messages without changes are already waiting for an answer")
        if self._runner is None:
            self._runner = self.session.spawn(self._run(), "control")
        state = None
        for older in [w for w in self._waiters if w.fields and w.fields <= waiter.fields]:
            self._waiters.remove(older)
            state = state or self.describe()
            older.superseded(waiter.request_id, state)
        for older in self._waiters:
            older.fields -= waiter.fields
        self._pending = merged
        self._waiters.append(waiter)

    async def _run(self) -> None:
        """Apply the pending update, then the one that gathered meanwhile, until none is left."""
        applying: list[_Waiter] = []
        try:
            while self._waiters:
                data, applying = self._pending, self._waiters
                self._pending, self._waiters = {}, []
                try:
                    params, extras = parse_update(self.session.params, data)
                    ack = await self.apply(self.session, params, extras)
                except (ParamError, SessionClosed) as exc:
                    for waiter in applying:
                        waiter.failed(exc)
                    continue
                except Exception as exc:  # an engine failure fails this update, not the session
                    log.exception("session %s: update failed", self.session.id)
                    for waiter in applying:
                        waiter.failed(RuntimeError(f"the update failed: {type(exc).__name__}"))
                    continue
                self.updates += 1
                for waiter in applying:
                    waiter.ok(ack)
                applying = []
        finally:
            self._runner = None
            for waiter in applying + self._waiters:  # cancelled with the session: PATCHes answer 404
                waiter.failed(SessionClosed(self.session.id))
            self._waiters = []
