"""A small fake of the Azure Resource Manager REST API, served over HTTPS on 127.0.0.1.

It speaks what the driver's real clients (azure-mgmt-compute, azure-mgmt-network,
azure-identity) send, closely enough that the driver runs its production code path:

* Microsoft Entra ID's OpenID configuration and client-credentials token endpoint, so a service
  principal signs in for real (the fake checks the secret and every bearer token);
* virtual machines, network interfaces and managed disks of resource groups: PUT, PATCH, GET,
  DELETE and paged lists (``nextLink``), with ETags and ``If-Match``;
* long-running operations as ARM runs them: ``201``/``202`` with ``Azure-AsyncOperation``,
  polled until ``Succeeded`` or ``Failed`` (the latter with an error code, as real allocation
  failures arrive);
* faults to order: synchronous errors (any status, code, message and headers, 429 with or
  without ``Retry-After`` included) and asynchronous failures of the next VM create.

Addresses handed to NICs are in 127.0.0.0/8, so nothing a test does can reach another host.
Every request is recorded (method, path, query, headers, JSON body) for tests to inspect.
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from herder.testing.tls import self_signed_certificate

TENANT = "00000000-0000-0000-0000-00000000feed"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "s3cr3t-Value~from.a.file"

_KINDS = {
    ("microsoft.compute", "virtualmachines"): "vm",
    ("microsoft.network", "networkinterfaces"): "nic",
    ("microsoft.compute", "disks"): "disk",
}
_RESOURCE = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"(?P<ns>[^/]+)/(?P<type>[^/]+)(?:/(?P<name>[^/]+))?$",
    re.IGNORECASE,
)


_USAGES = re.compile(
    r"/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Compute/locations/(?P<location>[^/]+)"
    r"/usages",
    re.IGNORECASE,
)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Fault:
    """A synchronous error reply for requests matching ``method`` and ``path`` (a regex)."""

    method: str
    path: str
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    details: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Operation:
    """A long-running operation: ``InProgress`` for ``polls`` polls, then its outcome."""

    polls: int
    finish: Callable[[], dict[str, Any] | None]  # returns an error body to fail, or None
    result: dict[str, Any] | None = None


class FakeARM:
    """The fake server; use as a context manager (it stops its thread on exit)."""

    def __init__(self, directory: Path, subscription: str = "sub-1") -> None:
        self.subscription = subscription
        self.cert, self._key = self_signed_certificate(directory, "fake-arm")
        self.lock = threading.RLock()
        self.requests: list[Request] = []
        self.resources: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, rg, name)
        self.faults: list[Fault] = []
        #: next VM creates fail with these (code, message, details)
        self.async_failures: list[tuple[str, str, list[dict[str, str]]]] = []
        self.operations: dict[str, Operation] = {}
        self.page_size = 50
        #: location -> compute usages as usage.list gives them (``{"name": {"value",
        #: "localizedValue"}, "currentValue", "limit", "unit"}``)
        self.usages: dict[str, list[dict[str, Any]]] = {}
        self.polls = 1  # InProgress answers before an operation finishes
        self.operation_retry_after = "0"  # what operation polls say; "0": the client's interval
        self.tokens: set[str] = set()
        self.token_requests: list[dict[str, str]] = []
        self.now = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)
        self._ids = itertools.count(1)
        self._addresses = itertools.count(10)
        handler = type("Handler", (_Handler,), {"fake": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self._key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        # a short poll so that shutdown() returns at once rather than within half a second
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.02,), name="fake-arm"
        )

    def __enter__(self) -> FakeARM:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    # ----------------------------------------------------------------- test helpers

    def fail(
        self,
        method: str,
        path: str,
        status: int,
        code: str,
        message: str = "",
        headers: dict[str, str] | None = None,
        times: int = 1,
        details: list[dict[str, str]] | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with an ARM error."""
        with self.lock:
            self.faults.append(
                Fault(
                    method,
                    path,
                    status,
                    code,
                    message or code,
                    dict(headers or {}),
                    times,
                    list(details or []),
                )
            )

    def fail_next_create(
        self, code: str, message: str = "", details: list[dict[str, str]] | None = None
    ) -> None:
        """The next VM create is accepted, and its operation then fails with ``code``."""
        with self.lock:
            self.async_failures.append((code, message or code, list(details or [])))

    def of_kind(self, kind: str, rg: str | None = None) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {
                name: res
                for (k, g, name), res in self.resources.items()
                if k == kind and (rg is None or g == rg.lower())
            }

    def vm(self, name: str, rg: str = "rg") -> dict[str, Any]:
        return self.resources[("vm", rg.lower(), name.lower())]

    def calls(self, method: str, pattern: str = "") -> list[Request]:
        with self.lock:
            return [
                r
                for r in self.requests
                if r.method == method and re.search(pattern, r.path, re.IGNORECASE)
            ]

    def resource_id(self, kind: str, rg: str, name: str) -> str:
        ns, typ = {
            "vm": ("Microsoft.Compute", "virtualMachines"),
            "nic": ("Microsoft.Network", "networkInterfaces"),
            "disk": ("Microsoft.Compute", "disks"),
        }[kind]
        return f"/subscriptions/{self.subscription}/resourceGroups/{rg}/providers/{ns}/{typ}/{name}"

    def add(
        self,
        kind: str,
        rg: str,
        name: str,
        properties: dict[str, Any],
        tags: dict[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Put a resource in place directly (as if made by someone else, or long ago)."""
        res = {
            "id": self.resource_id(kind, rg, name),
            "name": name,
            "location": "westeurope",
            "tags": dict(tags or {}),
            "properties": properties,
            **extra,
        }
        with self.lock:
            self.resources[(kind, rg.lower(), name.lower())] = res
        return res

    def next_address(self) -> str:
        return f"127.0.0.{next(self._addresses) % 250 + 2}"

    # ----------------------------------------------------------------- request handling

    def handle(
        self, method: str, url: str, headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, str], Any]:
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            self.requests.append(Request(method, parts.path, query, headers, body))
        if parts.path.endswith("/.well-known/openid-configuration"):
            return self._openid(parts.path)
        if parts.path.endswith("/oauth2/v2.0/token"):
            return self._token(body)
        token = headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.tokens:
            return _error(401, "InvalidAuthenticationToken", "The access token is invalid.")
        with self.lock:
            for fault in self.faults:
                if fault.method == method and re.search(fault.path, parts.path, re.IGNORECASE):
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return _error(
                        fault.status, fault.code, fault.message, fault.headers, fault.details
                    )
            if parts.path.startswith("/operations/"):
                return self._operation(parts.path.rsplit("/", 1)[1])
            usages = _USAGES.fullmatch(parts.path)
            if usages and method == "GET" and usages["sub"] == self.subscription:
                return 200, {}, {"value": self.usages.get(usages["location"].lower(), [])}
            match = _RESOURCE.match(parts.path)
            if not match or match["sub"] != self.subscription:
                return _error(404, "NotFound", f"no route {parts.path}")
            kind = _KINDS.get((match["ns"].lower(), match["type"].lower()))
            if kind is None:
                return _error(404, "NotFound", f"no resource type {match['type']}")
            rg, name = match["rg"].lower(), match["name"]
            if name is None:
                if method != "GET":
                    return _error(405, "MethodNotAllowed", method)
                return self._list(kind, rg, query)
            key = (kind, rg, name.lower())
            if method == "GET":
                res = self.resources.get(key)
                if res is None:
                    return _error(404, "ResourceNotFound", f"The resource '{name}' was not found.")
                return 200, {"ETag": res.get("etag", "")}, res
            if method == "PUT":
                return self._put(kind, match["rg"], name, key, headers, body)
            if method == "PATCH":
                return self._patch(key, headers, body)
            if method == "DELETE":
                return self._delete(kind, key)
        return _error(405, "MethodNotAllowed", method)

    def _openid(self, path: str) -> tuple[int, dict[str, str], Any]:
        tenant = path.split("/")[1]
        base = f"{self.url}/{tenant}"
        return (
            200,
            {},
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"{base}/v2.0",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            },
        )

    def _token(self, form: Any) -> tuple[int, dict[str, str], Any]:
        form = dict(form or {})
        with self.lock:
            self.token_requests.append(form)
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return (
                401,
                {},
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret.",
                },
            )
        token = f"token-{uuid.uuid4().hex}"
        with self.lock:
            self.tokens.add(token)
        return (
            200,
            {},
            {
                "token_type": "Bearer",
                "expires_in": 3600,
                "ext_expires_in": 3600,
                "access_token": token,
            },
        )

    def _list(self, kind: str, rg: str, query: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        items = [res for (k, g, _), res in sorted(self.resources.items()) if k == kind and g == rg]
        start = int(query.get("$skiptoken", "0"))
        page = items[start : start + self.page_size]
        body: dict[str, Any] = {"value": page}
        if start + self.page_size < len(items):
            api = query.get("api-version", "")
            path = self.resource_id(kind, rg, "").rstrip("/")
            body["nextLink"] = (
                f"{self.url}{path}?api-version={api}&$skiptoken={start + self.page_size}"
            )
        return 200, {}, body

    def _etag(self) -> str:
        return f'W/"{uuid.uuid4().hex[:12]}"'

    def _check_match(
        self, res: dict[str, Any] | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], Any] | None:
        wanted = headers.get("if-match")
        if wanted is None:
            return None
        if res is None or (wanted != "*" and wanted != res.get("etag")):
            return _error(
                412, "PreconditionFailed", "The specified precondition 'If-Match' failed."
            )
        return None

    def _new_operation(
        self, finish: Callable[[], dict[str, Any] | None], status: int, body: Any
    ) -> tuple[int, dict[str, str], Any]:
        op = str(next(self._ids))
        self.operations[op] = Operation(self.polls, finish)
        url = f"{self.url}/operations/{op}"
        return status, {"Azure-AsyncOperation": url, "Location": url}, body

    def _operation(self, op_id: str) -> tuple[int, dict[str, str], Any]:
        op = self.operations.get(op_id)
        if op is None:
            return _error(404, "NotFound", "no such operation")
        # ARM sends Retry-After on operation polls too; "0" leaves the client's own interval.
        if op.result is None:
            if op.polls > 0:
                op.polls -= 1
                return 200, {"Retry-After": self.operation_retry_after}, {"status": "InProgress"}
            error = op.finish()
            op.result = {"status": "Failed", "error": error} if error else {"status": "Succeeded"}
        return 200, {"Retry-After": self.operation_retry_after}, op.result

    def _put(
        self,
        kind: str,
        rg: str,
        name: str,
        key: tuple[str, str, str],
        headers: dict[str, str],
        body: Any,
    ) -> tuple[int, dict[str, str], Any]:
        existing = self.resources.get(key)
        refused = (
            self._check_match(existing, headers) if existing or "if-match" in headers else None
        )
        if refused:
            return refused
        if existing is not None:
            # A PUT on an existing resource is an update, as in ARM: tags (and what else the
            # body says) replaced.
            existing["tags"] = dict(body.get("tags") or {})
            existing["etag"] = self._etag()
            return self._new_operation(lambda: None, 200, existing)
        res: dict[str, Any] = {
            "id": self.resource_id(kind, rg, name),
            "name": name,
            "type": {
                "vm": "Microsoft.Compute/virtualMachines",
                "nic": "Microsoft.Network/networkInterfaces",
                "disk": "Microsoft.Compute/disks",
            }[kind],
            "location": body.get("location"),
            "tags": dict(body.get("tags") or {}),
            "properties": json.loads(json.dumps(body.get("properties") or {})),
            "etag": self._etag(),
        }
        for extra in ("zones", "plan", "identity"):
            if extra in body:
                res[extra] = body[extra]
        props = res["properties"]
        props["provisioningState"] = "Creating" if kind == "vm" else "Succeeded"
        if kind == "nic":
            for conf in props.get("ipConfigurations", []):
                conf.setdefault("properties", {})["privateIPAddress"] = self.next_address()
            return self._create(key, res, lambda: None)
        if kind == "vm":
            error = self.async_failures.pop(0) if self.async_failures else None
            return self._create(key, res, lambda: self._finish_vm(key, error))
        return self._create(key, res, lambda: None)

    def _create(
        self,
        key: tuple[str, str, str],
        res: dict[str, Any],
        finish: Callable[[], dict[str, Any] | None],
    ) -> tuple[int, dict[str, str], Any]:
        self.resources[key] = res
        return self._new_operation(finish, 201, res)

    def _finish_vm(
        self, key: tuple[str, str, str], error: tuple[str, str, list[dict[str, str]]] | None
    ) -> dict[str, Any] | None:
        """A VM create finishes: it attaches its NIC and makes its disks, or fails."""
        with self.lock:
            vm = self.resources[key]
            props = vm["properties"]
            rg = key[1]
            if error is not None:
                props["provisioningState"] = "Failed"
                body: dict[str, Any] = {"code": error[0], "message": error[1]}
                if error[2]:
                    body["details"] = error[2]
                return body
            props["provisioningState"] = "Succeeded"
            props["vmId"] = str(uuid.uuid4())
            props["timeCreated"] = self.now.isoformat()
            for ref in props.get("networkProfile", {}).get("networkInterfaces", []):
                nic = self._by_id(ref["id"])
                if nic is not None:
                    nic["properties"]["virtualMachine"] = {"id": vm["id"]}
            storage = props.get("storageProfile", {})
            disks = [storage.get("osDisk", {}), *storage.get("dataDisks", [])]
            for disk in disks:
                if not disk:
                    continue
                disk_name = disk.get("name") or f"{vm['name']}_OsDisk_{uuid.uuid4().hex[:8]}"
                disk["name"] = disk_name
                made = self.add(
                    "disk",
                    rg,
                    disk_name,
                    {
                        "diskState": "Attached",
                        "diskSizeGB": disk.get("diskSizeGB", 30),
                        "timeCreated": self.now.isoformat(),
                        "provisioningState": "Succeeded",
                    },
                    managedBy=vm["id"],
                )
                disk.setdefault("managedDisk", {})["id"] = made["id"]
            return None

    def _by_id(self, resource_id: str) -> dict[str, Any] | None:
        for res in self.resources.values():
            if res["id"].lower() == resource_id.lower():
                return res
        return None

    def _patch(
        self, key: tuple[str, str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, str], Any]:
        res = self.resources.get(key)
        if res is None:
            return _error(404, "ResourceNotFound", "not found")
        refused = self._check_match(res, headers)
        if refused:
            return refused
        if "tags" in body:
            res["tags"] = dict(body["tags"] or {})
        res["etag"] = self._etag()
        return self._new_operation(lambda: None, 200, res)

    def _delete(self, kind: str, key: tuple[str, str, str]) -> tuple[int, dict[str, str], Any]:
        res = self.resources.get(key)
        if res is None:
            return 204, {}, None
        if kind == "nic" and res["properties"].get("virtualMachine"):
            return _error(400, "NicInUse", "the NIC is attached to a virtual machine")
        if kind == "disk" and res.get("managedBy"):
            return _error(409, "OperationNotAllowed", "Disk is attached to VM")

        def finish() -> dict[str, Any] | None:
            with self.lock:
                self.resources.pop(key, None)
                if kind == "vm":
                    self._release(res)
            return None

        if kind == "vm":
            res["properties"]["provisioningState"] = "Deleting"
        return self._new_operation(finish, 202, None)

    def _release(self, vm: dict[str, Any]) -> None:
        """What a deleted VM leaves: resources with deleteOption Delete go with it."""
        props = vm["properties"]
        for ref in props.get("networkProfile", {}).get("networkInterfaces", []):
            nic = self._by_id(ref["id"])
            if nic is None:
                continue
            if ref.get("properties", {}).get("deleteOption") == "Delete":
                self._drop(nic)
            else:
                nic["properties"].pop("virtualMachine", None)
        storage = props.get("storageProfile", {})
        for disk in [storage.get("osDisk", {}), *storage.get("dataDisks", [])]:
            made = self._by_id(disk.get("managedDisk", {}).get("id", "")) if disk else None
            if made is None:
                continue
            if disk.get("deleteOption") == "Delete":
                self._drop(made)
            else:
                made.pop("managedBy", None)
                made["properties"]["diskState"] = "Unattached"

    def _drop(self, res: dict[str, Any]) -> None:
        for key, value in list(self.resources.items()):
            if value is res:
                del self.resources[key]


def _error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    details: list[dict[str, str]] | None = None,
) -> tuple[int, dict[str, str], Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return status, dict(headers or {}), {"error": error}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeARM

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        ctype = self.headers.get("Content-Type", "")
        body: Any = None
        if raw and "json" in ctype:
            body = json.loads(raw)
        elif raw:
            body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, reply_headers, reply = self.fake.handle(self.command, self.path, headers, body)
        data = json.dumps(reply).encode() if reply is not None else b""
        self.send_response_only(status)
        reply_headers.setdefault("Date", self.date_time_string())
        for name, value in reply_headers.items():
            self.send_header(name, value)
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass
