"""How the pool talks to the cloud: throttles, a rate limiter and the driver wrapper stack.

SPEC §2 and §5.2.  Three separate concerns keep the pool from hammering a provider:

* :class:`CloudCallThrottle` remembers a provider's "rate limited until T" answer for one kind
  of call (create, list) and refuses that kind of call until T, so no request is sent before
  the provider said it would accept one.
* :class:`SlotLimiter` spaces calls at most ``per_second`` apart.  Arvados makes each call wait
  for the next tick of a shared ticker; herder never sleeps in engine code, so instead each call
  *reserves* the next free start time and is scheduled with :meth:`Runtime.call_at`.  That works
  the same on the wall clock and on a virtual one.  Like the ticker, idle time earns no burst
  credit: a reservation is never earlier than now.
* :func:`wrap_instance_set` builds the synchronous wrappers of SPEC §2: counting every operation
  (``herder_driver_operations``), merging the configured resource tags under the caller's tags on
  create, and dropping listed instances that lack any requested tag (drivers may over-return).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from herder.model import InstanceType
from herder.plugin.cloud import (
    DelegatingInstance,
    Instance,
    InstanceSet,
    Quota,
    RateLimitError,
)
from herder.runtime import Runtime, Task

log = logging.getLogger(__name__)


class CloudThrottled(Exception):
    """Calls of one kind are suspended because the provider asked us to back off."""


class CloudCallThrottle:
    """Suspends one kind of cloud call until a time the provider named (SPEC §5.2).

    (Named apart from :class:`herder.dispatch.Throttle`, the SDK's retry period per container.)

    The retry time itself is allowed: Arvados clears the error only strictly *after* it, so a
    wake-up scheduled exactly at the retry time would find the throttle still set and nothing
    would wake the scheduler again.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self._err: Exception | None = None
        self._until = 0.0

    def error_until(
        self, err: Exception, until: float, notify: Callable[[], None] | None = None
    ) -> None:
        """Refuse calls with ``err`` until ``until``; call ``notify`` then, if given."""
        with self._lock:
            self._err = err
            self._until = until
        if notify is not None:
            self._runtime.call_at(until, notify)

    def error(self) -> Exception | None:
        """The error to refuse calls with now, or None when calls are allowed."""
        with self._lock:
            if self._err is not None and self._runtime.now() >= self._until:
                self._err = None
            return self._err

    @property
    def until(self) -> float:
        with self._lock:
            return self._until if self._err is not None else 0.0

    def check_rate_limit_error(
        self,
        err: BaseException,
        call_type: str,
        notify: Callable[[], None] | None = None,
        logger: logging.Logger = log,
    ) -> None:
        """If ``err`` is a rate-limit error with a retry time in the future, throttle until then.

        Checked on the error object itself, not on wrapped causes (drivers raise it directly).
        """
        if not isinstance(err, RateLimitError):
            return
        now = self._runtime.now()
        if err.earliest_retry <= now:
            return
        wait = err.earliest_retry - now
        until = datetime.fromtimestamp(err.earliest_retry, UTC).isoformat()
        logger.info("%s: rate limited by the provider, suspending for %.1fs", call_type, wait)
        self.error_until(
            CloudThrottled(f"remote calls are suspended for {wait:.1f}s, until {until}"),
            err.earliest_retry,
            notify,
        )


class SlotLimiter:
    """Starts tasks at least ``1/per_second`` seconds apart, without ever sleeping.

    ``per_second <= 0`` means unlimited: tasks are spawned at once.
    """

    def __init__(self, runtime: Runtime, per_second: float) -> None:
        self._runtime = runtime
        self._period = 1.0 / per_second if per_second > 0 else 0.0
        self._lock = threading.Lock()
        self._next_free = 0.0

    @property
    def period(self) -> float:
        return self._period

    def schedule(self, fn: Task) -> float:
        """Reserve the next free start slot for ``fn`` and return its start time."""
        now = self._runtime.now()
        if self._period <= 0:
            self._runtime.spawn(fn)
            return now
        with self._lock:
            slot = max(now, self._next_free)
            self._next_free = slot + self._period
        if slot <= now:
            self._runtime.spawn(fn)
        else:
            self._runtime.call_at(slot, fn)
        return slot


# --------------------------------------------------------------------------- driver wrappers

#: Operations counted by ``herder_driver_operations``; every series exists from the start.
DRIVER_OPERATIONS = ("Create", "List", "Destroy", "SetTags")


class _Counted:
    """Counts one driver operation, labelled by whether it raised."""

    def __init__(self, counter: Any, operation: str) -> None:
        self._counter = counter
        self._operation = operation

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._counter.labels(self._operation, "1" if exc_type is not None else "0").inc()


class InstrumentedInstance(DelegatingInstance):
    """Counts the instance's Destroy and SetTags calls."""

    def __init__(self, inner: Instance, counter: Any) -> None:
        super().__init__(inner)
        self._counter = counter

    def set_tags(self, tags: Mapping[str, str]) -> None:
        with _Counted(self._counter, "SetTags"):
            self._inner.set_tags(tags)

    def destroy(self) -> None:
        with _Counted(self._counter, "Destroy"):
            self._inner.destroy()


class _DelegatingInstanceSet(InstanceSet):
    def __init__(self, inner: InstanceSet) -> None:
        self._inner = inner

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        return self._inner.create(instance_type, image_id, tags, init_command, public_key)

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        return self._inner.instances(tags)

    def quota_group(self, instance_type: InstanceType) -> str:
        return self._inner.quota_group(instance_type)

    def quotas(self) -> list[Quota]:
        return self._inner.quotas()

    def stop(self) -> None:
        self._inner.stop()


class InstrumentedInstanceSet(_DelegatingInstanceSet):
    """Counts Create and List, and wraps returned instances so Destroy/SetTags count too."""

    def __init__(self, inner: InstanceSet, counter: Any) -> None:
        super().__init__(inner)
        self._counter = counter

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        with _Counted(self._counter, "Create"):
            inst = self._inner.create(instance_type, image_id, tags, init_command, public_key)
        return InstrumentedInstance(inst, self._counter)

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        with _Counted(self._counter, "List"):
            found = self._inner.instances(tags)
        return [InstrumentedInstance(i, self._counter) for i in found]


class TaggingInstanceSet(_DelegatingInstanceSet):
    """Adds the configured resource tags to every create; the caller's tags win on conflict."""

    def __init__(self, inner: InstanceSet, resource_tags: Mapping[str, str]) -> None:
        super().__init__(inner)
        self._resource_tags = dict(resource_tags)

    def create(
        self,
        instance_type: InstanceType,
        image_id: str,
        tags: Mapping[str, str],
        init_command: str,
        public_key: str | None,
    ) -> Instance:
        merged = {**self._resource_tags, **tags}
        return self._inner.create(instance_type, image_id, merged, init_command, public_key)


class FilteringInstanceSet(_DelegatingInstanceSet):
    """Drops listed instances that lack any requested tag: herder never touches others'."""

    def __init__(self, inner: InstanceSet, logger: logging.Logger = log) -> None:
        super().__init__(inner)
        self._log = logger

    def instances(self, tags: Mapping[str, str]) -> list[Instance]:
        found = self._inner.instances(tags)
        kept = [i for i in found if all(i.tags.get(k) == v for k, v in tags.items())]
        self._log.debug("instances: driver returned %d, kept %d", len(found), len(kept))
        return kept


def wrap_instance_set(
    inner: InstanceSet,
    *,
    operations_counter: Any,
    resource_tags: Mapping[str, str],
    logger: logging.Logger = log,
) -> InstanceSet:
    """The synchronous wrapper stack of SPEC §2, innermost first: count, tag, filter.

    The rate limit of SPEC §2b is not a wrapper here: it cannot block, so the pool schedules
    every cloud call through a :class:`SlotLimiter` instead.
    """
    for series in DRIVER_OPERATIONS:
        for error in ("0", "1"):
            operations_counter.labels(series, error)
    counted = InstrumentedInstanceSet(inner, operations_counter)
    tagged = TaggingInstanceSet(counted, resource_tags)
    return FilteringInstanceSet(tagged, logger)
