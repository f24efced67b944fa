"""The management API's routes and what each one does, independent of the HTTP server.

:data:`ROUTES` is the one table of routes: the server dispatches through it and the OpenAPI
document is generated from it, so the two cannot disagree.  Each handler is a method of
:class:`ManagementAPI` that takes a parsed :class:`Request` and returns a :class:`Response`, or
raises :class:`APIError` for anything the client got wrong.

Handlers only call the engine's thread-safe reads and commands (the queue's methods, the pool's
``instances()`` and commands, the scheduler's ``snapshot()``), each of which returns a copy, so no
engine lock is held while a response is built or written.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from herder.api import schema
from herder.model import (
    CONTAINER_UUID_RE,
    Container,
    ContainerSpec,
    ContainerState,
    GPURequest,
    IdleBehavior,
    InstanceView,
    RuntimeConstraints,
    SchedulingParameters,
    is_container_uuid,
)
from herder.queue.base import ContainerNotFound, InvalidTransition, QueueError
from herder.runtime import Runtime
from herder.scheduler.status import Status, StatusKind
from herder.sizing import gpu_request_for

if TYPE_CHECKING:
    from herder.dispatcher import Dispatcher

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
#: Page size of the container list when ``limit`` is not given, and the largest allowed.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
#: Bytes of log returned when ``limit`` is not given, and the most one request may ask for.
DEFAULT_LOG_CHUNK = 1 << 20
MAX_LOG_CHUNK = 4 << 20
#: Largest log offset accepted: far beyond any log, and offset + limit still fits SQLite.
MAX_LOG_OFFSET = 2**53
#: Instance ids are the provider's; anything printable and short is accepted, as a lookup key.
INSTANCE_ID_RE = re.compile(r"^[^\x00-\x20\x7f]{1,255}$")


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


@dataclass
class Request:
    """One parsed request: path parameters, validated query arguments and the raw body."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: BaseModel, status: int = 200, **headers: str) -> Response:
        return cls(status, data.model_dump_json().encode(), "application/json", dict(headers))


# --------------------------------------------------------------------------- query parameters


@dataclass(frozen=True)
class Param:
    """A query parameter: how to parse one value, and its JSON schema for the OpenAPI document."""

    name: str
    parse: Callable[[str], Any]
    schema: dict[str, Any]
    description: str
    repeatable: bool = False
    default: Any = None


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]{1,19}", text):
            raise ValueError(f"expected an integer from {low} to {high}")
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return parse


def _state(text: str) -> ContainerState:
    try:
        return ContainerState(text)
    except ValueError:
        names = ", ".join(s.value for s in ContainerState)
        raise ValueError(f"unknown state {text[:40]!r}; expected one of {names}") from None


def _after(text: str) -> str:
    if text and not is_container_uuid(text):
        raise ValueError("expected a container uuid")
    return text


STATE_PARAM = Param(
    "state",
    _state,
    {"type": "string", "enum": [s.value for s in ContainerState]},
    "only containers in this state (repeat for several)",
    repeatable=True,
    default=(),
)
LIMIT_PARAM = Param(
    "limit",
    _int_between(1, MAX_PAGE),
    {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
    "page size",
    default=DEFAULT_PAGE,
)
AFTER_PARAM = Param(
    "after",
    _after,
    # Empty is accepted too: the first page, as when the parameter is left out.
    {"type": "string", "pattern": f"^$|{CONTAINER_UUID_RE.pattern}"},
    "return containers whose uuid sorts after this one (the previous page's `next`)",
    default="",
)
OFFSET_PARAM = Param(
    "offset",
    _int_between(0, MAX_LOG_OFFSET),
    {"type": "integer", "minimum": 0, "maximum": MAX_LOG_OFFSET, "default": 0},
    "byte offset to read from (the previous chunk's `next_offset`)",
    default=0,
)
LOG_LIMIT_PARAM = Param(
    "limit",
    _int_between(1, MAX_LOG_CHUNK),
    {"type": "integer", "minimum": 1, "maximum": MAX_LOG_CHUNK, "default": DEFAULT_LOG_CHUNK},
    "most bytes to return",
    default=DEFAULT_LOG_CHUNK,
)


def parse_query(params: Sequence[Param], query: Mapping[str, list[str]]) -> dict[str, Any]:
    """Validate the query string against a route's parameters; unknown ones are errors."""
    known = {p.name: p for p in params}
    for name in query:
        if name not in known:
            raise APIError(400, "unknown query parameter", field=name[:100])
    out: dict[str, Any] = {}
    for p in params:
        values = query.get(p.name, [])
        if not p.repeatable and len(values) > 1:
            raise APIError(400, "given more than once", field=p.name)
        try:
            parsed = [p.parse(v) for v in values]
        except ValueError as exc:
            raise APIError(400, str(exc), field=p.name) from None
        if p.repeatable:
            out[p.name] = tuple(parsed)
        else:
            out[p.name] = parsed[0] if parsed else p.default
    return out


# --------------------------------------------------------------------------- routes

Handler = Callable[["ManagementAPI", Request], Response]
_PATH_PARAM_RE = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Route:
    """One method + path, its handler, and what the OpenAPI document says about it."""

    method: str
    path: str  # template, e.g. /api/v1/containers/{uuid}
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    request_model: type[BaseModel] | None = None
    response_model: type[BaseModel] | None = None
    status: int = 200
    query: tuple[Param, ...] = ()
    auth: bool = True
    content_type: str = "application/json"
    errors: tuple[int, ...] = ()

    @property
    def path_params(self) -> list[str]:
        return _PATH_PARAM_RE.findall(self.path)

    @property
    def pattern(self) -> re.Pattern[str]:
        """The path template as a regex: each ``{name}`` matches one path segment."""
        parts = _PATH_PARAM_RE.split(self.path)  # literal, name, literal, name, ..., literal
        regex = "".join(
            re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
        )
        return re.compile(regex + "$")


@dataclass
class Router:
    """Finds the route for a method and path: 404 for an unknown path, 405 for a wrong method."""

    routes: Sequence[Route]
    _compiled: list[tuple[re.Pattern[str], Route]] = field(init=False)

    def __post_init__(self) -> None:
        self._compiled = [(r.pattern, r) for r in self.routes]

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for pattern, route in self._compiled:
            m = pattern.match(path)
            if m is None:
                continue
            if route.method == method:
                return route, {k: unquote(v, errors="replace") for k, v in m.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            raise APIError(
                405, f"method {method} not allowed here", headers={"Allow": ", ".join(allowed)}
            )
        raise APIError(404, "no such route")


# --------------------------------------------------------------------------- the API

M = TypeVar("M", bound=BaseModel)
InstanceAction = Literal["hold", "drain", "run", "kill"]


def parse_body(model: type[M], body: bytes) -> M:
    """Validate a JSON body (empty means ``{}``); errors name the first offending field."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        errors = schema.validation_errors(exc)
        first = errors[0] if errors else schema.FieldError(field=None, error="invalid body")
        if any(e["type"] == "json_invalid" for e in exc.errors(include_input=False)):
            raise APIError(400, f"request body is not valid JSON: {first.error}") from None
        raise APIError(400, first.error, field=first.field, errors=errors) from None


def _uuid(req: Request) -> str:
    uuid = req.params["uuid"]
    if not is_container_uuid(uuid):
        raise APIError(400, "not a container uuid", field="uuid")
    return uuid


def _instance_id(req: Request) -> str:
    instance_id = req.params["instance_id"]
    if not INSTANCE_ID_RE.fullmatch(instance_id):
        raise APIError(400, "not an instance id", field="instance_id")
    return instance_id


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


class ManagementAPI:
    """The handlers, bound to one dispatcher."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        runtime: Runtime | None = None,
        routes: Sequence[Route] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.runtime = runtime or dispatcher.runtime
        #: The routes being served (the OpenAPI document describes exactly these).
        self.routes: tuple[Route, ...] = tuple(ROUTES if routes is None else routes)
        self._status_lock = threading.Lock()
        self._status_pass = -1
        self._statuses: dict[str, str] = {}

    # ---- helpers

    def scheduling_statuses(self) -> dict[str, str]:
        """uuid → scheduling status of the scheduler's last pass, indexed once per pass.

        The pass counter is read before the snapshot: if a pass ends in between, the newer
        snapshot is cached under the older number and simply rebuilt on the next request.
        """
        scheduler = self.dispatcher.scheduler
        passes = scheduler.passes
        with self._status_lock:
            if passes == self._status_pass:
                return self._statuses
        index = {e.entry.container.uuid: e.scheduling_status for e in scheduler.snapshot()}
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
            state=ctr.state,
            priority=ctr.priority,
            command=list(spec.command),
            image=spec.image,
            environment=dict(spec.environment),
            cwd=spec.cwd,
            runtime=spec.runtime,
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
            exit_code=ctr.exit_code,
            cost=ctr.cost,
            runtime_status=dict(ctr.runtime_status),
            created_at=schema.rfc3339(ctr.created_at),
            locked_at=schema.rfc3339(ctr.locked_at),
            started_at=schema.rfc3339(ctr.started_at),
            finished_at=schema.rfc3339(ctr.finished_at),
            run_time=run_time,
        )

    @staticmethod
    def _scheduling_status(ctr: Container, statuses: Mapping[str, str]) -> str:
        """The last pass's status; containers on hold (priority 0) may have left the scheduler's
        snapshot, so they get the scheduler's priority-zero text here."""
        status = statuses.get(ctr.uuid)
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
        )

    # ---- containers

    def submit_container(self, req: Request) -> Response:
        body = parse_body(schema.SubmitRequest, req.body)
        try:
            ctr = self.dispatcher.queue.submit(self.spec_from(body))
        except QueueError as exc:
            if isinstance(exc, ValueError):
                raise APIError(400, str(exc)) from None
            raise
        log.info("container %s submitted (%s)", ctr.uuid, ctr.state.value)
        out = self.container_out(ctr, {})
        return Response.json(out, 201, Location=f"{API_PREFIX}/containers/{ctr.uuid}")

    def list_containers(self, req: Request) -> Response:
        limit: int = req.args["limit"]
        states: tuple[ContainerState, ...] = req.args["state"]
        page = self.dispatcher.queue.list(states or None, limit + 1, req.args["after"])
        more = len(page) > limit
        page = page[:limit]
        statuses = self.scheduling_statuses()
        return Response.json(
            schema.ContainerList(
                items=[self.container_out(c, statuses) for c in page],
                next=page[-1].uuid if more else None,
            )
        )

    def get_container(self, req: Request) -> Response:
        ctr = self._get(_uuid(req))
        return Response.json(self.container_out(ctr, self.scheduling_statuses()))

    def cancel_container(self, req: Request) -> Response:
        uuid = _uuid(req)
        body = parse_body(schema.CancelRequest, req.body)
        ctr = self._get(uuid)
        if ctr.state is ContainerState.COMPLETE:
            raise APIError(409, f"container {uuid} has already completed")
        reason = "cancelled via API" + (f": {body.reason}" if body.reason else "")
        try:
            ctr = self.dispatcher.queue.cancel(uuid, reason)
        except InvalidTransition as exc:  # completed in the meantime
            raise APIError(409, str(exc)) from None
        except ContainerNotFound:
            raise APIError(404, f"container {uuid} not found", field="uuid") from None
        log.info("container %s: %s", uuid, reason)
        return Response.json(self.container_out(ctr, {}))

    def set_priority(self, req: Request) -> Response:
        uuid = _uuid(req)
        body = parse_body(schema.PriorityRequest, req.body)
        self._get(uuid)
        try:
            ctr = self.dispatcher.queue.set_priority(uuid, body.priority)
        except InvalidTransition as exc:
            raise APIError(409, str(exc)) from None
        except ContainerNotFound:
            raise APIError(404, f"container {uuid} not found", field="uuid") from None
        return Response.json(self.container_out(ctr, self.scheduling_statuses()))

    def read_log(self, req: Request) -> Response:
        """A chunk of the log.  ``final`` is decided from the state read *before* the log: a
        container's log is complete once it is final, so no late chunk can be missed."""
        uuid = _uuid(req)
        offset: int = req.args["offset"]
        limit: int = req.args["limit"]
        final_state = self._get(uuid).state.final
        # Three bytes more than asked for, to finish a character the limit would cut.
        data = self.dispatcher.queue.read_log(uuid, offset, limit + 3)
        keep = log_chunk_length(data, limit)
        if final_state and len(data) <= limit:
            keep = len(data)  # the log is complete: a cut character at its end stays cut
        text = data[:keep].decode("utf-8", errors="replace")
        return Response.json(
            schema.LogChunk(
                offset=offset,
                next_offset=offset + keep,
                data=text,
                final=final_state and len(data) < limit + 3 and keep == len(data),
            )
        )

    # ---- instances

    def list_instances(self, req: Request) -> Response:
        views = self.dispatcher.pool.instances()
        now = self.runtime.now()
        return Response.json(schema.InstanceList(items=[self.instance_out(v, now) for v in views]))

    def _instance_action(self, req: Request, action: InstanceAction) -> Response:
        from herder.worker.pool import PoolError

        instance_id = _instance_id(req)
        body = parse_body(schema.InstanceActionRequest, req.body)
        pool = self.dispatcher.pool
        try:
            if action == "kill":
                pool.kill_instance(instance_id, f"via management API: {body.reason}")
            else:
                pool.set_idle_behavior(instance_id, IdleBehavior(action))
        except PoolError as exc:
            raise APIError(404, str(exc.args[0]) if exc.args else "instance not found") from None
        log.info(
            "instance %s: %s via management API%s",
            instance_id,
            action,
            f": {body.reason}" if body.reason else "",
        )
        return Response.json(schema.InstanceActionOut(instance=instance_id, action=action))

    def hold_instance(self, req: Request) -> Response:
        return self._instance_action(req, "hold")

    def drain_instance(self, req: Request) -> Response:
        return self._instance_action(req, "drain")

    def run_instance(self, req: Request) -> Response:
        return self._instance_action(req, "run")

    def kill_instance(self, req: Request) -> Response:
        return self._instance_action(req, "kill")

    # ---- service

    def health(self, req: Request) -> Response:
        try:
            self.dispatcher.pool.check_health()
        except Exception as exc:
            return Response.json(schema.Health(health="ERROR", error=str(exc)), 503)
        return Response.json(schema.Health(health="OK"))

    def plugins(self, req: Request) -> Response:
        infos = self.dispatcher.plugins.describe()
        items = [i.to_json() for i in infos]
        return Response.json(schema.PluginList.model_validate({"items": items}))

    def metrics(self, req: Request) -> Response:
        return Response(200, generate_latest(self.dispatcher.registry), CONTENT_TYPE_LATEST)

    def summary(self, req: Request) -> Response:
        from herder.api import status_page

        totals = status_page.summarize(
            self.dispatcher.pool.instances(), self.dispatcher.queue.counts()
        )
        return Response.json(
            schema.SummaryOut(
                instances=totals.instances,
                containers=totals.containers,
                cost_per_hour=totals.cost_per_hour,
            )
        )

    # ---- the status page (its data comes from the authenticated routes above)

    def status_page(self, req: Request) -> Response:
        from herder.api import status_page

        return Response(
            200, status_page.page(), status_page.PAGE_CONTENT_TYPE, dict(status_page.PAGE_HEADERS)
        )

    def static_asset(self, req: Request) -> Response:
        from herder.api import status_page

        try:
            data, content_type = status_page.asset(req.params["name"])
        except status_page.UnknownAsset:
            raise APIError(404, "no such file", field="name") from None
        return Response(200, data, content_type)

    def openapi(self, req: Request) -> Response:
        from herder.api.openapi import openapi_json

        return Response(200, openapi_json(self.routes), "application/json")


_C = f"{API_PREFIX}/containers"
_I = f"{API_PREFIX}/instances"

ROUTES: tuple[Route, ...] = (
    Route(
        "POST", _C, ManagementAPI.submit_container, "submitContainer",
        "Submit a container", "containers",
        request_model=schema.SubmitRequest, response_model=schema.ContainerOut, status=201,
        errors=(400, 413, 503),
    ),
    Route(
        "GET", _C, ManagementAPI.list_containers, "listContainers",
        "List containers by uuid, a page at a time", "containers",
        response_model=schema.ContainerList, query=(STATE_PARAM, LIMIT_PARAM, AFTER_PARAM),
        errors=(400,),
    ),
    Route(
        "GET", f"{_C}/{{uuid}}", ManagementAPI.get_container, "getContainer",
        "Get one container, with its scheduling status", "containers",
        response_model=schema.ContainerOut, errors=(400, 404),
    ),
    Route(
        "POST", f"{_C}/{{uuid}}/cancel", ManagementAPI.cancel_container, "cancelContainer",
        "Cancel a container (its runner is killed if it runs)", "containers",
        request_model=schema.CancelRequest, response_model=schema.ContainerOut,
        errors=(400, 404, 409, 413, 503),
    ),
    Route(
        "POST", f"{_C}/{{uuid}}/priority", ManagementAPI.set_priority, "setContainerPriority",
        "Change a container's priority (0 holds it in the queue)", "containers",
        request_model=schema.PriorityRequest, response_model=schema.ContainerOut,
        errors=(400, 404, 409, 413, 503),
    ),
    Route(
        "GET", f"{_C}/{{uuid}}/log", ManagementAPI.read_log, "readContainerLog",
        "Read a container's log from a byte offset", "containers",
        response_model=schema.LogChunk, query=(OFFSET_PARAM, LOG_LIMIT_PARAM), errors=(400, 404),
    ),
    Route(
        "GET", _I, ManagementAPI.list_instances, "listInstances",
        "List instances, pending creates included", "instances",
        response_model=schema.InstanceList,
    ),
    *(
        Route(
            "POST", f"{_I}/{{instance_id}}/{action}", handler, f"{action}Instance", summary,
            "instances", request_model=schema.InstanceActionRequest,
            response_model=schema.InstanceActionOut, errors=(400, 404, 413),
        )
        for action, handler, summary in (
            ("hold", ManagementAPI.hold_instance,
             "Hold an instance: start nothing new on it and never shut it down"),
            ("drain", ManagementAPI.drain_instance,
             "Drain an instance: start nothing new on it and shut it down once idle"),
            ("run", ManagementAPI.run_instance,
             "Return an instance to normal use"),
            ("kill", ManagementAPI.kill_instance,
             "Shut an instance down now, whatever runs on it"),
        )
    ),
    Route(
        "GET", f"{API_PREFIX}/health", ManagementAPI.health, "health",
        "Health check (needs no token)", "service", response_model=schema.Health, auth=False,
    ),
    Route(
        "GET", f"{API_PREFIX}/plugins", ManagementAPI.plugins, "listPlugins",
        "Installed plugins and what they register", "service", response_model=schema.PluginList,
    ),
    Route(
        "GET", f"{API_PREFIX}/openapi.json", ManagementAPI.openapi, "openapi",
        "This API's OpenAPI document", "service",
    ),
    Route(
        "GET", f"{API_PREFIX}/summary", ManagementAPI.summary, "summary",
        "Totals: instances and containers by state, cost per hour now", "service",
        response_model=schema.SummaryOut,
    ),
    Route(
        "GET", "/", ManagementAPI.status_page, "statusPage",
        "The status page (needs no token; its script asks for one)", "status page",
        auth=False, content_type="text/html; charset=utf-8",
    ),
    Route(
        "GET", "/static/{name}", ManagementAPI.static_asset, "statusPageAsset",
        "A script or stylesheet of the status page", "status page",
        auth=False, content_type="text/plain", errors=(404,),
    ),
    Route(
        "GET", "/metrics", ManagementAPI.metrics, "metrics",
        "Prometheus metrics", "service", content_type=CONTENT_TYPE_LATEST,
    ),
)  # fmt: skip
