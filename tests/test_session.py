"""A session's lifecycle: every cleanup runs whatever the others do; a closed session starts nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from livediff.config import StreamParams
from livediff.session import Session, SessionClosed
from tests.server_fixtures import offer_client, running_server

pytestmark = pytest.mark.timeout(120)


async def test_a_failing_cleanup_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    session = Session(params=StreamParams())
    ran: list[str] = []

    def cleanup(name: str, fail: bool = False):  # type: ignore[no-untyped-def]
        async def run() -> None:
            ran.append(name)
            if fail:
                raise RuntimeError(f"{name} broke")

        return run

    async def failing_viewer() -> None:
        ran.append("viewer")
        raise ConnectionError("viewer's peer is gone")

    session.on_close(cleanup("frees the slot"))
    session.on_close(cleanup("closes the peer", fail=True))
    session.on_close(cleanup("forgets the output", fail=True))
    session.viewers["v1"] = failing_viewer
    with caplog.at_level(logging.ERROR, logger="livediff.session"):
        await session.close()
    # newest first, each one run although two before it raised
    assert ran == ["viewer", "forgets the output", "closes the peer", "frees the slot"]
    assert session.closed and session.closed_event.is_set()
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 3, [r.getMessage() for r in caplog.records]
    assert any("closes the peer broke" in str(r.exc_info[1]) for r in failures if r.exc_info)


async def test_close_finishes_when_its_caller_is_cancelled() -> None:
    session = Session(params=StreamParams())
    done: list[str] = []
    release = asyncio.Event()

    async def slow() -> None:
        await release.wait()
        done.append("slow")

    async def last() -> None:
        done.append("last")

    session.on_close(last)
    session.on_close(slow)
    caller = asyncio.ensure_future(session.close())
    await asyncio.sleep(0.01)
    caller.cancel()  # e.g. the request that asked for the close lost its client
    await asyncio.gather(caller, return_exceptions=True)
    release.set()
    await asyncio.wait_for(session.closed_event.wait(), 5)
    assert done == ["slow", "last"]
    await session.close()  # idempotent: returns once closed


@pytest.mark.usefixtures("loopback_ice")
async def test_a_failing_cleanup_does_not_keep_the_slot(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, max_sessions=1) as server:
        first = await offer_client(http, server.url)
        await first.wait_connected()
        session = server.service.scheduler.sessions[first.session_id]

        async def broken() -> None:
            raise RuntimeError("a cleanup that fails")

        session.on_close(broken)  # runs first (newest first), before the one that frees the slot
        await first.close()  # the peer goes away: the server closes the session by itself
        await asyncio.wait_for(session.closed_event.wait(), 20)
        second = await offer_client(http, server.url)  # 503 if the slot were still held
        await second.wait_connected()
        assert list(server.service.scheduler.sessions) == [second.session_id]
        await second.close()


async def test_a_closed_session_starts_nothing() -> None:
    session = Session(params=StreamParams())
    await session.close()
    started: list[str] = []

    async def work() -> None:
        started.append("work")

    with pytest.raises(SessionClosed):
        session.spawn(work(), "late")
    with pytest.raises(SessionClosed):
        session.on_close(work)
    await asyncio.sleep(0.05)
    assert not started and not session._tasks
