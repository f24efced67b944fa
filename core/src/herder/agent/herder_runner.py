#!/bin/sh
""":"
exec python3 -I -S "$0" "$@"
herder-runner: starts, lists, signals and reports containers on one instance.

(The two lines above are for the shell, see "Start-up time" below; to Python they are the
start of this text.)

herder copies this single file to every instance it boots (md5-checked) and drives it over the
executor with the crunch-run command line, so the same dispatcher code could also drive Arvados'
own crunch-run::

    herder-runner --list [--stdin-prices]
    herder-runner --detach --stdin-config [options] <uuid>
    herder-runner --kill <signal> <uuid>
    herder-runner --log <uuid>
    herder-runner --forget <uuid>
    herder-runner --serve

``--serve`` is the resident mode: it reads requests from stdin, one JSON line each
(``{"id": N, "argv": [...], "stdin": "<base64>"}``), carries out the verb the argv names
exactly as the one-shot command would, and answers with one JSON line each
(``{"id": N, "status": S, "stdout": "<base64>", "stderr": "<base64>"}``) until stdin ends,
plus ``{"event": "exited"}`` whenever a container it started has ended, and
``{"event": "log", "uuid": U, "offset": N, "data": "<base64>"}`` with what was added to a
container's log since the last such event, a few times a second (at most ``LOG_CHUNK`` bytes
per container and ``LOG_TICK_BUDGET`` bytes in all per tick, so the stream is bounded in size and
rate; a log that grows faster is caught up later, or collected whole with ``--log``).  Each
serve process sends every log from offset 0: the dispatcher keeps only what it has not stored.
herder keeps one per instance on an open SSH channel, so a verb costs a message rather than
an interpreter start-up.  Requests are handled one at a time; every durable fact lives in the
state directory either way, so a serve process that dies loses nothing.

It needs Python 3.9 or later and the standard library only, and it runs on Linux (it uses
``/proc``, ``flock`` and ``waitid``).  Nothing in it comes from the herder package: instances do
not have herder installed.

Files, all in the state directory (``/var/lock/herder-runner``; ``--state-dir`` or
``HERDER_RUNNER_DIR`` choose another, as tests and non-root loopback setups do):

``<uuid>.lock``
    JSON ``{"uuid", "pid", "start", "pgid"}``: ``pid`` is the supervisor that runs the container
    and holds an exclusive ``flock`` on this file for its whole life, ``start`` its start time
    (``/proc/<pid>/stat``, so a reused pid is never mistaken for it), ``pgid`` the container's
    process group.  A held lock means "this container may still be running", which is what keeps a
    container from being started twice.
``<uuid>.exit``
    the container's exit code, written atomically once it has finished; or, when the container
    could not be started at all, ``failed instance <message>`` (this instance cannot run
    containers: the engine is missing or broken, the supervisor failed) or ``failed container
    <message>`` (this container cannot run anywhere: no such image).  ``--list`` reports these
    as ``<uuid> failed <side> <message>``, never as an exit code: a program may exit 125 too.
    It stays until the dispatcher has collected it with ``--forget``, so a result survives a
    lost connection.
``<uuid>.log``
    the container's stdout and stderr, plus the supervisor's own notes, one line each, every
    line marked with where it came from: ``stdout <text>``, ``stderr <text>`` or
    ``runner <text>``, in the order the supervisor read them (so the two streams stay apart
    and still interleave as they were written).  A line not ended within a second, or longer
    than 8 KiB, is written in pieces, each marked.  Past the config's ``log_limit`` (bytes) one
    ``runner log truncated ...`` line is written and later output is read and discarded, so a
    chatty container neither blocks nor fills the disk.  Logs live in
    ``/var/log/herder-runner`` when the state directory is the default one, because
    ``/var/lock`` is a tiny tmpfs on common distributions and a chatty container would fill it
    and break the instance; ``--log-dir`` / ``HERDER_RUNNER_LOG_DIR`` choose another place.
``<uuid>.pull``
    how many seconds pulling the container's image took, when the runner pulled it (the pull
    policy, ``if-not-present``, ``always`` or ``never``, comes with the config); ``--list``
    reports it as ``<uuid> pulled <seconds>``.  A pull that fails is a start failure (see
    ``<uuid>.exit``), blamed on the container unless the engine itself failed.
``broken``
    the instance cannot run containers (the container engine is unreachable, the disk is full);
    ``--list`` reports it and the dispatcher drains the instance.
``prices.json``
    the price history the dispatcher sends with ``--list --stdin-prices``.

Tuning knobs (environment): ``HERDER_RUNNER_MIN_FREE`` (bytes that must stay free in the state
and log directories, default 1 MiB) and ``HERDER_RUNNER_KILL_WAIT`` (seconds ``--kill`` waits for
the container to go, default 1).

Exit status: 0 done, 1 failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
import time

# Start-up time is the agent's main cost: herder runs a verb for every container start, probe
# and result, and each one starts an interpreter.  So the file starts as a shell script that
# runs python3 without ``site`` (-S: no .pth files, no site-packages scan) and isolated (-I: no
# PYTHON* variables, no user site, and above all not this file's own directory on the import
# path, so nothing placed beside it is ever imported), and only the modules every verb needs
# are imported here; the others are
# imported by the functions that use them.  Python 3.9 compatibility matters more than the
# newest idioms: the instance's python3 is whatever its image ships.

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any, NoReturn

USAGE = """\
usage: herder-runner --list [--stdin-prices]
       herder-runner --serve
       herder-runner --detach --stdin-config [--runtime-engine=ENGINE] [--kill-grace=SECONDS] UUID
       herder-runner --kill SIGNAL UUID
       herder-runner --log UUID
       herder-runner --forget UUID
common options: --state-dir=DIR  --log-dir=DIR
"""

UUID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
ENV_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
ENV_NAME_CHARS = ENV_NAME_START | frozenset("0123456789")

DEFAULT_STATE_DIR = "/var/lock/herder-runner"
DEFAULT_LOG_DIR = "/var/log/herder-runner"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MIN_FREE = 1 << 20
DEFAULT_KILL_WAIT = 1.0
DEFAULT_KILL_GRACE = 10.0
DIR_LOCK_TIMEOUT = 10.0
ACK_TIMEOUT = 10.0
ENGINE_CALL_TIMEOUT = 30.0
RUNTIMES = ("auto", "docker", "podman", "process")
ENGINES = ("docker", "podman")

#: exit code recorded when max_run_time stopped the container, as timeout(1) reports it.
EXIT_TIMED_OUT = 124
#: exit code recorded when the supervisor itself failed, as docker run reports its own errors.
EXIT_RUNNER_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

#: signals the supervisor passes on to the container instead of dying from them.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

#: engine messages that mean no container can run on this instance (SPEC §11 broken node).
BROKEN_PATTERNS = (
    r"cannot connect to the docker daemon",
    r"no space left on device",
    r"grpc: the connection is unavailable",
    r"oci runtime.*mount.*no such file or directory",
)
BROKEN_SCAN_BYTES = 64 * 1024

#: Who a start failure is blamed on: the instance (retried elsewhere) or the container.
FAILURE_SIDES = ("instance", "container")
#: With an engine, exit status 125 is the engine's own error (docker run, podman run) when its
#: stderr says so; these lines say the image is at fault, not the instance.
IMAGE_ERRORS = (
    r"unable to find image",
    r"pull access denied",
    r"manifest unknown",
    r"repository does not exist",
    r"no such image",
    r"image not known",
    r"invalid reference format",
    r"reading manifest",
)
#: ... and these that the engine itself failed (the daemon is down, the OCI runtime broke).
ENGINE_ERRORS = (
    r"^docker: ",
    r"^error: ",
    r"error response from daemon",
    r"cannot connect to the docker daemon",
    r"oci runtime",
)
EXIT_ENGINE_FAILED = 125
PULL_POLICIES = ("if-not-present", "always", "never")
#: Seconds an image pull may take, and an image inspection.
PULL_TIMEOUT = 3600.0
STDERR_TAIL = 4096

#: Seconds between the serve process's looks at the logs of its containers.
LOG_TICK = 0.25
#: Bytes of one container's log sent in one event, and of all logs in one tick.
LOG_CHUNK = 64 * 1024
LOG_TICK_BUDGET = 256 * 1024
#: A partial line is written out once it is this long or this old (seconds).
PARTIAL_LINE_MAX = 8192
PARTIAL_LINE_AGE = 1.0
#: Seconds the supervisor keeps reading output after the container ended (background
#: processes outside its process group may hold the pipes open).
DRAIN_TIMEOUT = 2.0


class UsageError(Exception):
    """The command line is wrong: exit 2 with the usage text."""


class RunnerError(Exception):
    """The request cannot be carried out: exit 1 with the message."""


def is_uuid(text: str) -> bool:
    """A well-formed container uuid, ``[a-z0-9]{5}-dz642-[a-z0-9]{15}`` and nothing more.

    Checked by hand rather than with ``re``, whose import alone costs more than a ``--list``.
    """
    return (
        len(text) == 27
        and text[5:12] == "-dz642-"
        and all(c in UUID_CHARS for c in text[:5])
        and all(c in UUID_CHARS for c in text[12:])
    )


def is_env_name(text: str) -> bool:
    """A portable environment variable name: ``[A-Za-z_][A-Za-z0-9_]*``."""
    return bool(text) and text[0] in ENV_NAME_START and all(c in ENV_NAME_CHARS for c in text)


def checked_uuid(text: str) -> str:
    """Every file name built from a uuid goes through here, so no path can escape the state dir."""
    if not is_uuid(text):
        raise UsageError(f"malformed container uuid {text!r}")
    return text


# --------------------------------------------------------------------------- command line


class Options:
    """The parsed command line.  (Plain classes here: ``dataclasses`` imports ``inspect``.)"""

    def __init__(
        self,
        verb: str,
        uuid: str = "",
        signum: int = signal.SIGTERM,
        stdin_prices: bool = False,
        stdin_config: bool = False,
        state_dir: str = DEFAULT_STATE_DIR,
        log_dir: str = DEFAULT_LOG_DIR,
        runtime_engine: str = "auto",
        kill_grace: float = DEFAULT_KILL_GRACE,
    ) -> None:
        self.verb = verb
        self.uuid = uuid
        self.signum = signum
        self.stdin_prices = stdin_prices
        self.stdin_config = stdin_config
        self.state_dir = state_dir
        self.log_dir = log_dir
        self.runtime_engine = runtime_engine
        self.kill_grace = kill_grace


VERBS = ("--list", "--detach", "--kill", "--log", "--forget", "--serve")
FLAGS = (
    "--list",
    "--detach",
    "--log",
    "--forget",
    "--serve",
    "--stdin-prices",
    "--stdin-config",
    "--help",
)
VALUED = ("--kill", "--state-dir", "--log-dir", "--runtime-engine", "--kill-grace")


def split_args(argv: list[str]) -> tuple[set[str], dict[str, str], list[str]]:
    """Split argv into flags, valued options and positionals.

    Options may be spelled ``-name`` or ``--name`` and valued ones ``--name=value`` or
    ``--name value``, as Go's flag package (and so crunch-run) accepts them.
    """
    flags: set[str] = set()
    values: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        name, has_value, value = ("--" + arg.lstrip("-")).partition("=")
        if name in FLAGS:
            if has_value:
                raise UsageError(f"option {name} takes no value")
            flags.add(name)
        elif name in VALUED:
            if not has_value:
                if i >= len(argv):
                    raise UsageError(f"option {name} needs a value")
                value = argv[i]
                i += 1
            values[name] = value
        else:
            raise UsageError(f"unknown option {arg!r}")
    return flags, values, positional


def parse_signal(text: str) -> int:
    """A signal number, or a name such as TERM or SIGTERM."""
    if text.isdigit():
        number = int(text)
        if number in {int(s) for s in signal.valid_signals()} or number == 0:
            return number
        raise UsageError(f"invalid signal {text!r}")
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise UsageError(f"invalid signal {text!r}") from None


def parse_seconds(name: str, text: str) -> float:
    """A non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name} needs a number of seconds, not {text!r}") from None
    if not value >= 0:  # also rejects NaN
        raise UsageError(f"{name} must not be negative")
    return value


def choose_dirs(values: dict[str, str]) -> tuple[str, str]:
    """The state and log directories: flag, then environment, then the defaults."""
    state = values.get("--state-dir") or os.environ.get("HERDER_RUNNER_DIR") or DEFAULT_STATE_DIR
    log_default = DEFAULT_LOG_DIR if state == DEFAULT_STATE_DIR else state
    log = values.get("--log-dir") or os.environ.get("HERDER_RUNNER_LOG_DIR") or log_default
    return state, log


def parse_args(argv: list[str]) -> Options:
    """Parse and check the whole command line; any mistake is a UsageError."""
    flags, values, positional = split_args(argv)
    verbs = [v for v in VERBS if v in flags or v in values]
    if len(verbs) != 1:
        raise UsageError(
            "exactly one of --list, --detach, --kill, --log, --forget, --serve is required"
        )
    verb = verbs[0][2:]
    if "--stdin-prices" in flags and verb != "list":
        raise UsageError("--stdin-prices goes with --list only")
    if "--stdin-config" in flags and verb != "detach":
        raise UsageError("--stdin-config goes with --detach only")
    if verb == "detach" and "--stdin-config" not in flags:
        raise UsageError("--detach needs --stdin-config (the config comes on stdin)")
    if verb in ("list", "serve"):
        if positional:
            raise UsageError(f"--{verb} takes no container uuid")
    elif len(positional) != 1:
        raise UsageError(f"--{verb} needs exactly one container uuid")
    engine = values.get("--runtime-engine", "auto")
    if engine not in RUNTIMES:
        raise UsageError(f"invalid runtime engine {engine!r}: expected {', '.join(RUNTIMES)}")
    state_dir, log_dir = choose_dirs(values)
    return Options(
        verb=verb,
        uuid=checked_uuid(positional[0]) if positional else "",
        signum=parse_signal(values["--kill"]) if verb == "kill" else signal.SIGTERM,
        stdin_prices="--stdin-prices" in flags,
        stdin_config="--stdin-config" in flags,
        state_dir=state_dir,
        log_dir=log_dir,
        runtime_engine=engine,
        kill_grace=parse_seconds("--kill-grace", values.get("--kill-grace", "10")),
    )


def env_float(name: str, default: float) -> float:
    """A numeric tuning knob from the environment; a bad value falls back to the default."""
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


# --------------------------------------------------------------------------- files and locks


def write_atomically(path: str, data: bytes) -> None:
    """Write via a temporary file and rename, so readers see the old or the new content only."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        remove(tmp)  # a full disk must not also keep the half-written file
        raise


#: Size of the exit record reserved before a container starts: blanks, overwritten in place
#: with the exit code if the disk is full by the time the container ends.
EXIT_RESERVED = 24


def remove(path: str) -> None:
    """Delete a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def try_flock(fd: int, kind: int) -> bool:
    """Take a flock without waiting; False when another open file holds it."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def open_existing(path: str) -> int | None:
    """Open a file read-only, or None when it does not exist."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


class LockRecord:
    """What a supervisor writes into its lock file.

    ``start`` is the supervisor's start time from ``/proc``; records written by older agents
    have none, and are then recognised by the uuid in the supervisor's command line.
    """

    def __init__(
        self, uuid: str, pid: int, pgid: int | None = None, start: int | None = None
    ) -> None:
        self.uuid = uuid
        self.pid = pid
        self.pgid = pgid
        self.start = start


class DirLock:
    """The state directory's lock, held while lock files are created or deleted.

    Without it ``--list`` could delete a lock file that ``--detach`` has just opened but not
    yet locked, and two containers of one uuid could then run at once.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, ".dir.lock")
        self.fd = -1

    def __enter__(self) -> int:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + DIR_LOCK_TIMEOUT
        while not try_flock(self.fd, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                os.close(self.fd)
                raise RunnerError(f"{os.path.dirname(self.path)}: state directory lock is busy")
            time.sleep(0.01)
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


class State:
    """The runner's files for one state directory and one log directory."""

    def __init__(self, state_dir: str, log_dir: str) -> None:
        self.dir = state_dir
        self.log_dir = log_dir

    def ensure(self) -> None:
        """Create the directories; private, since logs may hold what containers print."""
        for path in {self.dir, self.log_dir}:
            os.makedirs(path, mode=0o700, exist_ok=True)

    def path(self, uuid: str, suffix: str) -> str:
        return os.path.join(self.dir, checked_uuid(uuid) + suffix)

    def lock_path(self, uuid: str) -> str:
        return self.path(uuid, ".lock")

    def exit_path(self, uuid: str) -> str:
        return self.path(uuid, ".exit")

    def pull_path(self, uuid: str) -> str:
        return self.path(uuid, ".pull")

    def pull_line(self, uuid: str) -> str | None:
        """The ``--list`` line saying how long the image pull took, if there was one."""
        try:
            with open(self.pull_path(uuid), "rb") as f:
                seconds = float(f.read().strip() or b"nan")
        except (OSError, ValueError):
            return None
        return f"{uuid} pulled {seconds:.3f}" if seconds >= 0 else None

    def log_path(self, uuid: str) -> str:
        return os.path.join(self.log_dir, checked_uuid(uuid) + ".log")

    @property
    def broken_path(self) -> str:
        return os.path.join(self.dir, "broken")

    @property
    def prices_path(self) -> str:
        return os.path.join(self.dir, "prices.json")

    def dir_lock(self) -> DirLock:
        """Serialise creating and deleting lock files across runner invocations."""
        return DirLock(self.dir)

    def known_uuids(self) -> list[str]:
        """Every uuid with a lock file or an exit record, sorted."""
        found = set()
        for name in os.listdir(self.dir):
            stem, dot, suffix = name.rpartition(".")
            if dot and suffix in ("lock", "exit") and is_uuid(stem):
                found.add(stem)
        return sorted(found)

    def reserve_exit(self, uuid: str) -> None:
        """Allocate the exit record (blank) before the container starts.

        A container that fills the disk must not lose its own result: an unrecorded exit looks
        like a vanished runner, and the dispatcher would run the container again.  The space
        reserved here is overwritten in place, which needs no new blocks.
        """
        fd = os.open(self.exit_path(uuid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b" " * (EXIT_RESERVED - 1) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_exit(self, uuid: str) -> str | None:
        """What ``--list`` says of a finished container (``exited N`` or ``failed <side>
        <message>``), or None when it has not finished."""
        try:
            with open(self.exit_path(uuid), "rb") as f:
                text = f.read().strip()
            if not text:
                return None  # reserved, not written yet
            if text.startswith(b"failed "):
                side, _, message = text[7:].decode("utf-8", "replace").partition(" ")
                if side not in FAILURE_SIDES:
                    raise ValueError(side)
                return f"failed {side} {one_line(message) or 'unknown failure'}"
            return f"exited {int(text)}"
        except FileNotFoundError:
            return None
        except ValueError:
            warn(f"{uuid}: unreadable exit record ignored")
            return None

    def read_lock(self, uuid: str) -> LockRecord | None:
        """The lock file's record; None while a starting supervisor has not written it yet."""
        import json

        try:
            with open(self.lock_path(uuid), "rb") as f:
                doc = json.loads(f.read() or b"null")
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("pid"), int):
            return None
        if doc.get("uuid") != uuid:
            raise RunnerError(f"{uuid}: lock file names another container {doc.get('uuid')!r}")
        pgid, start = doc.get("pgid"), doc.get("start")
        return LockRecord(
            uuid,
            doc["pid"],
            pgid if isinstance(pgid, int) else None,
            start if isinstance(start, int) else None,
        )

    def unusable_reason(self) -> str | None:
        """Why no container can run here (SPEC §11 ``broken``), or None."""
        if os.path.exists(self.broken_path):
            return "broken marker present"
        min_free = env_float("HERDER_RUNNER_MIN_FREE", DEFAULT_MIN_FREE)
        for path in {self.dir, self.log_dir}:
            if not os.access(path, os.W_OK):
                return f"{path} is not writable"
            st = os.statvfs(path)
            if st.f_bavail * st.f_frsize < min_free or st.f_favail == 0:
                return f"{path}: no space left"
        return None

    def mark_broken(self, reason: str) -> None:
        """Make every later ``--list`` report ``broken`` so the dispatcher drains the instance."""
        try:
            write_atomically(self.broken_path, reason.encode() + b"\n")
        except OSError as e:
            note(f"cannot write broken marker: {e}")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one printable line of at most ``limit`` characters (for ``--list``)."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(cleaned.split())[:limit]


def warn(message: str) -> None:
    """A message for the caller, on stderr."""
    sys.stderr.write(f"herder-runner: {message}\n")
    sys.stderr.flush()


def note(message: str) -> None:
    """A supervisor's line in the container log (its stderr is the log file), marked
    ``runner`` like the container's own lines are marked with their stream."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines = message.rstrip("\n").split("\n")
    text = "".join(f"runner {stamp} herder-runner: {line}\n" for line in lines)
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def proc_start_time(pid: int | str) -> int | None:
    """A process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_is_supervisor(record: LockRecord) -> bool:
    """Whether the record's pid is still the live supervisor of its container.

    A zombie counts as gone (it holds no lock and runs nothing), and a live process that started
    at another time than the recorded one is a stranger that reused the pid: signalling it would
    hit an unrelated process.  Records without a start time (older agents) are checked by the
    uuid in the command line instead, which forks of ``--detach ... <uuid>`` carry; forks of
    ``--serve`` do not, which is why the start time is recorded.
    """
    pid, uuid = record.pid, record.uuid
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not os.path.isdir("/proc/self"):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    fields = stat.rpartition(b")")[2].split()
    if fields and fields[0] in (b"Z", b"X"):
        return False
    if record.start is not None:
        return len(fields) > 19 and fields[19] == str(record.start).encode()
    return uuid.encode() in cmdline.split(b"\0")


def lock_is_free(path: str) -> bool:
    """True when nobody holds the lock file (or it is gone): no supervisor is alive."""
    fd = open_existing(path)
    if fd is None:
        return True
    try:
        return try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- --list


def status_line(state: State, uuid: str) -> str | None:
    """The ``--list`` line for one container (caller holds the directory lock), or None.

    A lock file nobody holds and no exit record means the supervisor died without recording a
    result (SIGKILL, reboot): the file is removed, as crunch-run does, and the container is
    simply gone.
    """
    fd = open_existing(state.lock_path(uuid))
    if fd is None:
        code = state.read_exit(uuid)
        if code is None:
            remove(state.exit_path(uuid))  # a reservation left behind, if any
            return None
        return f"{uuid} {code}"
    try:
        if try_flock(fd, fcntl.LOCK_EX):
            code = state.read_exit(uuid)
            if code is None:
                remove(state.lock_path(uuid))
                remove(state.exit_path(uuid))  # a reservation nobody will fill
                return None
            return f"{uuid} {code}"
        try:
            record = state.read_lock(uuid)
        except RunnerError:
            return f"{uuid} stale"  # held by something that is not this container's supervisor
        if record is None or pid_is_supervisor(record):
            return uuid  # a lock without a record yet belongs to a supervisor still starting
        return f"{uuid} stale"
    finally:
        os.close(fd)


def store_prices(state: State, data: bytes) -> None:
    """Keep the price history the dispatcher sent; bad JSON is reported, never stored."""
    import json

    try:
        json.loads(data)
    except ValueError as e:
        warn(f"ignoring malformed price list: {e}")
        return
    write_atomically(state.prices_path, data)


def cmd_list(opts: Options, state: State) -> int:
    """Print ``broken`` and one line per known container (SPEC §11, plus ``exited``)."""
    prices = sys.stdin.buffer.read() if opts.stdin_prices else None
    try:
        state.ensure()
        if prices is not None:
            store_prices(state, prices)
        reason = state.unusable_reason()
    except OSError as e:
        reason = str(e)
    lines = []
    try:
        with state.dir_lock():
            for uuid in state.known_uuids():
                line = status_line(state, uuid)
                if line:
                    lines.append(line)
                    pulled = state.pull_line(uuid)
                    if pulled:
                        lines.append(pulled)
    except OSError as e:
        reason = reason or f"cannot read state directory: {e}"
    if reason is not None:
        lines.insert(0, "broken")
        warn(f"instance cannot run containers: {reason}")
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


# --------------------------------------------------------------------------- --detach


class RunConfig:
    """The container description sent on stdin (``runner_protocol.config_document``)."""

    def __init__(
        self,
        uuid: str,
        command: list[str],
        image: str = "",
        environment: dict[str, str] | None = None,
        cwd: str = "",
        runtime: str = "auto",
        max_run_time: float = 0.0,
        vcpus: float = 0.0,
        ram: int = 0,
        gpu_stack: str = "",
        gpu_count: int = 0,
        log_limit: int = 0,
        pull_policy: str = "if-not-present",
    ) -> None:
        self.uuid = uuid
        self.pull_policy = pull_policy
        self.log_limit = log_limit
        self.gpu_stack = gpu_stack
        self.gpu_count = gpu_count
        self.command = command
        self.image = image
        self.environment = environment or {}
        self.cwd = cwd
        self.runtime = runtime
        self.max_run_time = max_run_time
        self.vcpus = vcpus
        self.ram = ram


def _gpus(doc: dict[str, Any]) -> tuple[str, int]:
    """The ``gpus`` entry: (stack, count), ("", 0) when absent (older dispatchers)."""
    gpus = doc.get("gpus") or {}
    if not isinstance(gpus, dict):
        raise RunnerError("config gpus must be an object")
    stack, count = gpus.get("stack") or "", gpus.get("device_count") or 0
    if stack not in ("", "cuda", "rocm"):
        raise RunnerError(f"config gpus stack {str(stack)[:20]!r} is not cuda or rocm")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise RunnerError("config gpus device_count must be a whole number")
    return (stack, count) if count else ("", 0)


def _number(doc: dict[str, Any], key: str) -> float:
    value = doc.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise RunnerError(f"config {key} must be a non-negative number")
    return float(value)


def _string(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key) or ""
    if not isinstance(value, str) or "\0" in value:
        raise RunnerError(f"config {key} must be a string")
    return value


def _environment(doc: dict[str, Any]) -> dict[str, str]:
    env = doc.get("environment") or {}
    if not isinstance(env, dict):
        raise RunnerError("config environment must be an object")
    for key, value in env.items():
        if not is_env_name(key) or not isinstance(value, str) or "\0" in value:
            raise RunnerError(f"config environment has an invalid entry {key!r}")
    return dict(env)


def parse_config(raw: bytes, uuid: str, default_runtime: str) -> RunConfig:
    """Decode and check the stdin document; it must describe the uuid on the command line."""
    import json

    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise RunnerError(f"config on stdin is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RunnerError("config on stdin must be a JSON object")
    if doc.get("uuid") != uuid:
        raise RunnerError(f"config describes {doc.get('uuid')!r}, not {uuid}")
    command = doc.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(a, str) and "\0" not in a for a in command)
    ):
        raise RunnerError("config command must be a non-empty list of strings")
    runtime = _string(doc, "runtime") or default_runtime
    if runtime not in RUNTIMES:
        raise RunnerError(f"config runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    image = _string(doc, "image")
    if image.startswith("-"):
        raise RunnerError(f"config image {image!r} is not an image name")
    ram = _number(doc, "ram")
    gpu_stack, gpu_count = _gpus(doc)
    log_limit = _number(doc, "log_limit")
    pull_policy = _string(doc, "pull_policy") or "if-not-present"
    if pull_policy not in PULL_POLICIES:
        raise RunnerError(
            f"config pull_policy {pull_policy[:20]!r} is not one of {', '.join(PULL_POLICIES)}"
        )
    return RunConfig(
        pull_policy=pull_policy,
        log_limit=int(log_limit),
        gpu_stack=gpu_stack,
        gpu_count=gpu_count,
        uuid=uuid,
        command=list(command),
        image=image,
        environment=_environment(doc),
        cwd=_string(doc, "cwd"),
        runtime=runtime,
        max_run_time=_number(doc, "max_run_time"),
        vcpus=_number(doc, "vcpus"),
        ram=int(ram),
    )


def cmd_detach(opts: Options, state: State) -> int:
    """Start the container under a supervisor of its own and return at once (SPEC §11).

    The lock is taken here, before forking, so a second ``--detach`` of a running container
    fails instead of starting a second copy; the forked supervisor inherits the locked file and
    keeps it locked until the container's exit code is on disk.
    """
    config = parse_config(sys.stdin.buffer.read(), opts.uuid, opts.runtime_engine)
    try:
        state.ensure()
    except OSError as e:
        raise RunnerError(f"cannot create state directory: {e}") from None
    with state.dir_lock() as dir_fd:
        lock_fd = os.open(state.lock_path(opts.uuid), os.O_RDWR | os.O_CREAT, 0o600)
        if not try_flock(lock_fd, fcntl.LOCK_EX):
            os.close(lock_fd)
            raise RunnerError(f"{opts.uuid}: already running (lock is held)")
        # Not running, so an earlier run's result and log are replaced by this run's.
        remove(state.exit_path(opts.uuid))
        remove(state.log_path(opts.uuid))
        remove(state.pull_path(opts.uuid))
        try:
            state.reserve_exit(opts.uuid)
        except OSError as e:
            remove(state.exit_path(opts.uuid))
            os.close(lock_fd)
            raise RunnerError(f"{opts.uuid}: cannot reserve its exit record: {e}") from None
        os.ftruncate(lock_fd, 0)
        ack_r, ack_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(dir_fd)
            os.close(ack_r)
            become_supervisor(state, config, lock_fd, ack_w, opts.kill_grace)
        os.close(lock_fd)
        os.close(ack_w)
    if not wait_for_ack(ack_r):
        raise RunnerError(f"{opts.uuid}: supervisor {pid} did not report a start")
    sys.stdout.write(f'{{"uuid": "{opts.uuid}", "pid": {pid}}}\n')  # uuid is checked
    return 0


def wait_for_ack(fd: int) -> bool:
    """Wait until the supervisor has written its lock record, so ``--kill`` can find it."""
    import select

    data = b""
    deadline = time.monotonic() + ACK_TIMEOUT
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return True  # slow but alive: the lock is held, report the start
            chunk = os.read(fd, 16)
            if not chunk:
                return data == b"ok"
            data += chunk
    finally:
        os.close(fd)


def become_supervisor(
    state: State, config: RunConfig, lock_fd: int, ack_fd: int, kill_grace: float
) -> NoReturn:
    """The forked child: detach from the caller, run the container, record its exit code."""
    code = EXIT_RUNNER_FAILED
    failure: tuple[str, str] | None = None
    try:
        os.setsid()
        redirect_stdio(state.log_path(config.uuid))
        supervisor = Supervisor(state, config, lock_fd, ack_fd, kill_grace)
        code = supervisor.run()
        failure = supervisor.failure
    except BaseException as e:
        import traceback

        note("supervisor failed:\n" + traceback.format_exc())
        failure = ("instance", f"the runner's supervisor failed: {e!r}")
    finally:
        if failure is not None:
            note(f"the container could not be started ({failure[0]} failure): {failure[1]}")
            if failure[0] == "instance":
                state.mark_broken(failure[1])
        record_exit(state, config.uuid, code, failure)
        os._exit(0)


def redirect_stdio(log_path: str) -> None:
    """Let go of the caller's stdin/stdout/stderr (an SSH session waits for them to close)."""
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def record_exit(state: State, uuid: str, code: int, failure: tuple[str, str] | None = None) -> None:
    """Write the exit record; a full disk here also means the instance is broken.

    Normally a new file replaces the reservation atomically.  When that cannot be written
    (the disk is full) the code goes into the reserved blanks in place, so the result still
    reaches the dispatcher and the container is not run again; ``--list`` then reports the
    instance broken (no space left), and it is drained.
    """
    record = f"{code}\n".encode()
    if failure is not None:
        record = f"failed {failure[0]} {one_line(failure[1])}\n".encode()
    try:
        write_atomically(state.exit_path(uuid), record)
        return
    except OSError as e:
        note(f"cannot write exit record {code}: {e}; using the reserved one")
        write_error = e
    try:
        fd = os.open(state.exit_path(uuid), os.O_WRONLY)
        try:
            os.pwrite(
                fd, record.rstrip(b"\n")[: EXIT_RESERVED - 1].ljust(EXIT_RESERVED - 1) + b"\n", 0
            )
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        note(f"cannot record exit code {code}: {e}")
    if write_error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        state.mark_broken(f"cannot record exit code: {write_error}")


# --------------------------------------------------------------------------- the supervisor


def exit_code(returncode: int) -> int:
    """A shell-style exit code: 128+N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def choose_engine(config: RunConfig) -> str | None:
    """The engine binary to run the container with, or None to run it as a plain process."""
    if config.runtime == "process":
        return None
    import shutil

    if config.runtime in ENGINES:
        path = shutil.which(config.runtime)
        if path is None:
            raise EngineMissing(f"the container engine {config.runtime} is not installed")
        return path
    if not config.image:
        return None
    for name in ENGINES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


class ImageUnavailable(Exception):
    """The image cannot be had: ``side`` is who is at fault (see ``<uuid>.exit``)."""

    def __init__(self, side: str, message: str) -> None:
        super().__init__(message)
        self.side = side
        self.message = message


def engine_capture(engine: str, args: list[str], timeout: float) -> tuple[bool, str]:
    """Run an engine command for its answer: (succeeded, what it printed)."""
    import subprocess

    try:
        done = subprocess.run(  # noqa: S603 - fixed verbs; the image name cannot be an option
            [engine, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{os.path.basename(engine)} {args[0]}: {e}"
    return done.returncode == 0, done.stdout.decode("utf-8", "replace")[-STDERR_TAIL:]


class EngineMissing(Exception):
    """The configured container engine is not on this instance: no container can run here."""


def engine_failure(stderr_tail: bytes) -> tuple[str, str] | None:
    """Who failed, when the engine exited 125: (side, the engine's message), or None when
    nothing the engine said explains it (the program itself exited 125)."""
    import re

    lines = [line.strip() for line in stderr_tail.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    for patterns, side in ((IMAGE_ERRORS, "container"), (ENGINE_ERRORS, "instance")):
        found = [line for line in lines if any(re.search(p, line, re.IGNORECASE) for p in patterns)]
        if found:
            return side, one_line(found[-1])
    return None


def engine_argv(engine: str, config: RunConfig) -> list[str]:
    """``<engine> run``; environment values travel in the engine's environment, not in argv."""
    argv = [engine, "run", "--rm", "--name", container_name(config.uuid)]
    if config.vcpus > 0:
        argv += ["--cpus", f"{config.vcpus:g}"]
    if config.ram > 0:
        argv += ["--memory", str(config.ram)]
    argv += gpu_args(engine, config)
    for key in sorted(config.environment):
        argv += ["-e", key]
    if config.cwd:
        argv += ["-w", config.cwd]
    return [*argv, config.image, *config.command]


def gpu_args(engine: str, config: RunConfig) -> list[str]:
    """The engine options that hand the container its GPUs.

    CUDA: docker's ``--gpus N`` (NVIDIA Container Toolkit); podman through CDI, which names
    devices rather than counts, so every GPU of the instance (herder chose a type with the
    count asked for).  ROCm: the kernel driver's device files for both engines.
    """
    if not config.gpu_count:
        return []
    if config.gpu_stack == "rocm":
        return ["--device", "/dev/kfd", "--device", "/dev/dri", "--group-add", "video"]
    if os.path.basename(engine) == "podman":
        return ["--device", "nvidia.com/gpu=all"]
    return ["--gpus", str(config.gpu_count)]


def container_name(uuid: str) -> str:
    return "herder-" + checked_uuid(uuid)


def process_environment(config: RunConfig) -> dict[str, str]:
    """A plain process sees PATH and its own environment only, never the runner's.

    The runner may have been started with the dispatcher's environment (loopback), which can
    hold cloud credentials.
    """
    return {"PATH": os.environ.get("PATH", DEFAULT_PATH), **config.environment}


def engine_environment(config: RunConfig) -> dict[str, str]:
    """The engine client needs its own settings (DOCKER_HOST, XDG_RUNTIME_DIR) plus the values
    that ``-e NAME`` forwards into the container."""
    return {**os.environ, **config.environment}


def engine_call(engine: str, *args: str) -> None:
    """A best-effort housekeeping call to the engine; what it prints goes into the log as the
    runner's notes (never unmarked)."""
    import subprocess

    try:
        done = subprocess.run(  # noqa: S603 - fixed verbs and a validated container name
            [engine, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=ENGINE_CALL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        note(f"{engine} {' '.join(args)}: {e}")
        return
    output = done.stdout.decode("utf-8", "replace").strip()
    if done.returncode != 0 and output:
        note(f"{os.path.basename(engine)} {args[0]}: {output}")


def scan_for_breakage(state: State, uuid: str) -> None:
    """Mark the instance broken when the engine's output says no container can run here."""
    import re

    try:
        with open(state.log_path(uuid), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - BROKEN_SCAN_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return
    for line in tail.splitlines():
        if any(re.search(p, line, re.IGNORECASE) for p in BROKEN_PATTERNS):
            note(f"instance marked broken: {line.strip()}")
            state.mark_broken(line.strip())
            return


class LogWriter:
    """Writes the container's output into its log, one marked line at a time (see the top of
    the file), and stops at the configured limit with one clear marker line.

    Lines go out whole, so a reader following the file by offset never sees half a line of
    one stream glued to a line of the other.
    """

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.written = 0
        self.truncated = False
        self.partial: dict[bytes, bytes] = {}
        self.partial_since: dict[bytes, float] = {}
        #: the last bytes of stderr, kept even past the limit: what an engine said on failing
        self.stderr_tail = b""

    def feed(self, stream: bytes, data: bytes) -> None:
        """Take a chunk read from ``stream``; complete lines are written at once."""
        if stream == b"stderr":
            self.stderr_tail = (self.stderr_tail + data)[-STDERR_TAIL:]
        buffered = self.partial.pop(stream, b"") + data
        *lines, rest = buffered.split(b"\n")
        for line in lines:
            self._line(stream, line)
        while len(rest) >= PARTIAL_LINE_MAX:
            self._line(stream, rest[:PARTIAL_LINE_MAX])
            rest = rest[PARTIAL_LINE_MAX:]
        if rest:
            self.partial[stream] = rest
            if not lines and stream in self.partial_since:
                return
            self.partial_since[stream] = time.monotonic()
        else:
            self.partial_since.pop(stream, None)

    def next_flush(self) -> float | None:
        """When the oldest partial line is due (monotonic time), or None."""
        if not self.partial_since:
            return None
        return min(self.partial_since.values()) + PARTIAL_LINE_AGE

    def flush(self, everything: bool = False) -> None:
        """Write partial lines that are old enough (all of them at the end)."""
        now = time.monotonic()
        for stream, since in list(self.partial_since.items()):
            if everything or now - since >= PARTIAL_LINE_AGE:
                del self.partial_since[stream]
                self._line(stream, self.partial.pop(stream, b""))

    def _line(self, stream: bytes, text: bytes) -> None:
        if self.truncated:
            return
        record = stream + b" " + text + b"\n"
        if self.limit and self.written + len(record) > self.limit:
            self.truncated = True
            record = (
                f"runner log truncated: the output exceeded the log limit of {self.limit} "
                "bytes (containers.log_limit); later output is discarded\n"
            ).encode()
        try:
            os.write(self.fd, record)
        except OSError:
            return  # a full disk: the exit record is reserved, the log is best-effort
        self.written += len(record)


class Supervisor:
    """Runs one container in its own process group and waits for it.

    The supervisor holds the container's lock for its whole life.  Signals it receives from
    ``--kill`` are passed on to the container's process group; the supervisor keeps running so
    the exit code is still recorded.  It wakes on SIGCHLD and on those signals through a wakeup
    pipe, and otherwise only at the max-run-time deadlines.
    """

    def __init__(
        self, state: State, config: RunConfig, lock_fd: int, ack_fd: int, kill_grace: float
    ) -> None:
        self.state = state
        self.config = config
        self.lock_fd = lock_fd
        self.ack_fd = ack_fd
        self.kill_grace = kill_grace
        self.engine: str | None = None
        #: (side, message) when the container could not be started (see the exit record)
        self.failure: tuple[str, str] | None = None
        self.output = LogWriter(1, config.log_limit)
        #: the container's stdout and stderr pipes still open, by fd: the stream's marker
        self.pipes: dict[int, bytes] = {}
        self.pending: list[int] = []
        self.timed_out = False
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGCHLD:
            self.pending.append(signum)

    def run(self) -> int:
        """Start the container, wait for it, and return the exit code to record."""
        try:
            proc = self._start()
        except ImageUnavailable as e:
            self._publish(None)
            self.failure = (e.side, e.message)
            return EXIT_ENGINE_FAILED
        except EngineMissing as e:
            self._publish(None)
            self.failure = ("instance", str(e))
            return EXIT_ENGINE_FAILED
        except OSError as e:
            note(f"cannot start container: {e}")
            self._publish(None)
            if self.engine is not None:
                self.failure = ("instance", f"cannot run {self.engine}: {e}")
                return EXIT_ENGINE_FAILED
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return EXIT_NOT_FOUND
            return EXIT_NOT_EXECUTABLE
        self._publish(proc.pid)
        try:
            code = self._wait(proc)
        except BaseException:
            kill_group(proc.pid, signal.SIGKILL)  # recorded as a runner failure: leave no orphans
            raise
        if self.engine is not None and code == EXIT_ENGINE_FAILED and not self.timed_out:
            self.failure = engine_failure(self.output.stderr_tail)
        if self.engine is not None and code != 0 and not self.timed_out:
            scan_for_breakage(self.state, self.config.uuid)
        return code

    def _start(self) -> subprocess.Popen[bytes]:
        """Launch the container as the leader of a new process group, output to the log."""
        import subprocess

        self.engine = choose_engine(self.config)
        argv, env = self.config.command, process_environment(self.config)
        cwd: str | None = self.config.cwd or "/"
        if self.engine is not None:
            # A container left behind by a supervisor that was SIGKILLed would block the name.
            engine_call(self.engine, "rm", "--force", container_name(self.config.uuid))
            self._prepare_image(self.engine)
            argv = engine_argv(self.engine, self.config)
            env, cwd = engine_environment(self.config), None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(  # noqa: S603 - argv is the container's own command list
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
            )
        except OSError:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        os.close(out_w)
        os.close(err_w)
        for fd, marker in ((out_r, b"stdout"), (err_r, b"stderr")):
            os.set_blocking(fd, False)
            self.pipes[fd] = marker
        return proc

    def _prepare_image(self, engine: str) -> None:
        """Have the image on the instance as the pull policy says, timing a pull.

        Raises :class:`ImageUnavailable` when it cannot be had: the container's fault (no such
        image, or not present under ``never``) unless the engine itself failed.
        """
        image, policy = self.config.image, self.config.pull_policy
        if not image:
            return  # the engine says what it thinks of a run without one
        if policy != "always":
            present, said = engine_capture(engine, ["image", "inspect", image], PULL_TIMEOUT)
            if present:
                return
            failure = engine_failure(said.encode())
            if failure is not None and failure[0] == "instance":
                raise ImageUnavailable("instance", failure[1])
            if policy == "never":
                raise ImageUnavailable(
                    "container",
                    f"image {image} is not on the instance and the pull policy is never",
                )
        note(f"pulling image {image} (pull policy {policy})")
        started = time.monotonic()
        pulled, said = engine_capture(engine, ["pull", image], PULL_TIMEOUT)
        took = time.monotonic() - started
        if not pulled:
            failure = engine_failure(said.encode())
            side, message = failure or ("container", one_line(said) or "the engine said nothing")
            note(f"pulling image {image} failed after {took:.1f}s: {message}")
            raise ImageUnavailable(side, f"image pull failed: {message}")
        note(f"pulled image {image} in {took:.1f}s")
        try:
            write_atomically(self.state.pull_path(self.config.uuid), f"{took:.3f}\n".encode())
        except OSError as e:
            note(f"cannot record the pull time: {e}")

    def _publish(self, pgid: int | None) -> None:
        """Write the lock record, then tell the waiting ``--detach`` that we have started."""
        import json

        record = {
            "uuid": self.config.uuid,
            "pid": os.getpid(),
            "start": proc_start_time("self"),
            "pgid": pgid,
        }
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, json.dumps(record).encode(), 0)
        try:
            os.write(self.ack_fd, b"ok")
        except OSError:
            pass
        os.close(self.ack_fd)

    def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        """Wait for the container, forwarding signals and enforcing max_run_time."""
        now = time.monotonic()
        deadline = now + self.config.max_run_time if self.config.max_run_time > 0 else None
        kill_at: float | None = None
        while True:
            self._forward_pending(proc.pid)
            if has_exited(proc.pid):
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                deadline, kill_at = None, now + self.kill_grace
                self._stop_for_max_run_time(proc.pid)
            if kill_at is not None and now >= kill_at:
                kill_at = None
                self._kill_hard(proc.pid)
            wake_times = [t for t in (deadline, kill_at, self.output.next_flush()) if t is not None]
            timeout = min([30.0, *(t - now for t in wake_times)])
            self._sleep(max(timeout, 0.0))
            self.output.flush()
        # Whatever the container left running in its process group goes with it.
        kill_group(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
        self._drain_output()
        return EXIT_TIMED_OUT if self.timed_out else exit_code(returncode)

    def _sleep(self, timeout: float) -> None:
        """Sleep until output, a signal (SIGCHLD included) or the timeout; copy the output."""
        import select

        ready = select.select([self.wake_r, *self.pipes], [], [], timeout)[0]
        drain(self.wake_r)
        for fd in ready:
            if fd in self.pipes:
                self._read_pipe(fd)

    def _read_pipe(self, fd: int) -> None:
        """Copy what one pipe holds into the log; close it at its end."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.output.feed(self.pipes[fd], data)
            return
        del self.pipes[fd]
        os.close(fd)

    def _drain_output(self) -> None:
        """After the container ended: the rest of its output, to the last line."""
        import select

        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.pipes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd in select.select(list(self.pipes), [], [], remaining)[0]:
                self._read_pipe(fd)
        for fd in self.pipes:
            os.close(fd)
        self.pipes.clear()
        self.output.flush(everything=True)

    def _forward_pending(self, pgid: int) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            note(f"received signal {signum}; passing it to the container")
            kill_group(pgid, signum)

    def _stop_for_max_run_time(self, pgid: int) -> None:
        self.timed_out = True
        note(
            f"max run time of {self.config.max_run_time:g} seconds exceeded; "
            "stopping the container with SIGTERM"
        )
        kill_group(pgid, signal.SIGTERM)

    def _kill_hard(self, pgid: int) -> None:
        note(f"container still running {self.kill_grace:g} seconds after SIGTERM; sending SIGKILL")
        if self.engine is not None:
            # SIGKILL would only kill the engine client and leave the container running.
            engine_call(self.engine, "kill", container_name(self.config.uuid))
        kill_group(pgid, signal.SIGKILL)


def has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it.

    Leaving it a zombie keeps its process group id reserved, so the final SIGKILL to the group
    cannot hit an unrelated group that reused the number.
    """
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def kill_group(pgid: int, signum: int) -> None:
    """Signal a process group that may already be gone."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------- --kill, --log, --forget


def cmd_kill(opts: Options, state: State) -> int:
    """Signal the container; exit 0 once it is gone or never existed (SPEC §11)."""
    uuid = opts.uuid
    lock_path = state.lock_path(uuid)
    if lock_is_free(lock_path):
        return 0
    record = read_record_soon(state, uuid)
    if record is None:
        raise RunnerError(f"{uuid}: lock file holds no process record")
    if not pid_is_supervisor(record):
        warn(f"{uuid}: pid {record.pid}: process is gone")
        return 0
    send_signal(record, opts.signum)
    deadline = time.monotonic() + env_float("HERDER_RUNNER_KILL_WAIT", DEFAULT_KILL_WAIT)
    while time.monotonic() < deadline:
        if lock_is_free(lock_path) or not pid_is_supervisor(record):
            return 0
        time.sleep(0.01)
    raise RunnerError(f"{uuid}: sent signal {opts.signum} to pid {record.pid}, still alive")


def read_record_soon(state: State, uuid: str) -> LockRecord | None:
    """The lock record, waiting briefly for a supervisor that is still writing it."""
    deadline = time.monotonic() + 1.0
    while True:
        record = state.read_lock(uuid)
        if record is not None or time.monotonic() > deadline:
            return record
        time.sleep(0.01)


def send_signal(record: LockRecord, signum: int) -> None:
    """Signal the supervisor, which passes catchable signals on to the container.

    SIGKILL and SIGSTOP cannot be caught and passed on, so they also go straight to the
    container's process group: killing only the supervisor would orphan the container.
    """
    try:
        os.kill(record.pid, signum)
    except ProcessLookupError:
        pass
    # Supervisor first, so a SIGKILL always ends without an exit record (as crunch-run).
    if signum in (signal.SIGKILL, signal.SIGSTOP) and record.pgid:
        kill_group(record.pgid, signum)


def cmd_log(opts: Options, state: State) -> int:
    """Copy the container's log to stdout."""
    try:
        f = open(state.log_path(opts.uuid), "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        if os.path.exists(state.lock_path(opts.uuid)) or os.path.exists(state.exit_path(opts.uuid)):
            return 0  # known, but nothing logged yet
        raise RunnerError(f"{opts.uuid}: no such container") from None
    import shutil

    with f:
        shutil.copyfileobj(f, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


def cmd_forget(opts: Options, state: State) -> int:
    """Delete a finished container's files once the dispatcher has collected its result."""
    uuid = opts.uuid
    if not os.path.isdir(state.dir):
        return 0
    with state.dir_lock():
        fd = open_existing(state.lock_path(uuid))
        try:
            if fd is not None and not try_flock(fd, fcntl.LOCK_EX):
                raise RunnerError(f"{uuid}: still running; kill it first")
            remove(state.exit_path(uuid))
            remove(state.log_path(uuid))
            remove(state.pull_path(uuid))
            remove(state.lock_path(uuid))
        finally:
            if fd is not None:
                os.close(fd)
    return 0


# --------------------------------------------------------------------------- --serve


def cmd_serve(opts: Options, state: State) -> int:
    """Answer requests from stdin until it ends: the resident mode (see the top of the file).

    Supervisors started here are this process's children, so it also learns the moment one
    ends (SIGCHLD) and says so with an unsolicited ``{"event": "exited"}`` line: the dispatcher
    then collects the result at once instead of at its next periodic ``--list``.
    """
    import json
    import select

    # What a supervisor imports, loaded once here so that every fork inherits it.
    import subprocess  # noqa: F401

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    sink = sys.stdout.buffer
    pending = b""
    sent: dict[str, int] = {}
    next_tick = time.monotonic()
    while True:
        ready = select.select([0, wake_r], [], [], max(0.0, next_tick - time.monotonic()))[0]
        if time.monotonic() >= next_tick:
            next_tick = time.monotonic() + LOG_TICK
            for event in follow_logs(state, sent):
                sink.write(json.dumps(event).encode() + b"\n")
            sink.flush()
        if wake_r in ready:
            drain(wake_r)
            if reap_children():
                sink.write(b'{"event": "exited"}\n')
                sink.flush()
        if 0 not in ready:
            continue
        data = os.read(0, 65536)
        if not data:
            reap_children()
            return 0
        pending += data
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            if line.strip():
                sink.write(json.dumps(handle_request(line, opts)).encode() + b"\n")
                sink.flush()


def follow_logs(state: State, sent: dict[str, int]) -> list[dict[str, Any]]:
    """The ``log`` events for what the logs of known containers gained since ``sent``.

    ``sent`` maps uuid to the offset sent so far, and is updated; containers that are gone
    (forgotten) leave it.  At most ``LOG_CHUNK`` bytes per container and ``LOG_TICK_BUDGET``
    in all, so one chatty container cannot flood the channel the verbs share.
    """
    import base64

    try:
        uuids = state.known_uuids()
    except OSError:
        return []
    for uuid in list(sent):
        if uuid not in uuids:
            del sent[uuid]
    events: list[dict[str, Any]] = []
    budget = LOG_TICK_BUDGET
    for uuid in uuids:
        offset = sent.get(uuid, 0)
        try:
            with open(state.log_path(uuid), "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:
                    offset = 0  # a new run of the same container replaced the log
                f.seek(offset)
                data = f.read(min(LOG_CHUNK, budget))
        except OSError:
            continue
        if not data:
            sent[uuid] = offset
            continue
        events.append(
            {
                "event": "log",
                "uuid": uuid,
                "offset": offset,
                "data": base64.b64encode(data).decode(),
            }
        )
        sent[uuid] = offset + len(data)
        budget -= len(data)
        if budget <= 0:
            break
    return events


def drain(fd: int) -> None:
    """Empty a non-blocking pipe."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def reap_children() -> int:
    """Collect supervisors that have ended (forks of a serve process are its children)."""
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


def handle_request(line: bytes, opts: Options) -> dict[str, Any]:
    """Carry out one request line and build its response; a bad request is exit status 2.

    The verb works in the serve process's state and log directories (a request may still name
    others, as a one-shot command may).
    """
    import base64
    import binascii
    import json

    request_id = None
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("a request must be a JSON object")
        request_id = request.get("id")
        argv, data = request.get("argv"), request.get("stdin") or ""
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a list of strings")
        if not isinstance(data, str):
            raise ValueError("stdin must be base64 text")
        stdin = base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error) as e:
        status, out, err = 2, b"", f"herder-runner: bad request: {e}\n".encode()
    else:
        if "--serve" in argv or "-serve" in argv:
            status, out, err = 2, b"", b"herder-runner: --serve cannot be nested\n"
        else:
            dirs = [f"--state-dir={opts.state_dir}", f"--log-dir={opts.log_dir}"]
            status, out, err = run_captured([*dirs, *argv], stdin)
    return {
        "id": request_id,
        "status": status,
        "stdout": base64.b64encode(out).decode(),
        "stderr": base64.b64encode(err).decode(),
    }


def run_captured(argv: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
    """Run one verb as :func:`main` would, with its standard streams in memory."""
    import io

    saved = sys.stdin, sys.stdout, sys.stderr
    raw_out, raw_err = io.BytesIO(), io.BytesIO()
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    sys.stdout = io.TextIOWrapper(raw_out, write_through=True)
    sys.stderr = io.TextIOWrapper(raw_err, write_through=True)
    try:
        try:
            status = main(argv)
        except Exception as e:  # one bad request must not end the serve process
            sys.stderr.write(f"herder-runner: internal error: {e!r}\n")
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        return status, raw_out.getvalue(), raw_err.getvalue()
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved


COMMANDS = {
    "list": cmd_list,
    "detach": cmd_detach,
    "kill": cmd_kill,
    "log": cmd_log,
    "forget": cmd_forget,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--help" in args or "-h" in args:
        sys.stdout.write(USAGE)
        return 0
    try:
        opts = parse_args(args)
    except UsageError as e:
        sys.stderr.write(f"herder-runner: {e}\n{USAGE}")
        return 2
    state = State(opts.state_dir, opts.log_dir)
    try:
        return COMMANDS[opts.verb](opts, state)
    except RunnerError as e:
        warn(str(e))
        return 1
    except OSError as e:
        warn(f"{e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
