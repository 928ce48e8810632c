"""HTTPS: the self-signed certificate (names, reuse, renewal), the operator's own, and a session over https."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from livediff.config import ServerSettings
from livediff.errors import ConfigError
from livediff.server import tls
from livediff.transport.loopback import free_port
from tests.server_fixtures import running_server, whep_view, whip_publish

IPS = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("203.0.113.10")]


def _names(cert_path: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def test_self_signed_names_the_machine_and_is_kept(tmp_path: Path) -> None:
    made = tls.self_signed(tmp_path, ["localhost", "gpu-box"], IPS)
    assert made.created and made.self_signed
    assert _names(made.cert) == ({"localhost", "gpu-box"}, {"127.0.0.1", "203.0.113.10"})
    assert made.key.stat().st_mode & 0o777 == 0o600
    der = ssl.PEM_cert_to_DER_cert(made.cert.read_text())
    assert made.fingerprint == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    kept = tls.self_signed(tmp_path, ["localhost"], IPS[:1])  # a subset of what it names: reused
    assert not kept.created and kept.fingerprint == made.fingerprint
    grown = tls.self_signed(tmp_path, ["localhost", "gpu-box"], [*IPS, ipaddress.ip_address("198.51.100.4")])
    assert grown.created and grown.fingerprint != made.fingerprint  # a new address: made again
    assert "198.51.100.4" in _names(grown.cert)[1]


def test_self_signed_is_renewed_before_it_expires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "VALID_DAYS", tls.RENEW_BEFORE_DAYS - 1)
    short = tls.self_signed(tmp_path, ["localhost"], IPS)
    monkeypatch.setattr(tls, "VALID_DAYS", 365)
    renewed = tls.self_signed(tmp_path, ["localhost"], IPS)
    assert renewed.created and renewed.fingerprint != short.fingerprint
    cert = x509.load_pem_x509_certificate(renewed.cert.read_bytes())
    assert cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) > datetime.timedelta(days=300)


def test_operator_certificate_errors_name_the_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tls-cert"):
        tls.ssl_context(tmp_path / "missing.pem", tmp_path / "key.pem")
    first = tls.self_signed(tmp_path / "a", ["localhost"], IPS)
    second = tls.self_signed(tmp_path / "b", ["localhost"], IPS)
    with pytest.raises(ConfigError, match="--tls-cert/--tls-key"):
        tls.ssl_context(first.cert, second.key)  # a key that is not the certificate's
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        ServerSettings(tls_cert=first.cert)
    with pytest.raises(ConfigError, match="exclude"):
        ServerSettings(tls_cert=first.cert, tls_key=first.key, tls_self_signed=True)
    settings, certificate = tls.prepare(ServerSettings(tls_cert=first.cert, tls_key=first.key))
    assert settings.scheme == "https" and certificate is not None and certificate.fingerprint == first.fingerprint


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(90)
async def test_whip_and_whep_over_https(tiny_parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, tls_self_signed=True, state_dir=tmp_path) as server:
        assert server.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(tmp_path / "tls" / "cert.pem"))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as http:
            publisher = await whip_publish(http, server.url, sendrecv=True, audio=False)
            viewer = await whep_view(http, server.url, publisher.session_id)
            try:
                for client in (publisher, viewer):
                    await client.wait_connected()
                    assert client.received is not None
                    await client.received.wait_for(3, timeout=20)
            finally:
                await publisher.close()
                await viewer.close()
        async with aiohttp.ClientSession() as untrusting:  # the system's CAs do not know this certificate
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await untrusting.get(server.url + "/healthz")


@pytest.mark.timeout(120)
def test_serve_tls_self_signed_prints_the_https_url_and_the_fingerprint(tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "livediff.cli",
        "serve",
        "--model",
        "tiny",
        "--backend",
        "torch",
        "--size",
        "64",
        "--port",
        str(port),
        "--tls",
        "self-signed",
        "--state-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 90
        while not any(line.startswith("livediff: ready") for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stdout.readline())
        output = "".join(lines)
        assert f"open https://127.0.0.1:{port}/" in output, output
        printed = re.search(r"SHA-256 fingerprint ([0-9A-F:]{95})", output)
        assert printed, output
        trusted = ssl.create_default_context(cafile=str(tmp_path / "tls" / "cert.pem"))

        async def ready() -> int:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as http:
                async with http.get(f"https://127.0.0.1:{port}/readyz") as response:
                    return response.status

        assert asyncio.run(ready()) == 200
        der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
        served = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
        assert served == printed.group(1), "the printed fingerprint is the served certificate's"
    finally:
        process.terminate()
        process.wait(timeout=30)
