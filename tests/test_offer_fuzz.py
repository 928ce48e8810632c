"""Mutated offers never get a 5xx: property-based fuzzing of POST /whip and POST /offer on a running server.

Seeds (real offers, not hand-made ones, except the OBS template):
* aiortc: the demo page's shape (sendrecv video with every codec and RTX, the `control` data
  channel) and OBS's shape (H.264 + Opus sendonly), made here by aiortc peers;
* Chromium: `tests/fixtures/chromium-offer.sdp`, what HeadlessChrome 156 offers for the demo
  page's connection (captured by `tests/fixtures/capture_chromium_offer.py`);
* OBS: `tests/fixtures/obs-offer.sdp`, the template OBS's WHIP output follows (session-level ICE
  and DTLS attributes, H.264 + Opus sendonly, no candidates).

Hypothesis applies one to four mutations to a seed's lines: drop, duplicate, truncate, swap,
a wrong number where a payload type (or any number) stands, a garbage value, a huge value, a
garbage line; then joins them with CRLF or LF. Each offer goes to both routes. Every answer
must be below 500, a 4xx must carry a JSON `error`, and an accepted offer's session is deleted
at once (DELETE /whip/{id} or DELETE /api/sessions/{id}). Afterwards a real aiortc client still
gets transformed frames from the same server. The counts are printed whatever pytest captures.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livediff.transport.frames import frame_to_tensor
from tests.server_fixtures import CameraTrack, frames_back, mean_abs_diff, offer_client, running_server

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(300)]

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXAMPLES = 520
"""Mutated offers per run; each is posted to both routes (1040 requests)."""

NUMBER = re.compile(r"-?\d+")
PAYLOAD_LINE = re.compile(r"^(m=(audio|video) |a=(rtpmap|fmtp|rtcp-fb):)|apt=")
GARBAGE = st.text(max_size=40)
HUGE = st.builds(
    lambda char, n: char * n, st.sampled_from(["9", "a", " ", ":", "/", ";", "é"]), st.integers(1_000, 60_000)
)


async def aiortc_offers() -> dict[str, str]:
    """What aiortc offers as the demo page does and as OBS does."""
    from aiortc import RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack

    from livediff.transport.client import prefer
    from tests.server_fixtures import strip_candidates

    demo = RTCPeerConnection()
    demo.addTransceiver(CameraTrack(), direction="sendrecv")
    demo.createDataChannel("control")
    obs = RTCPeerConnection()
    prefer(obs.addTransceiver(CameraTrack(), direction="sendonly"), "H264")
    obs.addTransceiver(AudioStreamTrack(), direction="sendonly")
    offers = {}
    for name, pc in (("aiortc-demo", demo), ("aiortc-obs", obs)):
        await pc.setLocalDescription(await pc.createOffer())
        offers[name] = pc.localDescription.sdp
        await pc.close()
    offers["aiortc-obs"] = strip_candidates(offers["aiortc-obs"])
    return offers


def mutation(lines: list[str]) -> st.SearchStrategy[list[str]]:
    """One change to `lines` (a non-empty list)."""
    index = st.integers(0, len(lines) - 1)

    def drop(i: int) -> list[str]:
        return lines[:i] + lines[i + 1 :]

    def duplicate(i: int, j: int) -> list[str]:
        return lines[:j] + [lines[i]] + lines[j:]

    def truncate(i: int, cut: int) -> list[str]:
        return lines[:i] + [lines[i][: cut % (len(lines[i]) + 1)]] + lines[i + 1 :]

    def swap(i: int, j: int) -> list[str]:
        copy = list(lines)
        copy[i], copy[j] = copy[j], copy[i]
        return copy

    def renumber(i: int, which: int, number: int) -> list[str]:
        numbered = [k for k, line in enumerate(lines) if PAYLOAD_LINE.search(line)] or list(range(len(lines)))
        k = numbered[i % len(numbered)]
        spots = list(NUMBER.finditer(lines[k]))
        if not spots:
            return lines
        spot = spots[which % len(spots)]
        line = lines[k][: spot.start()] + str(number) + lines[k][spot.end() :]
        return lines[:k] + [line] + lines[k + 1 :]

    def revalue(i: int, value: str) -> list[str]:
        line = lines[i]
        cut = max(line.find(":"), line.find("="))
        for sep in (" ", "="):  # keep the attribute and payload type: `a=fmtp:96 <value>`
            at = line.find(sep, cut + 1)
            if at > 0:
                cut = at
                break
        return lines[:i] + [line[: cut + 1] + value] + lines[i + 1 :]

    def insert(i: int, line: str) -> list[str]:
        return lines[:i] + [line] + lines[i:]

    return st.one_of(
        st.builds(drop, index),
        st.builds(duplicate, index, index),
        st.builds(truncate, index, st.integers(0, 200)),
        st.builds(swap, index, index),
        st.builds(
            renumber,
            index,
            st.integers(0, 10),
            st.one_of(st.integers(-3, 300), st.sampled_from([96, 97, 98, 127, 128])),
        ),
        st.builds(revalue, index, st.one_of(GARBAGE, HUGE)),
        st.builds(insert, index, st.one_of(GARBAGE, st.builds("a={}:{}".format, GARBAGE, GARBAGE))),
    )


@st.composite
def mutated_offers(draw: st.DrawFn, seeds: dict[str, str]) -> tuple[str, str]:
    """(seed name, mutated offer); the `v=0` line is left alone (its check is trivial, and
    Hypothesis's liking for index 0 would spend a third of the run on it)."""
    name = draw(st.sampled_from(sorted(seeds)))
    first, *lines = seeds[name].splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if lines:
            lines = draw(mutation(lines))
    ending = draw(st.sampled_from(["\r\n", "\n"]))
    return name, "".join(line + ending for line in [first, *lines])


async def post(http: aiohttp.ClientSession, url: str, route: str, sdp: str) -> tuple[int, Any]:
    """POST the offer to `route`; delete the session of an accepted one. -> (status, body)."""
    if route == "/whip":
        request = http.post(url + route, data=sdp.encode(), headers={"Content-Type": "application/sdp"})
    else:
        request = http.post(url + route, json={"sdp": sdp, "type": "offer"})
    async with request as response:
        text = await response.text()
        status, location = response.status, response.headers.get("Location", "")
    if 400 <= status < 500:
        return status, json.loads(text)  # a JSON body, or the example fails
    if status == 201:
        assert location.startswith("/whip/"), location
        async with http.delete(url + location) as response:
            assert response.status == 200, await response.text()
    elif status == 200:
        async with http.delete(url + f"/api/sessions/{json.loads(text)['session_id']}") as response:
            assert response.status == 200, await response.text()
    return status, text


async def test_mutated_offers_never_get_a_5xx(tiny_parts, http, capsys) -> None:  # type: ignore[no-untyped-def]
    seeds = await aiortc_offers()
    for name in ("chromium-offer.sdp", "obs-offer.sdp"):
        seeds[name.removesuffix(".sdp")] = (FIXTURES / name).read_text()
    tally: Counter[int] = Counter()
    seeds_used: Counter[str] = Counter()
    async with running_server(tiny_parts, size=64, max_sessions=8, max_body_bytes=1 << 20) as server:
        loop = asyncio.get_running_loop()

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )
        @given(mutated_offers(seeds))
        def offer_is_answered_below_500(example: tuple[str, str]) -> None:
            name, sdp = example
            seeds_used[name] += 1
            for route in ("/whip", "/offer"):
                status, body = asyncio.run_coroutine_threadsafe(post(http, server.url, route, sdp), loop).result(60)
                tally[status] += 1
                assert status < 500, f"{route} answered {status} {body!r} to this offer (from {name}):\n{sdp}"
                if status >= 400:
                    assert isinstance(body.get("error"), str) and body["error"], body

        try:
            await asyncio.to_thread(offer_is_answered_below_500)
        finally:
            offers = sum(tally.values())
            errors = sum(n for status, n in tally.items() if status >= 500)
            with capsys.disabled():
                print(
                    f"\noffer fuzz: {offers} offers posted (POST /whip and POST /offer), {errors} answered 5xx; "
                    f"statuses {dict(sorted(tally.items()))}; seeds {dict(sorted(seeds_used.items()))}"
                )
        assert offers >= 1000 and errors == 0

        # nothing left behind, and the server still serves a real session
        assert not server.service.scheduler.sessions and not server.service.resources
        camera = CameraTrack(width=96, height=80)
        client = await offer_client(http, server.url, camera)
        try:
            received = await frames_back(client, 5)
            # transformed, not passed through: the output differs from the input cropped to the engine size
            source = av.VideoFrame.from_ndarray(camera.camera.frame(camera.index - 1), format="rgb24")
            assert mean_abs_diff(received.frames[-1], frame_to_tensor(source, 64, 64).numpy()) > 8.0
        finally:
            await client.close()
