"""The cluster layer's decisions without a cluster: routes in session ids, the autoscaling rule,
the merged metrics, the flags. The end-to-end behaviour is in test_cluster.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.tools import import_or_skip

import_or_skip("ray.serve", "pip install 'livediff[cluster]'")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from livediff.cli import build_parser, cluster_settings, main  # noqa: E402
from livediff.cluster.autoscale import desired_replicas  # noqa: E402
from livediff.cluster.calls import HttpCall, HttpReply, end_to_end, route_key, session_route  # noqa: E402
from livediff.cluster.metrics import merge  # noqa: E402
from livediff.cluster.routing import ReplicaView  # noqa: E402
from livediff.cluster.run import replica_shape  # noqa: E402
from livediff.cluster.settings import ClusterSettings  # noqa: E402
from livediff.config import EngineSettings, ServerSettings  # noqa: E402
from livediff.errors import ConfigError  # noqa: E402
from livediff.server.metrics import Metrics  # noqa: E402


def test_session_paths_carry_their_replica() -> None:
    assert route_key("abcd1234-0123456789ab") == "abcd1234"
    assert route_key("0123456789ab") is None and route_key("-x") is None and route_key("abc-") is None
    assert session_route("/whip/abcd1234-0123456789ab") == "abcd1234"
    assert session_route("/whep/abcd1234-0123456789ab") == "abcd1234"
    assert session_route("/whep/abcd1234-0123456789ab/viewer1") == "abcd1234"
    assert session_route("/api/sessions/abcd1234-0123456789ab") == "abcd1234"
    for path in ("/whip", "/whep", "/api/sessions", "/offer", "/view/abcd1234-0123456789ab", "/metrics"):
        assert session_route(path) is None, path
    assert HttpCall("POST", "/offer").opens_session and HttpCall("POST", "/whip").opens_session
    assert not HttpCall("POST", "/whep").opens_session and not HttpCall("PATCH", "/whip/a-b").opens_session
    assert end_to_end([("Host", "x"), ("Content-Length", "3"), ("ETag", '"1"'), ("connection", "close")]) == [
        ("ETag", '"1"')
    ]
    # the session an answer to a session-opening call made, as the gateway's placement counts it
    whip = HttpReply(201, [("Location", "/whip/abcd1234-0123456789ab")], b"v=0", "abcd1234")
    offer = HttpReply(200, [], b'{"sdp": "v=0", "type": "answer", "session_id": "abcd1234-0123456789ab"}', "abcd1234")
    assert whip.opened_session() == offer.opened_session() == "abcd1234-0123456789ab"
    assert HttpReply(503, [("Location", "/whip/a-b")], b"{}", "a").opened_session() == ""
    assert HttpReply(200, [], b"not json", "a").opened_session() == ""
    assert HttpReply(200, [], b'{"session_id": 3}', "a").opened_session() == ""


def test_server_settings_take_a_route_prefix_only_of_safe_characters() -> None:
    assert ServerSettings(session_id_prefix="abcd1234-").session_id_prefix == "abcd1234-"
    for bad in ("a/b", "a b", "x" * 33, "é"):
        with pytest.raises(ConfigError, match="session_id_prefix"):
            ServerSettings(session_id_prefix=bad)


@pytest.mark.parametrize(("sessions", "current", "target", "expected"), [
    ({"a": 0}, 1, 2, 0),                 # idle: none (Serve then applies min_replicas)
    ({"a": 3}, 1, 2, 2),                 # 3 sessions > target 2: one more
    ({"a": 2, "b": 3}, 2, 2, 3),
    ({"a": 1, "b": 1}, 2, 2, 2),         # the target says 1, but each replica holds a session: hold
    ({"a": 1, "b": 0}, 2, 2, 1),         # one is empty: down by one
    ({"a": 0, "b": 0, "c": 2}, 3, 2, 1),  # two empty
    ({"a": 1, "b": 0, "c": 1}, 3, 1, 2),  # 2 sessions on 3 replicas, target 1: only the empty one goes
    ({"a": 1}, 2, 1, 1),                 # a replica still starting reports nothing: it holds no session
])  # fmt: skip
def test_scaling_down_only_by_empty_replicas(
    sessions: dict[str, float], current: int, target: float, expected: int
) -> None:
    assert desired_replicas(sessions, current, target) == expected


def test_one_scrape_labels_every_replica() -> None:
    texts = {}
    for key, sessions in (("aaaa", 2), ("bbbb", 1)):
        metrics = Metrics()
        metrics.sessions.set(sessions)
        metrics.frames.labels("sent").inc(10 * sessions)
        texts[key] = metrics.render().decode()
    views = [ReplicaView("aaaa", 2, 0, 3, True, 0.0), ReplicaView("bbbb", 1, 1, 3, False, 0.0)]
    families = {f.name: f for f in text_string_to_metric_families(merge(texts, views).decode())}
    sessions = {s.labels["replica"]: s.value for s in families["livediff_sessions"].samples}
    assert sessions == {"aaaa": 2.0, "bbbb": 1.0}
    sent = {
        s.labels["replica"]: s.value
        for s in families["livediff_frames"].samples
        if s.name == "livediff_frames_total" and s.labels["outcome"] == "sent"
    }
    assert sent == {"aaaa": 20.0, "bbbb": 10.0}
    free = {s.labels["replica"]: s.value for s in families["livediff_replica_free_slots"].samples}
    assert free == {"aaaa": 1.0, "bbbb": 1.0}  # bbbb: 3 - 1 session - 1 being placed
    assert {s.labels["replica"]: s.value for s in families["livediff_replica_ready"].samples} == {
        "aaaa": 1.0,
        "bbbb": 0.0,
    }
    assert families["livediff_replicas"].samples[0].value == 2.0


def test_replicas_follow_the_gpus() -> None:
    cuda, cpu = EngineSettings(device="cuda"), EngineSettings(device="cpu")
    assert replica_shape(ClusterSettings(), cuda, 8) == (8, 1.0)
    assert replica_shape(ClusterSettings(), EngineSettings(device="auto"), 4) == (4, 1.0)
    assert replica_shape(ClusterSettings(max_replicas=3), cuda, 8) == (3, 1.0)
    assert replica_shape(ClusterSettings(replica_gpus=0.5), cuda, 2) == (4, 0.5)
    assert replica_shape(ClusterSettings(), cpu, 0) == (1, 0.0)
    assert replica_shape(ClusterSettings(max_replicas=6), cpu, 0) == (6, 0.0)
    with pytest.raises(ConfigError, match="has 0 GPUs"):
        replica_shape(ClusterSettings(), cuda, 0)


def test_cluster_flags() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--cluster",
            "--min-replicas",
            "2",
            "--max-replicas",
            "4",
            "--target-sessions",
            "3",
            "--drain-timeout",
            "60",
        ]
    )
    settings = cluster_settings(args)
    assert (settings.address, settings.min_replicas, settings.max_replicas) == ("local", 2, 4)
    assert settings.target(4) == 3 and settings.drain_timeout_s == 60
    assert ClusterSettings().target(4) == 3 and ClusterSettings().target(1) == 1
    assert cluster_settings(build_parser().parse_args(["serve", "--cluster", "auto"])).address == "auto"
    assert build_parser().parse_args(["serve"]).cluster is None
    with pytest.raises(ConfigError, match="below min_replicas"):
        ClusterSettings(min_replicas=3, max_replicas=2)


def test_cluster_flag_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--cluster", "--max-replicas", "-1"])
    assert exit_info.value.code == 2
    assert "--max-replicas" in capsys.readouterr().err
    assert main(["serve", "--cluster", "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert "below min_replicas" in capsys.readouterr().err


async def test_a_draining_replicas_sessions_are_reached_at_its_own_address(
    tiny_parts: object, loopback_ice: None, http: object
) -> None:
    """Serve routes nothing to a replica it stops; while that replica drains, the gateway reaches its
    sessions at the address its last stats gave. Here the replica is a real single server, and the
    router's view is as it stands once Serve dropped the replica (`SessionRouter.update_replicas`)."""
    import json
    from collections import OrderedDict

    from livediff.cluster import routing
    from livediff.cluster.gateway import ENGINE, Gateway
    from tests.server_fixtures import frames_back, offer_client, running_server

    class RouterView:  # what SessionRouter keeps: no replica routed to, one departed
        curr_replicas: dict[str, object] = {}
        departed: OrderedDict[str, ReplicaView] = OrderedDict()

    gateway = Gateway(engines=None, app_name="drain-test", max_body_bytes=65536, call_timeout_s=5)
    routing._ROUTERS[f"drain-test#{ENGINE}"] = RouterView()  # type: ignore[assignment]
    try:
        async with running_server(tiny_parts, session_id_prefix="abcd1234-") as server:
            client = await offer_client(http, server.url)  # type: ignore[arg-type]
            await frames_back(client, 3)
            RouterView.departed["abcd1234"] = ReplicaView("abcd1234", 1, 0, 4, True, 0.0, url=server.url)
            reply = await gateway.handle(HttpCall("GET", f"/api/sessions/{client.session_id}"))
            assert reply.status == 200 and reply.replica == "abcd1234", reply
            assert json.loads(reply.body)["id"] == client.session_id
            reply = await gateway.handle(
                HttpCall(
                    "PATCH",
                    f"/api/sessions/{client.session_id}",
                    headers=[("Content-Type", "application/json")],
                    body=b'{"prompt": "a charcoal sketch"}',
                )
            )
            assert reply.status == 200 and json.loads(reply.body)["params"]["prompt"] == "a charcoal sketch"
            listing = await gateway.handle(HttpCall("GET", "/api/sessions"))
            assert [(s["id"], s["replica"]) for s in json.loads(listing.body)["sessions"]] == [
                (client.session_id, "abcd1234")
            ]
            await client.close()
        # the replica has ended: its sessions answer 404, and it is forgotten
        reply = await gateway.handle(HttpCall("GET", f"/api/sessions/{client.session_id}"))
        assert reply.status == 404 and "error" in json.loads(reply.body)
        assert routing.draining_replicas("drain-test", ENGINE) == {}
    finally:
        await gateway.close()
        routing._ROUTERS.pop(f"drain-test#{ENGINE}", None)


def test_new_sessions_go_to_the_most_free_room() -> None:
    from livediff.cluster.routing import choose_replica

    def view(key: str, sessions: int, placing: int = 0, max_sessions: int = 4) -> ReplicaView:
        return ReplicaView(key, sessions, placing, max_sessions, True, 0.0)

    assert choose_replica([view("a", 2), view("b", 1)]).key == "b"  # type: ignore[union-attr]
    assert choose_replica([view("a", 1), view("b", 0, placing=2)]).key == "a"  # type: ignore[union-attr]
    assert choose_replica([view("a", 1, max_sessions=2), view("b", 2, max_sessions=8)]).key == "b"  # type: ignore[union-attr]
    # equal room: the one with fewer sessions (more free batch slots), then by key (stable)
    assert choose_replica([view("a", 3, max_sessions=8), view("b", 0, max_sessions=5)]).key == "b"  # type: ignore[union-attr]
    assert choose_replica([view("b", 1), view("a", 1)]).key == "a"  # type: ignore[union-attr]
    # no stats yet: as large as the others, and empty
    assert choose_replica([view("a", 1), view("b", 0, max_sessions=0)]).key == "b"  # type: ignore[union-attr]
    assert choose_replica([view("a", 1), view("b", 0)], exclude=("b",)).key == "a"  # type: ignore[union-attr]
    assert choose_replica([view("a", 1)], exclude=("a",)) is None and choose_replica([]) is None
    # 8 sessions arriving at once on 2 replicas of 4, counting those being placed: 4 and 4
    counts = {"a": 0, "b": 0}
    for _ in range(8):
        chosen = choose_replica([view(k, 0, placing=n) for k, n in counts.items()])
        assert chosen is not None
        counts[chosen.key] += 1
    assert counts == {"a": 4, "b": 4}


def _router_view() -> Any:
    """A SessionRouter's view and call counts alone: no Serve controller behind it."""
    from collections import defaultdict

    from livediff.cluster.routing import OpeningCalls, SessionRouter

    router = SessionRouter.__new__(SessionRouter)
    router._opened = defaultdict(OpeningCalls)
    router._stats = {}
    return router


def _replica(key: str, sessions: list[str], at: float) -> Any:
    from types import SimpleNamespace

    stats = {"at": at, "sessions": sessions, "max_sessions": 4, "ready": True}
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=key), routing_stats=stats)


def test_an_opening_call_counts_until_stats_show_its_session_or_are_taken_after_its_answer() -> None:
    """The router's view of a replica counts a session-opening call in `placing` until a stats snapshot
    lists its session, or one taken after its answer does not (the session ended): a snapshot taken
    while the call was on its way (the answer took 3 s, as on a loaded machine) must not make the
    replica look empty, nor one that lists the session count it twice."""
    router = _router_view()
    calls = router._opened["a"]
    first = calls.sent(100.0)
    assert router.view(_replica("a", [], at=99.0)).placing == 1  # stats older than the call
    assert router.view(_replica("a", [], at=101.0)).placing == 1  # taken while on its way: may miss it
    calls.answered(first, now=103.0, opened=True, session="a-1")
    assert router.view(_replica("a", [], at=102.5)).placing == 1  # taken before the answer, without it
    view = router.view(_replica("a", ["a-1"], at=102.6))  # taken before the answer, with it: counted once
    assert (view.sessions, view.placing, view.free) == (1, 0, 3)
    assert router.view(_replica("a", [], at=102.0)).sessions == 1  # an older snapshot arriving late is passed over

    refused = calls.sent(105.0)
    failed = calls.sent(105.1)
    calls.answered(refused, now=105.5, opened=False)  # a 503 made no session: it stops counting
    calls.answered(failed, now=106.0, opened=True)  # an error: it may have made one, unnamed
    assert router.view(_replica("a", ["a-1"], at=105.8)).placing == 1
    view = router.view(_replica("a", ["a-1"], at=106.5))  # after its answer, no new session: forgotten
    assert (view.sessions, view.placing) == (1, 0)
    ended = calls.sent(107.0)
    calls.answered(ended, now=107.5, opened=True, session="a-2")
    assert router.view(_replica("a", ["a-1"], at=108.0)).placing == 0  # it ended before these stats


def test_sequential_sessions_on_stale_stats_split_evenly() -> None:
    """The split CI saw (four sessions opened one after the other went 3/1): each replica's stats were
    taken while a call to it was still on its way back, and none came after. Counting each session
    once, from the snapshot or from the call, they go 2/2 whatever the snapshots' timing."""
    from livediff.cluster.routing import choose_replica

    router = _router_view()
    stats = {"a": ([], 99.0), "b": ([], 99.0)}
    made: dict[str, list[str]] = {"a": [], "b": []}
    now = 100.0
    for _ in range(4):
        chosen = choose_replica([router.view(_replica(k, ids, at)) for k, (ids, at) in stats.items()])
        assert chosen is not None
        call = router._opened[chosen.key].sent(now)
        session = f"{chosen.key}-{len(made[chosen.key])}"
        made[chosen.key].append(session)
        if len(made[chosen.key]) == 1:  # its one snapshot: the session made, the answer not yet back
            stats[chosen.key] = (list(made[chosen.key]), now + 0.4)
        router._opened[chosen.key].answered(call, now + 0.9, True, session)
        now += 1.0
    assert {k: len(v) for k, v in made.items()} == {"a": 2, "b": 2}


def test_opening_calls_are_bounded() -> None:
    from livediff.cluster.routing import OpeningCalls

    calls = OpeningCalls()
    for i in range(OpeningCalls.LIMIT + 10):
        calls.sent(float(i))
    assert calls.missing_from(0.0) == OpeningCalls.LIMIT


def test_job_routes_are_streamed_or_called_and_refused_without_a_shared_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from starlette.requests import Request

    from livediff.cluster import jobs
    from livediff.cluster.app import shared_jobs
    from livediff.cluster.gateway import Gateway
    from livediff.jobs.settings import JobSettings

    assert jobs.is_streamed("POST", "/api/jobs") and jobs.is_streamed("GET", "/api/jobs/job_1/result")
    assert jobs.is_streamed("GET", "/api/recordings/rec_1/result")
    for method, path in (("GET", "/api/jobs"), ("GET", "/api/jobs/job_1"), ("DELETE", "/api/jobs/job_1"),
                         ("GET", "/api/recordings"), ("POST", "/api/jobs/job_1/result")):  # fmt: skip
        assert jobs.is_job_path(path) and not jobs.is_streamed(method, path), (method, path)
    assert not jobs.is_job_path("/api/jobsx") and not jobs.is_job_path("/api/sessions")

    # an upload to the ready replica with the fewest sessions; a replica with no address yet is skipped
    views = [ReplicaView("b", 2, 0, 4, True, 0.0, "http://b"), ReplicaView("a", 1, 1, 4, True, 0.0, "http://a"),
             ReplicaView("c", 0, 0, 4, False, 0.0, "http://c"), ReplicaView("d", 0, 0, 4, True, 0.0, "")]  # fmt: skip
    assert jobs.pick(views, upload=True).key == "a"  # type: ignore[union-attr]
    assert jobs.pick(views[2:], upload=True) is None

    # a cluster without --jobs-db: 501 naming the flag, the body never read
    gateway = Gateway(None, "livediff", 1024, 5.0, with_jobs=False)
    scope = {"type": "http", "method": "POST", "path": "/api/jobs", "query_string": b"", "headers": []}
    response = asyncio.run(gateway(Request(scope)))
    assert response.status_code == 501 and b'"field": "--jobs-db"' in response.body

    # what the replicas share: one secret (made once in the state folder), absolute folders; SQLite refused
    server = ServerSettings(state_dir=tmp_path / "state")
    shared, settings = shared_jobs(server, JobSettings(db="postgresql://x@h/d", storage=tmp_path / "files"))
    assert settings.webhook_secret.startswith("whsec_") and shared.state_dir == (tmp_path / "state").resolve()
    assert shared_jobs(server, JobSettings(db="postgresql://x@h/d"))[1].webhook_secret == settings.webhook_secret
    with pytest.raises(ConfigError, match="--jobs-db"):
        shared_jobs(server, JobSettings())
