"""Failover on one shared cloud: a standby pair on one PostgreSQL queue and one simulated cloud,
the dispatcher SIGKILLed at seeded random moments while containers run, each time the standby
taking over and the killed one started again as the new standby.

Both herders use the ``sim`` driver on one ``state_file``, which two live processes share as
they would a real cloud account (:mod:`herder.testing.sim_store`): the instances a killed
dispatcher created, and the containers running on them, are there for the one that takes over
to adopt.  So this checks what failover promises, end to end:

* every container ends Complete, none is lost or left Locked or Running;
* no container ran twice at once (the shared cloud's history of every container process, and
  its own double-run detection);
* no instance is left behind once the work is done (the new dispatcher adopted the old one's
  instances, or it could not have shut them down);
* each takeover came within the configured time: the standby tries the lock every half
  ``lease``, so it holds it within one ``lease`` of the dispatcher's death (each is printed
  with ``-s``).

Short form, in CI: 40 containers, 3 kills.  Long form, by hand (``tests/chaos/README.md``):
``HERDER_FAILOVER_CONTAINERS=300 HERDER_FAILOVER_KILLS=8 HERDER_FAILOVER_SEED=2``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from herder.testing.sim_cloud import SimCloud
from herder.testing.sim_store import read_processes

from .test_serve_standby import Server

#: The standby tries the dispatch lock every half lease: a takeover comes within one lease.
LEASE = 2.0
CONTAINERS = int(os.environ.get("HERDER_FAILOVER_CONTAINERS", "40"))
KILLS = int(os.environ.get("HERDER_FAILOVER_KILLS", "3"))
SEED = int(os.environ.get("HERDER_FAILOVER_SEED", "1"))

CONFIG = """
cluster_id: pgfo1
cloud:
  driver: sim
  driver_parameters: {{seed: 1, boot_delay: [0.2, 0.5], state_file: "{state_file}"}}
  deploy_public_key: false
  poll_interval: 0.5s
  probe_interval: 0.5s
  sync_interval: 1s
  timeout_idle: 2s
  max_instances: 8
containers:
  stale_lock_timeout: 2s
instance_types:
  small: {{vcpus: 2, ram: 4GiB, price: 0.1}}
queue:
  backend: postgres
  backend_parameters:
    dsn: "{dsn}"
    password: {{env: {password_env}}}
    schema_name: {schema}
    standby: true
    lease: {lease}s
api:
  listen: 127.0.0.1:0
  management_token: failover-test-token
"""


@pytest.fixture
def cloud_file(tmp_path: Path) -> Path:
    return tmp_path / "cloud.db"


@pytest.fixture
def pair(
    tmp_path: Path, cloud_file: Path, pg_params: Any, pg_password: str
) -> Iterator[tuple[Server, Server]]:
    params = pg_params()
    config = CONFIG.format(
        dsn=params["dsn"],
        password_env=pg_password,
        schema=params["schema_name"],
        state_file=cloud_file,
        lease=LEASE,
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


def _api(server: Server, method: str, path: str, body: Any = None) -> Any:
    """One request to the server's management API (on 127.0.0.1)."""
    request = urllib.request.Request(
        server.env["HERDER_SERVER"] + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {server.env['HERDER_MANAGEMENT_TOKEN']}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def _containers(server: Server) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = ""
    while True:
        page = _api(server, "GET", f"/api/v1/containers?limit=1000&after={after}")
        items.extend(page["items"])
        if not page["next"]:
            return items
        after = page["next"]


def _listed_instances(cloud: SimCloud) -> list[str]:
    """What the shared cloud still lists, read as a third process would."""
    with cloud.lock:
        now = cloud.now()
        cloud.settle(now)
        return [vm.id for vm in cloud.listed_vms(now)]


def _overlaps(cloud_file: Path) -> list[str]:
    """Containers two of whose processes in the cloud's history were alive at once."""
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for proc in read_processes(cloud_file):
        runs[proc.uuid].append((proc.started_at, proc.ended_at))
    found = []
    for uuid, spans in runs.items():
        spans.sort()
        latest_end = spans[0][1]
        for start, end in spans[1:]:
            if start < latest_end:
                found.append(f"{uuid}: started again at {start:.3f}, before {latest_end:.3f}")
            latest_end = max(latest_end, end)
    return found


@pytest.mark.slow
def test_failover_on_one_cloud_loses_nothing_and_runs_nothing_twice(
    pair: tuple[Server, Server], cloud_file: Path
) -> None:
    rng = random.Random(SEED)
    leader, standby = pair
    leader.start()
    leader.wait_for(lambda: "holding the dispatch lock" in leader.log(), "the first lock")
    standby.start()
    standby.wait_for(lambda: "standby: waiting" in standby.log(), "the standby")
    for _ in range(CONTAINERS):
        _api(
            standby,
            "POST",
            "/api/v1/containers",
            {"command": ["sleep", f"{rng.uniform(0.5, 3.0):.2f}"]},
        )

    takeovers = []
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.5, 3.0))  # a random moment of the run
        assert leader.proc is not None
        held_before = standby.log().count("holding the dispatch lock")
        killed_at = time.monotonic()
        os.killpg(leader.proc.pid, signal.SIGKILL)
        leader.proc.wait(timeout=30)
        standby.wait_for(
            lambda s=standby, n=held_before: s.log().count("holding the dispatch lock") > n,
            "the takeover",
            timeout=30,
        )
        takeovers.append(time.monotonic() - killed_at)
        leader, standby = standby, leader
        waited_before = standby.log().count("standby: waiting")
        standby.start()  # the killed one comes back as the standby
        standby.wait_for(
            lambda s=standby, n=waited_before: s.log().count("standby: waiting") > n,
            "the standby",
        )

    def all_final() -> bool:
        return all(c["state"] in ("Complete", "Cancelled") for c in _containers(leader))

    leader.wait_for(all_final, "every container to end", timeout=120 + 3 * CONTAINERS)
    cloud = SimCloud(state_file=str(cloud_file))
    leader.wait_for(lambda: not _listed_instances(cloud), "the idle instances to go", timeout=60)

    items = _containers(leader)
    print(
        f"{len(items)} containers, {KILLS} kills, seed {SEED}; takeovers after "
        + ", ".join(f"{t:.1f}s" for t in takeovers)
        + f" (lease {LEASE:.0f}s)"
    )
    with cloud.lock:
        stats = cloud.stats.to_json()
    print(
        f"cloud: {stats['created']} instances created, {stats['container_starts']} container starts"
    )
    assert len(items) == CONTAINERS
    assert sorted({(c["state"], c["exit_code"]) for c in items}) == [("Complete", 0)], [
        c for c in items if (c["state"], c["exit_code"]) != ("Complete", 0)
    ]
    assert _overlaps(cloud_file) == []
    assert stats["double_runs"] == 0, stats["double_run_details"]
    assert stats["container_starts"] >= CONTAINERS
    assert all(t <= LEASE for t in takeovers), takeovers
