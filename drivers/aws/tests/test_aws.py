"""The aws driver against the EC2 emulator (moto), through the real boto3 client."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from herder_driver_aws.driver import AWSDriver, AWSInstance, AWSInstanceSet, format_price
from herder_driver_aws.keys import fingerprints, key_pair_name
from herder_driver_aws.params import AWSParameters
from herder_driver_aws.quota import DEFAULT_QUOTA_CODES, DEFAULT_QUOTA_GROUPS, quota_group
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from herder.cloud import CapacityError, CloudError, DriverContext, QuotaError
from herder.model import InstanceType

from .conftest import IMAGE, REGION

OWNER = {"HerderInstanceSetID": "zzzzz-is000-000000000000000"}
SMALL = InstanceType(name="small", provider_type="m5.large", vcpus=2, ram=8 << 30, price=0.096)
SPOT = InstanceType(
    name="small.spot", provider_type="m5.large", vcpus=2, ram=8 << 30, price=0.04, preemptible=True
)
SCRATCH = InstanceType(
    name="scratch",
    provider_type="m5.large",
    vcpus=2,
    ram=8 << 30,
    added_scratch=50 * 10**9,
    price=0.1,
)
ED25519 = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
    "herder@example"
)


def make_set(
    ec2: Any, registry: CollectorRegistry | None = None, client: Any = None, **params: Any
) -> AWSInstanceSet:
    validated = AWSDriver.validate_parameters({"region": REGION, **params})
    assert isinstance(validated, AWSParameters)
    context = DriverContext(
        instance_set_id=OWNER["HerderInstanceSetID"],
        metrics_registry=registry,
        shared_resource_tags={"Owner": "data-team"},
    )
    return AWSInstanceSet(validated, context, client=client)


def describe(ec2: Any, instance_id: str) -> dict[str, Any]:
    reply = ec2.describe_instances(InstanceIds=[instance_id])
    return dict(reply["Reservations"][0]["Instances"][0])


def rsa_public_key(tmp_path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(tmp_path / "id_rsa")],
        check=True,
    )
    return (tmp_path / "id_rsa.pub").read_text()


# --------------------------------------------------------------------------- parameters


def test_plugin_registers_the_aws_driver() -> None:
    from herder.plugins import Plugins

    assert Plugins.load().driver_class("aws") is AWSDriver


def test_parameter_defaults_follow_arvados() -> None:
    p = AWSParameters(region="eu-west-1")
    assert p.ebs_volume_type == "gp2" and p.ebs_price == 0.10
    assert p.spot_price_update_interval == 24 * 3600
    assert p.instance_type_quota_groups["m"] == "standard"
    assert p.instance_type_quota_groups["vt"] == "g"
    assert p.subnet_ids == [] and not p.associate_public_ip


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", []), ("subnet-1", ["subnet-1"]), (["a", "b"], ["a", "b"]), ([], [])],
)
def test_subnet_ids_accept_one_several_or_none(raw: Any, expected: list[str]) -> None:
    assert AWSParameters(region="r", subnet_ids=raw).subnet_ids == expected


def test_security_groups_accept_arvados_map_form() -> None:
    p = AWSParameters.model_validate({"region": "r", "security_group_ids": {"sg-1": {}}})
    assert p.security_group_ids == ["sg-1"]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({}, "region"),
        ({"region": "r", "regoin": "x"}, "regoin"),
        ({"region": "r", "ebs_price": -1}, "ebs_price"),
        ({"region": "r", "spot_price_update_interval": "soon"}, "spot_price_update_interval"),
    ],
)
def test_bad_parameters_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError) as info:
        AWSDriver.validate_parameters(raw)
    assert key in str(info.value)


def test_half_a_static_key_pair_is_refused() -> None:
    with pytest.raises(ValidationError, match="together"):
        AWSParameters(region="r", access_key_id="AKIA")
    with pytest.raises(ValidationError, match="not both"):
        AWSDriver.validate_parameters(
            {"region": "r", "access_key_id": "A", "secret_access_key": {"env": "S"}, "profile": "p"}
        )
    with pytest.raises(ValidationError, match="session_token needs"):
        AWSDriver.validate_parameters({"region": "r", "session_token": {"env": "T"}})


def test_a_secret_key_in_the_clear_is_refused_without_repeating_it() -> None:
    with pytest.raises(ValidationError) as info:
        AWSDriver.validate_parameters(
            {"region": "r", "access_key_id": "A", "secret_access_key": "wJalr-in-the-yaml"}
        )
    assert "wJalr" not in str(info.value)
    assert "secret_access_key" in str(info.value) and "{env: VARIABLE}" in str(info.value)


def test_static_keys_are_read_by_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "aws-secret"
    secret.write_text("from-the-file\n")
    monkeypatch.setenv("HERDER_TEST_AWS_TOKEN", "token-from-env")
    iset = make_set(
        None,
        access_key_id="AKIDTEST",
        secret_access_key={"file": str(secret)},
        session_token={"env": "HERDER_TEST_AWS_TOKEN"},
    )
    credentials = iset.client._request_signer._credentials
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (
        "AKIDTEST",
        "from-the-file",
        "token-from-env",
    )
    with pytest.raises(CloudError, match="HERDER_TEST_AWS_UNSET is not set"):
        make_set(None, access_key_id="A", secret_access_key={"env": "HERDER_TEST_AWS_UNSET"})


def test_client_has_sdk_retries_off_and_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERDER_TEST_AWS_SECRET", "b")
    iset = make_set(
        None,
        connect_timeout=3,
        read_timeout=7,
        access_key_id="a",
        secret_access_key={"env": "HERDER_TEST_AWS_SECRET"},
    )
    config = iset.client.meta.config
    assert config.retries["total_max_attempts"] == 1
    assert (config.connect_timeout, config.read_timeout) == (3, 7)
    assert iset.client.meta.region_name == REGION


def test_endpoint_url_is_used() -> None:
    iset = make_set(None, endpoint_url="http://127.0.0.1:5055")
    assert iset.client.meta.endpoint_url == "http://127.0.0.1:5055"


# --------------------------------------------------------------------------- create


def test_create_sends_the_whole_request(ec2: Any) -> None:
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.1.0/24")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="herder", Description="d", VpcId=vpc)["GroupId"]
    iset = make_set(
        ec2,
        subnet_ids=subnet,
        security_group_ids=[sg],
        admin_username="debian",
        resource_tags={"Project": "p"},
    )
    instance = iset.create(SMALL, IMAGE, {**OWNER, "HerderInstanceType": "small"}, "echo hi", None)
    data = describe(ec2, instance.id)
    assert data["InstanceType"] == "m5.large" and data["ImageId"] == IMAGE
    assert data["SubnetId"] == subnet
    assert [g["GroupId"] for g in data["NetworkInterfaces"][0]["Groups"]] == [sg]
    assert instance.tags == {**OWNER, "HerderInstanceType": "small", "Project": "p"}
    assert instance.address == data["PrivateIpAddress"] and instance.address
    assert instance.remote_user == "debian"
    assert "KeyName" not in data  # no public key: no key pair calls
    assert ec2.describe_key_pairs()["KeyPairs"] == []
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpEndpoint"] == "enabled"
    assert "InstanceLifecycle" not in data
    shutdown = ec2.describe_instance_attribute(
        InstanceId=instance.id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    raw = ec2.describe_instance_attribute(InstanceId=instance.id, Attribute="userData")
    assert base64.b64decode(raw["UserData"]["Value"]) == b"#!/bin/sh\necho hi\n"


def test_no_public_ip_unless_asked(ec2: Any) -> None:
    calls: list[dict[str, Any]] = []
    for public in (False, True):
        iset = make_set(
            ec2, client=Recorder(make_set(ec2).client, calls), associate_public_ip=public
        )
        iset.create(SMALL, IMAGE, OWNER, "", None)
    nics = [c["NetworkInterfaces"][0] for c in calls]
    assert [n["AssociatePublicIpAddress"] for n in nics] == [False, True]
    assert all(n["DeleteOnTermination"] and n["DeviceIndex"] == 0 for n in nics)


def test_scratch_volume_spot_and_iam_profile(ec2: Any) -> None:
    iam = boto3.client("iam", region_name=REGION)
    iam.create_instance_profile(InstanceProfileName="herder-worker")
    calls: list[dict[str, Any]] = []
    iset = make_set(
        ec2,
        client=Recorder(make_set(ec2).client, calls),
        ebs_volume_type="gp3",
        iam_instance_profile="herder-worker",
    )
    instance = iset.create(SCRATCH, IMAGE, OWNER, "", None)
    data = describe(ec2, instance.id)
    volumes = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in data["BlockDeviceMappings"]}
    volume = ec2.describe_volumes(VolumeIds=[volumes["/dev/xvdt"]])["Volumes"][0]
    assert volume["Size"] == 47  # ceil(50e9 / GiB)
    assert volume["VolumeType"] == "gp3"
    assert calls[0]["BlockDeviceMappings"][0]["Ebs"]["DeleteOnTermination"] is True
    assert {"Key": "Owner", "Value": "data-team"} in calls[0]["TagSpecifications"][1]["Tags"]
    assert data["IamInstanceProfile"]["Arn"].endswith("/herder-worker")
    assert "InstanceMarketOptions" not in calls[0]

    spot = iset.create(SPOT, IMAGE, OWNER, "", None)
    assert describe(ec2, spot.id)["InstanceLifecycle"] == "spot"
    assert calls[1]["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
            "MaxPrice": "0.04",
        },
    }


@pytest.mark.parametrize(
    ("price", "text"),
    [(0.04, "0.04"), (1e-05, "0.00001"), (2.0, "2"), (0.1 + 0.2, "0.30000000000000004")],
)
def test_spot_max_price_is_the_shortest_decimal(price: float, text: str) -> None:
    assert format_price(price) == text


def test_key_pair_is_imported_once_and_found_again_by_fingerprint(ec2: Any, tmp_path: Path) -> None:
    pub = rsa_public_key(tmp_path)
    iset = make_set(ec2)
    a = iset.create(SMALL, IMAGE, OWNER, "", pub)
    b = iset.create(SMALL, IMAGE, OWNER, "", pub)
    pairs = ec2.describe_key_pairs()["KeyPairs"]
    assert [p["KeyName"] for p in pairs] == [key_pair_name(fingerprints(pub)[0])]
    assert describe(ec2, a.id)["KeyName"] == describe(ec2, b.id)["KeyName"] == pairs[0]["KeyName"]
    # a restarted herder (empty cache) finds the pair an operator imported under another name
    ec2.delete_key_pair(KeyName=pairs[0]["KeyName"])
    ec2.import_key_pair(KeyName="operators-key", PublicKeyMaterial=pub.encode())
    c = make_set(ec2).create(SMALL, IMAGE, OWNER, "", pub)
    assert describe(ec2, c.id)["KeyName"] == "operators-key"
    assert len(ec2.describe_key_pairs()["KeyPairs"]) == 1


def test_ed25519_key_pair_is_reused_even_when_not_found_by_fingerprint(ec2: Any) -> None:
    first = make_set(ec2).create(SMALL, IMAGE, OWNER, "", ED25519)
    second = make_set(ec2).create(SMALL, IMAGE, OWNER, "", ED25519)
    assert describe(ec2, first.id)["KeyName"] == describe(ec2, second.id)["KeyName"]
    assert len(ec2.describe_key_pairs()["KeyPairs"]) == 1


def test_fingerprints_follow_ec2() -> None:
    prints = fingerprints(ED25519)
    assert prints[0].startswith("SHA256:") and prints[0].endswith("=")
    assert prints[1] == prints[0][:-1]
    with pytest.raises(ValueError):
        fingerprints("ssh-ed25519 not-base64")


def test_unusable_public_key_is_a_clear_error(ec2: Any) -> None:
    with pytest.raises(CloudError, match="Could not make key fingerprint"):
        make_set(ec2).create(SMALL, IMAGE, OWNER, "", "ssh-dss AAAA")


# --------------------------------------------------------------------------- subnet failover


class Recorder:
    """The real client, recording RunInstances requests and failing them in chosen subnets."""

    def __init__(
        self,
        client: Any,
        calls: list[dict[str, Any]],
        failures: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        self._client = client
        self.calls = calls
        self.failures = dict(failures or {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def run_instances(self, **request: Any) -> Any:
        self.calls.append(request)
        subnet = request["NetworkInterfaces"][0].get("SubnetId", "")
        if subnet in self.failures:
            code, message = self.failures[subnet]
            raise ClientError({"Error": {"Code": code, "Message": message}}, "RunInstances")
        return self._client.run_instances(**request)


def subnets(ec2: Any, n: int) -> list[str]:
    vpc = ec2.create_vpc(CidrBlock="10.2.0.0/16")["Vpc"]["VpcId"]
    return [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.2.{i}.0/24")["Subnet"]["SubnetId"]
        for i in range(n)
    ]


def tried(calls: list[dict[str, Any]]) -> list[str]:
    return [c["NetworkInterfaces"][0]["SubnetId"] for c in calls]


def test_subnet_failover_moves_on_and_remembers(ec2: Any) -> None:
    a, b, c = subnets(ec2, 3)
    calls: list[dict[str, Any]] = []
    registry = CollectorRegistry()
    client = Recorder(
        make_set(ec2).client, calls, {a: ("InsufficientFreeAddressesInSubnet", "no addresses")}
    )
    iset = make_set(ec2, registry=registry, client=client, subnet_ids=[a, b, c])
    instance = iset.create(SMALL, IMAGE, OWNER, "", None)
    assert tried(calls) == [a, b]
    assert describe(ec2, instance.id)["SubnetId"] == b
    calls.clear()
    iset.create(SMALL, IMAGE, OWNER, "", None)
    assert tried(calls) == [b]  # starts where it last succeeded
    sample = registry.get_sample_value
    assert sample("herder_ec2_instance_starts_total", {"subnet_id": a, "success": "false"}) == 1
    assert sample("herder_ec2_instance_starts_total", {"subnet_id": b, "success": "true"}) == 2
    iset.instances(OWNER)
    assert sample("herder_ec2_instances", {"subnet_id": b}) == 2
    assert sample("herder_ec2_instances", {"subnet_id": a}) == 0
    assert sample("herder_ec2_instances", {"subnet_id": ""}) == 0


def test_failover_stops_at_an_error_that_is_not_subnet_specific(ec2: Any) -> None:
    a, b = subnets(ec2, 2)
    calls: list[dict[str, Any]] = []
    client = Recorder(make_set(ec2).client, calls, {a: ("InvalidAMIID.NotFound", "no such image")})
    iset = make_set(ec2, client=client, subnet_ids=[a, b])
    with pytest.raises(CloudError, match=r"InvalidAMIID\.NotFound: no such image"):
        iset.create(SMALL, IMAGE, OWNER, "", None)
    assert tried(calls) == [a]


def test_failover_reports_capacity_over_other_errors_and_remembers_the_last(ec2: Any) -> None:
    a, b, c = subnets(ec2, 3)
    calls: list[dict[str, Any]] = []
    client = Recorder(
        make_set(ec2).client,
        calls,
        {
            a: ("InsufficientInstanceCapacity", "no m5.large in this zone"),
            b: ("InvalidSubnetID.NotFound", "gone"),
            c: ("InvalidParameterValue", "no sufficient free ipv4 addresses"),
        },
    )
    iset = make_set(ec2, client=client, subnet_ids=[a, b, c])
    with pytest.raises(CapacityError) as info:
        iset.create(SMALL, IMAGE, OWNER, "", None)
    assert info.value.instance_type_specific
    assert tried(calls) == [a, b, c]
    calls.clear()
    client.failures.clear()
    iset.create(SMALL, IMAGE, OWNER, "", None)
    assert tried(calls) == [c]  # the last one tried, though it failed


def test_all_subnets_full_is_a_quota_error(ec2: Any) -> None:
    a, b = subnets(ec2, 2)
    full = ("InsufficientFreeAddressesInSubnet", "full")
    client = Recorder(make_set(ec2).client, [], {a: full, b: full})
    with pytest.raises(QuotaError):
        make_set(ec2, client=client, subnet_ids=[a, b]).create(SMALL, IMAGE, OWNER, "", None)


# --------------------------------------------------------------------------- list, tags, destroy


def test_list_filters_by_tags_and_drops_terminated(ec2: Any) -> None:
    iset = make_set(ec2)
    keep = iset.create(SMALL, IMAGE, {**OWNER, "Role": "a"}, "", None)
    other = iset.create(SMALL, IMAGE, {**OWNER, "Role": "b"}, "", None)
    gone = iset.create(SMALL, IMAGE, {**OWNER, "Role": "a"}, "", None)
    gone.destroy()
    assert [i.id for i in iset.instances({**OWNER, "Role": "a"})] == [keep.id]
    assert {i.id for i in iset.instances(OWNER)} == {keep.id, other.id}


def test_list_follows_every_page(ec2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    iset = make_set(ec2)
    monkeypatch.setattr(AWSInstanceSet, "page_size", 5)
    created = {iset.create(SMALL, IMAGE, OWNER, "", None).id for _ in range(12)}
    first_page = ec2.describe_instances(MaxResults=5)
    assert first_page.get("NextToken")  # the emulator does paginate
    assert {i.id for i in iset.instances(OWNER)} == created


def test_set_tags_replaces_and_destroy_twice_is_harmless(ec2: Any) -> None:
    iset = make_set(ec2)
    instance = iset.create(
        SMALL, IMAGE, {**OWNER, "HerderIdleBehavior": "run", "Old": "1"}, "", None
    )
    instance.set_tags({**OWNER, "HerderIdleBehavior": "drain"})
    [listed] = iset.instances(OWNER)
    assert listed.tags == {**OWNER, "HerderIdleBehavior": "drain"}
    instance.destroy()
    instance.destroy()
    assert describe(ec2, instance.id)["State"]["Name"] == "terminated"
    assert iset.instances(OWNER) == []


def test_destroy_of_an_unknown_instance_is_harmless(ec2: Any) -> None:
    iset = make_set(ec2)
    AWSInstance(iset, {"InstanceId": "i-0123456789abcdef0"}).destroy()


# --------------------------------------------------------------------------- spot prices


def test_price_history_adds_ebs_cost_and_is_cached(ec2: Any) -> None:
    calls: list[dict[str, Any]] = []
    real = make_set(ec2).client

    class Counting(Recorder):
        def describe_spot_price_history(self, **request: Any) -> Any:
            calls.append(request)
            return real.describe_spot_price_history(**request)

    iset = make_set(ec2, client=Counting(real, []), ebs_price=0.72)
    it = InstanceType(
        name="s",
        provider_type="m5.large",
        vcpus=2,
        ram=1 << 30,
        price=0.1,
        preemptible=True,
        added_scratch=10 << 30,
    )
    instance = iset.create(it, IMAGE, OWNER, "", None)
    [listed] = iset.instances(OWNER)
    assert len(calls) == 1
    assert calls[0]["InstanceTypes"] == ["m5.large"]
    assert calls[0]["ProductDescriptions"] == ["Linux/UNIX"]
    history = listed.price_history(it)
    assert history and len(calls) == 1  # cached
    raw = ec2.describe_spot_price_history(
        InstanceTypes=["m5.large"],
        Filters=[
            {
                "Name": "availability-zone",
                "Values": [describe(ec2, instance.id)["Placement"]["AvailabilityZone"]],
            }
        ],
    )["SpotPriceHistory"]
    assert history[0].price == pytest.approx(float(raw[0]["SpotPrice"]) + 0.72 * 10 / 720)
    on_demand = iset.create(SMALL, IMAGE, OWNER, "", None)
    assert on_demand.price_history(SMALL) == []


def test_spot_prices_refresh_after_the_interval(ec2: Any) -> None:
    from herder.runtime import VirtualRuntime

    runtime = VirtualRuntime()
    params = AWSParameters(region=REGION, spot_price_update_interval=3600)
    iset = AWSInstanceSet(params, DriverContext(instance_set_id="x", runtime=runtime))
    fetched: list[float] = []
    real = iset.prices._fetch
    iset.prices._fetch = lambda **kw: fetched.append(runtime.now()) or real(**kw)
    iset.create(SPOT, IMAGE, OWNER, "", None)
    iset.instances(OWNER)
    iset.instances(OWNER)
    runtime.advance(3601)
    iset.instances(OWNER)
    assert len(fetched) == 2
    runtime.shutdown()


def test_spot_price_lookup_can_be_turned_off(ec2: Any) -> None:
    iset = make_set(ec2, spot_price_update_interval=0)
    instance = iset.create(SPOT, IMAGE, OWNER, "", None)
    iset.instances(OWNER)
    assert instance.price_history(SPOT) == []


# --------------------------------------------------------------------------- quota groups


@pytest.mark.parametrize(
    ("provider_type", "preemptible", "group"),
    [
        ("g1.large", False, "g"),
        ("x1.large", False, "x"),
        ("inf1.2xlarge", False, "inf"),
        ("a1.small", False, "standard"),
        ("m1.xlarge", False, "standard"),
        ("m1.xlarge", True, "standard-spot"),
        ("p4.xlarge", True, "p-spot"),
        ("p5.xlarge", True, "p5-spot"),
        ("t3.2xlarge", False, "standard"),
        ("trn1.2xlarge", False, "trn"),
        ("trn1.2xlarge", True, "trn-spot"),
        ("imaginary9.5xlarge", False, "imaginary"),
        ("", False, ""),
    ],
)
def test_quota_groups(provider_type: str, preemptible: bool, group: str) -> None:
    params = AWSParameters(
        region="r",
        instance_type_quota_groups={"a": "standard", "m": "standard", "t": "standard", "P5": "p5"},
    )
    iset = AWSInstanceSet(params, DriverContext(instance_set_id="x"), client=object())
    it = InstanceType(
        name="x", provider_type=provider_type, vcpus=1, ram=1, preemptible=preemptible
    )
    assert iset.quota_group(it) == group


def test_default_quota_groups_put_vt_with_g() -> None:
    iset = AWSInstanceSet(
        AWSParameters(region="r"), DriverContext(instance_set_id="x"), client=object()
    )
    vt = InstanceType(name="vt1", provider_type="vt1.3xlarge", vcpus=1, ram=1)
    c = InstanceType(name="c", provider_type="c5.large", vcpus=1, ram=1)
    assert (iset.quota_group(vt), iset.quota_group(c)) == ("g", "standard")


@pytest.mark.parametrize(
    ("provider_type", "preemptible", "code"),
    [
        # AWS has no P5 quota: P5 counts under "Running On-Demand P instances" like P4.
        ("p5.48xlarge", False, "L-417A185B"),
        ("p5en.48xlarge", True, "L-7212CCBC"),
        ("p4d.24xlarge", False, "L-417A185B"),
        ("g6.xlarge", False, "L-DB2E81BA"),
        ("vt1.3xlarge", True, "L-3819A6DF"),
        ("m7i.large", False, "L-1216C47A"),
        ("hpc7a.96xlarge", False, "L-F7808C92"),  # not the "h" of the standard group
        ("dl1.24xlarge", False, "L-6E869C2A"),
        ("dl1.24xlarge", True, "L-85EED4F7"),
        ("u-6tb1.metal", False, "L-43DA4232"),  # High Memory
        ("u7i-12tb.224xlarge", False, "L-43DA4232"),
        ("trn1.32xlarge", True, "L-6B0D517C"),
        ("inf2.xlarge", False, "L-1945791B"),
        ("x2idn.16xlarge", False, "L-7295265B"),
        ("f1.2xlarge", True, "L-88CF9481"),
    ],
)
def test_default_quota_tables_give_each_type_the_quota_aws_counts_it_in(
    provider_type: str, preemptible: bool, code: str
) -> None:
    """The default groups and codes together: each type to the Service Quotas code AWS lists
    for its family (Amazon EC2 User Guide, "On-Demand Instance quotas" and "Spot Instance
    quotas")."""
    group = quota_group(provider_type, preemptible, DEFAULT_QUOTA_GROUPS)
    assert DEFAULT_QUOTA_CODES.get(group) == code, group


# --------------------------------------------------------------------------- config check


def test_example_config_passes_and_a_broken_copy_names_each_bad_key(tmp_path: Path) -> None:
    import yaml

    from herder.config import check_config
    from herder.plugins import Plugins

    example = Path(__file__).resolve().parents[3] / "examples" / "aws.yaml"
    plugins = Plugins.load()
    assert [str(p) for p in check_config(example, plugins)] == []
    data = yaml.safe_load(example.read_text())
    params = data["cloud"]["driver_parameters"]
    params["subnet"] = "subnet-1"
    params["ebs_price"] = "cheap"
    del params["region"]
    broken = tmp_path / "aws.yaml"
    broken.write_text(yaml.safe_dump(data))
    problems = " ".join(str(p) for p in check_config(broken, plugins))
    for key in ("subnet", "ebs_price", "region"):
        assert f"driver_parameters.{key}" in problems


# --------------------------------------------------------------------------- idempotent creates


def test_the_create_key_is_the_client_token_per_subnet_and_a_repeat_starts_there(
    ec2: Any, client_tokens: dict[str, Any]
) -> None:
    a, b, c = subnets(ec2, 3)
    calls: list[dict[str, Any]] = []
    client = Recorder(
        make_set(ec2).client, calls, {a: ("InsufficientFreeAddressesInSubnet", "no addresses")}
    )
    iset = make_set(ec2, client=client, subnet_ids=[a, b, c])
    keyed = {**OWNER, "HerderInstanceSecret": "k" * 40}
    first = iset.create(SMALL, IMAGE, keyed, "", None)
    tokens = [call["ClientToken"] for call in calls]
    assert tried(calls) == [a, b]
    assert len(set(tokens)) == 2 and all(len(t) <= 64 and t.isascii() for t in tokens)
    assert "k" * 40 not in tokens  # the instance secret itself never leaves as a token
    # Another create moves the set's next subnet on; the repeat still goes where the key went.
    client.failures = {b: ("InsufficientFreeAddressesInSubnet", "no addresses")}
    other = iset.create(SMALL, IMAGE, {**OWNER, "HerderInstanceSecret": "o" * 40}, "", None)
    assert describe(ec2, other.id)["SubnetId"] == c
    calls.clear()
    client.failures = {}
    repeated = iset.create(SMALL, IMAGE, keyed, "", None)
    assert tried(calls) == [b] and calls[0]["ClientToken"] == tokens[1]
    assert repeated.id == first.id
    assert len(iset.instances(OWNER)) == 2


def test_a_create_without_a_key_sends_no_client_token(ec2: Any) -> None:
    calls: list[dict[str, Any]] = []
    iset = make_set(ec2, client=Recorder(make_set(ec2).client, calls))
    iset.create(SMALL, IMAGE, OWNER, "", None)
    assert "ClientToken" not in calls[0]
