"""The service behind the routes: publishing sessions, viewers, live control, frame conversion.

Routes parse HTTP and call in here; this module wires peers (transport) to sessions (scheduler)
and keeps the per-peer resources (ETag, peer connection, tasks) that WHIP/WHEP address by URL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import torch
from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay

from livediff.config import PREPROCESSORS, EngineSettings, ServerSettings, StreamParams, nat_1to1_map
from livediff.errors import ConfigError
from livediff.models import ModelParts
from livediff.scheduler import Scheduler, StepObservers
from livediff.server.controlnets import follow_loads, tell_states
from livediff.server.drops import DropLog
from livediff.server.errors import NotReady
from livediff.server.metrics import Metrics
from livediff.server.params import parse_update, refusal
from livediff.server.quality import QualitySampler
from livediff.session import FrameIn, FrameOut, Session, params_to_json
from livediff.transport import probe
from livediff.transport.candidates import accept_remote, announce, is_mdns
from livediff.transport.frames import array_to_frame, frame_to_tensor, luma
from livediff.transport.ice_servers import IceServerConfig
from livediff.transport.offers import negotiate, prepare_offer
from livediff.transport.peer import create_peer, negotiated_codec, prefer_codecs, tune_sender
from livediff.transport.tracks import OutputTrack, drain, pump
from livediff.transport.whip import SdpFrag, new_etag

log = logging.getLogger(__name__)


@dataclass
class Resource:
    """A WHIP session or WHEP viewer as addressed by its URL."""

    pc: RTCPeerConnection
    session: Session
    etag: str
    answer: str
    """The SDP answer as sent: the server's candidates, as `announce` maps them."""
    viewer_id: str | None = None


FEATURES = ("probe", "passthrough")
"""Session params beyond the engine's own that the pages may use: probe ids, transport-only runs."""


STATS_DELAY_S = 0.008
"""A frame's stats message leaves this long after the frame went to its encoder, once the frame's
own packets are out (the encode takes 2-4 ms at 512x512): sent at once, the message's SCTP/DTLS
work on both event loops delayed the frame it describes (`livediff bench --g2g` passthrough
p50 13.0 ms with the message sent at once, 11.6-12.0 deferred, 10.0-11.6 with no message)."""


def _ms(t: float) -> float:
    return round(t * 1000.0, 3)


class Service:
    def __init__(self, engine_settings: EngineSettings, settings: ServerSettings,
                 parts: ModelParts | None = None, default_params: StreamParams | None = None) -> None:
        self.engine_settings = engine_settings
        self.default_params = default_params or StreamParams()
        self.settings = settings
        self.parts = parts
        self.ice = IceServerConfig(settings.ice_servers, settings.turn_username, settings.turn_credential,
                                   settings.turn_secret, settings.turn_ttl_s)
        self.nat_1to1 = nat_1to1_map(settings.nat_1to1)
        self.metrics = Metrics(engine=lambda: self.scheduler.engine)
        self.quality = QualitySampler(observe=self.metrics.on_quality)
        self.scheduler = Scheduler(settings.max_sessions, self._convert_in, self._convert_out,
                                   observer=StepObservers(self.metrics, self.quality),
                                   pass_through=self._pass_through, fresh_frames=settings.fresh_frames)
        self.relay = MediaRelay()
        self.outputs: dict[str, OutputTrack] = {}
        self.resources: dict[str, Resource] = {}
        self.ready = False
        self.load_error: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Build the engine and run one warm-up inference on the worker thread; then ready."""
        from livediff.engine import StreamEngine
        from livediff.engine.device import resolve_device

        def make_engine() -> StreamEngine:
            if resolve_device(self.engine_settings.device).type == "cpu":
                # torch's spinning OpenMP threads starve the codec threads (and each other) when
                # oversubscribed: measured on 2 cores, 2 threads gave 1.3 s stalls, 1 thread none.
                threads = self.settings.cpu_threads or max(1, (os.cpu_count() or 2) - 1)
                torch.set_num_threads(threads)
            return StreamEngine(self.engine_settings, self.parts)

        try:
            await self.scheduler.load(make_engine)
        except Exception as exc:  # reported by /readyz and the CLI, never swallowed
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.debug("model load failed: %s", self.load_error)  # the caller says it (once)
            raise
        self.ready = True

    async def close(self) -> None:
        """Close every peer and session (SIGTERM, app shutdown)."""
        for session in list(self.scheduler.sessions.values()):
            await self.close_session(session)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.scheduler.close()
        self.quality.close()

    def describe(self) -> dict[str, Any]:
        """What runs here, for /readyz and the pages' HUDs (only once the engine is built)."""
        engine = self.scheduler.engine
        return {
            "model": engine.parts.ref,
            "revision": engine.parts.revision,
            "backend": engine.backend.name,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "size": f"{self.engine_settings.width}x{self.engine_settings.height}",
            "max_batch": self.engine_settings.max_batch,
            "max_sessions": self.settings.max_sessions,
            "features": list(FEATURES),
            "controlnets": [name for name, _ in self.engine_settings.controlnets],
            "preprocessors": [p for p in PREPROCESSORS if p != "depth" or self.engine_settings.depth_model],
        }

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.load_error or "the model is loading")

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_session(self, session: Session) -> None:
        await self.scheduler.close_session(session)
        self.metrics.sessions.set(len(self.scheduler.sessions))

    # -- frames (on the worker thread; passthrough frames sent as they came on the loop) ---------

    def _pass_through(self, session: Session, frame: FrameIn) -> av.VideoFrame | None:
        """The decoded frame itself when it can go to the encoder as is (engine size, yuv420p), else None.

        Runs on the event loop: no conversion, only the probe read (32 block means of the Y plane).
        """
        image: av.VideoFrame = frame.image
        if (image.width, image.height) != (self.engine_settings.width, self.engine_settings.height):
            return None
        if image.format.name != "yuv420p":
            return None
        self._read_probe(session, frame)
        return image

    def _convert_in(self, session: Session, frame: FrameIn) -> torch.Tensor:
        self._read_probe(session, frame)
        return frame_to_tensor(frame.image, self.engine_settings.width, self.engine_settings.height)

    @staticmethod
    def _read_probe(session: Session, frame: FrameIn) -> None:
        """In probe mode, the id painted in the input frame (at the camera's own size)."""
        if session.probe:
            frame.frame_id = probe.read(luma(frame.image))

    def _convert_out(self, session: Session, frame: FrameIn, image: torch.Tensor) -> av.VideoFrame:
        rgb = image.numpy()
        if frame.frame_id is not None:
            rgb = rgb.copy()  # the engine keeps its last output for the similarity filter
            probe.paint(rgb, frame.frame_id)
        return array_to_frame(rgb, frame.pts, frame.time_base)

    def _on_sent(self, session: Session) -> Callable[[FrameOut], None]:
        drops = DropLog(session)

        def on_sent(out: FrameOut) -> None:
            age = self.metrics.on_sent(out)
            session.stats.sent += 1
            session.stats.last_age_ms = round(age * 1000.0, 3)
            if session.send_message is not None:  # frame_id is None unless the session probes
                stats = {
                    "type": "stats",
                    "frame_id": out.source.frame_id,
                    "received_ms": _ms(out.source.received),
                    "scheduled_ms": _ms(out.scheduled),
                    "finished_ms": _ms(out.finished),
                    "sent_ms": _ms(time.monotonic()),
                    "stages_ms": {k: round(v, 3) for k, v in out.stages_ms.items()},
                    "batch_size": out.batch_size,
                    "skipped": out.skipped,
                    "dropped": drops.take(),
                    "quality": session.quality.as_dict() if session.quality is not None else None,
                }
                asyncio.get_running_loop().call_later(STATS_DELAY_S, session.send_message, stats)

        return on_sent

    def _deliver(self, session: Session) -> Callable[[av.VideoFrame], None]:
        received = self.metrics.frames.labels("received")
        dropped = self.metrics.frames.labels("dropped_in")

        def deliver(frame: av.VideoFrame) -> None:
            session.stats.frames_in += 1
            if session.state == "new":
                session.state = "live"
            received.inc()
            if session.inbox.put(FrameIn(frame, frame.pts, frame.time_base, time.monotonic())):
                dropped.inc()

        return deliver

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, offer: RTCSessionDescription, params: StreamParams, kind: str,
                      probe_on: bool = False) -> tuple[Session, Resource]:
        """Admit a session for a publisher's offer; the answer is `resource.answer`."""
        self.require_ready()
        offer = prepare_offer(offer.sdp, self.settings.video_codecs)
        try:
            session = await self.scheduler.open_session(params, kind=kind, probe=probe_on)
        except ConfigError as exc:  # a param this engine cannot serve (temporal.bank without the feature bank)
            raise refusal(exc) from None
        await follow_loads(self.scheduler, session)
        self.metrics.sessions.set(len(self.scheduler.sessions))
        try:
            pc = create_peer(self.ice, self.settings.marker_completion)
            session.on_close(pc.close)
            output = OutputTrack(session.outbox, self._on_sent(session))
            self.outputs[session.id] = output
            session.on_close(self._forget_output(session.id))
            transceiver = pc.addTransceiver(self.relay.subscribe(output, buffered=False), direction="sendrecv")
            prefer_codecs(transceiver, self.settings.video_codecs)
            self._watch(pc, session, lambda: self.close_session(session))

            @pc.on("track")
            def on_track(track: MediaStreamTrack) -> None:
                if track.kind == "video":
                    session.spawn(pump(track, self._deliver(session)), "video-in")
                else:  # audio is accepted and dropped (documented); drained so nothing queues
                    session.spawn(drain(track), "audio-drain")

            @pc.on("datachannel")
            def on_datachannel(channel: RTCDataChannel) -> None:
                if channel.label == "control":
                    self._control_channel(session, channel)

            answer = await self._answer(pc, offer)
            if transceiver.currentDirection in ("sendrecv", "sendonly"):
                session.spawn(tune_sender(transceiver.sender, self.settings.bitrate,
                                          self.settings.keyframe_interval_s), "tune")
            log.info("session %s (%s): video %s, %s", session.id, kind, negotiated_codec(transceiver),
                     transceiver.currentDirection)
        except BaseException:
            await self.close_session(session)
            raise
        resource = Resource(pc=pc, session=session, etag=new_etag(), answer=answer)
        self.resources[session.id] = resource
        session.on_close(self._forget_resource(session.id))
        return session, resource

    def _forget_output(self, session_id: str) -> Callable[[], Any]:
        async def forget() -> None:
            output = self.outputs.pop(session_id, None)
            if output is not None:
                output.stop()

        return forget

    def _forget_resource(self, key: str) -> Callable[[], Any]:
        async def forget() -> None:
            self.resources.pop(key, None)

        return forget

    async def _answer(self, pc: RTCPeerConnection, offer: RTCSessionDescription) -> str:
        """Negotiate `offer` on `pc` (`transport.offers.negotiate`: whatever aiortc raises is a 400);
        returns the answer SDP to send (see `transport.candidates`: the offer's end-of-candidates
        and mDNS candidates are left out, the answer's host candidates carry the NAT 1:1 public
        address)."""
        await negotiate(pc, RTCSessionDescription(sdp=accept_remote(offer.sdp), type=offer.type))
        return announce(pc.localDescription.sdp, self.nat_1to1)

    def _watch(self, pc: RTCPeerConnection, owner: Session, end: Callable[[], Any]) -> None:
        """Reap the peer when it fails, closes, or never connects within the ICE timeout."""

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._background(end())

        async def watchdog() -> None:
            await asyncio.sleep(self.settings.connect_timeout_s)
            if pc.connectionState != "connected":
                log.info("session %s: peer did not connect in %.0f s, reaped", owner.id,
                         self.settings.connect_timeout_s)
                self._background(end())

        owner.spawn(watchdog(), "connect-watchdog")

    # -- viewers (WHEP) --------------------------------------------------------------------------

    def newest_session(self) -> Session | None:
        live = [s for s in self.scheduler.sessions.values() if not s.closed]
        return max(live, key=lambda s: s.created, default=None)

    async def view(self, session: Session, offer: RTCSessionDescription) -> Resource:
        self.require_ready()
        offer = prepare_offer(offer.sdp, self.settings.video_codecs)
        if len(session.viewers) >= self.settings.max_viewers:
            raise OverflowError(f"session {session.id} has its limit of {self.settings.max_viewers} viewers")
        output = self.outputs[session.id]
        viewer_id = uuid.uuid4().hex[:12]
        pc = create_peer(self.ice, self.settings.marker_completion)
        proxy = self.relay.subscribe(output, buffered=False)
        transceiver = pc.addTransceiver(proxy, direction="sendonly")
        prefer_codecs(transceiver, self.settings.video_codecs)
        key = f"{session.id}/{viewer_id}"
        tasks: list[asyncio.Task[Any]] = []

        async def end() -> None:
            if session.viewers.pop(viewer_id, None) is None:
                return
            self.resources.pop(key, None)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            proxy.stop()
            await pc.close()
            self.metrics.viewers.dec()

        session.viewers[viewer_id] = end
        self.metrics.viewers.inc()
        try:
            answer = await self._answer(pc, offer)
        except BaseException:
            await end()
            raise
        resource = Resource(pc=pc, session=session, etag=new_etag(), answer=answer, viewer_id=viewer_id)
        tasks.append(session.spawn(tune_sender(transceiver.sender, self.settings.bitrate,
                                               self.settings.keyframe_interval_s), "viewer-tune"))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._background(end())

        async def watchdog() -> None:
            await asyncio.sleep(self.settings.connect_timeout_s)
            if pc.connectionState != "connected":
                self._background(end())

        tasks.append(session.spawn(watchdog(), "viewer-watchdog"))
        self.resources[key] = resource
        return resource

    async def end_viewer(self, session: Session, viewer_id: str) -> bool:
        end = session.viewers.get(viewer_id)
        if end is None:
            return False
        await end()
        return True

    # -- trickle ---------------------------------------------------------------------------------

    async def trickle(self, resource: Resource, frag: SdpFrag) -> None:
        """Add trickled candidates; mDNS ones are skipped and end-of-candidates is not passed on,
        for the reasons `transport.candidates` gives for offers."""
        for candidate in frag.candidates:
            if is_mdns(candidate.ip):
                continue
            if candidate.sdpMid is None:
                transceivers = resource.pc.getTransceivers()
                candidate.sdpMid = transceivers[0].mid if transceivers else None
            await resource.pc.addIceCandidate(candidate)

    # -- live control ----------------------------------------------------------------------------

    async def apply_params(self, session: Session, data: dict[str, Any]) -> dict[str, Any]:
        """Validate and apply a control message; the change takes effect from the next frame."""
        async with session.param_lock:
            params, extras = parse_update(session.params, data)
            try:
                truncated = (await self.scheduler.update(session, params) if params != session.params
                             else self.scheduler.prompt_truncated(session))
            except ConfigError as exc:  # a param this engine cannot serve: the session keeps its params
                raise refusal(exc) from None
            if "controlnet" in data:
                await follow_loads(self.scheduler, session)
            if "probe" in extras:
                session.probe = extras["probe"]
        warnings = []
        if truncated:
            limit = self.scheduler.engine.parts.tokenizer.model_max_length
            warnings.append(f"prompt truncated to the tokenizer's limit of {limit} tokens")
        return {"session_id": session.id, "params": params_to_json(session.params), "probe": session.probe,
                "controlnet_state": dict(session.controlnet_state), "warnings": warnings}

    def _control_channel(self, session: Session, channel: RTCDataChannel) -> None:
        def send(message: dict[str, Any]) -> None:
            if channel.readyState == "open":
                channel.send(json.dumps(message))

        session.send_message = send
        tell_states(session)  # aiortc announces a channel the peer opened once it is open

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            session.spawn(self._control(session, message, send), "control")

    async def _control(self, session: Session, message: str | bytes, send: Callable[[dict[str, Any]], None]) -> None:
        from livediff.server.params import ParamError

        request_id = None
        try:
            data = json.loads(message)
            if not isinstance(data, dict):
                raise ParamError(None, "a control message must be a JSON object")
            if data.get("type") == "ping":  # clock sync: the client pairs its send/receive times with ours
                send({"type": "pong", "client_ms": data.get("client_ms"), "server_ms": _ms(time.monotonic())})
                return
            request_id = data.pop("request_id", None)
            ack = await self.apply_params(session, data)
        except json.JSONDecodeError as exc:
            send({"type": "error", "error": f"not JSON: {exc}", "request_id": request_id})
            return
        except ParamError as exc:
            send({"type": "error", "error": exc.message, "field": exc.field, "request_id": request_id})
            return
        send({"type": "ack", "request_id": request_id, **ack})
