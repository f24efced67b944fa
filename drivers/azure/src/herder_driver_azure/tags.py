"""herder's tags on Azure resources, given back exactly as herder set them.

Azure tag names may not contain ``<``, ``>``, ``%``, ``&``, ``\\``, ``?`` or ``/``, are at most
512 characters, and are case-insensitive (``Foo`` and ``foo`` are one tag); values are at most
256 characters.  herder's own names (``<prefix>InstanceSetID``, with any ``cloud.tag_key_prefix``)
and an operator's resource tags may break the first rule, so names are encoded: each forbidden
character, and ``~`` itself, becomes ``~`` and two uppercase hex digits (``a/b`` → ``a~2Fb``).
Names without those characters, the usual case, are stored unchanged and read as they are in
the portal.  The driver's own ``created-at`` tag is hidden from herder; a herder tag of that very
name is stored as ``created~2Dat`` so the two never mix.

What cannot be represented is refused with a clear error before anything is created: two names
that differ only in case, and names or values longer than Azure allows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from herder.cloud import CloudError

#: When the driver created a resource (RFC 3339, UTC): the clean-up's clock for NICs.
CREATED_AT = "created-at"
MAX_NAME = 512
MAX_VALUE = 256
#: Azure's limit on tags per resource (the driver adds ``created-at``).
MAX_TAGS = 49

_FORBIDDEN = set("<>%&\\?/~")
_ESCAPE = re.compile(r"~([0-9A-F]{2})")


def encode_name(name: str) -> str:
    """The Azure tag name for herder's tag name ``name``."""
    if name == CREATED_AT:
        return "created~2Dat"
    return "".join(f"~{ord(ch):02X}" if ch in _FORBIDDEN else ch for ch in name)


def decode_name(name: str) -> str:
    """herder's tag name for an Azure tag name (the inverse of :func:`encode_name`)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


def encode(tags: Mapping[str, str]) -> dict[str, str]:
    """Azure tags for herder's ``tags``; raises CloudError for what Azure cannot hold."""
    if len(tags) > MAX_TAGS:
        raise CloudError(
            f"{len(tags)} tags: Azure allows {MAX_TAGS + 1} per resource, and the "
            "driver adds created-at"
        )
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, value in tags.items():
        stored = encode_name(name)
        if not stored:
            raise CloudError("Azure tag names cannot be empty")
        if len(stored) > MAX_NAME:
            raise CloudError(
                f"tag name {name[:40]!r}... is longer than Azure's {MAX_NAME} characters"
            )
        if len(value) > MAX_VALUE:
            raise CloudError(
                f"the value of tag {name!r} is longer than Azure's {MAX_VALUE} characters"
            )
        other = seen.get(stored.lower())
        if other is not None:
            raise CloudError(
                f"tags {other!r} and {name!r} differ only in case, and Azure tag "
                "names are case-insensitive"
            )
        seen[stored.lower()] = name
        out[stored] = value
    return out


def merge(base: Mapping[str, str], tags: Mapping[str, str]) -> dict[str, str]:
    """``base`` updated with ``tags``, a name of ``tags`` replacing one of ``base`` that differs
    only in case (Azure would see the two as one tag)."""
    wanted = {name.lower() for name in tags}
    return {**{k: v for k, v in base.items() if k.lower() not in wanted}, **tags}


def decode(tags: Mapping[str, str] | None) -> dict[str, str]:
    """herder's view of an Azure resource's tags: decoded, without ``created-at``."""
    return {decode_name(k): v for k, v in (tags or {}).items() if k.lower() != CREATED_AT}


def created_at(tags: Mapping[str, str] | None) -> str | None:
    """The ``created-at`` tag, whatever case Azure gives its name in."""
    for name, value in (tags or {}).items():
        if name.lower() == CREATED_AT:
            return value
    return None
