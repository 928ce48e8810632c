"""Recording live sessions: a session's output (and, when asked, its input) as H.264 MP4 with a JSON timeline of
every param change, kept as a resource beside the jobs in the same storage (`<storage>/rec_<id>/`).

The frame path never waits for a recording: `Track.offer` runs on the event loop and only puts the frame
in a bounded queue (`QUEUE_FRAMES`); a thread per track converts and encodes. A frame that finds the queue
full is dropped from the recording and counted (`Recording.dropped`, `livediff_recording_frames_dropped`).
Timestamps are the times frames were offered (milliseconds since the recording began), so a recording
plays at the pace the session ran, drops and all.

A recording ends when its session ends or `record: false` comes: the encoders are flushed, the MP4s
finished (moov written) under a `.part` name and renamed into place, and the record (`recording.json`)
says `complete` (or `failed` with the reason). A finished recording is deleted by `DELETE
/api/recordings/{id}` or, past `--jobs-retention`, by the jobs' sweep (`Recordings.sweep`). Each state
(`recording`, `complete`, `failed`, `deleted`) is handed to `Recordings.on_change` (the server makes it a
signed webhook to `--recordings-callback-url`, as a job's).

A record names the process that records (`owner`: host, pid and the pid's start time, so that a reused pid
is not taken for it). A server that dies while recording leaves its MP4s unfinished (`.part`, no index: no
player opens them) and its record saying `recording`; the next server on the same host and storage
(`Recordings.recover`, at start) marks such a record `failed`, with the dead owner in the reason, ended at
the part files' last write, drops the part files, and announces it like any other end; retention then
sweeps it as any failed recording.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from prometheus_client import Counter
from prometheus_client.registry import CollectorRegistry

from livediff.jobs.storage import LocalStorage

log = logging.getLogger(__name__)

QUEUE_FRAMES = 32
"""Frames waiting for a track's encoder; past this they are dropped from the recording (about 1 s at 30 fps)."""
TIME_BASE = Fraction(1, 1000)
STREAMS = ("output", "input")


def new_recording_id() -> str:
    return "rec_" + uuid.uuid4().hex


def process_start(pid: int) -> str | None:
    """An identity of the running process `pid` on this host: its start time in clock ticks since boot
    (`/proc/<pid>/stat`, field 22, proc(5)), "" where /proc is missing but the pid is alive (then a reused pid
    is not told apart), None when no such process runs."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text[text.rindex(")") + 2 :].split()[19]  # the fields after the command name start at 3
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def this_owner() -> dict[str, Any]:
    """The `owner` a record written by this process carries."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid())}


def owner_gone(owner: dict[str, Any] | None) -> bool:
    """Whether the process that wrote a `recording` record is known to be gone: it ran on this host and
    no process with its pid and start time runs now. A record of another host is never judged here (its
    host may still record it); a record with no owner (written before records named one) counts as gone."""
    if not owner:
        return True
    if owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return True
    running = process_start(pid)
    return running is None or (bool(running) and running != owner.get("pid_start"))


class Track:
    """One stream of a recording, encoded to `path` (H.264, yuv420p, CRF 23) on its own thread.

    The size is the first frame's; later frames of another size are scaled to it (an input whose
    camera changed resolution)."""

    def __init__(self, path: Path, name: str, on_drop: Any = None) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.name = name
        self.frames = 0
        self.dropped = 0
        self.size: tuple[int, int] | None = None
        self.error: str | None = None
        self._on_drop = on_drop
        self._queue: queue.Queue[tuple[av.VideoFrame, float] | None] = queue.Queue(QUEUE_FRAMES)
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"livediff-record-{name}", daemon=True)
        self._thread.start()

    def offer(self, frame: av.VideoFrame) -> None:
        """Hand `frame` to the encoder without waiting; dropped (and counted) when the queue is full."""
        try:
            self._queue.put_nowait((frame, time.monotonic()))
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()

    def finish(self) -> None:
        """Encode what is queued, flush, write the index and rename into place (blocks: call off the loop)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        container = None
        stream: Any = None
        last_pts = -1
        try:
            while (item := self._queue.get()) is not None:
                frame, at = item
                if container is None:
                    self.size = (frame.width - frame.width % 2, frame.height - frame.height % 2)
                    container = av.open(str(self.part), "w", format="mp4")
                    stream = container.add_stream("libx264", rate=30)
                    stream.width, stream.height = self.size
                    stream.pix_fmt = "yuv420p"
                    stream.time_base = TIME_BASE
                    stream.codec_context.time_base = TIME_BASE
                    stream.options = {"crf": "23", "preset": "veryfast"}
                    self._start = at
                width, height = self.size  # type: ignore[misc]
                image = frame.reformat(width=width, height=height, format="yuv420p")
                if image is frame:  # the session's own frame: never changed here (its pts is the session's)
                    image = av.VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
                last_pts = max(last_pts + 1, round((at - self._start) * 1000))
                image.pts = last_pts
                image.time_base = TIME_BASE
                for packet in stream.encode(image):
                    container.mux(packet)
                self.frames += 1
            if container is not None:
                for packet in stream.encode(None):
                    container.mux(packet)
                container.close()
                container = None
                os.replace(self.part, self.path)
        except Exception as exc:  # noqa: BLE001 - reported in the recording's record, never raised on the loop
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("recording %s: %s", self.path, self.error)
            if container is not None:
                try:
                    container.close()
                except Exception:  # noqa: BLE001
                    pass
            self.part.unlink(missing_ok=True)
            while self._queue.get() is not None:  # keep taking frames so offer/finish never block
                pass


@dataclass
class Recording:
    """One session's recording: its tracks, its timeline and its record (`describe`)."""

    id: str
    session_id: str
    folder: Path
    started_at: float = field(default_factory=time.time)
    state: str = "recording"
    ended_at: float | None = None
    error: str | None = None
    tracks: dict[str, Track] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    owner: dict[str, Any] = field(default_factory=this_owner)
    """The recording process (`this_owner`): how the next server tells a recording whose server died."""
    _start: float = field(default_factory=time.monotonic)

    def note(self, changes: dict[str, Any]) -> None:
        """A param change at this moment (`t`: seconds since the recording began)."""
        self.timeline.append({"t": round(time.monotonic() - self._start, 3), "at": time.time(), "changes": changes})

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session_id": self.session_id,
            "state": self.state,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "error": self.error,
            "streams": {name: self._stream(name, track) for name, track in self.tracks.items()},
            "timeline": self.timeline,
            "owner": self.owner,
        }

    def _stream(self, name: str, track: Track) -> dict[str, Any]:
        query = "" if name == "output" else f"?stream={name}"
        return {
            "frames": track.frames,
            "dropped": track.dropped,
            "size": list(track.size) if track.size else None,
            "result_url": f"/api/recordings/{self.id}/result{query}",
        }

    def save(self) -> None:
        part = self.folder / "recording.json.part"
        part.write_text(json.dumps(self.describe()))
        os.replace(part, self.folder / "recording.json")


class RecordingActive(Exception):
    """A recording still recording cannot be deleted (answered 409: end it with `record: false`)."""

    def __init__(self, rec_id: str) -> None:
        super().__init__(f"recording {rec_id} is still recording: end it first (record: false, or end the session)")


class Recordings:
    """The recordings of one server: those running (by session id) and those stored in `storage`."""

    def __init__(self, storage: LocalStorage, registry: CollectorRegistry | None = None) -> None:
        self.storage = storage
        self.active: dict[str, Recording] = {}
        self.on_change: Callable[[dict[str, Any]], None] | None = None
        """Called with a recording's record after each change of its state (from any thread: it must not block)."""
        self.webhooks: Callable[[str], list[dict[str, Any]] | None] | None = None
        """A recording's webhook events and attempts, or None when none are sent (blocks: call off the loop)."""
        self.claim: Callable[[str], bool] | None = None
        """Whether this server deletes a recording (`JobStore.claim_deletion`: the first caller wins), so that
        replicas sweeping one storage delete and announce each recording once; None: always (blocks)."""
        registry = registry or CollectorRegistry()
        self.frames_dropped = Counter("livediff_recording_frames_dropped", "Frames dropped from recordings "
                                      "(the encoder's queue was full)", ["stream"], registry=registry)  # fmt: skip
        self.started = Counter("livediff_recordings_started", "Recordings started", registry=registry)

    def start(self, session_id: str, params: dict[str, Any], with_input: bool) -> Recording:
        """Begin recording the session (its output; its input too with `with_input`); the running one if any."""
        running = self.active.get(session_id)
        if running is not None:
            return running
        rec_id = new_recording_id()
        folder = self.storage.folder(rec_id)
        folder.mkdir(parents=True, exist_ok=True)
        recording = Recording(rec_id, session_id, folder)
        for name in STREAMS if with_input else STREAMS[:1]:
            counter = self.frames_dropped.labels(name)
            recording.tracks[name] = Track(folder / f"{name}.mp4", name, counter.inc)
        recording.note({"params": params})
        recording.save()
        self.active[session_id] = recording
        self.started.inc()
        self._changed(recording.describe())
        return recording

    def _changed(self, record: dict[str, Any]) -> None:
        if self.on_change is not None:
            try:
                self.on_change(record)
            except Exception:  # noqa: BLE001 - a notification, never a reason to fail the recording
                log.warning("recording %s: state change not handed on", record["id"], exc_info=True)

    def stop(self, session_id: str) -> Recording | None:
        """End the session's recording, if any: finish the files and the record (blocks: call off the loop)."""
        recording = self.active.pop(session_id, None)
        if recording is None:
            return None
        for track in recording.tracks.values():
            track.finish()
        errors = [f"{t.name}: {t.error}" for t in recording.tracks.values() if t.error]
        recording.state = "failed" if errors else "complete"
        recording.error = "; ".join(errors) or None
        recording.ended_at = time.time()
        recording.save()
        try:  # S3 storage: put the files in the bucket (local storage: they already are where they are kept)
            for name in [f"{n}.mp4" for n, t in recording.tracks.items() if t.frames and not t.error]:
                self.storage.store(recording.id, name)
            self.storage.store(recording.id, "recording.json")
        except Exception as exc:  # noqa: BLE001 - the files stay in the working copy; the record says why
            log.warning("recording %s: storing failed: %s", recording.id, exc)
            recording.state, recording.error = "failed", f"storing failed: {type(exc).__name__}: {exc}"
            recording.save()
        self._changed(recording.describe())
        return recording

    def recover(self, now: float | None = None) -> list[str]:
        """At start: recordings left `recording` by a server that died (`owner_gone`) become `failed`, with the
        reason, ended at their part files' last write (else `now`), their part files removed and the change
        announced (`on_change`) -> their ids. Blocks: call off the event loop."""
        now = time.time() if now is None else now
        active = {r.id for r in self.active.values()}
        recovered = []
        for rec_id in sorted(self.storage.ids("rec_")):
            if rec_id in active:
                continue
            record = self.get(rec_id)
            if record is None or record.get("state") != "recording" or not owner_gone(record.get("owner")):
                continue
            folder = self.storage.folder(rec_id)
            parts = [p for p in folder.glob("*.part") if p.is_file()]
            ended = max((p.stat().st_mtime for p in parts), default=now)
            owner = record.get("owner") or {}
            who = f"pid {owner['pid']} on {owner.get('host')}" if "pid" in owner else "an earlier server"
            record.update(state="failed", ended_at=min(ended, now), error=f"the server recording it ({who}) ended "
                          "without finishing the recording: its MP4s have no index and were removed")  # fmt: skip
            for stream in record.get("streams", {}).values():
                stream["frames"] = 0  # nothing of them is kept
            for part in parts:
                part.unlink(missing_ok=True)
            path = folder / "recording.json.part"
            path.write_text(json.dumps(record))
            os.replace(path, folder / "recording.json")
            try:
                self.storage.store(rec_id, "recording.json")
            except Exception as exc:  # noqa: BLE001 - the record stays in the working copy
                log.warning("recording %s: storing its failed record failed: %s", rec_id, exc)
            log.warning("recording %s: %s", rec_id, record["error"])
            self._changed(record)
            recovered.append(rec_id)
        return recovered

    def delete(self, rec_id: str) -> dict[str, Any] | None:
        """Delete a finished recording, its files and record (from the bucket too) -> its record as it was, None
        when there is none. `RecordingActive` while it records. Blocks: call off the event loop."""
        if any(r.id == rec_id for r in self.active.values()):
            raise RecordingActive(rec_id)
        record = self.get(rec_id)
        if record is None:
            return None
        if record["state"] == "recording":  # its server died while recording, or another replica records it
            raise RecordingActive(rec_id)
        if self.claim is not None and not self.claim(rec_id):
            return None  # another replica (or an earlier call) deletes it and announces it
        self.storage.remove(rec_id)
        self._changed({**record, "state": "deleted", "deleted_at": time.time()})
        return record

    def sweep(self, before: float) -> list[str]:
        """Retention: delete the finished recordings that ended before `before` (Unix seconds) -> their ids.
        Blocks: call off the event loop."""
        removed = []
        for rec_id in sorted(self.storage.ids("rec_")):
            record = self.get(rec_id)
            if record is None or record["state"] not in ("complete", "failed"):
                continue
            if (record.get("ended_at") or record["started_at"]) < before:
                try:
                    if self.delete(rec_id) is not None:
                        removed.append(rec_id)
                except RecordingActive:
                    pass
        return removed

    def get(self, rec_id: str) -> dict[str, Any] | None:
        """A recording's record (a running one as it is now), or None."""
        for recording in self.active.values():
            if recording.id == rec_id:
                return recording.describe()
        try:
            self.storage.folder(rec_id)
        except ValueError:
            return None
        path = self.storage.fetch(rec_id, "recording.json") if rec_id.startswith("rec_") else None
        if path is None:
            return None
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    def list(self) -> list[dict[str, Any]]:
        """Every recording's record, newest first."""
        found = []
        for rec_id in self.storage.ids("rec_"):  # with S3 storage: the bucket's too
            record = self.get(rec_id)
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda r: r["started_at"], reverse=True)

    def result_path(self, rec_id: str, stream: str) -> Path | None:
        """The MP4 of `stream` on this machine's disk (brought back from S3 storage), or None. Blocks."""
        return self.storage.fetch(rec_id, f"{stream}.mp4")
