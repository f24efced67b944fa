"""herder's management HTTP API (the model is Arvados' management API, SPEC §10.2).

:class:`APIServer` serves an engine (:class:`herder.engine.interface.Engine`) under ``/api/v1/``:
containers (submit, list, inspect, cancel, reprioritise, read the log), instances (list, hold,
drain, run, kill), ``/metrics``, a health check, the installed plugins and an OpenAPI document.
The routes live in :mod:`herder.app.api.routes`, the application (errors, limits, the document) in
:mod:`herder.app.api.app`, the JSON shapes in :mod:`herder.app.api.schema`, the server in
:mod:`herder.app.api.server`.
"""

from herder.app.api.routes import APIError, ManagementAPI
from herder.app.api.server import APIServer, APIServerError, parse_listen

__all__ = [
    "APIError",
    "APIServer",
    "APIServerError",
    "ManagementAPI",
    "parse_listen",
]
