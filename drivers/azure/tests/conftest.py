"""Fixtures: a fake ARM API over HTTPS on 127.0.0.1, and a service principal it knows.

No test reaches Azure: every Azure variable of the environment is removed, the driver is
pointed at the fake by its ``management_endpoint``, ``authority_host`` and ``ca_bundle``
parameters (as for Azure Stack or a national cloud), and signs in with a real
client-credentials exchange against the fake's token endpoint.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from herder_driver_azure.driver import AzureDriver, AzureInstanceSet
from herder_driver_azure.params import AzureParameters

from herder.cloud import DriverContext
from herder.runtime import Runtime

from .fakearm import CLIENT_ID, CLIENT_SECRET, TENANT, FakeARM

OWNER_KEY = "HerderInstanceSetID"
SET_ID = "zzzzz-zzzzz-000000000000000"


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every thread a test started (clean-up, deletions, the SDK's pollers, the fake's
    handlers) has ended once its fixtures are torn down."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for thread in left:  # a handler thread may still be closing its socket
        thread.join(timeout=5)
    assert [t.name for t in left if t.is_alive()] == []


@pytest.fixture(autouse=True)
def no_azure_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credential of the machine's may be picked up by a test."""
    for name in list(os.environ):
        if name.startswith(("AZURE_", "MSI_", "IDENTITY_")):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeARM]:
    with FakeARM(tmp_path) as server:
        yield server


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text(CLIENT_SECRET + "\n")
    path.chmod(0o600)
    return path


def base_params(fake: FakeARM, secret_file: Path) -> dict[str, Any]:
    """Parameters that reach the fake as a service principal, polling without delay."""
    return {
        "subscription_id": fake.subscription,
        "resource_group": "rg",
        "location": "westeurope",
        "network": "vnet",
        "subnet": "workers",
        "network_resource_group": "net-rg",
        "tenant_id": TENANT,
        "client_id": CLIENT_ID,
        "client_secret": {"file": str(secret_file)},
        "management_endpoint": fake.url,
        "authority_host": fake.url,
        "ca_bundle": str(fake.cert),
        "poll_interval": "0s",
    }


@pytest.fixture
def params(fake: FakeARM, secret_file: Path) -> dict[str, Any]:
    return base_params(fake, secret_file)


@pytest.fixture
def make_set(params: dict[str, Any]) -> Iterator[Any]:
    """Builds instance sets through the driver (stopped after the test)."""
    built: list[AzureInstanceSet] = []

    def make(
        runtime: Runtime | None = None,
        shared: dict[str, str] | None = None,
        set_id: str = SET_ID,
        **overrides: Any,
    ) -> AzureInstanceSet:
        validated = AzureDriver.validate_parameters({**params, **overrides})
        assert isinstance(validated, AzureParameters)
        context = DriverContext(
            instance_set_id=set_id, runtime=runtime, shared_resource_tags=dict(shared or {})
        )
        iset = AzureDriver().instance_set(validated, context)
        assert isinstance(iset, AzureInstanceSet)
        built.append(iset)
        return iset

    yield make
    for iset in built:
        iset.stop()
