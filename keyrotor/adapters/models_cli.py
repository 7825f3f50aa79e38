"""``keyrotor models``: list and search a model catalog from the command line.

The catalog comes from the upstream's public ``GET /models`` (``--upstream``,
else ``OPENROUTER_BASE_URL``, else OpenRouter's), from the catalog a proxy
stored in its state file (``--state [PATH]``, read-only: works while the proxy
runs and offline), from a running proxy (``--proxy URL``: its merged catalog,
and the time to first byte it observed per model, for ``--sort latency``), or
from a saved ``/models`` document (``--file``). Standard library only for the
fetch (``urllib``), like ``keyrotor keys``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs

from ..models import Catalog, CatalogError, ModelInfo, parse_catalog
from ..transports.api import OPENROUTER_URL
from .storage import PROVIDER_CATALOG, default_state_path

__all__ = ["add_parser", "run"]

SORTS = ("price", "context", "created", "name", "latency")
TOKEN_ENV = "KEYROTOR_TOKEN"
"""The bearer token ``--proxy`` sends (a client token), from the environment."""
WIDTH = 80


class _Failed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_parser(commands: Any) -> None:
    """Add ``models`` to the ``keyrotor`` parser."""
    models = commands.add_parser(
        "models",
        help="list and search the model catalog (free models, context, parameters, prices)",
        description="Lists the models of the upstream's catalog, filtered and sorted. "
        "Prices are USD per million tokens.",
    )
    source = models.add_mutually_exclusive_group()
    source.add_argument(
        "--upstream", metavar="URL", help="fetch GET URL/models (default OpenRouter's)"
    )
    source.add_argument(
        "--state",
        metavar="PATH",
        nargs="?",
        const="",
        help="read the catalog a proxy stored in its state file (default path: as serve's)",
    )
    source.add_argument("--file", metavar="FILE", help="read a saved /models JSON document")
    source.add_argument(
        "--proxy",
        metavar="URL",
        help="ask a running keyrotor proxy (its catalog and observed latencies; "
        f"token: ${TOKEN_ENV})",
    )
    models.add_argument("--search", metavar="TEXT", help="only ids or names containing TEXT")
    models.add_argument("--free", action="store_true", help="only free models")
    models.add_argument("--min-context", type=int, metavar="N", help="only N tokens or more")
    models.add_argument(
        "--provider",
        metavar="P",
        help="only models of P: the catalog's provider, or the vendor in the id (openai/...)",
    )
    models.add_argument(
        "--supports",
        metavar="LIST",
        help="only models accepting every parameter of LIST (comma-separated: tools,seed)",
    )
    models.add_argument("--sort", default="name", help=f"order: {', '.join(SORTS)} (default name)")
    models.add_argument("--limit", type=int, metavar="N", help="print at most N models")
    models.add_argument("--json", action="store_true", help="print the entries as JSON")


def run(
    args: argparse.Namespace,
    out: TextIO | None = None,
    err: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``keyrotor models``; returns the exit code (2: bad arguments or catalog,
    1: the upstream could not be read)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    environ = os.environ if environ is None else environ
    latency: dict[str, float] = {}
    try:
        _check(args)
        if args.proxy is not None:
            catalog, latency = _from_proxy(args.proxy, environ)
        else:
            catalog = _load(args, environ)
    except _Failed as exc:
        print(f"keyrotor models: {exc}", file=err)
        return exc.code
    chosen = select(catalog, args, latency)
    if args.json:
        entries = [dict(model.raw) for model in chosen]
        for entry in entries:
            if entry["id"] in latency:
                entry["keyrotor_ttfb_ms"] = latency[entry["id"]]
        json.dump(entries, out, indent=2)
        out.write("\n")
    else:
        out.write(table(chosen))
    shown = f"{len(chosen)} of {len(catalog)} models"
    if catalog.problems:
        shown += f" ({len(catalog.problems)} catalog entries left out: they do not parse)"
    print(shown, file=err)
    return 0


def _check(args: argparse.Namespace) -> None:
    if args.sort not in SORTS:
        raise _Failed(f"--sort must be one of {', '.join(SORTS)}, not {args.sort!r}", 2)
    if args.sort == "latency" and args.proxy is None:
        raise _Failed("--sort latency needs --proxy URL: a running proxy observes the latencies", 2)
    if args.min_context is not None and args.min_context < 0:
        raise _Failed(f"--min-context must be 0 or more, not {args.min_context}", 2)
    if args.limit is not None and args.limit < 1:
        raise _Failed(f"--limit must be at least 1, not {args.limit}", 2)


def _load(args: argparse.Namespace, environ: Mapping[str, str]) -> Catalog:
    if args.file is not None:
        try:
            document = Path(args.file).read_bytes()
        except OSError as exc:
            raise _Failed(f"cannot read {args.file}: {exc.strerror}", 2) from None
        return _parse(document, f"{args.file}")
    if args.state is not None:
        return _stored(args.state or str(default_state_path(environ)))
    env_base = environ.get("OPENROUTER_BASE_URL", "").strip()
    base = args.upstream or env_base or OPENROUTER_URL
    option = "--upstream" if args.upstream else "OPENROUTER_BASE_URL" if env_base else "the URL"
    url = _url(base, "/models", option)
    document = _get(url, {}, "check --upstream, or read a stored catalog with --state")
    return _parse(document, url)


def _from_proxy(base: str, environ: Mapping[str, str]) -> tuple[Catalog, dict[str, float]]:
    """A running proxy's catalog (``/v1/models``) and the time to first byte
    it observed per model (``/status``), in ms."""
    from .keys_cli import plain_token

    token = environ.get(TOKEN_ENV, "").strip()
    if token and not plain_token(token):
        raise _Failed(
            f"{TOKEN_ENV} has whitespace, a second line or characters no token has "
            "(its value is not shown); fix: set it to the client token alone",
            2,
        )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    fix = f"check --proxy and, if the proxy has client tokens, ${TOKEN_ENV}"
    base = base.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base  # its OpenAI base URL given
    url = _url(base, "/v1/models", "--proxy")
    try:
        catalog = parse_catalog(_get(url, headers, fix), "keyrotor", priced=False)
    except CatalogError as exc:
        raise _Failed(f"{url}: {exc}", 2) from None
    except RecursionError:
        raise _Failed(f"{url}: the JSON is nested too deeply to be a model catalog", 2) from None
    try:
        models = json.loads(_get(_url(base, "/status", "--proxy"), headers, fix))["models"]
        latency = {m: float(row["ttfbMs"]) for m, row in models.items() if row["ttfbMs"]}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise _Failed(f"{base} answered /status without per-model figures; {fix}", 2) from None
    return catalog, latency


def _url(base: str, path: str, option: str) -> str:
    """``base`` + ``path``, once ``base`` is a well-formed http(s) URL (the
    URL is not shown when it holds a user or password)."""
    from .config import url_problem

    example = "http://127.0.0.1:8080" if option == "--proxy" else OPENROUTER_URL
    fix = f"fix: give the base URL, such as {example}"
    shown = "" if "@" in base else f", not {base!r}"
    if not base.startswith(("http://", "https://")):
        raise _Failed(f"{option} must be an http:// or https:// URL{shown}; {fix}", 2)
    problem = url_problem(base)
    if problem is not None:
        problem = problem.replace(" (keys go in [[keys]])", "")
        raise _Failed(f"{option} {problem}{shown}; {fix}", 2)
    return base.rstrip("/") + path


def _get(url: str, headers: Mapping[str, str], fix: str) -> bytes:
    """GET ``url`` (exit 1 when it cannot be read)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        raise _Failed(f"{url} answered {exc.code}; {fix}", 1) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Failed(f"cannot reach {url} ({reason}); {fix}", 1) from None
    except (ValueError, UnicodeError):  # a URL http.client refuses (checked first: rare)
        raise _Failed(f"cannot fetch {url}: it is not a valid URL; {fix}", 2) from None


def _parse(document: bytes | Any, where: str) -> Catalog:
    try:
        return parse_catalog(document)
    except CatalogError as exc:
        raise _Failed(f"{where}: {exc}", 2) from None
    except RecursionError:
        raise _Failed(f"{where}: the JSON is nested too deeply to be a model catalog", 2) from None


def _stored(path: str) -> Catalog:
    """The state file's catalogs: the main upstream's, with each provider's
    models named as requests name them (``provider/model``)."""
    if not Path(path).exists():
        raise _Failed(f"no state file at {path}; give its path with --state PATH", 2)
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT provider, document, etag, fetched_at FROM catalogs ORDER BY fetched_at DESC"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise _Failed(
            f"{path} holds no catalog ({exc}); run `keyrotor serve` once to fetch one", 2
        ) from None
    main = next((row for row in rows if not row[0].startswith(PROVIDER_CATALOG)), None)
    if main is None:
        raise _Failed(f"{path} holds no catalog yet; run `keyrotor serve` once to fetch one", 2)
    catalog = _parse(main[1], path)
    models = list(catalog.models)
    for stored_as, document, _, _ in sorted(rows):
        if stored_as.startswith(PROVIDER_CATALOG):
            name = stored_as[len(PROVIDER_CATALOG) :]
            try:
                theirs = parse_catalog(document, name, priced=False)
            except CatalogError:
                continue  # the proxy fetches it anew; the main catalog still lists
            models += [
                attrs.evolve(m, id=f"{name}/{m.id}", raw={**m.raw, "id": f"{name}/{m.id}"})
                for m in theirs.models
            ]
    return Catalog(catalog.provider, tuple(models), main[2], main[3], catalog.problems)


def select(
    catalog: Catalog, args: argparse.Namespace, latency: Mapping[str, float] | None = None
) -> list[ModelInfo]:
    """The catalog's models that pass the filters of ``args``, in the order it
    asks (``latency``: observed ms per model id, for ``--sort latency``)."""
    wanted = [p.strip() for p in (args.supports or "").split(",") if p.strip()]
    text = (args.search or "").lower()
    provider = args.provider

    def keep(model: ModelInfo) -> bool:
        return (
            (not args.free or model.free)
            and (args.min_context is None or (model.context_length or 0) >= args.min_context)
            and (
                provider is None
                or model.provider == provider
                or model.id.split("/", 1)[0] == provider
            )
            and model.supports(wanted)
            and (not text or text in model.id.lower() or text in model.name.lower())
        )

    chosen = [model for model in catalog.models if keep(model)]
    if args.sort == "latency":  # fastest first; models never observed last, by id
        seen = latency or {}
        chosen.sort(key=lambda m: (0, seen[m.id], m.id) if m.id in seen else (1, 0.0, m.id))
    else:
        chosen.sort(key=_SORT_KEYS[args.sort])
    return chosen if args.limit is None else chosen[: args.limit]


def _price(model: ModelInfo) -> tuple[int, float]:
    pricing = model.pricing
    if not pricing.known or pricing.variable:
        return (1, 0.0)  # unknown or variable prices last
    return (0, pricing.prompt + pricing.completion)


_SORT_KEYS: dict[str, Any] = {
    "price": _price,
    "context": lambda model: -(model.context_length or 0),
    "created": lambda model: -(model.created or 0),
    "name": lambda model: model.id,
}


def table(models: Sequence[ModelInfo]) -> str:
    """An 80-column table: id (cut with ``~`` past 40 characters), context,
    prompt and completion USD per million tokens, and notes (free, img: image
    input, tools)."""
    head = f"{'model':<40} {'context':>7} {'$/M in':>7} {'$/M out':>7}  notes"
    lines = [head, "-" * WIDTH]
    for model in models:
        model_id = model.id if len(model.id) <= 40 else model.id[:39] + "~"
        pricing = model.pricing
        if not pricing.known:
            prompt = completion = "?"
        elif pricing.variable:
            prompt = completion = "varies"
        else:
            prompt, completion = (_usd(price) for price in pricing.per_million())
        notes = [
            note
            for note, present in (
                ("free", model.free),
                ("img", "image" in model.input_modalities),
                ("tools", "tools" in model.supported_parameters),
            )
            if present
        ]
        context = _tokens(model.context_length)
        line = f"{model_id:<40} {context:>7} {prompt:>7} {completion:>7}  {','.join(notes)}"
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def _tokens(count: int | None) -> str:
    if count is None:
        return "?"
    if count >= 1_000_000:
        return f"{count / 1_000_000:.3g}M"
    return f"{round(count / 1000)}k" if count >= 1000 else str(count)


def _usd(per_million: float) -> str:
    if per_million == 0:
        return "0"
    return f"{per_million:.2f}" if per_million >= 0.1 else f"{per_million:.3f}"
