"""The executor of the ``sim`` driver: runs herder's commands against simulated instances.

Instead of a shell on a VM, :class:`SimExecutor` interprets the few commands herder sends
(SPEC §3.5–§3.7, §4, §11; the fake command interpreter of Arvados' stub driver, SPEC §14.2):

* the boot probe (any command that is not one of those below succeeds once booted; ``false``
  and ``exit N`` fail, for tests of a failing boot probe);
* ``md5sum <path>``, the runner's md5 check and its install snippet (the bytes are stored, so
  the md5 check herder does before installing matches once installed);
* ``cat <path>`` (how herder checks the instance secret planted by the init command);
* the runner verbs ``--list [--stdin-prices]``, ``--detach --stdin-config ... <uuid>``,
  ``--kill <signal> <uuid>``, ``--log <uuid>`` and ``--forget <uuid>``.

``sudo `` and ``sudo sh -c '...'`` are understood; when the login user is not root, privileged
commands (the runner, the install snippet, reading the secret) without ``sudo`` fail with
"Permission denied", so a missing sudo prefix is caught.

Connecting emulates the SSH executor (SPEC §6.2): once an instance has booted, the first
command, and the first after :meth:`SimExecutor.close` if the key changed, presents the
instance's host key to ``target.verify_host_key`` (herder's secret-checking wrapper calls back
through a :class:`~herder.plugin.cloud.RemoteRunner` to ``cat`` the secret); a failure raises
:class:`~herder.plugin.executor.HostKeyError`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from herder.model import is_container_uuid
from herder.plugin.cloud import HostKey, Instance, RemoteRunner
from herder.plugin.executor import ExecResult, Executor, ExecutorError, HostKeyError, NoAddressError
from herder.runtime import VirtualRuntime
from herder.testing.sim_cloud import SimCloud, SimProcess, SimVM

if TYPE_CHECKING:
    from herder.testing.sim_params import SimParameters

RUNNER_VERBS = frozenset({"--list", "--detach", "--kill", "--log", "--forget"})
#: The secret file herder's init command writes; only root may read it (umask 0177).
SECRET_PATH = "/var/run/herder-instance-secret"  # noqa: S105 (a path, not a secret)

_INSTALL_FILE_RE = re.compile(r"dstfile=(?P<file>[^;]+);")
_INSTALL_CAT_RE = re.compile(r'cat\s*>\s*"\$tmp"')
_MD5_CHECK_RE = re.compile(r'md5sum\s+"\$dstfile"\s*$')


@functools.lru_cache(maxsize=256)
def _split(text: str) -> tuple[str, ...]:
    """``shlex.split``, remembered: the engine sends the same few probe commands every second,
    and splitting them anew was a third of a simulation's time."""
    return tuple(shlex.split(text))


def _result(code: int, stdout: str | bytes = b"", stderr: str = "") -> ExecResult:
    out = stdout.encode() if isinstance(stdout, str) else stdout
    return ExecResult(code, out, stderr.encode())


class CommandInterpreter:
    """Runs one command on one simulated instance.  Callers hold the cloud's lock."""

    def __init__(self, cloud: SimCloud, vm: SimVM, now: float) -> None:
        self.cloud = cloud
        self.vm = vm
        self.now = now

    def _count(self, kind: str) -> None:
        self.cloud.stats.commands[kind] += 1

    def run(self, command: str, stdin: bytes) -> ExecResult:
        text = command.strip()
        privileged = self.vm.remote_user == "root"
        if text.startswith("sudo "):
            privileged = True
            text = text[len("sudo ") :].lstrip()
        return self._run(text, stdin, privileged)

    def _run(self, text: str, stdin: bytes, privileged: bool) -> ExecResult:
        if text.startswith("sh -c "):
            try:
                argv = list(_split(text))
            except ValueError as e:
                return _result(2, stderr=f"sh: syntax error: {e}\n")
            if len(argv) != 3:
                return _result(2, stderr="sh: -c takes one script\n")
            return self._run(argv[2].strip(), stdin, privileged)
        if _INSTALL_CAT_RE.search(text) and _INSTALL_FILE_RE.search(text):
            return self._install(text, stdin, privileged)
        file_match = _INSTALL_FILE_RE.search(text)
        if _MD5_CHECK_RE.search(text) and file_match:
            # The directory checks pass on a simulated instance: herder made it.
            return self._md5sum(["md5sum", shlex.split(file_match.group("file"))[0]])
        try:
            argv = list(_split(text))
        except ValueError as e:
            return _result(2, stderr=f"sh: syntax error: {e}\n")
        if len(argv) >= 2 and argv[1] in RUNNER_VERBS:
            return self._runner(argv, stdin, privileged)
        if argv and argv[0] == "md5sum":
            return self._md5sum(argv)
        if argv and argv[0] == "cat":
            return self._cat(argv, privileged)
        return self._other(argv)

    # ------------------------------------------------------------------ files

    def _install(self, text: str, stdin: bytes, privileged: bool) -> ExecResult:
        """The runner install snippet (SPEC §3.7): store stdin as the file's content."""
        self._count("install")
        if not privileged:
            return _result(1, stderr="mkdir: cannot create directory: Permission denied\n")
        match = _INSTALL_FILE_RE.search(text)
        assert match is not None  # checked by the caller
        self.vm.files[shlex.split(match.group("file"))[0]] = bytes(stdin)
        return _result(0)

    def _md5sum(self, argv: list[str]) -> ExecResult:
        self._count("md5sum")
        if len(argv) != 2:
            return _result(1, stderr="md5sum: expected one file\n")
        path = argv[1]
        data = self.vm.files.get(path)
        if data is None:
            return _result(1, stderr=f"md5sum: {path}: No such file or directory\n")
        return _result(0, f"{hashlib.md5(data).hexdigest()}  {path}\n")  # noqa: S324

    def _cat(self, argv: list[str], privileged: bool) -> ExecResult:
        self._count("cat")
        if len(argv) != 2:
            return _result(1, stderr="cat: expected one file\n")
        path = argv[1]
        data = self.vm.files.get(path)
        if data is None:
            return _result(1, stderr=f"cat: {path}: No such file or directory\n")
        if path == SECRET_PATH and not privileged:
            return _result(1, stderr=f"cat: {path}: Permission denied\n")
        return _result(0, data)

    def _other(self, argv: list[str]) -> ExecResult:
        """The boot probe, or any other command: succeeds (the instance has booted)."""
        self._count("boot_probe")
        if argv and argv[0] == "false":
            return _result(1)
        if argv and argv[0] == "exit":
            try:
                return _result(int(argv[1]) if len(argv) > 1 else 0)
            except ValueError:
                return _result(2, stderr="exit: numeric argument required\n")
        return _result(0)

    # ------------------------------------------------------------------ the runner

    def _runner(self, argv: list[str], stdin: bytes, privileged: bool) -> ExecResult:
        verb = argv[1]
        self._count(verb.lstrip("-"))
        if self.vm.params.runner_missing and argv[0] not in self.vm.files:
            return _result(127, stderr=f"sh: 1: {argv[0]}: not found\n")
        if not privileged:
            return _result(1, stderr="herder-runner: /var/lock: Permission denied\n")
        args = argv[2:]
        if verb == "--list":
            return self._list(args, stdin)
        if verb == "--detach":
            return self._detach(args, stdin)
        uuid = args[-1] if args else ""
        if not is_container_uuid(uuid):
            return _result(2, stderr="herder-runner: exactly one container uuid required\n")
        if verb == "--kill":
            return self._kill(args, uuid)
        if verb == "--log":
            return self._log(uuid)
        return self._forget(uuid)

    def _list(self, args: list[str], stdin: bytes) -> ExecResult:
        if "--stdin-prices" in args:
            try:
                prices = json.loads(stdin or b"null")
            except ValueError:
                return _result(1, stderr="herder-runner: bad prices on stdin\n")
            if not isinstance(prices, list):
                return _result(1, stderr="herder-runner: prices must be a JSON array\n")
            self.vm.prices = bytes(stdin)
        lines: list[str] = []
        if self.vm.broken(self.now):
            lines.append("broken")
            if not self.vm.broken_reported:
                self.vm.broken_reported = True
                self.cloud.fault("broken")
        for uuid, proc in sorted(self.vm.procs.items()):
            lines.extend(self._list_lines(uuid, proc))
        return _result(0, "".join(line + "\n" for line in lines))

    def _list_lines(self, uuid: str, proc: SimProcess) -> list[str]:
        if proc.alive(self.now):
            return [uuid]
        code = proc.exit_code
        if code is None:
            return []  # crashed: the lock went with the process, nothing is left to list
        lines = [f"{uuid} stale"] if proc.stale_lock else []
        if not proc.forgotten:
            lines.append(f"{uuid} exited {code}")
        return lines

    def _detach(self, args: list[str], stdin: bytes) -> ExecResult:
        if not args or args[0] != "--stdin-config":
            return _result(2, stderr="herder-runner: --detach needs --stdin-config\n")
        uuid = args[-1]
        if len(args) < 2 or not is_container_uuid(uuid):
            return _result(2, stderr="herder-runner: exactly one container uuid required\n")
        doc = _config_document(stdin, uuid)
        if isinstance(doc, str):
            return _result(1, stderr=f"herder-runner: {doc}\n")
        if self.vm.broken(self.now):
            return _result(1, stderr="herder-runner: this instance is broken\n")
        previous = self.vm.procs.get(uuid)
        if previous is not None and previous.lock_held(self.now):
            self.cloud.stats.refused_starts += 1
            return _result(1, stderr=f"herder-runner: {uuid}: lock is held by another process\n")
        command = tuple(str(a) for a in doc.get("command") or ())
        max_run_time = float(doc.get("max_run_time") or 0.0)
        proc = self.cloud.start_process(self.vm, uuid, command, max_run_time, self.now)
        return _result(0, json.dumps({"UUID": uuid, "PID": proc.pid}) + "\n")

    def _kill(self, args: list[str], uuid: str) -> ExecResult:
        try:
            signal = int(args[0]) if len(args) == 2 else -1
        except ValueError:
            signal = -1
        if signal < 0:
            return _result(2, stderr="herder-runner: usage: --kill <signal> <uuid>\n")
        proc = self.vm.procs.get(uuid)
        if proc is None or not proc.alive(self.now):
            return _result(0, stderr=f"{uuid}: not running\n")
        if signal > 0:
            self.cloud.terminate_process(proc, signal, self.now)
        if proc.alive(self.now):
            return _result(1, stderr=f"{uuid}: sent signal {signal} but process is still alive\n")
        return _result(0, stderr=f"{uuid}: pid {proc.pid}: process is gone\n")

    def _log(self, uuid: str) -> ExecResult:
        proc = self.vm.procs.get(uuid)
        if proc is None:
            return _result(1, stderr=f"herder-runner: no log for {uuid}\n")
        return _result(0, proc.log_text(self.now))

    def _forget(self, uuid: str) -> ExecResult:
        proc = self.vm.procs.get(uuid)
        if proc is None:
            return _result(0)
        if proc.alive(self.now):
            return _result(1, stderr=f"herder-runner: {uuid} is still running\n")
        if proc.stale_lock and proc.exit_code is not None:
            proc.forgotten = True  # the exit record goes; the held lock stays
        else:
            del self.vm.procs[uuid]
        return _result(0)


def _config_document(stdin: bytes, uuid: str) -> dict[str, Any] | str:
    """The ``--detach`` config document, or why it is unusable."""
    try:
        doc = json.loads(stdin or b"")
    except ValueError:
        return "stdin is not a JSON config document"
    if not isinstance(doc, dict):
        return "config document must be a JSON object"
    if doc.get("uuid", uuid) != uuid:
        return f"config document is for {doc.get('uuid')!r}, not {uuid}"
    command = doc.get("command")
    if command is not None and not isinstance(command, list):
        return "command must be a list"
    return doc


class _SimRemote(RemoteRunner):
    """The "connection being verified", handed to ``verify_host_key``."""

    def __init__(self, executor: SimExecutor) -> None:
        self._executor = executor

    def run(
        self, command: str, stdin: bytes = b"", timeout: float = 60.0
    ) -> tuple[int, bytes, bytes]:
        result = self._executor.run_unverified(command, stdin)
        return result.exit_status, result.stdout, result.stderr


class SimExecutor(Executor):
    """Runs commands on a simulated instance by interpreting them (no SSH)."""

    def __init__(self, cloud: SimCloud, params: SimParameters, target: Instance) -> None:
        self._cloud = cloud
        self._params = params
        self._target = target
        self._state_lock = threading.Lock()
        self._connected = False
        self._verified_key: HostKey | None = None
        self._real_clock = not isinstance(cloud.runtime, VirtualRuntime)

    def set_target(self, instance: Instance) -> None:
        with self._state_lock:
            if instance.id != self._target.id:
                self._connected = False
                self._verified_key = None
            self._target = instance

    def close(self) -> None:
        with self._state_lock:
            self._connected = False

    def execute(
        self,
        command: str,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        latency = self._params.probe_latency
        if timeout is not None and latency > timeout:
            raise ExecutorError(f"command timed out after {timeout} s")
        if latency > 0 and self._real_clock:
            time.sleep(latency)  # a slow network, simulated on a real clock
        with self._state_lock:
            target, connected = self._target, self._connected
        booted, ssh_failure, host_key = self._connect_phase(target)
        if not booted:
            return _result(1, stderr="sim: instance is still booting\n")
        if ssh_failure == "before":
            raise ExecutorError("sim: connection reset by peer")
        if not connected:
            self._verify(target, host_key)
        result = self._interpret(target.id, command, stdin or b"")
        if ssh_failure == "after":
            raise ExecutorError("sim: connection lost before the command's status arrived")
        return result

    def _connect_phase(self, target: Instance) -> tuple[bool, str, HostKey]:
        """Check the instance can be reached; decide whether this command's connection fails."""
        with self._cloud.lock:
            now = self._cloud.now()
            self._cloud.settle(now)
            vm = self._cloud.vm(target.id)
            if vm is None or not vm.reachable(now):
                raise ExecutorError(f"sim: {target.id}: connect: no route to host")
            if vm.current_address(now) == "":
                raise NoAddressError()
            if not vm.booted(now):
                return False, "", vm.host_key
            failure = ""
            if self._cloud.roll(self._params.ssh_failure_rate):
                self._cloud.fault("ssh_failure")
                failure = "before" if self._cloud.roll(0.5) else "after"
            return True, failure, vm.host_key

    def _verify(self, target: Instance, host_key: HostKey) -> None:
        """Emulate the SSH executor's host-key check on a new connection (SPEC §6.2)."""
        if self._params.check_host_keys and host_key != self._verified_key:
            try:
                target.verify_host_key(host_key, _SimRemote(self))
            except Exception as e:
                raise HostKeyError(f"host key verification failed: {e}") from e
        with self._state_lock:
            if self._target.id == target.id:
                self._verified_key = host_key
                self._connected = True

    def run_unverified(self, command: str, stdin: bytes) -> ExecResult:
        """Run on the connection being verified (no new connection, no injected failure)."""
        with self._state_lock:
            target_id = self._target.id
        return self._interpret(target_id, command, stdin)

    def _interpret(self, vm_id: str, command: str, stdin: bytes) -> ExecResult:
        with self._cloud.lock:
            now = self._cloud.now()
            self._cloud.settle(now)
            vm = self._cloud.vm(vm_id)
            if vm is None or not vm.reachable(now):
                raise ExecutorError(f"sim: {vm_id}: connection closed by remote host")
            return CommandInterpreter(self._cloud, vm, now).run(command, stdin)
