"""Failover, short form: containers submitted to a standby pair on one PostgreSQL queue, the
dispatcher SIGKILLed while they run, twice, each time the standby taking over and the killed
one started again as the new standby.  Every container must end Complete, and each takeover
come within a few leases (the times are printed with ``-s``).

Each herder has its own simulated cloud (the ``sim`` driver, in memory), so the runs a killed
dispatcher had in flight die with it and the new dispatcher runs them again: what this checks
is the queue's side, that nothing is lost or left Locked or Running.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_serve_standby import CONFIG, Server

LEASE = 1.0


@pytest.fixture
def pair(
    tmp_path: Path, pg_params: Any, pg_password: str
) -> Iterator[tuple[Server, Server]]:
    params = pg_params()
    config = CONFIG.format(
        dsn=params["dsn"], password_env=pg_password, schema=params["schema_name"]
    )
    servers = (
        Server(tmp_path, "a", config, dict(os.environ)),
        Server(tmp_path, "b", config, dict(os.environ)),
    )
    try:
        yield servers
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(timeout=30)


def _containers(server: Server) -> list[dict[str, Any]]:
    out = server.cli("containers", "--json", "--limit", "1000")
    assert out.returncode == 0, out.stderr
    items: list[dict[str, Any]] = json.loads(out.stdout)
    return items


def _submit(server: Server, n: int) -> None:
    for _ in range(n):
        done = server.cli("submit", "--", "sleep", "2")
        assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_containers_survive_two_dispatcher_kills(pair: tuple[Server, Server]) -> None:
    leader, standby = pair
    leader.start()
    leader.wait_for(lambda: "holding the dispatch lock" in leader.log(), "the first lock")
    standby.start()
    standby.wait_for(lambda: "standby: waiting" in standby.log(), "the standby")
    takeovers = []
    for _round in range(2):
        _submit(standby, 6)
        standby.wait_for(
            lambda s=standby: any(c["state"] == "Running" for c in _containers(s)),
            "a container to run",
            timeout=60,
        )
        assert leader.proc is not None
        held_before = standby.log().count("holding the dispatch lock")
        killed_at = time.monotonic()
        os.killpg(leader.proc.pid, signal.SIGKILL)
        leader.proc.wait(timeout=30)
        standby.wait_for(
            lambda s=standby, n=held_before: s.log().count("holding the dispatch lock") > n,
            "the takeover",
            timeout=20,
        )
        takeovers.append(time.monotonic() - killed_at)
        leader, standby = standby, leader
        waited_before = standby.log().count("standby: waiting")
        standby.start()  # the killed one comes back as the standby
        standby.wait_for(
            lambda s=standby, n=waited_before: s.log().count("standby: waiting") > n,
            "the standby",
        )
    print("takeovers after", ", ".join(f"{t:.1f}s" for t in takeovers))
    assert all(t < 5 * LEASE for t in takeovers), takeovers

    def all_final() -> bool:
        return all(c["state"] in ("Complete", "Cancelled") for c in _containers(leader))

    leader.wait_for(all_final, "every container to end", timeout=180)
    items = _containers(leader)
    assert len(items) == 12
    assert sorted({(c["state"], c["exit_code"]) for c in items}) == [("Complete", 0)], items
