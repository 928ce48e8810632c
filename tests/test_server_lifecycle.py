"""Every way a session ends leaves nothing of it reachable: checked through `weakref` after `gc`."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from livediff.session import Session
from tests.server_fixtures import (
    CameraTrack,
    Client,
    Running,
    metric_value,
    new_peer,
    offer_client,
    running_server,
    strip_candidates,
    whep_view,
    whip_publish,
)

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(240)]


def referrer_chain(target: object, max_depth: int = 10) -> str:
    """A shortest path of referrers from a long-lived object to `target`: what keeps it alive."""
    seen = {id(target)}
    paths: list[list[object]] = [[target]]
    for _ in range(max_depth):
        next_paths = []
        for path in paths:
            for referrer in gc.get_referrers(path[-1]):
                if id(referrer) in seen or type(referrer).__name__ in ("frame", "cell_iterator") or referrer is paths:
                    continue
                seen.add(id(referrer))
                new_path = [*path, referrer]
                if isinstance(referrer, type(gc)) or type(referrer).__name__ in ("Service", "MediaRelay", "Task"):
                    return " <- ".join(type(o).__qualname__ for o in new_path)
                next_paths.append(new_path)
        paths = next_paths[:2000]
    return f"no long-lived referrer found within {max_depth} steps"


async def wait_unreachable(refs: dict[str, weakref.ref[Session]], timeout: float = 15.0) -> list[str]:
    """The names whose Session is still alive after `timeout` of collecting."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        alive = [name for name, ref in refs.items() if ref() is not None]
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.2)


async def post_abandoned(http: aiohttp.ClientSession, url: str, path: str = "/whip") -> str:
    """An offer whose answer is never applied: the server's peer never connects. Returns the Location."""
    pc = new_peer()
    pc.addTransceiver(CameraTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(
        url + path, data=strip_candidates(pc.localDescription.sdp), headers={"Content-Type": "application/sdp"}
    ) as response:
        assert response.status == 201, await response.text()
        location = response.headers["Location"]
    await pc.close()
    return location


async def delete(http: aiohttp.ClientSession, url: str, location: str) -> None:
    async with http.delete(url + location) as response:
        assert response.status == 200, await response.text()


Keep = Callable[[str], None]
Ending = Callable[[aiohttp.ClientSession, Running, Keep], Awaitable[list[Client]]]
"""Starts a session, hands its id to `keep`, ends it one way; returns the clients to close afterwards."""


async def never_connected_reaped(http: aiohttp.ClientSession, server: Running, keep: Keep) -> list[Client]:
    keep((await post_abandoned(http, server.url)).rsplit("/", 1)[-1])
    return []  # the connect watchdog ends it


async def never_connected_deleted(http: aiohttp.ClientSession, server: Running, keep: Keep) -> list[Client]:
    location = await post_abandoned(http, server.url)
    keep(location.rsplit("/", 1)[-1])
    await delete(http, server.url, location)
    return []


async def sendrecv_peer_vanishes(http: aiohttp.ClientSession, server: Running, keep: Keep) -> list[Client]:
    client = await offer_client(http, server.url, CameraTrack(fps=30))
    keep(client.session_id)
    await client.wait_connected()
    await client.received.wait_for(3)  # type: ignore[union-attr]
    await client.close()  # the server learns it from the peer (DTLS close), nothing else
    return []


async def sendonly_no_viewer_deleted(http: aiohttp.ClientSession, server: Running, keep: Keep) -> list[Client]:
    client = await whip_publish(http, server.url, CameraTrack(fps=30))
    keep(client.session_id)
    await client.wait_connected()
    await asyncio.sleep(0.5)  # frames flow into a session nobody watches
    await delete(http, server.url, client.location)
    return [client]


async def sendonly_with_viewer_deleted(http: aiohttp.ClientSession, server: Running, keep: Keep) -> list[Client]:
    client = await whip_publish(http, server.url, CameraTrack(fps=30))
    keep(client.session_id)
    await client.wait_connected()
    viewer = await whep_view(http, server.url, client.session_id)
    await viewer.wait_connected()
    await viewer.received.wait_for(3)  # type: ignore[union-attr]
    await delete(http, server.url, client.location)
    return [client, viewer]


async def viewer_never_connected_deleted(http: aiohttp.ClientSession, server: Running, keep: Keep) -> list[Client]:
    client = await whip_publish(http, server.url, CameraTrack(fps=30))
    keep(client.session_id)
    await client.wait_connected()
    await post_abandoned_viewer(http, server.url, client.session_id)
    await delete(http, server.url, client.location)
    return [client]


async def demo_with_viewer_ended_by_operator(http: aiohttp.ClientSession, server: Running, keep: Keep) -> list[Client]:
    """The demo page (control channel, probe ids, sampled quality) with a WHEP viewer, ended by
    `DELETE /api/sessions/{id}`."""
    client = await offer_client(http, server.url, CameraTrack(fps=30, paint_probe=True), params={"probe": True})
    keep(client.session_id)
    await client.wait_connected()
    viewer = await whep_view(http, server.url, client.session_id)
    await viewer.wait_connected()
    await viewer.received.wait_for(3)  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while not [m for m in client.messages if m.get("type") == "stats" and m.get("quality")]:
        assert time.monotonic() < deadline, "no stats message with a quality sample"
        await asyncio.sleep(0.1)
    async with http.delete(f"{server.url}/api/sessions/{client.session_id}") as response:
        assert response.status == 200, await response.text()
    return [client, viewer]


async def post_abandoned_viewer(http: aiohttp.ClientSession, url: str, session_id: str) -> str:
    pc = new_peer()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(
        f"{url}/whep/{session_id}", data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
    ) as response:
        assert response.status == 201, await response.text()
        location = response.headers["Location"]
    await pc.close()
    return location


ENDINGS: dict[str, Ending] = {
    "never connected, reaped": never_connected_reaped,
    "never connected, DELETE": never_connected_deleted,
    "sendrecv, peer vanished": sendrecv_peer_vanishes,
    "send-only without viewers, DELETE": sendonly_no_viewer_deleted,
    "send-only with a viewer, DELETE": sendonly_with_viewer_deleted,
    "send-only with a viewer that never connected, DELETE": viewer_never_connected_deleted,
    "demo page with a viewer, DELETE /api/sessions": demo_with_viewer_ended_by_operator,
}


async def test_every_closed_session_becomes_unreachable(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    # 3 s to connect: short, so the abandoned offer is reaped while the others run, yet long enough
    # for the sessions that do connect (ICE and DTLS) on a loaded machine
    async with running_server(tiny_parts, size=64, max_sessions=8, connect_timeout_s=3.0) as server:
        sessions = server.service.scheduler.sessions
        refs: dict[str, weakref.ref[Session]] = {}
        clients: list[Client] = []
        for name, end in ENDINGS.items():

            def keep(session_id: str, name: str = name) -> None:
                refs[name] = weakref.ref(sessions[session_id])

            clients += await end(http, server, keep)
        deadline = time.monotonic() + 20
        while sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not sessions, [s.describe() for s in sessions.values()]
        for client in clients:
            await client.close()
        alive = await wait_unreachable(refs)
        details = {name: referrer_chain(refs[name]()) for name in alive}
        assert not alive, f"{len(alive)} of {len(refs)} closed sessions still reachable: {details}"
        assert not server.service.resources


async def test_sessions_closed_by_shutdown_become_unreachable(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    refs: dict[str, weakref.ref[Session]] = {}
    clients: list[Client] = []
    async with running_server(tiny_parts, size=64, max_sessions=8) as server:
        publisher = await whip_publish(http, server.url, CameraTrack(fps=30))
        await publisher.wait_connected()
        abandoned = await post_abandoned(http, server.url)
        demo = await offer_client(http, server.url, CameraTrack(fps=30))
        await demo.wait_connected()
        clients += [publisher, demo]
        for session_id in (publisher.session_id, abandoned.rsplit("/", 1)[-1], demo.session_id):
            refs[session_id] = weakref.ref(server.service.scheduler.sessions[session_id])
    for client in clients:
        await client.close()
    alive = await wait_unreachable(refs)
    assert not alive, {name: referrer_chain(refs[name]()) for name in alive}


# -- requests that race a session's end -------------------------------------------------------------


class HeldRequest:
    """A request sent over a raw socket whose body stops halfway: the handler waits for the rest."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: bytes) -> None:
        self.reader, self.writer, self.rest = reader, writer, rest

    @classmethod
    async def start(
        cls, url: str, method: str, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> HeldRequest:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {host}:{port}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        half = len(body) // 2
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body[:half])
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler has looked the session up and waits for the body
        return cls(reader, writer, body[half:])

    async def finish(self) -> tuple[int, dict[str, object]]:
        """Send the rest of the body; the status and JSON body of the answer."""
        self.writer.write(self.rest)
        await self.writer.drain()
        raw = await asyncio.wait_for(self.reader.read(), 20)
        self.writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, json.loads(body) if body.strip() else {}


def trickle_fragment(client: Client) -> bytes:
    """An RFC 8840 fragment with one more candidate for the client's own ICE session (no restart)."""
    sdp = client.pc.localDescription.sdp
    ice = [line for line in sdp.splitlines() if line.startswith(("a=ice-ufrag:", "a=ice-pwd:"))][:2]
    return "\r\n".join(
        [*ice, "m=video 9 UDP/TLS/RTP/SAVPF 0", "a=mid:0", "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", ""]
    ).encode()


async def test_requests_whose_session_ends_while_the_body_arrives_get_404(  # type: ignore[no-untyped-def]
    tiny_parts, http, caplog
) -> None:
    async with running_server(tiny_parts, size=64, max_sessions=4) as server:
        publisher = await whip_publish(http, server.url, CameraTrack(fps=30))
        await publisher.wait_connected()
        session = server.service.scheduler.sessions[publisher.session_id]
        prompt_before = session.params.prompt
        viewer_pc = new_peer()
        viewer_pc.addTransceiver("video", direction="recvonly")
        await viewer_pc.setLocalDescription(await viewer_pc.createOffer())
        held = {
            "WHEP offer": await HeldRequest.start(
                server.url, "POST", f"/whep/{session.id}", viewer_pc.localDescription.sdp.encode(), "application/sdp"
            ),
            "PATCH params": await HeldRequest.start(
                server.url,
                "PATCH",
                f"/api/sessions/{session.id}",
                json.dumps({"prompt": "after the end"}).encode(),
                "application/json",
            ),
            "trickle": await HeldRequest.start(
                server.url,
                "PATCH",
                publisher.location,
                trickle_fragment(publisher),
                "application/trickle-ice-sdpfrag",
                {"If-Match": publisher.etag},
            ),
        }
        await delete(http, server.url, publisher.location)
        answers = {name: await request.finish() for name, request in held.items()}
        assert all(status == 404 and body.get("error") for status, body in answers.values()), answers
        assert session.params.prompt == prompt_before, "an update ran on the ended session's stream"
        assert not session.viewers and not server.service.resources
        assert await metric_value(http, server.url, "livediff_viewers") == 0
        assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]
        assert not [t for t in asyncio.all_tasks() if t.get_name().endswith(f":{session.id}")]
        await viewer_pc.close()
        await publisher.close()


async def post_viewer(http: aiohttp.ClientSession, url: str, offer: str) -> int:
    async with http.post(url, data=offer, headers={"Content-Type": "application/sdp"}) as response:
        await response.read()
        return response.status


async def delete_later(http: aiohttp.ClientSession, url: str, delay: float) -> None:
    await asyncio.sleep(delay)
    async with http.delete(url) as response:
        assert response.status == 200, await response.text()


async def test_viewers_racing_the_end_of_their_session_leave_nothing(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, max_sessions=4) as server:
        statuses: list[int] = []
        for round_ in range(6):
            publisher = await whip_publish(http, server.url, CameraTrack(fps=30))
            await publisher.wait_connected()
            session = server.service.scheduler.sessions[publisher.session_id]
            pc = new_peer()
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())

            offer = pc.localDescription.sdp
            status, _ = await asyncio.gather(
                post_viewer(http, f"{server.url}/whep/{session.id}", offer),
                delete_later(http, server.url + publisher.location, round_ * 0.01),
            )
            statuses.append(status)
            await pc.close()
            await publisher.close()
            assert not session.viewers and not any(k.startswith(session.id) for k in server.service.resources)
            assert not [t for t in asyncio.all_tasks() if t.get_name().endswith(f":{session.id}")]
        assert set(statuses) <= {201, 404}, statuses
        assert await metric_value(http, server.url, "livediff_viewers") == 0
