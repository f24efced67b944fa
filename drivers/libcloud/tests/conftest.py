"""Fixtures: fake credentials, so that no test can reach a real provider."""

from __future__ import annotations

from typing import Any

import pytest

from herder.testing.moto_ec2 import honour_client_tokens


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def client_tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Make moto honour RunInstances' ``ClientToken`` as EC2 documents it (moto stores the
    token but launches again): a request repeating a token gets the reservation the first one
    made.  Returns the token → reservation map."""
    return honour_client_tokens(monkeypatch)
