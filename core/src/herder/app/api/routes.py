"""The management API's routes and what each one does.

Each route is a FastAPI path operation declared below with its parameters, body and response
models, so the framework validates requests and generates the OpenAPI document from the same
declarations the server dispatches through: a route cannot exist undocumented, nor be
documented with a shape it does not send.  What a route *does* is a method of
:class:`ManagementAPI`, which knows nothing of HTTP beyond :class:`APIError`.

Handlers only call the engine's thread-safe reads and commands (the queue's methods, the pool's
``instances()`` and commands, the scheduler's ``snapshot()``), each of which returns a copy, so no
engine lock is held while a response is built or written.  They are plain functions: the
framework runs them on its bounded worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from herder.app.api import schema
from herder.engine.scheduler.status import Status, StatusKind, dependency_status
from herder.engine.sizing import gpu_request_for
from herder.model import (
    ARRAY_ID_RE,
    CONTAINER_UUID_RE,
    Container,
    ContainerSpec,
    ContainerState,
    GPURequest,
    IdleBehavior,
    InstanceView,
    RuntimeConstraints,
    SchedulingParameters,
)
from herder.queue.base import (
    WAITING,
    ContainerNotFound,
    InvalidTransition,
    ListFilter,
    QueueError,
)
from herder.queue.rules import MAX_ARRAY, UNFINISHED, waiting_for
from herder.runtime import Runtime

if TYPE_CHECKING:
    from herder.engine.interface import Engine

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
#: Seconds after a container ended before its log counts as complete: output read by the
#: runner as the container stopped is still on its way (relayed a few times a second).
LOG_SETTLE_SECONDS = 2.0
#: Page size of the container list when ``limit`` is not given, and the largest allowed.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
#: Bytes of log returned when ``limit`` is not given, and the most one request may ask for.
DEFAULT_LOG_CHUNK = 1 << 20
MAX_LOG_CHUNK = 4 << 20
#: Largest log offset accepted: far beyond any log, and offset + limit still fits SQLite.
MAX_LOG_OFFSET = 2**53
#: Instance ids are the provider's; anything printable and short is accepted, as a lookup key.
INSTANCE_ID_PATTERN = r"^[^\x00-\x20\x7f]{1,255}$"
#: Query parameters that may be given more than once; any other one given twice is refused,
#: rather than silently keeping one of the values.
REPEATABLE_QUERY = frozenset({"state"})
NOT_CONFIGURED = (
    "management API authentication is not configured: set api.management_token in the config "
    "or the environment variable named by api.management_token_env"
)

#: What each error status means, for the OpenAPI document.
ERROR_TEXT = {
    400: "the request is malformed; `field` names what is wrong",
    401: "no bearer token was given",
    403: "the token is wrong, or the server has no management token configured",
    404: "no such container or instance",
    408: "the request was not received within the deadline",
    409: "the container's state does not allow this",
    413: "the request body is too large",
    503: "the queue cannot be reached or written right now (its disk is full, its database "
    "connection lost); retry later",
}


class APIError(Exception):
    """A request the server refuses: becomes ``{"error": ..., "field": ...}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        errors: list[schema.FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.errors = errors
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        out = schema.ErrorOut(error=self.message, field=self.field, errors=self.errors)
        return out.model_dump(mode="json", exclude_none=True)


def reply(data: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """``data`` as a JSON response, serialized once by pydantic (the route's response model
    documents it; the framework need not validate it a second time)."""
    return Response(
        data.model_dump_json(), status, dict(headers or {}), media_type="application/json"
    )


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of a route that may answer with these error statuses."""
    return {code: {"model": schema.ErrorOut, "description": ERROR_TEXT[code]} for code in codes}


InstanceAction = Literal["hold", "drain", "run", "kill"]


def _sequence_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence that starts with ``lead`` (1 for ASCII and invalid bytes)."""
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 1


def utf8_prefix(data: bytes) -> int:
    """Length of ``data`` without a UTF-8 sequence cut off at its end.

    A log chunk that ends in the middle of a character would be decoded with a replacement
    character and the rest of the character lost; ending the chunk before it lets the next
    read return the whole character.
    """
    start = len(data) - 1
    while start >= 0 and len(data) - start < 4 and data[start] & 0xC0 == 0x80:
        start -= 1  # step back over continuation bytes to the sequence's lead byte
    if start < 0 or data[start] & 0xC0 == 0x80:
        return len(data)  # no lead byte: not UTF-8 anyway, left to the decoder
    return start if len(data) - start < _sequence_length(data[start]) else len(data)


def log_chunk_length(data: bytes, limit: int) -> int:
    """How many bytes of ``data`` (read with ``limit + 3`` bytes) to return for ``limit``.

    At most ``limit``, ending on a character boundary; but a first character longer than the
    limit is returned whole, so that a reader with a tiny limit still makes progress.
    """
    keep = utf8_prefix(data[:limit])
    if keep == 0 and data:
        keep = min(len(data), _sequence_length(data[0]))
    return keep


def _cancel_reason(reason: str) -> str:
    """What a container cancelled through the API records as its reason (one or many)."""
    return "cancelled via API" + (f": {reason}" if reason else "")


class ManagementAPI:
    """What each route does, bound to one dispatcher: an engine
    (:class:`herder.engine.interface.Engine`), the cloud engine or a plugin dispatcher's service,
    reached only through that interface."""

    def __init__(self, dispatcher: Engine, runtime: Runtime | None = None) -> None:
        self.dispatcher = dispatcher
        self.runtime = runtime or dispatcher.runtime
        self._status_lock = threading.Lock()
        self._status_pass = -1
        self._statuses: dict[str, str] = {}

    # ---- helpers

    def scheduling_statuses(self) -> dict[str, str]:
        """uuid → scheduling status of the scheduler's last pass, indexed once per pass.

        The pass counter is read before the snapshot: if a pass ends in between, the newer
        snapshot is cached under the older number and simply rebuilt on the next request.
        """
        passes = self.dispatcher.scheduling_passes()
        with self._status_lock:
            if passes == self._status_pass:
                return self._statuses
        index = self.dispatcher.scheduling_statuses()
        with self._status_lock:
            self._status_pass, self._statuses = passes, index
        return index

    def container_out(self, ctr: Container, statuses: Mapping[str, str]) -> schema.ContainerOut:
        spec, rc, sp = ctr.spec, ctr.runtime_constraints, ctr.scheduling_parameters
        waiting = ctr.state in (ContainerState.QUEUED, ContainerState.LOCKED)
        run_time = None
        if ctr.started_at is not None:
            end = ctr.finished_at if ctr.finished_at is not None else self.runtime.now()
            run_time = max(0.0, end - ctr.started_at)
        return schema.ContainerOut(
            uuid=ctr.uuid,
            name=spec.name,
            labels=dict(spec.labels),
            state=ctr.state,
            priority=ctr.priority,
            command=list(spec.command),
            image=spec.image,
            environment=dict(spec.environment),
            cwd=spec.cwd,
            runtime=spec.runtime,
            pull_policy=spec.pull_policy,
            runtime_constraints=schema.RuntimeConstraintsOut(
                vcpus=rc.vcpus,
                ram=rc.ram,
                scratch=rc.scratch,
                gpu=schema.GPUOut(
                    stack=rc.gpu.stack,
                    device_count=rc.gpu.device_count,
                    driver_version=rc.gpu.driver_version,
                    hardware_target=list(rc.gpu.hardware_target),
                    vram=rc.gpu.vram,
                ),
            ),
            scheduling_parameters=schema.SchedulingParametersOut(
                preemptible=sp.preemptible, max_run_time=sp.max_run_time, supervisor=sp.supervisor
            ),
            scheduling_status=self._scheduling_status(ctr, statuses) if waiting else "",
            instance_id=ctr.instance_id or None,
            instance_type=ctr.instance_type or None,
            attempts=ctr.lock_count,
            attempt_history=[
                schema.AttemptOut(
                    number=a.number,
                    instance_id=a.instance_id or None,
                    instance_type=a.instance_type or None,
                    started_at=schema.rfc3339(a.started_at),
                    ended_at=schema.rfc3339(a.ended_at),
                    outcome=a.outcome,
                    reason=a.reason,
                    exit_code=a.exit_code,
                    cost=a.cost,
                )
                for a in ctr.attempt_history
            ],
            exit_code=ctr.exit_code,
            cost=ctr.cost,
            runtime_status=dict(ctr.runtime_status),
            created_at=schema.rfc3339(ctr.created_at),
            locked_at=schema.rfc3339(ctr.locked_at),
            started_at=schema.rfc3339(ctr.started_at),
            finished_at=schema.rfc3339(ctr.finished_at),
            run_time=run_time,
            array_id=ctr.array_id,
            after=list(spec.after),
        )

    @staticmethod
    def _scheduling_status(ctr: Container, statuses: Mapping[str, str]) -> str:
        """The last pass's status; containers on hold (priority 0) may have left the scheduler's
        snapshot, so they get the scheduler's priority-zero text here, and one submitted with
        ``after`` says what it waits for before the scheduler's first pass has seen it."""
        status = statuses.get(ctr.uuid)
        held = waiting_for(ctr)
        if status is None and held:
            return dependency_status(held).text()
        if status is None and ctr.priority == 0:
            return Status(StatusKind.PRIORITY_ZERO, detail=ctr.state.value).text()
        return status or ""

    def instance_out(self, view: InstanceView, now: float) -> schema.InstanceOut:
        return schema.InstanceOut(
            instance=view.instance,
            address=view.address,
            price=view.price,
            instance_type=view.instance_type,
            provider_instance_type=view.provider_instance_type,
            last_container_uuid=view.last_container_uuid,
            last_busy=schema.rfc3339(view.last_busy),
            running_container_uuids=list(view.running_container_uuids),
            worker_state=view.worker_state,
            idle_behavior=view.idle_behavior,
            state_since=schema.rfc3339(view.state_since),
            time_in_state=max(0.0, now - view.state_since) if view.state_since else 0.0,
            last_probe=schema.rfc3339(view.last_probe),
            appeared=schema.rfc3339(view.appeared),
            boot_outcome=view.boot_outcome or None,
            probe_error=view.probe_error,
            reason=view.reason,
            drain_cause=view.drain_cause.value,
            paid_until=schema.rfc3339(view.paid_until),
            market_price=view.market_price or None,
        )

    def _get(self, uuid: str) -> Container:
        ctr = self.dispatcher.queue.get(uuid)
        if ctr is None:
            raise APIError(404, f"container {uuid} not found", field="uuid")
        return ctr

    def spec_from(self, body: schema.SubmitRequest) -> ContainerSpec:
        rc, sp = body.runtime_constraints, body.scheduling_parameters
        gpu = GPURequest()
        if rc.gpu is not None:
            g = rc.gpu
            gpu = GPURequest(
                g.stack, g.device_count, g.driver_version, tuple(g.hardware_target), g.vram
            )
        elif rc.gpus:
            gpu = gpu_request_for(rc.gpus, self.dispatcher.instance_types)
        return ContainerSpec(
            command=tuple(body.command),
            image=body.image,
            environment=tuple(sorted(body.environment.items())),
            cwd=body.cwd,
            runtime=body.runtime,
            runtime_constraints=RuntimeConstraints(rc.vcpus, rc.ram, rc.scratch, gpu),
            scheduling_parameters=SchedulingParameters(
                sp.preemptible, sp.max_run_time, sp.supervisor
            ),
            priority=body.priority,
            name=body.name,
            after=tuple(body.after),
            pull_policy=body.pull_policy,
            labels=tuple(sorted(body.labels.items())),
        )

    # ---- containers

    def submit_container(self, body: schema.SubmitRequest) -> schema.ContainerOut:
        try:
            ctr = self.dispatcher.queue.submit(self.spec_from(body))
        except QueueError as exc:
            if isinstance(exc, ValueError):
                raise APIError(400, str(exc), field=getattr(exc, "field", None)) from None
            raise
        log.info("container %s submitted (%s)", ctr.uuid, ctr.state.value)
        return self.container_out(ctr, {})

    def submit_batch(self, body: schema.BatchRequest) -> schema.BatchOut:
        """Every item stored in one transaction, or none: an item the queue refuses is a 400
        naming its index."""
        specs = [self.spec_from(item) for item in body.items]
        try:
            made = self.dispatcher.queue.submit_many(specs)
        except QueueError as exc:
            if isinstance(exc, ValueError):
                index = getattr(exc, "index", None)
                field = None if index is None else f"items[{index}]"
                if field and getattr(exc, "field", None):
                    field += f".{getattr(exc, 'field', '')}"
                raise APIError(400, str(exc), field=field) from None
            raise
        log.info("%d containers submitted in one batch", len(made))
        return schema.BatchOut(items=[self.container_out(c, {}) for c in made])

    def submit_array(self, body: schema.ArrayRequest) -> schema.ArrayOut:
        try:
            made = self.dispatcher.queue.submit_array(self.spec_from(body), body.count)
        except QueueError as exc:
            if isinstance(exc, ValueError):
                raise APIError(400, str(exc), field=getattr(exc, "field", None)) from None
            raise
        log.info("array %s of %d containers submitted", made[0].array_id, len(made))
        return schema.ArrayOut(
            array_id=made[0].array_id, items=[self.container_out(c, {}) for c in made]
        )

    def list_containers(
        self,
        states: tuple[ContainerState, ...],
        limit: int,
        after: str,
        *,
        order: ListOrder = "newest",
        since: float | None = None,
        array_id: str = "",
    ) -> schema.ContainerList:
        """A page of containers: newest first (keyset paging on creation time and uuid, so
        that what is submitted meanwhile neither shifts nor repeats a page), by uuid, or the
        waiting ones in queue order (the head of the queue first, however long it is)."""
        queue = self.dispatcher.queue
        total = None
        if order != "newest" and (since is not None or array_id):
            raise APIError(400, "since and array need order=newest", field="order")
        if order == "queue":
            if not set(states) <= set(WAITING):
                raise APIError(
                    400, "order=queue lists waiting containers: state Queued or Locked", "state"
                )
            try:
                page, total = queue.in_line(states or WAITING, limit + 1, after)
            except ContainerNotFound:
                raise APIError(400, f"no container {after} to continue after", "after") from None
        elif order == "uuid":
            page = queue.list(states or None, limit + 1, after)
        else:
            wanted = ListFilter(states=states or None, since=since, array_id=array_id)
            try:
                page = queue.newest(wanted, limit + 1, after)
            except ContainerNotFound:
                raise APIError(400, f"no container {after} to continue after", "after") from None
        more = len(page) > limit
        page = page[:limit]
        statuses = self.scheduling_statuses()
        return schema.ContainerList(
            items=[self.container_out(c, statuses) for c in page],
            next=page[-1].uuid if more else None,
            total=total,
        )

    def get_container(self, uuid: str) -> schema.ContainerOut:
        return self.container_out(self._get(uuid), self.scheduling_statuses())

    def cancel_container(self, uuid: str, reason: str) -> schema.ContainerOut:
        ctr = self._get(uuid)
        if ctr.state is ContainerState.COMPLETE:
            raise APIError(409, f"container {uuid} has already completed")
        why = _cancel_reason(reason)
        try:
            ctr = self.dispatcher.queue.cancel(uuid, why)
        except InvalidTransition as exc:  # completed in the meantime
            raise APIError(409, str(exc)) from None
        except ContainerNotFound:
            raise APIError(404, f"container {uuid} not found", field="uuid") from None
        log.info("container %s: %s", uuid, why)
        return self.container_out(ctr, {})

    def cancel_containers(self, body: schema.CancelManyRequest) -> schema.CancelManyOut:
        """Cancel each container by itself (one queue transition each, so one that finishes
        meanwhile is left finished), saying what happened to each; an array's members are
        those unfinished when the request arrives."""
        queue = self.dispatcher.queue
        uuids = list(dict.fromkeys(body.uuids))
        if body.array:
            members = ListFilter(states=UNFINISHED, array_id=body.array)
            uuids = [c.uuid for c in reversed(queue.newest(members, MAX_ARRAY))]
            if not uuids and not queue.newest(ListFilter(array_id=body.array), 1):
                raise APIError(404, f"array {body.array} not found", field="array")
        why = _cancel_reason(body.reason)
        items = []
        for uuid in uuids:
            ctr = queue.get(uuid)
            outcome: schema.CancelOutcome = "final"
            if ctr is not None and not ctr.state.final:
                try:
                    ctr = queue.cancel(uuid, why)
                except ContainerNotFound:
                    ctr = None
                else:  # it may have completed meanwhile, and is then left so
                    outcome = "cancelled" if ctr.state is ContainerState.CANCELLED else "final"
            if ctr is None:
                items.append(schema.CancelOutcomeOut(uuid=uuid, outcome="not_found", state=None))
            else:
                items.append(schema.CancelOutcomeOut(uuid=uuid, outcome=outcome, state=ctr.state))
        done = sum(item.outcome == "cancelled" for item in items)
        log.info("%d of %d containers %s", done, len(items), why)
        return schema.CancelManyOut(items=items, cancelled=done)

    def set_priority(self, uuid: str, priority: int) -> schema.ContainerOut:
        self._get(uuid)
        try:
            ctr = self.dispatcher.queue.set_priority(uuid, priority)
        except InvalidTransition as exc:
            raise APIError(409, str(exc)) from None
        except ContainerNotFound:
            raise APIError(404, f"container {uuid} not found", field="uuid") from None
        return self.container_out(ctr, self.scheduling_statuses())

    def read_log(self, uuid: str, offset: int, limit: int) -> schema.LogChunk:
        """A chunk of the log.  ``final`` is decided from the state read *before* the log: a
        container's log is complete once it is final, its runner is gone and
        ``LOG_SETTLE_SECONDS`` have passed (a cancelled container's last lines arrive after
        its cancellation), so no late chunk can be missed."""
        final_state = self._log_settled(self._get(uuid))
        # Three bytes more than asked for, to finish a character the limit would cut.
        data = self.dispatcher.queue.read_log(uuid, offset, limit + 3)
        keep = log_chunk_length(data, limit)
        if final_state and len(data) <= limit:
            keep = len(data)  # the log is complete: a cut character at its end stays cut
        text = data[:keep].decode("utf-8", errors="replace")
        return schema.LogChunk(
            offset=offset,
            next_offset=offset + keep,
            data=text,
            final=final_state and len(data) < limit + 3 and keep == len(data),
        )

    def _log_settled(self, ctr: Container) -> bool:
        """Whether no more output can reach the container's log."""
        if not ctr.state.final:
            return False
        if self.dispatcher.has_runner(ctr.uuid):
            return False  # its runner is still stopping: the last lines are on their way
        finished = ctr.finished_at
        return finished is None or self.runtime.now() - finished >= LOG_SETTLE_SECONDS

    # ---- instances

    def list_instances(self) -> schema.InstanceList:
        views = self.dispatcher.instances()
        now = self.runtime.now()
        return schema.InstanceList(items=[self.instance_out(v, now) for v in views])

    def list_instance_types(self) -> schema.InstanceTypeList:
        spot = self.dispatcher.spot_prices()
        types = sorted(
            self.dispatcher.instance_types.values(),
            key=lambda t: (t.price, t.vcpus, t.ram, t.name),
        )
        return schema.InstanceTypeList(
            items=[
                schema.InstanceTypeOut.model_validate(
                    {**t.to_json(), "spot_price": spot.get(t.name)}
                )
                for t in types
            ]
        )

    def instance_action(
        self, instance_id: str, action: InstanceAction, reason: str
    ) -> schema.InstanceActionOut:
        from herder.engine.interface import InstanceNotFound

        try:
            if action == "kill":
                self.dispatcher.kill_instance(instance_id, f"via management API: {reason}")
            else:
                self.dispatcher.set_idle_behavior(instance_id, IdleBehavior(action))
        except InstanceNotFound as exc:
            raise APIError(404, str(exc.args[0]) if exc.args else "instance not found") from None
        log.info(
            "instance %s: %s via management API%s",
            instance_id,
            action,
            f": {reason}" if reason else "",
        )
        return schema.InstanceActionOut(instance=instance_id, action=action)

    # ---- spend

    def quotas(self) -> schema.QuotaList:
        states = self.dispatcher.quota_states()
        items = [
            schema.QuotaOut.model_validate({**q.to_json(), "read_at": schema.rfc3339(q.read_at)})
            for q in states
        ]
        return schema.QuotaList(enabled=self.dispatcher.quotas_enabled, items=items)

    def budget(self) -> schema.BudgetOut:
        state = self.dispatcher.budget_state()
        if state is None:
            raise APIError(404, "this dispatcher keeps no spend budget: it runs no instances")
        from herder.costs import budget_document

        return schema.BudgetOut.model_validate(budget_document(state))

    def costs(self, period: str, last: int) -> schema.CostReportOut:
        from herder.costs import report_document

        report = self.dispatcher.cost_report(period, last)
        if report is None:
            raise APIError(404, "this dispatcher keeps no spend record: it runs no instances")
        return schema.CostReportOut.model_validate(report_document(report))

    # ---- service

    def health(self) -> tuple[schema.Health, int]:
        try:
            self.dispatcher.check_health()
        except Exception as exc:
            return schema.Health(health="ERROR", error=str(exc)), 503
        return schema.Health(health="OK"), 200

    def plugins(self) -> schema.PluginList:
        items = [i.to_json() for i in self.dispatcher.plugins.describe()]
        return schema.PluginList.model_validate({"items": items})

    def metrics(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.dispatcher.registry)

    def summary(self) -> schema.SummaryOut:
        from herder.app.api import status_page

        totals = status_page.summarize(self.dispatcher.instances(), self.dispatcher.queue.counts())
        return schema.SummaryOut(
            instances=totals.instances,
            containers=totals.containers,
            cost_per_hour=totals.cost_per_hour,
        )


# --------------------------------------------------------------------------- request parts
# Dependencies are coroutines: they never block, and the framework would otherwise run each on
# a worker thread of its own, a thread hand-off per dependency per request.


async def management_api(request: Request) -> ManagementAPI:
    """The :class:`ManagementAPI` the application was built with."""
    api: ManagementAPI = request.app.state.api
    return api


API = Annotated[ManagementAPI, Depends(management_api)]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="the management token (api.management_token)",
)


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a bearer token, 403 with a wrong one or when none is configured (SPEC
    §10.2, made stricter: Arvados leaves the API open when no token is configured).  Compared
    in constant time."""
    import hmac

    token: bytes = request.app.state.token
    if not token:
        raise APIError(403, NOT_CONFIGURED)
    if credentials is None:
        raise APIError(
            401,
            "authorization required: send Authorization: Bearer <management token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    offered = credentials.credentials.strip().encode("utf-8", "replace")
    if not hmac.compare_digest(offered, token):
        raise APIError(403, "the management token is not valid")


async def single_values(request: Request) -> None:
    """Refuse a query parameter given twice unless it is a list (``state``)."""
    counts = Counter(name for name, _ in request.query_params.multi_items())
    for name, count in counts.items():
        if count > 1 and name not in REPEATABLE_QUERY:
            raise APIError(400, "given more than once", field=name[:100])


class _Query(BaseModel):
    """Base of query parameter sets: an unknown parameter is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


ListOrder = Literal["newest", "uuid", "queue"]


class ListQuery(_Query):
    state: list[ContainerState] = Field(
        default_factory=list, description="only containers in this state (repeat for several)"
    )
    order: ListOrder = Field(
        "newest",
        description="`newest`: by creation time, newest first (the default); `uuid`: by "
        "uuid; `queue`: the waiting containers (Queued and Locked, priority above 0) in the "
        "order they are served, Locked first, then by priority (highest first), then oldest "
        "first, with `total` saying how many are in line",
    )
    # Documented as what a query string can carry (a time or a number), not as "or null":
    # leaving the parameter out is how a client asks for no limit.
    since: Annotated[
        datetime | None,
        WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}]}),
    ] = Field(
        None,
        description="only containers created at or after this time (RFC 3339, or "
        "seconds since the epoch); with order=newest",
    )
    array: str = Field(
        "",
        pattern=f"^$|{ARRAY_ID_RE.pattern}",
        description="only the members of this array (`submit --count`); with order=newest",
    )
    limit: int = Field(DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="page size")
    # Empty is accepted too: the first page, as when the parameter is left out.
    after: str = Field(
        "",
        pattern=f"^$|{CONTAINER_UUID_RE.pattern}",
        description="continue after this container (the previous page's `next`): in the "
        "listing's order, so the same `order` and filters must be given again",
    )


class LogQuery(_Query):
    offset: int = Field(
        0,
        ge=0,
        le=MAX_LOG_OFFSET,
        description="byte offset to read from (the previous chunk's `next_offset`)",
    )
    limit: int = Field(
        DEFAULT_LOG_CHUNK, ge=1, le=MAX_LOG_CHUNK, description="most bytes to return"
    )


class CostQuery(_Query):
    period: Literal["hour", "day", "month"] = Field(
        "day", description="group spend by hour, day or month (UTC)"
    )
    last: int = Field(7, ge=1, le=1000, description="the current period and the last-1 before it")


class NoQuery(_Query):
    """Routes without query parameters still refuse unknown ones."""


Uuid = Annotated[str, Path(pattern=CONTAINER_UUID_RE.pattern, description="container uuid")]
InstanceId = Annotated[
    str, Path(pattern=INSTANCE_ID_PATTERN, description="the provider's instance id")
]
NoParams = Annotated[NoQuery, Query()]

# --------------------------------------------------------------------------- the routes

AUTH = [Depends(require_token)]
_C = f"{API_PREFIX}/containers"
_I = f"{API_PREFIX}/instances"

containers = APIRouter(tags=["containers"], dependencies=AUTH, responses=errors(401, 403))


@containers.post(
    _C,
    status_code=201,
    response_model=schema.ContainerOut,
    operation_id="submitContainer",
    summary="Submit a container",
    responses=errors(400, 413, 503),
)
def submit_container(api: API, body: schema.SubmitRequest, _q: NoParams) -> Response:
    out = api.submit_container(body)
    return reply(out, 201, {"Location": f"{_C}/{out.uuid}"})


@containers.post(
    f"{_C}/batch",
    status_code=201,
    response_model=schema.BatchOut,
    operation_id="submitContainers",
    summary="Submit several containers at once: all of them, or none",
    responses=errors(400, 413, 503),
)
def submit_batch(api: API, body: schema.BatchRequest, _q: NoParams) -> Response:
    return reply(api.submit_batch(body), 201)


@containers.post(
    f"{_C}/array",
    status_code=201,
    response_model=schema.ArrayOut,
    operation_id="submitArray",
    summary="Submit an array: count containers of one spec, each told its index",
    responses=errors(400, 413, 503),
)
def submit_array(api: API, body: schema.ArrayRequest, _q: NoParams) -> Response:
    return reply(api.submit_array(body), 201)


@containers.post(
    f"{_C}/cancel",
    response_model=schema.CancelManyOut,
    operation_id="cancelContainers",
    summary="Cancel several containers, or an array's unfinished members, saying what "
    "happened to each",
    responses=errors(400, 404, 413, 503),
)
def cancel_containers(api: API, body: schema.CancelManyRequest, _q: NoParams) -> Response:
    return reply(api.cancel_containers(body))


@containers.get(
    _C,
    response_model=schema.ContainerList,
    operation_id="listContainers",
    summary="List containers, newest first (or by uuid, or in queue order), a page at a time",
    responses=errors(400, 503),
)
def list_containers(api: API, query: Annotated[ListQuery, Query()]) -> Response:
    since = None
    if query.since is not None:
        when = query.since
        since = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return reply(
        api.list_containers(
            tuple(query.state),
            query.limit,
            query.after,
            order=query.order,
            since=since,
            array_id=query.array,
        )
    )


@containers.get(
    f"{_C}/{{uuid}}",
    response_model=schema.ContainerOut,
    operation_id="getContainer",
    summary="Get one container, with its scheduling status",
    responses=errors(400, 404, 503),
)
def get_container(api: API, uuid: Uuid, _q: NoParams) -> Response:
    return reply(api.get_container(uuid))


@containers.post(
    f"{_C}/{{uuid}}/cancel",
    response_model=schema.ContainerOut,
    operation_id="cancelContainer",
    summary="Cancel a container (its runner is killed if it runs)",
    responses=errors(400, 404, 409, 413, 503),
)
def cancel_container(
    api: API, uuid: Uuid, _q: NoParams, body: schema.CancelRequest | None = None
) -> Response:
    return reply(api.cancel_container(uuid, body.reason if body else ""))


@containers.post(
    f"{_C}/{{uuid}}/priority",
    response_model=schema.ContainerOut,
    operation_id="setContainerPriority",
    summary="Change a container's priority (0 holds it in the queue)",
    responses=errors(400, 404, 409, 413, 503),
)
def set_priority(api: API, uuid: Uuid, body: schema.PriorityRequest, _q: NoParams) -> Response:
    return reply(api.set_priority(uuid, body.priority))


@containers.get(
    f"{_C}/{{uuid}}/log",
    response_model=schema.LogChunk,
    operation_id="readContainerLog",
    summary="Read a container's log from a byte offset",
    responses=errors(400, 404, 503),
)
def read_log(api: API, uuid: Uuid, query: Annotated[LogQuery, Query()]) -> Response:
    return reply(api.read_log(uuid, query.offset, query.limit))


instances = APIRouter(tags=["instances"], dependencies=AUTH, responses=errors(401, 403))


@instances.get(
    f"{API_PREFIX}/instance-types",
    response_model=schema.InstanceTypeList,
    operation_id="listInstanceTypes",
    summary="List the instance types herder may create, cheapest first, with spot prices",
)
def list_instance_types(api: API, _q: NoParams) -> Response:
    return reply(api.list_instance_types())


@instances.get(
    _I,
    response_model=schema.InstanceList,
    operation_id="listInstances",
    summary="List instances, pending creates included",
)
def list_instances(api: API, _q: NoParams) -> Response:
    return reply(api.list_instances())


def _add_instance_action(action: InstanceAction, summary: str) -> None:
    def act(
        api: API,
        instance_id: InstanceId,
        _q: NoParams,
        body: schema.InstanceActionRequest | None = None,
    ) -> Response:
        return reply(api.instance_action(instance_id, action, body.reason if body else ""))

    instances.add_api_route(
        # ``:path``: a provider's id may hold a "/" (sent as %2F, which the server decodes).
        f"{_I}/{{instance_id:path}}/{action}",
        act,
        methods=["POST"],
        response_model=schema.InstanceActionOut,
        operation_id=f"{action}Instance",
        summary=summary,
        responses=errors(400, 404, 413),
    )


for _action, _summary in (
    ("hold", "Hold an instance: start nothing new on it and never shut it down"),
    ("drain", "Drain an instance: start nothing new on it and shut it down once idle"),
    ("run", "Return an instance to normal use"),
    ("kill", "Shut an instance down now, whatever runs on it"),
):
    _add_instance_action(_action, _summary)  # type: ignore[arg-type]


spend = APIRouter(tags=["spend"], dependencies=AUTH, responses=errors(401, 403))


@spend.get(
    f"{API_PREFIX}/quotas",
    response_model=schema.QuotaList,
    operation_id="listQuotas",
    summary="The cloud account's quotas: limits, usage and what herder plans to use",
)
def quotas(api: API, _q: NoParams) -> Response:
    return reply(api.quotas())


@spend.get(
    f"{API_PREFIX}/budget",
    response_model=schema.BudgetOut,
    operation_id="getBudget",
    summary="The spend budget: spend of the current period against its limits",
)
def budget(api: API, _q: NoParams) -> Response:
    return reply(api.budget())


@spend.get(
    f"{API_PREFIX}/costs",
    response_model=schema.CostReportOut,
    operation_id="getCosts",
    summary="Spend by period, instance type and container label; cost per finished container",
    responses=errors(400),
)
def costs(api: API, query: Annotated[CostQuery, Query()]) -> Response:
    return reply(api.costs(query.period, query.last))


service = APIRouter(tags=["service"])


@service.get(
    f"{API_PREFIX}/health",
    response_model=schema.Health,
    operation_id="health",
    summary="Health check (needs no token)",
    responses={503: {"model": schema.Health, "description": "the dispatcher is unhealthy"}},
)
def health(api: API, _q: NoParams) -> Response:
    out, status = api.health()
    return reply(out, status)


@service.get(
    f"{API_PREFIX}/plugins",
    response_model=schema.PluginList,
    operation_id="listPlugins",
    summary="Installed plugins and what they register",
    dependencies=AUTH,
    responses=errors(401, 403),
)
def plugins(api: API, _q: NoParams) -> Response:
    return reply(api.plugins())


@service.get(
    f"{API_PREFIX}/openapi.json",
    operation_id="openapi",
    summary="This API's OpenAPI document",
    dependencies=AUTH,
    responses=errors(401, 403),
)
async def openapi(request: Request, _q: NoParams) -> dict[str, Any]:
    document: dict[str, Any] = request.app.openapi()
    return document


@service.get(
    f"{API_PREFIX}/summary",
    response_model=schema.SummaryOut,
    operation_id="summary",
    summary="Totals: instances and containers by state, cost per hour now",
    dependencies=AUTH,
    responses=errors(401, 403),
)
def summary(api: API, _q: NoParams) -> Response:
    return reply(api.summary())


_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@service.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    dependencies=AUTH,
    response_class=Response,
    responses={
        200: {
            "content": {_METRICS_TYPE: {"schema": {"type": "string"}}},
            "description": "the metrics in Prometheus' text format",
        },
        **errors(401, 403),
    },
)
def metrics(api: API, _q: NoParams) -> Response:
    return Response(api.metrics(), media_type=_METRICS_TYPE)


# The status page and its files need no token: the page's script asks for one.
status_page_routes = APIRouter(tags=["status page"])


@status_page_routes.get(
    "/",
    operation_id="statusPage",
    summary="The status page",
    response_class=Response,
    responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "the page"}
    },
)
async def status_page(_q: NoParams) -> Response:
    from herder.app.api import status_page as page

    return Response(page.page(), media_type=page.PAGE_CONTENT_TYPE, headers=dict(page.PAGE_HEADERS))


@status_page_routes.get(
    "/static/{name}",
    operation_id="statusPageAsset",
    summary="A script or stylesheet of the status page",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "the file"},
        **errors(404),
    },
)
async def static_asset(name: str, _q: NoParams) -> Response:
    from herder.app.api import status_page as page

    try:
        data, content_type = page.asset(name)
    except page.UnknownAsset:
        raise APIError(404, "no such file", field="name") from None
    return Response(data, media_type=content_type)


def build_router(*, with_instances: bool = True) -> APIRouter:
    """Every route, with the instance ones only for an engine that has instances."""
    router = APIRouter(dependencies=[Depends(single_values)])
    router.include_router(containers)
    if with_instances:
        router.include_router(instances)
        router.include_router(spend)
    router.include_router(service)
    router.include_router(status_page_routes)
    return router
