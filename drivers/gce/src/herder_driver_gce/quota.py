"""Quota groups of GCE machine types and GPUs, named after the quotas GCE counts them in.

GCE limits vCPUs per region and per machine *family*: E2 and N1 (and the old F1/G1) count in
the regional ``CPUS`` quota, most newer families in their own (``N2_CPUS``, ``C3_CPUS``...).
GPUs count per kind (``NVIDIA_T4_GPUS``), and spot VMs in ``PREEMPTIBLE_*`` quotas where the
project has them.  A ``QUOTA_EXCEEDED`` for ``N2_CPUS`` then blocks exactly the types whose
group is ``n2_cpus``, and a GPU type's binding limit is its GPUs, so that is its group.
"""

from __future__ import annotations

from collections.abc import Mapping

from herder.model import InstanceType

#: Families counted in the regional ``CPUS`` quota rather than one of their own.
SHARED_CPU_FAMILIES = frozenset({"e2", "n1", "f1", "g1"})

#: Machine types with GPUs built in: type-name prefix → the accelerator they carry.
BUILT_IN_GPUS: dict[str, str] = {
    "a2-highgpu": "nvidia-tesla-a100",
    "a2-megagpu": "nvidia-tesla-a100",
    "a2-ultragpu": "nvidia-a100-80gb",
    "a3-": "nvidia-h100-80gb",
    "g2-": "nvidia-l4",
}

#: Attachable GPUs by CUDA compute capability (``gpu.hardware_target``), for N1 machines.
GPU_BY_COMPUTE_CAPABILITY: dict[str, str] = {
    "6.0": "nvidia-tesla-p100",
    "6.1": "nvidia-tesla-p4",
    "7.0": "nvidia-tesla-v100",
    "7.5": "nvidia-tesla-t4",
}


def built_in_accelerator(provider_type: str) -> str:
    """The GPU a machine type carries by itself (``g2-standard-4`` → ``nvidia-l4``), or ""."""
    for prefix, accelerator in BUILT_IN_GPUS.items():
        if provider_type.startswith(prefix):
            return accelerator
    return ""


def accelerator_for(instance_type: InstanceType, configured: Mapping[str, str]) -> str:
    """The accelerator type to *attach* to ``instance_type``, or "" for none.

    A type without GPUs, or a machine type with GPUs built in, attaches none.  Otherwise the
    operator's ``accelerator_types`` entry for the type's name wins, then the CUDA compute
    capability; with neither, :class:`ValueError` says which key to set.
    """
    if instance_type.gpu.device_count <= 0 or built_in_accelerator(instance_type.provider_type):
        return ""
    if instance_type.name in configured:
        return configured[instance_type.name]
    by_capability = GPU_BY_COMPUTE_CAPABILITY.get(instance_type.gpu.hardware_target)
    if by_capability:
        return by_capability
    raise ValueError(
        f"instance type {instance_type.name!r} has GPUs but no accelerator type: set "
        f"cloud.driver_parameters.accelerator_types.{instance_type.name} (e.g. nvidia-tesla-t4)"
    )


def gpu_quota_name(accelerator: str) -> str:
    """GCE's quota name for an accelerator: ``nvidia-tesla-t4`` → ``NVIDIA_T4_GPUS``."""
    name = accelerator.replace("nvidia-tesla-", "nvidia-").replace("-80gb", "_80gb")
    if name == "nvidia-h100_80gb":
        name = "nvidia-h100"
    return name.upper().replace("-", "_") + "_GPUS"


def quota_group(
    instance_type: InstanceType,
    accelerators: Mapping[str, str],
    overrides: Mapping[str, str],
) -> str:
    """The quota group of ``instance_type``: a GCE quota name, lowercased.

    An operator's ``instance_type_quota_groups`` prefix (longest wins) overrides the built-in
    rule; GPU types are grouped by GPU kind, others by machine family.  Spot types get
    ``preemptible_`` before the name, as GCE's spot quotas do.
    """
    provider = instance_type.provider_type.lower()
    group = ""
    for prefix in sorted(overrides, key=len):
        if provider.startswith(prefix):
            group = overrides[prefix]
    if not group:
        accelerator = built_in_accelerator(provider)
        if not accelerator and instance_type.gpu.device_count > 0:
            try:
                accelerator = accelerator_for(instance_type, accelerators)
            except ValueError:
                accelerator = ""
        if accelerator:
            group = gpu_quota_name(accelerator).lower()
        else:
            family = provider.split("-", 1)[0]
            group = "cpus" if family in SHARED_CPU_FAMILIES or not family else f"{family}_cpus"
    return f"preemptible_{group}" if instance_type.preemptible else group
