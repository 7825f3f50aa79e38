"""Which upstream a request goes to: the main one, or a ``[[providers]]`` one.

A request's model decides (docs/models.md): a model a provider lists in
``models`` goes there as it is; ``name/model`` goes to the provider called
``name`` as ``model`` (the prefix taken off, the body rewritten); anything
else goes to the main upstream unchanged. Each provider has its own client,
so its keys never serve another upstream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from ...transports.api import AsyncClient
from ...transports.json_body import Unsure, member, parse

MODEL_MEMBER = re.compile(rb'"model"\s*:\s*("[^"\\]*(?:\\.[^"\\]*)*")', re.DOTALL)
"""The ``model`` member with a string value (group 1: the string, quotes included)."""

__all__ = ["MODEL_MEMBER", "Routes", "model_string", "top_model"]


def top_model(body: bytes, strict: bool = False) -> str | None:
    """The top-level ``model`` string of a JSON request ``body`` (None: none),
    found without parsing the body when ``json_body.member`` can tell (and
    ``strict`` is False: see ``model_health.model_of``)."""
    if not strict:
        try:
            found = member(body, b'"model"', MODEL_MEMBER)
        except Unsure:
            pass
        else:
            return None if found is None else model_string(found)
    try:
        data: Any = parse(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def model_string(found: re.Match[bytes]) -> str | None:
    """The string ``MODEL_MEMBER`` found, decoded (None: a bad escape or bad
    UTF-8, which the upstream refuses anyway)."""
    written = found.group(1)
    try:  # no escapes (nearly every model id): the bytes are the string
        return written[1:-1].decode() if b"\\" not in written else str(json.loads(written))
    except ValueError:
        return None


@attrs.frozen
class Routes:
    """The providers' clients by name, and the models they claim by name."""

    clients: Mapping[str, AsyncClient]
    claimed: Mapping[str, str]

    def route(self, model: str) -> tuple[str, str] | None:
        """(provider, the model as it names it), or None for the main upstream."""
        name = self.claimed.get(model)
        if name is not None:
            return name, model
        prefix, slash, rest = model.partition("/")
        if slash and rest and prefix in self.clients:
            return prefix, rest
        return None

    def pick(self, body: bytes) -> tuple[str, bytes] | None:
        """The provider of a JSON request ``body`` and the body to send it
        (None: the main upstream, the body as it is). The model is found
        without parsing the body when ``json_body.member`` can tell, and a
        model the provider names otherwise is replaced in place."""
        try:
            found = member(body, b'"model"', MODEL_MEMBER)
        except Unsure:
            return self._pick_parsed(body)
        model = None if found is None else model_string(found)
        if found is None or model is None:
            return None
        routed = self.route(model)
        if routed is None:
            return None
        name, upstream_model = routed
        if upstream_model != model:
            start, end = found.span(1)
            body = body[:start] + json.dumps(upstream_model).encode() + body[end:]
        return name, body

    def _pick_parsed(self, body: bytes) -> tuple[str, bytes] | None:
        """``pick`` for a body that must be parsed to tell."""
        try:
            data: Any = parse(body)
        except ValueError:
            return None
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str):
            return None
        routed = self.route(model)
        if routed is None:
            return None
        name, upstream_model = routed
        if upstream_model != model:
            data["model"] = upstream_model
            body = json.dumps(data, separators=(",", ":")).encode()
        return name, body

    def status(self) -> dict[str, Any]:
        """Each provider's pool at a glance, for ``/status``."""
        return {name: client.status() for name, client in self.clients.items()}
