"""``keyrotor keys ...``: the admin API of a running proxy, from the command line.

The proxy's address comes from ``--url`` (or ``KEYROTOR_URL``, default
``http://127.0.0.1:8080``), the admin token from ``KEYROTOR_ADMIN_TOKEN``.
Secrets never go on the command line (where ``ps`` and shell history would
keep them): ``keys add`` reads the key from the variable ``--secret-env``
names, or from standard input (without echo on a terminal). Standard library
only (``urllib``): the proxy is usually on this machine.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import math
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import SplitResult, quote, urlsplit

__all__ = ["add_parser", "run"]

DEFAULT_URL = "http://127.0.0.1:8080"
_STATES = ("healthy", "enabled", "disabled", "rate_limited", "degraded", "depleted", "failed")
LONGEST_MARK = 10 * 365 * 86400
"""``keys mark --duration`` at most: ten years, as the admin API takes (a longer
time is a mistake)."""


def _number(minimum: float, *, zero: bool = False, most: float | None = None) -> Any:
    """An argparse ``type``: a finite number over ``minimum`` (or equal, with
    ``zero``), at most ``most``; a bad one is argparse's one-line error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r}") from None
        bound = "0 or more" if zero else "more than 0"
        if not math.isfinite(value) or value < minimum or (value == minimum and not zero):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, not {text[:40]!r}")
        if most is not None and value >= most:
            raise argparse.ArgumentTypeError(
                f"must be less than {most:.0f} (ten years), not {text[:40]!r}"
            )
        return value

    return parse


_ALIAS = re.compile(r"[A-Za-z0-9._:@+-]{1,128}")  # KeySpec's key_id (fullmatch)


def _alias(text: str) -> str:
    """An argparse ``type``: an alias the proxy takes (not checked against its keys)."""
    if not _ALIAS.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not an alias: use 1-128 letters, digits or ._:@+-"
        )
    return text


def _count(text: str) -> int:
    """An argparse ``type``: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


class _Refused(Exception):
    """The proxy answered with an error (or could not be reached)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_parser(commands: Any) -> None:
    """Add ``keys`` and its subcommands to the ``keyrotor`` parser."""
    keys = commands.add_parser(
        "keys",
        help="add, remove, list, mark or probe keys of a running proxy (its admin API)",
        description="Talks to a running `keyrotor serve` through its admin API. "
        "The admin token comes from KEYROTOR_ADMIN_TOKEN.",
    )
    keys.add_argument(
        "--url", help=f"the proxy's address (default $KEYROTOR_URL, else {DEFAULT_URL})"
    )
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every key: alias, state, source, counters")
    listing.add_argument("--json", action="store_true", help="print the admin API's JSON")
    add = actions.add_parser("add", help="add a key (read from --secret-env or standard input)")
    add.add_argument(
        "--alias", type=_alias, help="its name in logs and status (default: key-<hash>)"
    )
    add.add_argument(
        "--secret-env", metavar="VAR", help="read the key from this environment variable"
    )
    add.add_argument("--provider", help="a [[providers]] name (default: the main upstream)")
    positive = _number(0)
    add.add_argument("--weight", type=positive, help="share of traffic (more than 0)")
    add.add_argument("--account", help="keys of one account share account-wide limits")
    add.add_argument("--max-in-flight", type=_count)
    add.add_argument("--rpm", type=positive, help="known requests-per-minute limit")
    add.add_argument("--tpm", type=positive, help="known tokens-per-minute limit")
    add.add_argument("--budget", type=positive, help="spend limit in USD")
    add.add_argument("--budget-window", type=positive, help="seconds the budget applies to")
    add.add_argument("--credits", type=_number(0, zero=True), help="known balance in USD")
    remove = actions.add_parser("remove", help="remove a key (requests on it finish)")
    remove.add_argument("alias")
    mark = actions.add_parser("mark", help="set a key's state (healthy after a refund, ...)")
    mark.add_argument("alias")
    mark.add_argument("state", choices=_STATES)
    mark.add_argument(
        "--duration",
        type=_number(0, most=LONGEST_MARK),
        help="seconds, for rate_limited and degraded (and depleted); at most ten years",
    )
    probe = actions.add_parser("probe", help="probe one key, or every key")
    probe.add_argument("alias", nargs="?")


def run(
    args: argparse.Namespace,
    environ: Mapping[str, str] = os.environ,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Carry out ``keyrotor keys ACTION``; 0 on success, 1 refused, 2 unusable.

    The streams default to ``sys``'s at the time of the call."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    stderr = stderr or sys.stderr
    url = (args.url or environ.get("KEYROTOR_URL") or DEFAULT_URL).rstrip("/")
    given = "--url" if args.url else "KEYROTOR_URL" if environ.get("KEYROTOR_URL") else "the URL"
    parts = _proxy_url(url)
    if parts is None or parts.username is not None or parts.password is not None:
        problem, shown = (
            ("must not hold a user or password (the admin token is KEYROTOR_ADMIN_TOKEN)", "")
            if parts is not None
            else ("is not an http(s) URL", "" if "@" in url else f" {url!r}")
        )
        print(
            f"keyrotor keys: {given}{shown} {problem}; fix: give the proxy's "
            f"address, such as {DEFAULT_URL}",
            file=stderr,
        )
        return 2
    token = environ.get("KEYROTOR_ADMIN_TOKEN", "").strip()
    if not token:
        print("keyrotor keys: set KEYROTOR_ADMIN_TOKEN to the proxy's admin token", file=stderr)
        return 2
    if not plain_token(token):
        print(
            "keyrotor keys: KEYROTOR_ADMIN_TOKEN has whitespace, a second line or characters "
            "no token has (its value is not shown); fix: set it to the admin token alone",
            file=stderr,
        )
        return 2
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"keyrotor keys: warning: {url} is plain HTTP beyond this machine; the admin token "
            "(and any key added) cross the network unencrypted: use https",
            file=stderr,
        )
    try:
        if args.action == "list":
            listing = _call(url, token, "GET", "/admin/keys")
            if not isinstance(listing.get("keys"), list):
                raise _Refused(f"{url} did not answer as keyrotor's admin API; check {given}", 2)
            if args.json:  # the answer of GET /admin/keys, as it came
                print(json.dumps(listing, indent=2), file=stdout)
            else:
                _table(listing["keys"], stdout)
        elif args.action == "add":
            secret = _secret(args, environ, stdin)
            body: dict[str, Any] = {"key": secret, "alias": args.alias, "provider": args.provider}
            for name in ("weight", "account", "max_in_flight", "rpm", "tpm", "budget"):
                body[name] = getattr(args, name)
            body["budget_window"], body["credits"] = args.budget_window, args.credits
            added = _call(
                url, token, "POST", "/admin/keys", {k: v for k, v in body.items() if v is not None}
            )
            kept = "stored in the state file" if added.get("stored") else "in memory only"
            print(f"added {added['alias']} ({added['masked']}), {kept}", file=stdout)
        elif args.action == "remove":
            done = _call(url, token, "DELETE", f"/admin/keys/{_quote(args.alias)}")
            note = (
                " (it is configured: it returns at the next start)"
                if done.get("returns_at_restart")
                else ""
            )
            print(
                f"removed {args.alias}; {done['in_flight']} request(s) on it finish{note}",
                file=stdout,
            )
        elif args.action == "mark":
            body = {"state": args.state}
            if args.duration is not None:
                body["duration"] = args.duration
            key = _call(url, token, "POST", f"/admin/keys/{_quote(args.alias)}/state", body)
            print(f"{key['alias']} is {key['state']}", file=stdout)
        else:
            target = {"alias": args.alias} if args.alias else {}
            probing = _call(url, token, "POST", "/admin/probe", target)["probing"]
            print(f"probing {', '.join(probing) or 'no key'}", file=stdout)
    except _Refused as exc:
        print(f"keyrotor keys {args.action}: {exc}", file=stderr)
        return exc.code
    except (KeyError, TypeError, ValueError):  # an answer without the fields the API has
        print(
            f"keyrotor keys {args.action}: {url} did not answer as keyrotor's admin API; "
            f"check {given}",
            file=stderr,
        )
        return 2
    return 0


def _proxy_url(url: str) -> SplitResult | None:
    """``url`` split, if it is an http(s) URL with an ASCII host, a valid port
    and no whitespace or control characters."""
    if not url.isascii() or not url.isprintable() or " " in url:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
        if parts.hostname and not _is_address(parts.hostname):
            parts.hostname.encode("idna")  # an empty label ("a..b") raises UnicodeError
    except (ValueError, UnicodeError):
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def plain_token(token: str) -> bool:
    """Can ``token`` go in an ``Authorization`` header as it is (printable
    ASCII, no whitespace)?"""
    return token.isascii() and token.isprintable() and " " not in token


def _secret(args: argparse.Namespace, environ: Mapping[str, str], stdin: TextIO) -> str:
    if args.secret_env:
        value = environ.get(args.secret_env, "").strip()
        if not value:
            raise _Refused(f"the environment variable {args.secret_env} is empty or not set", 2)
        return value
    value = getpass.getpass("API key (not echoed): ") if stdin.isatty() else stdin.readline()
    value = value.strip()
    if not value:
        raise _Refused("no key given: pipe it on standard input or use --secret-env VAR", 2)
    return value


def _quote(alias: str) -> str:
    return quote(alias, safe="")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The admin token goes to the proxy named, never where a redirect points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _call(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with _OPENER.open(request, timeout=30) as response:
            answer = json.loads(response.read() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _Refused(f"{url} did not answer as keyrotor's admin API (not JSON)", 2) from None
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
        raise _Refused(f"the proxy answered {exc.code}: {message}", 1) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Refused(f"cannot reach the proxy at {url}: {reason}", 2) from None
    if not isinstance(answer, dict):
        raise _Refused(f"{url} did not answer as keyrotor's admin API (not a JSON object)", 2)
    return answer


def _table(keys: list[dict[str, Any]], out: TextIO) -> None:
    rows = [("ALIAS", "PROVIDER", "STATE", "SOURCE", "IN FLIGHT", "REQUESTS", "SPEND $", "KEY")]
    for key in keys:
        state = key["state"] + (f" ({key['until_in']:.0f}s)" if key.get("until_in") else "")
        rows.append(
            (
                key["alias"],
                key.get("provider", "main"),
                state,
                key.get("source", ""),
                str(key["in_flight"]),
                str(key["requests"]),
                f"{key['spend']:.4f}",
                key.get("masked", ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
