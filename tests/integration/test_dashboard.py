"""The dashboard in a real browser: headless Chromium, driven by Selenium,
loads /olb/ from the admin listener of an olb in front of olb-sim backends
under load, and the test asserts what the page shows: the backends with
health, in flight against capacity and the models loaded on each, the
queue by model and by client, the rates of the last minutes, and an
ejection and a load among the events. A screenshot is saved.

Skipped (not failed) where Chromium, chromedriver or selenium are missing:
.ci/run installs them (Debian's `chromium` and `chromium-driver`).
"""

import asyncio
import shutil

import pytest
from harness import RawClient, start_cluster

from olb.sim import SimConfig

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="no chromium/chromedriver (apt-get install chromium chromium-driver)")

# ~0.3 s a request, two at a time per backend, capacity 2: eight clients make a queue.
SIM = SimConfig(token_rate=60, ttft=0.02, seed=11, num_predict_default=16, num_parallel=2)
CLIENTS = 8
#: The load's bounds: it stops at whichever comes first.
LOAD_SECONDS = 60
LOAD_REQUESTS = 2000


async def load(port, stop, counts):
    """CLIENTS keep-alive clients, two API keys, each sending one request after another."""
    deadline = asyncio.get_running_loop().time() + LOAD_SECONDS

    async def one(i):
        key = "sk-team-a-000000" if i % 2 else "sk-team-b-000000"
        client = await RawClient.connect(port)
        try:
            while (not stop.is_set() and counts["sent"] < LOAD_REQUESTS
                   and asyncio.get_running_loop().time() < deadline):
                counts["sent"] += 1
                try:
                    resp = await client.request("POST", "/api/generate",
                                                {"model": "llama3.2", "prompt": f"c{i}", "stream": i % 2 == 0},
                                                {"Authorization": f"Bearer {key}"}, timeout=20)
                except (ConnectionError, asyncio.IncompleteReadError):
                    client.close()
                    client = await RawClient.connect(port)
                    continue
                counts[resp.status] = counts.get(resp.status, 0) + 1
                if resp.headers.get("connection") == "close":
                    client.close()
                    client = await RawClient.connect(port)
        finally:
            client.close()

    await asyncio.gather(*(one(i) for i in range(CLIENTS)))


def test_dashboard_in_headless_chromium(loop_thread, tmp_path):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    keys = tmp_path / "keys"
    keys.write_text("sk-team-a-000000;concurrent=8\nsk-team-b-000000\n")
    cluster = loop_thread.run(start_cluster(2, SIM, max_inflight=2, api_keys=str(keys), models_interval=1))
    stop = loop_thread.call(asyncio.Event)
    counts = {"sent": 0}
    load_done = asyncio.run_coroutine_threadsafe(load(cluster.port, stop, counts), loop_thread.loop)

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        admin = f"http://127.0.0.1:{cluster.admin_port}"
        driver.get(admin + "/olb/")
        # The page re-renders its tables every second: an element found in one
        # poll may be replaced before its text is read (stale), and is found
        # again in the next poll.
        waiter = WebDriverWait(driver, 30, poll_frequency=0.1,
                               ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))

        def text(selector):
            return driver.find_element(By.CSS_SELECTOR, selector).text

        class wait:  # WebDriverWait, with what the page showed when it ran out
            @staticmethod
            def until(cond):
                try:
                    return waiter.until(cond)
                except TimeoutException:
                    driver.save_screenshot(str(tmp_path / "failed.png"))
                    raise AssertionError(f"the page never showed it; it shows:\n{text('body')}") from None

        # Under load: both backends up and busy, a queue by model and by client, rates on the charts.
        urls = [s.url for s in cluster.sims]
        wait.until(lambda d: [r.get_attribute("data-url")
                              for r in d.find_elements(By.CSS_SELECTOR, "#backends tbody tr")] == urls)
        # Both keys queue, each shown by its first characters and a fingerprint.
        wait.until(lambda d: "key:sk-tea...b774" in text("#queue-client")
                   and "key:sk-tea...caaa" in text("#queue-client") and "llama3.2" in text("#queue-model"))
        wait.until(lambda d: all(t.text == "up" for t in d.find_elements(By.CSS_SELECTOR, "td.health")))
        wait.until(lambda d: "2 / 2" in text("#backends tbody"))  # in flight / capacity
        wait.until(lambda d: "llama3.2:latest" in text("#backends tbody td.models"))
        wait.until(lambda d: int(d.find_element(By.ID, "chart-rps").get_attribute("data-points") or 0) >= 3
                   and float(text("#chart-rps .now")) > 0 and float(text("#chart-tok .now")) > 0
                   and text("#chart-ttft .now") != "–")
        wait.until(lambda d: "loaded llama3.2:latest" in text("#events"))
        assert "sk-team-a-000000" not in driver.page_source  # keys only by their first characters

        # One backend dies: olb ejects it on the refused connection, and the page says so.
        dead = cluster.sims[1]
        loop_thread.run(dead.close())
        wait.until(lambda d: "down" in d.find_elements(By.CSS_SELECTOR, "td.health")[1].text)
        wait.until(lambda d: "ejected" in text("#events") and dead.url in text("#events"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "td.health")[0].text == "up" and text("#error") == "")

        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot))
        print(f"dashboard screenshot: {shot}")
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
        loop_thread.call(stop.set)
        try:
            load_done.result(LOAD_SECONDS + 30)  # each request is bounded too (20 s)
        finally:
            loop_thread.run(cluster.close())
    assert counts.get(200, 0) > 20
