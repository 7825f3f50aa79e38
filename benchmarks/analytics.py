"""Analytics and the dashboard: what recording costs, what a query costs, how fast the page loads.

Three parts, each measured side by side in one run:

1. **The request path**: ``StateStore.record_answer`` (one answer into its
   minute's analytics row) beside ``record_usage`` for the three scopes the
   spend ledger already charged per answer (the issue's bar: no more than it).
2. **Queries** over 30 days of per-minute rollups for 100 keys (``minute_days
   = 30``: 4.3 million minute rows, plus their hours and days), written
   straight into a fresh state file: each ``/analytics`` shape the dashboard
   asks for, median of ``--rounds``.
3. **The page**, in Debian's headless Chromium (if installed): a proxy with
   100 keys over that state file and the fake upstream; time to first
   contentful paint and until the pool's 100 rows are drawn, then until the
   usage view's charts are drawn, median of ``--rounds`` loads.

Run:

    python -m benchmarks.analytics --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._harness import median_time
from keyrotor.adapters.analytics import Query, Retention, Rollup
from keyrotor.adapters.storage import StateStore

KEYS = 100
DAYS = 30
MODELS = ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku", "google/gemini-2.0-flash-001"]
CLIENTS = ["web", "ci", "batch"]


def hot_path(rounds: int, calls: int) -> list[str]:
    folder = Path(tempfile.mkdtemp())
    store = StateStore.open(folder / "s.db", secret_key=None, flush_interval=3600)
    now = time.time()
    dims = ("k1", "main", MODELS[0], "", "web")
    names = {"provider": "main", "model": MODELS[0], "client": "web"}
    cases = {
        "record_usage (3 scopes: today's spend ledger)": lambda: store.record_usage(
            names, prompt_tokens=100, completion_tokens=20, cost=0.001, at=now
        ),
        "record_answer (analytics)": lambda: store.record_answer(
            now, dims, 200, 100, 20, 0.001, 120.0, 480.0
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            times[name].append(median_time(call, calls))
    store.close()
    shutil.rmtree(folder)
    ref = statistics.median(times["record_usage (3 scopes: today's spend ledger)"])
    lines = ["| call | median µs | x the spend ledger's |", "|---|---:|---:|"]
    for name, values in times.items():
        t = statistics.median(values)
        lines.append(f"| {name} | {t * 1e6:.2f} | {t / ref:.2f} |")
    return lines


def build_state(path: Path, end: float) -> int:
    """30 days of one answer-row per key and minute (and their hours and days)."""
    store = StateStore.open(path, secret_key=None, flush_interval=3600)
    store.close()  # the schema
    conn = sqlite3.connect(path)
    start = int(end - DAYS * 86400) // 86400 * 86400
    hours: dict[tuple[int, int], Rollup] = {}
    days: dict[tuple[int, int], Rollup] = {}
    rows = 0
    insert = (
        "INSERT INTO rollups (grain, start, key, provider, model, route, client, requests, "
        "errors, errors_by_class, prompt_tokens, completion_tokens, cost, ttfb, total) "
        "VALUES (?, ?, ?, 'main', ?, '', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    conn.execute("BEGIN")
    for minute in range(start, int(end), 60):
        batch = []
        for k in range(KEYS):
            r = Rollup()
            for i in range(1 + (minute // 60 + k) % 3):
                status = 429 if (minute + k + i) % 97 == 0 else 200
                r.note(status, 200 + k, 50, 0.0004 * (1 + k % 5), 80 + k + i * 7, 300 + 3 * k)
            batch.append(("minute", minute, f"k{k}", MODELS[k % 3], CLIENTS[k % 3], *r.columns()))
            for book, grain in ((hours, 3600), (days, 86400)):
                slot = book.setdefault((minute - minute % grain, k), Rollup())
                slot.add(r)
        conn.executemany(insert, batch)
        rows += len(batch)
    for name, book in (("hour", hours), ("day", days)):
        conn.executemany(
            insert,
            [
                (name, at, f"k{k}", MODELS[k % 3], CLIENTS[k % 3], *r.columns())
                for (at, k), r in book.items()
            ],
        )
    conn.execute("COMMIT")
    conn.close()
    return rows


def queries(path: Path, end: float, rounds: int) -> list[str]:
    store = StateStore.open(path, secret_key=None, flush_interval=3600, wall_clock=lambda: end)
    store.retention = Retention(minute_days=31)
    month = int(end - DAYS * 86400)
    day = int(end - 86400)
    shapes = {
        "usage, 30 days by day, by key": Query("usage", month, int(end), "day", "key"),
        "costs, 30 days by hour, by model": Query("costs", month, int(end), "hour", "model"),
        "performance, 24 h by hour, by key": Query("performance", day, int(end), "hour", "key"),
        "usage, 24 h by minute (the pool)": Query("usage", day, int(end), "minute", None),
        "usage, 1 h by minute, by key": Query("usage", int(end - 3600), int(end), "minute", "key"),
    }
    times: dict[str, list[float]] = {name: [] for name in shapes}
    sizes: dict[str, int] = {}
    for _ in range(rounds):
        for name, q in shapes.items():
            began = time.perf_counter()
            sizes[name] = len(store.analytics(q, str))
            times[name].append(time.perf_counter() - began)
    store.close()
    lines = ["| query | answer rows | median ms |", "|---|---:|---:|"]
    for name, values in times.items():
        lines.append(f"| {name} | {sizes[name]:,} | {statistics.median(values) * 1000:.0f} |")
    return lines


def page(path: Path, rounds: int) -> list[str]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        return ["(skipped: Debian's chromium and chromium-driver are not installed)"]
    import attrs
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from keyrotor.adapters.config import ProxyConfig
    from keyrotor.core import KeySpec, PoolConfig
    from keyrotor.testing import FakeUpstream, Ok, Scenario
    from tests.adapters.proxy_thread import ProxyThread

    admin = "admin-token-" + "qz" * 12
    secrets = {f"k{k}": f"sk-or-v1-bench-{k}-" + "jk" * 12 for k in range(KEYS)}
    fake = Scenario()
    for alias, secret in secrets.items():
        fake.add(secret, Ok(), alias=alias)
    config = ProxyConfig(
        keys=secrets,
        pool=PoolConfig(keys=[KeySpec(key_id=a) for a in secrets]),
        server={"host": "127.0.0.1", "port": 0},
        admin_token=admin,
        state_path=str(path),
        retention=Retention(minute_days=31),
    )
    profile = tempfile.mkdtemp()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    first, pool, usage = [], [], []
    with FakeUpstream.running_in_thread(fake) as upstream:
        with ProxyThread(attrs.evolve(config, upstream=upstream.url), []) as url:
            browser = webdriver.Chrome(service=Service(driver_path), options=options)
            try:
                browser.get(f"{url}/dashboard")
                browser.execute_script(f"sessionStorage.setItem('keyrotor.adminToken', '{admin}')")
                for _ in range(rounds):
                    browser.get("about:blank")
                    browser.get(f"{url}/dashboard#pool")
                    WebDriverWait(browser, 30, 0.01).until(
                        lambda d: (
                            len(d.find_elements(By.CSS_SELECTOR, "#keys tr[data-key]")) == KEYS
                        )
                    )
                    done = browser.execute_script("return performance.now()")
                    paint = browser.execute_script(
                        "return performance.getEntriesByName('first-contentful-paint')[0].startTime"
                    )
                    first.append(paint)
                    pool.append(done)
                    began = browser.execute_script("return performance.now()")
                    browser.find_element(By.CSS_SELECTOR, 'a[href="#usage"]').click()
                    WebDriverWait(browser, 30, 0.01).until(
                        lambda d: (
                            d.execute_script(
                                "return document.querySelectorAll('#chart-usage path').length"
                            )
                            > 0
                        )
                    )
                    usage.append(browser.execute_script("return performance.now()") - began)
            finally:
                browser.quit()
                shutil.rmtree(profile, ignore_errors=True)

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.0f}"

    return [
        "| measure (ms from navigation start) | median |",
        "|---|---:|",
        f"| first contentful paint | {med(first)} |",
        f"| pool drawn: {KEYS} key rows (after /status) | {med(pool)} |",
        f"| usage view: charts drawn after its tab is clicked (24 h by hour) | {med(usage)} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("\n### The request path\n")
    print("\n".join(hot_path(args.rounds, args.calls)))
    folder = Path(tempfile.mkdtemp(prefix="keyrotor-analytics-"))
    try:
        end = time.time()
        began = time.perf_counter()
        rows = build_state(folder / "state.db", end)
        size = (folder / "state.db").stat().st_size
        print(
            f"\n### Queries\n\n{rows:,} minute rows for {KEYS} keys over {DAYS} days written in "
            f"{time.perf_counter() - began:.0f} s; state file {size / 1e6:.0f} MB\n"
        )
        print("\n".join(queries(folder / "state.db", end, args.rounds)))
        print("\n### The page\n")
        print("\n".join(page(folder / "state.db", args.rounds)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
