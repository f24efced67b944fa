"""The state of one simulated cloud: its instances, the container processes on them, the clock.

Everything is evaluated lazily against the clock instead of with timers: an instance has booted
when ``now >= boot_at``, a process is alive while ``now < end``.  Each process knows every way
it can end (its command finishing, ``max_run_time``, a runner crash, a SIGTERM, its instance
going away) and ends at the earliest, so "is it alive now?" is exact at any moment without a
timer having fired.  A small event heap, drained at the start of every call (:meth:`settle`),
only does the bookkeeping (counting completions, billing instances that left) at the right
simulated times.

One :class:`SimCloud` is shared by every instance set a driver builds, as a cloud account is
shared by every dispatcher that uses it: a restarted dispatcher sees (and adopts) the instances
of the previous one.  All state is guarded by :attr:`SimCloud.lock`.  With a state file
(:mod:`herder.testing.sim_store`) the account also outlives the process that holds it.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from herder.model import Billing, InstanceType
from herder.plugin.cloud import HostKey
from herder.runtime import Runtime
from herder.testing.sim_params import SimParameters, draw_delay
from herder.testing.sim_stats import DoubleRun, SimStats

#: Exit code the runner records when ``max_run_time`` stops a container (as timeout(1) does).
TIMEOUT_EXIT_CODE = 124
#: How long ``--kill`` waits for the process to go before reporting failure (crunch-run: 1 s).
KILL_WAIT = 1.0

#: ``echo -n "<text>" >/path`` lines of an init command, e.g. the instance secret line.
_ECHO_TO_FILE_RE = re.compile(
    r"""echo\s+-n\s+(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^\s"'>;&|]+))"""
    r"""\s*>\s*"?(?P<path>/[^\s";&|]+)"?"""
)


def init_command_files(init_command: str) -> dict[str, bytes]:
    """Files an init command writes with ``echo -n "..." >path`` (the instance secret)."""
    files: dict[str, bytes] = {}
    for m in _ECHO_TO_FILE_RE.finditer(init_command):
        text = m.group("dq") if m.group("dq") is not None else m.group("sq") or m.group("bare")
        files[m.group("path")] = (text or "").encode()
    return files


@dataclass(eq=False)
class SimProcess:
    """One simulated container process (one ``--detach``) on one instance."""

    uuid: str
    pid: int
    vm: SimVM
    command: tuple[str, ...]
    started_at: float
    #: Every way this process can end: (time, exit code or None for "no exit code", cause).
    endings: list[tuple[float, int | None, str]]
    stale_lock: bool = False
    term_at: float | None = None
    forgotten: bool = False
    settled: bool = False

    @property
    def end(self) -> tuple[float, int | None, str]:
        """The ending that happens first (earlier-added wins a tie)."""
        return min(self.endings, key=lambda e: e[0])

    @property
    def end_at(self) -> float:
        return self.end[0]

    @property
    def exit_code(self) -> int | None:
        return self.end[1]

    def alive(self, now: float) -> bool:
        return now < self.end_at

    def lock_held(self, now: float) -> bool:
        """The runner's lock is held while the process lives, and forever if it went stale."""
        return self.alive(now) or (self.stale_lock and self.exit_code is not None)

    def add_ending(self, at: float, exit_code: int | None, cause: str) -> bool:
        """Record another way to end; True if it ends the process earlier than before."""
        before = self.end_at
        self.endings.append((at, exit_code, cause))
        return self.end_at < before

    def log_text(self, now: float) -> str:
        lines = [
            f"{self.started_at:.3f} sim: {self.uuid} started on {self.vm.id} (pid {self.pid}): "
            f"{' '.join(self.command)}"
        ]
        if self.term_at is not None:
            lines.append(f"{self.term_at:.3f} sim: received SIGTERM")
        if not self.alive(now):
            at, code, cause = self.end
            if code is None:
                lines.append(f"{at:.3f} sim: process lost ({cause}), no exit code")
            else:
                lines.append(f"{at:.3f} sim: exited with code {code} ({cause})")
        return "\n".join(lines) + "\n"


def sim_billing(params: SimParameters) -> Billing:
    """The billing the simulated cloud applies (and reports) for every instance type."""
    return Billing(params.billing_increment, params.billing_minimum)


@dataclass(eq=False)
class SimVM:
    """One simulated instance, as the cloud knows it (listings hand out snapshots of it)."""

    id: str
    instance_type: InstanceType
    image_id: str
    tags: dict[str, str]
    init_command: str
    public_key: str | None
    params: SimParameters
    address: str
    created_at: float
    address_at: float
    boot_at: float
    broken_at: float
    vanish_at: float
    host_key: HostKey
    destroyed_at: float | None = None
    gone_at: float = math.inf
    broken_reported: bool = False
    #: [start, end) of a time the instance does not answer though it runs and stays listed
    #: (a network partition): its processes go on, and their results wait to be collected.
    silent: tuple[float, float] = (math.inf, math.inf)
    files: dict[str, bytes] = field(default_factory=dict)
    procs: dict[str, SimProcess] = field(default_factory=dict)
    prices: bytes = b""

    @property
    def remote_user(self) -> str:
        return self.params.remote_user

    @property
    def billing(self) -> Billing:
        """How the simulated cloud bills this instance: its parameters, not herder's belief."""
        return sim_billing(self.params)

    def listed(self, now: float) -> bool:
        """Still in the cloud's listing (booting, running or shutting down)."""
        return now < self.gone_at

    def reachable(self, now: float) -> bool:
        """Running (not destroyed, not vanished) and answering (not in its silent time)."""
        if self.silent[0] <= now < self.silent[1]:
            return False
        return self.destroyed_at is None and now < self.vanish_at and now < self.gone_at

    def booted(self, now: float) -> bool:
        return now >= self.boot_at

    def current_address(self, now: float) -> str:
        running = self.destroyed_at is None and now < self.vanish_at and now < self.gone_at
        return self.address if now >= self.address_at and running else ""

    def broken(self, now: float) -> bool:
        return now >= self.broken_at


class SimCloud:
    """One simulated cloud account: instances, processes, clock, random draws and statistics."""

    def __init__(
        self, seed: int = 0, runtime: Runtime | None = None, state_file: str | None = None
    ) -> None:
        self.lock: AbstractContextManager[Any] = threading.RLock()
        self.seed = seed
        self.runtime = runtime
        self._clock: Callable[[], float] = runtime.now if runtime is not None else time.time
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._pids = itertools.count(1000)
        self._seq = itertools.count()
        self._vms: dict[str, SimVM] = {}
        self._live: dict[str, list[SimProcess]] = {}
        self._events: list[tuple[float, int, SimVM | SimProcess]] = []
        self._stats = SimStats(cloud=self)
        if state_file is not None:
            # Imported here: a cloud without a state file needs none of it.
            from herder.testing.sim_store import SimStore

            store = SimStore(state_file)
            store.load(self)
            self.lock = store.saving_lock(self)

    # ------------------------------------------------------------------ clock and draws

    def now(self) -> float:
        return self._clock()

    def roll(self, rate: float) -> bool:
        """True with probability ``rate`` (caller holds the lock: one generator, one order)."""
        return rate > 0 and self._rng.random() < rate

    def uniform(self, low: float, high: float) -> float:
        return self._rng.uniform(low, high)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def stats(self) -> SimStats:
        """The cloud's live statistics (counters change under :attr:`lock`)."""
        return self._stats

    def fault(self, kind: str) -> None:
        self._stats.faults[kind] += 1

    def call(self, kind: str, outcome: str) -> None:
        self._stats.calls[(kind, outcome)] += 1

    def live_instance_time(self, now: float) -> list[tuple[str, float, float]]:
        """What the instances still listed have cost so far (billed up to ``now``)."""
        return [
            (
                vm.instance_type.name,
                vm.billing.billed_seconds(min(now, vm.gone_at) - vm.created_at),
                vm.instance_type.price,
            )
            for vm in self._vms.values()
        ]

    def all_vms(self) -> list[SimVM]:
        """Every instance the cloud still knows, listed or not (for persistence)."""
        return list(self._vms.values())

    def rng_state(self) -> object:
        """The state of the cloud's random generator (for persistence)."""
        return self._rng.getstate()

    def restore(self, vms: list[SimVM], stats: SimStats, rng_state: object) -> None:
        """Replace the whole state by a saved one, re-deriving what follows from it.

        Ids continue after the last ones handed out (one per instance created, one pid per
        process started), so a restored cloud never reuses one.  The event heap is rebuilt from
        the instances and the processes not yet settled; the next :meth:`settle` catches up
        with everything that happened since the state was saved, as if the cloud had run on.
        """
        self._vms = {vm.id: vm for vm in vms}
        stats.cloud = self
        self._stats = stats
        self._rng.setstate(rng_state)  # type: ignore[arg-type]
        self._ids = itertools.count(stats.created + 1)
        self._pids = itertools.count(1000 + stats.container_starts)
        self._live = {}
        self._events = []
        for vm in vms:
            if vm.gone_at < math.inf:
                self._push(vm.gone_at, vm)
        for vm in vms:
            for proc in vm.procs.values():
                if not proc.settled:
                    self._live.setdefault(proc.uuid, []).append(proc)
                    self._push(proc.end_at, proc)

    def _push(self, at: float, item: SimVM | SimProcess) -> None:
        heapq.heappush(self._events, (at, next(self._seq), item))

    def settle(self, now: float) -> None:
        """Do the bookkeeping of every event due by ``now``, in time order."""
        while self._events and self._events[0][0] <= now:
            at, _, item = heapq.heappop(self._events)
            if isinstance(item, SimProcess):
                if not item.settled and at == item.end_at:
                    self._settle_process(item)
            elif item.id in self._vms and at == item.gone_at:
                self._remove_vm(item)

    def _settle_process(self, proc: SimProcess) -> None:
        proc.settled = True
        live = self._live.get(proc.uuid, [])
        if proc in live:
            live.remove(proc)
        if not live:
            self._live.pop(proc.uuid, None)
        _, code, cause = proc.end
        if code is None:
            self._stats.container_crashes += 1
            if cause == "runner_crash":
                self.fault("runner_crash")
            return
        self._stats.container_completions += 1
        self._stats.exit_codes[code] += 1
        if cause == "killed":
            self._stats.container_kills += 1
        if proc.stale_lock:
            self.fault("stale_lock")

    def _remove_vm(self, vm: SimVM) -> None:
        del self._vms[vm.id]
        if vm.destroyed_at is None:
            self._stats.disappeared += 1
            self.fault("disappear")
        it = vm.instance_type
        self._stats.bill_gone(
            it.name, vm.billing.billed_seconds(vm.gone_at - vm.created_at), it.price
        )

    # ------------------------------------------------------------------ instances

    def listed_vms(self, now: float) -> list[SimVM]:
        return [vm for vm in self._vms.values() if vm.listed(now)]

    def vm(self, vm_id: str) -> SimVM | None:
        return self._vms.get(vm_id)

    def listed_count(self, now: float, provider_type: str | None = None) -> int:
        """Listed instances (of ``provider_type`` if given): what quota and capacity count."""
        return sum(
            1
            for vm in self._vms.values()
            if vm.listed(now) and provider_type in (None, vm.instance_type.provider_type)
        )

    def add_vm(
        self,
        params: SimParameters,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
        now: float,
    ) -> SimVM:
        """A new instance, its fate (boot time, faults) drawn from its own seeded generator."""
        n = next(self._ids)
        vm_id = f"sim-{n}"
        fate = random.Random(f"{self.seed}:{vm_id}")
        boot_delay = draw_delay(fate, params.boot_delay)
        boot_at = now + boot_delay
        if fate.random() < params.never_boot_rate:
            boot_at = math.inf
            self.fault("never_boot")
        broken_at = math.inf
        if fate.random() < params.broken_rate:
            broken_at = boot_at + draw_delay(fate, params.broken_after)
        vanish_at = math.inf
        if fate.random() < params.disappear_rate:
            vanish_at = now + draw_delay(fate, params.disappear_after)
        vm = SimVM(
            id=vm_id,
            instance_type=instance_type,
            image_id=image_id,
            tags=dict(tags),
            init_command=init_command,
            public_key=public_key,
            params=params,
            address=f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}",
            created_at=now,
            address_at=now + min(draw_delay(fate, params.address_delay), boot_delay),
            boot_at=boot_at,
            broken_at=broken_at,
            vanish_at=vanish_at,
            host_key=HostKey(
                "ssh-ed25519", hashlib.sha256(f"{self.seed}:{vm_id}:hostkey".encode()).digest()
            ),
            gone_at=vanish_at,
            files=init_command_files(init_command),
        )
        self._vms[vm_id] = vm
        if vanish_at < math.inf:
            self._push(vanish_at, vm)
        self._stats.created += 1
        self._stats.peak_alive = max(self._stats.peak_alive, len(self._vms))
        return vm

    def destroy_vm(self, vm: SimVM, now: float) -> None:
        """Terminate: processes die at once (no exit code); listed for ``destroy_delay`` more."""
        if vm.destroyed_at is not None or not vm.listed(now):
            return
        vm.destroyed_at = now
        self._stats.destroyed += 1
        for proc in vm.procs.values():
            if proc.alive(now):
                self._end_process(proc, now, None, "instance_destroyed")
        vm.gone_at = min(vm.gone_at, now + draw_delay(self._rng, vm.params.destroy_delay))
        self._push(vm.gone_at, vm)
        self.settle(now)

    # ------------------------------------------------------------------ processes

    def live_processes(self, uuid: str, now: float) -> list[SimProcess]:
        """Processes of ``uuid`` alive at ``now`` on any instance."""
        return [p for p in self._live.get(uuid, []) if p.alive(now)]

    def start_process(
        self,
        vm: SimVM,
        uuid: str,
        command: tuple[str, ...],
        max_run_time: float,
        now: float,
    ) -> SimProcess:
        """Start a container process on ``vm``, recording a double run if one is alive elsewhere.

        The caller has already refused a start whose lock is held on ``vm`` itself.
        """
        others = self.live_processes(uuid, now)
        if others:
            self._stats.double_run_details.append(
                DoubleRun(uuid, now, vm.id, tuple(p.vm.id for p in others))
            )
        duration, code = planned_run(command)
        endings: list[tuple[float, int | None, str]] = [(now + duration, code, "exit")]
        if max_run_time > 0 and max_run_time < duration:
            endings.append((now + max_run_time, TIMEOUT_EXIT_CODE, "max_run_time"))
        if self.roll(vm.params.runner_crash_rate):
            endings.append((now + self.uniform(0.0, duration), None, "runner_crash"))
        if vm.vanish_at < math.inf:
            endings.append((vm.vanish_at, None, "instance_gone"))
        proc = SimProcess(
            uuid=uuid,
            pid=next(self._pids),
            vm=vm,
            command=command,
            started_at=now,
            endings=endings,
            stale_lock=self.roll(vm.params.stale_lock_rate),
        )
        vm.procs[uuid] = proc
        self._live.setdefault(uuid, []).append(proc)
        self._stats.container_starts += 1
        self._push(proc.end_at, proc)
        return proc

    def terminate_process(self, proc: SimProcess, signal: int, now: float) -> None:
        """Deliver a signal: the process exits ``kill_delay`` later with 128+signal."""
        if proc.term_at is not None or not proc.alive(now):
            return
        proc.term_at = now
        delay = proc.vm.params.kill_delay
        self._end_process(proc, now if delay <= KILL_WAIT else now + delay, 128 + signal, "killed")

    def _end_process(self, proc: SimProcess, at: float, code: int | None, cause: str) -> None:
        if proc.add_ending(at, code, cause):
            self._push(proc.end_at, proc)
        self.settle(self.now())


def planned_run(command: tuple[str, ...]) -> tuple[float, int]:
    """How long a container command runs and its exit code.

    ``sleep <seconds>`` exits 0 after that long; ``sim <seconds> <code>`` exits with ``code``;
    a malformed one of those exits 1 at once, as the real command would; anything else runs
    for one second and exits 0.
    """
    try:
        if len(command) == 2 and command[0] == "sleep":
            return max(0.0, float(command[1])), 0
        if len(command) == 3 and command[0] == "sim":
            return max(0.0, float(command[1])), int(command[2])
    except ValueError:
        return 0.0, 1
    return 1.0, 0
