"""schemathesis over the router's own OpenAPI schema (issue 15's fault suite): requests
generated from the schema, valid and invalid, each sent with every kind of caller (no
key, a key that does not exist, a free key, a pro key) to the router app with its real
stores (SQLite state, local artifacts) and in-process schedulers that answer at once.

Must hold: no server error (5xx) for anything a client can send, every answer in the
shape the schema declares (status codes, content types, bodies), and errors in the
OpenAI envelope. ``FUZZ_EXAMPLES`` raises the number of examples per operation
(the long run; CI runs the short one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import checks
from schemathesis.core.result import Ok

from tests.unit.harness import Service

# The short run (CI) draws the same examples every time, so that what it finds is
# reproducible; a long run (FUZZ_EXAMPLES=...) draws new ones each time. (Not a
# MEDIAGATE_ variable: tests/conftest.py clears those before any test module loads.)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
DERANDOMIZE = "FUZZ_EXAMPLES" not in os.environ
CALLERS = ("none", "unknown", "free", "pro")
FOLLOWERS = ("pro", "other-pro", "none", "pro", "free", "unknown")
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def caller_headers(service: Service, caller: str) -> dict[str, str]:
    if caller == "none":
        return {}
    if caller == "unknown":
        return {"Authorization": "Bearer mg-0000000000000000000000000000000000000000"}
    if caller == "other-pro":
        return service.other_auth("fuzz-other", "pro", age_days=30)
    return service.other_auth(f"fuzz-{caller}", caller, age_days=30)


def check_answers(service: Service, case: Any) -> None:
    for caller in CALLERS:
        response = case.call(headers=caller_headers(service, caller))
        assert response.status_code < 500, (caller, case.method, case.path, response.text[:500])
        case.validate_response(response, checks=CHECKS)


def test_no_server_error_and_every_answer_matches_the_schema(tmp_path: Path) -> None:
    """Every operation of the schema in turn (schemathesis' own pytest plugin does not
    run under pytest 9: hypothesis drives its strategies directly)."""
    service = Service(tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", service.client.app)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the schema itself is valid
        operations.append(result.ok())
    assert len(operations) >= 12, [op.label for op in operations]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
            database=None,
            derandomize=DERANDOMIZE,
        )
        def fuzz(case: Any) -> None:
            check_answers(service, case)

        fuzz()


class CurrentApp:
    """An ASGI app that passes each request to the current service's router app: each
    stateful scenario starts on a fresh service (its accounts, quotas and jobs), so a
    scenario replayed by hypothesis meets the same state again."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.service.client.app(scope, receive, send)


def test_stateful_create_get_remix_delete_as_every_caller(tmp_path: Path) -> None:
    """Sequences that follow the schema's links (a video job created or remixed, then
    read, downloaded, remixed or deleted by its id), each step sent by one of the
    callers in turn: no server error, every answer as declared."""
    scenarios = iter(range(1_000_000))
    app = CurrentApp(Service(tmp_path / "schema"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    machine = schema.as_state_machine()
    followed: list[str] = []
    answered: list[tuple[str, str, int]] = []

    class Workflow(machine):  # type: ignore[misc,valid-type]
        def setup(self) -> None:
            app.service = Service(tmp_path / f"scenario-{next(scenarios)}")
            self.headers = {caller: caller_headers(app.service, caller) for caller in FOLLOWERS}
            self.steps = 0

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            # Jobs are created by the pro account; what follows a link is sent by every
            # caller in turn, the job's owner and another pro account among them.
            if (case.method, case.path) == ("POST", "/v1/videos"):
                caller = "pro"
            else:
                caller = FOLLOWERS[self.steps % len(FOLLOWERS)]
            self.steps += 1
            followed.append(f"{caller} {case.method} {case.path}")
            return {"headers": self.headers[caller]}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            answered.append((case.method, case.path, response.status_code))
            assert response.status_code < 500, (case.method, case.path, response.text[:500])
            case.validate_response(response, checks=CHECKS)

    Workflow.run(
        settings=settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            stateful_step_count=10,
            database=None,
            derandomize=DERANDOMIZE,
        )
    )
    # Links were followed to jobs that exist: some step on a job's id was answered 200.
    found = [step for step in answered if "{video_id}" in step[1] and step[2] == 200]
    assert found, sorted(set(answered))
