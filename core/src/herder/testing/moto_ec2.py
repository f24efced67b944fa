"""moto's EC2 emulator, made to keep one promise of EC2 that drivers' tests rely on.

moto stores RunInstances' ``ClientToken`` but launches again when a request repeats it; EC2
answers a repeated token with the reservation the first request made.  Drivers that make
creates repeat-safe with client tokens (aws, libcloud's ec2 preset) test that against this.
"""

from __future__ import annotations

from typing import Any

import pytest

#: What moto records as the client token of a request that gave none.
_NO_TOKEN = "ABCDE"  # noqa: S105 (not a secret: moto's placeholder)


def honour_client_tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Patch the emulator (for this test) so that a repeated token gets the first request's
    reservation instead of new instances; returns the token → reservation map."""
    from moto.ec2.models.instances import InstanceBackend

    original = InstanceBackend.run_instances
    made: dict[str, Any] = {}

    def run_instances(
        self: Any,
        image_id: str,
        count: int,
        user_data: Any,
        security_group_names: list[str],
        **kwargs: Any,
    ) -> Any:
        token = kwargs.get("client_token")
        if token and token != _NO_TOKEN and token in made:
            return made[token]
        reservation = original(self, image_id, count, user_data, security_group_names, **kwargs)
        if token and token != _NO_TOKEN:
            made[token] = reservation
        return reservation

    monkeypatch.setattr(InstanceBackend, "run_instances", run_instances)
    return made
