"""``/v1/webhooks`` through the router app: register (the secret shown once), list and
remove the caller's own endpoints; bad input is a 400 in the OpenAI envelope that
stores nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from mediagate.webhooks.settings import WebhookSettings
from tests.unit.harness import Service

HOOKS = "/v1/webhooks"


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(
        tmp_path,
        webhooks=WebhookSettings(allowed_networks=("127.0.0.1/32",), max_endpoints_per_account=2),
    )


def test_register_list_and_remove(service: Service) -> None:
    created = service.client.post(
        HOOKS, json={"url": "http://127.0.0.1:9/hooks"}, headers=service.auth
    )
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "webhook_endpoint" and body["id"].startswith("wh_")
    assert body["secret"].startswith("whsec_")
    assert body["events"] == ["video.completed", "video.failed"]
    assert body["status"] == "enabled"

    listed = service.client.get(HOOKS, headers=service.auth).json()
    assert [e["id"] for e in listed["data"]] == [body["id"]]
    assert "secret" not in listed["data"][0]
    assert body["secret"] not in service.client.get(HOOKS, headers=service.auth).text

    other = service.other_auth("mallory")
    assert service.client.get(HOOKS, headers=other).json()["data"] == []
    assert service.client.delete(f"{HOOKS}/{body['id']}", headers=other).status_code == 404

    removed = service.client.delete(f"{HOOKS}/{body['id']}", headers=service.auth)
    assert removed.json() == {
        "id": body["id"],
        "object": "webhook_endpoint.deleted",
        "deleted": True,
    }
    assert service.client.get(HOOKS, headers=service.auth).json()["data"] == []
    assert service.client.delete(f"{HOOKS}/{body['id']}", headers=service.auth).status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"url": "http://169.254.169.254/latest/meta-data/"}, "url"),
        ({"url": "http://10.0.0.1/hooks"}, "url"),
        ({"url": "file:///etc/passwd"}, "url"),
        ({"url": "http://127.0.0.1:9/hooks", "events": ["video.deleted"]}, None),
        ({"url": "http://127.0.0.1:9/hooks", "events": []}, None),
        ({"url": "http://127.0.0.1:9/hooks", "callback": "x"}, None),
        ({}, None),
    ],
)
def test_bad_registrations_are_400s_that_store_nothing(
    service: Service, body: dict[str, object], param: str | None
) -> None:
    answer = service.client.post(HOOKS, json=body, headers=service.auth)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param
    assert service.client.get(HOOKS, headers=service.auth).json()["data"] == []


def test_not_json_and_no_key(service: Service) -> None:
    answer = service.client.post(HOOKS, content=b"{not json", headers=service.auth)
    assert answer.status_code == 400
    assert service.client.post(HOOKS, json={"url": "http://127.0.0.1:9/"}).status_code == 401
    assert service.client.get(HOOKS).status_code == 401


def test_an_account_has_a_bounded_number_of_endpoints(service: Service) -> None:
    for port in (1, 2):
        url = f"http://127.0.0.1:{port}/hooks"
        assert service.client.post(HOOKS, json={"url": url}, headers=service.auth).is_success
    third = service.client.post(HOOKS, json={"url": "http://127.0.0.1:3/"}, headers=service.auth)
    assert third.status_code == 400 and third.json()["error"]["code"] == "webhook_limit_reached"
    assert len(service.client.get(HOOKS, headers=service.auth).json()["data"]) == 2
