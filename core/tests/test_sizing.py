"""Instance type selection and resource arithmetic (SPEC §8.2, §8.4, §8.5)."""

from __future__ import annotations

import pytest

from herder.config import Config
from herder.engine.sizing import (
    ConfigSizer,
    ConstraintsNotSatisfiable,
    choose_instance_types,
    resources_needed,
)
from herder.model import (
    Container,
    ContainerSpec,
    ContainerState,
    GPURequest,
    GPUSpec,
    InstanceResources,
    InstanceType,
    RuntimeConstraints,
    SchedulingParameters,
)

GiB = 1 << 30


def ctr(
    vcpus: int = 1,
    ram: int = GiB,
    scratch: int = 0,
    *,
    preemptible: bool = False,
    gpu: GPURequest | None = None,
) -> Container:
    spec = ContainerSpec(
        command=("true",),
        runtime_constraints=RuntimeConstraints(
            vcpus=vcpus, ram=ram, scratch=scratch, gpu=gpu or GPURequest()
        ),
        scheduling_parameters=SchedulingParameters(preemptible=preemptible),
    )
    return Container("zzzzz-dz642-000000000000001", ContainerState.QUEUED, 1, spec, 0.0)


def it(
    name: str,
    vcpus: int = 4,
    ram: int = 16 * GiB,
    price: float = 1.0,
    scratch: int = 0,
    **kw: object,
) -> InstanceType:
    return InstanceType(name, name, vcpus, ram, included_scratch=scratch, price=price, **kw)  # type: ignore[arg-type]


def names(types: list[InstanceType]) -> list[str]:
    return [t.name for t in types]


def table(*types: InstanceType) -> dict[str, InstanceType]:
    return {t.name: t for t in types}


# --------------------------------------------------------------------------- §8.2 needs


def test_ram_need_includes_reserve_and_five_percent():
    c = ctr(vcpus=3, ram=1000, scratch=77, gpu=GPURequest("cuda", 2, "12", ("8.0",), 5))
    need = resources_needed(c, reserve_extra_ram=900)
    assert need.ram == (1000 + 900) * 100 // 95 == 2000
    assert (need.vcpus, need.scratch, need.gpus, need.gpu_vram) == (3, 77, 2, 5)


def test_ram_need_uses_integer_division():
    assert (
        resources_needed(ctr(ram=GiB)).ram == 1130254551
    )  # (GiB × 100) // 95, not GiB // 95 × 100


def test_config_sizer_applies_configured_reserve():
    sizer = ConfigSizer(table(it("a", ram=2 * GiB)), reserve_extra_ram=GiB)
    assert sizer.resources_needed(ctr(ram=GiB)).ram == 2 * GiB * 100 // 95
    with pytest.raises(ConstraintsNotSatisfiable):
        sizer.choose_instance_types(ctr(ram=GiB))  # 2 GiB * 100/95 > 2 GiB


# --------------------------------------------------------------------------- §8.4 choice


def test_no_instance_types_configured():
    with pytest.raises(
        ConstraintsNotSatisfiable, match="site configuration does not list any instance types"
    ):
        choose_instance_types(ctr(), {})


def test_nothing_fits_lists_all_types_by_price():
    types = table(it("b", vcpus=1, price=2.0), it("a", vcpus=1, price=1.0))
    with pytest.raises(ConstraintsNotSatisfiable) as exc:
        choose_instance_types(ctr(vcpus=2), types)
    assert str(exc.value) == (
        "constraints not satisfiable by any configured instance type: needs 2 VCPUs; the most "
        "any type has is 1 (b)"
    )
    assert names(exc.value.available) == ["a", "b"]


@pytest.mark.parametrize(
    ("needs", "says"),
    [
        (
            {"ram": 64 * GiB},
            "of RAM (with the runtime's overhead); the most any type has is 16GiB (b)",
        ),
        ({"scratch": 2 * GiB}, "needs 2GiB of scratch; the most any type has is 1GiB (a)"),
        ({"preemptible": True}, "asks for a preemptible instance; no preemptible type"),
        (
            {"gpu": GPURequest(stack="cuda", device_count=1, hardware_target=("7.5",))},
            "needs 1 cuda GPUs; no cuda instance type is configured",
        ),
        ({"vcpus": 4, "ram": 10 * GiB}, "no single type meets them all"),
    ],
)
def test_nothing_fits_says_which_need_and_what_the_best_offers(needs, says):
    types = table(
        it("a", vcpus=4, ram=8 * GiB, scratch=GiB, price=1.0),
        it("b", vcpus=1, ram=16 * GiB, price=2.0),
    )
    with pytest.raises(ConstraintsNotSatisfiable) as exc:
        choose_instance_types(ctr(**needs), types)
    assert says in str(exc.value)


@pytest.mark.parametrize("field,value", [("vcpus", 2), ("ram", 17 * GiB), ("scratch", 1)])
def test_each_resource_must_fit(field, value):
    kwargs = {"vcpus": 1, "ram": GiB, "scratch": 0, field: value}
    types = table(
        it("small", vcpus=1, ram=16 * GiB), it("big", vcpus=2, ram=32 * GiB, scratch=GiB, price=1.2)
    )
    assert names(choose_instance_types(ctr(**kwargs), types)) == ["big"]


def test_cheapest_first_then_others_within_price_factor():
    types = table(
        it("p1", price=1.0), it("p14", price=1.4), it("p15", price=1.5), it("p16", price=1.6)
    )
    assert names(choose_instance_types(ctr(), types)) == ["p1", "p14", "p15"]
    assert names(choose_instance_types(ctr(), types, maximum_price_factor=2)) == [
        "p1",
        "p14",
        "p15",
        "p16",
    ]


def test_price_factor_below_one_means_one():
    types = table(it("a", price=1.0), it("b", price=1.0, ram=8 * GiB), it("c", price=1.01))
    assert names(choose_instance_types(ctr(), types, maximum_price_factor=0.5)) == ["a", "b"]


def test_price_factor_float_example():
    # 3 × 0.123 ≤ 2 × 0.123 × 1.5 in binary floating point: the 0.369 type is included.
    types = table(
        it("two", vcpus=2, price=2 * 0.123),
        it("three", vcpus=2, price=3 * 0.123),
        it("four", vcpus=2, price=4 * 0.123),
        it("tiny", vcpus=1, price=0.123),
    )
    assert names(choose_instance_types(ctr(vcpus=2), types)) == ["two", "three"]


def test_ties_sorted_by_ram_vcpus_scratch_then_name():
    types = table(
        it("e", vcpus=4, ram=16 * GiB),
        it("d", vcpus=4, ram=16 * GiB),
        it("c", vcpus=4, ram=16 * GiB, scratch=GiB),
        it("b", vcpus=8, ram=16 * GiB),
        it("a", vcpus=4, ram=32 * GiB),
    )
    assert names(choose_instance_types(ctr(), types)) == ["a", "b", "c", "d", "e"]


def test_cheapest_adequate_type_always_kept():
    # Its own price times a factor < 1 would exclude it; index 0 is kept regardless.
    assert names(
        choose_instance_types(ctr(), table(it("a", price=3.0)), maximum_price_factor=0)
    ) == ["a"]


def test_preemptible_containers_only_on_preemptible_types_and_vice_versa():
    types = table(it("ondemand", price=1.0), it("spot", price=0.3, preemptible=True))
    assert names(choose_instance_types(ctr(preemptible=True), types)) == ["spot"]
    assert names(choose_instance_types(ctr(), types)) == ["ondemand"]


def test_preemptible_variants_from_price_factor():
    cfg = Config.model_validate(
        {
            "containers": {"preemptible_price_factor": 0.5},
            "instance_types": {"a": {"vcpus": 1, "ram": "4GiB", "price": 2.0}},
        }
    )
    types = cfg.build_instance_types()
    assert types["a.preemptible"].preemptible
    assert types["a.preemptible"].price == 1.0
    assert types["a.preemptible"].provider_type == "a"
    assert names(choose_instance_types(ctr(preemptible=True), types)) == ["a.preemptible"]


# ---- GPUs


def gpu_type(
    name: str,
    *,
    stack: str = "cuda",
    driver: str = "12.0",
    target: str = "8.6",
    count: int = 1,
    vram: int = 16 * GiB,
    price: float = 1.0,
) -> InstanceType:
    return it(name, price=price, gpu=GPUSpec(stack, driver, target, count, vram))


def cuda(
    count: int = 1, driver: str = "11.0", targets: tuple[str, ...] = ("8.0",), vram: int = 8 * GiB
) -> GPURequest:
    return GPURequest("cuda", count, driver, targets, vram)


def test_gpu_types_never_serve_plain_containers_and_vice_versa():
    types = table(gpu_type("gpu", price=0.5), it("cpu", price=1.0))
    assert names(choose_instance_types(ctr(), types)) == ["cpu"]
    assert names(choose_instance_types(ctr(gpu=cuda()), types)) == ["gpu"]


@pytest.mark.parametrize(
    "type_kw,ok",
    [
        ({}, True),
        ({"driver": "10.0"}, False),  # driver older than requested
        ({"driver": "bogus"}, False),  # unparseable driver
        ({"target": "7.5"}, False),  # compute capability below requested
        ({"target": "9.0"}, True),  # one requested target: numeric at-least
        ({"count": 0}, False),
        ({"vram": 4 * GiB}, False),
        ({"stack": "rocm"}, False),
    ],
)
def test_cuda_rules(type_kw, ok):
    types = table(gpu_type("g", **type_kw))
    if ok:
        assert names(choose_instance_types(ctr(gpu=cuda()), types)) == ["g"]
    else:
        with pytest.raises(ConstraintsNotSatisfiable):
            choose_instance_types(ctr(gpu=cuda()), types)


def test_cuda_several_targets_need_an_exact_match():
    req = cuda(targets=("8.0", "8.6"))
    assert names(choose_instance_types(ctr(gpu=req), table(gpu_type("g", target="8.6")))) == ["g"]
    with pytest.raises(ConstraintsNotSatisfiable):
        choose_instance_types(ctr(gpu=req), table(gpu_type("g", target="8.9")))


def test_cuda_without_targets_is_unsatisfiable():
    with pytest.raises(ConstraintsNotSatisfiable):
        choose_instance_types(ctr(gpu=cuda(targets=())), table(gpu_type("g")))


def test_rocm_target_must_be_listed():
    req = GPURequest("rocm", 1, "6.0", ("gfx1100", "gfx90a"), 0)
    good = gpu_type("good", stack="rocm", driver="6.1", target="gfx90a")
    bad = gpu_type("bad", stack="rocm", driver="6.1", target="gfx942")
    assert names(choose_instance_types(ctr(gpu=req), table(good, bad))) == ["good"]


def test_invalid_gpu_stack():
    with pytest.raises(ConstraintsNotSatisfiable) as exc:
        choose_instance_types(ctr(gpu=GPURequest("opencl", 1)), table(gpu_type("g")))
    assert str(exc.value) == (
        "Invalid GPU stack \"opencl\", expected to be blank or one of 'cuda' or 'rocm'"
    )
    assert exc.value.available == []


# --------------------------------------------------------------------------- §8.5 arithmetic


def r(vcpus: int, shared: bool = False) -> InstanceResources:
    return InstanceResources(vcpus=vcpus, shared_vcpu_used=shared)


def test_sub_marks_shared_vcpu_for_zero_vcpu_containers():
    assert r(2).sub(r(0)).shared_vcpu_used
    assert not r(2).sub(r(1)).shared_vcpu_used
    assert r(2).sub(r(0)).sub(r(1)).shared_vcpu_used


def test_sub_subtracts_every_field():
    a = InstanceResources(4, 100, 50, 2, 30)
    assert a.sub(InstanceResources(1, 10, 5, 1, 3)) == InstanceResources(3, 90, 45, 1, 27)


@pytest.mark.parametrize(
    "have,need,fits",
    [
        (r(2), r(2), True),
        (r(2, True), r(2), False),
        (r(2, True), r(1), True),
        (r(2, True), r(0), True),
        (r(1, True), r(1), False),
        (r(1, True), r(0), True),
        (r(0, True), r(0), False),
        (r(0), r(0), False),
    ],
)
def test_accommodates_table(have, need, fits):
    assert have.accommodates(need) is fits


@pytest.mark.parametrize("field", ["ram", "scratch", "gpus", "gpu_vram"])
def test_accommodates_every_field(field):
    have = InstanceResources(4, 10, 10, 10, 10)
    need = InstanceResources(1, 1, 1, 1, 1)
    assert have.accommodates(need)
    setattr(need, field, 11)
    assert not have.accommodates(need)


def test_config_sizer_remembers_answers_per_ask():
    from herder.engine.sizing import ConfigSizer
    from herder.model import Container, ContainerSpec, ContainerState, RuntimeConstraints
    from herder.queue.base import ConstraintsNotSatisfiable

    small = InstanceType("small", "s", vcpus=2, ram=4 * 1024**3, price=0.1)
    sizer = ConfigSizer({"small": small})

    def ctr(vcpus: int) -> Container:
        spec = ContainerSpec(command=("true",), runtime_constraints=RuntimeConstraints(vcpus=vcpus))
        return Container("zzzzz-dz642-000000000000001", ContainerState.QUEUED, 1, spec, 0.0)

    first = sizer.choose_instance_types(ctr(1))
    assert first == [small]
    first.clear()  # callers may change the list they get without changing the next answer
    assert sizer.choose_instance_types(ctr(1)) == [small]
    for _ in range(2):  # a cached refusal is raised again, every time
        with pytest.raises(ConstraintsNotSatisfiable, match="not satisfiable"):
            sizer.choose_instance_types(ctr(64))


def test_gpus_shorthand_finds_the_configured_gpu_types():
    """`--gpus 1` with CUDA types configured: the lowest configured capability is asked for, so
    every CUDA type with enough devices serves it (it used to match none)."""
    from herder.engine.sizing import gpu_request_for

    t4 = InstanceType(
        "t4",
        "g4dn.xlarge",
        4,
        16 * GiB,
        price=0.5,
        gpu=GPUSpec(stack="cuda", device_count=1, hardware_target="7.5", driver_version="535.0"),
    )
    a10 = InstanceType(
        "a10",
        "g5.xlarge",
        4,
        16 * GiB,
        price=1.0,
        gpu=GPUSpec(stack="cuda", device_count=1, hardware_target="8.6", driver_version="535.0"),
    )
    plain = InstanceType("plain", "m5.xlarge", 4, 16 * GiB, price=0.2)
    types = {t.name: t for t in (t4, a10, plain)}
    request = gpu_request_for(1, types)
    assert request.stack == "cuda" and request.hardware_target == ("7.5",)
    wanted = ctr(vcpus=1, ram=GiB, gpu=request)
    assert names(choose_instance_types(wanted, types, maximum_price_factor=3)) == ["t4", "a10"]
    assert gpu_request_for(2, types).device_count == 2
    with pytest.raises(ConstraintsNotSatisfiable):
        choose_instance_types(ctr(vcpus=1, ram=GiB, gpu=gpu_request_for(2, types)), types)
