"""The status page at ``/``: one HTML page, its script and its stylesheet, served by herder.

The page itself carries no data and needs no token: it asks for the management token once,
keeps it in the browser tab's session storage, and reads everything through the same
authenticated API a script would use (``/api/v1/summary``, ``/api/v1/instances``,
``/api/v1/containers``, ``/api/v1/budget``, ``/api/v1/quotas``), refreshing every few
seconds.  Besides the fleet and the queue it shows the spend of the budget's period against
its limits, the cloud's quotas herder reads, and why each instance drains (its cause and
reason) and until when its billing increment is paid.  Its buttons call the instance and
container actions of that API.

Every asset ships inside the package (``herder/app/api/static``): the page must work on a machine
with no internet access, so nothing is loaded from a CDN.  A strict Content-Security-Policy
allows only herder's own script and stylesheet, as a second line of defence behind the script's
rule of inserting every value as text, never as HTML.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources

from herder.engine.metrics import fleet_cost_per_hour
from herder.model import ContainerState, InstanceView, WorkerState

#: name → content type of every asset the page loads from ``/static/``.
ASSETS: Mapping[str, str] = {
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}
PAGE_CONTENT_TYPE = "text/html; charset=utf-8"
#: Only herder's own files; no inline script, no framing (clickjacking of the action buttons).
PAGE_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class UnknownAsset(KeyError):
    """No such file under ``/static/``."""


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("herder.app.api").joinpath("static", name).read_bytes()


def page() -> bytes:
    """The HTML of the page."""
    return _read("status.html")


def asset(name: str) -> tuple[bytes, str]:
    """(content, content type) of one asset; only the listed names, so no path tricks."""
    if name not in ASSETS:
        raise UnknownAsset(name)
    return _read(name), ASSETS[name]


@dataclass(frozen=True)
class Summary:
    """The totals at the top of the page."""

    instances: dict[str, int]
    containers: dict[str, int]
    cost_per_hour: float


def summarize(
    views: Iterable[InstanceView], container_counts: Mapping[ContainerState, int]
) -> Summary:
    """Instances by worker state (every state listed, 0 included, in a stable order),
    containers by state (all of the queue's storage), and what the fleet costs per hour now."""
    views = list(views)
    by_state = Counter(v.worker_state.value for v in views)
    return Summary(
        instances={s.value: by_state.get(s.value, 0) for s in WorkerState},
        containers={s.value: int(container_counts.get(s, 0)) for s in ContainerState},
        cost_per_hour=fleet_cost_per_hour(views),
    )
