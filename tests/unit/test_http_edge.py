"""One request id per request: the same in the header, the error body and the logs."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.router.http_edge import EdgeMiddleware, install_error_handlers


def edge_app(*, ingress_sets_request_id: bool) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(
        EdgeMiddleware, max_body_bytes=1024, ingress_sets_request_id=ingress_sets_request_id
    )

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    return TestClient(app, raise_server_exceptions=False)


def test_without_an_ingress_the_edge_gives_one_id_and_quotes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = edge_app(ingress_sets_request_id=False)
    with caplog.at_level(logging.ERROR):
        answer = client.get("/boom", headers={"x-request-id": "from-client"})
    ids = answer.headers.get_list("x-request-id")
    assert len(ids) == 1 and ids[0].startswith("req_")  # a client cannot choose it here
    message = answer.json()["error"]["message"]
    assert ids[0] in message and "secret" not in message
    assert ids[0] in caplog.text


def test_behind_serves_ingress_the_edge_adopts_its_id_and_adds_no_header(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = edge_app(ingress_sets_request_id=True)
    with caplog.at_level(logging.ERROR):
        answer = client.get("/boom", headers={"x-request-id": "5f0c-serve-id"})
    assert answer.headers.get_list("x-request-id") == []  # Serve's ingress adds it
    assert "5f0c-serve-id" in answer.json()["error"]["message"]
    assert "5f0c-serve-id" in caplog.text


def test_an_unusable_incoming_id_is_replaced() -> None:
    client = edge_app(ingress_sets_request_id=True)
    answer = client.get("/boom", headers={"x-request-id": "bad id\twith spaces"})
    (own,) = answer.headers.get_list("x-request-id")
    assert own.startswith("req_") and own in answer.json()["error"]["message"]


def test_headers_over_the_ingress_limits_are_431_in_the_envelope() -> None:
    """Serve's Python proxy accepts any header block; the edge holds HAProxy's limits."""
    client = edge_app(ingress_sets_request_id=False)
    huge = client.get("/boom", headers={"x-filler": "a" * 20_000})
    many = client.get("/boom", headers={f"x-filler-{i}": "b" for i in range(120)})
    for refused in (huge, many):
        assert refused.status_code == 431, refused.text
        error = refused.json()["error"]
        assert error["code"] == "request_header_fields_too_large" and error["message"]
        assert refused.headers.get_list("x-request-id")  # still quotable
    within = client.get("/boom", headers={"x-filler": "a" * 8_000})
    assert within.status_code == 500  # passed the edge (the route itself fails)
