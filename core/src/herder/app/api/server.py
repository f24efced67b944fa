"""The management API's HTTP server: the ASGI application of :mod:`herder.app.api.app` on uvicorn.

uvicorn speaks HTTP/1.1 with keep-alive on an event loop, so idle and slow clients cost a
coroutine each, not a thread; the route handlers, which call the engine's blocking methods, run
on a bounded pool of worker threads.  herder adds what a management endpoint facing a network
needs and uvicorn leaves to its user:

- a **deadline for a whole exchange** (``api.request_timeout``): a client that has not sent its
  request and read the answer by then is cut off, with a 408 if nothing was answered yet, so a
  crowd of slow clients cannot hold connections open for ever;
- a bound on connections (``api.max_connections``; beyond it, 503) and a deep listen backlog;
- **TLS** from ``api.tls_certificate`` and ``api.tls_key``;
- start-up errors (an address in use, a certificate that does not load) raised at once, under
  the configuration key that caused them, instead of in a background thread.

The server runs in its own thread with its own event loop: the dispatcher is threaded, and
``herder serve`` and the tests start and stop the API next to it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from typing import TYPE_CHECKING

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from herder.app.api.app import MAX_BODY, create_app
from herder.app.api.routes import NOT_CONFIGURED, ManagementAPI
from herder.config import Config
from herder.config import parse_listen as config_parse_listen
from herder.runtime import Runtime

if TYPE_CHECKING:
    from herder.engine.interface import Engine

log = logging.getLogger("herder.app.api")

#: Worker threads running route handlers at once; more requests wait for one.
WORKER_THREADS = 32
#: Connections waiting to be accepted before the kernel refuses new ones.
BACKLOG = 1024
#: Seconds an idle keep-alive connection is kept open.
KEEP_ALIVE = 5
#: Seconds the server waits for requests in flight when it stops.
GRACEFUL_STOP = 5


class APIServerError(Exception):
    """The server cannot start (bad address, port in use, a certificate that does not load)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """:func:`herder.config.parse_listen`, failing as :class:`APIServerError`."""
    try:
        return config_parse_listen(listen)
    except ValueError as exc:
        raise APIServerError(str(exc)) from None


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each exchange.

    The clock starts with the first byte of a request (or when the connection opens) and stops
    when its response is complete; between requests uvicorn's keep-alive timeout applies.  A
    client still sending, or not reading, when the deadline passes is disconnected; if nothing
    was answered yet it is told so with a 408 first.
    """

    #: Seconds for one whole exchange; set per server by :class:`APIServer`.
    deadline: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._peer_done = False
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A response goes out as two writes (head, body); with Nagle's algorithm the second
            # waits for the client's delayed ACK of the first: 40 ms on every request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._arm_deadline()

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """A client that shuts down its side after sending a whole request still gets the
        answer (then the connection closes); one that stops in the middle of its body is told
        that the body was short."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE):
                self._peer_done = True
                return True
            if self.conn.their_state is h11.SEND_BODY and not cycle.response_started:
                self._refuse(b"400 Bad Request", b"request body shorter than its Content-Length")
        return None

    def data_received(self, data: bytes) -> None:
        if self._deadline_timer is None:
            self._arm_deadline()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm_deadline()
        if self._peer_done:
            self.transport.close()  # after what was written: the client sends nothing more
            return
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        self._deadline_timer = self.loop.call_later(self.deadline, self._deadline_passed)

    def _disarm_deadline(self) -> None:
        timer, self._deadline_timer = self._deadline_timer, None
        if timer is not None:
            timer.cancel()

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        cycle = self.cycle
        if self.transport.is_closing():
            return
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self._refuse(b"408 Request Timeout", b"request not received within the deadline")
        self.transport.close()

    def _refuse(self, status: bytes, message: bytes) -> None:
        """Answer outside the request cycle (none started, or it cannot finish), then close."""
        body = b'{"error": "' + message + b'"}'
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()


class APIServer:
    """Serves an engine's management API on ``api.listen``
    (:class:`herder.engine.interface.Engine`).

    ``runtime`` is the clock used for durations such as ``time_in_state`` (the engine's by
    default).  ``token`` overrides the configured management token (tests, embedding).  The
    instance routes are served only when the engine has instances (``Engine.has_instances``).
    """

    def __init__(
        self,
        dispatcher: Engine,
        config: Config,
        runtime: Runtime | None = None,
        *,
        token: str | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self.config = config
        self.listen = parse_listen(config.api.listen)
        self.api = ManagementAPI(dispatcher, runtime)
        self._token = config.api.resolve_management_token() if token is None else token
        self.app = create_app(
            self.api, self._token, with_instances=dispatcher.has_instances, max_body=max_body
        )
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def token_configured(self) -> bool:
        return bool(self._token)

    @property
    def tls(self) -> bool:
        return bool(self.config.api.tls_certificate)

    def start(self) -> None:
        """Bind and serve in a background thread; raises :class:`APIServerError` if it cannot."""
        if self._server is not None:
            return
        settings = self._uvicorn_config()
        try:
            settings.load()  # builds the TLS context: a bad certificate fails here, not later
        except (OSError, ssl.SSLError) as exc:
            raise APIServerError(
                f"api.tls_certificate / api.tls_key: cannot load "
                f"{self.config.api.tls_certificate}: {getattr(exc, 'strerror', None) or exc}"
            ) from exc
        sock = self._bind()
        server = uvicorn.Server(settings)
        ready = threading.Event()
        self._server, self._socket = server, sock
        self._thread = threading.Thread(
            target=self._run, args=(server, sock, ready), name="herder-api", daemon=True
        )
        self._thread.start()
        ready.wait(timeout=30.0)
        if not server.started:
            self.stop()
            raise APIServerError(f"the API server on {self.url_for(sock)} did not start")
        if not self._token:
            log.warning("management API on %s refuses every request: %s", self.url, NOT_CONFIGURED)
        else:
            log.info("management API listening on %s", self.url)

    def _uvicorn_config(self) -> uvicorn.Config:
        api = self.config.api
        return uvicorn.Config(
            self.app,
            http=type("Protocol", (DeadlineProtocol,), {"deadline": api.request_timeout}),
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            backlog=BACKLOG,
            timeout_keep_alive=KEEP_ALIVE,
            timeout_graceful_shutdown=GRACEFUL_STOP,
            limit_concurrency=api.max_connections,
            ssl_certfile=api.tls_certificate or None,
            ssl_keyfile=api.tls_key or None,
        )

    def _bind(self) -> socket.socket:
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
        except OSError as exc:
            raise APIServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        return sock

    @staticmethod
    def _run(server: uvicorn.Server, sock: socket.socket, ready: threading.Event) -> None:
        async def serve() -> None:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
            loop = asyncio.get_running_loop()
            # ``started`` is set once the socket is served; tell start() then (or on failure).
            waiter = loop.create_task(_signal_when_started(server, ready))
            try:
                await server.serve(sockets=[sock])
            finally:
                waiter.cancel()
                ready.set()

        try:
            asyncio.run(serve())
        except Exception:
            log.exception("management API server stopped on an error")
            ready.set()

    def stop(self) -> None:
        """Stop accepting requests, finish those in flight (a few seconds at most), close."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=GRACEFUL_STOP + 5.0)
        if self._socket is not None:
            self._socket.close()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound (the port is chosen by the OS for port 0)."""
        if self._socket is None:
            raise APIServerError("the API server is not running")
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """A URL a client on this machine can use (the wildcard address becomes loopback)."""
        if self._socket is None:
            raise APIServerError("the API server is not running")
        return self.url_for(self._socket)

    def url_for(self, sock: socket.socket) -> str:
        host, port = sock.getsockname()[:2]
        if host in ("", "0.0.0.0"):  # noqa: S104 (comparing, not binding)
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def _signal_when_started(server: uvicorn.Server, ready: threading.Event) -> None:
    while not server.started:
        await asyncio.sleep(0.005)
    ready.set()
