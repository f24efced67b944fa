"""What a container needs, and which configured instance types fit it (SPEC §8).

herder has no Keep cache, arv-mount or docker-image manifests, so the RAM need is the
container's RAM plus ``containers.reserve_extra_ram``, inflated by 5% (the share of an
instance's advertised RAM the kernel keeps); scratch is what the container asks for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from herder import defaults
from herder.model import Container, GPURequest, InstanceResources, InstanceType
from herder.queue.base import ConstraintsNotSatisfiable, Sizer


def _version_at_least(have: str, want: str) -> bool:
    """Numeric comparison of versions written as floats ("12.0" ≥ "11.8"); bad input fails."""
    try:
        return float(have) >= float(want)
    except ValueError:
        return False


def resources_needed(container: Container, reserve_extra_ram: int = 0) -> InstanceResources:
    rc = container.runtime_constraints
    ram = (rc.ram + reserve_extra_ram) * 100 // 95
    return InstanceResources(
        vcpus=rc.vcpus,
        ram=ram,
        scratch=rc.scratch,
        gpus=rc.gpu.device_count,
        gpu_vram=rc.gpu.vram,
    )


def gpu_request_for(count: int, instance_types: Mapping[str, InstanceType]) -> GPURequest:
    """What ``--gpus N`` (``gpus: N`` in the API) asks for: N GPUs of the configured GPU types.

    The stack is the configured GPU types' one stack (else CUDA).  A CUDA request must name a
    minimum compute capability (SPEC §8.4), and a ROCm one the targets it accepts; the short
    form asks for the lowest capability, or every target, that the configured types of that
    stack have, so that any of them with enough devices will do.  A request that names its own
    capability or driver goes through the full form instead.
    """
    gpu_types = [it for it in instance_types.values() if it.gpu.device_count]
    stacks = {it.gpu.stack for it in gpu_types}
    stack = stacks.pop() if len(stacks) == 1 else "cuda"
    targets = sorted(
        {
            it.gpu.hardware_target
            for it in gpu_types
            if it.gpu.stack == stack and it.gpu.hardware_target
        }
    )
    if stack == "cuda" and targets:
        lowest = min(targets, key=lambda t: tuple(int(p) for p in t.split(".") if p.isdigit()))
        return GPURequest(stack=stack, device_count=count, hardware_target=(lowest,))
    return GPURequest(stack=stack, device_count=count, hardware_target=tuple(targets))


def _gpu_capability_ok(it: InstanceType, container: Container) -> bool:
    req = container.runtime_constraints.gpu
    if req.stack == "cuda":
        targets = req.hardware_target
        if len(targets) > 1:
            return it.gpu.hardware_target in targets
        if len(targets) == 1:
            return _version_at_least(it.gpu.hardware_target, targets[0])
        return False
    if req.stack == "rocm":
        return it.gpu.hardware_target in req.hardware_target
    return True


def _why_nothing_fits(
    need: InstanceResources, container: Container, types: list[InstanceType]
) -> str:
    """The first need no configured type meets, with the most any type offers; or, when each
    need alone is met by some type, that none meets them all."""
    from herder.units import format_size

    preemptible = container.scheduling_parameters.preemptible
    stack = container.runtime_constraints.gpu.stack

    def best(values: list[tuple[int, str]]) -> tuple[int, str]:
        return max(values) if values else (0, "none")

    checks: list[tuple[bool, str]] = []
    most, name = best([(t.vcpus, t.name) for t in types])
    checks.append(
        (most >= need.vcpus, f"needs {need.vcpus} VCPUs; the most any type has is {most} ({name})")
    )
    most, name = best([(t.ram, t.name) for t in types])
    checks.append(
        (
            most >= need.ram,
            f"needs {format_size(need.ram)} of RAM (with the "
            f"runtime's overhead); the most any type has is "
            f"{format_size(most)} ({name})",
        )
    )
    most, name = best([(t.scratch, t.name) for t in types])
    checks.append(
        (
            most >= need.scratch,
            f"needs {format_size(need.scratch)} of scratch; the "
            f"most any type has is {format_size(most)} ({name})",
        )
    )
    if preemptible:
        checks.append(
            (
                any(t.preemptible for t in types),
                "asks for a preemptible instance; no preemptible type is configured",
            )
        )
    if need.gpus:
        same_stack = [t for t in types if t.gpu.stack == stack and t.gpu.device_count]
        most, name = best([(t.gpu.device_count, t.name) for t in same_stack])
        offer = (
            f"the most any type has is {most} ({name})"
            if same_stack
            else f"no {stack or 'GPU'} instance type is configured"
        )
        checks.append((most >= need.gpus, f"needs {need.gpus} {stack} GPUs; {offer}"))
    for ok, text in checks:
        if not ok:
            return text
    return (
        "each need is met by some type, but no single type meets them all (or its GPU "
        "capability, driver or VRAM is too low)"
    )


def _sort_key(it: InstanceType) -> tuple[float, int, int, int, str]:
    return (it.price, -it.ram, -it.vcpus, -it.scratch, it.name)


def choose_instance_types(
    container: Container,
    instance_types: Mapping[str, InstanceType],
    *,
    reserve_extra_ram: int = 0,
    maximum_price_factor: float = defaults.MAXIMUM_PRICE_FACTOR,
) -> list[InstanceType]:
    """Eligible types: the cheapest adequate one first, then others within its price × factor."""
    if not instance_types:
        raise ConstraintsNotSatisfiable("site configuration does not list any instance types")
    req = container.runtime_constraints.gpu
    if req.stack not in ("", "cuda", "rocm"):
        raise ConstraintsNotSatisfiable(
            # Double-quoted like Arvados' message (Go's %q), which people may match on.
            f"Invalid GPU stack {json.dumps(req.stack)}, "
            "expected to be blank or one of 'cuda' or 'rocm'"
        )
    need = resources_needed(container, reserve_extra_ram)
    factor = max(maximum_price_factor, 1.0)
    preemptible = container.scheduling_parameters.preemptible
    max_price = 0.0
    accepted: list[InstanceType] = []
    for it in instance_types.values():
        capability_ok = _gpu_capability_ok(it, container)
        driver_ok = _version_at_least(it.gpu.driver_version, req.driver_version or "0")
        if (
            (max_price > 0 and it.price > max_price)
            or it.scratch < need.scratch
            or it.ram < need.ram
            or it.vcpus < need.vcpus
            or it.preemptible != preemptible
            or it.gpu.stack != req.stack
            or it.gpu.device_count < need.gpus
            or it.gpu.vram < need.gpu_vram
            or (need.gpus > 0 and not driver_ok)
            or (need.gpus > 0 and not capability_ok)
        ):
            continue
        accepted.append(it)
        limit = it.price * factor
        max_price = limit if max_price == 0 else min(max_price, limit)
    if not accepted:
        raise ConstraintsNotSatisfiable(
            # Arvados' words first, which people may match on; then which need is the problem.
            "constraints not satisfiable by any configured instance type: "
            + _why_nothing_fits(need, container, list(instance_types.values())),
            sorted(instance_types.values(), key=lambda t: t.price),
        )
    accepted.sort(key=_sort_key)
    out = [accepted[0]]
    for it in accepted[1:]:
        if it.price > max_price:
            break
        out.append(it)
    return out


class ConfigSizer(Sizer):
    """The :class:`Sizer` built from the configuration's instance types."""

    def __init__(
        self,
        instance_types: Mapping[str, InstanceType],
        *,
        reserve_extra_ram: int = 0,
        maximum_price_factor: float = defaults.MAXIMUM_PRICE_FACTOR,
    ) -> None:
        self.instance_types = dict(instance_types)
        self.reserve_extra_ram = reserve_extra_ram
        self.maximum_price_factor = maximum_price_factor
        # The choice depends only on what the container asks for, and a large queue holds a few
        # distinct asks many times: remember each answer (errors included) once.
        self._choices: dict[
            tuple[object, object], list[InstanceType] | ConstraintsNotSatisfiable
        ] = {}

    def resources_needed(self, container: Container) -> InstanceResources:
        return resources_needed(container, self.reserve_extra_ram)

    def choose_instance_types(self, container: Container) -> list[InstanceType]:
        key = (container.runtime_constraints, container.scheduling_parameters.preemptible)
        cached = self._choices.get(key)
        if cached is None:
            try:
                cached = choose_instance_types(
                    container,
                    self.instance_types,
                    reserve_extra_ram=self.reserve_extra_ram,
                    maximum_price_factor=self.maximum_price_factor,
                )
            except ConstraintsNotSatisfiable as exc:
                cached = exc
            self._choices[key] = cached
        if isinstance(cached, ConstraintsNotSatisfiable):
            raise ConstraintsNotSatisfiable(str(cached), cached.available)
        return list(cached)
