"""The dashboard in a real browser: Debian's Chromium driven by selenium, against
a running proxy and the fake upstream. Screenshots go to ``build/screenshots``
(``KEYROTOR_SCREENSHOTS`` to change it): look at them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyrotor.adapters.config import ProxyConfig
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import Custom, FakeUpstream, Ok, Reply, Scenario

from .proxy_thread import ProxyThread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)

ADMIN = "admin-token-" + "qz" * 12
SECRETS = {f"k{i}": f"sk-or-v1-browser-{i}-" + "jk" * 12 for i in range(1, 4)}
SHOTS = Path(os.environ.get("KEYROTOR_SCREENSHOTS", "build/screenshots"))
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="keyrotor-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[str, FakeUpstream]]:
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, Ok(), alias=alias)
    config = ProxyConfig(
        keys=dict(SECRETS),
        pool=PoolConfig(keys=[KeySpec(key_id=alias) for alias in SECRETS], max_attempts=1),
        upstream="",
        server={"host": "127.0.0.1", "port": 0},
        admin_token=ADMIN,
        state_path=str(tmp_path / "state.db"),
        state_flush=0.05,
    )
    with FakeUpstream.running_in_thread(fake) as upstream:
        import attrs

        with ProxyThread(attrs.evolve(config, upstream=upstream.url), []) as url:
            for _ in range(6):  # some traffic for the charts
                httpx.post(
                    f"{url}/v1/chat/completions",
                    json={"model": "openai/gpt-4o-mini", "messages": HI},
                    headers={"authorization": f"Bearer {ADMIN}"},
                )
            yield url, upstream


def wait_for(driver: Any, condition: Any, timeout: float = 10.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def state_of(driver: Any, alias: str) -> str:
    from selenium.webdriver.common.by import By

    cells = driver.find_elements(By.CSS_SELECTOR, f'#keys tr[data-key="{alias}"] .state')
    return str(cells[0].text.strip()) if cells else ""


def shot(driver: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def test_the_dashboard_shows_the_pool_live_and_acts_on_it(
    browser: Any, proxy: tuple[str, FakeUpstream]
) -> None:
    from selenium.webdriver.common.by import By

    url, upstream = proxy
    browser.get(f"{url}/dashboard")
    browser.find_element(By.ID, "login-token").send_keys(ADMIN)
    browser.find_element(By.ID, "login-submit").click()
    rows = wait_for(
        browser,
        lambda d: (
            (found := d.find_elements(By.CSS_SELECTOR, "#keys tr[data-key]"))
            and len(found) == 3
            and found
        ),
    )
    assert {row.get_attribute("data-key") for row in rows} == set(SECRETS)
    assert {state_of(browser, alias) for alias in SECRETS} == {"healthy"}
    shot(browser, "pool")

    # A scripted 429 on k1: the page shows it rate limited (pushed, no reload).
    upstream.set_behaviour(
        SECRETS["k1"], Custom(lambda call: Reply(429, "Rate limit exceeded")), alias="k1"
    )
    for _ in range(6):
        httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "openai/gpt-4o-mini", "messages": HI},
            headers={"authorization": f"Bearer {ADMIN}"},
        )
    wait_for(browser, lambda d: state_of(d, "k1") == "rate_limited")
    shot(browser, "pool-rate-limited")

    # The operator marks it healthy from the page (the admin API).
    upstream.set_behaviour(SECRETS["k1"], Ok(), alias="k1")
    browser.find_element(By.CSS_SELECTOR, '#keys tr[data-key="k1"] .mark-healthy').click()
    wait_for(browser, lambda d: state_of(d, "k1") == "healthy")
    status = httpx.get(f"{url}/status", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert {k["alias"]: k["state"] for k in status["keys"]}["k1"] == "healthy"

    # The model browser filters.
    browser.get(f"{url}/dashboard#models")
    rows = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#models tr[data-model]"))
    everything = len(rows)
    browser.find_element(By.ID, "model-free").click()
    wait_for(
        browser,
        lambda d: 0 < len(d.find_elements(By.CSS_SELECTOR, "#models tr[data-model]")) < everything,
    )
    free = [
        r.get_attribute("data-model")
        for r in browser.find_elements(By.CSS_SELECTOR, "#models tr[data-model]")
    ]
    assert free and all(model.endswith(":free") for model in free)
    search = browser.find_element(By.ID, "model-search")
    search.send_keys("qwen")
    wait_for(
        browser,
        lambda d: all(
            "qwen" in str(r.get_attribute("data-model"))
            for r in d.find_elements(By.CSS_SELECTOR, "#models tr[data-model]")
        ),
    )
    shot(browser, "models")

    for view in ("usage", "performance", "routes", "alerts"):
        browser.get(f"{url}/dashboard#{view}")
        wait_for(browser, lambda d, v=view: d.find_element(By.ID, f"view-{v}").is_displayed())
        shot(browser, view)

    browser.set_window_size(375, 800)  # a phone
    browser.get(f"{url}/dashboard#pool")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#keys tr[data-key]"))
    shot(browser, "phone")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_the_performance_tab_shows_each_models_percentiles_over_the_range(
    browser: Any, tmp_path: Path
) -> None:
    """The per-model p50/p95/p99 were a request-weighted mean of each hour's
    percentiles (p50 about 30 ms for 98 answers of 10 ms and 2 of 1000 ms)."""
    import time

    import attrs
    from selenium.webdriver.common.by import By

    from keyrotor.adapters.storage import StateStore

    hour = int(time.time()) // 3600 * 3600
    store = StateStore.open(tmp_path / "state.db", secret_key=None, flush_interval=3600)
    model = "openai/gpt-4o-mini"
    dims = ("k1", "main", model, "", "")
    for i in range(98):  # two hours ago: 98 fast answers
        store.record_answer(hour - 7200 + 60 + i, dims, 200, 1, 1, 0.0, 10.0, 20.0)
    for i in range(2):  # an hour ago: 2 slow ones
        store.record_answer(hour - 3600 + 60 + i, dims, 200, 1, 1, 0.0, 1000.0, 2000.0)
    store.flush()
    store.close()
    config = ProxyConfig(
        keys=dict(SECRETS),
        pool=PoolConfig(keys=[KeySpec(key_id=alias) for alias in SECRETS], max_attempts=1),
        upstream="",
        server={"host": "127.0.0.1", "port": 0},
        admin_token=ADMIN,
        state_path=str(tmp_path / "state.db"),
        state_flush=0.05,
    )
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, Ok(), alias=alias)
    with FakeUpstream.running_in_thread(fake) as upstream:
        with ProxyThread(attrs.evolve(config, upstream=upstream.url), []) as url:
            browser.get(f"{url}/dashboard")
            browser.find_element(By.ID, "login-token").send_keys(ADMIN)
            browser.find_element(By.ID, "login-submit").click()
            wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#keys tr[data-key]"))
            browser.get(f"{url}/dashboard#performance")
            row = wait_for(
                browser,
                lambda d: d.find_elements(By.CSS_SELECTOR, f'#perf-table tr[data-name="{model}"]'),
            )[0]
            cells = [c.get_attribute("textContent") for c in row.find_elements(By.TAG_NAME, "td")]
    api_row = {"ttfb": (10.0, 10.0, 1000.0), "total": (20.0, 20.0, 2000.0)}  # within 5 %
    assert cells[:2] == [model, "100"]
    shown = [
        float(number) * (1000 if unit == "s" else 1)
        for number, unit in (str(c).replace(",", "").split() for c in cells[3:9])
    ]
    wanted = [*api_row["ttfb"], *api_row["total"]]
    assert all(w * 0.99 <= s <= w * 1.06 for s, w in zip(shown, wanted, strict=True)), cells
