"""The status page in a real headless Chromium, against a real API server.

The engine is a CloudEngine on the wall-clock ThreadRuntime and the sim driver with fast
timings, served by an APIServer in this process.  The test types the token into the page, sees
the instance and the containers, drains the instance from the page and watches it change.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from herder.app.api import APIServer
from herder.config import BudgetConfig, Config, load_config
from herder.engine.cloud_engine import CloudEngine
from herder.model import ContainerSpec, RuntimeConstraints
from herder.runtime import ThreadRuntime
from herder.testing.sim import SimDriver

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver (Debian packages chromium, chromium-driver)",
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOKEN = "browser-test-token-5d1f0c"
#: A container name that would run script if the page ever inserted it as HTML.
EVIL_NAME = "<img src=x onerror=\"document.title='pwned'\">evil"


def fast_sim_config() -> Config:
    config = load_config(EXAMPLES / "sim.yaml")
    cloud = config.cloud.model_copy(
        update={
            "driver_parameters": {"seed": 1, "boot_delay": 0.2, "quota_vcpus": {"s": 64}},
            "quota_refresh_interval": 0.5,
            "poll_interval": 0.2,
            "probe_interval": 0.2,
            "sync_interval": 0.5,
            "timeout_idle": 600.0,
            "budget": BudgetConfig(period="day", soft_limit=100.0, hard_limit=200.0),
        }
    )
    return config.model_copy(
        update={
            "cloud": cloud,
            "queue": config.queue.model_copy(update={"path": ":memory:"}),
            "api": config.api.model_copy(
                update={
                    "listen": "127.0.0.1:0",
                    "management_token": TOKEN,
                    "management_token_env": "",
                }
            ),
        }
    )


@pytest.fixture
def server() -> Iterator[tuple[APIServer, CloudEngine]]:
    config = fast_sim_config()
    runtime = ThreadRuntime()
    dispatcher = CloudEngine(config, runtime=runtime, driver=SimDriver())
    dispatcher.start()
    api = APIServer(dispatcher, config)
    api.start()
    try:
        yield api, dispatcher
    finally:
        api.stop()
        dispatcher.stop()
        runtime.shutdown()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="herder-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # the DOM is being replaced under us: try again
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def submit(dispatcher: CloudEngine, name: str, seconds: int, vcpus: int = 1) -> str:
    spec = ContainerSpec(
        command=("sim", str(seconds), "0"),
        name=name,
        runtime_constraints=RuntimeConstraints(vcpus=vcpus),
    )
    return dispatcher.queue.submit(spec).uuid


def test_page_shows_the_fleet_and_drains_an_instance(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    api, dispatcher = server
    running = submit(dispatcher, EVIL_NAME, 600)
    waiting = submit(dispatcher, "too-big", 600, vcpus=64)  # fits no type: never waits here
    held = dispatcher.queue.submit(
        ContainerSpec(command=("sim", "5", "0"), name="on-hold", priority=0)
    ).uuid
    instance = wait_for(
        "the container to run",
        lambda: next(
            (
                v.instance
                for v in dispatcher.pool.instances()
                if running in v.running_container_uuids
            ),
            None,
        ),
    )

    # A wrong token first: the page says so and asks again.
    browser.get(api.url + "/")
    token_box = wait_for("the token form", lambda: browser.find_element(By.ID, "token"))
    token_box.send_keys("not-the-token")
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    message = wait_for("the refusal", lambda: browser.find_element(By.ID, "message").text or None)
    assert "token was refused" in message
    assert browser.find_element(By.ID, "login").is_displayed()

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    row = wait_for(
        "the instance row",
        lambda: browser.find_element(By.CSS_SELECTOR, f'tr[data-instance="{instance}"]'),
    )
    assert "running" in row.find_element(By.CSS_SELECTOR, ".worker-state").text
    assert row.find_element(By.CSS_SELECTOR, ".idle-behavior").text == "run"
    assert running in row.text and "$0.050" in row.text
    # The containers: the running one (its name shown as text, not markup).
    ctr_row = browser.find_element(By.CSS_SELECTOR, f'#running tr[data-container="{running}"]')
    assert ctr_row.find_element(By.CSS_SELECTOR, ".name").text == EVIL_NAME
    assert browser.title == "herder"
    # The one on hold (priority 0) waits out of line: counted under the queue, not listed.
    assert not browser.find_elements(By.CSS_SELECTOR, f'#queue tr[data-container="{held}"]')
    assert browser.find_element(By.ID, "queue-held").text.startswith("1 on hold (priority 0)")
    assert dispatcher.queue.get(waiting).state.value == "Cancelled"  # unsatisfiable
    assert "$0.050" in browser.find_element(By.ID, "cost-per-hour").text
    # The budget: spend of the day against its limits.
    budget = browser.find_element(By.ID, "budget")
    assert "spend this day" in budget.text.lower()
    assert browser.find_element(By.ID, "budget-spent").text.startswith("$0.0")
    assert browser.find_element(By.ID, "budget-limits").text == (
        "soft limit $100.000, hard limit $200.000"
    )
    # The cloud's quota the sim reports: the small instance's 2 vCPUs of 64.
    wait_for(
        "the quota to show",
        lambda: (
            browser.find_element(By.CSS_SELECTOR, '#quotas tr[data-quota="sim-s-vcpus"] .used').text
            == "2 of 64 vcpus"
        ),
    )
    # The token survives a reload of the tab: no second login.
    browser.refresh()
    wait_for(
        "the page after reload",
        lambda: browser.find_element(By.CSS_SELECTOR, f'tr[data-instance="{instance}"]'),
    )
    assert not browser.find_element(By.ID, "login").is_displayed()
    browser.save_screenshot(str(tmp_path / "status-before.png"))

    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-instance="{instance}"]')
    row.find_element(By.CSS_SELECTOR, 'button[data-action="drain"]').click()
    wait_for(
        "the drain to show",
        lambda: (
            browser.find_element(
                By.CSS_SELECTOR, f'tr[data-instance="{instance}"] .idle-behavior'
            ).text
            == "drain"
        ),
    )
    [view] = [v for v in dispatcher.pool.instances() if v.instance == instance]
    assert view.idle_behavior.value == "drain"
    # Why it drains is shown next to its numbers.
    wait_for(
        "the drain cause to show",
        lambda: (
            "operator"
            in browser.find_element(By.CSS_SELECTOR, f'tr[data-instance="{instance}"] .reason').text
        ),
    )

    # Cancelling the container lets the drained instance shut down; the page follows.
    dispatcher.queue.cancel(running, "test")

    def shut_down() -> bool:
        cells = browser.find_elements(
            By.CSS_SELECTOR, f'tr[data-instance="{instance}"] .worker-state'
        )
        return not cells or "shutdown" in cells[0].text

    wait_for("the instance to shut down", shut_down, timeout=30)
    browser.save_screenshot(str(tmp_path / "status-after.png"))
    shots = os.environ.get("HERDER_SCREENSHOT_DIR")
    if shots:
        for name in ("status-before.png", "status-after.png"):
            shutil.copy(tmp_path / name, Path(shots) / name)


def login(browser: Any, url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    wait_for("the token form", lambda: browser.find_element(By.ID, "token")).send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait_for("the status", lambda: browser.find_element(By.ID, "status").is_displayed())


def test_page_shows_the_queue_in_order_finished_containers_and_follows_a_log(
    server, browser, tmp_path
):
    from selenium.webdriver.common.by import By

    api, dispatcher = server
    queue = dispatcher.queue
    ok = submit(dispatcher, "quick", 1)
    failing = queue.submit(ContainerSpec(command=("sim", "1", "3"), name="fails")).uuid
    blocker = submit(dispatcher, "blocker", 600)
    # Held behind the blocker, so they stay in the queue: by priority, then by age.
    held = []
    for name, priority in (("low-old", 1), ("high", 5), ("low-new", 1)):
        spec = ContainerSpec(
            command=("sim", "5", "0"), name=name, priority=priority, after=(blocker,)
        )
        held.append(queue.submit(spec).uuid)
        time.sleep(0.01)  # distinct creation times on the wall clock
    wait_for(
        "the quick ones to finish",
        lambda: all(queue.get(u).state.value == "Complete" for u in (ok, failing)),
        timeout=30,
    )
    wait_for("the blocker to run", lambda: queue.get(blocker).state.value == "Running")

    login(browser, api.url)
    names = wait_for(
        "the queue",
        lambda: (
            [
                row.find_element(By.CSS_SELECTOR, ".name").text
                for row in browser.find_elements(By.CSS_SELECTOR, "#queue tbody tr")
            ]
            or None
        ),
    )
    assert names == ["high", "low-old", "low-new"]
    # One script call reads the row whole: the page may redraw the table between two calls.
    position, status = browser.execute_script(
        """const row = document.querySelector(`#queue tr[data-container="${arguments[0]}"]`);
        return [row.querySelector('.position').textContent,
                row.querySelector('.status').textContent];""",
        held[1],
    )
    assert position == "1"
    assert blocker in status

    done = wait_for(
        "the finished list",
        lambda: browser.find_element(By.CSS_SELECTOR, f'#finished tr[data-container="{failing}"]'),
    )
    assert "exit code 3" in done.find_element(By.CSS_SELECTOR, ".outcome").text
    assert done.find_element(By.CSS_SELECTOR, ".cost").text.startswith("$")
    good = browser.find_element(By.CSS_SELECTOR, f'#finished tr[data-container="{ok}"]')
    assert "exit code 0" in good.text

    # The log of the running container, followed as it grows, until the container ends.
    queue.append_log(blocker, b"first line\n")
    row = browser.find_element(By.CSS_SELECTOR, f'#running tr[data-container="{blocker}"]')
    row.find_element(By.CSS_SELECTOR, 'button[data-action="log"]').click()
    log = browser.find_element(By.ID, "log-text")
    wait_for("the first line", lambda: "first line" in log.text)
    assert "following" in browser.find_element(By.ID, "log-state").text
    queue.append_log(blocker, b"second <b>line</b>\n")
    wait_for("the second line", lambda: "second <b>line</b>" in log.text)
    assert log.text.count("first line") == 1
    queue.cancel(blocker, "test over")
    wait_for(
        "the end of the log", lambda: "complete" in browser.find_element(By.ID, "log-state").text
    )
    # The blocker's cancellation cancels what waited for it; the finished list says why.
    row = wait_for(
        "the cancelled dependent",
        lambda: browser.find_element(By.CSS_SELECTOR, f'#finished tr[data-container="{held[0]}"]'),
    )
    assert f"dependency {blocker} was cancelled" in row.text
    browser.find_element(By.ID, "log-close").click()
    assert not browser.find_element(By.ID, "log-view").is_displayed()
    browser.save_screenshot(str(tmp_path / "status-finished.png"))
    shots = os.environ.get("HERDER_SCREENSHOT_DIR")
    if shots:
        shutil.copy(tmp_path / "status-finished.png", Path(shots) / "status-finished.png")


def test_page_shows_the_head_of_a_queue_longer_than_a_page(server, browser):
    """The newest containers of a long queue are not what runs next: the page shows the head
    of the queue in the order it is served, and counts the rest."""
    from selenium.webdriver.common.by import By

    api, dispatcher = server
    queue = dispatcher.queue
    hold = ContainerSpec(command=("sim", "5", "0"), name="on-hold", priority=0)
    blocker = queue.submit(hold).uuid  # never runs: what waits for it stays in line
    line = ContainerSpec(command=("sim", "5", "0"), name="in-line", after=(blocker,))
    queue.submit_many([line] * 1_200)
    time.sleep(0.01)  # a later creation time: the newest, but first by priority
    urgent = queue.submit(
        ContainerSpec(command=("sim", "5", "0"), name="urgent", priority=9, after=(blocker,))
    ).uuid
    queue.submit_many([hold] * 2)

    login(browser, api.url)
    more = wait_for("the count of the rest", lambda: browser.find_element(By.ID, "queue-more"))
    assert more.text == "and 1,001 more in line"
    assert browser.find_element(By.ID, "queue-held").text.startswith("3 on hold (priority 0)")
    # Read in one script call: the page redraws the table every few seconds, and reading 200
    # rows element by element can outlast one drawing (the elements would go stale).
    rows = browser.execute_script(
        """return Array.from(document.querySelectorAll('#queue tbody tr'), row => [
            row.dataset.container,
            row.querySelector('.position').textContent,
            row.querySelector('.name').textContent,
        ]);"""
    )
    assert len(rows) == 200
    assert rows[0][:2] == [urgent, "1"]
    assert {name for _, _, name in rows[1:]} == {"in-line"}
