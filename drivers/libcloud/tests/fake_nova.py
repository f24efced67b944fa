"""A fake of the OpenStack Compute (Nova) API, enough for libcloud's OpenStack driver: flavors,
servers with metadata and user data, and errors queued with Nova's own codes and messages.

It listens on 127.0.0.1 only.  Clients skip Keystone by passing a token and this base URL
(libcloud's ``ex_force_auth_token`` and ``ex_force_base_url``).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FLAVORS = [
    {
        "id": "m1.small",
        "name": "m1.small",
        "ram": 2048,
        "disk": 20,
        "vcpus": 1,
        "links": [],
        "OS-FLV-EXT-DATA:ephemeral": 0,
        "swap": "",
        "rxtx_factor": 1.0,
    },
    {
        "id": "m1.large",
        "name": "m1.large",
        "ram": 8192,
        "disk": 80,
        "vcpus": 4,
        "links": [],
        "OS-FLV-EXT-DATA:ephemeral": 0,
        "swap": "",
        "rxtx_factor": 1.0,
    },
]


class FakeNova:
    """The fake's state; every field guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.servers: dict[str, dict[str, Any]] = {}
        self.user_data: dict[str, str] = {}
        self.failures: list[tuple[int, dict[str, Any], dict[str, str]]] = []
        #: faults the next creates' servers turn ERROR with, after scheduling
        self.faults: list[dict[str, Any]] = []
        #: how many reads a new server stays in BUILD (scheduling) before its fate shows
        self.build_reads = 0
        self._pending: dict[str, tuple[int, dict[str, Any] | None]] = {}
        self._next_ip = 10
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}/v2.1/tenant"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def fail_next_create(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        with self.lock:
            self.failures.append((status, body, headers or {}))

    def fault_next_create(self, message: str, code: int = 500) -> None:
        """The next create is accepted (202) and its server then goes to ERROR with this fault,
        as Nova reports a failed scheduling ("No valid host was found") after answering."""
        with self.lock:
            self.faults.append(
                {"code": code, "message": message, "created": "2026-01-01T00:00:01Z", "details": ""}
            )

    # ----------------------------------------------------------------- requests

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        path = path.split("?", 1)[0].removeprefix("/v2.1/tenant")
        with self.lock:
            if method == "GET" and path == "/flavors/detail":
                return 200, {"flavors": FLAVORS}, {}
            if method == "GET" and path == "/servers/detail":
                for server_id in list(self._pending):
                    self._advance(server_id)
                return 200, {"servers": list(self.servers.values())}, {}
            if method == "POST" and path == "/servers":
                if self.failures:
                    return self.failures.pop(0)
                return self._create(body["server"])
            match = re.fullmatch(r"/servers/([^/]+)(/metadata)?", path)
            if match is None:
                return 404, {"itemNotFound": {"message": f"no {path}", "code": 404}}, {}
            server = self.servers.get(match.group(1))
            if server is None:
                return (
                    404,
                    {"itemNotFound": {"message": "Instance could not be found", "code": 404}},
                    {},
                )
            if method == "GET" and not match.group(2):
                self._advance(server["id"])
                return 200, {"server": server}, {}
            if method == "PUT" and match.group(2):
                server["metadata"] = dict(body["metadata"])
                return 200, {"metadata": server["metadata"]}, {}
            if method == "DELETE" and not match.group(2):
                del self.servers[server["id"]]
                return 204, None, {}
        return 405, {"badRequest": {"message": "unsupported", "code": 405}}, {}

    def _advance(self, server_id: str) -> None:
        """One read of a server still being scheduled: after ``build_reads`` reads it is
        placed (ACTIVE) or, with a queued fault, in ERROR with that fault and no address."""
        pending = self._pending.get(server_id)
        if pending is None:
            return
        reads, fault = pending
        if reads > 0:
            self._pending[server_id] = (reads - 1, fault)
            return
        del self._pending[server_id]
        server = self.servers[server_id]
        if fault is None:
            server.update(
                {"status": "ACTIVE", "OS-EXT-STS:task_state": None, "OS-EXT-STS:vm_state": "active"}
            )
        else:
            server.update(
                {
                    "status": "ERROR",
                    "OS-EXT-STS:task_state": None,
                    "OS-EXT-STS:vm_state": "error",
                    "fault": fault,
                    "addresses": {},
                }
            )

    def _create(self, spec: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        server_id = str(uuid.uuid4())
        self._next_ip += 1
        self.servers[server_id] = {
            "id": server_id,
            "name": spec["name"],
            "status": "ACTIVE",
            "tenant_id": "tenant",
            "user_id": "user",
            "metadata": dict(spec.get("metadata") or {}),
            "flavor": {"id": spec["flavorRef"], "links": []},
            "image": {"id": spec.get("imageRef", ""), "links": []},
            "addresses": {
                "private": [
                    {"addr": f"10.0.0.{self._next_ip}", "version": 4, "OS-EXT-IPS:type": "fixed"}
                ]
            },
            "created": "2026-01-01T00:00:00Z",
            "updated": "2026-01-01T00:00:00Z",
            "hostId": "",
            "key_name": spec.get("key_name"),
            "links": [{"rel": "self", "href": f"{self.base_url}/servers/{server_id}"}],
            "accessIPv4": "",
            "accessIPv6": "",
            "OS-EXT-STS:task_state": None,
            "OS-EXT-STS:vm_state": "active",
            "OS-EXT-STS:power_state": 1,
        }
        self.user_data[server_id] = base64.b64decode(spec.get("user_data", "")).decode()
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None or self.build_reads > 0:
            # Scheduled after the answer: BUILD until read build_reads more times.  (libcloud
            # reads the server once itself, right after the POST.)
            self.servers[server_id].update(
                {
                    "status": "BUILD",
                    "OS-EXT-STS:vm_state": "building",
                    "OS-EXT-STS:task_state": "scheduling",
                }
            )
            self._pending[server_id] = (self.build_reads, fault)
        return 202, {"server": {"id": server_id, "links": [], "adminPass": "x"}}, {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                status, reply, headers = fake.handle(self.command, self.path, body)
                data = b"" if reply is None else json.dumps(reply).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the tests read the fake's state, not its log."""

        return Handler
