"""PUT /api/sessions/{id}/image-prompt: upload the image a session's image prompt (IP-Adapter) looks at.

The body is the image itself (`Content-Type: image/jpeg`, `image/png` or `image/webp`), at most
`MAX_IMAGE_BYTES`; `?scale=S` sets the scale too (else the session's, or 1). It is decoded with
Pillow off the event loop, after its header's size was checked against `MAX_IMAGE_PIXELS` (a small
file that would decode into gigabytes, a "decompression bomb", is refused before it is decoded),
kept for the session, and the session's params become `image_prompt: {"image": "upload", "scale"}`
through the same live-control queue as a PATCH, so the image encoder runs once, on the engine's
thread, and the next frame uses the new image. The answer is the PATCH's: the session's params.

Errors (JSON naming the field; the session and its params go on): 413 `image_prompt.image` for a
body or a picture too large, 415 `image_prompt.image` for a body that is not a JPEG, PNG or WebP
image, 422 `image_prompt` on a server started without `--ip-adapter`, 422 `image_prompt.scale`.
"""

from __future__ import annotations

import asyncio
import io
import warnings

import numpy as np
import torch
from aiohttp import web

from livediff.config import ImagePromptParams
from livediff.errors import ConfigError
from livediff.server.common import find_session, service
from livediff.server.errors import ApiError

MAX_IMAGE_BYTES = 8 * 1024 * 1024
"""Largest upload: a 4096x4096 JPEG at high quality fits."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest picture decoded, by its header's width x height (the image encoder sees 224x224 anyway)."""
TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
"""The content types taken and Pillow's format for each."""
FIELD = "image_prompt.image"


def decode_image(data: bytes) -> torch.Tensor:
    """(H, W, 3) uint8 RGB of a JPEG, PNG or WebP file. `ApiError` naming `image_prompt.image`: 415
    not such an image (or a broken one), 413 more than `MAX_IMAGE_PIXELS` pixels (checked on the
    header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data), formats=list(TYPES.values()))
            width, height = picture.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ApiError(413, f"{FIELD}: {width}x{height} is more than {MAX_IMAGE_PIXELS} pixels "
                               "(a decompression bomb, or a picture too large)", FIELD)  # fmt: skip
            rgb = picture.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise ApiError(415, f"{FIELD}: the body is not a JPEG, PNG or WebP image", FIELD) from None
        raise ApiError(413, f"{FIELD}: a decompression bomb ({exc})", FIELD) from None
    except (OSError, SyntaxError, ValueError) as exc:  # a truncated or corrupt file of a known format
        raise ApiError(415, f"{FIELD}: the image could not be decoded ({exc})", FIELD) from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())


async def read_image(request: web.Request) -> bytes:
    """The body, at most `MAX_IMAGE_BYTES` (413 naming the field beyond), of a content type in `TYPES` (415)."""
    if request.content_type not in TYPES:
        raise ApiError(415, f"{FIELD}: Content-Type must be {', '.join(TYPES)}, got {request.content_type!r}", FIELD)
    too_large = ApiError(413, f"{FIELD}: the image is larger than {MAX_IMAGE_BYTES} bytes", FIELD)
    if request.content_length is not None and request.content_length > MAX_IMAGE_BYTES:
        raise too_large
    body = await request.content.read(MAX_IMAGE_BYTES + 1)
    while len(body) <= MAX_IMAGE_BYTES:
        more = await request.content.read(MAX_IMAGE_BYTES + 1 - len(body))
        if not more:
            break
        body += more
    if len(body) > MAX_IMAGE_BYTES:
        raise too_large
    return body


def _scale(request: web.Request) -> float | None:
    text = request.query.get("scale")
    if text is None:
        return None
    try:
        scale = float(text)
    except ValueError:
        raise ApiError(422, f"image_prompt.scale: {text!r} is not a number", "image_prompt.scale") from None
    try:
        ImagePromptParams("upload", scale)
    except ConfigError as exc:
        raise ApiError(422, str(exc), "image_prompt.scale") from None
    return scale


async def put_image_prompt(request: web.Request) -> web.Response:
    session = find_session(request)
    svc = service(request)
    engine = svc.scheduler.engine
    if getattr(engine, "image_feature", None) is None:
        raise ApiError(422, "image_prompt needs a server started with an IP-Adapter (--ip-adapter SOURCE)",
                       "image_prompt")  # fmt: skip
    scale = _scale(request)
    data = await read_image(request)
    image = await asyncio.get_running_loop().run_in_executor(None, decode_image, data)
    session = find_session(request)  # again: a session that ended while the body arrived is a 404
    await svc.scheduler.run_on_worker(engine.set_uploaded_image, session.stream, image)
    update: dict[str, object] = {"image": "upload"}
    if scale is not None:
        update["scale"] = scale
    return web.json_response(await svc.apply_params(session, {"image_prompt": update}))


def add_routes(app: web.Application) -> None:
    app.router.add_put("/api/sessions/{id}/image-prompt", put_image_prompt)
