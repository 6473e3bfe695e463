"""What the console reads and changes through the public API: the caller's usage and
stored images (its own only), and the operator endpoints (403 for every other key;
limit changes checked like `mediagate scale set`, deployed whole and audited)."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from deployments.router.operations import Operations
from mediagate.access.audit import AUDIT_ACCOUNT, AUDIT_DOCUMENT, read_entries
from tests.unit.harness import Service

APP = "mediagate"


def deployed_details() -> dict[str, Any]:
    """The Serve controller's application details for one config-deployed app."""
    limits = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.0}
    app_config = {
        "name": APP,
        "import_path": "deployments.app:build",
        "deployments": [{"name": "TextToImage-tiny-sd", "autoscaling_config": dict(limits)}],
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": {
            APP: {
                "deployed_app_config": app_config,
                "deployments": {
                    "TextToImage-tiny-sd": {
                        "target_num_replicas": 2,
                        "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}],
                        "deployment_config": {"autoscaling_config": dict(limits)},
                    },
                    "Scheduler-tiny-sd": {"deployment_config": {}},
                },
            }
        },
    }


class FakeControl:
    app_name = APP

    def __init__(self) -> None:
        self.state = deployed_details()
        self.deployed: list[dict[str, Any]] = []

    async def details(self) -> dict[str, Any]:
        return copy.deepcopy(self.state)

    async def deploy(self, config: dict[str, Any]) -> None:
        self.deployed.append(config)


def with_control(service: Service, control: FakeControl | None = None) -> FakeControl:
    control = control or FakeControl()
    gateway = service.gateway
    gateway.ops = Operations(
        control=control,
        jobs=gateway.jobs,
        clock=gateway.clock,
        limit_changes=True,
        free_class=lambda: 0,
    )
    return control


def operator_auth(service: Service) -> dict[str, str]:
    account = service.accounts.ensure_account("sre", "pro")
    return {"Authorization": f"Bearer {service.accounts.create_key(account.id, role='operator')}"}


def audit(service: Service) -> list[dict[str, Any]]:
    return asyncio.run(service.jobs.mutate(AUDIT_ACCOUNT, AUDIT_DOCUMENT, read_entries))


def test_usage_shows_what_is_left_and_the_tiers_terms(tmp_path: Path) -> None:
    service = Service(tmp_path, tier="free")
    assert service.generate({"prompt": "a cat"}).status_code == 200
    usage = service.client.get("/v1/usage", headers=service.auth).json()
    assert usage["object"] == "usage" and usage["tier"] == "free" and usage["role"] == "user"
    assert (usage["images_today"], usage["images_per_day"], usage["images_left_today"]) == (
        1,
        3,
        2,
    )
    assert usage["day_resets_in_s"] > 0
    assert usage["tier_terms"]["images_per_day"] == 3
    assert "fail_open_images_per_minute" not in usage["tier_terms"]
    assert service.client.get("/v1/usage").status_code == 401


def test_stored_images_are_the_accounts_own_newest_first(tmp_path: Path) -> None:
    service = Service(tmp_path)
    for prompt in ("first", "<img src=x onerror=alert(1)>"):
        answer = service.generate({"prompt": prompt, "response_format": "url"})
        assert answer.status_code == 200
        service.clock.advance(1)
    assert service.generate({"prompt": "inline", "response_format": "b64_json"}).status_code == 200
    other = service.other_auth("mallory")
    assert service.client.post(
        "/v1/images/generations",
        json={"prompt": "mallory's", "response_format": "url"},
        headers=other,
    ).json()["data"][0]["url"]

    listed = service.client.get("/v1/images", headers=service.auth).json()
    assert listed["object"] == "list"
    assert [image["prompt"] for image in listed["data"]] == [
        "<img src=x onerror=alert(1)>",
        "first",
    ]
    image = listed["data"][0]
    assert image["model"] == "tiny-sd" and image["kind"] == "image_generation"
    download = service.client.get(image["url"])
    assert download.status_code == 200 and download.content[:4] == b"\x89PNG"
    assert [
        i["prompt"] for i in service.client.get("/v1/images", headers=other).json()["data"]
    ] == ["mallory's"]
    service.clock.advance(service.gateway.settings.url_ttl_s + 1)  # their files are gone
    assert service.client.get("/v1/images", headers=service.auth).json()["data"] == []
    assert service.client.get("/v1/images?limit=0", headers=service.auth).status_code == 400


@pytest.mark.parametrize(
    ("method", "path"), [("get", "/v1/ops/status"), ("post", "/v1/ops/limits")]
)
def test_operator_endpoints_refuse_every_other_key(tmp_path: Path, method: str, path: str) -> None:
    service = Service(tmp_path)
    control = with_control(service)
    body = {"json": {"model": "tiny-sd", "max_replicas": 9}} if method == "post" else {}
    refused = getattr(service.client, method)(path, headers=service.auth, **body)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "operator_key_required"
    assert getattr(service.client, method)(path, **body).status_code == 401
    assert control.deployed == [] and audit(service) == []


def test_ops_status_shows_replicas_against_their_limits(tmp_path: Path) -> None:
    service = Service(tmp_path)
    with_control(service)
    status = service.client.get("/v1/ops/status", headers=operator_auth(service)).json()
    assert status["object"] == "ops.status" and status["limit_changes_allowed"] is True
    assert "tiny-sd" in status["models"] and "queue_by_tier" in status["models"]["tiny-sd"]
    [row] = status["scaling"]
    assert (row["model"], row["replicas"], row["target_replicas"]) == ("tiny-sd", 1, 2)
    assert (row["min"], row["max"], row["target_per_replica"]) == (1, 4, 2.0)


def test_a_limit_change_is_checked_deployed_and_audited(tmp_path: Path) -> None:
    service = Service(tmp_path)
    control = with_control(service)
    sre = operator_auth(service)
    changed = service.client.post(
        "/v1/ops/limits", json={"model": "tiny-sd", "max_replicas": 8}, headers=sre
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["changes"] == [
        "TextToImage-tiny-sd.autoscaling_config.max_replicas: 4 -> 8"
    ]
    [config] = control.deployed
    [worker] = config["applications"][0]["deployments"]
    assert worker["autoscaling_config"]["max_replicas"] == 8
    [entry] = audit(service)
    assert entry["by"] == "sre (console)" and entry["changes"] == changed.json()["changes"]
    status = service.client.get("/v1/ops/status", headers=sre).json()
    assert status["recent_changes"][0]["changes"] == entry["changes"]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "tiny-sd", "min_replicas": 5}, 400, "must not exceed max"),
        ({"model": "tiny-sd", "min_replicas": 0}, 400, "at least one replica"),
        ({"model": "tiny-sd"}, 400, "nothing to change"),
        ({"model": "no-such", "max_replicas": 2}, 400, "no model 'no-such'"),
        ({"model": "tiny-sd", "max_replicas": 0}, 400, "max_replicas"),
        ({"model": "tiny-sd", "max_replicas": 2, "extra": 1}, 400, "extra"),
        ({"model": "tiny-sd", "target_ongoing_requests": -1}, 400, "target_ongoing_requests"),
    ],
)
def test_a_bad_limit_change_is_a_clear_400_and_changes_nothing(
    tmp_path: Path, body: dict[str, Any], status: int, says: str
) -> None:
    service = Service(tmp_path)
    control = with_control(service)
    refused = service.client.post("/v1/ops/limits", json=body, headers=operator_auth(service))
    assert refused.status_code == status, refused.text
    assert says in refused.json()["error"]["message"], refused.json()
    assert control.deployed == [] and audit(service) == []


def test_limit_changes_refused_where_no_controller_is_in_reach(tmp_path: Path) -> None:
    service = Service(tmp_path)  # the harness has no Serve controller
    sre = operator_auth(service)
    refused = service.client.post(
        "/v1/ops/limits", json={"model": "tiny-sd", "max_replicas": 2}, headers=sre
    )
    assert (
        refused.status_code == 409 and refused.json()["error"]["code"] == "limit_changes_disabled"
    )
    status = service.client.get("/v1/ops/status", headers=sre).json()
    assert status["scaling"] == [] and status["scaling_error"]
    assert json.dumps(status).count("tiny-sd") >= 1  # the queues still show


def test_refusals_of_known_callers_are_counted_per_tier_and_reason(tmp_path: Path) -> None:
    service = Service(tmp_path, tier="free")
    counted: list[tuple[str, str]] = []
    service.gateway.on_refusal = lambda tier, reason: counted.append((tier, reason))
    for _ in range(4):
        service.generate({"prompt": "a cat"})
    assert service.client.get("/v1/ops/status", headers=service.auth).status_code == 403
    assert service.generate({"prompt": "x", "size": "13x7"}).status_code == 400  # not counted
    anonymous = service.client.post("/v1/images/generations", json={"prompt": "x"})
    assert anonymous.status_code == 401  # no caller known: not counted
    assert counted == [("free", "insufficient_quota")]  # not the operator endpoints' 403
