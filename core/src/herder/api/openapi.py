"""The OpenAPI 3.1 document of the management API, generated from :data:`~herder.api.routes.ROUTES`
and the pydantic models of :mod:`herder.api.schema`.

Generating it from the same table the server dispatches through means a route cannot exist
without being documented, nor be documented with a shape it does not send.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from herder import __version__
from herder.api import schema
from herder.api.routes import ROUTES, Route
from herder.model import CONTAINER_UUID_RE

_REF = "#/components/schemas/{model}"

_ERROR_TEXT = {
    400: "the request is malformed; `field` names what is wrong",
    401: "no bearer token was given",
    403: "the token is wrong, or the server has no management token configured",
    404: "no such container or instance",
    405: "the path exists but not with this method",
    409: "the container's state does not allow this",
    413: "the request body is too large",
    503: "the queue cannot be written right now (its disk is full, say); retry later",
}

_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "uuid": {
        "description": "container uuid",
        "schema": {"type": "string", "pattern": CONTAINER_UUID_RE.pattern},
    },
    "instance_id": {
        "description": "the provider's instance id",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    },
}


Refs = dict[tuple[Any, JsonSchemaMode], Any]


def _component_schemas() -> tuple[Refs, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (m, "validation") for m in schema.REQUEST_MODELS
    ]
    models += [(m, "serialization") for m in schema.RESPONSE_MODELS]
    refs, top = models_json_schema(models, ref_template=_REF)
    return refs, top.get("$defs", {})


def _operation(route: Route, refs: Refs) -> Any:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
    }
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            **_PATH_PARAMS.get(name, {"schema": {"type": "string"}}),
        }
        for name in route.path_params
    ]
    for p in route.query:
        param_schema = {"type": "array", "items": p.schema} if p.repeatable else p.schema
        param: dict[str, Any] = {
            "name": p.name,
            "in": "query",
            "required": False,
            "description": p.description,
            "schema": param_schema,
        }
        if p.repeatable:
            param.update(style="form", explode=True)
        params.append(param)
    if params:
        op["parameters"] = params
    if route.request_model is not None:
        op["requestBody"] = {
            "required": route.request_model is schema.SubmitRequest,
            "content": {
                "application/json": {"schema": refs[(route.request_model, "validation")]}
            },
        }
    op["responses"] = _responses(route, refs)
    if not route.auth:
        op["security"] = []
    return op


def _responses(
    route: Route, refs: Refs
) -> dict[str, Any]:
    if route.response_model is not None:
        content_schema = refs[(route.response_model, "serialization")]
    elif route.content_type == "application/json":
        content_schema = {"type": "object"}
    else:
        content_schema = {"type": "string"}
    media = route.content_type.split(";")[0]
    success = {"description": "success", "content": {media: {"schema": content_schema}}}
    out: dict[str, Any] = {str(route.status): success}
    if route.response_model is schema.Health:
        out["503"] = {
            "description": "the dispatcher is not healthy",
            "content": {"application/json": {"schema": content_schema}},
        }
    error = {"application/json": {"schema": refs[(schema.ErrorOut, "serialization")]}}
    codes = set(route.errors) | ({401, 403} if route.auth else set())
    for code in sorted(codes):
        out[str(code)] = {"description": _ERROR_TEXT[code], "content": error}
    return out


def build_openapi(routes: Sequence[Route] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routes``."""
    refs, components = _component_schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "herder management API",
            "version": __version__,
            "description": "Submit and watch containers, and manage the instances that run "
            "them.  Every route but the health check needs `Authorization: Bearer <token>` "
            "with the configured management token.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def openapi_json(routes: Sequence[Route] = ROUTES) -> bytes:
    """The document for ``routes``, serialised (cached for the built-in table)."""
    if tuple(routes) == ROUTES:
        return _builtin_json()
    return json.dumps(build_openapi(routes)).encode()


@functools.cache
def _builtin_json() -> bytes:
    return json.dumps(build_openapi(ROUTES)).encode()
