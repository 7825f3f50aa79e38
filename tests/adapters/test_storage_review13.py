"""The state file: a review's findings (damaged analytics, a lost salt, foreign
SQLite files, a new secret key over a file that stores no key)."""

from __future__ import annotations

import os
import pathlib
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.fernet import Fernet

from keyrotor.adapters.storage import StateStore, StorageError

from .test_storage import Clock as StorageClock

T0 = 1_700_000_040.0  # 2023-11-14 22:14:00 UTC
SECRET = "test-secret-alpha-" + "0123456789abcdef" * 3
PASSPHRASE = "correct horse battery staple"
DIMS = ("k1", "main", "m", "", "")


class Clock(StorageClock):
    """A wall clock the test moves (from ``T0``)."""

    def __init__(self, now: float = T0) -> None:
        super().__init__(now)


def rows(path: pathlib.Path, sql: str) -> list[Any]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def change(path: pathlib.Path, *statements: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            db.execute(statement)
    finally:
        db.close()


def record_one_of_each(store: StateStore, now: float) -> None:
    store.record_spend("k1", cost=1.5)
    store.record_state("k1", "disabled", None, "operator")
    store.record_answer(now, DIMS, 200, 3, 4, 1.5, 100.0, 200.0)


# -- damaged analytics lose only the analytics ---------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE rollups SET ttfb = 'not json'",
        "UPDATE rollups SET errors_by_class = '{'",
        "UPDATE rollups SET requests = 'many'",
    ],
)
def test_damaged_analytics_rows_lose_the_analytics_not_the_ledger_and_health_says_so(
    tmp_path: pathlib.Path, opened: Callable[..., StateStore], logs: list[str], damage: str
) -> None:
    """A minute row the roll-up cannot read failed every flush whole, then each
    record apart (each ran the roll-up): every state and every spend was dropped,
    and ``/status`` said storage was ok."""
    path, clock = tmp_path / "s.db", Clock()
    store = opened(path, wall_clock=clock)
    store.record_answer(T0, DIMS, 200, 1, 1, 0.1, 10.0, 20.0)
    assert store.flush()
    change(path, damage)
    clock.now = T0 + 3600  # the damaged minute is due for its roll-up
    record_one_of_each(store, clock.now)
    assert store.flush()
    record_one_of_each(store, clock.now)
    assert store.flush()
    health = store.health()
    assert health["ok"] is False and health["dropped"] == 2 and health["pending"] == 0
    assert health["last_error"] is not None
    assert store.ledger("2023-11-14")[0].cost == 3.0  # the money is written
    assert rows(path, "SELECT alias, cost FROM ledger") == [("k1", 3.0)]
    assert rows(path, "SELECT alias, state FROM states") == [("k1", "disabled")]
    said = [line for line in logs if "analytics" in line]
    assert len(said) == 1, logs  # once, not at every flush
    assert "the ledger and states were written" in said[0] and "DELETE FROM rollups" in said[0]
    assert not any("works again" in line for line in logs)
    # The operator deletes the damaged rows: the next flush writes everything again.
    change(path, "DELETE FROM rollups")
    record_one_of_each(store, clock.now)
    assert store.flush()
    assert store.health()["ok"] is True
    assert rows(path, "SELECT grain, requests FROM rollups") == [("minute", 1)]
    assert rows(path, "SELECT cost FROM ledger") == [(4.5,)]


def test_a_corrupt_analytics_page_loses_the_analytics_not_the_ledger(
    tmp_path: pathlib.Path, opened: Callable[..., StateStore], logs: list[str]
) -> None:
    """SQLite's "database disk image is malformed" (a DatabaseError, not an
    OperationalError) on the analytics' page dropped every record of every flush."""
    path, clock = tmp_path / "s.db", Clock()
    store = opened(path, wall_clock=clock)
    store.record_answer(T0, DIMS, 200, 1, 1, 0.1, 10.0, 20.0)
    store.record_spend("k1", cost=1.0)
    assert store.flush()
    store.close()  # the last connection: the WAL is copied into the file
    assert not os.path.exists(f"{path}-wal")
    page_size = rows(path, "PRAGMA page_size")[0][0]
    (root,) = rows(path, "SELECT rootpage FROM sqlite_master WHERE name = 'rollups'")[0]
    with open(path, "r+b") as raw:
        raw.seek((root - 1) * page_size)
        raw.write(b"\x00" * 16)  # no b-tree page type: the page is corrupt
    store = opened(path, wall_clock=clock)
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        rows(path, "SELECT * FROM rollups")
    record_one_of_each(store, clock.now)
    assert store.flush()
    health = store.health()
    assert health["ok"] is False and health["dropped"] == 1
    assert "malformed" in health["last_error"]
    assert rows(path, "SELECT alias, cost FROM ledger") == [("k1", 2.5)]
    assert rows(path, "SELECT alias, state FROM states") == [("k1", "disabled")]
    assert len([line for line in logs if "analytics" in line]) == 1


# -- a lost salt ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    ["DELETE FROM meta WHERE name = 'salt'", "UPDATE meta SET value = 'zz' WHERE name = 'salt'"],
)
def test_a_lost_salt_that_keys_depend_on_is_one_clear_error(
    tmp_path: pathlib.Path, opened: Callable[..., StateStore], damage: str
) -> None:
    """A ``meta`` table without its salt stopped the start with a KeyError traceback."""
    path = tmp_path / "s.db"
    key = Fernet.generate_key().decode()
    store = opened(path, secret_key=key)
    store.add_key("a", SECRET, {})
    store.bind({"a": SECRET})
    store.close()
    change(path, damage)
    for secret_key in (key, None):
        with pytest.raises(StorageError) as raised:
            opened(path, secret_key=secret_key)
        message = str(raised.value)
        assert str(path) in message and "salt" in message and "backup" in message
        assert "\n" not in message and SECRET not in message and key not in message
    assert rows(path, "SELECT alias FROM keys") == [("a",)]  # nothing changed


def test_a_lost_salt_nothing_depends_on_is_made_anew(
    tmp_path: pathlib.Path, opened: Callable[..., StateStore], logs: list[str]
) -> None:
    path = tmp_path / "s.db"
    store = opened(path, secret_key=PASSPHRASE)
    store.record_spend("a", cost=1.0)
    store.close()
    change(path, "DELETE FROM meta WHERE name = 'salt'")
    store = opened(path, secret_key=PASSPHRASE)
    assert any("had lost its salt" in line for line in logs)
    (salt,) = rows(path, "SELECT value FROM meta WHERE name = 'salt'")[0]
    assert len(bytes.fromhex(salt)) == 16
    store.add_key("a", SECRET, {})
    store.close()
    assert [k.secret for k in opened(path, secret_key=PASSPHRASE).load().keys] == [SECRET]


# -- foreign SQLite files --------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        ("CREATE TABLE notes (x)",),
        ("CREATE TABLE notes (x)", "PRAGMA user_version = 3"),  # went past the check
        ("CREATE TABLE meta (x)",),  # a table of the same name, not ours
        ("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)", "PRAGMA user_version = 2"),
        ("PRAGMA user_version = 7",),
    ],
)
def test_a_foreign_sqlite_file_is_refused_untouched(
    tmp_path: pathlib.Path, opened: Callable[..., StateStore], schema: tuple[str, ...]
) -> None:
    """Refusing it switched it to WAL mode first (and a ``meta`` table or a
    ``user_version`` had keyrotor's migrations run on it)."""
    path = tmp_path / "other.db"
    change(path, *schema)
    before = path.read_bytes()
    with pytest.raises(StorageError, match="is an SQLite database but not a keyrotor state file"):
        opened(path)
    assert path.read_bytes() == before
    assert rows(path, "PRAGMA journal_mode") == [("delete",)]
    assert not os.path.exists(f"{path}-wal") and not os.path.exists(f"{path}-shm")


def test_an_empty_file_still_becomes_a_state_file(
    tmp_path: pathlib.Path, opened: Callable[..., StateStore]
) -> None:
    path = tmp_path / "new.db"
    path.touch()
    opened(path).close()
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert ("ledger",) in rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")


# -- a new secret key -------------------------------------------------------------------------


@pytest.mark.parametrize("first", [Fernet.generate_key().decode(), PASSPHRASE])
def test_a_new_secret_key_is_taken_while_no_key_is_stored(
    tmp_path: pathlib.Path, opened: Callable[..., StateStore], logs: list[str], first: str
) -> None:
    """A file that had seen a secret key refused every other one, though it
    held nothing encrypted: the operator had to run forget-keys on an empty table."""
    path = tmp_path / "s.db"
    store = opened(path, secret_key=first)
    store.record_spend("a", cost=1.0)
    store.close()
    second = Fernet.generate_key().decode()
    store = opened(path, secret_key=second)
    assert any("holds no stored key" in line for line in logs)
    assert second not in "\n".join(logs) and first not in "\n".join(logs)
    store.add_key("a", SECRET, {})
    store.close()
    store = opened(path, secret_key=second)
    assert [k.secret for k in store.load().keys] == [SECRET]
    store.close()
    with pytest.raises(StorageError, match="does not decrypt the keys stored"):
        opened(path, secret_key=first)  # now a key is stored under the second one
    assert rows(path, "SELECT alias FROM keys") == [("a",)]
