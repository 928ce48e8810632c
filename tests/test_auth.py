"""Bearer auth per RFC 9110 11.1 (the scheme is case-insensitive) and RFC 6750 2.1 (one or more
spaces before the token), on every route that needs the token; a real client signs in each way."""

from __future__ import annotations

import pytest

from tests.server_fixtures import frames_back, offer_client, running_server, whep_view

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(120)]

TOKEN = "s3cret-T0ken"
SPELLINGS = [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}", f"bEaReR   {TOKEN}", f"Bearer {TOKEN}"]
REFUSED = [
    "",
    "Bearer",
    f"Bearer{TOKEN}",
    f"Basic {TOKEN}",
    f"Bearer\t{TOKEN}",  # RFC 6750 2.1: 1*SP, not a tab
    f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN}x",
    f"Bearer {TOKEN} {TOKEN}",
    f"Bearer {TOKEN.upper()}",  # the token itself is compared exactly
    f"Bearers {TOKEN}",
]


def test_bearer_credentials_parse() -> None:
    from livediff.server.auth import bearer_credentials

    for header in SPELLINGS:
        assert bearer_credentials(header) == TOKEN, header
    for header in REFUSED:
        assert bearer_credentials(header) != TOKEN, header


async def test_every_spelling_of_the_scheme_signs_in_on_every_route(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, token=TOKEN) as server:
        url = server.url
        client = await offer_client(http, url, headers={"Authorization": f"bearer {TOKEN}"})
        try:
            await frames_back(client)
            viewer = await whep_view(http, url, client.session_id, headers={"Authorization": f"BEARER  {TOKEN}"})
            await viewer.close()
            for header in SPELLINGS:
                auth = {"Authorization": header}
                for method, path in (
                    ("GET", "/api/sessions"),
                    ("GET", f"/api/sessions/{client.session_id}"),
                    ("GET", "/metrics"),
                    ("GET", "/api/ice-servers"),
                ):
                    async with http.request(method, url + path, headers=auth) as response:
                        assert response.status == 200, (header, path, await response.text())
            for header in REFUSED:
                async with http.get(url + "/api/sessions", headers={"Authorization": header}) as response:
                    assert response.status == 401, header
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
                    assert "error" in await response.json()
            async with http.delete(
                url + f"/api/sessions/{client.session_id}", headers={"Authorization": f"BeArEr {TOKEN}"}
            ) as response:
                assert response.status == 200
        finally:
            await client.close()
