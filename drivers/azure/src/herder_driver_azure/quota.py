"""Quota groups of Azure VM sizes, as Azure counts vCPU quota.

Azure limits on-demand vCPUs per *VM family* (``standardDSv3Family`` covers Standard_D2s_v3,
Standard_D4s_v3, ...) besides the regional total, and spot vCPUs with one regional
"low-priority" quota whatever the family.  When one family is full, herder should stop
creating sizes of that family only, and when spot vCPUs run out, spot sizes only, so each
size maps to the group Azure counts it in.

The family is derived from the size's name as Azure's naming convention builds it
(``Standard_<series><vCPUs>[-<constrained>]<features>[_<accelerator>][_v<version>]``):
series, the features that make a separate family (AMD ``a``, local disk ``d``, low memory
``l``, Arm ``p``, premium storage ``s``, block storage ``b``), accelerator and version.  The
names match Azure's quota names for the common families; where they do not, sizes of one
family still map to one group.  ``quota_groups`` overrides any size, or sizes by prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: The one quota every spot VM counts against ("Total Regional Low-priority vCPUs").
SPOT_GROUP = "lowPriority"

#: Sizes are case-insensitive in Azure: series letters come before the vCPU count, feature
#: letters after it, whatever their case.
_SIZE = re.compile(
    r"(?P<tier>[a-z]+)_(?P<series>[a-z]+)(?P<cpus>\d+)(?:-\d+)?(?P<features>[a-z]*)"
    r"(?:_(?!v\d+$)(?P<accel>[a-z][a-z0-9]*))?(?:_(?P<version>v\d+))?",
    re.IGNORECASE,
)
#: Feature letters that give a size a family of its own (m, r, t, i and others do not).
_FAMILY_FEATURES = "abdlps"


def vm_family(size: str) -> str:
    """Azure's quota family of a VM size (``Standard_D4ads_v5`` → ``standardDADSv5Family``);
    the size itself, lowercased, when its name does not follow the convention."""
    match = _SIZE.fullmatch(size.strip())
    if not match:
        return size.strip().lower()
    features = "".join(ch for ch in match["features"].lower() if ch in _FAMILY_FEATURES)
    accel = (match["accel"] or "").upper()
    version = (match["version"] or "").lower()
    series = match["series"].upper()
    return f"{match['tier'].lower()}{series}{features.upper()}{accel}{version}Family"


def quota_group(size: str, preemptible: bool, overrides: Mapping[str, str]) -> str:
    """The quota group of ``size``: every spot size shares :data:`SPOT_GROUP`; an on-demand
    size is in the group ``overrides`` gives for it (exact size or longest prefix, keys
    lowercased) or else in its VM family."""
    if preemptible:
        return SPOT_GROUP
    name = size.strip().lower()
    for length in range(len(name), 0, -1):
        group = overrides.get(name[:length])
        if group is not None:
            return group
    return vm_family(size)
