"""A small fake of the Compute Engine REST API (v1), on 127.0.0.1, for the driver's tests.

It answers what the driver sends through the real ``compute_v1`` clients: instances insert /
get / list / aggregatedList / delete / setLabels / setMetadata / getGuestAttributes, zone
operations get and wait, and the OAuth token exchange of service-account credentials.  Its
replies have the shapes GCE's have (camelCase JSON, numeric ids as strings, full URLs, errors
as ``{"error": {"code", "message", "errors": [{"reason", ...}]}}`` for HTTP errors and as
``error.errors[].code`` plus ``httpErrorStatusCode`` in failed operations).

Knobs for tests: :meth:`FakeCompute.fail` queues errors by call kind and zone (answered
synchronously or in the operation), ``pending_polls`` makes operations take that many polls to
finish, ``page_size`` caps pages whatever ``maxResults`` asks, ``after_get`` runs after a GET
of an instance is answered (to change it between the driver's read and its write),
``publish_host_keys`` / ``host_key`` say whether and which SSH host key the "guest agent"
publishes, and ``address`` gives every instance one address (a local SSH server's).  Addresses
are in 127.0.0.0/8 only.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "https://www.googleapis.com/compute/v1"
ACCESS_TOKEN = "fake-access-token"


@dataclass
class Failure:
    """One queued error: an HTTP status with a reason, answered now or by the operation."""

    status: int
    reason: str
    message: str
    in_operation: bool = False
    domain: str = "global"
    quota_metric: str = ""
    retry_after: int | None = None


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str]


@dataclass
class _Operation:
    data: dict[str, Any]
    polls_left: int
    final: dict[str, Any] = field(default_factory=dict)


def _fingerprint() -> str:
    return base64.b64encode(secrets.token_bytes(8)).decode()


class FakeCompute:
    """The fake API's state and its HTTP server.  Use as a context manager."""

    def __init__(self, project: str = "proj") -> None:
        self.project = project
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}
        self.host_keys: dict[tuple[str, str], dict[str, str]] = {}
        self.requests: list[Request] = []
        self.failures: dict[tuple[str, str], list[Failure]] = {}
        self.pending_polls = 0
        self.page_size: int | None = None
        self.publish_host_keys = True
        self.address: str | None = None  # every instance's networkIP, else 127.100.x.y
        self.host_key: str | None = None  # the host key published, else a random one
        self.after_get: Callable[[str, str], None] | None = None
        #: region -> its quotas as regions.get gives them ({"metric", "limit", "usage"})
        self.region_quotas: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.RLock()
        self._operations: dict[str, _Operation] = {}
        self.request_ids: dict[str, str] = {}  # requestId -> operation name
        self._ids = itertools.count(1000)
        self._addresses = itertools.count(2)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeCompute:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ----------------------------------------------------------------- test helpers

    def fail(self, kind: str, failure: Failure, zone: str = "*", times: int = 1) -> None:
        """Answer the next ``times`` calls of ``kind`` (insert, list, aggregatedList, get,
        delete, setMetadata, setLabels) in ``zone`` (``*``: any) with ``failure``."""
        with self.lock:
            self.failures.setdefault((kind, zone), []).extend([failure] * times)

    def calls(self, method: str, pattern: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def inserted(self) -> list[Any]:
        """The bodies of every insert request, in order."""
        return [r.body for r in self.calls("POST", r"/instances$")]

    def metadata(self, zone: str, name: str) -> dict[str, str]:
        with self.lock:
            items = self.instances[(zone, name)].get("metadata", {}).get("items", [])
            return {i["key"]: i.get("value", "") for i in items}

    def all_names(self) -> list[str]:
        with self.lock:
            return sorted(name for _, name in self.instances)

    def _take_failure(self, kind: str, zone: str) -> Failure | None:
        with self.lock:
            for key in ((kind, zone), (kind, "*")):
                queue = self.failures.get(key)
                if queue:
                    return queue.pop(0)
        return None

    # ----------------------------------------------------------------- HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if parts.path == "/token":
                    self._reply(
                        200,
                        {"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"},
                    )
                    return
                body: Any = None
                if raw:
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = raw.decode(errors="replace")
                request = Request(
                    method,
                    parts.path,
                    parse_qs(parts.query),
                    body,
                    {k.lower(): v for k, v in self.headers.items()},
                )
                with fake.lock:
                    fake.requests.append(request)
                status, payload, headers, after = fake.route(request)
                self._reply(status, payload, headers)
                if after is not None:
                    after()

            def _reply(
                self, status: int, payload: Any, headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload, indent=1).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        return Handler

    # ----------------------------------------------------------------- routing

    Reply = tuple[int, Any, dict[str, str], Callable[[], None] | None]

    def route(self, r: Request) -> Reply:
        prefix = f"/compute/v1/projects/{self.project}"
        if not r.path.startswith(prefix):
            return self._error(404, "notFound", f"The resource '{r.path}' was not found")
        path = r.path[len(prefix) :]
        routes: list[tuple[str, str, Callable[..., FakeCompute.Reply]]] = [
            ("GET", r"/aggregated/instances", self._aggregated),
            ("GET", r"/regions/([^/]+)", self._region),
            ("POST", r"/zones/([^/]+)/instances", self._insert),
            ("GET", r"/zones/([^/]+)/instances", self._list),
            ("GET", r"/zones/([^/]+)/instances/([^/]+)", self._get),
            ("DELETE", r"/zones/([^/]+)/instances/([^/]+)", self._delete),
            ("POST", r"/zones/([^/]+)/instances/([^/]+)/setMetadata", self._set_metadata),
            ("POST", r"/zones/([^/]+)/instances/([^/]+)/setLabels", self._set_labels),
            ("GET", r"/zones/([^/]+)/instances/([^/]+)/getGuestAttributes", self._guest),
            ("GET", r"/zones/([^/]+)/operations/([^/]+)", self._poll),
            ("POST", r"/zones/([^/]+)/operations/([^/]+)/wait", self._poll),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method == r.method and match:
                with self.lock:
                    return handler(r, *match.groups())
        return self._error(404, "notFound", f"no route for {r.method} {path}")

    def _error(
        self,
        status: int,
        reason: str,
        message: str,
        domain: str = "global",
        headers: dict[str, str] | None = None,
    ) -> Reply:
        payload = {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"message": message, "domain": domain, "reason": reason}],
            }
        }
        return status, payload, headers or {}, None

    def _failure_reply(self, failure: Failure) -> Reply:
        headers = (
            {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else None
        )
        return self._error(failure.status, failure.reason, failure.message, failure.domain, headers)

    def _zone_url(self, zone: str) -> str:
        return f"{API}/projects/{self.project}/zones/{zone}"

    def _operation(
        self, zone: str, kind: str, target: str, failure: Failure | None = None
    ) -> Reply:
        """A new operation; DONE at once unless ``pending_polls``; failed if ``failure``."""
        name = f"operation-{secrets.token_hex(6)}-{next(self._ids)}"
        data = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": name,
            "zone": self._zone_url(zone),
            "operationType": kind,
            "targetLink": f"{self._zone_url(zone)}/instances/{target}",
            "status": "RUNNING" if self.pending_polls else "DONE",
            "progress": 0 if self.pending_polls else 100,
            "insertTime": "2026-12-06T12:00:00.000-08:00",
            "selfLink": f"{self._zone_url(zone)}/operations/{name}",
        }
        final: dict[str, Any] = {}
        if failure is not None:
            error: dict[str, Any] = {"code": failure.reason, "message": failure.message}
            if failure.quota_metric:
                error["errorDetails"] = [
                    {
                        "quotaInfo": {
                            "metricName": f"compute.googleapis.com/{failure.quota_metric.lower()}",
                            "limitName": (
                                f"{failure.quota_metric.replace('_', '-')}-per-project-region"
                            ),
                            "limit": 8,
                        }
                    }
                ]
            final = {
                "error": {"errors": [error]},
                "httpErrorStatusCode": failure.status,
                "httpErrorMessage": "FORBIDDEN" if failure.status == 403 else "SERVICE UNAVAILABLE",
            }
        operation = _Operation(data, self.pending_polls, final)
        self._operations[name] = operation
        if not self.pending_polls:
            data.update(final)
        return 200, data, {}, None

    def _poll(self, r: Request, zone: str, name: str) -> Reply:
        operation = self._operations.get(name)
        if operation is None:
            return self._error(404, "notFound", f"The resource 'operations/{name}' was not found")
        if operation.data["status"] != "DONE":
            operation.polls_left -= 1
            if operation.polls_left <= 0:
                operation.data.update(status="DONE", progress=100, **operation.final)
        return 200, operation.data, {}, None

    # ----------------------------------------------------------------- instances

    def _insert(self, r: Request, zone: str) -> Reply:
        # requestId as GCE documents it: a UUID (else 400), and a request repeating one is
        # not carried out again but answered with the first request's operation, as long as
        # the fake has not forgotten it (``forget_request_ids``: GCE keeps them about 60 min).
        request_id = (r.query.get("requestId") or [""])[0]
        if request_id:
            try:
                uuid.UUID(request_id)
            except ValueError:
                return self._error(
                    400,
                    "invalid",
                    f"Invalid value for field 'requestId': '{request_id}'. Must be a valid UUID.",
                )
            earlier = self.request_ids.get(request_id)
            if earlier is not None:
                return 200, self._operations[earlier].data, {}, None
        reply = self._insert_new(r, zone)
        if request_id and reply[0] == 200:
            self.request_ids[request_id] = reply[1]["name"]
        return reply

    def forget_request_ids(self) -> None:
        """Forget every request id, as GCE does after about an hour."""
        with self.lock:
            self.request_ids.clear()

    def _insert_new(self, r: Request, zone: str) -> Reply:
        failure = self._take_failure("insert", zone)
        if failure is not None and not failure.in_operation:
            return self._failure_reply(failure)
        body = dict(r.body)
        name = body["name"]
        if (zone, name) in self.instances:
            return self._error(409, "alreadyExists", f"The resource '{name}' already exists")
        if failure is not None:
            return self._operation(zone, "insert", name, failure)
        n = next(self._addresses)
        address = self.address or f"127.100.{n // 250}.{n % 250 + 2}"
        nics = []
        for nic in body.get("networkInterfaces", []):
            nic = dict(nic, networkIP=address, name="nic0")
            if nic.get("accessConfigs"):
                nic["accessConfigs"] = [
                    dict(c, natIP=f"127.200.{n // 250}.{n % 250 + 2}") for c in nic["accessConfigs"]
                ]
            nics.append(nic)
        machine_type = body.get("machineType", "")
        instance = {
            **body,
            "kind": "compute#instance",
            "id": str(next(self._ids)),
            "status": "RUNNING",
            "zone": self._zone_url(zone),
            "machineType": f"{API}/projects/{self.project}/{machine_type}",
            "networkInterfaces": nics,
            "creationTimestamp": "2026-12-06T12:00:00.000-08:00",
            "selfLink": f"{self._zone_url(zone)}/instances/{name}",
            "labelFingerprint": _fingerprint(),
            "metadata": {
                **body.get("metadata", {}),
                "fingerprint": _fingerprint(),
                "kind": "compute#metadata",
            },
        }
        self.instances[(zone, name)] = instance
        items = {i["key"]: i.get("value") for i in body.get("metadata", {}).get("items", [])}
        if self.publish_host_keys and items.get("enable-guest-attributes") == "TRUE":
            blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + secrets.token_bytes(32)
            published = self.host_key or base64.b64encode(blob).decode()
            self.host_keys[(zone, name)] = {"ssh-ed25519": published}
        return self._operation(zone, "insert", name)

    def _matches(self, instance: dict[str, Any], expression: str) -> bool:
        """GCE's filter language, the part the driver uses: ``labels.K=V`` and
        ``labels.K:*`` (optionally quoted, spaces around the operator)."""
        if not expression:
            return True
        match = re.fullmatch(r'\s*labels\.([a-z0-9_-]+)\s*(=|:)\s*"?([^"]*)"?\s*', expression)
        if match is None:
            raise ValueError(f"filter the fake does not understand: {expression!r}")
        key, op, value = match.groups()
        labels = instance.get("labels", {})
        if op == ":" and value == "*":
            return key in labels
        return labels.get(key) == value

    def _page(self, r: Request, entries: list[Any]) -> tuple[list[Any], str | None]:
        size = int(r.query.get("maxResults", ["500"])[0])
        if self.page_size:
            size = min(size, self.page_size)
        start = int(r.query.get("pageToken", ["0"])[0] or 0)
        end = start + size
        return entries[start:end], (str(end) if end < len(entries) else None)

    def _filtered(self, r: Request, zone: str | None) -> list[tuple[str, dict[str, Any]]] | str:
        expression = r.query.get("filter", [""])[0]
        try:
            return [
                (z, i)
                for (z, _), i in sorted(self.instances.items())
                if (zone is None or z == zone) and self._matches(i, expression)
            ]
        except ValueError as exc:
            return str(exc)

    def _list(self, r: Request, zone: str) -> Reply:
        failure = self._take_failure("list", zone)
        if failure is not None:
            return self._failure_reply(failure)
        found = self._filtered(r, zone)
        if isinstance(found, str):
            return self._error(400, "invalid", found)
        page, token = self._page(r, [i for _, i in found])
        payload: dict[str, Any] = {"kind": "compute#instanceList", "items": page}
        if token:
            payload["nextPageToken"] = token
        return 200, payload, {}, None

    def _aggregated(self, r: Request) -> Reply:
        failure = self._take_failure("aggregatedList", "*")
        if failure is not None:
            return self._failure_reply(failure)
        found = self._filtered(r, None)
        if isinstance(found, str):
            return self._error(400, "invalid", found)
        page, token = self._page(r, found)
        items: dict[str, Any] = {}
        for zone, instance in page:
            items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(instance)
        items.setdefault(
            "zones/us-east1-b",
            {
                "warning": {
                    "code": "NO_RESULTS_ON_PAGE",
                    "message": "There are no results for scope 'zones/us-east1-b' on this page.",
                }
            },
        )
        payload: dict[str, Any] = {"kind": "compute#instanceAggregatedList", "items": items}
        if token:
            payload["nextPageToken"] = token
        return 200, payload, {}, None

    def _lookup(self, zone: str, name: str) -> dict[str, Any] | None:
        return self.instances.get((zone, name))

    def _not_found(self, zone: str, name: str) -> Reply:
        return self._error(
            404,
            "notFound",
            f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' was not found",
        )

    def _region(self, r: Request, region: str) -> Reply:
        """regions.get: the region with its quotas (failures under the kind "region")."""
        failure = self._take_failure("region", region)
        if failure is not None:
            return self._failure_reply(failure)
        if region not in self.region_quotas:
            return self._error(404, "notFound", f"The resource 'regions/{region}' was not found")
        return (
            200,
            {
                "kind": "compute#region",
                "name": region,
                "status": "UP",
                "quotas": self.region_quotas[region],
            },
            {},
            None,
        )

    def _get(self, r: Request, zone: str, name: str) -> Reply:
        failure = self._take_failure("get", zone)
        if failure is not None:
            return self._failure_reply(failure)
        instance = self._lookup(zone, name)
        if instance is None:
            return self._not_found(zone, name)
        hook = self.after_get
        after = (lambda: hook(zone, name)) if hook is not None else None
        return 200, json.loads(json.dumps(instance)), {}, after

    def _delete(self, r: Request, zone: str, name: str) -> Reply:
        failure = self._take_failure("delete", zone)
        if failure is not None:
            return self._failure_reply(failure)
        if self._lookup(zone, name) is None:
            return self._not_found(zone, name)
        del self.instances[(zone, name)]
        self.host_keys.pop((zone, name), None)
        return self._operation(zone, "delete", name)

    def _set_metadata(self, r: Request, zone: str, name: str) -> Reply:
        failure = self._take_failure("setMetadata", zone)
        if failure is not None and not failure.in_operation:
            return self._failure_reply(failure)
        instance = self._lookup(zone, name)
        if instance is None:
            return self._not_found(zone, name)
        if r.body.get("fingerprint") != instance["metadata"]["fingerprint"]:
            return self._error(
                412,
                "conditionNotMet",
                "Supplied fingerprint does not match current metadata fingerprint.",
            )
        if failure is not None:
            return self._operation(zone, "setMetadata", name, failure)
        instance["metadata"] = {
            "kind": "compute#metadata",
            "fingerprint": _fingerprint(),
            "items": r.body.get("items", []),
        }
        return self._operation(zone, "setMetadata", name)

    def _set_labels(self, r: Request, zone: str, name: str) -> Reply:
        failure = self._take_failure("setLabels", zone)
        if failure is not None:
            return self._failure_reply(failure)
        instance = self._lookup(zone, name)
        if instance is None:
            return self._not_found(zone, name)
        if r.body.get("labelFingerprint") != instance["labelFingerprint"]:
            return self._error(
                412,
                "conditionNotMet",
                "Labels fingerprint either invalid or resource labels have changed",
            )
        instance["labels"] = r.body.get("labels", {})
        instance["labelFingerprint"] = _fingerprint()
        return self._operation(zone, "setLabels", name)

    def _guest(self, r: Request, zone: str, name: str) -> Reply:
        if self._lookup(zone, name) is None:
            return self._not_found(zone, name)
        keys = self.host_keys.get((zone, name))
        query = r.query.get("queryPath", [""])[0]
        if not keys or query != "hostkeys/":
            return self._error(404, "notFound", "The resource 'guestAttributes' was not found")
        return (
            200,
            {
                "kind": "compute#guestAttributes",
                "queryPath": query,
                "queryValue": {
                    "items": [
                        {"namespace": "hostkeys", "key": key, "value": value}
                        for key, value in keys.items()
                    ]
                },
            },
            {},
            None,
        )

    # ----------------------------------------------------------------- in-place changes

    def change_metadata(self, zone: str, name: str, key: str, value: str) -> None:
        """Someone else's change to an instance's metadata (new fingerprint)."""
        with self.lock:
            instance = self.instances[(zone, name)]
            items = [i for i in instance["metadata"].get("items", []) if i["key"] != key]
            items.append({"key": key, "value": value})
            instance["metadata"] = {
                "kind": "compute#metadata",
                "fingerprint": _fingerprint(),
                "items": items,
            }

    def set_status(self, zone: str, name: str, status: str) -> None:
        with self.lock:
            self.instances[(zone, name)]["status"] = status

    def host_key_blob(self, zone: str, name: str) -> bytes:
        with self.lock:
            return base64.b64decode(self.host_keys[(zone, name)]["ssh-ed25519"])

    @staticmethod
    def key_hash(blob: bytes) -> str:
        return hashlib.sha256(blob).hexdigest()
