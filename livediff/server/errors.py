"""JSON errors: every 4xx/5xx answer has a body `{"error": ..., "field"?: ...}`, plus what the
error names: an offer's SDP line (`"line"`), the codecs offered and accepted.

The middleware turns aiohttp's own HTTP errors (404, 405, 413 ...) into that shape and any
unexpected exception into a JSON 500 for that request only: nothing else stops.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from livediff.scheduler import AdmissionError
from livediff.server.params import ParamError
from livediff.session import SessionClosed
from livediff.transport.offers import UnsupportedCodecs
from livediff.transport.whip import SdpError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class NotReady(Exception):
    """The model is still loading (or failed to load): 503 with Retry-After."""


class ApiError(Exception):
    """Raise in a handler to answer `status` with a JSON error body."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def json_error(
    status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None, **details: Any
) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    body.update({k: v for k, v in details.items() if v is not None})
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=dict(headers or {})
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_error(exc.status, exc.message, exc.field, exc.headers)
    except NotReady as exc:
        return json_error(503, f"not ready: {exc}", headers={"Retry-After": "5"})
    except AdmissionError as exc:
        return json_error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
    except UnsupportedCodecs as exc:
        return json_error(422, str(exc), kind=exc.kind, offered=exc.offered, accepted=exc.accepted)
    except SessionClosed as exc:  # it ended while the request waited (its body, an answer, an update)
        return json_error(404, str(exc))
    except SdpError as exc:
        return json_error(400, f"malformed SDP: {exc}", line=exc.line)
    except ParamError as exc:
        return json_error(422, exc.message, exc.field)
    except ConnectionResetError as exc:  # the client reset or closed its connection mid-request: not our error
        log.info("%s %s: the client went away (%s)", request.method, request.path, exc)
        return json_error(400, "the client went away")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return json_error(
            exc.status,
            exc.reason if exc.text is None or exc.text.startswith(str(exc.status)) else exc.text,
            headers=headers,
        )
    except Exception:  # a bug in one request must not take the server down: log it, answer 500
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal server error")
