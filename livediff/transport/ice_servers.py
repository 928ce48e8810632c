"""The STUN/TURN servers livediff hands out: to its own peers, to the pages, in WHIP/WHEP `Link` headers.

One list (`--ice-servers`), three forms: aiortc `RTCIceServer`s for the server's peers, W3C
`RTCIceServer` dictionaries (`{"urls", "username", "credential"}`) for the pages'
`new RTCPeerConnection({iceServers})`, and RFC 9725 section 4.6 `Link: <url>; rel="ice-server"`
headers for WHIP/WHEP clients such as OBS.

TURN credentials come in two kinds:

* **static** (`--turn-username`, `--turn-credential`): one password, handed to every client;
* **short-lived** (`--turn-secret`): the "TURN REST API" scheme that coturn implements with
  `use-auth-secret` / `static-auth-secret` (draft-uberti-behave-turn-rest-00, section 2.2).
  For each client: username `"<expiry unix time>:<id>"`, password
  `base64(HMAC-SHA1(secret, username))`. The TURN server recomputes the password from the
  username and its copy of the secret, and refuses the username once its expiry has passed,
  so a credential that leaks stops working on its own and the secret itself never leaves the
  server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiortc import RTCIceServer

TURN_SCHEMES = ("turn:", "turns:")


@dataclass(frozen=True)
class TurnCredential:
    """A username/password pair for the TURN servers; `expires` is a unix time, None for static ones."""

    username: str
    password: str
    expires: int | None = None


@dataclass(frozen=True)
class IceServerConfig:
    """The configured STUN/TURN urls and how TURN credentials are made.

    `urls` are RFC 7064/7065 URIs (`stun:host:3478`, `turn:host:3478?transport=udp`,
    `turns:host:5349`). With `turn_secret` set, every call to `credential()` mints a fresh
    short-lived credential valid for `ttl_s` seconds; else the static `turn_username` and
    `turn_credential` are used (or none).
    """

    urls: tuple[str, ...] = ()
    turn_username: str = ""
    turn_credential: str = ""
    turn_secret: str = ""
    ttl_s: int = 86400

    @property
    def has_turn(self) -> bool:
        return any(url.startswith(TURN_SCHEMES) for url in self.urls)

    def credential(self, now: float | None = None) -> TurnCredential | None:
        """The TURN credential for one client (a new short-lived one each call with a secret)."""
        if self.turn_secret:
            return rest_credential(self.turn_secret, self.ttl_s, now=now)
        if self.turn_username:
            return TurnCredential(self.turn_username, self.turn_credential)
        return None

    def for_peer(self) -> list[RTCIceServer]:
        """aiortc's form, for one server-side peer connection."""
        credential = self.credential()
        servers = []
        for url in self.urls:
            if url.startswith(TURN_SCHEMES) and credential is not None:
                servers.append(RTCIceServer(urls=url, username=credential.username, credential=credential.password))
            else:
                servers.append(RTCIceServer(urls=url))
        return servers

    def for_client(self) -> dict[str, Any]:
        """The W3C `RTCConfiguration` members a page passes to `new RTCPeerConnection(...)`.

        `{"iceServers": [{"urls": [...]}, {"urls": [...], "username", "credential"}],
        "expires": unix time or null}`: STUN urls in one entry, TURN urls with the credential in
        another, as the WebRTC specification's `RTCIceServer` dictionary has them.
        """
        stun = [url for url in self.urls if not url.startswith(TURN_SCHEMES)]
        turn = [url for url in self.urls if url.startswith(TURN_SCHEMES)]
        servers: list[dict[str, Any]] = []
        if stun:
            servers.append({"urls": stun})
        credential = self.credential() if turn else None
        if turn:
            entry: dict[str, Any] = {"urls": turn}
            if credential is not None:
                entry["username"] = credential.username
                entry["credential"] = credential.password
            servers.append(entry)
        return {"iceServers": servers, "expires": credential.expires if credential else None}

    def link_headers(self) -> list[str]:
        """`Link` header values for a WHIP/WHEP answer (RFC 9725 section 4.6), TURN entries with
        `username`, `credential` and `credential-type="password"`."""
        credential = self.credential() if self.has_turn else None
        links = []
        for url in self.urls:
            value = f'<{url}>; rel="ice-server"'
            if url.startswith(TURN_SCHEMES) and credential is not None:
                value += (
                    f'; username="{credential.username}"; credential="{credential.password}"'
                    '; credential-type="password"'
                )
            links.append(value)
        return links


def rest_credential(secret: str, ttl_s: int, now: float | None = None, user: str | None = None) -> TurnCredential:
    """A short-lived TURN credential (draft-uberti-behave-turn-rest-00 section 2.2, coturn's
    `use-auth-secret`): username `"<expiry>:<user>"`, password `base64(HMAC-SHA1(secret, username))`.

    `ttl_s` seconds from `now` (unix time, default the current time); `user` defaults to a random id.
    """
    expires = int(now if now is not None else time.time()) + ttl_s
    username = f"{expires}:{user or secrets.token_hex(6)}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredential(username, base64.b64encode(digest).decode(), expires)
