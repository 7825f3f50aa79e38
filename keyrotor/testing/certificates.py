"""A self-signed certificate for 127.0.0.1, for an HTTPS fake upstream.

    cert, key = self_signed(directory)
    FakeUpstream(scenario, ssl_context=server_context(cert, key))
    ssl.create_default_context(cafile=str(cert))      # a client that trusts it
    SSL_CERT_FILE=cert keyrotor serve --upstream https://127.0.0.1:PORT/api/v1

Made by the ``openssl`` command (Debian's ``openssl`` package), an EC P-256 key,
valid one day, for ``127.0.0.1`` and ``localhost``: nothing is downloaded, and
the private key is a throwaway that never leaves ``directory``.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

_OPTIONS = (
    "req -x509 -nodes -days 1 -subj /CN=localhost -newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
    " -addext subjectAltName=IP:127.0.0.1,DNS:localhost"
)


def openssl_available() -> bool:
    """Whether the ``openssl`` command is there to make a certificate."""
    return shutil.which("openssl") is not None


def self_signed(directory: Path) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` into ``directory``; their paths.
    ``RuntimeError`` (one line) without the ``openssl`` command or if it fails."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("no openssl command to make a certificate; fix: apt-get install openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    done = subprocess.run(
        [openssl, *_OPTIONS.split(), "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"openssl could not make a certificate: {last}")
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context serving ``cert`` with ``key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
