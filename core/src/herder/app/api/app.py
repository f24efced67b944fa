"""The management API as an ASGI application (FastAPI): routes, error format, limits, document.

Everything a client gets wrong is a 4xx with herder's one error body, ``{"error", "field"}``
(``errors`` lists every field when several are wrong): the framework's validation errors,
unknown routes and methods, bodies that are not JSON.  Nothing a client sends produces a 500: a
500 means a bug in herder, and is logged with its traceback.  A queue that cannot be written
(a full disk, a read-only file) is a 503 with ``Retry-After``: the client should retry, nothing
is wrong with its request.

The application does the HTTP part only; what each route does is
:class:`~herder.app.api.routes.ManagementAPI`'s.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.requests import Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from herder import __version__
from herder.app.api import schema
from herder.app.api.routes import APIError, ManagementAPI, build_router
from herder.queue.base import QueueUnavailable

log = logging.getLogger("herder.app.api")

#: Largest request body accepted; a container spec is a few KiB.
MAX_BODY = 1 << 20
#: Headers on every response: nothing is cached (tokens, live state), nothing sniffed.
COMMON_HEADERS = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))


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


def create_app(
    api: ManagementAPI, token: str, *, with_instances: bool = True, max_body: int = MAX_BODY
) -> FastAPI:
    """The application serving ``api``; ``token`` is the management token ("" refuses every
    authenticated route with 403).  ``with_instances=False`` leaves out the instance routes,
    for dispatchers that have none."""
    app = FastAPI(
        title="herder management API",
        version=__version__,
        description="Submit and watch containers, manage the instances that run them.",
        # The document is served under /api/v1 behind the token; no interactive pages.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.api = api
    app.state.token = token.encode()
    app.include_router(build_router(with_instances=with_instances))
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    # Last added runs first: limits apply before anything else reads the request.
    app.add_middleware(Failures)
    app.add_middleware(Limits, max_body=max_body)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def error_response(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    body = schema.ErrorOut(error=message, field=field).model_dump(mode="json", exclude_none=True)
    return Response(json.dumps(body), status, headers, media_type="application/json")


# --------------------------------------------------------------------------- errors


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return Response(json.dumps(exc.body()), exc.status, exc.headers, media_type="application/json")


async def _validation_error(request: Request, exc: Exception) -> Response:
    """The framework's validation errors as one 400 naming the first offending field."""
    assert isinstance(exc, RequestValidationError)
    fields = schema.field_errors(exc.errors())
    first = fields[0] if fields else schema.FieldError(field=None, error="invalid request")
    body = schema.ErrorOut(error=first.error, field=first.field, errors=fields)
    return Response(body.model_dump_json(exclude_none=True), 400, media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    """The framework's own refusals (no route, wrong method, unreadable body) in herder's
    error format."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        return error_response(404, "no such route", headers=headers)
    if exc.status_code == 405:
        return error_response(
            405, f"method {request.method[:20]} not allowed here", headers=headers
        )
    if exc.status_code == 400:
        return error_response(400, "request body is not valid JSON", headers=headers)
    return error_response(exc.status_code, str(exc.detail)[:500], headers=headers)


class Failures:
    """Errors that escape a route: a queue that cannot be reached or written (a full disk, a
    database connection lost) is a 503 the client may retry; anything else is herder's bug,
    logged with its traceback and answered 500.

    Handled here, inside the framework's outermost layer, so that the response is sent and the
    error logged once, by herder, without the server logging it again.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            what = f"{scope.get('method', '?')} {str(scope.get('path', ''))[:200]}"
            if isinstance(exc, QueueUnavailable) or (
                isinstance(exc, sqlite3.OperationalError | OSError) and storage_unavailable(exc)
            ):
                log.error("management API: %s: the queue cannot be written: %s", what, exc)
                response = error_response(
                    503,
                    f"the queue cannot be written right now: {exc}; retry later",
                    headers={"Retry-After": "30"},
                )
            else:
                log.exception("management API: %s failed", what)
                response = error_response(500, "internal server error")
            if not started:
                await response(scope, receive, send)


class Limits:
    """What every request must respect before a route sees it: a body no larger than
    ``max_body`` (refused from its Content-Length, before reading it), no chunked bodies; and
    the headers every response carries."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *COMMON_HEADERS]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, with_headers)
            return
        await self.app(scope, receive, with_headers)

    def _refusal(self, scope: Scope) -> Response | None:
        if scope.get("http_version") not in ("1.0", "1.1"):
            # The parser reads any HTTP/x.y; speaking another version is the client's mistake.
            return error_response(
                400, "HTTP version not supported: use HTTP/1.1", headers={"Connection": "close"}
            )
        headers = dict(scope.get("headers", ()))
        if b"transfer-encoding" in headers:
            return error_response(
                411,
                "chunked request bodies are not supported: send Content-Length",
                headers={"Connection": "close"},
            )
        length = headers.get(b"content-length")
        if length is not None and int(length) > self.max_body:
            # The server has checked that Content-Length is a number.
            return error_response(
                413,
                f"request body larger than {self.max_body} bytes",
                headers={"Connection": "close"},
            )
        return None


# --------------------------------------------------------------------------- the document


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document generated from the routes, cached, in herder's error format.

    The framework documents a 422 for its validation errors; herder answers those with 400
    and its own error body, so the 422s and their schemas are taken out.
    """
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if not any("bearer" in s for s in operation.get("security", [])):
                operation["security"] = []
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = doc
    return doc
