"""Every route needs the management token except the health check (SPEC §10.2)."""

from __future__ import annotations

import pytest

from herder.app.api.routes import NOT_CONFIGURED

from .conftest import ROUTES, Route

UUID = "sim01-dz642-000000000000000"


def _path(route: Route) -> str:
    return route.path.replace("{uuid}", UUID).replace("{instance_id}", "sim-1")


PROTECTED = [r for r in ROUTES if r.auth]


def _label(route: Route) -> str:
    return f"{route.method} {route.path}"


def test_only_health_and_the_status_page_files_are_open():
    # The status page's HTML, script and stylesheet carry no data; the page reads everything
    # through the protected routes with the token the user types in.
    assert [r.path for r in ROUTES if not r.auth] == ["/api/v1/health", "/", "/static/{name}"]


@pytest.mark.parametrize("route", PROTECTED, ids=_label)
def test_no_token_is_401(engine, route):
    reply = engine.request(route.method, _path(route), token="")
    assert reply.status == 401
    assert "authorization required" in reply.json["error"]
    assert reply.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("route", PROTECTED, ids=_label)
def test_wrong_token_is_403(engine, route):
    for token in ("wrong", engine.token[:-1], engine.token + "x"):
        reply = engine.request(route.method, _path(route), token=token)
        assert reply.status == 403, token
        assert "not valid" in reply.json["error"]


@pytest.mark.parametrize("route", PROTECTED, ids=_label)
def test_no_configured_token_refuses_everything(unconfigured, route):
    for token in ("", "anything"):
        reply = unconfigured.request(route.method, _path(route), token=token)
        assert reply.status == 403
        assert reply.json["error"] == NOT_CONFIGURED


@pytest.mark.parametrize(
    "header",
    ["Basic dGVzdDp0ZXN0", "Bearer", "Bearer ", "token", "Bearer\tx"],
)
def test_malformed_authorization_headers_are_401_or_403(engine, header):
    reply = engine.request("GET", "/api/v1/instances", headers={"Authorization": header})
    assert reply.status in (401, 403)


def test_bearer_scheme_is_case_insensitive(engine):
    reply = engine.request(
        "GET", "/api/v1/instances", headers={"Authorization": f"bearer {engine.token}"}
    )
    assert reply.status == 200


def test_non_ascii_token_is_refused_not_crashed(engine):
    header = "Bearer t\u00e9st".encode().decode("latin-1")
    reply = engine.request("GET", "/api/v1/instances", headers={"Authorization": header})
    assert reply.status == 403


def test_refused_requests_change_nothing(engine):
    reply = engine.request("POST", "/api/v1/containers", {"command": ["x"]}, token="wrong")
    assert reply.status == 403
    assert engine.dispatcher.queue.list() == []


def test_token_from_the_environment(engine, monkeypatch):
    """With no token in the file, the one in the named environment variable is used."""
    from herder.app.api import APIServer

    monkeypatch.setenv("SOME_TOKEN_VAR", "from-env")
    base = engine.server.config
    config = base.model_copy(
        update={
            "api": base.api.model_copy(
                update={"management_token": "", "management_token_env": "SOME_TOKEN_VAR"}
            )
        }
    )
    server = APIServer(engine.dispatcher, config)
    server.start()
    try:
        engine.server, saved = server, engine.server
        assert engine.request("GET", "/api/v1/instances", token="from-env").status == 200
        assert engine.request("GET", "/api/v1/instances").status == 403
    finally:
        engine.server = saved
        server.stop()
