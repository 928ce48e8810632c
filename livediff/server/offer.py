"""POST /offer: the demo page's JSON signalling, `{sdp, type, params?}` -> `{sdp, type, session_id}`."""

from __future__ import annotations

from aiohttp import web
from aiortc import RTCSessionDescription

from livediff.server.common import GONE, client_gone, read_json, service
from livediff.server.errors import ApiError
from livediff.server.params import parse_update


async def post_offer(request: web.Request) -> web.Response:
    svc = service(request)
    data = await read_json(request)
    sdp, kind = data.get("sdp"), data.get("type")
    if not isinstance(sdp, str):
        raise ApiError(400, "sdp must be a string", "sdp")
    if kind != "offer":
        raise ApiError(400, 'type must be "offer"', "type")
    params, extras = parse_update(svc.default_params, data.get("params") or {})
    svc.check_record(extras)
    session, resource = await svc.publish(
        RTCSessionDescription(sdp=sdp, type="offer"), params, "offer", probe_on=extras.get("probe", False)
    )
    await svc.record(session, extras)
    if client_gone(request):  # nobody will apply the answer: end it now, not at the connect deadline
        await svc.close_session(session, f"POST /offer: {GONE}")
    return web.json_response({"sdp": resource.answer, "type": "answer", "session_id": session.id})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/offer", post_offer)
