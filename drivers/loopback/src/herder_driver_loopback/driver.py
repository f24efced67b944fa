"""The ``loopback`` driver: the local host as a cloud (SPEC §16.1, improved).

Each instance is an SSH server on this host, run inside the dispatcher process, that executes
commands with ``sh -c`` as the user running herder.  It is for development, demos and tests:
herder's whole path -- create, boot probe, runner deployment, ``--detach``, ``--list``, kill,
destroy, adoption after a restart -- runs for real, over real SSH, without a cloud.

What it improves on Arvados' loopback driver, and why:

* Several instances (``max_instances``, default 4) instead of one, so packing, idle shutdown and
  quota handling can be watched locally.  Creating more raises :class:`QuotaError`.
* Every instance has its own directory ``<state_dir>/instances/<id>/`` and its commands get
  ``HERDER_RUNNER_DIR`` (and ``HERDER_RUNNER_LOG_DIR``) pointing at ``<that dir>/runner``, so
  instances on one host never see each other's containers, locks or ``broken`` marker (Arvados
  shares ``/var/lock/crunch-run-broken`` and removes it on every create instead).  The deployed
  runner program is content-addressed (``herder-runner~<md5>``), so sharing its directory
  between instances is harmless.
* Every instance has its own ed25519 host key, which :meth:`LoopbackInstance.verify_host_key`
  checks; the key is pinned at creation, so a key file swapped later is refused.
* Instances are persisted (``instance.json``: tags, provider type, port, host key) and come back
  after the dispatcher restarts: a new instance set over the same ``state_dir`` lists them and
  restarts their SSH servers (on the same port when it is free), so herder adopts them.  The
  runner detaches containers into their own session, so they outlive the dispatcher too.
* :meth:`LoopbackInstance.destroy` stops the instance's SSH server (Arvados leaks it, SPEC §19
  item 33) and removes its directory.
* ``instances(tags)`` filters by tags, and tags are given back exactly as set.
* :meth:`LoopbackInstanceSet.stop_ssh` and :meth:`~LoopbackInstanceSet.start_ssh` take one
  instance's SSH server down and bring it back, for fault-injection tests: herder then meets
  what it meets when a VM's sshd dies or its network drops, while the containers keep running.

The init command is recorded in ``<instance dir>/init-command`` but never run: it is written to
run as root on a fresh VM, and here it would run as the operator on the operator's own machine.
Nothing herder needs depends on it: the instance secret it plants is only read when a driver
cannot verify host keys, and this one can.

A leading ``sudo `` is removed from every command, as Arvados does: the commands run as the
user running herder whatever ``remote_user`` says, and that user may not have sudo.

Only one instance set may use a state directory at a time (a ``flock`` on ``<state_dir>/lock``):
two would start two SSH servers for each instance.
"""

from __future__ import annotations

import base64
import fcntl
import getpass
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paramiko
from pydantic import Field, field_validator

from herder.agent.protocol import login_environment
from herder.cloud import (
    CloudError,
    Driver,
    DriverContext,
    DriverParameters,
    HostKey,
    HostKeyMismatch,
    Instance,
    InstanceSet,
    QuotaError,
    RemoteRunner,
)
from herder.model import InstanceType
from herder.ssh.server import (
    ExecRequest,
    Handler,
    LocalSSHServer,
    generate_key_file,
    run_shell,
)

__all__ = [
    "LoopbackDriver",
    "LoopbackInstance",
    "LoopbackInstanceSet",
    "LoopbackParameters",
    "default_state_dir",
    "local_instance_type",
]

log = logging.getLogger("herder.driver.loopback")

INSTANCES_DIR = "instances"
RECORD_FILE = "instance.json"
HOST_KEY_FILE = "ssh_host_ed25519_key"
INIT_COMMAND_FILE = "init-command"
RUNNER_DIR = "runner"
LOCK_FILE = "lock"


# --------------------------------------------------------------------------- defaults


def default_state_dir() -> str:
    """``$XDG_DATA_HOME/herder/loopback``, else ``~/.local/share/herder/loopback``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "herder", "loopback")


def current_user() -> str:
    """The name of the OS user running herder: the user every command runs as."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return str(os.getuid())


def local_instance_type(
    name: str = "local", scratch_dir: str | os.PathLike[str] | None = None
) -> InstanceType:
    """An instance type the size of this machine, for a loopback setup with no configured types.

    CPUs are those this process may run on, RAM is ``MemTotal`` from ``/proc/meminfo``, scratch
    is the free space of the filesystem holding ``scratch_dir`` (default: the default state
    directory, or its nearest existing parent), and the price is 0: the machine is paid for.
    """
    path = _existing_ancestor(Path(scratch_dir) if scratch_dir else Path(default_state_dir()))
    return InstanceType(
        name=name,
        provider_type=name,
        vcpus=_cpu_count(),
        ram=_memory_total(),
        included_scratch=shutil.disk_usage(path).free,
        price=0.0,
    )


def _cpu_count() -> int:
    """CPUs this process may use (a cgroup or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory_total() -> int:
    """Physical memory in bytes: ``MemTotal`` of ``/proc/meminfo``, else sysconf."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --------------------------------------------------------------------------- parameters


class LoopbackParameters(DriverParameters):
    """``cloud.driver_parameters`` of the loopback driver (all optional)."""

    max_instances: int = Field(
        4, ge=1, description="instances that may exist at once; creating more is a quota error"
    )
    state_dir: str = Field(
        default_factory=default_state_dir,
        description="where instances live: <state_dir>/instances/<id>/ (kept across restarts)",
    )
    bind: str = Field("127.0.0.1", description="IPv4 address the instances' SSH servers listen on")
    remote_user: str = Field(
        default_factory=current_user,
        description="login name herder uses; commands always run as the user running herder",
    )

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("state_dir must not be empty")
        return os.path.abspath(os.path.expanduser(value))

    @field_validator("bind")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(f"bind must be an IPv4 address, not {value!r}") from None

    @field_validator("remote_user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"invalid remote_user {value!r}")
        return value


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class _Record:
    """What ``instance.json`` holds about one instance."""

    id: str
    provider_type: str
    image_id: str
    tags: dict[str, str]
    port: int
    host_key: str  # "ssh-ed25519 AAAA...", pinned at creation
    authorized_keys: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "provider_type": self.provider_type,
            "image_id": self.image_id,
            "tags": self.tags,
            "port": self.port,
            "host_key_file": HOST_KEY_FILE,
            "host_key": self.host_key,
            "authorized_keys": self.authorized_keys,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> _Record:
        tags = doc["tags"]
        if not isinstance(tags, dict):
            raise ValueError("tags is not a map")
        return cls(
            id=str(doc["id"]),
            provider_type=str(doc["provider_type"]),
            image_id=str(doc.get("image_id", "")),
            tags={str(k): str(v) for k, v in tags.items()},
            port=int(doc["port"]),
            host_key=str(doc["host_key"]),
            authorized_keys=[str(k) for k in doc["authorized_keys"]],
        )


def _write_json_atomically(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace ``path`` in one step, so a crash never leaves half a record behind."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(doc, out, indent=2, sort_keys=True)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _key_blob(openssh_line: str) -> tuple[str, bytes]:
    key_type, b64 = openssh_line.split()[:2]
    return key_type, base64.b64decode(b64)


def _fingerprint(blob: bytes) -> str:
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _runner_env_handler(runner_dir: str) -> Handler:
    """Run commands like :func:`run_shell`, with the instance's own runner state directory.

    The variables are set whether or not the client sent an environment, so the runner agent
    of one instance never looks at another's containers.
    """

    def handle(request: ExecRequest) -> int:
        base = request.env or login_environment()
        request.env = {
            **base,
            "HERDER_RUNNER_DIR": runner_dir,
            "HERDER_RUNNER_LOG_DIR": runner_dir,
        }
        return run_shell(request)

    return handle


@dataclass
class _Live:
    """One instance as the instance set holds it: its record and its running SSH server."""

    record: _Record
    directory: Path
    server: LocalSSHServer | None = None
    address: str = ""


# --------------------------------------------------------------------------- instances


class LoopbackInstance(Instance):
    """A snapshot of one loopback instance (tags as of the listing that returned it)."""

    def __init__(self, owner: LoopbackInstanceSet, live: _Live, remote_user: str) -> None:
        self._owner = owner
        self._record = live.record
        self._address = live.address
        self._remote_user = remote_user
        self.directory = live.directory
        """The instance's own directory on this host."""

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def provider_type(self) -> str:
        return self._record.provider_type

    @property
    def address(self) -> str:
        """``<bind>:<port>`` of the instance's SSH server; ``""`` if it could not be started."""
        return self._address

    @property
    def remote_user(self) -> str:
        return self._remote_user

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._record.tags)

    @property
    def runner_dir(self) -> Path:
        """The runner agent's state directory on this instance (``HERDER_RUNNER_DIR``)."""
        return self.directory / RUNNER_DIR

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._owner.set_tags(self.id, tags)

    def destroy(self) -> None:
        self._owner.destroy(self.id)

    def stop_ssh(self) -> bool:
        """Take this instance's SSH server down (see :meth:`LoopbackInstanceSet.stop_ssh`)."""
        return self._owner.stop_ssh(self.id)

    def start_ssh(self) -> bool:
        """Bring the SSH server back (see :meth:`LoopbackInstanceSet.start_ssh`)."""
        return self._owner.start_ssh(self.id)

    def verify_host_key(self, key: HostKey, remote: RemoteRunner) -> None:
        """Accept only the host key generated for this instance when it was created."""
        expected_type, expected_blob = _key_blob(self._record.host_key)
        if key.key_type != expected_type or key.blob != expected_blob:
            raise HostKeyMismatch(
                f"host key mismatch: {self.id} presented {key.key_type} "
                f"{_fingerprint(key.blob)}, expected {expected_type} "
                f"{_fingerprint(expected_blob)}"
            )


class LoopbackInstanceSet(InstanceSet):
    """The loopback instances kept under one state directory.

    Thread-safe: one lock guards the instance table and the records on disk.  The work done
    under it (writing a small file, generating a key, binding a local port) takes
    milliseconds; stopping an SSH server, which waits for its commands, happens outside it.
    """

    def __init__(self, params: LoopbackParameters, logger: logging.Logger | None = None) -> None:
        self._params = params
        self._log = logger or log
        self._root = Path(params.state_dir)
        self._instances_dir = self._root / INSTANCES_DIR
        try:
            self._instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise CloudError(f"cannot create loopback state directory {self._root}: {exc}") from exc
        self._lock_fd: int | None = self._claim_state_dir()
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._stopped = False
        try:
            self._adopt_existing()
        except BaseException:
            self.stop()
            raise

    @property
    def state_dir(self) -> Path:
        return self._root

    # ----------------------------------------------------------------- InstanceSet

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> LoopbackInstance:
        """Make a new instance directory, host key and SSH server accepting ``public_key``."""
        if not public_key:
            # Arvados starts a server nobody can log into; say what is wrong instead.
            raise CloudError(
                "the loopback driver needs herder's public key to let it log in "
                "(set cloud.deploy_public_key: true)"
            )
        with self._lock:
            self._check_running()
            if len(self._live) >= self._params.max_instances:
                raise QuotaError(
                    f"loopback driver is at quota: {len(self._live)} instances exist "
                    f"(max_instances: {self._params.max_instances})"
                )
            live = self._make_instance(instance_type, image_id, tags, init_command, public_key)
            self._live[live.record.id] = live
            self._log.info(
                "loopback instance %s (%s) created at %s",
                live.record.id,
                live.record.provider_type,
                live.address,
            )
            return self._snapshot(live)

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        """Every instance that has all of ``tags``, in id order."""
        with self._lock:
            self._check_running()
            return [
                self._snapshot(live)
                for _, live in sorted(self._live.items())
                if all(live.record.tags.get(k) == v for k, v in tags.items())
            ]

    def stop(self) -> None:
        """Stop every SSH server and release the state directory; instances stay on disk."""
        with self._lock:
            self._stopped = True
            servers = [live.server for live in self._live.values() if live.server is not None]
            for live in self._live.values():
                live.server, live.address = None, ""
            lock_fd, self._lock_fd = self._lock_fd, None
        for server in servers:
            server.stop()
        if lock_fd is not None:
            os.close(lock_fd)  # releases the flock

    # ----------------------------------------------------------------- per instance

    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> None:
        """Replace the instance's tags, on disk first so a restart sees them."""
        with self._lock:
            self._check_running()
            live = self._live.get(instance_id)
            if live is None:
                raise CloudError(f"loopback instance {instance_id} does not exist")
            record = replace(live.record, tags={str(k): str(v) for k, v in tags.items()})
            _write_json_atomically(live.directory / RECORD_FILE, record.to_json())
            live.record = record

    def destroy(self, instance_id: str) -> None:
        """Stop the instance's SSH server and remove its directory.  Idempotent.

        Processes the runner started there are not killed: herder destroys an instance only
        once it is idle or its containers have been killed.
        """
        with self._lock:
            self._check_running()
            live = self._live.pop(instance_id, None)
        if live is None:
            return
        if live.server is not None:
            live.server.stop()
        shutil.rmtree(live.directory, ignore_errors=True)
        self._log.info("loopback instance %s destroyed", instance_id)

    # ----------------------------------------------------------------- fault injection

    def stop_ssh(self, instance_id: str) -> bool:
        """Stop the instance's SSH server, leaving the instance and what runs on it in place.

        This is an outage, not a shutdown: connections are refused and open ones are cut (so
        commands in flight get SIGHUP, as over a dropped network), detached containers keep
        running, the instance is still listed, and its address stays the same, as a VM's does.
        :meth:`start_ssh` ends the outage.  Returns False when there is no such instance or its
        server is already down.
        """
        with self._lock:
            self._check_running()
            live = self._live.get(instance_id)
            if live is None or live.server is None:
                return False
            server, live.server = live.server, None
        server.stop()  # waits for its commands: outside the lock
        self._log.info("loopback instance %s: SSH server stopped", instance_id)
        return True

    def start_ssh(self, instance_id: str) -> bool:
        """Start the SSH server :meth:`stop_ssh` stopped, on its old port if that is free.

        Returns False when there is no such instance, its server is already running, or it
        cannot start (the error is logged, as at adoption).
        """
        with self._lock:
            self._check_running()
            live = self._live.get(instance_id)
            if live is None or live.server is not None:
                return False
            return self._restart_server(live, "SSH server restarted")

    # ----------------------------------------------------------------- internals

    def _check_running(self) -> None:
        if self._stopped:
            raise CloudError("the loopback instance set has been stopped")

    def _snapshot(self, live: _Live) -> LoopbackInstance:
        return LoopbackInstance(self, live, self._params.remote_user)

    def _claim_state_dir(self) -> int:
        """Hold ``<state_dir>/lock`` so no other instance set serves the same instances."""
        path = self._root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise CloudError(
                f"loopback state directory {self._root} is in use by another instance set "
                f"(another herder running?): {exc}"
            ) from exc
        return fd

    def _new_id(self) -> str:
        while True:
            candidate = f"lb-{secrets.token_hex(6)}"
            if candidate not in self._live and not (self._instances_dir / candidate).exists():
                return candidate

    def _make_instance(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str,
    ) -> _Live:
        """Create the directory, key, server and record of a new instance (caller holds lock).

        The record is written last: a directory without one is an aborted create, which the
        next start-up removes.
        """
        instance_id = self._new_id()
        directory = self._instances_dir / instance_id
        server: LocalSSHServer | None = None
        try:
            directory.mkdir(mode=0o700)
            (directory / RUNNER_DIR).mkdir(mode=0o700)
            _, host_public = generate_key_file(directory / HOST_KEY_FILE)
            self._record_init_command(directory, init_command)
            record = _Record(
                id=instance_id,
                provider_type=instance_type.provider_type,
                image_id=image_id,
                tags={str(k): str(v) for k, v in tags.items()},
                port=0,
                host_key=host_public,
                authorized_keys=[public_key.strip()],
            )
            live = _Live(record=record, directory=directory)
            server = self._start_server(live, port=0)
            live.record = replace(record, port=_port_of(live.address))
            _write_json_atomically(directory / RECORD_FILE, live.record.to_json())
            return live
        except (OSError, ValueError, paramiko.SSHException) as exc:
            self._discard(directory, server)
            raise CloudError(f"cannot create loopback instance: {exc}") from exc
        except BaseException:
            self._discard(directory, server)
            raise

    @staticmethod
    def _record_init_command(directory: Path, init_command: str) -> None:
        """Keep the init command for reference (it may hold a secret: mode 0600); never run it."""
        fd = os.open(directory / INIT_COMMAND_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(init_command)

    @staticmethod
    def _discard(directory: Path, server: LocalSSHServer | None) -> None:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)

    def _start_server(self, live: _Live, port: int) -> LocalSSHServer:
        """Start ``live``'s SSH server on ``port`` (0: any free port) and record its address."""
        host_key = paramiko.Ed25519Key.from_private_key_file(str(live.directory / HOST_KEY_FILE))
        server = LocalSSHServer(
            host_key,
            live.record.authorized_keys,
            _runner_env_handler(str(live.directory / RUNNER_DIR)),
            bind=self._params.bind,
            port=port,
            strip_sudo=True,
        )
        server.start()
        live.server = server
        # A listener on every interface (0.0.0.0) is reached through the loopback interface.
        bind = ipaddress.IPv4Address(self._params.bind)
        host = "127.0.0.1" if bind.is_unspecified else str(bind)
        live.address = f"{host}:{_port_of(server.address)}"
        return server

    def _adopt_existing(self) -> None:
        """Bring back the instances a previous instance set left on disk, servers and all."""
        for directory in sorted(self._instances_dir.iterdir()):
            if not directory.is_dir():
                continue
            record_path = directory / RECORD_FILE
            if not record_path.exists():
                self._log.warning("removing %s: left behind by an unfinished create", directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            try:
                record = _Record.from_json(json.loads(record_path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._log.error("ignoring %s: unreadable instance record: %s", directory, exc)
                continue
            live = _Live(record=record, directory=directory)
            self._restart_server(live, "adopted")
            self._live[record.id] = live

    def _restart_server(self, live: _Live, what: str) -> bool:
        """Start an existing instance's server on its old port if free, else on a new one.

        An adopted instance whose server cannot start at all is still listed (without an
        address), so herder sees it, gives up on it after its boot timeout, and destroys it.
        """
        record = live.record
        try:
            try:
                self._start_server(live, port=record.port)
            except OSError as exc:
                self._log.info(
                    "loopback instance %s: port %d unavailable (%s); using a new one",
                    record.id,
                    record.port,
                    exc,
                )
                self._start_server(live, port=0)
        except (OSError, ValueError, paramiko.SSHException) as exc:
            self._log.error("loopback instance %s: cannot start its SSH server: %s", record.id, exc)
            live.address = ""
            return False
        port = _port_of(live.address)
        if port != record.port:
            live.record = replace(record, port=port)
            _write_json_atomically(live.directory / RECORD_FILE, live.record.to_json())
        self._log.info("loopback instance %s %s at %s", record.id, what, live.address)
        return True


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# --------------------------------------------------------------------------- driver


class LoopbackDriver(Driver):
    """The ``loopback`` driver.  Parameters: :class:`LoopbackParameters`.

    Capabilities: ``host_key_verification`` (each instance has its own pinned host key) and
    ``quota_errors`` (``max_instances``).
    """

    parameters_model = LoopbackParameters
    capabilities = frozenset({"host_key_verification", "quota_errors"})

    def instance_set(self, params: DriverParameters, context: DriverContext) -> LoopbackInstanceSet:
        if not isinstance(params, LoopbackParameters):
            params = LoopbackParameters.model_validate(params.model_dump())
        return LoopbackInstanceSet(params, logger=context.logger)

    def default_instance_types(self, params: DriverParameters) -> dict[str, InstanceType]:
        """The local machine, when the configuration lists no instance types (SPEC §8.1)."""
        state_dir = getattr(params, "state_dir", None) or default_state_dir()
        it = local_instance_type(scratch_dir=state_dir)
        return {it.name: it}
