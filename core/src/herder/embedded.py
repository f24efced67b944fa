"""The embedded default: what ``herder serve`` runs with no configuration file at all.

Everything herder needs is created once in the data directory (``herder.client.default_data_dir``)
and reused on every later start, so that a restart adopts the instances and containers of the last
one: a generated cluster id, the SSH key pair herder logs in to instances with, the management
token, the SQLite queue, and the loopback driver's instances.  The CLI on the same machine finds
the server's address and token through ``client.json`` there.

With a configuration file only a missing SSH key is generated (into the same directory), since an
instance cannot be reached without one; everything else is the operator's to choose.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path

from herder.config import Config

log = logging.getLogger(__name__)

CLUSTER_ID_FILE = "cluster_id"
TOKEN_FILE = "management_token"  # noqa: S105 (a file name, not a secret)
KEY_FILE = "ssh/id_ed25519"


@dataclass
class ServeSetup:
    """The configuration ``herder serve`` runs with, and what was created for it."""

    config: Config
    data_dir: Path
    created: list[str] = field(default_factory=list)


def _read_or_create(path: Path, make: str, created: list[str]) -> str:
    """The stripped content of ``path``, writing ``make`` there (mode 0600) if it is missing."""
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(make + "\n")
    created.append(str(path))
    return make


def new_cluster_id() -> str:
    """Five lowercase alphanumerics, starting with a letter."""
    alphabet = string.ascii_lowercase + string.digits
    return secrets.choice(string.ascii_lowercase) + "".join(
        secrets.choice(alphabet) for _ in range(4)
    )


def ensure_ssh_key(data_dir: Path, created: list[str]) -> str:
    """Path of herder's private key in ``data_dir``, generated on first use."""
    path = data_dir / KEY_FILE
    if not path.exists():
        from herder.ssh.server import generate_key_file

        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        generate_key_file(path)
        os.chmod(path, 0o600)
        created.append(str(path))
    return str(path)


def embedded_config(data_dir: Path, created: list[str]) -> Config:
    """The default configuration, with its state kept in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cluster_id = _read_or_create(data_dir / CLUSTER_ID_FILE, new_cluster_id(), created)
    token = _read_or_create(data_dir / TOKEN_FILE, secrets.token_urlsafe(32), created)
    return Config.model_validate(
        {
            "cluster_id": cluster_id,
            "queue": {"path": str(data_dir / "herder.db")},
            "api": {"management_token": token},
            "containers": {"dispatch_private_key": ensure_ssh_key(data_dir, created)},
            "cloud": {
                "driver": "loopback",
                "driver_parameters": {"state_dir": str(data_dir / "loopback")},
            },
        }
    )


def prepare_serve(config: Config | None, data_dir: Path) -> ServeSetup:
    """The configuration to serve: ``config`` (from a file) or the embedded default."""
    created: list[str] = []
    if config is None:
        return ServeSetup(embedded_config(data_dir, created), data_dir, created)
    if not config.containers.dispatch_private_key and config.cloud.deploy_public_key:
        key = ensure_ssh_key(data_dir, created)
        containers = config.containers.model_copy(update={"dispatch_private_key": key})
        config = config.model_copy(update={"containers": containers})
    return ServeSetup(config, data_dir, created)
