"""A session's ControlNets as the client sees them: when one it named is ready, and its control image.

- A ControlNet (or the depth estimator) loads the first time a session names it, off the frame
  path (`livediff.engine.control.ControlModels`); until then the session's frames run without it.
  `follow_loads` keeps `Session.controlnet_state` (`{"edges": "loading", "depth model": "ready"}`,
  in the answer to a param change and in `GET /api/sessions/{id}`) and tells the session's
  `control` data channel when a load it waits for is done: `{"type": "controlnet", "name":
  "edges", "state": "ready"}` (`"failed"` with `"error"`).
- `preview_jpeg` makes the session's latest control image (its first ControlNet's) into a small
  JPEG, at most `PREVIEW_SIDE` pixels a side, for `GET /api/sessions/{id}/control.jpg` (204 while
  there is none): what the demo page shows beside the video.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

import cv2
import torch

from livediff.engine.control import Key, load_state
from livediff.scheduler import Scheduler
from livediff.session import Session

PREVIEW_SIDE = 160
"""Longest side of the control-image preview, in pixels."""


def label(key: Key) -> str:
    """How the client sees a load: the ControlNet's name, or `depth model` for the depth estimator."""
    kind, name = key
    return name if kind == "controlnet" else f"{name} model"


async def follow_loads(scheduler: Scheduler, session: Session) -> None:
    """Set `session.controlnet_state` for the session's params and tell its client when each load
    they started finishes (for as long as the session lives). Call after the params changed."""
    params = session.params
    loads = await scheduler.run_on_worker(scheduler.engine.control_loads, params)
    followed = {name for name, state in session.controlnet_state.items() if state == "loading"}
    state = {control.name: "ready" for control in params.controlnet}
    if any(control.preprocessor == "depth" for control in params.controlnet):
        state["depth model"] = "ready"
    # Each load read once, now: not when the worker answered (it may have finished or failed
    # since), and never twice (the loader thread may finish it between two reads).
    now = {key: load_state(future) for key, future in loads.items()}
    state.update((label(key), load) for key, load in now.items())
    session.controlnet_state = state
    for key, future in loads.items():
        name = label(key)
        if now[key] == "loading" and name not in followed:  # one announcement per load, however often params change
            session.spawn(_announce(session, name, future), f"controlnet-{name}")


async def _announce(session: Session, name: str, future: Future[Any]) -> None:
    message: dict[str, Any] = {"type": "controlnet", "name": name, "state": "ready"}
    try:
        # shielded: the session ending cancels this task, never the load other sessions may wait for
        await asyncio.shield(asyncio.wrap_future(future))
    except Exception as exc:  # noqa: BLE001 - the load's own error, told to the client
        message.update(state="failed", error=str(exc))
    if name not in session.controlnet_state:  # no longer one of the session's: nothing to tell
        return
    session.controlnet_state[name] = message["state"]
    if session.control is not None:  # a channel opened later hears it from `tell_states`
        session.control.tell(message)


def tell_states(session: Session) -> None:
    """On a new control channel: the loads of the session's that are done (those still loading are
    told when they are)."""
    for name, state in session.controlnet_state.items():
        if state != "loading":
            session.control.tell({"type": "controlnet", "name": name, "state": state})


def preview_jpeg(image: torch.Tensor, side: int = PREVIEW_SIDE) -> bytes:
    """(3, H, W) control image in [0, 1] (any device, any float dtype) -> JPEG bytes, longest side `side`."""
    pixels = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    height, width = pixels.shape[:2]
    scale = side / max(height, width)
    if scale < 1:
        pixels = cv2.resize(pixels, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("OpenCV could not encode the control image")
    return bytes(data)
