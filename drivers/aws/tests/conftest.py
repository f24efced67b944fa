"""Fixtures: an in-process EC2 emulator (moto) and fake credentials, never the real AWS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from herder.testing.moto_ec2 import honour_client_tokens

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
    return honour_client_tokens(monkeypatch)
