"""A small client for herder's management API (stdlib ``urllib``), used by the CLI.

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
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from herder import defaults

if TYPE_CHECKING:
    from herder.config import Config

SERVER_ENV = "HERDER_SERVER"
TOKEN_ENV = defaults.MANAGEMENT_TOKEN_ENV
DATA_DIR_ENV = "HERDER_DATA_DIR"
CLIENT_FILE = "client.json"
DEFAULT_TIMEOUT = 30.0


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


@dataclass(frozen=True)
class Endpoint:
    url: str
    token: str


def listen_url(listen: str) -> str:
    """The URL a local client uses for a server listening on ``listen`` (``host:port``).

    A wildcard address (``0.0.0.0``, ``::``, empty host) is reached through loopback.
    """
    if "://" in listen:
        return listen.rstrip("/")
    host, sep, port = listen.strip().rpartition(":")
    if not sep:
        host, port = listen.strip(), "9190"
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):  # noqa: S104 (comparing, not binding)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def read_client_file(data_dir: Path) -> Endpoint | None:
    """The ``{"url", "token"}`` that ``herder serve`` left in ``data_dir``, if any."""
    path = data_dir / CLIENT_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("url"), str):
        return None
    token = doc.get("token")
    return Endpoint(doc["url"], token if isinstance(token, str) else "")


def write_client_file(data_dir: Path, url: str, token: str) -> Path:
    """Record where the local server is and its token, readable by this user only."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / CLIENT_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token}, f)
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
    if not url:
        listen = config.api.listen if config is not None else defaults.API_LISTEN
        url = saved.url if saved is not None else listen_url(listen)
    secret = token or env.get(TOKEN_ENV, "").strip()
    if not secret and config is not None:
        secret = config.api.resolve_management_token(env)
    if not secret and saved is not None:
        secret = saved.token
    return Endpoint(listen_url(url) if "://" not in url else url.rstrip("/"), secret)


# --------------------------------------------------------------------------- the client


class Client:
    """One method per API route; each returns the decoded JSON (or text for metrics)."""

    def __init__(self, base_url: str, token: str = "", timeout: float = DEFAULT_TIMEOUT) -> None:
        if urlsplit(base_url).scheme not in ("http", "https"):
            raise ClientError(f"invalid server URL {base_url!r}: expected http://host:port")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_endpoint(cls, endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT) -> Client:
        return cls(endpoint.url, endpoint.token, timeout)

    # ---- containers

    def submit(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/api/v1/containers", body=spec)

    def containers(
        self, states: Iterable[str] = (), limit: int | None = None, after: str = ""
    ) -> dict[str, Any]:
        """One page: ``{"items": [...], "next": uuid or None}``."""
        query: list[tuple[str, str]] = [("state", s) for s in states]
        if limit is not None:
            query.append(("limit", str(limit)))
        if after:
            query.append(("after", after))
        return self._json("GET", "/api/v1/containers", query=query)

    def iter_containers(
        self, states: Iterable[str] = (), limit: int | None = None, page_size: int = 500
    ) -> Iterator[dict[str, Any]]:
        """Every matching container (at most ``limit``), following the pages."""
        states = tuple(states)
        after, seen = "", 0
        while limit is None or seen < limit:
            size = page_size if limit is None else min(page_size, limit - seen)
            page = self.containers(states, size, after)
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

    def instances(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._json("GET", "/api/v1/instances")["items"]
        return items

    def instance_action(self, instance_id: str, action: str, reason: str = "") -> dict[str, Any]:
        """``action`` is hold, drain, run or kill."""
        if action not in ("hold", "drain", "run", "kill"):
            raise ValueError(f"unknown instance action {action!r}")
        path = f"/api/v1/instances/{quote(instance_id, safe='')}/{action}"
        return self._json("POST", path, body={"reason": reason})

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
        url = self.base_url + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        # The scheme was checked to be http(s) in __init__.
        req = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            if exc.code in ok:
                return exc.code, payload
            raise self._http_error(exc.code, payload) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except TimeoutError as exc:
            raise self._unreachable(exc) from None
        except (ConnectionError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, reason: object) -> ClientError:
        if isinstance(reason, ConnectionRefusedError):
            return ClientError(
                f"cannot reach herder at {self.base_url}: connection refused — "
                "is `herder serve` running?"
            )
        if isinstance(reason, TimeoutError | socket.timeout):
            return ClientError(
                f"herder at {self.base_url} did not answer within {self.timeout:g}s"
            )
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
