"""herder's management HTTP API (the model is Arvados' management API, SPEC §10.2).

:class:`APIServer` serves a :class:`~herder.dispatcher.Dispatcher` under ``/api/v1/``:
containers (submit, list, inspect, cancel, reprioritise, read the log), instances (list, hold,
drain, run, kill), ``/metrics``, a health check, the installed plugins and an OpenAPI document.
The routes live in :mod:`herder.api.routes`, the JSON shapes in :mod:`herder.api.schema`.
"""

from herder.api.routes import ROUTES, APIError, ManagementAPI, Route
from herder.api.server import APIServer, APIServerError, parse_listen

__all__ = [
    "ROUTES",
    "APIError",
    "APIServer",
    "APIServerError",
    "ManagementAPI",
    "Route",
    "parse_listen",
]
