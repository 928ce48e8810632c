"""The service behind the routes: publishing sessions, viewers, live control, frame conversion.

Routes parse HTTP and call in here; this module wires peers (transport) to sessions (scheduler)
and keeps the per-peer resources (ETag, peer connection, tasks) that WHIP/WHEP address by URL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import av
import torch
from aiortc import MediaStreamTrack, RTCDataChannel, RTCSessionDescription

from livediff.admission import AdmissionError
from livediff.config import PREPROCESSORS, EngineSettings, ServerSettings, StreamParams, nat_1to1_map
from livediff.errors import ConfigError
from livediff.jobs.recording import Recordings
from livediff.models import ModelParts
from livediff.scheduler import Scheduler, StepObservers
from livediff.server.control import Control
from livediff.server.controlnets import follow_loads, tell_states
from livediff.server.errors import NotReady
from livediff.server.metrics import Metrics
from livediff.server.params import ParamError, refusal
from livediff.server.peers import Resource, answer, watch
from livediff.server.quality import QualitySampler
from livediff.server.viewers import Viewers
from livediff.session import FrameIn, FrameOut, Session, params_to_json, watch_rank
from livediff.transport import probe
from livediff.transport.candidates import is_mdns
from livediff.transport.fanout import Fanout
from livediff.transport.frames import array_to_frame, frame_to_tensor, luma
from livediff.transport.ice_servers import IceServerConfig
from livediff.transport.loss_recovery import LossStats
from livediff.transport.loss_recovery import stats_of as loss_stats_of
from livediff.transport.offers import prepare_offer
from livediff.transport.peer import create_peer, negotiated_codec, prefer_codecs
from livediff.transport.sctp_text import tolerate_invalid_text
from livediff.transport.tracks import drain, pump
from livediff.transport.whip import SdpFrag, new_etag

log = logging.getLogger(__name__)


FEATURES = ("probe", "passthrough")
"""Session params beyond the engine's own that the pages may use: probe ids, transport-only runs."""


class Service:
    def __init__(
        self,
        engine_settings: EngineSettings,
        settings: ServerSettings,
        parts: ModelParts | None = None,
        default_params: StreamParams | None = None,
    ) -> None:
        self.engine_settings = engine_settings
        self.default_params = default_params or StreamParams()
        self.settings = settings
        self.parts = parts
        self.ice = IceServerConfig(
            settings.ice_servers,
            settings.turn_username,
            settings.turn_credential,
            settings.turn_secret,
            settings.turn_ttl_s,
        )
        self.nat_1to1 = nat_1to1_map(settings.nat_1to1)
        self.metrics = Metrics(engine=lambda: self.scheduler.engine, steps=lambda: self.scheduler.step_table)
        self.loss_totals = LossStats()
        """Loss recovery on every publisher's video receiver, summed (`/metrics`)."""
        self.metrics.watch_loss(self.loss_totals)
        self.quality = QualitySampler(observe=self.metrics.on_quality)
        self.scheduler = Scheduler(
            settings.max_sessions,
            self._convert_in,
            self._convert_out,
            observer=StepObservers(self.metrics, self.quality),
            pass_through=self._pass_through,
            fresh_frames=settings.fresh_frames,
            max_connecting=settings.max_connecting,
            id_prefix=settings.session_id_prefix,
            batch_by_deadline=_batch_by_deadline(settings, engine_settings),
        )
        self.metrics.sessions.set_function(lambda: len(self.scheduler.sessions))
        self.outputs: dict[str, Fanout] = {}
        self.resources: dict[str, Resource] = {}
        self.viewers = Viewers(
            settings, self.ice, self.nat_1to1, self.metrics, self.resources, self.outputs, self._background
        )
        self.ready = False
        self.load_error: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.recordings: Recordings | None = None
        """Sessions' recordings (`record: true`), set with the job routes (`livediff.server.recordings`)."""

    # -- lifecycle -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Build the engine and run one warm-up inference on the worker thread; then ready."""
        from livediff.engine import StreamEngine
        from livediff.engine.device import resolve_device
        from livediff.engine.video import VideoEngine
        from livediff.models.video import VideoParts, is_video_model

        def make_engine() -> StreamEngine | VideoEngine:
            if resolve_device(self.engine_settings.device).type == "cpu":
                # torch's spinning OpenMP threads starve the codec threads (and each other) when
                # oversubscribed: measured on 2 cores, 2 threads gave 1.3 s stalls, 1 thread none.
                threads = self.settings.cpu_threads or max(1, (os.cpu_count() or 2) - 1)
                torch.set_num_threads(threads)
            # the second kind: a causal video model
            if is_video_model(self.engine_settings.model, self.engine_settings.video_weights):
                return VideoEngine(self.engine_settings, self.parts if isinstance(self.parts, VideoParts) else None)
            return StreamEngine(self.engine_settings, self.parts)

        try:
            await self.scheduler.load(make_engine, measure_steps=True)
        except Exception as exc:  # reported by /readyz and the CLI, never swallowed
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.debug("model load failed: %s", self.load_error)  # the caller says it (once)
            raise
        self.ready = True

    async def close(self) -> None:
        """Close every peer and session (SIGTERM, app shutdown)."""
        for session in list(self.scheduler.sessions.values()):
            await self.close_session(session, "server shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.scheduler.close()
        self.quality.close()

    def describe(self) -> dict[str, Any]:
        """What runs here, for /readyz and the pages' HUDs (only once the engine is built)."""
        engine = self.scheduler.engine
        chunked = self.scheduler.chunked  # a video model: no preprocessors; what it has instead under "video"
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
            "loras": [name for name, _ in self.engine_settings.loras],
            "ip_adapter": self.engine_settings.ip_adapter or None,
            "lcm_lora": self.engine_settings.lcm_lora,
            "preprocessors": [] if chunked else self._preprocessors(),
            **({"video": engine.describe()} if chunked else {}),
            **({"steps": table.describe()} if (table := self.scheduler.step_table) is not None else {}),
            "batch_by_deadline": self.scheduler.batch_by_deadline,
            **({"backend_detail": engine.backend.describe()} if hasattr(engine.backend, "describe") else {}),
        }

    def _preprocessors(self) -> list[str]:
        return [p for p in PREPROCESSORS if p != "depth" or self.engine_settings.depth_model]

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.load_error or "the model is loading")

    def _background(self, coro: Any) -> None:
        """Run `coro` outside any request or session (e.g. closing a session from a peer's event); errors are logged."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def close_session(self, session: Session, cause: str = "ended") -> None:
        """End `session` (idempotent); the first end is logged once, as `session <id> ended: <cause>`
        (the causes: docs/robustness.md)."""
        if not session.closed:
            stats = session.stats
            log.info(
                "session %s ended: %s (%.0f s, %d frames in, %d sent)",
                session.id,
                cause,
                time.time() - session.created,
                stats.frames_in,
                stats.sent,
            )
        await self.scheduler.close_session(session)

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
        def on_sent(out: FrameOut) -> None:
            age = self.metrics.on_sent(out)
            session.stats.sent += 1
            session.stats.last_age_ms = round(age * 1000.0, 3)
            recording = self.recordings.active.get(session.id) if self.recordings is not None else None
            if recording is not None:
                recording.tracks["output"].offer(out.image)
            if session.control is not None:
                session.control.frame_sent(out)

        return on_sent

    def _deliver(self, session: Session) -> Callable[[av.VideoFrame], None]:
        received = self.metrics.frames.labels("received")
        dropped = self.metrics.frames.labels("dropped_in")

        def deliver(frame: av.VideoFrame) -> None:
            session.stats.frames_in += 1
            if session.state == "new":
                session.state = "live"
            received.inc()
            recording = self.recordings.active.get(session.id) if self.recordings is not None else None
            if recording is not None and "input" in recording.tracks:
                recording.tracks["input"].offer(frame)
            before = session.inbox.replaced  # a chunked engine may drop a whole stale chunk on this put
            session.inbox.put(FrameIn(frame, frame.pts, frame.time_base, time.monotonic()))
            if session.inbox.replaced > before:
                dropped.inc(session.inbox.replaced - before)

        return deliver

    # -- publishing ------------------------------------------------------------------------------

    async def publish(
        self, offer: RTCSessionDescription, params: StreamParams, kind: str, probe_on: bool = False
    ) -> tuple[Session, Resource]:
        """Admit a session for a publisher's offer; the answer is `resource.answer`."""
        self.require_ready()
        offer = prepare_offer(offer.sdp, self.settings.video_codecs)
        try:
            session = await self.scheduler.open_session(params, kind=kind, probe=probe_on, connecting=True)
        except ConfigError as exc:  # a param this engine cannot serve (temporal.bank without the feature bank)
            raise refusal(exc) from None
        session.control = Control(
            session,
            self._apply_update,
            self.settings.max_body_bytes,
            lambda: self._control_state(session),
            self._check_params,
        )
        try:
            await follow_loads(self.scheduler, session)  # the ControlNets it names start loading
            session.ensure_open()  # it may have given its slot away meanwhile: then no peer is made
            pc = create_peer(self.ice, self.settings.marker_completion, self.loss_totals)
            session.loss = lambda: loss_stats_of(pc).as_dict()
            session.on_close(pc.close)
            output = Fanout(
                session.outbox,
                self._on_sent(session),
                self.settings.bitrate,
                self.settings.keyframe_interval_s,
                self.metrics.on_receiver_feedback,
            )
            self.outputs[session.id] = output
            session.on_close(self._forget_output(session.id))
            transceiver = pc.addTransceiver("video", direction="sendrecv")
            prefer_codecs(transceiver, self.settings.video_codecs)
            watch(
                pc,
                session,
                lambda cause: self.close_session(session, cause),
                self.settings.connect_timeout_s,
                self._background,
                on_connected=lambda: self.scheduler.connected(session),
            )

            @pc.on("track")
            def on_track(track: MediaStreamTrack) -> None:
                if track.kind == "video":
                    session.spawn(pump(track, self._deliver(session)), "video-in")
                else:  # audio is accepted and dropped (documented); drained so nothing queues
                    session.spawn(drain(track), "audio-drain")

            @pc.on("datachannel")
            def on_datachannel(channel: RTCDataChannel) -> None:
                if channel.label == "control":
                    session.control.attach(channel)
                    tell_states(session)  # aiortc announces a channel the peer opened once it is open

            sdp = await answer(pc, offer, self.nat_1to1)
            session.ensure_open()  # it may have ended while the answer was made
            self.scheduler.answered(session)  # its connect grace starts (livediff.admission)
            if pc.sctp is not None:  # a control message that is not UTF-8 must not end the session
                tolerate_invalid_text(pc.sctp)
            codec = negotiated_codec(transceiver)
            if codec is not None and transceiver.currentDirection in ("sendrecv", "sendonly"):
                output.subscribe(transceiver.sender, codec)  # the output back to the publisher
            log.info(
                "session %s (%s): video %s, %s",
                session.id,
                kind,
                codec.name if codec else None,
                transceiver.currentDirection,
            )
        except BaseException as exc:
            ended = session.closed  # by someone else: a newer offer took its connecting slot, or shutdown
            await self.close_session(session, f"no answer: {type(exc).__name__}: {exc}"[:200])
            if ended:
                raise AdmissionError(
                    "the session ended before its answer was ready (newer offers took "
                    "its connecting slot, an operator ended it, or the server is stopping)",
                    self.settings.max_sessions,
                ) from None
            raise
        resource = Resource(pc=pc, session=session, etag=new_etag(), answer=sdp)
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

    # -- viewers (WHEP) --------------------------------------------------------------------------

    def session_to_watch(self) -> Session | None:
        """The session `POST /whep` watches: the first by `watch_rank` of those with an output (one
        still making its answer has none yet), or None."""
        watchable = [s for s in self.scheduler.sessions.values() if not s.closed and s.id in self.outputs]
        return max(watchable, key=lambda s: watch_rank(s.state, s.created), default=None)

    # -- trickle ---------------------------------------------------------------------------------

    async def trickle(self, resource: Resource, frag: SdpFrag) -> None:
        """Add the fragment's candidates to the resource's peer; `SessionClosed` once its session ended.

        mDNS candidates are skipped and end-of-candidates is not passed on, for the reasons
        `transport.candidates` gives for offers."""
        for candidate in frag.candidates:
            resource.session.ensure_open()
            if is_mdns(candidate.ip):
                continue
            if candidate.sdpMid is None:
                transceivers = resource.pc.getTransceivers()
                candidate.sdpMid = transceivers[0].mid if transceivers else None
            await resource.pc.addIceCandidate(candidate)

    # -- live control (the queue and the data channel: server/control.py) -------------------------

    async def apply_params(self, session: Session, data: dict[str, Any]) -> dict[str, Any]:
        """Apply a PATCH body in turn with the session's data-channel messages; the ack's body."""
        session.ensure_open()
        return await session.control.patch(data)  # type: ignore[no-any-return]

    async def _apply_update(self, session: Session, params: StreamParams, extras: dict[str, Any]) -> dict[str, Any]:
        """Apply checked params (from the next frame on) and session fields; `SessionClosed` once it ended."""
        session.ensure_open()
        self.check_record(extras)
        old = session.params
        try:
            truncated = (
                await self.scheduler.update(session, params)
                if params != session.params
                else self.scheduler.prompt_truncated(session)
            )
        except ConfigError as exc:  # a param this engine cannot serve: the session keeps its params
            raise refusal(exc) from None
        session.ensure_open()  # it may have ended while the update waited for the worker
        if params.controlnet != old.controlnet:
            await follow_loads(self.scheduler, session)
        if "probe" in extras:
            session.probe = extras["probe"]
        if extras.get("reset"):
            try:
                await self.scheduler.reset(session)
            except ConfigError as exc:
                raise ParamError("reset", str(exc)) from None
        await self.record(session, extras, old)
        return self._control_state(session, truncated)

    # -- recording (livediff.jobs.recording) -----------------------------------------------------

    def check_record(self, extras: dict[str, Any]) -> None:
        """`ParamError` naming `record` when it asks for a recording and this server keeps none."""
        if (extras.get("record") or extras.get("record_input")) and self.recordings is None:
            raise ParamError("record", "this server has no recording storage (it serves no jobs)")

    async def record(self, session: Session, extras: dict[str, Any], old: StreamParams | None = None) -> None:
        """Note the change since `old` in the session's recording; start one (`record: true`, with its input
        on `record_input: true`) or end it (`record: false`)."""
        recordings = self.recordings
        if recordings is None:
            return
        recording = recordings.active.get(session.id)
        if recording is not None and old is not None:
            new_json, old_json = params_to_json(session.params), params_to_json(old)
            changes: dict[str, Any] = {k: v for k, v in new_json.items() if old_json.get(k) != v}
            changes.update({k: v for k, v in extras.items() if k in ("probe", "reset")})
            if changes:
                recording.note(changes)
        if extras.get("record") and recording is None:
            session.ensure_open()  # a session that ended meanwhile is not recorded (its close would not stop it)
            recordings.start(session.id, params_to_json(session.params), bool(extras.get("record_input")))

            async def stop() -> None:
                await asyncio.to_thread(recordings.stop, session.id)

            session.on_close(stop)
        elif extras.get("record") is False and recording is not None:
            await asyncio.to_thread(recordings.stop, session.id)

    def _recording_id(self, session: Session) -> str | None:
        recording = self.recordings.active.get(session.id) if self.recordings is not None else None
        return recording.id if recording is not None else None

    def _check_params(self, params: StreamParams, current: StreamParams) -> None:
        """`ParamError` naming the field when the engine cannot serve `params` (see `Control.check`)."""
        try:
            self.scheduler.engine.check_params(params, current)
        except ConfigError as exc:
            raise refusal(exc) from None

    def _control_state(self, session: Session, truncated: bool = False) -> dict[str, Any]:
        warnings = []
        if truncated:
            limit = self.scheduler.engine.parts.tokenizer.model_max_length
            warnings.append(f"prompt truncated to the tokenizer's limit of {limit} tokens")
        return {
            "session_id": session.id,
            "params": params_to_json(session.params),
            "probe": session.probe,
            "recording": self._recording_id(session),
            "controlnet_state": dict(session.controlnet_state),
            "warnings": warnings,
        }


def _batch_by_deadline(settings: ServerSettings, engine_settings: EngineSettings) -> bool:
    """`ServerSettings.batch_by_deadline`, its default (None) decided by the engine's device: on CUDA."""
    if settings.batch_by_deadline is not None:
        return settings.batch_by_deadline
    from livediff.engine.device import resolve_device

    return resolve_device(engine_settings.device).type == "cuda"
