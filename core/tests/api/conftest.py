"""A real CloudEngine on the sim driver and virtual clock, served by a real APIServer.

The HTTP server runs in its own thread; the engine's clock only moves when a test calls
``engine.advance``, which tests do only between requests (the virtual runtime is
single-threaded).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from herder.app.api import APIServer
from herder.app.api.app import create_app
from herder.app.api.routes import ManagementAPI
from herder.config import Config, load_config
from herder.engine.cloud_engine import CloudEngine
from herder.runtime import VirtualRuntime
from herder.testing.sim import SimDriver


@dataclass(frozen=True)
class Route:
    """One method and path the API serves, and whether it needs the token."""

    method: str
    path: str
    auth: bool


def served_routes(*, with_instances: bool = True) -> list[Route]:
    """Every route of the application, read from its OpenAPI document (which the framework
    generates from the routes it serves); an operation without security needs no token."""
    app = create_app(ManagementAPI(None, VirtualRuntime()), "t", with_instances=with_instances)
    return [
        Route(method.upper(), path, op["security"] != [])
        for path, ops in app.openapi()["paths"].items()
        for method, op in ops.items()
    ]


ROUTES = served_routes()

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
TOKEN = "test-token-0123456789"


def sim_config(token: str = TOKEN, **cloud: Any) -> Config:
    config = load_config(EXAMPLES / "sim.yaml")
    return config.model_copy(
        update={
            "queue": config.queue.model_copy(update={"path": ":memory:"}),
            "api": config.api.model_copy(
                update={
                    "listen": "127.0.0.1:0",
                    "management_token": token,
                    "management_token_env": "",
                }
            ),
            "cloud": config.cloud.model_copy(update=cloud),
        }
    )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Engine:
    runtime: VirtualRuntime
    dispatcher: CloudEngine
    server: APIServer
    token: str

    def advance(self, seconds: float) -> None:
        self.runtime.advance(seconds)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """One request; ``token=""`` sends none, ``raw`` sends bytes as they are."""
        host, port = self.server.address
        conn = http.client.HTTPConnection(host, port, timeout=10)
        hdrs = dict(headers or {})
        tok = self.token if token is None else token
        if tok:
            hdrs.setdefault("Authorization", f"Bearer {tok}")
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def submit(self, **spec: Any) -> dict[str, Any]:
        spec.setdefault("command", ["sim", "30", "0"])
        reply = self.request("POST", "/api/v1/containers", spec)
        assert reply.status == 201, reply.body
        return reply.json  # type: ignore[no-any-return]

    def container(self, uuid: str) -> dict[str, Any]:
        reply = self.request("GET", f"/api/v1/containers/{uuid}")
        assert reply.status == 200, reply.body
        return reply.json  # type: ignore[no-any-return]


def start_engine(config: Config) -> Engine:
    runtime = VirtualRuntime()
    dispatcher = CloudEngine(config, runtime=runtime, driver=SimDriver())
    dispatcher.start()
    runtime.run_until_idle()
    server = APIServer(dispatcher, config)
    server.start()
    return Engine(runtime, dispatcher, server, config.api.management_token)


def stop_engine(engine: Engine) -> None:
    engine.server.stop()
    engine.dispatcher.stop()
    engine.runtime.shutdown()


@pytest.fixture
def engine() -> Iterator[Engine]:
    eng = start_engine(sim_config())
    yield eng
    stop_engine(eng)


@pytest.fixture
def unconfigured() -> Iterator[Engine]:
    """An engine whose API has no management token."""
    eng = start_engine(sim_config(token=""))
    yield eng
    stop_engine(eng)
