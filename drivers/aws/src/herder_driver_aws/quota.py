"""Quota groups of EC2 instance types (SPEC §16.2).

AWS limits vCPUs per instance *family* (standard A/C/D/H/I/M/R/T/Z, G and VT, P, ...), on
demand and spot separately.  When one family is full, herder stops creating types of that
family only, so every type must map to the group AWS counts it in.
"""

from __future__ import annotations

from collections.abc import Mapping

#: AWS's own grouping of "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances" and
#: of "G and VT"; every other family is a group of its own, named by its letters (``p`` for all
#: P types, P5 included: AWS has no separate P5 quota, see :data:`DEFAULT_QUOTA_CODES`).
DEFAULT_QUOTA_GROUPS: dict[str, str] = {
    **dict.fromkeys("acdhimrtz", "standard"),
    "vt": "g",
}


def quota_group(provider_type: str, preemptible: bool, groups: Mapping[str, str]) -> str:
    """The quota group of ``provider_type``, with ``-spot`` for spot instances.

    The base group is the leading run of letters (``trn1.2xlarge`` → ``trn``).  A configured
    prefix at least as long as that run overrides it, the longest one winning, so ``p5`` could
    be made a group of its own while ``p4`` stays in ``p``; shorter prefixes are never
    consulted, so the ``t`` of the standard group does not capture ``trn``.
    """
    name = provider_type.lower()
    base = ""
    for ch in name:
        if not ("a" <= ch <= "z"):
            break
        base += ch
    if base == name:  # all letters, or empty: not an EC2 type name
        base = ""
    group = base
    if base:
        for length in range(len(base), len(name)):
            override = groups.get(name[:length])
            if override is not None:
                group = override
    if preemptible:
        group += "-spot"
    return group


#: Service Quotas codes (service ``ec2``) of the vCPU quotas, by the quota group of the types
#: they limit: on-demand "Running On-Demand ... instances" and "All ... Spot Instance
#: Requests".  ``quota_codes`` in the parameters replaces this table.
#:
#: The quotas are the ones the Amazon EC2 User Guide lists under "On-Demand Instance quotas"
#: (DL, F, G and VT, HPC, High Memory, Inf, P, Standard, Trn, X) and "Spot Instance quotas"
#: (DL, F, G and VT, Inf, P, Standard, Trn, X: HPC and High Memory types are not sold as spot),
#: with the codes Service Quotas gives them.  There is no P5 quota: P5 types count under
#: "Running On-Demand P instances" (L-417A185B) and "All P Spot Instance Requests"
#: (L-7212CCBC) like every P type.  High Memory types (``u-6tb1.metal``, ``u7i-12tb.224xlarge``)
#: have the group ``u``.
DEFAULT_QUOTA_CODES: dict[str, str] = {
    "standard": "L-1216C47A",
    "standard-spot": "L-34B43A08",
    "g": "L-DB2E81BA",
    "g-spot": "L-3819A6DF",
    "p": "L-417A185B",
    "p-spot": "L-7212CCBC",
    "f": "L-74FC7D96",
    "f-spot": "L-88CF9481",
    "x": "L-7295265B",
    "x-spot": "L-E3A00192",
    "inf": "L-1945791B",
    "inf-spot": "L-B5D1601B",
    "trn": "L-2C3B7624",
    "trn-spot": "L-6B0D517C",
    "dl": "L-6E869C2A",
    "dl-spot": "L-85EED4F7",
    "hpc": "L-F7808C92",
    "u": "L-43DA4232",
}
