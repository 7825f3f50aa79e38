"""A top-level member of a JSON request body, found without parsing the body.

Agents send request bodies of tens or hundreds of KB (the conversation so far),
and the proxy asks two things of each: does it want a stream (``"stream":
true``: the first-byte deadline), and which model does it name (the provider
it goes to). ``json.loads`` answers both exactly at about 2 µs a KB, more than
the rest of the proxy's work on a 64 KB request. ``member`` answers them
exactly at the cost of a reverse substring search of the body and a look at
the bytes on the shorter side of the key's last appearance, and says when that
would cost about what parsing does (``Unsure``): the caller parses then.

Why it is exact: inside a JSON string every ``"`` is escaped, so ``"stream"``
followed by ``:`` can only be a key, unless its own first quote is escaped
(the end of a longer key or string, ``"x\\"stream"``: the parser decides). It
is a member of the top-level object when one bracket is open at it, which is
counted on whichever side of it is shorter (strings taken out first). The last
appearance is looked at, because ``json.loads`` keeps the last of a repeated
key; when that one is nested (or a string value) and the name appears earlier
too, or when both sides of it are large, the parser decides. One form is not
seen: a key whose letters are written as ``\\u`` escapes (``"str\\u0065am"``:
valid JSON no encoder writes, but a caller may; finding it would cost a scan of
the whole body, 20-50 µs at 64 KB, for every request). Where a caller's choice
of model must not slip past a policy (per-model budgets), the proxy parses.

Where a body must be parsed (a request naming a route is ranked on its whole
prompt), ``parse`` reads it as ``json.loads`` does, with msgspec's C decoder
when the ``fast`` extra is installed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

__all__ = ["NEAR", "Unsure", "member", "parse"]

_decode: Callable[[bytes], Any] | None
try:
    from msgspec.json import Decoder
except ImportError:  # the ``fast`` extra is not installed
    _decode = None
else:
    _decode = Decoder().decode

NEAR: Final = 4096
"""Bytes on the shorter side of a key that are always counted; beyond that,
only up to a quarter of the body (counting costs about twice what parsing does
a byte), else ``Unsure``."""

_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_COLON: Final = re.compile(rb"\s*:")


class Unsure(Exception):
    """The body must be parsed to tell (see ``member``)."""


def member(body: bytes, key: bytes, pattern: re.Pattern[bytes]) -> re.Match[bytes] | None:
    """The top-level member ``key`` (quoted: ``b'"stream"'``) of the JSON object
    ``body``, as ``pattern`` (``key``, ``:`` and the value it accepts) matches
    it at the key; None when the object has no such member with such a value.
    Raises ``Unsure`` when only parsing can tell. For a body that is not JSON,
    the answer means nothing (the upstream refuses such a body anyway)."""
    last = body.rfind(key)  # rfind: about three times as fast as ``in`` on CPython 3.11
    if last < 0:
        return None
    if _escaped(body, last):  # the end of a longer key or string (``"x\\"stream"``)
        raise Unsure
    end = last + len(key)
    after = len(body) - end
    if max(NEAR, len(body) // 4) < min(last, after):
        raise Unsure  # counting the shorter side would cost about what parsing does
    # The one bracket open at a top-level key: counted before it, or closed after it.
    opened = _opened(body[:last]) if last <= after else -_opened(body[end:])
    if opened == 1 and _COLON.match(body, end):
        # The last top-level member of that name: the one json.loads keeps.
        return pattern.match(body, last)  # None: a value the pattern does not accept
    if body.rfind(key, 0, last) < 0:
        return None  # its one appearance is nested, or a string value
    raise Unsure  # an earlier one may be the member


def _escaped(body: bytes, at: int) -> bool:
    """Whether the ``"`` at ``at`` is escaped (an odd run of backslashes before it):
    then it is inside a string, not a key's opening quote."""
    run = 0
    while at > run and body[at - run - 1] == 0x5C:  # backslash
        run += 1
    return run % 2 == 1


def _opened(text: bytes) -> int:
    """Brackets ``text`` opens minus those it closes, strings left out (``text``
    starts and ends outside a string)."""
    if text == b"{":  # before an object's first key (a model written first): the usual case
        return 1
    outside = _STRING.sub(b"", text) if b'"' in text else text
    return outside.count(b"{") + outside.count(b"[") - outside.count(b"}") - outside.count(b"]")


def parse(body: bytes) -> Any:
    """``json.loads(body)``: the same value, or a ``ValueError`` as it raises
    one, also for a document nested too deeply for the interpreter's stack
    (where ``json.loads`` raises ``RecursionError``: bad input like any other).
    With the ``fast`` extra, msgspec's decoder (C) reads it about three times
    as fast on a long body (64 KB: about 30 against 95 µs); ``json.loads``
    answers wherever msgspec refuses what it accepts (``NaN``, a BOM, a lone
    surrogate escape) and for every error."""
    try:
        if _decode is not None:
            try:
                return _decode(body)
            except ValueError:
                pass
        return json.loads(body)
    except RecursionError:
        raise ValueError("the JSON document is nested too deeply") from None
