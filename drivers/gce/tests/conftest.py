"""Fixtures: a fake Compute API on 127.0.0.1 and a service-account key whose token endpoint is
that fake, so the real credential code path runs and nothing reaches Google."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from herder_driver_gce.driver import GCEDriver, GCEInstanceSet
from herder_driver_gce.params import GCEParameters

from herder.cloud import DriverContext

from .fake_compute import FakeCompute

# google-auth reads these when first imported: never probe a metadata server from a test.
os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1:9"
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"

PROJECT = "proj"
ZONES = ["us-central1-a", "us-central1-b", "us-central1-c"]
IMAGE = "projects/debian-cloud/global/images/family/debian-12"
SET_ID = "zzzzz-is000-000000000000000"
OWNER = {"HerderInstanceSetID": SET_ID}


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may find a developer's gcloud login or credentials by accident."""
    for name in (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_CLOUD_PROJECT",
        "GCLOUD_PROJECT",
        "GOOGLE_API_USE_CLIENT_CERTIFICATE",
        "GOOGLE_API_USE_MTLS_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))


@pytest.fixture(scope="session")
def private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def fake() -> Iterator[FakeCompute]:
    with FakeCompute(PROJECT) as server:
        yield server


def write_key_file(path: Path, fake: FakeCompute, private_key_pem: str) -> str:
    """A service-account key file (the form the IAM console downloads) whose token endpoint
    is the fake."""
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "0123456789abcdef",
                "private_key": private_key_pem,
                "client_email": f"herder@{PROJECT}.iam.gserviceaccount.com",
                "client_id": "1234567890",
                "token_uri": f"{fake.url}/token",
            }
        )
    )
    return str(path)


@pytest.fixture
def key_file(tmp_path: Path, fake: FakeCompute, private_key_pem: str) -> str:
    return write_key_file(tmp_path / "key.json", fake, private_key_pem)


@pytest.fixture
def base_params(fake: FakeCompute, key_file: str) -> dict[str, Any]:
    """Driver parameters that point at the fake."""
    return {
        "project": PROJECT,
        "zones": list(ZONES),
        "api_endpoint": fake.url,
        "credentials": {"file": key_file},
    }


@pytest.fixture
def make_set(base_params: dict[str, Any]) -> Iterator[Any]:
    """Builds instance sets against the fake (stopped afterwards)."""
    built: list[GCEInstanceSet] = []

    def make(context: DriverContext | None = None, **params: Any) -> GCEInstanceSet:
        validated = GCEDriver.validate_parameters({**base_params, **params})
        assert isinstance(validated, GCEParameters)
        iset = GCEInstanceSet(validated, context or DriverContext(instance_set_id=SET_ID))
        built.append(iset)
        return iset

    yield make
    for iset in built:
        iset.stop()
