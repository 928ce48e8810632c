"""ICE servers for every client (pages, WHIP/WHEP Link headers), short-lived TURN credentials, CORS."""

from __future__ import annotations

import base64
import subprocess

import pytest

from livediff.transport.ice_servers import IceServerConfig, rest_credential
from tests.server_fixtures import running_server, whip_publish

TURN = "turn:203.0.113.20:3478?transport=udp"
STUN = "stun:203.0.113.20:3478"


def test_rest_credential_matches_openssl() -> None:
    """username `expiry:user`, password base64(HMAC-SHA1(secret, username)), checked against openssl."""
    credential = rest_credential("north-wind", ttl_s=3600, now=1_700_000_000, user="alice")
    assert credential.username == "1700003600:alice" and credential.expires == 1_700_003_600
    digest = subprocess.run(
        ["openssl", "dgst", "-sha1", "-hmac", "north-wind", "-binary"],
        input=credential.username.encode(),
        capture_output=True,
        check=True,
    ).stdout
    assert credential.password == base64.b64encode(digest).decode()
    assert rest_credential("north-wind", 3600).username != rest_credential("north-wind", 3600).username


def test_client_form_groups_stun_and_turn_with_a_fresh_credential() -> None:
    config = IceServerConfig(urls=(STUN, TURN), turn_secret="s", ttl_s=600)
    first, second = config.for_client(), config.for_client()
    assert first["iceServers"][0] == {"urls": [STUN]}
    turn = first["iceServers"][1]
    assert turn["urls"] == [TURN] and turn["username"].split(":")[0] == str(first["expires"])
    assert turn["username"] != second["iceServers"][1]["username"]
    static = IceServerConfig(urls=(TURN,), turn_username="u", turn_credential="p").for_client()
    assert static == {"iceServers": [{"urls": [TURN], "username": "u", "credential": "p"}], "expires": None}
    assert IceServerConfig().for_client() == {"iceServers": [], "expires": None}
    peer = config.for_peer()
    assert [s.urls for s in peer] == [STUN, TURN] and peer[1].username and peer[0].username is None


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(90)
async def test_pages_whip_and_options_get_the_ice_servers(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, ice_servers=(STUN, TURN), turn_secret="s3cret") as server:
        async with http.get(server.url + "/api/ice-servers") as response:
            assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
            body = await response.json()
        assert body["iceServers"][1]["urls"] == [TURN] and ":" in body["iceServers"][1]["username"]
        publisher = await whip_publish(http, server.url, audio=False)
        await publisher.close()
        async with http.options(server.url + "/whip") as response:
            links = response.headers.getall("Link")
        assert any(TURN in link and 'credential-type="password"' in link for link in links)

    async with running_server(tiny_parts, size=64, ice_servers=(TURN,), turn_secret="s3cret", token="t") as server:
        async with http.get(server.url + "/api/ice-servers") as response:
            assert response.status == 401  # credentials only for clients that may publish
        async with http.get(server.url + "/api/ice-servers", headers={"Authorization": "Bearer t"}) as response:
            assert response.status == 200
        async with http.options(server.url + "/whip") as response:
            assert response.status == 204 and "Link" not in response.headers


@pytest.mark.timeout(60)
async def test_cors_preflight_and_exposed_headers(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    app_origin = "https://app.example"
    async with running_server(tiny_parts, size=64, cors_origins=(app_origin,), token="t") as server:
        preflight = {
            "Origin": app_origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        async with http.options(server.url + "/whip", headers=preflight) as response:
            assert response.status == 204  # no token needed for a preflight
            assert response.headers["Access-Control-Allow-Origin"] == app_origin
            assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()
            assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
        async with http.options(server.url + "/whip", headers={**preflight, "Origin": "https://evil.example"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
            assert "not allowed" in (await r.json())["error"]
        async with http.get(server.url + "/api/sessions", headers={"Origin": app_origin}) as response:
            assert response.status == 401  # errors are readable by the page too
            assert response.headers["Access-Control-Allow-Origin"] == app_origin
            assert {"Location", "ETag", "Link", "Accept-Patch"} <= {
                h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")
            }
        async with http.options(server.url + "/whip") as response:  # WHIP's own OPTIONS still answers
            assert response.headers["Accept-Post"] == "application/sdp"
    async with running_server(tiny_parts, size=64) as server:  # none by default
        async with http.get(server.url + "/healthz", headers={"Origin": app_origin}) as response:
            assert "Access-Control-Allow-Origin" not in response.headers
