"""Fixtures: fake credentials, so that no test can reach a real provider."""

from __future__ import annotations

from typing import Any

import pytest


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
