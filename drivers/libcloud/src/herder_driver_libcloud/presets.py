"""What the bridge knows about each provider it claims: a preset per provider.

libcloud gives every provider the same node/size/image calls, but not the same semantics: where
tags live, whether node ids are unique, which error messages mean quota or capacity, and
whether one driver object may be shared.  A preset says so for one provider, and is tested
against a fake of that provider's API.  A provider without a preset still works, with the
generic behaviour and a warning naming what is untested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from herder.cloud import Capability
from herder_driver_libcloud.errors import EC2_ERRORS, NO_ERRORS, OPENSTACK_ERRORS, ErrorTable


class TagStrategy(StrEnum):
    """Where a provider keeps an instance's tags, so that another process sees them."""

    #: EC2-style tags: given at create (``ex_metadata``), replaced with CreateTags/DeleteTags,
    #: read from ``node.extra["tags"]``.
    EC2_TAGS = "ec2_tags"
    #: server metadata (OpenStack style): given at create (``ex_metadata``), replaced with
    #: ``ex_set_metadata``, read from ``node.extra["metadata"]``.
    METADATA = "metadata"
    #: kept on the node object of an in-process fake cloud (libcloud's dummy driver), which
    #: every instance set of the process shares: only for tests.
    FAKE_NODE = "fake_node"


@dataclass(frozen=True)
class Preset:
    """How the bridge drives one libcloud provider."""

    provider: str
    tags: TagStrategy
    errors: ErrorTable = NO_ERRORS
    capabilities: frozenset[Capability] = frozenset()
    #: constructor keyword arguments the provider needs unless the operator says otherwise
    default_options: dict[str, Any] = field(default_factory=dict)
    #: keyword of create_node that carries the init command (None: the provider has none)
    user_data_keyword: str | None = "ex_userdata"
    #: the provider's driver object *is* the cloud (a fake): one per process, behind a lock
    process_wide: bool = False
    #: node ids are unique for the account's life (else the bridge gives each node its own)
    unique_ids: bool = True
    #: what the conformance suite checked for this preset (empty: nothing, so a warning)
    tested: str = ""
    #: each node is backed by an SSH server on this host running commands as herder's user
    #: (libcloud's dummy boots nothing; this lets ``herder serve`` run containers on it)
    local_ssh: bool = False
    #: keyword of create_node that asks for a spot (preemptible) node, and the one carrying the
    #: maximum price; None when the provider has no spot market (the preset then does not
    #: declare ``spot``, and ``herder config check`` refuses preemptible types)
    spot_keyword: str | None = None
    spot_price_keyword: str | None = None
    #: the provider accepts a create and places the node later, reporting a failure to place
    #: it (no capacity) only as the node's ERROR state: create waits for the placement
    awaits_placement: bool = False
    #: keyword of create_node that carries an idempotency token (EC2's ``ClientToken``): with
    #: it, a repeated create key is the provider's to recognise, and the preset declares
    #: ``idempotent_create``
    client_token_keyword: str | None = None


PRESETS: dict[str, Preset] = {
    "dummy": Preset(
        provider="dummy",
        tags=TagStrategy.FAKE_NODE,
        capabilities=frozenset({Capability.IDEMPOTENT_CREATE, Capability.HOST_KEY_VERIFICATION}),
        user_data_keyword=None,
        process_wide=True,
        local_ssh=True,
        unique_ids=False,  # the dummy numbers nodes len(list) + 1: ids come back after a destroy
        tested="the conformance suite against libcloud's dummy driver",
    ),
    "ec2": Preset(
        provider="ec2",
        tags=TagStrategy.EC2_TAGS,
        errors=EC2_ERRORS,
        capabilities=frozenset(
            {
                Capability.QUOTA_ERRORS,
                Capability.CAPACITY_ERRORS,
                Capability.RATE_LIMIT_ERRORS,
                Capability.SPOT,
                # EC2's GPU types are sizes like any other (no accelerator to attach)
                Capability.GPU,
                Capability.IDEMPOTENT_CREATE,
            }
        ),
        client_token_keyword="ex_clienttoken",  # noqa: S106 (a keyword name)
        spot_keyword="ex_spot",
        spot_price_keyword="ex_spot_max_price",
        # libcloud's default signature for EC2 is SigV2, which current endpoints (and moto)
        # route elsewhere, so that every listing is quietly empty.
        default_options={"signature_version": "4"},
        tested="the conformance suite against an in-process EC2 emulator (moto)",
    ),
    "openstack": Preset(
        provider="openstack",
        tags=TagStrategy.METADATA,
        errors=OPENSTACK_ERRORS,
        capabilities=frozenset(
            {Capability.QUOTA_ERRORS, Capability.CAPACITY_ERRORS, Capability.RATE_LIMIT_ERRORS}
        ),
        # Nova answers 202 and schedules afterwards: "No valid host was found" arrives as the
        # server's fault when it turns ERROR.
        awaits_placement=True,
        tested="the conformance suite against a fake of the Compute (Nova) API",
    ),
}


def preset_for(provider: str) -> Preset:
    """The preset of ``provider``, or a generic one (metadata tags, no error table)."""
    known = PRESETS.get(provider)
    if known is not None:
        return known
    return Preset(provider=provider, tags=TagStrategy.METADATA)
