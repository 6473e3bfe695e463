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
