"""The gce driver against the fake Compute API, through the real compute_v1 REST clients."""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from herder_driver_gce.driver import (
    GCEDriver,
    GCEInstance,
    instance_name,
    set_label_value,
    ssh_keys_entry,
)
from herder_driver_gce.params import GCEParameters
from herder_driver_gce.quota import gpu_quota_name, quota_group
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from herder.cloud import (
    CapacityError,
    CloudError,
    DriverContext,
    HostKey,
    HostKeyMismatch,
    NotImplementedByDriver,
    RemoteRunner,
)
from herder.model import GPUSpec, InstanceType

from .conftest import IMAGE, OWNER, PROJECT, SET_ID, ZONES, write_key_file
from .fake_compute import Failure, FakeCompute, Request

SMALL = InstanceType(name="small", provider_type="e2-standard-2", vcpus=2, ram=8 << 30, price=0.067)
SPOT = InstanceType(
    name="small.spot",
    provider_type="e2-standard-2",
    vcpus=2,
    ram=8 << 30,
    price=0.02,
    preemptible=True,
)
SCRATCH = InstanceType(
    name="scratch",
    provider_type="n2-standard-4",
    vcpus=4,
    ram=16 << 30,
    added_scratch=500 * 10**9,
    price=0.2,
)
T4 = InstanceType(
    name="t4",
    provider_type="n1-standard-8",
    vcpus=8,
    ram=30 << 30,
    price=0.73,
    gpu=GPUSpec(stack="cuda", hardware_target="7.5", device_count=2, vram=16 << 30),
)
L4 = InstanceType(
    name="l4",
    provider_type="g2-standard-8",
    vcpus=8,
    ram=32 << 30,
    price=0.85,
    gpu=GPUSpec(stack="cuda", hardware_target="8.9", device_count=1, vram=24 << 30),
)
ED25519 = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
    "herder@example"
)
STOCKOUT = Failure(
    503,
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "The zone 'projects/proj/zones/us-central1-a' does not have enough resources "
    "available to fulfill the request.  Try a different zone, or try again later.",
    in_operation=True,
)


def items(body: dict[str, Any]) -> dict[str, str]:
    return {i["key"]: i["value"] for i in body["metadata"]["items"]}


class Refusing(RemoteRunner):
    def run(
        self, command: str, stdin: bytes = b"", timeout: float = 60.0
    ) -> tuple[int, bytes, bytes]:
        return 1, b"", b"no"


# --------------------------------------------------------------------------- parameters


def test_plugin_registers_the_gce_driver() -> None:
    from herder.plugins import Plugins

    assert Plugins.load().driver_class("gce") is GCEDriver


def test_parameter_defaults() -> None:
    p = GCEParameters(project="p", zones="us-central1-a")
    assert p.zones == ["us-central1-a"] and p.region == "us-central1"
    assert p.network_path() == "projects/p/global/networks/default"
    assert p.subnetwork_path() == ""
    assert not p.external_ip and p.verify_host_keys
    assert p.scopes == ["https://www.googleapis.com/auth/cloud-platform"]
    assert p.boot_disk_type == "pd-balanced" and p.scratch_disk == "persistent"
    assert p.admin_username == "herder" and p.credentials is None


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"zones": ["us-central1-a"]}, "project"),
        ({"project": "p"}, "zones"),
        ({"project": "p", "zones": []}, "zones"),
        ({"project": "p", "zones": ["us-central1"]}, "zones"),
        ({"project": "p", "zones": ["us-central1-a", "europe-west1-b"]}, "zones"),
        ({"project": "p", "zones": "us-central1-a", "zoen": "x"}, "zoen"),
        ({"project": "p", "zones": "us-central1-a", "labels": {"Team": "x"}}, "labels"),
        ({"project": "p", "zones": "us-central1-a", "labels": {"team": "Data Team"}}, "labels"),
        ({"project": "p", "zones": "us-central1-a", "name_prefix": "Herder"}, "name_prefix"),
        ({"project": "p", "zones": "us-central1-a", "name_prefix": "h-"}, "name_prefix"),
        ({"project": "p", "zones": "us-central1-a", "scratch_disk": "tape"}, "scratch_disk"),
        ({"project": "p", "zones": "us-central1-a", "boot_disk_size": "big"}, "boot_disk_size"),
        ({"project": "p", "zones": "us-central1-a", "admin_username": "Root Me"}, "admin_username"),
        ({"project": "p", "zones": "us-central1-a", "request_timeout": "soon"}, "request_timeout"),
    ],
)
def test_bad_parameters_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError) as info:
        GCEDriver.validate_parameters(raw)
    assert key in str(info.value)


def test_short_names_become_paths() -> None:
    p = GCEParameters(
        project="p",
        zones=["europe-west4-a", "europe-west4-b"],
        network="batch",
        subnetwork="batch-eu",
        scopes=["cloud-platform", "compute"],
        image_project="debian-cloud",
    )
    assert p.network_path() == "projects/p/global/networks/batch"
    assert p.subnetwork_path() == "projects/p/regions/europe-west4/subnetworks/batch-eu"
    assert p.scopes[1] == "https://www.googleapis.com/auth/compute"
    assert p.image_path("family/debian-12") == (
        "projects/debian-cloud/global/images/family/debian-12"
    )
    assert p.image_path("projects/x/global/images/y") == "projects/x/global/images/y"
    url = "https://www.googleapis.com/compute/v1/projects/x/global/images/y"
    assert p.image_path(url) == url
    with pytest.raises(ValueError, match="image"):
        p.image_path("")


# --------------------------------------------------------------------------- names and keys


def test_instance_names_are_valid_gce_names_whatever_the_set_id() -> None:
    pattern = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
    for set_id in (SET_ID, "UPPER case; rm -rf /", "", "x" * 500):
        name = instance_name("a" * 40, set_id)
        assert pattern.fullmatch(name) and len(name) <= 63, name
    assert instance_name("herder", SET_ID) != instance_name("herder", SET_ID)


def test_set_label_is_the_id_when_gce_allows_it_else_a_hash() -> None:
    assert set_label_value(SET_ID) == SET_ID
    hashed = set_label_value("Mixed-Case-ID")
    assert hashed.startswith("h-") and re.fullmatch(r"[a-z0-9_-]{1,63}", hashed)
    assert set_label_value("Mixed-Case-ID") == hashed != set_label_value("mixed-case-id")


def test_ssh_keys_entry_takes_type_and_key_only() -> None:
    assert ssh_keys_entry("herder", ED25519 + "\nroot:ssh-rsa AAAA evil") == (
        "herder:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
        " herder"
    )
    with pytest.raises(CloudError):
        ssh_keys_entry("herder", "not a key")


# --------------------------------------------------------------------------- create


def test_create_sends_every_option(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set(
        network="batch",
        subnetwork="batch-us",
        external_ip=True,
        service_account="worker@proj.iam.gserviceaccount.com",
        scopes=["cloud-platform"],
        boot_disk_type="pd-ssd",
        boot_disk_size="50GiB",
        labels={"team": "data"},
        admin_username="crunch",
    )
    instance = iset.create(SMALL, IMAGE, {**OWNER, "Role": "w"}, "echo init", ED25519)
    body = fake.inserted()[0]
    zone = ZONES[0]
    assert body["name"] == instance.id and body["name"].startswith("herder-")
    assert body["machineType"] == f"zones/{zone}/machineTypes/e2-standard-2"
    assert body["labels"] == {"team": "data", "herder-set": SET_ID}
    (boot,) = body["disks"]
    assert boot["boot"] is True and boot["autoDelete"] is True
    assert boot["initializeParams"] == {
        "sourceImage": IMAGE,
        "diskType": f"zones/{zone}/diskTypes/pd-ssd",
        "diskSizeGb": "50",
        "labels": {"team": "data", "herder-set": SET_ID},
    }
    (nic,) = body["networkInterfaces"]
    assert nic["network"] == "projects/proj/global/networks/batch"
    assert nic["subnetwork"] == "projects/proj/regions/us-central1/subnetworks/batch-us"
    assert nic["accessConfigs"] == [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]
    meta = items(body)
    assert meta["startup-script"] == "#!/bin/sh\necho init\n"
    assert meta["ssh-keys"].startswith("crunch:ssh-ed25519 AAAAC3")
    assert meta["enable-guest-attributes"] == "TRUE"
    assert json.loads(meta["herder-tags"]) == {**OWNER, "Role": "w"}
    assert body["serviceAccounts"] == [
        {
            "email": "worker@proj.iam.gserviceaccount.com",
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        }
    ]
    assert "scheduling" not in body and "guestAccelerators" not in body
    # external_ip: the address is the NAT address (the fake's are in 127.0.0.0/8 too)
    assert instance.address.startswith("127.200.")
    assert instance.provider_type == "e2-standard-2" and instance.remote_user == "crunch"


def test_create_defaults_give_no_external_ip_and_internal_address(
    fake: FakeCompute, make_set: Any
) -> None:
    instance = make_set(verify_host_keys=False).create(SMALL, IMAGE, OWNER, "", None)
    body = fake.inserted()[0]
    assert body["networkInterfaces"] == [{"network": "projects/proj/global/networks/default"}]
    assert "ssh-keys" not in items(body) and "enable-guest-attributes" not in items(body)
    assert "serviceAccounts" not in body
    assert instance.address.startswith("127.100.")


def test_image_parameter_is_used_when_image_id_is_empty(fake: FakeCompute, make_set: Any) -> None:
    make_set(image="family/herder-worker").create(SMALL, "", OWNER, "", None)
    source = fake.inserted()[0]["disks"][0]["initializeParams"]["sourceImage"]
    assert source == "projects/proj/global/images/family/herder-worker"
    with pytest.raises(CloudError, match="image"):
        make_set().create(SMALL, "", OWNER, "", None)


def test_spot_instances_are_deleted_when_preempted(fake: FakeCompute, make_set: Any) -> None:
    make_set().create(SPOT, IMAGE, OWNER, "", None)
    assert fake.inserted()[0]["scheduling"] == {
        "provisioningModel": "SPOT",
        "instanceTerminationAction": "DELETE",
        "automaticRestart": False,
        "onHostMaintenance": "TERMINATE",
    }


def test_gpus_are_attached_and_terminate_on_maintenance(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    iset.create(T4, IMAGE, OWNER, "", None)
    body = fake.inserted()[0]
    assert body["guestAccelerators"] == [
        {
            "acceleratorType": f"zones/{ZONES[0]}/acceleratorTypes/nvidia-tesla-t4",
            "acceleratorCount": 2,
        }
    ]
    assert body["scheduling"] == {"onHostMaintenance": "TERMINATE"}
    iset.create(L4, IMAGE, OWNER, "", None)  # G2 machines carry their GPU: nothing to attach
    body = fake.inserted()[1]
    assert "guestAccelerators" not in body
    assert body["scheduling"] == {"onHostMaintenance": "TERMINATE"}


def test_configured_accelerator_type_wins_and_missing_one_is_named(
    fake: FakeCompute, make_set: Any
) -> None:
    v100 = InstanceType(
        name="v100",
        provider_type="n1-standard-8",
        vcpus=8,
        ram=30 << 30,
        gpu=GPUSpec(device_count=1),
    )
    with pytest.raises(CloudError, match=r"accelerator_types\.v100"):
        make_set().create(v100, IMAGE, OWNER, "", None)
    assert fake.inserted() == []
    make_set(accelerator_types={"v100": "nvidia-tesla-v100"}).create(v100, IMAGE, OWNER, "", None)
    assert fake.inserted()[0]["guestAccelerators"][0]["acceleratorType"].endswith(
        "/nvidia-tesla-v100"
    )


def test_added_scratch_as_persistent_disk_or_local_ssds(fake: FakeCompute, make_set: Any) -> None:
    make_set(scratch_disk_type="pd-ssd").create(SCRATCH, IMAGE, OWNER, "", None)
    disks = fake.inserted()[0]["disks"]
    assert len(disks) == 2
    assert disks[1] == {
        "autoDelete": True,
        "deviceName": "herder-scratch",
        "initializeParams": {
            "diskType": f"zones/{ZONES[0]}/diskTypes/pd-ssd",
            "diskSizeGb": "466",
            "labels": {"herder-set": SET_ID},
        },
    }
    make_set(scratch_disk="local-ssd").create(SCRATCH, IMAGE, OWNER, "", None)
    disks = fake.inserted()[1]["disks"]
    assert len(disks) == 3  # 500 GB needs two 375 GiB local SSDs
    assert disks[1] == {
        "type": "SCRATCH",
        "interface": "NVME",
        "autoDelete": True,
        "initializeParams": {"diskType": f"zones/{ZONES[0]}/diskTypes/local-ssd"},
    }


def test_requests_carry_credentials_from_the_key_file(fake: FakeCompute, make_set: Any) -> None:
    make_set().create(SMALL, IMAGE, OWNER, "", None)
    auth = {r.headers.get("authorization", "") for r in fake.requests}
    assert auth and all(a.startswith("Bearer ") for a in auth)


def test_application_default_credentials(
    fake: FakeCompute,
    make_set: Any,
    tmp_path: Path,
    private_key_pem: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_key_file(tmp_path / "adc.json", fake, private_key_pem)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", path)
    make_set(credentials=None).create(SMALL, IMAGE, OWNER, "", None)
    auth = fake.requests[0].headers.get("authorization", "")
    assert auth.startswith("Bearer ") and len(auth) > len("Bearer ")


def test_unusable_key_file_is_named_without_its_contents(
    make_set: Any, tmp_path: Path, private_key_pem: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "service_account", "private_key": private_key_pem}))
    with pytest.raises(CloudError) as info:
        make_set(credentials={"file": str(bad)})
    assert "credentials" in str(info.value) and str(bad) in str(info.value)
    assert "PRIVATE KEY" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(CloudError, match=r"credentials \(file:.*missing.json\): cannot read"):
        make_set(credentials={"file": str(tmp_path / "missing.json")})


def test_the_key_can_come_from_an_environment_variable(
    fake: FakeCompute, make_set: Any, key_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERDER_TEST_GCE_KEY", Path(key_file).read_text())
    make_set(credentials={"env": "HERDER_TEST_GCE_KEY"}).create(SMALL, IMAGE, OWNER, "", None)
    assert fake.requests[-1].headers.get("authorization", "").startswith("Bearer ")
    monkeypatch.setenv("HERDER_TEST_GCE_KEY", "not json at all")
    with pytest.raises(CloudError, match=r"env:HERDER_TEST_GCE_KEY.*not a service-account key"):
        make_set(credentials={"env": "HERDER_TEST_GCE_KEY"})


def test_the_former_credentials_file_key_is_refused_with_what_to_write(
    base_params: dict[str, Any],
) -> None:
    raw = {k: v for k, v in base_params.items() if k != "credentials"}
    with pytest.raises(ValidationError) as info:
        GCEDriver.validate_parameters({**raw, "credentials_file": "/etc/herder/gce.json"})
    assert "credentials_file" in str(info.value)
    assert "write 'credentials: {file: /etc/herder/gce.json}' instead" in str(info.value)


def test_pending_operations_are_waited_for_on_the_configured_endpoint(
    fake: FakeCompute, make_set: Any
) -> None:
    fake.pending_polls = 3
    instance = make_set().create(SMALL, IMAGE, OWNER, "", None)
    waits = fake.calls("POST", r"/operations/[^/]+/wait$")
    assert len(waits) == 3
    assert instance.id in fake.all_names()


def test_operation_that_never_finishes_times_out_by_the_injected_clock(
    fake: FakeCompute, make_set: Any
) -> None:
    from herder.runtime import VirtualRuntime

    runtime = VirtualRuntime(strict=False)
    try:
        fake.pending_polls = 10**6
        iset = make_set(
            DriverContext(instance_set_id=SET_ID, runtime=runtime), operation_timeout="10s"
        )
        calls = []

        def wait(**kwargs: Any) -> Any:
            calls.append(kwargs)
            runtime.advance(4)  # each server-side wait takes time
            return real_wait(**kwargs)

        real_wait = iset.operations.wait
        iset.operations.wait = wait
        with pytest.raises(CloudError, match="still not done after 10s"):
            iset.create(SMALL, IMAGE, OWNER, "", None)
        assert len(calls) == 3
    finally:
        runtime.shutdown()


# --------------------------------------------------------------------------- zone failover


def test_stockout_fails_over_to_the_next_zone_and_remembers_it(
    fake: FakeCompute, make_set: Any
) -> None:
    registry = CollectorRegistry()
    iset = make_set(DriverContext(instance_set_id=SET_ID, metrics_registry=registry))
    fake.fail("insert", STOCKOUT, zone=ZONES[0])
    instance = iset.create(SMALL, IMAGE, OWNER, "", None)
    assert isinstance(instance, GCEInstance) and instance.zone == ZONES[1]
    zones = [r.path.split("/")[6] for r in fake.calls("POST", r"/instances$")]
    assert zones == [ZONES[0], ZONES[1]]
    second = iset.create(SMALL, IMAGE, OWNER, "", None)  # starts where the last one worked
    assert isinstance(second, GCEInstance) and second.zone == ZONES[1]

    def sample(zone: str, outcome: str) -> float:
        value = registry.get_sample_value(
            "herder_gce_instance_creates_total", {"zone": zone, "outcome": outcome}
        )
        return value or 0.0

    assert sample(ZONES[0], "capacity") == 1
    assert sample(ZONES[1], "success") == 2


def test_synchronous_stockout_also_fails_over(fake: FakeCompute, make_set: Any) -> None:
    sync = Failure(
        503,
        "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        "The zone does not have enough resources '(resource type:compute)'.",
    )
    fake.fail("insert", sync, zone=ZONES[0])
    instance = make_set().create(SMALL, IMAGE, OWNER, "", None)
    assert isinstance(instance, GCEInstance) and instance.zone == ZONES[1]


def test_stockout_everywhere_is_a_type_capacity_error(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    for zone in ZONES:
        fake.fail("insert", STOCKOUT, zone=zone)
    with pytest.raises(CapacityError) as info:
        iset.create(SMALL, IMAGE, OWNER, "", None)
    assert info.value.instance_type_specific
    assert "ZONE_RESOURCE_POOL_EXHAUSTED" in str(info.value)
    assert len(fake.inserted()) == 3 and fake.all_names() == []


def test_stockout_is_reported_over_a_later_plain_error(fake: FakeCompute, make_set: Any) -> None:
    fake.fail("insert", STOCKOUT, zone=ZONES[0])
    fake.fail(
        "insert",
        Failure(
            400,
            "invalid",
            "Invalid value for field 'resource.machineType':"
            " Machine type 'e2-standard-2' does not exist in zone "
            "'us-central1-b'.",
        ),
        zone=ZONES[1],
    )
    fake.fail("insert", Failure(500, "backendError", "Internal error"), zone=ZONES[2])
    with pytest.raises(CapacityError):
        make_set().create(SMALL, IMAGE, OWNER, "", None)
    assert len(fake.inserted()) == 3


@pytest.mark.parametrize(
    "failure",
    [
        Failure(
            503,
            "REGION_RESOURCE_POOL_EXHAUSTED",
            "The region is out of resources",
            in_operation=True,
        ),
        Failure(
            403,
            "QUOTA_EXCEEDED",
            "Quota 'N2_CPUS' exceeded.  Limit: 24.0 in region us-central1.",
            in_operation=True,
        ),
        Failure(400, "invalid", "Invalid value for field 'resource.name'"),
    ],
)
def test_errors_that_are_not_zonal_stop_the_failover(
    fake: FakeCompute, make_set: Any, failure: Failure
) -> None:
    fake.fail("insert", failure, zone=ZONES[0])
    with pytest.raises(CloudError):
        make_set().create(SMALL, IMAGE, OWNER, "", None)
    assert len(fake.inserted()) == 1


# --------------------------------------------------------------------------- tags


def test_tags_round_trip_exactly(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    odd = {
        **OWNER,
        "HerderInstanceType": "n2-standard-4.Spot",
        "Unicode ✓": 'Ümlaut & "quotes"',
        "long": "x" * 1000,
        "empty": "",
        "IdleBehavior": "run",
    }
    instance = iset.create(SMALL, IMAGE, odd, "", None)
    assert instance.tags == odd
    (listed,) = iset.instances(OWNER)
    assert listed.tags == odd and listed.id == instance.id


def test_set_tags_replaces_all_and_keeps_other_metadata(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    instance = iset.create(SMALL, IMAGE, {**OWNER, "Old": "1"}, "echo init", ED25519)
    assert isinstance(instance, GCEInstance)
    instance.set_tags({**OWNER, "IdleBehavior": "drain"})
    meta = fake.metadata(instance.zone, instance.id)
    assert json.loads(meta["herder-tags"]) == {**OWNER, "IdleBehavior": "drain"}
    assert meta["startup-script"] == "#!/bin/sh\necho init\n" and "ssh-keys" in meta
    (listed,) = iset.instances(OWNER)
    assert listed.tags == {**OWNER, "IdleBehavior": "drain"}
    assert fake.calls("POST", r"/setLabels$") == []  # the set id did not change


def test_set_tags_keeps_a_concurrent_change(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    instance = iset.create(SMALL, IMAGE, OWNER, "", None)
    assert isinstance(instance, GCEInstance)
    changed = []

    def someone_else(zone: str, name: str) -> None:
        if not changed:  # between herder's read and herder's write, once
            changed.append(name)
            fake.change_metadata(zone, name, "operator-note", "keep me")

    fake.after_get = someone_else
    instance.set_tags({**OWNER, "IdleBehavior": "hold"})
    meta = fake.metadata(instance.zone, instance.id)
    assert meta["operator-note"] == "keep me"
    assert json.loads(meta["herder-tags"]) == {**OWNER, "IdleBehavior": "hold"}
    assert len(fake.calls("POST", r"/setMetadata$")) == 2  # the first one was refused (412)


def test_concurrent_set_tags_from_threads_all_land(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    instance = iset.create(SMALL, IMAGE, OWNER, "", None)
    assert isinstance(instance, GCEInstance)
    errors: list[BaseException] = []

    def retag(n: int) -> None:
        try:
            instance.set_tags({**OWNER, "Writer": str(n)})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=retag, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = json.loads(fake.metadata(instance.zone, instance.id)["herder-tags"])
    assert final["Writer"] in {"0", "1", "2", "3"} and set(final) == {*OWNER, "Writer"}


def test_changing_the_set_id_moves_the_label(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    instance = iset.create(SMALL, IMAGE, OWNER, "", None)
    assert isinstance(instance, GCEInstance)
    other = {"HerderInstanceSetID": "Other Set"}
    instance.set_tags(other)
    assert fake.instances[(instance.zone, instance.id)]["labels"]["herder-set"] == (
        set_label_value("Other Set")
    )
    assert iset.instances(OWNER) == []
    assert [i.id for i in iset.instances(other)] == [instance.id]


# --------------------------------------------------------------------------- listing


def test_listing_follows_pages_across_zones(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    created = []
    for n in range(7):
        instance = iset.create(SMALL, IMAGE, {**OWNER, "N": str(n)}, "", None)
        assert isinstance(instance, GCEInstance)
        created.append(instance)
    # spread them over the zones, as failover and restarts do
    with fake.lock:
        for n, instance in enumerate(created):
            data = fake.instances.pop((instance.zone, instance.id))
            zone = ZONES[n % 3]
            data["zone"] = data["zone"].rsplit("/", 1)[0] + "/" + zone
            fake.instances[(zone, instance.id)] = data
    fake.page_size = 2
    listing = iset.instances(OWNER)
    assert sorted(i.id for i in listing) == sorted(i.id for i in created)
    assert {i.zone for i in listing if isinstance(i, GCEInstance)} == set(ZONES)
    pages = fake.calls("GET", r"/aggregated/instances$")
    assert len(pages) == 4
    assert pages[0].query["filter"] == [f"labels.herder-set={SET_ID}"]
    assert [p.query.get("pageToken") for p in pages] == [None, ["2"], ["4"], ["6"]]


def test_listing_filters_by_tags_and_set(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    a = iset.create(SMALL, IMAGE, {**OWNER, "Role": "a"}, "", None)
    b = iset.create(SMALL, IMAGE, {**OWNER, "Role": "b"}, "", None)
    other = iset.create(
        SMALL, IMAGE, {"HerderInstanceSetID": "zzzzz-is000-other0000000000"}, "", None
    )
    assert {i.id for i in iset.instances({**OWNER, "Role": "a"})} == {a.id}
    assert {i.id for i in iset.instances(OWNER)} == {a.id, b.id}
    assert {i.id for i in iset.instances({})} == {a.id, b.id, other.id}
    assert fake.calls("GET", r"/aggregated/instances$")[-1].query["filter"] == [
        "labels.herder-set:*"
    ]


def test_listing_drops_instances_going_away(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    keep = iset.create(SMALL, IMAGE, OWNER, "", None)
    going = []
    for status in ("STOPPING", "TERMINATED", "STOPPED"):
        instance = iset.create(SMALL, IMAGE, OWNER, "", None)
        assert isinstance(instance, GCEInstance)
        fake.set_status(instance.zone, instance.id, status)
        going.append(instance.id)
    booting = iset.create(SMALL, IMAGE, OWNER, "", None)
    assert isinstance(booting, GCEInstance)
    fake.set_status(booting.zone, booting.id, "PROVISIONING")
    assert {i.id for i in iset.instances(OWNER)} == {keep.id, booting.id}


def test_listing_counts_instances_by_zone(fake: FakeCompute, make_set: Any) -> None:
    registry = CollectorRegistry()
    iset = make_set(DriverContext(instance_set_id=SET_ID, metrics_registry=registry))
    iset.create(SMALL, IMAGE, OWNER, "", None)
    iset.instances(OWNER)
    assert registry.get_sample_value("herder_gce_instances", {"zone": ZONES[0]}) == 1
    assert registry.get_sample_value("herder_gce_instances", {"zone": ZONES[2]}) == 0


# --------------------------------------------------------------------------- destroy


def test_destroy_deletes_and_twice_is_harmless(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    instance = iset.create(SMALL, IMAGE, OWNER, "", None)
    instance.destroy()
    assert fake.all_names() == [] and iset.instances(OWNER) == []
    instance.destroy()
    assert len(fake.calls("DELETE", r"/instances/")) == 2


def test_destroy_passes_other_errors_on(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    instance = iset.create(SMALL, IMAGE, OWNER, "", None)
    fake.fail(
        "delete",
        Failure(
            403,
            "forbidden",
            "Required 'compute.instances.delete' "
            "permission for 'projects/proj/zones/us-central1-a/instances/x'",
        ),
    )
    with pytest.raises(CloudError, match=r"compute\.instances\.delete"):
        instance.destroy()


# --------------------------------------------------------------------------- host keys


def test_host_key_published_by_the_guest_agent_is_accepted(
    fake: FakeCompute, make_set: Any
) -> None:
    instance = make_set().create(SMALL, IMAGE, OWNER, "", None)
    assert isinstance(instance, GCEInstance)
    blob = fake.host_key_blob(instance.zone, instance.id)
    instance.verify_host_key(HostKey("ssh-ed25519", blob), Refusing())
    guest = fake.calls("GET", r"/getGuestAttributes$")
    assert guest and guest[0].query["queryPath"] == ["hostkeys/"]


def test_other_host_key_is_refused_without_asking_the_instance(
    fake: FakeCompute, make_set: Any
) -> None:
    instance = make_set().create(SMALL, IMAGE, OWNER, "", None)
    with pytest.raises(HostKeyMismatch, match="ssh-ed25519"):
        instance.verify_host_key(HostKey("ssh-ed25519", b"\x00" * 51), Refusing())
    with pytest.raises(HostKeyMismatch):
        instance.verify_host_key(HostKey("ssh-rsa", b"\x00" * 51), Refusing())


def test_without_published_keys_herder_falls_back_to_the_secret(
    fake: FakeCompute, make_set: Any
) -> None:
    from herder.engine.worker.verify import TagVerifier

    fake.publish_host_keys = False
    instance = make_set().create(SMALL, IMAGE, OWNER, "", None)
    with pytest.raises(NotImplementedByDriver):
        instance.verify_host_key(HostKey("ssh-ed25519", b"\x01" * 51), Refusing())

    class Knows(RemoteRunner):
        def run(
            self, command: str, stdin: bytes = b"", timeout: float = 60.0
        ) -> tuple[int, bytes, bytes]:
            return 0, b"s3cret", b""

    TagVerifier(instance, "s3cret").verify_host_key(HostKey("ssh-ed25519", b"\x01"), Knows())


def test_verify_host_keys_off_never_asks_gce(fake: FakeCompute, make_set: Any) -> None:
    instance = make_set(verify_host_keys=False).create(SMALL, IMAGE, OWNER, "", None)
    with pytest.raises(NotImplementedByDriver):
        instance.verify_host_key(HostKey("ssh-ed25519", b"\x01"), Refusing())
    assert fake.calls("GET", r"/getGuestAttributes$") == []


def test_published_key_value_may_carry_the_key_type(fake: FakeCompute, make_set: Any) -> None:
    instance = make_set().create(SMALL, IMAGE, OWNER, "", None)
    assert isinstance(instance, GCEInstance)
    blob = fake.host_key_blob(instance.zone, instance.id)
    with fake.lock:
        fake.host_keys[(instance.zone, instance.id)]["ssh-ed25519"] = (
            "ssh-ed25519 " + base64.b64encode(blob).decode() + " root@instance"
        )
    instance.verify_host_key(HostKey("ssh-ed25519", blob), Refusing())


# --------------------------------------------------------------------------- prices, quotas


def test_spot_price_history_is_the_configured_price(fake: FakeCompute, make_set: Any) -> None:
    iset = make_set()
    spot = iset.create(SPOT, IMAGE, OWNER, "", None)
    (point,) = spot.price_history(SPOT)
    assert point.price == 0.02
    assert point.start_time == pytest.approx(1796587200.0)  # the fake's creationTimestamp
    assert iset.create(SMALL, IMAGE, OWNER, "", None).price_history(SMALL) == []


@pytest.mark.parametrize(
    ("it", "group"),
    [
        (SMALL, "cpus"),
        (SPOT, "preemptible_cpus"),
        (SCRATCH, "n2_cpus"),
        (InstanceType(name="c", provider_type="c3-highcpu-22", vcpus=22, ram=44 << 30), "c3_cpus"),
        (T4, "nvidia_t4_gpus"),
        (L4, "nvidia_l4_gpus"),
        (
            InstanceType(
                name="a", provider_type="a2-ultragpu-1g", vcpus=12, ram=170 << 30, preemptible=True
            ),
            "preemptible_nvidia_a100_80gb_gpus",
        ),
        (
            InstanceType(name="h", provider_type="a3-highgpu-8g", vcpus=208, ram=1 << 40),
            "nvidia_h100_gpus",
        ),
    ],
)
def test_quota_groups_follow_gce_quotas(it: InstanceType, group: str) -> None:
    assert quota_group(it, {}, {}) == group


def test_quota_group_overrides_and_configured_gpus() -> None:
    it = InstanceType(
        name="v", provider_type="n1-standard-8", vcpus=8, ram=30 << 30, gpu=GPUSpec(device_count=1)
    )
    assert quota_group(it, {"v": "nvidia-tesla-v100"}, {}) == "nvidia_v100_gpus"
    assert quota_group(SCRATCH, {}, {"n2-": "general", "n2-standard": "std"}) == "std"
    assert gpu_quota_name("nvidia-tesla-p100") == "NVIDIA_P100_GPUS"


def test_stop_closes_the_clients(make_set: Any) -> None:
    iset = make_set()
    iset.stop()


def test_driver_builds_a_set_from_validated_parameters(base_params: dict[str, Any]) -> None:
    params = GCEDriver.validate_parameters(base_params)
    iset = GCEDriver().instance_set(params, DriverContext(instance_set_id=SET_ID))
    try:
        assert iset.instances(OWNER) == []
    finally:
        iset.stop()
    assert PROJECT == "proj"


# --------------------------------------------------------------------------- host keys over SSH


@pytest.mark.parametrize("genuine", [True, False], ids=["published-key", "impostor"])
def test_ssh_executor_trusts_exactly_the_published_host_key(
    fake: FakeCompute, make_set: Any, tmp_path: Path, genuine: bool
) -> None:
    """herder's own SSH executor, with the instance-secret wrapper herder always uses: the
    server's host key is accepted when the guest agent published it, and refused when another
    key was published, even though the server would run any command (the secret is never
    asked for: GCE's word is stronger)."""
    from herder.config import Config
    from herder.engine.worker.verify import TagVerifier
    from herder.executor import ExecutorError
    from herder.runtime import ThreadRuntime
    from herder.ssh.executor import SSHExecutor
    from herder.ssh.server import LocalSSHServer, generate_key, generate_key_file

    host_key, _ = generate_key()
    other_key, _ = generate_key()
    _, client_public = generate_key_file(tmp_path / "id_ed25519")
    server = LocalSSHServer(host_key, [client_public], strip_sudo=True)
    server.start()
    runtime = ThreadRuntime()
    host, port = server.address.rsplit(":", 1)
    fake.address = host
    fake.host_key = (host_key if genuine else other_key).get_base64()
    instance = make_set().create(SMALL, IMAGE, OWNER, "", client_public)
    config = Config.model_validate(
        {
            "containers": {"dispatch_private_key": str(tmp_path / "id_ed25519")},
            "cloud": {"ssh_port": int(port), "timeout_command": 30},
        }
    )
    executor = SSHExecutor(
        TagVerifier(instance, "secret-never-planted"), config, runtime, connect_timeout=10.0
    )
    try:
        if genuine:
            result = executor.execute("echo $((40 + 2))", None, None, 30.0)
            assert result.ok and result.stdout.strip() == b"42"
        else:
            with pytest.raises(ExecutorError, match=r"(?i)host key"):
                executor.execute("true", None, None, 30.0)
    finally:
        executor.close()
        runtime.shutdown()
        server.stop()


# --------------------------------------------------------------------------- idempotent creates


def test_a_repeated_create_key_is_one_insert_with_one_request_id(
    fake: FakeCompute, make_set: Any
) -> None:
    iset = make_set()
    keyed = {**OWNER, "HerderInstanceSecret": "a" * 40}
    first = iset.create(SMALL, IMAGE, keyed, "", None)
    repeated = iset.create(SMALL, IMAGE, keyed, "", None)
    assert repeated.id == first.id and fake.all_names() == [first.id]
    ids = [r.query["requestId"][0] for r in fake.calls("POST", r"/instances$")]
    assert len(ids) == 2 and ids[0] == ids[1] and str(uuid.UUID(ids[0])) == ids[0]
    other = iset.create(SMALL, IMAGE, {**OWNER, "HerderInstanceSecret": "b" * 40}, "", None)
    assert other.id != first.id and len(fake.all_names()) == 2
    plain = iset.create(SMALL, IMAGE, OWNER, "", None)  # no key: no request id
    assert "requestId" not in fake.calls("POST", r"/instances$")[-1].query
    assert plain.id not in (first.id, other.id)


def test_a_repeat_after_gce_forgot_the_request_id_finds_the_instance_by_name(
    fake: FakeCompute, make_set: Any
) -> None:
    iset = make_set()
    keyed = {**OWNER, "HerderInstanceSecret": "c" * 40}
    first = iset.create(SMALL, IMAGE, keyed, "", None)
    fake.forget_request_ids()
    assert iset.create(SMALL, IMAGE, keyed, "", None).id == first.id
    assert fake.all_names() == [first.id]
    # A name taken by an instance of another create is not taken for this one's.
    fake.forget_request_ids()
    fake.change_metadata(
        ZONES[0], first.id, "herder-tags", json.dumps({**OWNER, "HerderInstanceSecret": "d" * 40})
    )
    with pytest.raises(CloudError, match="already exists"):
        iset.create(SMALL, IMAGE, keyed, "", None)


def test_a_repeated_create_goes_to_the_zone_its_key_went_to(
    fake: FakeCompute, make_set: Any
) -> None:
    iset = make_set()
    keyed = {**OWNER, "HerderInstanceSecret": "e" * 40}
    fake.fail("insert", STOCKOUT, zone=ZONES[0])
    first = iset.create(SMALL, IMAGE, keyed, "", None)
    assert isinstance(first, GCEInstance) and first.zone == ZONES[1]
    fake.fail("insert", STOCKOUT, zone=ZONES[1])  # the next create moves on to the third zone
    moved = iset.create(SMALL, IMAGE, {**OWNER, "HerderInstanceSecret": "f" * 40}, "", None)
    assert isinstance(moved, GCEInstance) and moved.zone == ZONES[2]
    repeated = iset.create(SMALL, IMAGE, keyed, "", None)
    assert repeated.id == first.id and len(fake.all_names()) == 2
    assert fake.calls("POST", r"/instances$")[-1].path.split("/")[6] == ZONES[1]


def test_the_fake_refuses_a_request_id_that_is_not_a_uuid(fake: FakeCompute) -> None:
    status, payload, _, _ = fake.route(
        Request(
            "POST",
            f"/compute/v1/projects/{PROJECT}/zones/{ZONES[0]}/instances",
            {"requestId": ["not-a-uuid"]},
            {"name": "x"},
            {},
        )
    )
    assert status == 400 and "requestId" in payload["error"]["message"]
