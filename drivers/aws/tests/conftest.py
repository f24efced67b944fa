"""Fixtures: an in-process EC2 emulator (moto) and fake credentials, never the real AWS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

REGION = "us-east-1"
IMAGE = "ami-12c6146b"


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach AWS with real credentials."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def ec2() -> Iterator[Any]:
    """A boto3 EC2 client on a fresh emulated account (state is dropped afterwards)."""
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


@pytest.fixture
def client_tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Make the emulator honour RunInstances' ``ClientToken`` as EC2 documents it (moto stores
    the token but launches again): a request repeating a token gets the reservation the first
    one made, instead of new instances.  Returns the token → reservation map."""
    from moto.ec2.models.instances import InstanceBackend

    original = InstanceBackend.run_instances
    made: dict[str, Any] = {}

    def run_instances(self: Any, image_id: str, count: int, user_data: Any,
                      security_group_names: list[str], **kwargs: Any) -> Any:
        token = kwargs.get("client_token")
        if token and token != "ABCDE" and token in made:  # "ABCDE": moto's "none given"
            return made[token]
        reservation = original(self, image_id, count, user_data, security_group_names, **kwargs)
        if token and token != "ABCDE":
            made[token] = reservation
        return reservation

    monkeypatch.setattr(InstanceBackend, "run_instances", run_instances)
    return made
