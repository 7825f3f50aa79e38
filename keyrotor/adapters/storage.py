"""The proxy's state on disk: one SQLite file (stdlib ``sqlite3``, WAL mode).

What is kept:

- ``keys``: keys added through the admin API. The secret is encrypted with
  Fernet (AES-128-CBC + HMAC-SHA256) under ``KEYROTOR_SECRET_KEY``; a keyed
  fingerprint (HMAC-SHA256) detects a secret stored twice without revealing it.
- ``states``: each key's health state, its ``until`` and when it changed, in
  wall-clock Unix seconds (the caller converts from the core's monotonic clock).
- ``ledger``: spend per key per UTC day (requests, tokens, cost). Rows outlive
  their key: removing a key keeps its history.
- ``windows``: when each key's budget window (``budget_window``) last opened,
  in wall-clock Unix seconds: the ledger's days have no times, so this tells a
  restart when a window that was not used up ends.
- ``usage``: the same spend per provider, per model and per client token
  (``scope`` ``provider``, ``model`` or ``client`` and a name) per UTC day.
- ``catalogs``: each provider's last fetched model catalog.
- ``rollups``: the analytics of answers per minute, hour and day (``analytics``).
- ``meta``: the schema version, the per-file salt (of passphrases and of the
  keys' bindings), a check token that tells a wrong ``KEYROTOR_SECRET_KEY`` at
  open (refused while keys are stored; a file storing none takes the new key),
  the routes set through the admin API (``routes``: a JSON object, name ->
  route) and the analytics' roll-up cursor.

Writes. Admin changes (``add_key``, ``remove_key``) are committed before they
return; call them from a worker thread. Hot-path records (``record_state``,
``record_spend``, ``record_window``) append to an in-memory batch under a lock
(O(1), never blocking on the disk, never raising); a writer thread commits the
batch ``flush_interval`` seconds (100 ms by default) after its first record, in
ONE transaction, and sleeps while nothing is pending.

With ``flush_in_thread=False`` the owner commits the batch instead, calling
``flush_nowait()`` ``flush_interval`` after the first record, which
``on_pending`` tells it of (the proxy does, from its event loop: a writer thread
contending for the GIL with the request path cost more than the flush itself,
measured in docs/benchmarks.md).
``flush_nowait`` never waits: not for an admin call holding the file (it
skips), not for another process's write lock (it fails, the batch kept for the
next one). The thread then only copies the WAL into the file (a checkpoint,
every ``CHECKPOINT_INTERVAL`` on its own connection), so the disk's ``fsync``
never blocks the owner.

Durability. Every flush is one transaction and WAL keeps the file consistent
whatever happens, so a ``kill -9`` (or a crash) loses at most the records of
the last ``flush_interval`` plus the flush running at that moment (about
100 ms of state changes and spend by default; more only if a saturated
machine starves the thread that flushes) and never corrupts the file.
``close()`` flushes everything. A power loss can also lose the last
transactions (see ``synchronous=NORMAL`` below), never consistency.

Failures. When a flush fails (disk full, database locked, read-only file, I/O
error) the batch stays in memory and is retried on the next flush; each
distinct error is logged once, ``health()`` reports it (``ok`` False until a
flush succeeds again) and the caller keeps serving. At most ``max_pending``
entries wait in memory; beyond that the oldest analytics minutes, then the
oldest state rows, then the oldest days' spend, are dropped (and counted).
Analytics that cannot be written (a damaged ``rollups`` row or page) cost only
the batch's analytics: the states and spend are written, the analytics records
dropped (counted), and ``health()`` is not ok until a flush writes everything.

Without a secret key nothing secret can be stored (``SecretsLocked``, whose
message says how to set the variable); keys stored earlier are not loaded:
``load()`` lists their aliases in ``Loaded.skipped`` and logs one warning, so
the caller decides whether to start without them. States and spend need no key.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import secrets
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from ..core import KeyState
from ..core.config import finite
from . import analytics
from .analytics import Dims, Rollup

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

__all__ = [
    "PROVIDER_CATALOG",
    "SECRET_KEY_ENV",
    "USAGE_SCOPES",
    "AlreadyStored",
    "LedgerRow",
    "Loaded",
    "SecretsLocked",
    "Spend",
    "StateStore",
    "StorageError",
    "StoredCatalog",
    "StoredKey",
    "StoredState",
    "UsageRow",
    "cipher_for",
    "day_start",
    "default_state_path",
    "secret_key_from_env",
    "storable",
]

SECRET_KEY_ENV = "KEYROTOR_SECRET_KEY"
STATE_ENV = "KEYROTOR_STATE"
HOW_TO_SET_KEY = (
    f"export {SECRET_KEY_ENV}=$(python -c "
    '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())")'
)
_CHECK_PLAINTEXT = b"keyrotor state file check v1"
_MIN_PASSPHRASE = 16
_DAY = 86400
CHECKPOINT_INTERVAL: Final = 1.0
"""Seconds between WAL checkpoints when the owner flushes (``flush_in_thread=False``)."""


class StorageError(Exception):
    """The state file cannot be used; the message names the path and the fix, never a secret."""


class SecretsLocked(StorageError):
    """A secret was to be stored without ``KEYROTOR_SECRET_KEY``."""


class AlreadyStored(StorageError):
    """The alias or the secret of a key to store is stored already."""


@attrs.frozen
class StoredKey:
    """A key added through the admin API; ``spec``: ``KeySpec`` fields other than ``key_id``."""

    alias: str
    secret: str = attrs.field(repr=False)
    spec: dict[str, Any]
    added_at: float


@attrs.frozen
class StoredState:
    """A key's last health state; times are wall-clock Unix seconds."""

    alias: str
    state: str
    until: float | None
    reason: str
    changed_at: float


@attrs.frozen
class LedgerRow:
    """Spend of one key on one UTC day (``YYYY-MM-DD``)."""

    alias: str
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


@attrs.frozen
class UsageRow:
    """Spend of one provider, model or client token (``scope``) on one UTC day."""

    scope: str
    name: str
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


PROVIDER_CATALOG: Final = "provider/"
"""The ``catalogs`` row of a ``[[providers]]`` upstream is this and its name
(the main upstream's is ``openrouter``)."""

USAGE_SCOPES: Final = ("provider", "model", "client")
"""What the ``usage`` ledger keeps spend per, besides keys."""


@attrs.frozen
class StoredCatalog:
    """A provider's last fetched ``/models`` document, as the state file keeps it."""

    provider: str
    document: Any
    etag: str | None
    fetched_at: float


@attrs.frozen
class Loaded:
    """Everything needed at start; ``skipped``: stored keys not loaded (no secret key)."""

    keys: list[StoredKey]
    states: dict[str, StoredState]
    ledger: list[LedgerRow]
    skipped: list[str] = attrs.field(factory=list)
    usage: list[UsageRow] = attrs.field(factory=list)
    routes: dict[str, Any] = attrs.field(factory=dict)
    alerts: list[Any] | None = None  # the alert rules the admin API set (None: none yet)
    windows: dict[str, float] = attrs.field(factory=dict)  # alias -> its budget window's start


def secret_key_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """``KEYROTOR_SECRET_KEY`` without surrounding blanks, or None when unset or empty."""
    return environ.get(SECRET_KEY_ENV, "").strip() or None


def default_state_path(environ: Mapping[str, str] = os.environ) -> Path:
    """``$KEYROTOR_STATE``, else the platform's per-user data directory + ``keyrotor/state.db``.

    Linux and others: ``$XDG_DATA_HOME`` or ``~/.local/share``; macOS:
    ``~/Library/Application Support``; Windows: ``%LOCALAPPDATA%``.
    """
    if environ.get(STATE_ENV):
        return Path(environ[STATE_ENV]).expanduser()
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    if environ.get("XDG_DATA_HOME"):
        base = Path(environ["XDG_DATA_HOME"])
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    elif sys.platform == "win32" and environ.get("LOCALAPPDATA"):
        base = Path(environ["LOCALAPPDATA"])
    else:
        base = home / ".local" / "share"
    return base / "keyrotor" / "state.db"


class Spend:
    """Requests, tokens and USD added up (a ledger row's figures, or today's in ``/status``)."""

    __slots__ = ("completion_tokens", "cost", "prompt_tokens", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost = 0.0

    def add(self, other: Spend) -> None:
        self.count(other.requests, other.prompt_tokens, other.completion_tokens, other.cost)

    def count(self, requests: int, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        self.requests += requests
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost += cost

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": round(self.cost, 9),
        }


def _slot(spends: dict[Any, Spend], where: Any) -> Spend:
    """The spend at ``where``, created empty if there is none."""
    spend = spends.get(where)
    if spend is None:
        spend = spends[where] = Spend()
    return spend


_StateRow = tuple[str, float | None, str, float]  # state, until, reason, changed_at


class _Batch:
    """Records not committed yet: last state per alias (oldest first), last
    budget window start per alias, spend per (alias, day) and per (scope, name,
    day), analytics per (minute, dimensions)."""

    __slots__ = ("rollups", "spend", "states", "usage", "windows")

    def __init__(self) -> None:
        self.states: dict[str, _StateRow] = {}
        self.windows: dict[str, float] = {}
        self.spend: dict[tuple[str, str], Spend] = {}
        self.usage: dict[tuple[str, str, str], Spend] = {}
        self.rollups: dict[tuple[int, Dims], Rollup] = {}

    def __len__(self) -> int:
        windows_and_states = len(self.states) + len(self.windows)
        return windows_and_states + len(self.spend) + len(self.usage) + len(self.rollups)

    def pieces(self) -> list[tuple[dict[Any, Any], Any, _Batch]]:
        """A batch for each record of this one, with the table and key it is at."""
        out = []
        for table, name in ((self.states, "states"), (self.windows, "windows"),
                            (self.spend, "spend"), (self.usage, "usage"),
                            (self.rollups, "rollups")):  # fmt: skip
            for key, record in table.items():
                one = _Batch()
                getattr(one, name)[key] = record
                out.append((table, key, one))
        return out

    def merge(self, newer: _Batch) -> None:
        for alias, row in newer.states.items():
            self.states.pop(alias, None)  # keep the dict ordered by recency
            self.states[alias] = row
        self.windows.update(newer.windows)
        _merge(self.spend, newer.spend)
        _merge(self.usage, newer.usage)
        _merge(self.rollups, newer.rollups)


def _merge(mine: dict[Any, Any], newer: Mapping[Any, Any]) -> None:
    """Add ``newer``'s figures (``Spend`` or ``Rollup``) into ``mine``."""
    for where, spend in newer.items():
        if where in mine:
            mine[where].add(spend)
        else:
            mine[where] = spend


def _utc_day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def storable(text: str) -> bool:
    """Whether the state file can keep ``text`` (UTF-8: no lone surrogate, which
    JSON's ``"\\ud800"`` gives)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_STATES: Final = frozenset(state.value for state in KeyState)
"""The key states a ``states`` row may hold."""


def _time_or_none(value: object) -> bool:
    return value is None or finite(value)


def _day_ok(day: object) -> bool:
    """Whether ``day`` is a ledger day (``YYYY-MM-DD``)."""
    try:
        day_start(day)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def day_start(day: str) -> float:
    """The Unix time a ledger's UTC ``day`` (``YYYY-MM-DD``) starts (``ValueError``: no day)."""
    return float(calendar.timegm(time.strptime(day, "%Y-%m-%d")))


def cipher_for(secret_key: str, salt: bytes) -> Fernet:
    """A Fernet for ``secret_key`` as the state file takes it (a Fernet key, or a
    passphrase stretched with ``salt``); ``StorageError`` when it will not do."""
    return _cipher(secret_key, salt, Path("the shared state"))[0]


def _cipher(secret_key: str, salt: bytes, path: Path) -> tuple[Fernet, bytes]:
    """A Fernet for ``secret_key`` (a Fernet key, or a passphrase of 16+ characters
    stretched with scrypt and the file's salt) and the key for fingerprints."""
    try:
        from cryptography.fernet import Fernet
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    except ImportError:  # pragma: no cover - cryptography is a dependency of the proxy
        raise StorageError(
            f"storing keys in {path} needs the 'cryptography' package: pip install cryptography"
        ) from None
    key = secret_key.strip()
    raw: bytes | None = None
    if len(key) == 44:
        try:
            raw = base64.urlsafe_b64decode(key)
        except (ValueError, binascii.Error):
            raw = None
    if raw is None or len(raw) != 32:
        if len(key) < _MIN_PASSPHRASE:
            raise StorageError(
                f"{SECRET_KEY_ENV} is too short: use a Fernet key ({HOW_TO_SET_KEY}) "
                f"or a passphrase of at least {_MIN_PASSPHRASE} characters"
            )
        raw = Scrypt(salt=salt, length=32, n=2**14, r=8, p=1).derive(key.encode())
    fingerprint_key = hmac.new(raw, b"keyrotor fingerprint v1", hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(raw)), fingerprint_key


def _prepare(path: Path) -> None:
    """Create missing parent directories (0o700) and the file (0o600) before SQLite writes."""
    try:
        missing = [p for p in reversed(path.parents) if not p.exists()]
        for directory in missing:
            directory.mkdir(mode=0o700)
        if not path.exists():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise StorageError(
            f"cannot create the state file {path}: {exc.strerror}; make its directory writable "
            f"by this user or set {STATE_ENV} to another path"
        ) from None


def _private(path: Path, log: Callable[[str], None]) -> None:
    """Make the file and its -wal/-shm companions owner-only if they are not."""
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = stat.S_IMODE(name.stat().st_mode)
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
                log(f"keyrotor storage: {name} was readable by others; made it owner-only")
        except FileNotFoundError:
            pass
        except OSError as exc:
            log(f"keyrotor storage: cannot restrict permissions of {name}: {exc.strerror}")


class StateStore:
    """The state file, open. Build with ``StateStore.open``; ``close()`` when done.

    One connection, used under one lock by whoever flushes (the writer thread,
    or the owner) and by admin calls (so they never race each other for
    SQLite's lock); the hot path only takes a short lock on the in-memory batch.
    """

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        *,
        cipher: Fernet | None,
        fingerprint_key: bytes | None,
        flush_interval: float,
        log: Callable[[str], None],
        wall_clock: Callable[[], float],
        max_pending: int,
        recent: dict[tuple[str, str], Spend],
        recent_since: str,
        busy_timeout: float = 5.0,
        flush_in_thread: bool = True,
    ) -> None:
        self.path = path
        self._busy_ms = max(0, round(busy_timeout * 1000))
        self.flush_in_thread = flush_in_thread
        self._conn: sqlite3.Connection | None = conn
        self._cipher = cipher
        self._fingerprint_key = fingerprint_key
        self._interval = flush_interval
        self._log = log
        self._clock = wall_clock
        self._max_pending = max_pending
        self._db_lock = threading.Lock()  # the connection and ``_unsaved``
        self._pending_lock = threading.Lock()  # ``_pending``; also taken to change ``_unsaved``
        self._pending = _Batch()  # recorded since the last flush began
        self._unsaved = _Batch()  # taken by a flush, not committed yet (kept on failure)
        self._recent = recent  # committed spend of recent days (``ledger()`` without the disk)
        self._recent_since = recent_since
        self._day_cache = (0.0, 0.0, "")
        self._ok = True
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._logged: set[str] = set()
        self._failed_writes = 0
        self._dropped = 0
        self._last_flush: float | None = None
        self._closed = False
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._run, name="keyrotor-storage", daemon=True)
        self._lock_fd: int | None = None  # held while open: one process per file
        self._salt = b""
        self.retention = analytics.Retention()  # of the analytics rows (set by the proxy)
        self._minute_rows: dict[Any, Rollup] = {}  # open minutes' rows as committed (analytics)
        self._wake: Callable[[], None] | None = None  # ``on_pending``: the owner's flusher
        self._woken = False  # the flusher was woken for the records pending now
        self._stir = threading.Event()  # wakes the writer thread: a first record, or close

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        secret_key: str | None,
        flush_interval: float = 0.1,
        log: Callable[[str], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        max_pending: int = 100_000,
        flush_in_thread: bool = True,
    ) -> StateStore:
        """Open (or create) the state file at ``path`` and start the writer thread.

        ``secret_key``: a Fernet key (44 characters of urlsafe base64 decoding to
        32 bytes), else a passphrase of 16+ characters stretched with scrypt and
        the file's salt; ``None``: secrets can be neither stored nor loaded.
        ``busy_timeout``: how long a write waits for another process holding the
        file. ``max_pending``: records kept in memory while writes fail.
        ``flush_in_thread`` False: the caller calls ``flush_nowait()``
        ``flush_interval`` after a batch's first record (``on_pending``) and the
        thread only checkpoints (see above). Raises
        ``StorageError`` (a wrong key, a newer schema, not a state file, which
        is then left as it was, a lost salt that stored keys or bindings need,
        an unusable path). ``load().states`` holds every alias recorded, including
        keys from the configuration file.
        """
        path = Path(path).expanduser().absolute()
        emit = log or logging.getLogger(__name__).warning
        _prepare(path)
        lock = _lock(path)
        try:
            conn = sqlite3.connect(
                str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            os.close(lock)
            raise _open_error(path, exc) from None
        try:
            cipher, fingerprint_key, recent, since, salt = _setup(
                conn, path, secret_key, wall_clock, emit
            )
            if not flush_in_thread:
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # the thread's job (_checkpoints)
        except sqlite3.Error as exc:
            conn.close()
            os.close(lock)
            raise _open_error(path, exc) from None
        except BaseException:
            conn.close()
            os.close(lock)
            raise
        _private(path, emit)
        store = cls(
            path,
            conn,
            cipher=cipher,
            fingerprint_key=fingerprint_key,
            flush_interval=flush_interval,
            log=emit,
            wall_clock=wall_clock,
            max_pending=max_pending,
            recent=recent,
            recent_since=since,
            busy_timeout=busy_timeout,
            flush_in_thread=flush_in_thread,
        )
        store._lock_fd, store._salt = lock, salt
        store._writer.start()
        return store

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StateStore {str(self.path)!r}>"

    def has_secrets_key(self) -> bool:
        """Whether secrets can be stored and loaded (``KEYROTOR_SECRET_KEY`` was given)."""
        return self._cipher is not None

    # -- reading -----------------------------------------------------------------------------

    def load(self) -> Loaded:
        """Everything in the file (after flushing what is pending). Blocking."""
        self.flush()
        with self._db_lock:
            conn = self._connection()
            try:
                key_rows = conn.execute(
                    "SELECT alias, secret, spec, added_at FROM keys ORDER BY added_at, alias"
                ).fetchall()
                state_rows = conn.execute(
                    "SELECT alias, state, until, reason, changed_at FROM states ORDER BY alias"
                ).fetchall()
                ledger_rows = conn.execute(
                    "SELECT alias, day, requests, prompt_tokens, completion_tokens, cost "
                    "FROM ledger ORDER BY day, alias"
                ).fetchall()
                usage_rows = conn.execute(
                    "SELECT scope, name, day, requests, prompt_tokens, completion_tokens, cost "
                    "FROM usage ORDER BY day, scope, name"
                ).fetchall()
                routes_row = conn.execute("SELECT value FROM meta WHERE name = 'routes'").fetchone()
                alerts_row = conn.execute("SELECT value FROM meta WHERE name = 'alerts'").fetchone()
                window_rows = conn.execute("SELECT alias, start FROM windows").fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read {self.path}: {exc}") from None
        keys: list[StoredKey] = []
        skipped: list[str] = []
        for alias, token, spec, added_at in key_rows:
            try:
                options = json.loads(spec)
            except (TypeError, ValueError):
                options = None
            if not isinstance(options, dict):
                self._damaged("keys", alias)
                continue
            secret = self._decrypt(alias, token)
            if secret is None:
                skipped.append(alias)
            else:
                keys.append(StoredKey(alias, secret, options, added_at))
        if skipped and self._cipher is None:
            self._log(
                f"keyrotor storage: {len(skipped)} key(s) stored in {self.path} are not loaded "
                f"because {SECRET_KEY_ENV} is not set; set it to the key they were stored with"
            )
        states = {}
        for row in state_rows:
            if row[1] in _STATES and _time_or_none(row[2]) and _time_or_none(row[4]):
                states[row[0]] = StoredState(*row)
            else:
                self._damaged("states", row[0])
        ledger = []
        for row in ledger_rows:
            if _day_ok(row[1]) and all(finite(n) for n in row[2:]):
                ledger.append(LedgerRow(*row))
            else:
                self._damaged("ledger", row[0])
        windows = {}
        for alias, start in window_rows:
            if finite(start):
                windows[alias] = float(start)
            else:
                self._damaged("windows", alias)
        return Loaded(
            keys,
            states,
            ledger,
            skipped,
            [UsageRow(*row) for row in usage_rows],
            self._routes(routes_row),
            self._alerts(alerts_row),
            windows,
        )

    def _damaged(self, table: str, alias: object) -> None:
        """A row of ``table`` that cannot be read back: left out, and said."""
        self._log(
            f"keyrotor storage: a damaged row of {table!r} in {self.path} (key {alias!r}) "
            "is left out; the key starts from the configuration"
        )

    def _alerts(self, row: tuple[str] | None) -> list[Any] | None:
        if row is None:
            return None
        try:
            rules = json.loads(row[0])
        except ValueError:
            rules = None
        if not isinstance(rules, list):
            self._log(
                f"keyrotor storage: the stored alert rules in {self.path} are not JSON; ignored"
            )
            return None
        return rules

    def _routes(self, row: tuple[str] | None) -> dict[str, Any]:
        if row is None:
            return {}
        try:
            routes = json.loads(row[0])
        except ValueError:
            routes = None
        if not isinstance(routes, dict):
            self._log(f"keyrotor storage: the stored routes in {self.path} are not JSON; ignored")
            return {}
        return routes

    def save_routes(self, routes: Mapping[str, Any]) -> None:
        """Keep the routes set through the admin API (name -> route JSON),
        replacing those kept before. Blocking; raises ``StorageError``."""
        self.save_meta("routes", dict(routes))

    def instance_id(self) -> str:
        """This file's id among the processes that share a pool (made once, kept
        in ``meta``): its spend in Redis is told from the others' after a
        restart. Blocking; raises ``StorageError``."""
        with self._db_lock:
            try:
                row = (
                    self._connection()
                    .execute("SELECT value FROM meta WHERE name = 'instance'")
                    .fetchone()
                )
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read {self.path}: {exc}") from None
        if row is not None:
            return str(json.loads(row[0]))
        made = secrets.token_hex(6)
        self.save_meta("instance", made)
        return made

    def save_meta(self, name: str, value: Any) -> None:
        """Keep ``value`` (JSON) under ``name`` in the file's ``meta`` table (the
        routes and alert rules the admin API sets). Blocking; raises ``StorageError``
        (also for a value JSON cannot hold: NaN, an infinity)."""
        try:
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except (ValueError, TypeError) as exc:
            raise StorageError(f"cannot keep {name} in {self.path}: {exc}") from None
        with self._db_lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, text)
                )
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StorageError(
                    f"cannot store the {name} in {self.path}: {exc}; check the disk and the "
                    "file's permissions"
                ) from None

    def _decrypt(self, alias: str, token: bytes) -> str | None:
        if self._cipher is None:
            return None
        from cryptography.fernet import InvalidToken

        try:
            return self._cipher.decrypt(token).decode()
        except (InvalidToken, UnicodeDecodeError):
            self._log(f"keyrotor storage: the secret of key {alias!r} in {self.path} is damaged")
            return None

    def ledger(self, day: str | None = None) -> list[LedgerRow]:
        """Spend on ``day`` (UTC ``YYYY-MM-DD``; default today), committed and pending.

        Today and yesterday come from memory (never waiting on the disk); older
        days read the file and may block.
        """
        day = day or self._day(self._clock())
        totals: dict[str, Spend] = {}
        if day >= self._recent_since:
            with self._pending_lock:
                for alias, spend in self._held(day, recent=True):
                    totals.setdefault(alias, Spend()).add(spend)
        else:
            with self._db_lock:
                try:
                    rows = self._connection().execute(
                        "SELECT alias, requests, prompt_tokens, completion_tokens, cost "
                        "FROM ledger WHERE day = ?",
                        (day,),
                    )
                    for alias, *values in rows:
                        spend = totals.setdefault(alias, Spend())
                        spend.requests, spend.prompt_tokens, spend.completion_tokens = values[:3]
                        spend.cost = values[3]
                except sqlite3.Error as exc:
                    raise StorageError(f"cannot read {self.path}: {exc}") from None
                with self._pending_lock:
                    for alias, spend in self._held(day, recent=False):
                        totals.setdefault(alias, Spend()).add(spend)
        return [
            LedgerRow(a, day, s.requests, s.prompt_tokens, s.completion_tokens, s.cost)
            for a, s in sorted(totals.items())
        ]

    def cost_on(self, day: str | None = None) -> float:
        """USD spent on ``day`` (default today): the ``ledger(day)`` rows'
        costs added up, without making the rows (``/status`` asks every
        second; at 10,000 keys the rows cost ~35 ms)."""
        day = day or self._day(self._clock())
        if day < self._recent_since:
            return sum(row.cost for row in self.ledger(day))
        with self._pending_lock:
            return sum(spend.cost for _, spend in self._held(day, recent=True))

    def _held(self, day: str, *, recent: bool) -> Iterator[tuple[str, Spend]]:
        """(alias, spend) on ``day`` in memory, not yet written (and with
        ``recent``, today's and yesterday's written too); under ``_pending_lock``."""
        sources = (self._unsaved.spend, self._pending.spend)
        for source in (self._recent, *sources) if recent else sources:
            for (alias, when), spend in source.items():
                if when == day:
                    yield alias, spend

    def health(self) -> dict[str, Any]:
        """JSON-able health for ``/status``."""
        return {
            "path": str(self.path),
            "ok": self._ok,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
            "failed_writes": self._failed_writes,
            "dropped": self._dropped,
            "pending": len(self._pending) + len(self._unsaved),
            "last_flush": self._last_flush,
            "flush_interval": self._interval,
            "secrets": self._cipher is not None,
        }

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"`` for a sound file."""
        with self._db_lock:
            rows = self._connection().execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(row[0]) for row in rows)

    # -- admin changes (blocking, committed on return) ---------------------------------------

    def add_key(self, alias: str, secret: str, spec: Mapping[str, Any]) -> None:
        """Store a key; raises ``SecretsLocked`` without a secret key, ``StorageError`` when
        the alias or the secret is already stored or the write fails."""
        if self._cipher is None or self._fingerprint_key is None:
            raise SecretsLocked(
                f"cannot store key {alias!r}: {SECRET_KEY_ENV} is not set, and secrets are only "
                f"stored encrypted. Set it (and keep it: it is needed to read {self.path} "
                f"again), then restart: {HOW_TO_SET_KEY}"
            )
        if not alias or not secret:
            raise StorageError("a key needs a non-empty alias and secret")
        try:
            spec_json = json.dumps(dict(spec), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StorageError(f"the spec of key {alias!r} is not JSON data: {exc}") from None
        token = self._cipher.encrypt(secret.encode())
        fingerprint = hmac.new(self._fingerprint_key, secret.encode(), hashlib.sha256).hexdigest()
        row = None
        with self._db_lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute(
                    "SELECT alias, alias = ? FROM keys WHERE alias = ? OR fingerprint = ?",
                    (alias, alias, fingerprint),
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO keys (alias, fingerprint, secret, spec, added_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (alias, fingerprint, token, spec_json, self._clock()),
                    )
                conn.execute("COMMIT" if row is None else "ROLLBACK")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StorageError(
                    f"cannot store key {alias!r} in {self.path}: {exc}; check the disk and "
                    "the file's permissions"
                ) from None
        if row is not None:
            raise AlreadyStored(
                f"key {alias!r} is already stored in {self.path}: remove it first or choose "
                "another alias"
                if row[1]
                else f"this secret is already stored in {self.path} as key {row[0]!r}"
            )

    def save_catalog(
        self, provider: str, document: Mapping[str, Any], etag: str | None, fetched_at: float
    ) -> None:
        """Keep ``provider``'s catalog (its ``/models`` JSON ``document``), the
        one a restart serves until a refresh succeeds. Raises ``StorageError``."""
        text = json.dumps(document, separators=(",", ":"), allow_nan=False)
        with self._db_lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT OR REPLACE INTO catalogs (provider, document, etag, fetched_at) "
                    "VALUES (?, ?, ?, ?)",
                    (provider, text, etag, fetched_at),
                )
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StorageError(
                    f"cannot store the {provider!r} catalog in {self.path}: {exc}; check the "
                    "disk and the file's permissions"
                ) from None

    def catalogs(self) -> dict[str, StoredCatalog]:
        """The stored catalogs by provider (a document that no longer parses as
        JSON is left out: the next fetch replaces it)."""
        with self._db_lock:
            try:
                rows = (
                    self._connection()
                    .execute("SELECT provider, document, etag, fetched_at FROM catalogs")
                    .fetchall()
                )
            except sqlite3.DatabaseError as exc:  # a damaged page: fetched anew
                self._log(f"keyrotor storage: the stored catalogs in {self.path}: {exc}; ignored")
                return {}
        stored = {}
        for provider, text, etag, fetched_at in rows:
            try:
                document = json.loads(text)
            except ValueError:
                self._log(f"the stored {provider!r} catalog is not JSON; it will be fetched anew")
                continue
            stored[provider] = StoredCatalog(provider, document, etag, fetched_at)
        return stored

    def remove_key(self, alias: str) -> bool:
        """Forget a stored key, its state and its budget window's start (its
        ledger rows stay); False if not stored."""
        with self._db_lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                removed = conn.execute("DELETE FROM keys WHERE alias = ?", (alias,)).rowcount > 0
                if removed:
                    conn.execute("DELETE FROM states WHERE alias = ?", (alias,))
                    conn.execute("DELETE FROM windows WHERE alias = ?", (alias,))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StorageError(f"cannot remove key {alias!r} from {self.path}: {exc}") from None
            if removed:
                with self._pending_lock:
                    for batch in (self._pending, self._unsaved):
                        batch.states.pop(alias, None)
                        batch.windows.pop(alias, None)
        return removed

    # -- hot path (never blocks on the disk, never raises) ------------------------------------

    def bind(self, secrets: Mapping[str, str]) -> list[str]:
        """Tie each alias to the key it names now (a salted SHA-256 of the secret).

        An alias that named another key before (a rotated secret, environment
        keys in another order, an alias reused for a new key) loses its stored
        state, and its spend history (the ledger and the budget window's start)
        moves to ``ALIAS~XXXXXXXX`` (8 hex digits of the old fingerprint), so
        the new key inherits neither. Returns those aliases. Blocking and
        durable; call at start and when a key is added.
        """
        marks = {
            alias: hashlib.sha256(b"keyrotor binding v1" + self._salt + secret.encode()).hexdigest()
            for alias, secret in secrets.items()
        }
        self.flush()  # pending records belong to the keys as they were
        moved: dict[str, str] = {}
        with self._db_lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                for alias, mark in marks.items():
                    row = conn.execute(
                        "SELECT fingerprint FROM bindings WHERE alias = ?", (alias,)
                    ).fetchone()
                    if row is not None and row[0] == mark:
                        continue
                    if row is not None:
                        moved[alias] = retired = f"{alias}~{row[0][:8]}"
                        conn.execute("DELETE FROM states WHERE alias = ?", (alias,))
                        conn.execute(
                            "INSERT INTO ledger SELECT ?, day, requests, prompt_tokens, "
                            "completion_tokens, cost FROM ledger WHERE alias = ? "
                            "ON CONFLICT (alias, day) DO UPDATE SET "
                            "requests = requests + excluded.requests, "
                            "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                            "completion_tokens = completion_tokens + excluded.completion_tokens, "
                            "cost = cost + excluded.cost",
                            (retired, alias),
                        )
                        conn.execute("DELETE FROM ledger WHERE alias = ?", (alias,))
                        conn.execute(
                            "INSERT OR REPLACE INTO windows SELECT ?, start FROM windows "
                            "WHERE alias = ?",
                            (retired, alias),
                        )
                        conn.execute("DELETE FROM windows WHERE alias = ?", (alias,))
                    conn.execute(
                        "INSERT OR REPLACE INTO bindings VALUES (?, ?, ?)",
                        (alias, mark, self._clock()),
                    )
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StorageError(
                    f"cannot record the keys' identities in {self.path}: {exc}"
                ) from None
        if moved:
            with self._pending_lock:
                for (alias, day), spend in list(self._recent.items()):
                    if alias in moved:
                        del self._recent[(alias, day)]
                        self._recent.setdefault((moved[alias], day), Spend()).add(spend)
        return sorted(moved)

    def forget_keys(self) -> int:
        """Delete every stored key (and the secret key's check), for when
        ``KEYROTOR_SECRET_KEY`` is lost: states and spend stay, the keys are
        added again under a new secret key. Returns how many were deleted."""
        with self._db_lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                count = conn.execute("DELETE FROM keys").rowcount
                conn.execute("DELETE FROM meta WHERE name = 'check'")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StorageError(f"cannot delete the keys stored in {self.path}: {exc}") from None
        self._cipher = self._fingerprint_key = None  # the old check is gone: reopen to store
        return count

    def record_state(self, alias: str, state: str, until: float | None, reason: str) -> None:
        """Remember a key's state (wall-clock ``until``); the last one per alias wins."""
        if self._closed:
            return
        row = (state, until, reason, self._clock())
        with self._pending_lock:
            states = self._pending.states
            states.pop(alias, None)
            states[alias] = row
            self._added()

    def record_window(self, alias: str, start: float) -> None:
        """Remember when the budget window of ``alias`` opened (wall clock); the last one wins."""
        if self._closed:
            return
        with self._pending_lock:
            self._pending.windows[alias] = start
            self._added()

    def record_spend(
        self,
        alias: str,
        *,
        requests: int = 1,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost: float = 0.0,
        at: float | None = None,
    ) -> None:
        """Add spend to the ledger of ``alias`` on the UTC day of ``at`` (default now)."""
        day = self._day_of(at, "record_spend")
        if day is None:
            return
        with self._pending_lock:
            _slot(self._pending.spend, (alias, day)).count(
                requests, prompt_tokens, completion_tokens, cost
            )
            self._added()

    def record_usage(
        self,
        names: Mapping[str, str],
        *,
        requests: int = 1,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost: float = 0.0,
        at: float | None = None,
    ) -> None:
        """Add one answer's spend to the ``usage`` ledger of each ``scope: name``
        in ``names`` (``USAGE_SCOPES``) on the UTC day of ``at`` (default now)."""
        day = self._day_of(at, "record_usage")
        if day is None or not names:
            return
        with self._pending_lock:
            for scope, name in names.items():
                _slot(self._pending.usage, (scope, name, day)).count(
                    requests, prompt_tokens, completion_tokens, cost
                )
            self._added()

    def record_answer(
        self,
        at: float,
        dims: Dims,
        status: int,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost: float = 0.0,
        ttfb_ms: float | None = None,
        total_ms: float | None = None,
    ) -> None:
        """Count one delivered answer in the analytics of its minute (``at``)
        and ``dims`` (key, provider, model, route, client; "" for none)."""
        if self._closed or not math.isfinite(at):
            return
        where = (int(at) - int(at) % 60, dims)
        with self._pending_lock:
            rollups = self._pending.rollups
            slot = rollups.get(where)
            if slot is None:
                slot = rollups[where] = Rollup()
            slot.note(status, prompt_tokens, completion_tokens, cost, ttfb_ms, total_ms)
            self._added()

    def on_pending(self, wake: Callable[[], None] | None) -> None:
        """Have ``wake()`` called when a record lands while nothing was pending
        (once until the next flush takes the records; from the recording thread,
        under the store's lock: it must be quick and must not call the store).
        An owner that flushes (``flush_in_thread=False``) can then sleep while
        there is nothing to write, instead of waking every ``flush_interval``."""
        with self._pending_lock:
            self._wake = wake
            self._woken = False

    def pending(self) -> bool:
        """Whether records wait for a flush (new ones, or a batch a failed flush kept)."""
        return bool(self._pending or self._unsaved)

    def _added(self) -> None:
        """A record was added (under ``_pending_lock``): wake the flusher, the
        writer thread or the owner's, once for the records pending now."""
        if not self._woken:
            self._woken = True
            self._stir.set()
            if self._wake is not None:
                self._wake()

    def analytics(self, q: analytics.Query, account_of: Callable[[str], str]) -> list[Any]:
        """The rows of an analytics query, committed and pending (reads the file)."""
        with self._db_lock:
            with self._pending_lock:
                pending: dict[tuple[int, Dims], Rollup] = {}
                for batch in (self._unsaved, self._pending):
                    for where, rollup in batch.rollups.items():
                        pending.setdefault(where, Rollup()).add(rollup)
            try:
                return analytics.query(self._connection(), q, account_of, pending)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read {self.path}: {exc}") from None

    def _day_of(self, at: float | None, caller: str) -> str | None:
        """The UTC day of ``at`` (default now); None when closed or ``at`` is no time."""
        if self._closed:
            return None
        try:
            return self._day(self._clock() if at is None else at)
        except (ValueError, OverflowError, OSError):
            self._warn_once(f"keyrotor storage: {caller} ignored an invalid time {at!r}")
            return None

    def _day(self, t: float) -> str:
        start, end, day = self._day_cache
        if start <= t < end:
            return day
        start = t - t % _DAY
        day = _utc_day(start)
        self._day_cache = (start, start + _DAY, day)
        return day

    # -- flushing ----------------------------------------------------------------------------

    def flush(self) -> bool:
        """Commit everything pending now (blocking); False if it stays pending (see ``health``)."""
        with self._db_lock:
            return self._flush()

    def flush_nowait(self) -> bool | None:
        """``flush`` for an owner that must not block (``flush_in_thread=False``):
        None, doing nothing, while another call holds the file (try again
        later); False at once when another process holds SQLite's write lock
        (the batch is kept, as for any failed write)."""
        if not self._db_lock.acquire(blocking=False):
            return None
        try:
            conn = self._conn
            if conn is None or not self.pending():
                return self._flush()  # closed, or nothing to write: no statement
            with contextlib.suppress(sqlite3.Error):  # else the write fails, reported there
                conn.execute("PRAGMA busy_timeout = 0")
            try:
                return self._flush()
            except Exception as exc:  # a bug here must not reach the owner's event loop
                self._fail(exc)
                return False
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(f"PRAGMA busy_timeout = {self._busy_ms:d}")
        finally:
            self._db_lock.release()

    def _flush(self) -> bool:
        """``flush``'s work, under ``_db_lock``."""
        if self._conn is None:
            return not self.pending()
        with self._pending_lock:
            if not self._unsaved:
                self._unsaved, self._pending = self._pending, _Batch()
            elif self._pending:
                self._unsaved.merge(self._pending)
                self._pending = _Batch()
            self._woken = False  # the next record wakes the flusher again
        batch = self._unsaved
        if not batch:
            return True
        spent = list(batch.spend.items())
        try:
            failed = self._write_batch(self._conn, batch)
            whole = failed is None
        except sqlite3.OperationalError as exc:  # locked, busy, full, read-only: retried
            self._fail(exc)
            self._bound()
            return False
        except Exception as exc:  # a record that can never be written: not the others
            self._fail(exc)
            failed = None
            try:
                whole = self._write_apart(self._conn, batch)
            except sqlite3.OperationalError:
                self._bound()
                return False
        with self._pending_lock:
            for where, spend in spent:
                if where[1] >= self._recent_since:
                    self._recent.setdefault(where, Spend()).add(spend)
            self._unsaved = _Batch()
        if failed is not None:
            self._analytics_lost(failed, len(batch.rollups))
        if whole:
            self._succeeded()
        else:
            self._committed()
        return True

    def _write_apart(self, conn: sqlite3.Connection, batch: _Batch) -> bool:
        """Write ``batch`` a record at a time, after it failed whole for something
        in its data: each record that fails alone is dropped (counted and said),
        so that one bad record does not keep every other from the file. Returns
        whether every record was written."""
        bad = 0
        try:
            for table, key, one in batch.pieces():
                try:
                    if self._write_batch(conn, one) is not None and one.rollups:
                        bad += 1  # its analytics failed (the transaction held nothing else)
                except sqlite3.OperationalError:
                    raise  # the file, not the record: what is left stays for the next flush
                except Exception:
                    bad += 1
                del table[key]  # written, or dropped
        finally:
            self._dropped += bad
        if bad:
            self._log(
                f"keyrotor storage: {bad} record(s) could not be written to {self.path} and "
                "were dropped (see last_error in /status); the others were written"
            )
        return not bad

    def _write_batch(self, conn: sqlite3.Connection, batch: _Batch) -> Exception | None:
        """Write ``batch`` in one transaction. Analytics that cannot be written (a
        damaged row or page) lose only the batch's analytics: the transaction is
        rolled back and the other records written again without them (not a
        savepoint: SQLite commits no transaction that met a corrupt page). Returns
        what the analytics raised (None: all written)."""
        failed: Exception | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            _write_records(conn, batch)
            try:
                analytics.write(
                    conn, batch.rollups, self.retention, self._clock(), self._minute_rows
                )
            except sqlite3.OperationalError:
                raise  # the file (locked, full, read-only): the whole batch is retried
            except Exception as exc:
                failed = exc
                self._minute_rows.clear()
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                _write_records(conn, batch)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            self._minute_rows.clear()  # as the file holds them: read back next time
            raise
        return failed

    def _run(self) -> None:
        if not self.flush_in_thread:
            self._checkpoints()
            return
        while True:
            if not self.pending():  # asleep until a record (or close) stirs it
                self._stir.wait()
                self._stir.clear()
                if self._stop.is_set():
                    return
                continue
            if self._stop.wait(self._interval):  # the first record's interval
                return
            try:
                self.flush()
            except Exception as exc:  # pragma: no cover - flush handles its own errors
                self._fail(exc)

    def _checkpoints(self) -> None:
        """Copy the WAL into the file every ``CHECKPOINT_INTERVAL`` (the owner
        flushes): on a connection of this thread's own, so the ``fsync`` runs
        here. ``PASSIVE`` never waits for the owner's writes."""
        conn: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(CHECKPOINT_INTERVAL):
                try:
                    if conn is None:  # mode=rw: never create a file that has gone
                        uri = f"{self.path.as_uri()}?mode=rw"
                        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    self._warn_once(
                        f"keyrotor storage: cannot checkpoint {self.path}: {exc}; retrying "
                        f"every {CHECKPOINT_INTERVAL:g}s",
                        kind="checkpoint",
                    )
        finally:
            if conn is not None:
                conn.close()

    def _warn_once(self, message: str, kind: str | None = None) -> None:
        """Log ``message`` unless one of its ``kind`` (default: itself) was logged."""
        kind = message if kind is None else kind
        if kind not in self._logged:
            self._logged.add(kind)
            self._log(message)

    def _fail(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        self._ok = False
        self._failed_writes += 1
        self._last_error = error
        self._last_error_at = self._clock()
        self._warn_once(
            f"keyrotor storage: cannot write {self.path}: {error}; keeping "
            f"{len(self._unsaved) + len(self._pending)} records in memory and retrying every "
            f"{self._interval:g}s; the proxy keeps serving",
            kind=error,
        )

    def _analytics_lost(self, exc: Exception, count: int) -> None:
        """A flush committed the ledger and states but not its ``count`` analytics
        records (``exc``): counted, said once per error, and ``health()`` not ok."""
        error = f"{type(exc).__name__}: {exc}"
        self._ok = False
        self._failed_writes += 1
        self._dropped += count
        self._last_error = error
        self._last_error_at = self._clock()
        what = (
            f"{count} record(s) could not be written to the analytics of {self.path} and "
            "were dropped"
            if count
            else f"the analytics of {self.path} could not be rolled up"
        )
        self._warn_once(
            f"keyrotor storage: {what} ({error}); the ledger and states were written. If this "
            f'repeats, the analytics are damaged: stop the proxy and run sqlite3 {self.path} "'
            'DELETE FROM rollups" (keys, states and spend stay); if SQLite says "malformed", '
            "restore a backup",
            kind=f"analytics {error}",
        )

    def _succeeded(self) -> None:
        """A flush committed every record: health is ok again."""
        self._committed()
        if not self._ok:
            self._ok = True
            self._logged.clear()
            self._log(f"keyrotor storage: writing to {self.path} works again")

    def _committed(self) -> None:
        """A flush committed (maybe without records it dropped, health staying not ok)."""
        self._last_flush = self._clock()
        since = _utc_day(self._last_flush - _DAY)  # yesterday: older days leave memory
        if since > self._recent_since:
            with self._pending_lock:
                self._recent = {k: v for k, v in self._recent.items() if k[1] >= since}
                self._recent_since = since

    def _bound(self) -> None:
        """Keep at most ``max_pending`` records waiting: drop the oldest analytics
        minutes, then the oldest states, then old days of spend (budgets read those)."""
        with self._pending_lock:
            batch = self._unsaved
            before = len(batch)
            excess = before - self._max_pending
            if excess <= 0:
                return
            for minute in sorted(batch.rollups, key=lambda where: where[0])[:excess]:
                del batch.rollups[minute]
            excess = len(batch) - self._max_pending
            for alias in list(itertools.islice(batch.states, max(excess, 0))):
                del batch.states[alias]
            excess = len(batch) - self._max_pending
            for where in sorted(batch.spend, key=lambda w: w[1])[: max(excess, 0)]:
                del batch.spend[where]
            excess = len(batch) - self._max_pending
            for place in sorted(batch.usage, key=lambda w: w[2])[: max(excess, 0)]:
                del batch.usage[place]
            dropped = before - len(batch)
        self._dropped += dropped
        self._log(
            f"keyrotor storage: {self.path} is not writable and more than {self._max_pending} "
            f"records are waiting; dropped the {dropped} oldest"
        )

    def close(self) -> None:
        """Flush, stop the writer thread and close the file; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._stir.set()
        if self._writer.is_alive() and self._writer is not threading.current_thread():
            self._writer.join()
        if not self.flush():
            self._log(
                f"keyrotor storage: {len(self._unsaved)} records could not be written to "
                f"{self.path} at shutdown and are lost"
            )
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"the state file {self.path} is closed")
        return self._conn


def _write_records(conn: sqlite3.Connection, batch: _Batch) -> None:
    """Write ``batch``'s states, windows, spend and usage (in the caller's transaction)."""
    conn.executemany(
        "INSERT OR REPLACE INTO states (alias, state, until, reason, changed_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [(alias, *row) for alias, row in batch.states.items()],
    )
    conn.executemany(
        "INSERT OR REPLACE INTO windows (alias, start) VALUES (?, ?)", list(batch.windows.items())
    )
    conn.executemany(
        "INSERT INTO ledger (alias, day, requests, prompt_tokens, completion_tokens, cost) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (alias, day) DO UPDATE SET "
        "requests = requests + excluded.requests, "
        "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = completion_tokens + excluded.completion_tokens, "
        "cost = cost + excluded.cost",
        [
            (a, d, s.requests, s.prompt_tokens, s.completion_tokens, s.cost)
            for (a, d), s in batch.spend.items()
        ],
    )
    conn.executemany(
        "INSERT INTO usage (scope, name, day, requests, prompt_tokens, "
        "completion_tokens, cost) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (scope, name, day) DO UPDATE SET "
        "requests = requests + excluded.requests, "
        "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = completion_tokens + excluded.completion_tokens, "
        "cost = cost + excluded.cost",
        [
            (scope, n, d, s.requests, s.prompt_tokens, s.completion_tokens, s.cost)
            for (scope, n, d), s in batch.usage.items()
        ],
    )


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _lock(path: Path) -> int:
    """An exclusive lock on ``PATH.lock`` (its descriptor), or ``StorageError``
    when another process holds it: two proxies on one file would each keep their
    own idea of today's spend and overwrite each other's states."""
    lock_path = Path(f"{path.resolve()}.lock")  # the file's, whatever link it is opened by
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create {lock_path}: {exc.strerror}") from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks here
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StorageError(
            f"another keyrotor process is using the state file {path}: give each proxy its "
            f"own --state PATH (or stop the other one)"
        ) from None
    return fd


def _open_error(path: Path, exc: sqlite3.Error) -> StorageError:
    text = str(exc)
    if "not a database" in text:
        return StorageError(
            f"{path} is not a keyrotor state file (not an SQLite database): move it away or "
            f"set {STATE_ENV} to another path"
        )
    return StorageError(
        f"cannot open the state file {path}: {text}; check that it is on a local disk and "
        f"readable and writable by this user, or set {STATE_ENV} to another path"
    )


@attrs.frozen
class _Migration:
    """One step of the state file's schema: ``statements`` take a file at
    ``version - 1`` to ``version`` (run in one transaction, never edited once
    released: a change is a new step)."""

    version: int
    what: str
    statements: tuple[str, ...]


MIGRATIONS: Final = (
    _Migration(
        1,
        "keys, their last states and the daily spend ledger",
        (
            "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
            """CREATE TABLE keys (
                alias TEXT PRIMARY KEY,
                fingerprint TEXT NOT NULL UNIQUE,
                secret BLOB NOT NULL,
                spec TEXT NOT NULL,
                added_at REAL NOT NULL
            )""",
            """CREATE TABLE states (
                alias TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                until REAL,
                reason TEXT NOT NULL,
                changed_at REAL NOT NULL
            )""",
            """CREATE TABLE ledger (
                alias TEXT NOT NULL,
                day TEXT NOT NULL,
                requests INTEGER NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                cost REAL NOT NULL,
                PRIMARY KEY (alias, day)
            ) WITHOUT ROWID""",
        ),
    ),
    # Which key each alias named when its state and spend were recorded (a salted
    # SHA-256 of the secret): an alias that names another key later starts afresh.
    # Releases before versioned migrations created it on open: IF NOT EXISTS.
    _Migration(
        2,
        "which key each alias named",
        (
            """CREATE TABLE IF NOT EXISTS bindings (
                alias TEXT PRIMARY KEY,
                fingerprint TEXT NOT NULL,
                since REAL NOT NULL
            )""",
        ),
    ),
    _Migration(
        3,
        "the providers' model catalogs (the last one fetched of each)",
        (
            """CREATE TABLE catalogs (
                provider TEXT PRIMARY KEY,
                document TEXT NOT NULL,
                etag TEXT,
                fetched_at REAL NOT NULL
            )""",
        ),
    ),
    _Migration(
        4,
        "spend per provider, per model and per client token, per UTC day",
        (
            """CREATE TABLE usage (
                scope TEXT NOT NULL,
                name TEXT NOT NULL,
                day TEXT NOT NULL,
                requests INTEGER NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                cost REAL NOT NULL,
                PRIMARY KEY (scope, name, day)
            ) WITHOUT ROWID""",
        ),
    ),
    _Migration(
        5,
        "analytics: answers per minute, hour and day",
        analytics.SCHEMA,
    ),
    _Migration(
        6,
        "analytics: minutes rolled up into hours and days once over, not on every flush",
        analytics.MIGRATION,
    ),
    # IF NOT EXISTS: a file whose version was set back by hand (tests of the
    # earlier steps do) has the table already.
    _Migration(
        7,
        "when each key's budget window opened",
        ("CREATE TABLE IF NOT EXISTS windows (alias TEXT PRIMARY KEY, start REAL NOT NULL)",),
    ),
)
"""The schema's history, oldest first: ``PRAGMA user_version`` says how many
steps a file has had, and opening it runs the others, each in its own
transaction (so a crash leaves the file at a step, never between two)."""

SCHEMA_VERSION: Final = MIGRATIONS[-1].version


def _version(conn: sqlite3.Connection) -> int:
    """The steps the file has had (files written before versioned migrations
    have ``user_version`` 0 and say it in ``meta``)."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version:
        return version
    meta = _read_meta(conn)
    return 0 if meta is None else int(meta.get("schema_version", "1"))


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file to ``SCHEMA_VERSION``, one step per transaction."""
    while (version := _version(conn)) < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _version(conn)  # another process may have gone first
            if version < SCHEMA_VERSION:
                step = MIGRATIONS[version]
                for statement in step.statements:
                    conn.execute(statement)
                if step.version == 1:
                    conn.execute("INSERT INTO meta VALUES ('salt', ?)", (os.urandom(16).hex(),))
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                    (str(step.version),),
                )
                conn.execute(f"PRAGMA user_version = {step.version:d}")
            conn.execute("COMMIT")
        finally:
            _rollback(conn)
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"{path} was written by a newer keyrotor (schema version {version}; this one reads "
            f"up to {SCHEMA_VERSION}): upgrade keyrotor, or set {STATE_ENV} to another path"
        )


def _setup(
    conn: sqlite3.Connection,
    path: Path,
    secret_key: str | None,
    wall_clock: Callable[[], float],
    log: Callable[[str], None],
) -> tuple[Fernet | None, bytes | None, dict[tuple[str, str], Spend], str, bytes]:
    """Check that the file is a state file (before anything changes it), configure
    the connection, create or upgrade the schema, check the salt and the secret key."""
    _check_ours(conn, path)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise StorageError(
            f"the state file {path} cannot use WAL mode (journal mode {mode!r}); put it on a "
            f"local disk or set {STATE_ENV} to another path"
        )
    # In WAL mode synchronous=NORMAL syncs only at checkpoints: a commit is one write() to
    # the WAL, so the writer stays cheap. It is still safe against a process crash or kill -9
    # (committed transactions are in the OS cache) and never corrupts the file; a power loss
    # may undo the last commits, which for health and spend is an acceptable trade.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    _migrate(conn, path)
    meta = _read_meta(conn)
    assert meta is not None  # the first step wrote it
    salt = _salt(conn, path, meta, log)
    cipher = fingerprint_key = None
    if secret_key:
        cipher, fingerprint_key = _cipher(secret_key, salt, path)
        if not _opens(cipher, meta.get("check")):
            if "check" in meta:
                if conn.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None:
                    raise StorageError(
                        f"{SECRET_KEY_ENV} does not decrypt the keys stored in {path}: set it to "
                        f"the key they were stored with, or set {STATE_ENV} to another path"
                    )
                log(
                    f"keyrotor storage: {path} was used with another {SECRET_KEY_ENV} but holds "
                    "no stored key (nothing encrypted): it takes this one from now on"
                )
            check = cipher.encrypt(_CHECK_PLAINTEXT).decode()
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('check', ?)", (check,))
    since = _utc_day(wall_clock() - _DAY)
    recent: dict[tuple[str, str], Spend] = {}
    for alias, day, *values in conn.execute(
        "SELECT alias, day, requests, prompt_tokens, completion_tokens, cost FROM ledger "
        "WHERE day >= ?",
        (since,),
    ):
        spend = recent[(alias, day)] = Spend()
        spend.requests, spend.prompt_tokens, spend.completion_tokens, spend.cost = values
    return cipher, fingerprint_key, recent, since, salt


def _opens(cipher: Fernet, check: str | None) -> bool:
    """Whether ``cipher`` decrypts the file's check token (False: none, or another key's)."""
    from cryptography.fernet import InvalidToken

    try:
        return check is not None and cipher.decrypt(check.encode()) == _CHECK_PLAINTEXT
    except InvalidToken:
        return False


_FIRST_TABLES: Final = frozenset({"meta", "keys", "states", "ledger"})
"""The tables every state file has had (the first step of ``MIGRATIONS``)."""


def _check_ours(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse an SQLite file that is neither new (empty) nor a state file, before
    anything writes to it: it is left as it was (journal mode, tables, version)."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if (tables or version) and not tables >= _FIRST_TABLES:
        raise StorageError(
            f"{path} is an SQLite database but not a keyrotor state file: move it away or "
            f"set {STATE_ENV} to another path"
        )


def _salt(
    conn: sqlite3.Connection, path: Path, meta: dict[str, str], log: Callable[[str], None]
) -> bytes:
    """The file's salt (of passphrases and of the keys' bindings). One lost or
    damaged is made anew only when nothing depends on it: no stored key, no binding."""
    with contextlib.suppress(KeyError, ValueError):
        if salt := bytes.fromhex(meta["salt"]):
            return salt
    depends = "SELECT EXISTS (SELECT 1 FROM keys) OR EXISTS (SELECT 1 FROM bindings)"
    if conn.execute(depends).fetchone()[0]:
        raise StorageError(
            f"{path} has lost its salt (the 'salt' row of its meta table is missing or "
            "damaged), which its stored keys and the keys' identities depend on: restore the "
            f"file from a backup, or move it away to start afresh (or set {STATE_ENV} to "
            "another path)"
        )
    salt = os.urandom(16)
    if meta.pop("check", None) is not None:  # a passphrase's check used the old salt
        conn.execute("DELETE FROM meta WHERE name = 'check'")
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('salt', ?)", (salt.hex(),))
    log(
        f"keyrotor storage: {path} had lost its salt; no stored key or binding depended on "
        "it, so it has a new one"
    )
    return salt


def _read_meta(conn: sqlite3.Connection) -> dict[str, str] | None:
    """The ``meta`` table's rows (None: a new file, without tables yet)."""
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'")
    if found.fetchone() is None:
        return None
    return dict(conn.execute("SELECT name, value FROM meta").fetchall())


def main(argv: list[str] | None = None) -> int:
    """``python -m keyrotor.adapters.storage forget-keys [PATH]``: delete the stored
    keys of a state file whose ``KEYROTOR_SECRET_KEY`` is lost (stop the proxy first)."""
    from ..cli import ArgumentParser  # usage errors as one line, exit status 2

    parser = ArgumentParser(prog="python -m keyrotor.adapters.storage")
    commands = parser.add_subparsers(dest="command", required=True)
    forget = commands.add_parser(
        "forget-keys", help="delete the stored keys, keep states and spend"
    )
    forget.add_argument("path", nargs="?", help="the state file (default: as keyrotor serve)")
    args = parser.parse_args(argv)
    path = args.path or default_state_path()
    if not os.path.isfile(path):  # a mistyped path must not become a new, empty state file
        what = "is not a file" if os.path.exists(path) else "does not exist"
        print(
            f"keyrotor storage: the state file {path} {what}; fix: give the path of the "
            "state file keyrotor serve uses (its --state, else $KEYROTOR_STATE)",
            file=sys.stderr,
        )
        return 2
    try:
        with StateStore.open(path, secret_key=None) as store:
            count = store.forget_keys()
    except StorageError as exc:
        print(f"keyrotor storage: {exc}", file=sys.stderr)
        return 2
    print(f"deleted {count} stored key(s) from {path}; add them again with keyrotor keys add")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
