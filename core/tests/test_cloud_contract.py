"""The parts of the driver contract that live in ``herder.cloud`` itself: capabilities, create
keys and secrets by reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from herder.plugin.cloud import (
    Capability,
    DriverParameters,
    SecretRef,
    create_key,
    parse_capabilities,
)


def test_capabilities_accept_strings_and_members_and_refuse_the_unknown() -> None:
    assert parse_capabilities({"spot", Capability.GPU}) == {Capability.SPOT, Capability.GPU}
    with pytest.raises(ValueError, match=r"\['spot_instances'\].*valid: .*idempotent_create"):
        parse_capabilities({"spot_instances"})


def test_the_create_key_is_the_instance_secret_tag() -> None:
    assert create_key({"HerderInstanceSecret": "abc"}) == "abc"
    assert create_key({"XInstanceSecret": "abc"}, "X") == "abc"
    assert create_key({"HerderInstanceSecret": ""}) is None
    assert create_key({}) is None


class Params(DriverParameters):
    api_key: SecretRef


def test_a_secret_is_read_from_the_environment_or_a_file(tmp_path: Path) -> None:
    by_env = Params.model_validate({"api_key": {"env": "MY_KEY"}}).api_key
    assert by_env.read({"MY_KEY": "s3cret"}) == "s3cret"
    with pytest.raises(ValueError, match="MY_KEY is not set"):
        by_env.read({})
    path = tmp_path / "key"
    path.write_text("s3cret\n")
    assert Params.model_validate({"api_key": {"file": str(path)}}).api_key.read() == "s3cret"
    assert str(by_env) == "env:MY_KEY"
    with pytest.raises(ValueError, match="cannot read secret file"):
        SecretRef(file=str(tmp_path / "missing")).read()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("s3cret", "given by reference"),
        ({}, "exactly one"),
        ({"env": "A", "file": "/b"}, "exactly one"),
        ({"vault": "x"}, "Extra inputs"),
    ],
)
def test_a_secret_written_in_the_configuration_is_refused(raw: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Params.model_validate({"api_key": raw})


class ManyParams(DriverParameters):
    token: SecretRef | None = None
    options: dict[str, SecretRef] = {}
    region: str = ""


def test_a_secret_in_the_clear_is_never_repeated_by_the_error() -> None:
    with pytest.raises(ValidationError) as info:
        ManyParams.model_validate(
            {"token": "hunter2-token", "options": {"password": "hunter2-pass"}, "region": "r"}
        )
    text = str(info.value)
    assert "hunter2" not in text
    assert "given by reference" in text
    assert {e["loc"][0] for e in info.value.errors()} == {"token", "options"}
    ok = ManyParams.model_validate({"token": {"env": "T"}, "options": {"p": {"file": "/f"}}})
    assert ok.token == SecretRef(env="T") and ok.options["p"] == SecretRef(file="/f")


def test_a_reference_is_dumped_as_written_and_validates_back() -> None:
    params = ManyParams.model_validate({"token": {"env": "T"}, "options": {"p": {"file": "/f"}}})
    dumped = params.model_dump()
    assert dumped["token"] == {"env": "T"} and dumped["options"] == {"p": {"file": "/f"}}
    assert ManyParams.model_validate(dumped) == params
