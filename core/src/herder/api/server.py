"""The management API's HTTP server: stdlib ``ThreadingHTTPServer``, one thread per request.

The server does the HTTP part only — routing through :class:`~herder.api.routes.Router`,
authentication, reading and capping bodies, turning errors into JSON — and leaves what each route
does to :class:`~herder.api.routes.ManagementAPI`.

Authentication (SPEC §10.2, made stricter): every route but the health check needs
``Authorization: Bearer <management token>``.  With no token configured the API refuses
everything but the health check with 403 and says why, as Arvados does; no token is 401, a wrong
one 403.  Tokens are compared in constant time.

Nothing a client sends produces a 500: malformed requests are 4xx with a JSON body naming the
field; a 500 means a bug in herder, and is logged with its traceback.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from herder.api.routes import (
    APIError,
    ManagementAPI,
    Request,
    Response,
    Route,
    Router,
    parse_query,
)
from herder.config import Config
from herder.config import parse_listen as config_parse_listen
from herder.runtime import Runtime

if TYPE_CHECKING:
    from collections.abc import Callable

    from herder.dispatcher import Dispatcher

log = logging.getLogger(__name__)

#: Largest request body accepted; a container spec is a few KiB.
MAX_BODY = 1 << 20
#: Seconds a connection may sit idle (or dribble its body) before it is dropped.
SOCKET_TIMEOUT = 30.0
NOT_CONFIGURED = (
    "management API authentication is not configured: set api.management_token in the config "
    "or the environment variable named by api.management_token_env"
)

def storage_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the queue's storage cannot take a write now (a full disk, a quota,
    a read-only or locked file): the client should retry later, nothing is wrong with the
    request, and it is not a bug."""
    if isinstance(exc, OSError) and not isinstance(exc, sqlite3.Error):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    text = str(exc).lower()
    return any(
        words in text
        for words in ("disk is full", "database is locked", "readonly database", "disk i/o")
    )


class APIServerError(Exception):
    """The server cannot start (bad address, port in use)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """:func:`herder.config.parse_listen`, failing as :class:`APIServerError`."""
    try:
        return config_parse_listen(listen)
    except ValueError as exc:
        raise APIServerError(str(exc)) from None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], server: APIServer) -> None:
        import socket

        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.api_server = server
        super().__init__(address, _Handler)


class APIServer:
    """Serves a :class:`~herder.dispatcher.Dispatcher`'s management API on ``api.listen``.

    ``runtime`` is the clock used for durations such as ``time_in_state`` (the dispatcher's by
    default).  ``token`` overrides the configured management token (tests, embedding);
    ``routes`` replaces the route table (extra pages add their routes to
    :data:`~herder.api.routes.ROUTES`).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        config: Config,
        runtime: Runtime | None = None,
        *,
        token: str | None = None,
        routes: Sequence[Route] | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self.config = config
        self.listen = parse_listen(config.api.listen)
        self.app = ManagementAPI(dispatcher, runtime, routes)
        self.router = Router(self.app.routes)
        self.max_body = max_body
        self._token = (config.api.resolve_management_token() if token is None else token).encode()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def token_configured(self) -> bool:
        return bool(self._token)

    def start(self) -> None:
        """Bind and serve in a background thread; raises :class:`APIServerError` if it cannot."""
        if self._httpd is not None:
            return
        try:
            self._httpd = _HTTPServer(self.listen, self)
        except OSError as exc:
            host, port = self.listen
            raise APIServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        httpd = self._httpd
        self._thread = threading.Thread(
            # A short poll interval makes stop() prompt; an idle poll costs almost nothing.
            target=lambda: httpd.serve_forever(poll_interval=0.05), name="herder-api", daemon=True
        )
        self._thread.start()
        if not self._token:
            log.warning("management API on %s refuses every request: %s", self.url, NOT_CONFIGURED)
        else:
            log.info("management API listening on %s", self.url)

    def stop(self) -> None:
        """Stop accepting requests and close the socket (requests in flight finish on their own)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound (the port is chosen by the OS for port 0)."""
        if self._httpd is None:
            raise APIServerError("the API server is not running")
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """A URL a client on this machine can use (the wildcard address becomes loopback)."""
        host, port = self.address
        if host in ("", "0.0.0.0"):  # noqa: S104 (comparing, not binding)
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # ---- per request (called on the request's thread)

    def authorize(self, header: str | None) -> None:
        """Raise 401/403 unless ``header`` carries the management token."""
        if not self._token:
            raise APIError(403, NOT_CONFIGURED)
        if not header:
            raise APIError(
                401, "authorization required: send Authorization: Bearer <management token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, credential = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise APIError(
                401, "authorization required: send Authorization: Bearer <management token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(credential.strip().encode("utf-8", "replace"), self._token):
            raise APIError(403, "the management token is not valid")

    def handle(
        self, method: str, target: str, headers: Any, read_body: Callable[[int], bytes]
    ) -> Response:
        """Route, authorize, read the body, run the handler; every failure becomes a response."""
        try:
            return self._handle(method, target, headers, read_body)
        except APIError as exc:
            return Response(
                exc.status, json.dumps(exc.body()).encode(), "application/json", exc.headers
            )
        except (sqlite3.OperationalError, OSError) as exc:
            if not storage_unavailable(exc):
                log.exception("management API: %s %s failed", method, urlsplit(target).path[:200])
                return Response(500, b'{"error": "internal server error"}')
            log.error("management API: %s %s: the queue cannot be written: %s",
                      method, urlsplit(target).path[:200], exc)
            body = {"error": f"the queue cannot be written right now: {exc}; retry later"}
            return Response(503, json.dumps(body).encode(), "application/json",
                            {"Retry-After": "30"})
        except Exception:
            log.exception("management API: %s %s failed", method, urlsplit(target).path[:200])
            return Response(500, b'{"error": "internal server error"}')

    def _handle(
        self, method: str, target: str, headers: Any, read_body: Callable[[int], bytes]
    ) -> Response:
        url = urlsplit(target)
        route, params = self.router.match(method, url.path)
        if route.auth:
            self.authorize(headers.get("Authorization"))
        body = self._read_body(method, headers, read_body)
        query = parse_qs(url.query, keep_blank_values=True, errors="replace", max_num_fields=100)
        req = Request(method, url.path, params, parse_query(route.query, query), body)
        return route.handler(self.app, req)

    def _read_body(
        self, method: str, headers: Any, read_body: Callable[[int], bytes]
    ) -> bytes:
        """The request body, within :attr:`max_body`; bodies of GET requests are ignored."""
        if headers.get("Transfer-Encoding"):
            raise APIError(411, "chunked request bodies are not supported: send Content-Length")
        raw = headers.get("Content-Length")
        if raw is None or method != "POST":
            return b""
        if not raw.strip().isdigit():
            raise APIError(400, "invalid Content-Length header", field="Content-Length")
        length = int(raw)
        if length > self.max_body:
            raise APIError(413, f"request body larger than {self.max_body} bytes")
        body = read_body(length)
        if len(body) != length:
            raise APIError(400, "request body shorter than its Content-Length")
        return body


class _Handler(BaseHTTPRequestHandler):
    """Adapts http.server's handler to :meth:`APIServer.handle`; one instance per connection.

    HTTP/1.0 semantics (one request per connection) keep it simple: an unread body or a refused
    request never leaves a connection in an unknown state.
    """

    server: _HTTPServer
    timeout = SOCKET_TIMEOUT

    def version_string(self) -> str:
        return "herder"

    def __getattr__(self, name: str) -> Any:
        # Any method (PUT, DELETE, FOO, ...) is routed: the router answers 405 for the ones a
        # path does not support, where http.server would answer 501.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        resp = self.server.api_server.handle(
            self.command, self.path, self.headers, self.rfile.read
        )
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by http.server itself (bad request line, huge headers), as JSON.

        An HTTP version it does not speak is the client's mistake: 400, not 505.
        """
        if code >= 500:
            code = HTTPStatus.BAD_REQUEST
        # http.server falls back to HTTP/0.9 (no status line) for a request line it cannot
        # read; a client deserves a status it can parse.
        self.request_version = "HTTP/1.0"
        text = message or HTTPStatus(code).phrase
        body = json.dumps({"error": text}).encode()
        self.send_response(code, text)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
