"""The azure driver against the fake ARM API, through the real Azure clients over HTTPS."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import pytest
from herder_driver_azure.driver import (
    AzureDriver,
    AzureInstance,
    AzureInstanceSet,
    custom_data,
)
from herder_driver_azure.params import AzureParameters
from pydantic import ValidationError

from herder.cloud import CloudError, DriverContext
from herder.model import InstanceType
from herder.runtime import VirtualRuntime

from .conftest import OWNER_KEY, SET_ID
from .fakearm import CLIENT_SECRET, FakeARM

OWNER = {OWNER_KEY: SET_ID}
SMALL = InstanceType(
    name="small", provider_type="Standard_D2s_v5", vcpus=2, ram=8 << 30, price=0.096
)
SPOT = InstanceType(
    name="small.spot",
    provider_type="Standard_D2s_v5",
    vcpus=2,
    ram=8 << 30,
    price=0.04,
    preemptible=True,
)
SCRATCH = InstanceType(
    name="scratch",
    provider_type="Standard_D4s_v5",
    vcpus=4,
    ram=16 << 30,
    added_scratch=50 * 10**9,
    price=0.19,
)
IMAGE = "herder-worker-2026"
URN = "Debian:debian-12:12-gen2:latest"
PUBKEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
    "herder@example"
)


def vm_put(fake: FakeARM, name: str) -> dict[str, Any]:
    """The body of the VM create the fake received."""
    puts = [r for r in fake.calls("PUT", r"/virtualMachines/" + name + "$")]
    assert len(puts) == 1, puts
    return dict(puts[0].body)


# --------------------------------------------------------------------------- parameters


MINIMAL = {
    "subscription_id": "s",
    "resource_group": "rg",
    "location": "westeurope",
    "network": "vnet",
    "subnet": "sn",
}


def test_plugin_registers_the_azure_driver() -> None:
    from herder.plugins import Plugins

    assert Plugins.load().driver_class("azure") is AzureDriver


def test_parameter_defaults() -> None:
    p = AzureParameters.model_validate(MINIMAL)
    assert p.network_group == p.image_group == "rg"
    assert p.admin_username == "herder" and p.name_prefix == "herder"
    assert p.endpoint == "https://management.azure.com"
    assert p.authority == "https://login.microsoftonline.com"
    assert p.poll_interval == 2.0 and p.delete_dangling_resources_after == 600
    assert not p.uses_service_principal
    china = AzureParameters.model_validate({**MINIMAL, "cloud_environment": "AzureChinaCloud"})
    assert china.endpoint == "https://management.chinacloudapi.cn"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({}, "subscription_id"),
        ({**MINIMAL, "subnte": "x"}, "subnte"),
        ({**MINIMAL, "admin_username": "admin"}, "admin_username"),
        ({**MINIMAL, "name_prefix": "Herder_"}, "name_prefix"),
        ({**MINIMAL, "delete_dangling_resources_after": "soon"}, "delete_dangling_resources_after"),
        ({**MINIMAL, "management_endpoint": "http://127.0.0.1:1"}, "management_endpoint"),
        ({**MINIMAL, "cloud_environment": "AzureMoon"}, "cloud_environment"),
        ({**MINIMAL, "spot_max_price": "cheap"}, "spot_max_price"),
        ({**MINIMAL, "resource_group": "a/b"}, "resource_group"),
    ],
)
def test_bad_parameters_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError) as info:
        AzureDriver.validate_parameters(raw)
    assert key in str(info.value)


def test_a_secret_in_the_configuration_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as info:
        AzureDriver.validate_parameters({**MINIMAL, "client_secret": "hunter2-secret"})
    assert "client_secret" in str(info.value) and "{file: /path/to/file}" in str(info.value)
    assert "hunter2-secret" not in str(info.value)


@pytest.mark.parametrize(
    ("old", "line"),
    [
        ({"client_secret_file": "/etc/herder/azure"}, "client_secret: {file: /etc/herder/azure}"),
        ({"client_secret_env": "AZURE_SECRET"}, "client_secret: {env: AZURE_SECRET}"),
    ],
)
def test_the_former_secret_keys_are_refused_with_the_line_to_write(
    old: dict[str, str], line: str
) -> None:
    with pytest.raises(ValidationError) as info:
        AzureDriver.validate_parameters({**MINIMAL, "tenant_id": "t", "client_id": "c", **old})
    assert f"write '{line}' instead" in str(info.value)
    assert next(iter(old)) in str(info.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"shared_image_gallery_name": "g"}, "together"),
        ({"client_id": "c", "client_secret": {"env": "X"}}, "tenant_id and client_id"),
        ({"tenant_id": "t", "client_id": "c"}, "needs client_secret"),
        (
            {"tenant_id": "t", "client_id": "c", "client_secret": {"env": "X", "file": "/f"}},
            "exactly one",
        ),
    ],
)
def test_incomplete_pairs_are_refused(extra: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AzureParameters.model_validate({**MINIMAL, **extra})


# --------------------------------------------------------------------------- credentials


def test_service_principal_signs_in_with_the_secret_from_its_file(
    fake: FakeARM, make_set: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from herder_driver_azure.driver import SDK_LOGGERS

    caplog.set_level(logging.DEBUG)
    for name in SDK_LOGGERS:  # the SDK at its most talkative
        caplog.set_level(logging.DEBUG, logger=name)
    iset = make_set()
    assert iset.instances({}) == []
    form = fake.token_requests[-1]
    assert form["grant_type"] == "client_credentials"
    assert form["client_secret"] == CLIENT_SECRET
    assert form["scope"] == f"{fake.url}/.default"
    assert all(
        r.headers["authorization"].startswith("Bearer token-")
        for r in fake.requests
        if "/subscriptions/" in r.path
    )
    assert "token" in caplog.text.lower()  # the SDK did log its sign-in
    assert CLIENT_SECRET not in caplog.text


def test_service_principal_secret_from_an_environment_variable(
    fake: FakeARM, make_set: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERDER_AZURE_SECRET", CLIENT_SECRET)
    iset = make_set(client_secret={"env": "HERDER_AZURE_SECRET"})
    iset.instances({})
    assert fake.token_requests[-1]["client_secret"] == CLIENT_SECRET


def test_missing_secret_names_its_source(make_set: Any, tmp_path: Path) -> None:
    with pytest.raises(CloudError, match=r"client_secret \(file:.*nowhere\): cannot read"):
        make_set(client_secret={"file": str(tmp_path / "nowhere")})
    with pytest.raises(CloudError, match="environment variable HERDER_UNSET is not set"):
        make_set(client_secret={"env": "HERDER_UNSET"})


def test_wrong_secret_is_an_error_that_does_not_show_it(
    fake: FakeARM, make_set: Any, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-secret-123")
    iset = make_set(client_secret={"file": str(wrong)})
    with pytest.raises(Exception) as info:
        iset.instances({})
    assert "not-the-secret-123" not in str(info.value)


def test_without_a_principal_the_default_chain_is_used(params: dict[str, Any]) -> None:
    from azure.identity import DefaultAzureCredential

    raw = {k: v for k, v in params.items() if k not in ("tenant_id", "client_id", "client_secret")}
    validated = AzureDriver.validate_parameters(raw)
    iset = AzureDriver().instance_set(validated, DriverContext(instance_set_id=SET_ID))
    try:
        assert isinstance(iset, AzureInstanceSet)
        assert isinstance(iset.credential, DefaultAzureCredential)
    finally:
        iset.stop()


def test_an_embedding_program_may_pass_its_own_credential(
    fake: FakeARM, params: dict[str, Any]
) -> None:
    from azure.core.credentials import AccessToken

    class Token:
        def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
            fake.tokens.add("embedded")
            return AccessToken("embedded", 2**31)

    validated = AzureDriver.validate_parameters({**params, "client_secret": {"file": "/nowhere"}})
    assert isinstance(validated, AzureParameters)
    iset = AzureInstanceSet(validated, DriverContext(instance_set_id=SET_ID), credential=Token())  # type: ignore[arg-type]
    try:
        assert iset.instances({}) == []
        assert fake.token_requests == []
    finally:
        iset.stop()


# --------------------------------------------------------------------------- create


def test_create_sends_nic_and_vm_with_every_option(fake: FakeARM, make_set: Any) -> None:
    runtime = VirtualRuntime()
    iset = make_set(runtime=runtime, shared={"Owner": "data-team"}, admin_username="worker")
    tags = {**OWNER, "HerderInstanceType": "small", "Project": "p"}
    instance = iset.create(SMALL, IMAGE, tags, "echo hi", PUBKEY)
    name = str(instance)
    assert name.startswith("herder-zzzzz-zzzzz-000000000000000-") and len(name) <= 64
    assert instance.id == (
        f"/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"
    )
    assert instance.provider_type == "Standard_D2s_v5"
    assert instance.tags == tags
    assert instance.address.startswith("127.0.0.")
    assert instance.remote_user == "worker"

    nic = [r for r in fake.calls("PUT", "/networkInterfaces/") if r.path.endswith(name + "-nic")]
    assert len(nic) == 1
    conf = nic[0].body["properties"]["ipConfigurations"][0]["properties"]
    assert conf["subnet"]["id"] == (
        "/subscriptions/sub-1/resourceGroups/net-rg/providers/"
        "Microsoft.Network/virtualNetworks/vnet/subnets/workers"
    )
    assert conf["privateIPAllocationMethod"] == "Dynamic"
    assert nic[0].body["tags"]["Owner"] == "data-team"
    assert nic[0].body["tags"][OWNER_KEY] == SET_ID

    body = vm_put(fake, name)
    assert body["location"] == "westeurope"
    assert body["tags"] == {**tags, "created-at": "2023-11-14T22:13:20+00:00"}
    props = body["properties"]
    assert props["hardwareProfile"] == {"vmSize": "Standard_D2s_v5"}
    os_profile = props["osProfile"]
    assert os_profile["computerName"] == name and os_profile["adminUsername"] == "worker"
    assert base64.b64decode(os_profile["customData"]) == b"#!/bin/sh\necho hi\n"
    linux = os_profile["linuxConfiguration"]
    assert linux["disablePasswordAuthentication"] is True
    assert linux["ssh"]["publicKeys"] == [
        {"path": "/home/worker/.ssh/authorized_keys", "keyData": PUBKEY}
    ]
    assert "adminPassword" not in os_profile
    storage = props["storageProfile"]
    assert storage["imageReference"] == {
        "id": "/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Compute/images/" + IMAGE
    }
    assert storage["osDisk"] == {
        "name": f"{name}-os",
        "createOption": "FromImage",
        "deleteOption": "Delete",
        "caching": "ReadWrite",
    }
    assert "dataDisks" not in storage
    assert props["networkProfile"]["networkInterfaces"] == [
        {
            "id": f"/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Network/"
            f"networkInterfaces/{name}-nic",
            "properties": {"primary": True, "deleteOption": "Delete"},
        }
    ]
    assert "priority" not in props and "billingProfile" not in props
    runtime.shutdown()


def test_spot_and_added_scratch(fake: FakeARM, make_set: Any) -> None:
    iset = make_set(data_disk_type="Premium_LRS", os_disk_type="Premium_LRS", os_disk_size_gb=64)
    spot = iset.create(SPOT, IMAGE, OWNER, "", PUBKEY)
    props = vm_put(fake, str(spot))["properties"]
    assert props["priority"] == "Spot" and props["evictionPolicy"] == "Delete"
    assert props["billingProfile"] == {"maxPrice": 0.04}
    assert props["storageProfile"]["osDisk"]["managedDisk"] == {"storageAccountType": "Premium_LRS"}
    assert props["storageProfile"]["osDisk"]["diskSizeGB"] == 64

    scratch = iset.create(SCRATCH, IMAGE, OWNER, "", PUBKEY)
    disks = vm_put(fake, str(scratch))["properties"]["storageProfile"]["dataDisks"]
    assert disks == [
        {
            "lun": 0,
            "name": f"{scratch}-scratch",
            "createOption": "Empty",
            "diskSizeGB": 47,
            "deleteOption": "Delete",
            "managedDisk": {"storageAccountType": "Premium_LRS"},
        }
    ]
    assert f"{scratch}-scratch".lower() in fake.of_kind("disk")


@pytest.mark.parametrize(
    ("setting", "it", "expected"),
    [
        ("on-demand", SPOT, -1),
        (
            "type",
            InstanceType(
                name="s", provider_type="Standard_D2s_v5", vcpus=2, ram=1, preemptible=True
            ),
            -1,
        ),
    ],
)
def test_spot_max_price_minus_one(
    fake: FakeARM, make_set: Any, setting: str, it: InstanceType, expected: float
) -> None:
    instance = make_set(spot_max_price=setting).create(it, IMAGE, OWNER, "", PUBKEY)
    assert vm_put(fake, str(instance))["properties"]["billingProfile"] == {"maxPrice": expected}


@pytest.mark.parametrize(
    ("image", "overrides", "expected"),
    [
        (
            URN,
            {},
            {"publisher": "Debian", "offer": "debian-12", "sku": "12-gen2", "version": "latest"},
        ),
        (
            "/subscriptions/x/resourceGroups/img/providers/Microsoft.Compute/images/i",
            {},
            {"id": "/subscriptions/x/resourceGroups/img/providers/Microsoft.Compute/images/i"},
        ),
        (
            "worker",
            {"image_resource_group": "images"},
            {
                "id": "/subscriptions/sub-1/resourceGroups/images/providers/"
                "Microsoft.Compute/images/worker"
            },
        ),
        (
            "worker",
            {"shared_image_gallery_name": "gal", "shared_image_gallery_image_version": "1.2.3"},
            {
                "id": "/subscriptions/sub-1/resourceGroups/rg/providers/"
                "Microsoft.Compute/galleries/gal/images/worker/versions/1.2.3"
            },
        ),
    ],
)
def test_image_forms(
    fake: FakeARM, make_set: Any, image: str, overrides: dict[str, str], expected: dict[str, str]
) -> None:
    instance = make_set(**overrides).create(SMALL, image, OWNER, "", PUBKEY)
    assert vm_put(fake, str(instance))["properties"]["storageProfile"]["imageReference"] == expected


@pytest.mark.parametrize("image", ["", "https://acct.blob.core.windows.net/images/w.vhd"])
def test_unusable_images_are_refused_before_any_call(
    fake: FakeARM, make_set: Any, image: str
) -> None:
    iset = make_set()
    with pytest.raises(CloudError, match="image"):
        iset.create(SMALL, image, OWNER, "", PUBKEY)
    assert fake.calls("PUT") == []


def test_without_a_public_key_the_vm_gets_a_key_nobody_holds(fake: FakeARM, make_set: Any) -> None:
    iset = make_set()
    a = iset.create(SMALL, IMAGE, OWNER, "", None)
    b = iset.create(SMALL, IMAGE, OWNER, "", None)
    keys = [
        vm_put(fake, str(i))["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][
            0
        ]["keyData"]
        for i in (a, b)
    ]
    assert keys[0].startswith("ssh-rsa ") and keys[0] == keys[1]
    assert (
        vm_put(fake, str(a))["properties"]["osProfile"]["linuxConfiguration"][
            "disablePasswordAuthentication"
        ]
        is True
    )


def test_custom_data_is_the_init_script() -> None:
    assert base64.b64decode(custom_data("touch /x")) == b"#!/bin/sh\ntouch /x\n"


def test_long_instance_set_ids_still_give_valid_names(fake: FakeARM, make_set: Any) -> None:
    iset = make_set(set_id="0123456789abcdef0123456789abcdef0123456789abcdef")
    instance = iset.create(SMALL, IMAGE, {OWNER_KEY: "x"}, "", PUBKEY)
    assert len(str(instance)) <= 64
    assert str(instance).startswith(iset.name_prefix)


# --------------------------------------------------------------------------- failures


def test_a_synchronous_failure_deletes_the_nic_at_once(fake: FakeARM, make_set: Any) -> None:
    fake.fail("PUT", r"/virtualMachines/", 409, "AllocationFailed", "no room")
    iset = make_set()
    with pytest.raises(CloudError):
        iset.create(SMALL, IMAGE, OWNER, "", PUBKEY)
    assert fake.of_kind("nic") == {} and fake.of_kind("vm") == {}
    assert len(fake.calls("DELETE", "/networkInterfaces/")) == 1


def test_an_asynchronous_failure_deletes_the_failed_vm_and_the_nic(
    fake: FakeARM, make_set: Any
) -> None:
    fake.fail_next_create("ZonalAllocationFailed", "no room in zone 1")
    iset = make_set()
    with pytest.raises(CloudError):
        iset.create(SMALL, IMAGE, OWNER, "", PUBKEY)
    assert fake.of_kind("vm") == {} and fake.of_kind("nic") == {} and fake.of_kind("disk") == {}
    assert iset.instances({}) == []


def test_a_failed_nic_create_creates_no_vm(fake: FakeARM, make_set: Any) -> None:
    fake.fail("PUT", r"/networkInterfaces/", 400, "SubnetIsFull", "no addresses left")
    with pytest.raises(CloudError, match="SubnetIsFull"):
        make_set().create(SMALL, IMAGE, OWNER, "", PUBKEY)
    assert fake.calls("PUT", "/virtualMachines/") == []


# --------------------------------------------------------------------------- listing and tags


def test_listing_pages_filters_and_gives_addresses(fake: FakeARM, make_set: Any) -> None:
    fake.page_size = 2
    iset = make_set()
    made = [
        iset.create(SMALL, IMAGE, {**OWNER, "HerderRole": str(n % 2)}, "", PUBKEY) for n in range(5)
    ]
    fake.add(
        "vm",
        "rg",
        "someone-elses",
        {"hardwareProfile": {"vmSize": "Standard_B1s"}},
        tags={"team": "other"},
    )
    listed = iset.instances(OWNER)
    assert sorted(i.id for i in listed) == sorted(i.id for i in made)
    by_id = {i.id: i for i in listed}
    for instance in made:
        assert by_id[instance.id].address == instance.address != ""
        assert by_id[instance.id].tags == instance.tags
    assert len(iset.instances({**OWNER, "HerderRole": "1"})) == 2
    assert len(iset.instances({})) == 6
    vm_lists = fake.calls("GET", r"/virtualMachines$")
    assert any("$skiptoken" in r.query for r in vm_lists)


def test_tag_names_azure_cannot_hold_round_trip(fake: FakeARM, make_set: Any) -> None:
    iset = make_set()
    tags = {
        **OWNER,
        "Herder/Odd?Name": "v",
        "100%&more<>": "x",
        "a~b": "y",
        "created-at": "herder's own",
        "plain": "value with spaces & symbols / ?",
    }
    instance = iset.create(SMALL, IMAGE, tags, "", PUBKEY)
    stored = fake.vm(str(instance))["tags"]
    assert all(not set(k) & set("<>%&\\?/") for k in stored)
    assert stored["Herder~2FOdd~3FName"] == "v" and stored["a~7Eb"] == "y"
    assert stored["created~2Dat"] == "herder's own" and "created-at" in stored
    assert instance.tags == tags
    assert [i.tags for i in iset.instances(OWNER)] == [tags]


@pytest.mark.parametrize("prefix", ["herder/prod&1?", ""])
def test_any_tag_key_prefix_round_trips_and_set_tags_replaces_its_namespace(
    fake: FakeARM, params: dict[str, Any], prefix: str
) -> None:
    """cloud.tag_key_prefix may hold characters Azure refuses in tag names, or be empty."""
    owner = {f"{prefix}InstanceSetID": SET_ID}
    validated = AzureDriver.validate_parameters(params)
    assert isinstance(validated, AzureParameters)
    iset = AzureDriver().instance_set(
        validated, DriverContext(instance_set_id=SET_ID, tag_key_prefix=prefix)
    )
    try:
        instance = iset.create(
            SMALL, IMAGE, {**owner, f"{prefix}IdleBehavior": "run", f"{prefix}Old": "x"}, "", PUBKEY
        )
        if prefix:
            assert "herder~2Fprod~261~3FInstanceSetID" in fake.vm(str(instance))["tags"]
        instance.set_tags({**owner, f"{prefix}IdleBehavior": "hold"})
        [listed] = iset.instances(owner)
        assert listed.tags == {**owner, f"{prefix}IdleBehavior": "hold"}
    finally:
        iset.stop()


def test_tags_azure_cannot_hold_are_refused(fake: FakeARM, make_set: Any) -> None:
    iset = make_set()
    with pytest.raises(CloudError, match="case"):
        iset.create(SMALL, IMAGE, {**OWNER, "Role": "a", "role": "b"}, "", PUBKEY)
    with pytest.raises(CloudError, match="longer than Azure's 256"):
        iset.create(SMALL, IMAGE, {**OWNER, "Role": "x" * 257}, "", PUBKEY)
    with pytest.raises(CloudError, match="per resource"):
        iset.create(SMALL, IMAGE, {f"k{n}": "v" for n in range(50)}, "", PUBKEY)
    assert fake.calls("PUT") == []


def test_nic_tags_merge_shared_tags_case_insensitively(fake: FakeARM, make_set: Any) -> None:
    iset = make_set(shared={"project": "shared", "Owner": "data-team"})
    instance = iset.create(SMALL, IMAGE, {**OWNER, "Project": "mine"}, "", PUBKEY)
    nic_tags = fake.of_kind("nic")[f"{instance}-nic".lower()]["tags"]
    assert {k: v for k, v in nic_tags.items() if k != "created-at"} == {
        **OWNER,
        "Project": "mine",
        "Owner": "data-team",
    }


def test_set_tags_replaces_herders_tags_and_keeps_others(fake: FakeARM, make_set: Any) -> None:
    iset = make_set()
    instance = iset.create(
        SMALL,
        IMAGE,
        {**OWNER, "HerderIdleBehavior": "run", "HerderOld": "1", "Project": "p"},
        "",
        PUBKEY,
    )
    fake.vm(str(instance))["tags"]["CostCenter"] = "42"  # added by a policy or an operator
    instance.set_tags({**OWNER, "HerderIdleBehavior": "drain", "Project": "p"})
    assert instance.tags["HerderIdleBehavior"] == "drain"
    stored = fake.vm(str(instance))["tags"]
    assert "created-at" in stored
    [listed] = iset.instances(OWNER)
    assert listed.tags == {
        **OWNER,
        "HerderIdleBehavior": "drain",
        "Project": "p",
        "CostCenter": "42",
    }
    patch = fake.calls("PATCH", "/virtualMachines/")[-1]
    assert set(patch.body) == {"tags"}
    assert patch.headers["if-match"].startswith('W/"')


def test_set_tags_keeps_a_concurrent_change(fake: FakeARM, make_set: Any) -> None:
    """A tag added between set_tags' read and its write survives: the write is refused
    (If-Match), and set_tags reads again."""
    iset = make_set()
    instance = iset.create(SMALL, IMAGE, {**OWNER, "HerderIdleBehavior": "run"}, "", PUBKEY)
    vm = fake.vm(str(instance))
    original = fake.handle

    def meddle(method: str, url: str, headers: dict[str, str], body: Any) -> Any:
        if method == "PATCH" and not fake.calls("PATCH"):
            vm["tags"]["Concurrent"] = "yes"
            vm["etag"] = 'W/"changed"'
        return original(method, url, headers, body)

    fake.handle = meddle  # type: ignore[method-assign]
    instance.set_tags({**OWNER, "HerderIdleBehavior": "hold"})
    assert len(fake.calls("PATCH")) == 2
    assert fake.vm(str(instance))["tags"]["Concurrent"] == "yes"
    assert fake.vm(str(instance))["tags"]["HerderIdleBehavior"] == "hold"


def test_destroy_deletes_vm_nic_and_disks_and_twice_is_harmless(
    fake: FakeARM, make_set: Any
) -> None:
    iset = make_set()
    keeper = iset.create(SMALL, IMAGE, OWNER, "", PUBKEY)
    doomed = iset.create(SCRATCH, IMAGE, OWNER, "", PUBKEY)
    assert len(fake.of_kind("disk")) == 3
    doomed.destroy()
    doomed.destroy()
    assert [i.id for i in iset.instances(OWNER)] == [keeper.id]
    assert sorted(fake.of_kind("nic")) == [f"{keeper}-nic".lower()]
    assert sorted(fake.of_kind("disk")) == [f"{keeper}-os".lower()]


# --------------------------------------------------------------------------- clean-up


def _dangling_world(fake: FakeARM, iset: AzureInstanceSet, now: str, old: str) -> None:
    p = iset.name_prefix
    fake.add(
        "nic",
        "rg",
        f"{p}aaaaaaaaaaaaaaa-nic",
        {"ipConfigurations": []},
        tags={"created-at": old, OWNER_KEY: SET_ID},
    )  # dangling: deleted
    fake.add(
        "nic", "rg", f"{p}bbbbbbbbbbbbbbb-nic", {"ipConfigurations": []}, tags={"created-at": now}
    )  # too young
    fake.add(
        "nic",
        "rg",
        f"{p}ccccccccccccccc-nic",
        {"ipConfigurations": [], "virtualMachine": {"id": "/vm"}},
        tags={"created-at": old},
    )  # attached
    fake.add(
        "nic", "rg", "other-app-nic", {"ipConfigurations": []}, tags={"created-at": old}
    )  # not ours
    fake.add(
        "nic",
        "rg",
        f"{p}ddddddddddddddd-nic",
        {"ipConfigurations": []},
        tags={"created-at": old, OWNER_KEY: "another-set"},
    )  # another set's
    fake.add(
        "disk", "rg", f"{p}aaaaaaaaaaaaaaa-os", {"diskState": "Unattached", "timeCreated": old}
    )  # dangling: deleted
    fake.add(
        "disk", "rg", f"{p}eeeeeeeeeeeeeee-scratch", {"diskState": "Unattached", "timeCreated": old}
    )  # dangling: deleted
    fake.add(
        "disk", "rg", f"{p}fffffffffffffff-os", {"diskState": "Unattached", "timeCreated": now}
    )  # too young
    fake.add(
        "disk",
        "rg",
        f"{p}ggggggggggggggg-os",
        {"diskState": "Attached", "timeCreated": old},
        managedBy="/vm",
    )  # attached
    fake.add("disk", "rg", "database-os", {"diskState": "Unattached", "timeCreated": old})


def test_clean_up_deletes_only_old_unattached_resources_of_this_set(
    fake: FakeARM, make_set: Any
) -> None:
    runtime = VirtualRuntime(start=1_800_000_000.0)
    iset = make_set(runtime=runtime, delete_dangling_resources_after="10m")
    _dangling_world(fake, iset, now="2027-01-15T08:00:00Z", old="2027-01-15T07:49:59Z")
    p = iset.name_prefix
    for future in iset.cleaner.sweep():
        future.result()
    assert sorted(fake.of_kind("nic")) == sorted(
        n.lower()
        for n in (
            f"{p}bbbbbbbbbbbbbbb-nic",
            f"{p}ccccccccccccccc-nic",
            "other-app-nic",
            f"{p}ddddddddddddddd-nic",
        )
    )
    assert sorted(fake.of_kind("disk")) == sorted(
        n.lower() for n in (f"{p}fffffffffffffff-os", f"{p}ggggggggggggggg-os", "database-os")
    )
    runtime.shutdown()


def test_listing_queues_dangling_nics_and_stop_is_clean(fake: FakeARM, make_set: Any) -> None:
    import threading

    runtime = VirtualRuntime(start=1_800_000_000.0)
    iset = make_set(runtime=runtime)
    _dangling_world(fake, iset, now="2027-01-15T08:00:00Z", old="2027-01-14T08:00:00Z")
    found = iset.find_dangling()
    assert len(found) == 3
    iset.instances(OWNER)
    iset.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("herder-azure")]
    # dangling resources found after stop (a late listing) are neither a crash nor deleted
    deletes = len(fake.calls("DELETE"))
    assert iset.cleaner.submit(found) == []
    iset.cleaner.sweep()
    assert len(fake.calls("DELETE")) == deletes
    runtime.shutdown()


def test_a_create_in_progress_is_never_cleaned_up(fake: FakeARM, make_set: Any) -> None:
    runtime = VirtualRuntime(start=1_800_000_000.0)
    iset = make_set(runtime=runtime, delete_dangling_resources_after="1s")
    name = iset.new_name()
    iset._creating.add(name)
    fake.add(
        "nic",
        "rg",
        f"{name}-nic",
        {"ipConfigurations": []},
        tags={"created-at": "2020-01-01T00:00:00Z"},
    )
    assert iset.find_dangling() == []
    iset._creating.discard(name)
    assert [d.name for d in iset.find_dangling()] == [f"{name}-nic"]
    runtime.shutdown()


# --------------------------------------------------------------------------- quota groups


@pytest.mark.parametrize(
    ("size", "preemptible", "group"),
    [
        ("Standard_D2s_v3", False, "standardDSv3Family"),
        ("Standard_D16s_v3", False, "standardDSv3Family"),
        ("Standard_D4ads_v5", False, "standardDADSv5Family"),
        ("Standard_E4-2s_v3", False, "standardESv3Family"),
        ("Standard_B2ms", False, "standardBSFamily"),
        ("Standard_DS2_v2", False, "standardDSv2Family"),
        ("Standard_NC24ads_A100_v4", False, "standardNCADSA100v4Family"),
        ("Standard_F4s_v2", False, "standardFSv2Family"),
        ("Standard_A2_v2", False, "standardAv2Family"),
        ("Basic_A1", False, "basicAFamily"),
        ("standard_d4ads_v5", False, "standardDADSv5Family"),
        ("STANDARD_NC24ADS_A100_V4", False, "standardNCADSA100v4Family"),
        ("Standard_HB120rs_v3", False, "standardHBSv3Family"),
        ("Standard_D2s_v3", True, "lowPriority"),
        ("Standard_NC6s_v3", True, "lowPriority"),
        ("custom-size", False, "custom-size"),
    ],
)
def test_quota_groups_follow_vm_families(size: str, preemptible: bool, group: str) -> None:
    iset = object.__new__(AzureInstanceSet)
    iset.params = AzureParameters.model_validate(MINIMAL)
    it = InstanceType(name="x", provider_type=size, vcpus=1, ram=1, preemptible=preemptible)
    assert iset.quota_group(it) == group


def test_quota_group_overrides_by_size_or_prefix() -> None:
    iset = object.__new__(AzureInstanceSet)
    iset.params = AzureParameters.model_validate(
        {**MINIMAL, "quota_groups": {"Standard_D": "dee", "standard_d2s_v3": "special"}}
    )

    def group(size: str) -> str:
        return iset.quota_group(InstanceType(name="x", provider_type=size, vcpus=1, ram=1))

    assert (group("Standard_D2s_v3"), group("Standard_D4s_v3"), group("Standard_E2s_v3")) == (
        "special",
        "dee",
        "standardESv3Family",
    )


# --------------------------------------------------------------------------- CLI and config


def test_herder_plugins_lists_azure(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from herder.app import cli

    assert cli.main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    [plugin] = [r for r in rows if r["name"] == "azure"]
    assert plugin["distribution"] == "herder-driver-azure"
    assert {(r["kind"], r["name"], r["target"]) for r in plugin["registrations"]} == {
        ("driver", "azure", "herder_driver_azure.driver:AzureDriver")
    }


def test_example_config_passes_and_a_broken_copy_names_each_bad_key(tmp_path: Path) -> None:
    import yaml

    from herder.app import cli
    from herder.config import check_config
    from herder.plugins import Plugins

    example = Path(__file__).resolve().parents[3] / "examples" / "azure.yaml"
    plugins = Plugins.load()
    assert [str(p) for p in check_config(example, plugins)] == []
    assert cli.main(["config", "check", str(example)]) == 0
    data = yaml.safe_load(example.read_text())
    params = data["cloud"]["driver_parameters"]
    params["locaton"] = params.pop("location")
    params["admin_username"] = "root"
    params["delete_dangling_resources_after"] = "a while"
    params["client_secret"] = "Hunter2-written-in-the-file"
    broken = tmp_path / "azure.yaml"
    broken.write_text(yaml.safe_dump(data))
    problems = " ".join(str(p) for p in check_config(broken, plugins))
    for key in (
        "location",
        "locaton",
        "admin_username",
        "delete_dangling_resources_after",
        "client_secret",
    ):
        assert f"driver_parameters.{key}" in problems
    assert "Hunter2" not in problems
    assert cli.main(["config", "check", str(broken)]) == 1


def test_config_show_has_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from herder.app import cli

    example = Path(__file__).resolve().parents[3] / "examples" / "azure.yaml"
    monkeypatch.setenv("HERDER_TEST_AZURE_SECRET", "Hunter2-in-the-environment")
    text = example.read_text().replace(
        "client_secret: {file: /etc/herder/azure-client-secret}",
        "client_secret: {env: HERDER_TEST_AZURE_SECRET}",
    )
    assert "HERDER_TEST_AZURE_SECRET" in text
    path = tmp_path / "azure.yaml"
    path.write_text(text)
    assert cli.main(["--config", str(path), "config", "show"]) == 0
    out = capsys.readouterr().out
    assert "env: HERDER_TEST_AZURE_SECRET" in out
    assert "Hunter2" not in out


# --------------------------------------------------------------------------- client set-up


def test_operations_are_polled_at_the_configured_interval(fake: FakeARM, make_set: Any) -> None:
    fake.polls = 3  # three "InProgress" answers before each operation ends
    iset = make_set()
    assert iset.compute._config.polling_interval == 0
    assert iset.network._config.polling_interval == 0
    iset.create(SMALL, IMAGE, OWNER, "", PUBKEY)
    assert len(fake.calls("GET", "^/operations/")) == 2 * 4
    default = AzureParameters.model_validate(MINIMAL)
    assert default.poll_interval == 2.0  # not the SDK's 30 s


def test_sdk_loggers_are_quieted_unless_set(fake: FakeARM, make_set: Any) -> None:
    from herder_driver_azure.driver import SDK_LOGGERS

    loggers = [logging.getLogger(name) for name in SDK_LOGGERS]
    saved = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.NOTSET)
        loggers[1].setLevel(logging.DEBUG)
        make_set()
        assert [logger.level for logger in loggers] == [
            logging.WARNING,
            logging.DEBUG,
            logging.WARNING,
        ]
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


# --------------------------------------------------------------------------- idempotent creates


def test_a_repeated_create_key_finds_the_vm_the_first_create_made(
    fake: FakeARM, make_set: Any
) -> None:
    iset = make_set()
    keyed = {**OWNER, "HerderInstanceSecret": "a" * 40}
    first = iset.create(SMALL, IMAGE, keyed, "", PUBKEY)
    repeated = iset.create(SMALL, IMAGE, keyed, "", PUBKEY)
    assert repeated.id == first.id and repeated.address == first.address != ""
    assert repeated.tags == first.tags == keyed
    assert len(fake.calls("PUT", "/virtualMachines/")) == 1 and len(fake.of_kind("vm")) == 1
    other = iset.create(SMALL, IMAGE, {**OWNER, "HerderInstanceSecret": "b" * 40}, "", PUBKEY)
    assert other.id != first.id and len(fake.of_kind("vm")) == 2
    assert isinstance(first, AzureInstance) and first.name == iset.name_for_key("a" * 40)
    unkeyed = [iset.create(SMALL, IMAGE, OWNER, "", PUBKEY) for _ in range(2)]
    assert unkeyed[0].id != unkeyed[1].id  # without a key, names stay random


def test_a_repeat_after_a_failed_create_makes_the_vm_again(fake: FakeARM, make_set: Any) -> None:
    iset = make_set()
    keyed = {**OWNER, "HerderInstanceSecret": "c" * 40}
    fake.fail_next_create("ZonalAllocationFailed", "no room in zone 1")
    with pytest.raises(CloudError):
        iset.create(SMALL, IMAGE, keyed, "", PUBKEY)
    assert fake.of_kind("vm") == {}
    made = iset.create(SMALL, IMAGE, keyed, "", PUBKEY)
    assert [i.id for i in iset.instances(OWNER)] == [made.id]


def test_a_vm_of_the_keyed_name_made_by_another_create_is_not_adopted(
    fake: FakeARM, make_set: Any
) -> None:
    iset = make_set()
    keyed = {**OWNER, "HerderInstanceSecret": "d" * 40}
    first = iset.create(SMALL, IMAGE, keyed, "", PUBKEY)
    assert isinstance(first, AzureInstance)
    fake.vm(first.name)["tags"]["HerderInstanceSecret"] = "e" * 40
    with pytest.raises(CloudError, match="another create made it"):
        iset.create(SMALL, IMAGE, keyed, "", PUBKEY)
    assert len(fake.of_kind("vm")) == 1
