"""Who may call the proxy: client tokens, the admin token, short-lived tokens.

Tokens are kept as SHA-256 digests and compared with ``hmac.compare_digest``
against every configured token (no early exit), so neither the comparison nor
its timing tells how much of a guess was right. ``POST /auth/token`` (seed
004) exchanges a client token for a bearer token that expires after
``ttl`` seconds; issued tokens live in memory only, so a restart revokes them.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable, Mapping

from ..config import token_name
from .types import Request

__all__ = ["Auth", "Role"]

_MAX_ISSUED = 100_000  # live issued tokens at most; the oldest go first


class Role(enum.Enum):
    """What a request's bearer token makes its caller."""

    NONE = "none"  # no token, or a wrong one
    ISSUED = "issued"  # a short-lived token from ``issue``: a client that cannot mint more
    CLIENT = "client"
    ADMIN = "admin"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, if any."""
    value = request.header("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Auth:
    """The configured tokens and the tokens issued by ``issue``.

    ``open`` is True when no client token is configured: ``/v1/*`` then needs
    no token (the configuration allows that on a loopback address only).
    ``names``: client token -> the name its spend is recorded under (default:
    ``token_name``); a token issued by ``issue`` spends under its issuer's.
    """

    def __init__(
        self,
        client_tokens: Iterable[str] = (),
        admin_token: str | None = None,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        names: Mapping[str, str] | None = None,
    ) -> None:
        tokens = list(client_tokens)
        names = names or {}
        self._clients = [_digest(t) for t in tokens]
        self._names = [names.get(t) or token_name(t) for t in tokens]
        self._admin = _digest(admin_token) if admin_token else None
        self._issued: dict[bytes, tuple[float, str | None]] = {}  # digest -> (expiry, issuer)
        self.ttl = ttl
        self._clock = clock

    @property
    def open(self) -> bool:
        """No client token is configured: anyone who can connect may call."""
        return not self._clients

    @property
    def admin_enabled(self) -> bool:
        """An admin token is configured (else the admin API is off)."""
        return self._admin is not None

    def role(self, request: Request) -> Role:
        """What the request's bearer token makes its caller."""
        return self.identify(request)[0]

    def is_token(self, text: str) -> bool:
        """Whether ``text`` is the admin token or a client token (a name that
        would reveal one must not be shown)."""
        digest = _digest(text)
        known = [d for d in (self._admin, *self._clients) if d is not None]
        return any([hmac.compare_digest(digest, d) for d in known])  # no early exit

    def identify(self, request: Request) -> tuple[Role, str | None]:
        """What the request's bearer token makes its caller, and the name its
        spend goes under (``admin`` for the admin token; None: no client)."""
        token = bearer(request)
        if token is None:
            return Role.NONE, None
        digest = _digest(token)
        if self._admin is not None and hmac.compare_digest(digest, self._admin):
            return Role.ADMIN, "admin"
        matched = None
        for index, known in enumerate(self._clients):  # every one compared: no early exit
            if hmac.compare_digest(digest, known):
                matched = index
        if matched is not None:
            return Role.CLIENT, self._names[matched]
        issued = self._issued.get(digest)
        if issued is not None:
            if issued[0] > self._clock():
                return Role.ISSUED, issued[1]
            del self._issued[digest]
        return Role.NONE, None

    def issue(self, issuer: str | None = None) -> tuple[str, float]:
        """A fresh bearer token and its lifetime in seconds; its spend goes
        under ``issuer`` (the name of the client token that asked)."""
        now = self._clock()
        if len(self._issued) >= _MAX_ISSUED:
            self._issued = {d: e for d, e in self._issued.items() if e[0] > now}
            while len(self._issued) >= _MAX_ISSUED:
                del self._issued[next(iter(self._issued))]
        token = "krt_" + secrets.token_urlsafe(32)
        self._issued[_digest(token)] = (now + self.ttl, issuer)
        return token, self.ttl
