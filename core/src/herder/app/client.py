"""A small client for herder's management API, used by the CLI.

It speaks HTTP/1.1 itself (:class:`_APIConnection`, a few dozen lines) rather than through the
standard library's ``http.client``, which imports ``email`` and ``ssl``: about 15 ms of the start
of every command, when the goal for a ``herder submit`` is 100 ms in all.

One connection is kept open and reused for the client's requests (HTTP/1.1 keep-alive), so a
command that makes many calls (following pages, waiting on a container) pays for one TCP and TLS
handshake, not one per call.  Over HTTPS the server's certificate is verified: against the
system's authorities, or against the file named by ``$HERDER_CA_FILE``, the server's own
``api.tls_certificate`` (with a config file), or what ``herder serve`` recorded in ``client.json``.

Where the server is and which token to send are resolved in one place,
:func:`resolve_endpoint`: ``--server`` / ``--token`` flags, then ``$HERDER_SERVER`` /
``$HERDER_MANAGEMENT_TOKEN``, then the config file (``api.listen`` and its management token), and
with no config file the ``client.json`` that ``herder serve`` writes into the data directory
(:func:`default_data_dir`) for the embedded default setup, so that the CLI on the same machine
finds the server on its own.

Every failure is a :class:`ClientError` whose message says what to do about it (start the
server, pass the right token) rather than showing a traceback.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from herder import defaults

if TYPE_CHECKING:
    import ssl

    from herder.config import Config

SERVER_ENV = "HERDER_SERVER"
TOKEN_ENV = defaults.MANAGEMENT_TOKEN_ENV
DATA_DIR_ENV = "HERDER_DATA_DIR"
CA_FILE_ENV = "HERDER_CA_FILE"
CLIENT_FILE = "client.json"
DEFAULT_TIMEOUT = 30.0
#: A kept connection idle longer than this is replaced before use: the server closes idle
#: connections after a few seconds, and a request sent on one it is closing would be lost.
REUSE_IDLE = 2.0


class ClientError(Exception):
    """A request failed; ``status`` is the HTTP status (None when the server was not reached)."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


# --------------------------------------------------------------------------- where and who


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where herder keeps its own state: ``$HERDER_DATA_DIR``, else ``$XDG_DATA_HOME/herder``,
    else ``~/.local/share/herder``.  ``herder serve`` and the CLI both use this one function."""
    env = os.environ if environ is None else environ
    if env.get(DATA_DIR_ENV):
        return Path(env[DATA_DIR_ENV]).expanduser()
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]).expanduser() / "herder"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "share" / "herder"


class Endpoint(NamedTuple):
    """Where the server is and what to send it.  (A named tuple, not a dataclass: the
    ``dataclasses`` module imports ``inspect``, a few milliseconds of every command's start.)"""

    url: str
    token: str
    #: Certificate(s) to trust for an https URL; empty: the system's authorities.
    ca_file: str = ""


def listen_url(listen: str, tls: bool = False) -> str:
    """The URL a local client uses for a server listening on ``listen`` (``host:port``).

    A wildcard address (``0.0.0.0``, ``::``, empty host) is reached through loopback.
    """
    if "://" in listen:
        return listen.rstrip("/")
    host, sep, port = listen.strip().rpartition(":")
    if not sep:
        host, port = listen.strip(), defaults.API_PORT
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):  # noqa: S104 (comparing, not binding)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def read_client_file(data_dir: Path) -> Endpoint | None:
    """The ``{"url", "token", "ca_file"}`` that ``herder serve`` left in ``data_dir``, if any."""
    path = data_dir / CLIENT_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("url"), str):
        return None
    token, ca_file = doc.get("token"), doc.get("ca_file")
    return Endpoint(
        doc["url"],
        token if isinstance(token, str) else "",
        ca_file if isinstance(ca_file, str) else "",
    )


def write_client_file(data_dir: Path, url: str, token: str, ca_file: str = "") -> Path:
    """Record where the local server is, its token and the certificate to trust (served over
    TLS), readable by this user only."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / CLIENT_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token, "ca_file": ca_file}, f)
    os.replace(tmp, path)
    return path


def resolve_endpoint(
    *,
    server: str | None = None,
    token: str | None = None,
    config: Config | None = None,
    environ: Mapping[str, str] | None = None,
) -> Endpoint:
    """The server URL and token, each from the first source that has one.

    ``config`` is the loaded config file, or None when herder runs on its built-in defaults:
    only then is ``client.json`` consulted, so that a config file always wins over what a
    default server left behind.
    """
    env = os.environ if environ is None else environ
    saved = read_client_file(default_data_dir(env)) if config is None else None
    url = server or env.get(SERVER_ENV) or ""
    ca_file = env.get(CA_FILE_ENV, "")
    if not url:
        if config is not None:
            url = listen_url(config.api.listen, tls=bool(config.api.tls_certificate))
            ca_file = ca_file or config.api.tls_certificate
        elif saved is not None:
            url, ca_file = saved.url, ca_file or saved.ca_file
        else:
            url = listen_url(defaults.API_LISTEN)
    secret = token or env.get(TOKEN_ENV, "").strip()
    if not secret and config is not None:
        secret = config.api.resolve_management_token(env)
    if not secret and saved is not None:
        secret = saved.token
    return Endpoint(listen_url(url) if "://" not in url else url.rstrip("/"), secret, ca_file)


# --------------------------------------------------------------------------- the client


class Client:
    """One method per API route; each returns the decoded JSON (or text for metrics)."""

    def __init__(
        self,
        base_url: str,
        token: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        ca_file: str = "",
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"invalid server URL {base_url!r}: expected http://host:port")
        try:
            port = parts.port
        except ValueError:
            raise ClientError(f"invalid server URL {base_url!r}: bad port") from None
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.ca_file = ca_file
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port or (443 if self._https else 80)
        #: A server behind a reverse proxy may live under a path prefix.
        self._prefix = parts.path.rstrip("/")
        self._conn: _APIConnection | None = None
        self._last_used = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_endpoint(cls, endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT) -> Client:
        return cls(endpoint.url, endpoint.token, timeout, endpoint.ca_file)

    def close(self) -> None:
        """Close the kept connection (a later request opens a new one)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- containers

    def submit(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/api/v1/containers", body=spec)

    def submit_batch(self, specs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Submit every spec in one request: all are stored, or none is."""
        reply = self._json("POST", "/api/v1/containers/batch", body={"items": list(specs)})
        items: list[dict[str, Any]] = reply["items"]
        return items

    def submit_array(self, spec: Mapping[str, Any], count: int) -> dict[str, Any]:
        """``count`` containers of ``spec``: ``{"array_id", "items"}``."""
        return self._json("POST", "/api/v1/containers/array", body={**spec, "count": count})

    def containers(
        self,
        states: Iterable[str] = (),
        limit: int | None = None,
        after: str = "",
        *,
        since: str = "",
        array: str = "",
        order: str = "",
    ) -> dict[str, Any]:
        """One page, newest first unless ``order`` says otherwise (``uuid``, ``queue``):
        ``{"items": [...], "next": uuid or None, "total": n or None}``.  ``since`` is an
        RFC 3339 time; ``array`` an array id."""
        query: list[tuple[str, str]] = [("state", s) for s in states]
        if order:
            query.append(("order", order))
        if limit is not None:
            query.append(("limit", str(limit)))
        if after:
            query.append(("after", after))
        if since:
            query.append(("since", since))
        if array:
            query.append(("array", array))
        return self._json("GET", "/api/v1/containers", query=query)

    def iter_containers(
        self,
        states: Iterable[str] = (),
        limit: int | None = None,
        page_size: int = 500,
        *,
        since: str = "",
        array: str = "",
        order: str = "",
    ) -> Iterator[dict[str, Any]]:
        """Every matching container (at most ``limit``), newest first unless ``order`` says
        otherwise, following the pages."""
        states = tuple(states)
        after, seen = "", 0
        while limit is None or seen < limit:
            size = page_size if limit is None else min(page_size, limit - seen)
            page = self.containers(states, size, after, since=since, array=array, order=order)
            for item in page["items"]:
                seen += 1
                yield item
            if not page.get("next"):
                return
            after = page["next"]

    def container(self, uuid: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/containers/{quote(uuid, safe='')}")

    def cancel(self, uuid: str, reason: str = "") -> dict[str, Any]:
        path = f"/api/v1/containers/{quote(uuid, safe='')}/cancel"
        return self._json("POST", path, body={"reason": reason})

    def cancel_many(
        self, uuids: Sequence[str] = (), *, array: str = "", reason: str = ""
    ) -> dict[str, Any]:
        """Cancel ``uuids`` or the unfinished members of ``array`` in one request:
        ``{"items": [{"uuid", "outcome", "state"}], "cancelled": n}``, where outcome is
        ``cancelled``, ``final`` (already ended, left so) or ``not_found``."""
        body: dict[str, Any] = {"reason": reason}
        body.update({"array": array} if array else {"uuids": list(uuids)})
        return self._json("POST", "/api/v1/containers/cancel", body=body)

    def set_priority(self, uuid: str, priority: int) -> dict[str, Any]:
        path = f"/api/v1/containers/{quote(uuid, safe='')}/priority"
        return self._json("POST", path, body={"priority": priority})

    def log(self, uuid: str, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """``{"offset", "next_offset", "data", "final"}`` from byte ``offset``."""
        query = [("offset", str(offset))]
        if limit is not None:
            query.append(("limit", str(limit)))
        path = f"/api/v1/containers/{quote(uuid, safe='')}/log"
        return self._json("GET", path, query=query)

    # ---- instances

    def instance_types(self) -> list[dict[str, Any]]:
        """The server's instance types, cheapest first, with ``spot_price`` (or None)."""
        items: list[dict[str, Any]] = self._json("GET", "/api/v1/instance-types")["items"]
        return items

    def instances(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._json("GET", "/api/v1/instances")["items"]
        return items

    def instance_action(self, instance_id: str, action: str, reason: str = "") -> dict[str, Any]:
        """``action`` is hold, drain, run or kill."""
        if action not in ("hold", "drain", "run", "kill"):
            raise ValueError(f"unknown instance action {action!r}")
        path = f"/api/v1/instances/{quote(instance_id, safe='')}/{action}"
        return self._json("POST", path, body={"reason": reason})

    # ---- spend

    def quotas(self) -> dict[str, Any]:
        """The cloud's quotas: ``{"enabled": bool, "items": [...]}``."""
        return self._json("GET", "/api/v1/quotas")

    def budget(self) -> dict[str, Any]:
        return self._json("GET", "/api/v1/budget")

    def costs(self, period: str = "day", last: int = 7) -> dict[str, Any]:
        """The cost report over the current ``period`` and the ``last``-1 before it."""
        return self._json("GET", "/api/v1/costs", query=[("period", period), ("last", str(last))])

    # ---- service

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/api/v1/health", ok=(200, 503))

    def plugins(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._json("GET", "/api/v1/plugins")["items"]
        return items

    def openapi(self) -> dict[str, Any]:
        return self._json("GET", "/api/v1/openapi.json")

    def metrics(self) -> str:
        return self._request("GET", "/metrics")[1].decode("utf-8", "replace")

    # ---- plumbing

    def _json(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Mapping[str, Any] | None = None,
        ok: tuple[int, ...] = (),
    ) -> dict[str, Any]:
        status, data = self._request(method, path, query=query, body=body, ok=ok)
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ClientError(
                f"herder at {self.base_url} sent a response that is not a JSON object "
                f"({status}): is this herder's address?",
                status,
            )
        return doc

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Mapping[str, Any] | None = None,
        ok: tuple[int, ...] = (),
    ) -> tuple[int, bytes]:
        target = self._prefix + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        with self._lock:
            status, payload = self._exchange(method, target, data, headers)
        if status >= 400 and status not in ok:
            raise self._http_error(status, payload)
        return status, payload

    def _exchange(
        self, method: str, target: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """Send one request on the kept connection (opening one if needed) and read the answer.

        A GET that fails on a connection the server had already closed is sent once more on a
        new one; other methods are not resent, so that a submission is never made twice.
        """
        for attempt in (1, 2):
            reused = self._conn is not None and time.monotonic() - self._last_used < REUSE_IDLE
            if not reused:
                self._drop()
            conn = self._conn or self._connect()
            try:
                status, payload, will_close = conn.exchange(method, target, data, headers)
            except (ConnectionResetError, BrokenPipeError) as exc:
                self._drop()
                if reused and attempt == 1 and method == "GET":
                    continue
                raise self._unreachable(exc) from None
            except (OSError, _ProtocolError) as exc:
                self._drop()
                if _untrusted_certificate(exc):
                    raise ClientError(
                        f"cannot reach herder at {self.base_url}: its certificate is not trusted "
                        f"({getattr(exc, 'verify_message', exc)}); set ${CA_FILE_ENV} to the "
                        "server's certificate or its authority's"
                    ) from None
                raise self._unreachable(exc) from None
            if will_close:
                self._drop()
            self._last_used = time.monotonic()
            return status, payload
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> _APIConnection:
        context = None
        if self._https:
            import ssl  # only for https: a noticeable part of a plain command's start-up

            try:
                context = ssl.create_default_context(cafile=self.ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                why = getattr(exc, "strerror", None) or exc
                raise ClientError(
                    f"cannot read the certificate to trust, {self.ca_file} "
                    f"(${CA_FILE_ENV} or api.tls_certificate): {why}"
                ) from None
            # A server's own certificate named as the one to trust is enough, as for ssh's
            # known hosts: the chain need not reach a root.
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        self._conn = _APIConnection(self._host, self._port, self.timeout, context)
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _unreachable(self, reason: object) -> ClientError:
        if isinstance(reason, ConnectionRefusedError):
            return ClientError(
                f"cannot reach herder at {self.base_url}: connection refused — "
                "is `herder serve` running?"
            )
        if isinstance(reason, TimeoutError | socket.timeout):
            return ClientError(f"herder at {self.base_url} did not answer within {self.timeout:g}s")
        text = getattr(reason, "strerror", None) or str(reason)
        return ClientError(f"cannot reach herder at {self.base_url}: {text}")

    def _http_error(self, status: int, payload: bytes) -> ClientError:
        message, field = _error_text(payload)
        if status == 401:
            return ClientError(
                f"herder at {self.base_url} wants a management token: pass --token or set "
                f"${TOKEN_ENV}",
                status,
            )
        if status == 403 and "not configured" not in message:
            return ClientError(
                f"herder at {self.base_url} refused the management token: is it the one in the "
                f"server's config (api.management_token or ${TOKEN_ENV})?",
                status,
            )
        where = f" ({field})" if field else ""
        return ClientError(f"{message}{where}", status, field)


# --------------------------------------------------------------------------- HTTP/1.1

#: The most header lines an answer may have, and the longest line (as ``http.client``'s).
_MAX_HEADERS = 100
_MAX_LINE = 65536


class _ProtocolError(Exception):
    """The server's answer is not HTTP/1.x as this client reads it (or was cut short)."""


class _Disconnected(ConnectionResetError):
    """The server closed the connection without answering: a kept connection it had just
    closed as idle, so a GET may be sent again on a new one."""


class _APIConnection:
    """One HTTP/1.1 connection, with what the management API needs and no more: requests with
    a body of known length; answers framed by ``Content-Length``, by chunks (a proxy in front
    may send those) or by the connection's close; keep-alive unless the server says close."""

    def __init__(
        self, host: str, port: int, timeout: float, context: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.context = context
        self.sock: socket.socket | None = None
        self._file: Any = None
        name = f"[{host}]" if ":" in host else host
        default = 443 if context is not None else 80
        self._host_header = name if port == default else f"{name}:{port}"

    def close(self) -> None:
        file, sock, self._file, self.sock = self._file, self.sock, None, None
        if file is not None:
            file.close()
        if sock is not None:
            sock.close()

    def exchange(
        self, method: str, target: str, body: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, bytes, bool]:
        """Send one request; return the answer's status, body, and whether the connection
        must be closed after it."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        lines += ["Accept-Encoding: identity", *(f"{k}: {v}" for k, v in headers.items())]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        if any(c in line for line in lines for c in "\r\n\0"):
            raise ClientError(
                "cannot send a request whose path or headers contain a line break: is the "
                "management token one line?"
            )
        head = "\r\n".join(lines).encode("latin-1", "replace")
        if self.sock is None:
            self._open()
        assert self.sock is not None
        self.sock.sendall(head + b"\r\n\r\n" + (body or b""))
        return self._answer()

    def _open(self) -> None:
        # An ASCII host is given as bytes: resolving a str imports the ``idna`` codec.
        host: str | bytes = self.host.encode() if self.host.isascii() else self.host
        sock = socket.create_connection((host, self.port), self.timeout)  # type: ignore[arg-type]
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._file = sock.makefile("rb")

    def _line(self) -> bytes:
        line: bytes = self._file.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _ProtocolError("answer line too long")
        return line

    def _answer(self) -> tuple[int, bytes, bool]:
        line = self._line()
        if not line:
            raise _Disconnected("the server closed the connection without answering")
        version, _, rest = line.partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise _ProtocolError(f"not an HTTP answer: {line[:80]!r}")
        status = int(code)
        headers: dict[bytes, bytes] = {}
        while True:
            line = self._line()
            if line in (b"\r\n", b"\n", b""):
                break
            if len(headers) >= _MAX_HEADERS:
                raise _ProtocolError("too many headers")
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:  # an interim answer (none is asked for): the real one follows
            return self._answer()
        connection = headers.get(b"connection", b"").lower()
        will_close = connection == b"close" or (
            version == b"HTTP/1.0" and connection != b"keep-alive"
        )
        if status in (204, 304):
            return status, b"", will_close
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return status, self._chunks(), will_close
        length = headers.get(b"content-length")
        if length is None:
            return status, self._file.read(), True
        if not length.isdigit():
            raise _ProtocolError(f"bad Content-Length {length[:40]!r}")
        return status, self._exactly(int(length)), will_close

    def _exactly(self, size: int) -> bytes:
        data: bytes = self._file.read(size)
        if len(data) < size:
            raise _ProtocolError(f"answer cut short: {len(data)} of {size} bytes")
        return data

    def _chunks(self) -> bytes:
        parts = []
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _ProtocolError(f"bad chunk size {size_text[:40]!r}") from None
            if size == 0:
                break
            parts.append(self._exactly(size))
            self._exactly(2)  # the CRLF after each chunk
        while self._line() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(parts)


def _untrusted_certificate(exc: BaseException) -> bool:
    """Whether ``exc`` is a TLS handshake refusing the server's certificate (``ssl`` is only
    imported for https, so it is recognised without importing it)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, ssl.SSLCertVerificationError)


def _error_text(payload: bytes) -> tuple[str, str | None]:
    """The server's ``{"error", "field"}``, or the start of whatever it sent."""
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        field = doc.get("field")
        return doc["error"], field if isinstance(field, str) else None
    text = payload.decode("utf-8", "replace").strip()[:200]
    return text or "empty response", None
