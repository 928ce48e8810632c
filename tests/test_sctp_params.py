"""livediff.transport.sctp_params: a chunk parameter whose length is under 4 bytes is dropped, not walked forever."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import pytest
from aiortc import rtcsctptransport

from livediff.transport import sctp_params
from tests.server_fixtures import CameraTrack, offer_client, running_server

HEARTBEAT = 4
"""SCTP chunk type (RFC 9260, section 3.3.5), whose body is parameters: Heartbeat Info is type 1."""
ZERO_LENGTH_PARAM = struct.pack("!HH", 1, 0)
"""A Heartbeat Info parameter whose length (0) does not even cover its own 4-byte header."""


def test_the_internals_are_where_the_module_expects_them() -> None:
    sctp_params.check_aiortc_internals()


def test_the_installed_aiortc_still_walks_a_zero_length_parameter_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason for the module. When this fails, aiortc handles such parameters itself: remove the patch."""
    reads = 0

    def counted_unpack_from(fmt: str, buffer: bytes, offset: int = 0) -> tuple[Any, ...]:
        nonlocal reads
        reads += 1
        if reads > 1000:
            raise RuntimeError("still walking")
        return struct.unpack_from(fmt, buffer, offset)

    monkeypatch.setattr(rtcsctptransport, "unpack_from", counted_unpack_from)
    with pytest.raises(RuntimeError, match="still walking"):
        sctp_params.AIORTC_DECODE_PARAMS(ZERO_LENGTH_PARAM)  # 4 bytes, read 1000 times over


@pytest.mark.parametrize(
    "body",
    [ZERO_LENGTH_PARAM, struct.pack("!HH", 1, 3), struct.pack("!HHI", 1, 12, 7)],
    ids=["length 0", "length 3", "length past the chunk"],
)
def test_a_malformed_parameter_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError, match="SCTP parameter 1 has an invalid length"):
        sctp_params.decode_params_strictly(body)


def test_well_formed_parameters_decode_as_aiortc_decodes_them() -> None:
    params = [(1, b"info"), (7, b"odd"), (0x8000, b""), (9, b"\x00" * 9)]  # values of 4, 3, 0 and 9 bytes: padding
    body = rtcsctptransport.encode_params(params)
    assert sctp_params.decode_params_strictly(body) == sctp_params.AIORTC_DECODE_PARAMS(body) == params


class RawChunk(rtcsctptransport.Chunk):
    """A chunk sent as its bytes are given (aiortc's own chunk classes would parse their body first)."""

    type = HEARTBEAT


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(90)  # without the patch the server's loop (this test's loop) never turns again
async def test_a_peer_sending_a_malformed_parameter_keeps_its_session_and_the_server(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        client = await offer_client(http, server.url, CameraTrack(fps=30), params={"prompt": "kept"})
        await client.wait_connected()
        while client.channel.readyState != "open":
            await asyncio.sleep(0.05)
        await client.pc.sctp._send_chunk(RawChunk(body=ZERO_LENGTH_PARAM))  # inside the peer's DTLS session
        await asyncio.sleep(0.5)
        async with http.get(server.url + "/healthz") as response:
            assert response.status == 200
        count = len(client.received.times)  # type: ignore[union-attr]
        await client.received.wait_for(count + 5)  # type: ignore[union-attr]  # frames still come back
        client.channel.send(json.dumps({"prompt": "after", "request_id": "after"}))
        ack = await client.wait_message(lambda m: m.get("request_id") == "after")
        assert ack["type"] == "ack"
        session = server.service.scheduler.sessions[client.session_id]
        assert not session.closed and session.params.prompt == "after"
        await client.close()
