"""Property-based check of the management API against its own OpenAPI document.

Schemathesis reads ``/api/v1/openapi.json`` from a live server (a real Dispatcher on the sim
driver), generates requests for every operation — valid ones and malformed ones — and checks
each response: never a 500, status codes and bodies as documented, content types as declared.
The run is kept short (a few examples per operation) so that it fits in every CI run.
"""

from __future__ import annotations

import itertools

import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig

from .conftest import Engine

#: Examples per operation and generation mode: enough to hit malformed bodies, paths and
#: queries on every run, few enough for CI.
EXAMPLES = 30
#: Every check but one: the document describes request shapes, not every rule the server
#: applies to values (environment variable names, absolute ``cwd``, whole-number sizes), so a
#: generated request the document allows may still be refused with a 400 naming the field.
#: Refusing it is right; what must never happen is a 500 or an undocumented response.
EXCLUDED = [positive_data_acceptance]
#: A malformed request may be refused for its size before anything else is looked at: a string
#: longer than an environment value's ``maxLength`` makes a body over the API's limit (1 MiB),
#: and 413 is the right answer to it.  Schemathesis's default list of rejections lacks 413.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [
                    *(400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429),
                    "5xx",
                ]
            }
        }
    }
)


def _lost_on_the_wire(query: dict[str, object] | None) -> bool:
    """Whether a generated query holds a parameter that never reaches the server.

    A negative case may add an unknown query parameter whose value is an empty list or None;
    the HTTP client drops such a parameter when it builds the URL, so what is sent is a valid
    request, and answering it with 200 is right.  Such a case is not a negative one.
    """
    return any(value in ([], None) for value in (query or {}).values())


def test_a_parameter_without_values_is_not_a_negative_case() -> None:
    # The case hypothesis found with seed 329783580918728793720826963503850246759: an unknown
    # parameter with no values, which the client leaves out of the URL.
    lost = {"state": ["Cancelled", "Complete"], "\x85C\x1e": []}
    assert _lost_on_the_wire(lost)
    assert not _lost_on_the_wire({"state": ["Cancelled"], "bogus": ["1"]})
    assert not _lost_on_the_wire(None)


def test_api_conforms_to_its_openapi_document(engine: Engine) -> None:
    # A container and an instance exist, so that lookups do not all answer 404.
    engine.submit(command=["sim", "600", "0"])
    engine.advance(30)
    auth = {"Authorization": f"Bearer {engine.token}"}
    api = schemathesis.openapi.from_url(
        f"{engine.server.url}/api/v1/openapi.json", headers=auth, config=CONFIG
    )
    # The status page's files are HTML, script and CSS for a browser, tested on their own.
    api = api.exclude(tag="status page")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            # Called within this iteration, so ``mode`` is the one it was made for.
            if mode is GenerationMode.NEGATIVE:  # noqa: B023
                assume(not _lost_on_the_wire(case.query))
            case.call_and_validate(headers=auth, excluded_checks=EXCLUDED)

        try:
            check()
        except Unsatisfiable:
            # Nothing in the operation can be made invalid (no parameters, no body).
            assert mode is GenerationMode.NEGATIVE, operation.label
