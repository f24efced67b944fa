"""The status page's files and its totals route (the page in a real browser is tested in
tests/e2e/test_status_page_browser.py)."""

from __future__ import annotations

import re

import pytest

from herder.app.api import schema, status_page
from herder.model import ContainerState, IdleBehavior, InstanceView, WorkerState


def test_page_is_served_without_a_token_and_carries_no_data(engine):
    engine.submit(name="secret-name")
    reply = engine.request("GET", "/", token="")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/html")
    html = reply.body.decode()
    assert '<script src="/static/status.js"' in html
    assert "secret-name" not in html and "dz642" not in html


def test_page_loads_nothing_from_elsewhere(engine):
    html = engine.request("GET", "/", token="").body.decode()
    for url in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert url.startswith("/static/"), url
    csp = engine.request("GET", "/", token="").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("status.js", "text/javascript"), ("status.css", "text/css")],
)
def test_assets_are_served_with_their_types(engine, name, content_type):
    reply = engine.request("GET", f"/static/{name}", token="")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith(content_type)
    assert reply.body == status_page.asset(name)[0]


@pytest.mark.parametrize(
    "path", ["/static/status.html", "/static/..%2Fserver.py", "/static/%2e%2e", "/static/x.js"]
)
def test_only_listed_assets_are_served(engine, path):
    assert engine.request("GET", path, token="").status == 404


def test_script_never_parses_values_as_html():
    """Container names are whatever a client submitted: the script builds the DOM with
    textContent and attributes only, never from HTML strings."""
    script = status_page.asset("status.js")[0].decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


def test_token_is_kept_for_the_tab_only():
    script = status_page.asset("status.js")[0].decode()
    assert "sessionStorage" in script and "localStorage" not in script


def test_summary_needs_the_token(engine):
    assert engine.request("GET", "/api/v1/summary", token="").status == 401
    assert engine.request("GET", "/api/v1/summary", token="wrong").status == 403


def test_summary_moves_with_the_work(engine):
    reply = engine.request("GET", "/api/v1/summary")
    assert reply.status == 200
    first = schema.SummaryOut.model_validate(reply.json)
    assert first.cost_per_hour == 0 and sum(first.instances.values()) == 0
    assert set(first.containers) == {s.value for s in ContainerState}
    engine.submit(command=["sim", "600", "0"])
    engine.advance(30)
    now = schema.SummaryOut.model_validate(engine.request("GET", "/api/v1/summary").json)
    assert now.containers["Running"] == 1 and now.instances["running"] == 1
    assert now.cost_per_hour == pytest.approx(0.05)


def _view(instance: str, state: WorkerState, price: float) -> InstanceView:
    return InstanceView(instance, "", price, "t", "t", "", 0.0, [], state, IdleBehavior.RUN)


def test_summarize_lists_every_state_and_bills_only_existing_instances():
    totals = status_page.summarize(
        [
            _view("", WorkerState.BOOTING, 9.0),
            _view("i-1", WorkerState.IDLE, 0.5),
            _view("i-2", WorkerState.SHUTDOWN, 0.25),
        ],
        {ContainerState.QUEUED: 4},
    )
    assert totals.instances == {"unknown": 0, "booting": 1, "idle": 1, "running": 0, "shutdown": 1}
    assert totals.containers["Queued"] == 4 and totals.containers["Complete"] == 0
    assert totals.cost_per_hour == pytest.approx(0.75)
