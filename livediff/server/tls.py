"""HTTPS for `livediff serve`: the operator's certificate, or one made here and kept.

Browsers give a page the camera only in a secure context (https, or http on localhost), so a
webcam on any other machine needs https. `--tls-cert FILE --tls-key FILE` serves the operator's
certificate (e.g. from Let's Encrypt: browsers and OBS trust it as is). `--tls self-signed` makes
a certificate for this machine's host names and addresses once, with `cryptography`, and keeps
it in the state folder: browsers warn about it until a user accepts it or trusts the file, and
its SHA-256 fingerprint (printed at start-up) lets them check that what they accept is this
server's. It is made again when it expires within `RENEW_BEFORE_DAYS` or no longer names every
address the server is reached at.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from livediff.config import ServerSettings, nat_1to1_map
from livediff.errors import ConfigError

VALID_DAYS = 365
RENEW_BEFORE_DAYS = 30
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Certificate:
    """A certificate on disk and what a user checks it by."""

    cert: Path
    key: Path
    fingerprint: str
    """SHA-256 of the DER certificate, colon-separated hex: what browsers show as the fingerprint."""
    spki_sha256: str
    """base64 SHA-256 of the SubjectPublicKeyInfo (what Chromium's
    `--ignore-certificate-errors-spki-list` and HPKP-style pins name)."""
    names: tuple[str, ...]
    """The DNS names and IP addresses it is valid for."""
    self_signed: bool = False
    """Made by `self_signed` (else the operator's own)."""
    created: bool = False
    """Whether this run made it (else it was found in the state folder)."""


def prepare(settings: ServerSettings) -> tuple[ServerSettings, Certificate | None]:
    """The settings with `tls_cert`/`tls_key` filled in for `tls_self_signed` (the certificate made
    or reused for this machine's names, the NAT 1:1 public addresses among them), and the
    certificate in use (None for plain http)."""
    if settings.tls_self_signed:
        dns, ips = machine_names(settings.host, nat_1to1_map(settings.nat_1to1).values())
        certificate = self_signed(settings.state_dir or default_state_dir(), dns, ips)
        settings = settings.replace(tls_cert=certificate.cert, tls_key=certificate.key, tls_self_signed=False)
        return settings, certificate
    if settings.tls_cert is not None and settings.tls_key is not None:
        ssl_context(settings.tls_cert, settings.tls_key)  # a clear error now rather than at the first request
        return settings, describe(settings.tls_cert, settings.tls_key)
    return settings, None


def explain(certificate: Certificate) -> str:
    """What the operator reads at start-up: which certificate, its fingerprint, how to trust it."""
    lines = [f"livediff: https certificate {certificate.cert}"]
    if certificate.self_signed:
        origin = "made now" if certificate.created else "kept"
        lines[0] += f" (self-signed, {origin}; valid for {', '.join(certificate.names)})"
        lines.append(f"livediff:   SHA-256 fingerprint {certificate.fingerprint}")
        lines.append(
            "livediff:   browsers warn once: check that the fingerprint they show is this one and "
            "accept it, or trust the file (see docs/deployment.md#gpu-server-browser-on-a-laptop)"
        )
    return "\n".join(lines)


def default_state_dir() -> Path:
    """`$LIVEDIFF_STATE_DIR`, else `$XDG_STATE_HOME/livediff`, else `~/.local/state/livediff`."""
    if os.environ.get("LIVEDIFF_STATE_DIR"):
        return Path(os.environ["LIVEDIFF_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "livediff"


def machine_names(host: str = "", extra: Iterable[str] = ()) -> tuple[list[str], list[IpAddress]]:
    """The DNS names and IP addresses this server may be reached at.

    `localhost`, the host name and its FQDN; loopback; every address of every interface (ifaddr,
    which aiortc's ICE already uses); `host` when it names one address (not `0.0.0.0`); and
    `extra` (e.g. the public addresses of a NAT 1:1 mapping).
    """
    import ifaddr

    dns = {"localhost", socket.gethostname(), socket.getfqdn()}
    ips: set[IpAddress] = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    for adapter in ifaddr.get_adapters():
        for address in adapter.ips:
            value = address.ip if isinstance(address.ip, str) else address.ip[0]
            try:
                ip = ipaddress.ip_address(value.split("%")[0])
            except ValueError:
                continue
            if not ip.is_link_local:
                ips.add(ip)
    for name in (host, *extra):
        if not name:
            continue
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            dns.add(name)
            continue
        if not ip.is_unspecified:
            ips.add(ip)
    return sorted(n for n in dns if n), sorted(ips, key=lambda ip: (ip.version, int(ip)))


def self_signed(state_dir: Path, dns: list[str], ips: list[IpAddress]) -> Certificate:
    """The self-signed certificate in `state_dir/tls`, made (again) when missing, expiring within
    RENEW_BEFORE_DAYS, or not naming every one of `dns` and `ips`.

    ECDSA P-256, valid VALID_DAYS, CA:FALSE, server auth only; the key file is written 0600.
    """
    folder = state_dir / "tls"
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    if cert_path.is_file() and key_path.is_file():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if _covers(cert, dns, ips) and _valid_for(cert, RENEW_BEFORE_DAYS):
            return Certificate(**{**describe(cert_path, key_path).__dict__, "self_signed": True})
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"livediff on {socket.gethostname()}")])
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ip) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certificate = describe(cert_path, key_path)
    return Certificate(**{**certificate.__dict__, "self_signed": True, "created": True})


def describe(cert_path: Path, key_path: Path) -> Certificate:
    """Fingerprints and names of the certificate at `cert_path` (PEM; the first of a chain)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName)) + tuple(
            str(ip) for ip in san.get_values_for_type(x509.IPAddress)
        )
    except x509.ExtensionNotFound:
        names = ()
    return Certificate(
        cert=cert_path, key=key_path,
        fingerprint=":".join(f"{b:02X}" for b in hashlib.sha256(der).digest()),
        spki_sha256=base64.b64encode(hashlib.sha256(spki).digest()).decode(),
        names=names,
    )  # fmt: skip


def context_for(settings: ServerSettings) -> ssl.SSLContext | None:
    """The TLS context for `settings` after `prepare` (None for plain http)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return ssl_context(settings.tls_cert, settings.tls_key)


def ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context for `cert` (PEM, chain allowed) and `key`.

    Raises ConfigError naming `--tls-cert`/`--tls-key` when a file is missing or they do not match.
    """
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise ConfigError(f"{flag}: {path} is not a file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: cannot use {cert} with {key}: {exc}") from None
    return context


def _covers(cert: x509.Certificate, dns: list[str], ips: list[IpAddress]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(dns) <= set(san.get_values_for_type(x509.DNSName)) and set(ips) <= set(
        san.get_values_for_type(x509.IPAddress)
    )


def _valid_for(cert: x509.Certificate, days: int) -> bool:
    remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return remaining > datetime.timedelta(days=days)
