"""``herder cloudtest``: a live check of a driver and an account before production (SPEC §15).

With the operator's own configuration it does once, step by step, what the pool does for every
instance: create one instance, wait for the listing to show it, check its tags, wait until the
configured executor can log in (verifying the host key or the instance secret, through the same
:class:`~herder.engine.worker.verify.TagVerifier`),
run the boot probe, deploy the runner agent, run the
runner's ``--list``, optionally run the operator's own command, destroy the instance and wait
until the listing no longer shows it.  Each step is reported with its duration.

What it improves on Arvados' cloudtest, and why:

* The destroy loop has a deadline and sleeps between attempts, also after a listing error
  (Arvados retries forever and spins on list errors, SPEC §19 item 36).
* The instance is destroyed when a step fails *and* when the operator interrupts the run
  (Ctrl-C): the clean-up runs before the interrupt is passed on.
* The runner is deployed and ``--list`` is run, as the pool does, so a cloud image on which
  herder's runner cannot work is found before production, not by the first container.

This is an operator's command, not engine code: it runs its steps one after the other on the
calling thread and waits with an injectable ``sleep``, so tests can make it fast.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from herder.agent import protocol as runner_protocol
from herder.config import Config
from herder.engine.worker.runner import RunnerDeployment
from herder.engine.worker.verify import TagVerifier, init_command
from herder.engine.worker.worker import (
    TAG_IDLE_BEHAVIOR,
    TAG_INSTANCE_SECRET,
    TAG_INSTANCE_SET_ID,
    TAG_INSTANCE_TYPE,
)
from herder.model import IdleBehavior, InstanceType
from herder.plugin.bootprobe import BootProbe
from herder.plugin.cloud import Driver, DriverContext, Instance, InstanceSet
from herder.plugin.executor import Executor
from herder.plugin.registry import Plugins
from herder.runtime import Runtime, ThreadRuntime
from herder.ssh.bastion import ConnectReport

log = logging.getLogger("herder.tools.cloudtest")

#: The instance-set id cloudtest uses unless told otherwise: never the one ``serve`` uses, so
#: a test never adopts or destroys production instances, nor the other way round.
DEFAULT_INSTANCE_SET_ID = "zzzzz-zzzzz-zzzzzzcloudtest"
#: Tag naming the process that created a test instance (SPEC §15), to find who left one behind.
TAG_CLOUDTEST_PID = "CloudTestPID"


class CloudtestError(Exception):
    """cloudtest cannot start (bad arguments or configuration); nothing was created."""


class StepFailed(Exception):
    """A step did not pass; the message says why."""


@dataclass
class Step:
    """One step's outcome: ``ok`` None means it did not run (an earlier step failed)."""

    name: str
    ok: bool | None = None
    duration: float = 0.0
    detail: str = ""

    @property
    def status(self) -> str:
        return {True: "ok", False: "FAILED", None: "skipped"}[self.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "status": self.status,
            "duration": round(self.duration, 3),
            "detail": self.detail,
        }


@dataclass
class CloudtestReport:
    """Everything cloudtest did, in order."""

    driver: str
    instance_set_id: str
    instance_type: str
    steps: list[Step] = field(default_factory=list)
    instance_id: str = ""
    interrupted: bool = False
    #: How the SSH step reached the instance (bastion, hops and their seconds), when known.
    ssh_route: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """True only if every step ran and passed."""
        return not self.interrupted and bool(self.steps) and all(s.ok for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "driver": self.driver,
            "instance_set_id": self.instance_set_id,
            "instance_type": self.instance_type,
            "instance_id": self.instance_id,
            "interrupted": self.interrupted,
            "ssh_route": self.ssh_route,
            "steps": [s.to_json() for s in self.steps],
        }


#: The steps in the order they run; the report lists every one, run or not.
STEP_NAMES = (
    "instance set",
    "existing instances",
    "create",
    "listed",
    "tags",
    "ssh",
    "boot probe",
    "deploy runner",
    "runner --list",
    "command",
    "destroy",
    "gone",
)


def choose_instance_type(types: Mapping[str, InstanceType], name: str | None) -> InstanceType:
    """The named type, or the cheapest configured one (ties: by name)."""
    if not types:
        raise CloudtestError("no instance types are configured")
    if name:
        if name not in types:
            raise CloudtestError(
                f"requested instance type {name!r} is not configured "
                f"(configured: {', '.join(sorted(types))})"
            )
        return types[name]
    return min(types.values(), key=lambda it: (it.price, it.name))


class CloudTest:
    """One run of cloudtest.  Build it, call :meth:`run`, read the report.

    ``driver``, ``executor_factory`` and ``boot_probe`` replace what the configuration would
    select (for embedding and tests); ``public_key`` is the key instances let log in (default:
    derived from ``containers.dispatch_private_key``).  ``timeout`` bounds each waiting step
    (default: ``cloud.timeout_booting``); ``interval`` is the pause between attempts (default:
    the smaller of ``cloud.probe_interval`` and ``cloud.sync_interval``).
    """

    def __init__(
        self,
        config: Config,
        *,
        plugins: Plugins | None = None,
        instance_type: str | None = None,
        instance_set_id: str = DEFAULT_INSTANCE_SET_ID,
        image_id: str | None = None,
        destroy_existing: bool = False,
        command: str = "",
        timeout: float | None = None,
        interval: float | None = None,
        driver: Driver | None = None,
        executor_factory: Callable[[Instance], Executor] | None = None,
        boot_probe: BootProbe | None = None,
        public_key: str | None = None,
        runner_data: bytes | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_step: Callable[[Step], None] | None = None,
    ) -> None:
        self.config = config
        self.plugins = plugins
        self.instance_set_id = instance_set_id
        self.image_id = config.cloud.image_id if image_id is None else image_id
        self.destroy_existing = destroy_existing
        self.command = command
        cloud = config.cloud
        self.timeout = cloud.timeout_booting if timeout is None else timeout
        self.interval = (
            min(cloud.probe_interval, cloud.sync_interval) if interval is None else interval
        )
        self._driver = driver
        self._executor_factory = executor_factory
        self._boot_probe = boot_probe
        self._public_key = public_key
        self._runner_data = runner_data
        self._sleep = sleep
        self._clock = clock
        self._on_step = on_step
        self._secret = secrets.token_hex(20)
        self._runtime: Runtime | None = None
        self._instance_set: InstanceSet | None = None
        self._instance: Instance | None = None
        self._executor: Executor | None = None
        self.instance_types = self._instance_types()
        self.instance_type = choose_instance_type(self.instance_types, instance_type)
        self.report = CloudtestReport(
            driver=cloud.driver,
            instance_set_id=instance_set_id,
            instance_type=self.instance_type.name,
            steps=[Step(name) for name in STEP_NAMES],
        )

    # ----------------------------------------------------------------- set-up

    def _plugins(self) -> Plugins:
        if self.plugins is None:
            self.plugins = Plugins.load()
        return self.plugins

    def _driver_obj(self) -> Driver:
        if self._driver is None:
            self._driver = self._plugins().driver_class(self.config.cloud.driver)()
        return self._driver

    def _instance_types(self) -> dict[str, InstanceType]:
        """Configured types, else the driver's defaults (as ``serve`` does)."""
        configured = self.config.build_instance_types()
        if configured:
            return configured
        driver = self._driver_obj()
        params = driver.validate_parameters(self.config.cloud.driver_parameters)
        return driver.default_instance_types(params)

    def tag(self, name: str) -> str:
        return self.config.cloud.tag_key_prefix + name

    def owner_tags(self) -> dict[str, str]:
        return {self.tag(TAG_INSTANCE_SET_ID): self.instance_set_id}

    def expected_tags(self) -> dict[str, str]:
        """What the test instance is created with: the pool's tags plus the test's PID."""
        return {
            **self.config.cloud.resource_tags,
            self.tag(TAG_CLOUDTEST_PID): str(os.getpid()),
            self.tag(TAG_INSTANCE_SET_ID): self.instance_set_id,
            self.tag(TAG_INSTANCE_TYPE): self.instance_type.name,
            self.tag(TAG_IDLE_BEHAVIOR): IdleBehavior.RUN.value,
            self.tag(TAG_INSTANCE_SECRET): self._secret,
        }

    # ----------------------------------------------------------------- running

    def run(self) -> CloudtestReport:
        """Run every step; destroy whatever was created, whatever happens.

        A KeyboardInterrupt is recorded (``report.interrupted``), the instance is destroyed,
        and the report is returned: the caller decides how to exit.
        """
        try:
            self._run_steps()
        except KeyboardInterrupt:
            self.report.interrupted = True
            log.warning("interrupted: destroying what was created")
        finally:
            self._clean_up()
        return self.report

    def _run_steps(self) -> None:
        ok = (
            self._step("instance set", self._make_instance_set)
            and self._step("existing instances", self._check_existing)
            and self._step("create", self._create)
        )
        if not ok:
            return
        # Each check below needs the ones before it; a failure skips the rest but the
        # instance is still destroyed.
        for name, action in (
            ("listed", self._wait_listed),
            ("tags", self._check_tags),
            ("ssh", self._wait_ssh),
            ("boot probe", self._wait_boot_probe),
            ("deploy runner", self._deploy_runner),
            ("runner --list", self._runner_list),
            ("command", self._run_command),
        ):
            if not self._step(name, action):
                return

    def _clean_up(self) -> None:
        try:
            if self._instance is None and self._step_ran("create"):
                self._instance = self._created_despite_error()
            if self._instance is not None and self._step("destroy", self._destroy):
                self._step("gone", self._wait_gone)
        except KeyboardInterrupt:
            self.report.interrupted = True
            log.error("interrupted again: %s may still exist", self.report.instance_id)
        finally:
            if self._executor is not None:
                self._executor.close()
            if self._instance_set is not None:
                try:
                    self._instance_set.stop()
                except Exception as exc:
                    log.warning("stopping the instance set: %s", exc)
            if isinstance(self._runtime, ThreadRuntime):
                self._runtime.shutdown()

    def _step_ran(self, name: str) -> bool:
        return any(s.name == name and s.ok is not None for s in self.report.steps)

    def _created_despite_error(self) -> Instance | None:
        """An instance carrying our secret although create failed (or was interrupted).

        A create call can fail after the cloud accepted it (a timeout, a lost reply); Arvados'
        cloudtest waits for such an instance to appear.  One listing is enough to catch the
        common case without making a failed run wait for the whole boot timeout.
        """
        secret_tag = self.tag(TAG_INSTANCE_SECRET)
        try:
            for instance in self._listing():
                if instance.tags.get(secret_tag) == self._secret:
                    self.report.instance_id = instance.id
                    return instance
        except Exception as exc:
            log.warning("cannot look for an instance the failed create made: %s", exc)
        return None

    def _step(self, name: str, action: Callable[[], str]) -> bool:
        """Run one step, recording its outcome and duration; True if it passed."""
        step = next(s for s in self.report.steps if s.name == name)
        start = self._clock()
        try:
            step.detail = action()
            step.ok = True
        except StepFailed as exc:
            step.ok, step.detail = False, str(exc)
        except KeyboardInterrupt:
            step.ok, step.detail = False, "interrupted"
            step.duration = self._clock() - start
            self._emit(step)
            raise
        except Exception as exc:
            step.ok, step.detail = False, f"{type(exc).__name__}: {exc}"
        step.duration = self._clock() - start
        self._emit(step)
        return bool(step.ok)

    def _emit(self, step: Step) -> None:
        """Report a finished step once: through ``on_step`` when given (the CLI prints it),
        else in the log.  Both would print every step twice on stderr."""
        if self._on_step is not None:
            log.debug("%s: %s in %.1fs %s", step.name, step.status, step.duration, step.detail)
            self._on_step(step)
            return
        level = logging.INFO if step.ok else logging.ERROR
        log.log(level, "%s: %s in %.1fs %s", step.name, step.status, step.duration, step.detail)

    def _wait(self, what: str, attempt: Callable[[], str | None]) -> str:
        """Call ``attempt`` until it returns a detail string or the timeout passes.

        ``attempt`` returns None to try again; an exception counts as a failed attempt (its
        message is kept for the report).
        """
        deadline = self._clock() + self.timeout
        last = "no attempt made"
        while True:
            try:
                result = attempt()
            except Exception as exc:
                result, last = None, f"{type(exc).__name__}: {exc}"
            if result is not None:
                return result
            if self._clock() >= deadline:
                raise StepFailed(f"{what} within {self.timeout:g}s (last: {last})")
            self._sleep(self.interval)

    # ----------------------------------------------------------------- steps

    def _make_instance_set(self) -> str:
        driver = self._driver_obj()
        cloud = self.config.cloud
        params = driver.validate_parameters(cloud.driver_parameters)
        self._runtime = ThreadRuntime(max_workers=4)
        self._instance_set = driver.instance_set(
            params,
            DriverContext(
                instance_set_id=self.instance_set_id,
                shared_resource_tags=dict(cloud.resource_tags),
                logger=logging.getLogger(f"herder.driver.{cloud.driver}"),
                metrics_registry=None,  # as Arvados' cloudtest: nothing scrapes it
                runtime=self._runtime,
                tag_key_prefix=cloud.tag_key_prefix,
            ),
        )
        return f"driver {cloud.driver}"

    def _listing(self) -> list[Instance]:
        """Our instances (the driver may pre-filter; herder filters again, as the pool does)."""
        assert self._instance_set is not None
        owner = self.owner_tags()
        return [
            i
            for i in self._instance_set.instances(owner)
            if all(i.tags.get(k) == v for k, v in owner.items())
        ]

    def _check_existing(self) -> str:
        existing = self._listing()
        if not existing:
            return "none"
        ids = ", ".join(sorted(i.id for i in existing))
        if not self.destroy_existing:
            raise StepFailed(
                f"cannot continue with existing instances tagged with instance set id "
                f"{self.instance_set_id}: {ids} (use --destroy-existing to destroy them)"
            )
        for instance in existing:
            instance.destroy()
        remaining = {i.id for i in existing}

        def all_gone() -> str | None:
            listed = {i.id for i in self._listing()} & remaining
            return None if listed else f"destroyed {ids}"

        return self._wait("existing instances did not go away", all_gone)

    def _create(self) -> str:
        assert self._instance_set is not None
        cloud = self.config.cloud
        instance = self._instance_set.create(
            self.instance_type,
            self.image_id,
            self.expected_tags(),
            init_command(self._secret, cloud.instance_init_command),
            self._public_key_line() if cloud.deploy_public_key else None,
        )
        self._instance = instance
        self.report.instance_id = instance.id
        return f"{instance.id} ({self.instance_type.name}, {instance.provider_type})"

    def _public_key_line(self) -> str | None:
        if self._public_key is not None:
            return self._public_key
        path = self.config.containers.dispatch_private_key
        if not path:
            return None
        from herder.engine.cloud_engine import public_key_from_private

        return public_key_from_private(path)

    def _refresh(self) -> Instance | None:
        """The instance as the latest listing shows it (address and tags may be new)."""
        assert self._instance is not None
        for instance in self._listing():
            if instance.id == self._instance.id:
                self._instance = instance
                if self._executor is not None:
                    self._executor.set_target(self._verifier(instance))
                return instance
        return None

    def _wait_listed(self) -> str:
        def listed() -> str | None:
            return "listed" if self._refresh() is not None else None

        return self._wait("the new instance was not listed", listed)

    def _check_tags(self) -> str:
        assert self._instance is not None
        tags = self._instance.tags
        wrong = {k: (tags.get(k), v) for k, v in self.expected_tags().items() if tags.get(k) != v}
        if wrong:
            described = (
                ", ".join(
                    f"{k}={got!r} (expected {want!r})"
                    for k, (got, want) in sorted(wrong.items())
                    if k != self.tag(TAG_INSTANCE_SECRET)
                )
                or "the instance secret tag is wrong"
            )
            raise StepFailed(f"tags not as created: {described}")
        return f"{len(tags)} tags as created"

    def _verifier(self, instance: Instance) -> TagVerifier:
        return TagVerifier(instance, self._secret, timeout=self.config.cloud.timeout_command)

    def _make_executor(self) -> Executor:
        assert self._instance is not None and self._instance_set is not None
        target = self._verifier(self._instance)
        if self._executor_factory is not None:
            return self._executor_factory(target)
        factory = self._driver_obj().executor_factory(self._instance_set)
        if factory is not None:
            return factory(target)
        cls = self._plugins().executor_class(self.config.cloud.executor)
        if self._runtime is None:
            self._runtime = ThreadRuntime(max_workers=4)
        executor: Executor = cls(target, self.config, self._runtime)
        return executor

    def _wait_ssh(self) -> str:
        self._executor = self._make_executor()
        executor = self._executor

        def connected() -> str | None:
            self._refresh()
            executor.execute("true", None, None, self.config.cloud.timeout_command)
            assert self._instance is not None
            where = f"{self._instance.remote_user}@{self._instance.address}"
            # The SSH executor says how it got there: through which bastion, each hop's time.
            route: ConnectReport | None = getattr(executor, "last_connect", None)
            if isinstance(route, ConnectReport):
                self.report.ssh_route = route.to_json()
                return f"{where} {route.describe()}"
            return where

        return self._wait("could not run a command on the instance", connected)

    def _probe(self) -> BootProbe:
        if self._boot_probe is None:
            cls = self._plugins().boot_probe_class(self.config.cloud.boot_probe)
            self._boot_probe = cls(self.config.cloud.boot_probe_command)
        self._boot_probe.bind(self.config)
        return self._boot_probe

    def _wait_boot_probe(self) -> str:
        probe, executor = self._probe(), self._executor
        assert executor is not None
        details: list[str] = []

        def booted() -> str | None:
            instance = self._refresh() or self._instance
            assert instance is not None
            ok, detail = probe.probe(executor, instance)
            details.append(detail.strip())
            return "booted" if ok else None

        try:
            return self._wait("the boot probe did not succeed", booted)
        except StepFailed as exc:
            last = next((d for d in reversed(details) if d), "")
            raise StepFailed(f"{exc}; probe output: {last[-500:]}" if last else str(exc)) from None

    def _runner(self) -> RunnerDeployment:
        cloud = self.config.cloud
        data = self._runner_data
        if data is None and cloud.deploy_runner:
            from herder.engine.cloud_engine import load_runner_binary

            data = load_runner_binary(self.config).data
        return RunnerDeployment.build(
            data if cloud.deploy_runner else None,
            cloud.deploy_runner_directory,
            self.config.containers.runner_command,
        )

    def _execute(self, command: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        assert self._executor is not None
        result = self._executor.execute(command, stdin, None, self.config.cloud.timeout_command)
        return result.exit_status, result.stdout, result.stderr

    def _deploy_runner(self) -> str:
        """Install the runner as the pool does: md5 check, then install from stdin (SPEC §3.7)."""
        runner = self._runner()
        if not runner.deploying:
            return f"not deploying; using {runner.command}"
        assert self._instance is not None
        status, stdout, stderr = self._execute(runner.md5_check_command(self._instance.remote_user))
        if status == 0 and not stderr and stdout == runner.md5_expected_output():
            return f"{runner.command} already installed"
        status, _, stderr = self._execute(
            runner.install_command(self._instance.remote_user), runner.data
        )
        if status != 0:
            raise StepFailed(f"installing {runner.command} exited {status}: {_text(stderr)}")
        status, stdout, stderr = self._execute(runner.md5_check_command(self._instance.remote_user))
        if status != 0 or stdout != runner.md5_expected_output():
            raise StepFailed(
                f"md5 check after installing {runner.command} failed: "
                f"{_text(stdout)} {_text(stderr)}"
            )
        return f"installed {runner.command}"

    def _runner_list(self) -> str:
        assert self._instance is not None
        runner = self._runner()
        command = runner_protocol.list_command(runner.command, self._instance.remote_user)
        status, stdout, stderr = self._execute(command)
        if status != 0:
            raise StepFailed(f"{command!r} exited {status}: {_text(stderr)}")
        parsed = runner_protocol.parse_list_output(
            stdout.decode(errors="replace"), self.config.cluster_id
        )
        if parsed.broken:
            raise StepFailed("the runner reports this instance as broken")
        count = len(parsed.running) + len(parsed.stale) + len(parsed.exited)
        return f"{count} containers listed"

    def _run_command(self) -> str:
        if not self.command:
            return "no --command given"
        status, stdout, stderr = self._execute(self.command)
        if status != 0:
            raise StepFailed(f"exited {status}: {_text(stderr)}")
        return _text(stdout)[-200:]

    def _destroy(self) -> str:
        assert self._instance is not None
        instance = self._instance

        def destroyed() -> str:
            instance.destroy()
            return "destroy requested"

        return self._wait("could not destroy the instance", destroyed)

    def _wait_gone(self) -> str:
        assert self._instance is not None
        instance_id = self._instance.id

        def gone() -> str | None:
            return None if instance_id in {i.id for i in self._listing()} else "gone"

        return self._wait(f"{instance_id} was still listed", gone)


def _text(data: bytes) -> str:
    return data.decode(errors="replace").strip()
