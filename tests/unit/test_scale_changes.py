"""`mediagate scale set` as a pure config change: checks, what changes, what is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from autoscaling.limits import ScaleChange, ScaleError, apply_scale_change, scale_rows
from mediagate.cli import scale

DEPLOYED_LIMITS = {  # what the REST API shows for a worker, Serve's defaults included
    "min_replicas": 1,
    "max_replicas": 4,
    "initial_replicas": 1,
    "target_ongoing_requests": 2.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 60.0,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
    "aggregation_function": "mean",
    "policy": {"policy_function": "ray.serve.autoscaling_policy:default_autoscaling_policy"},
}


def config() -> dict[str, Any]:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {
                "name": "mediagate",
                "import_path": "deployments.app:build_app",
                "autoscaling_policy": {"policy_function": "autoscaling.policy:scale_workers"},
                "deployments": [
                    {"name": "TextToImage-sd", "ray_actor_options": {"num_gpus": 1}},
                    {"name": "Scheduler-sd", "user_config": {"batching": {"max_batch_size": 4}}},
                ],
            },
            {"name": "other", "import_path": "x:y"},
        ],
    }


def change(worker: str = "TextToImage-sd", **fields: Any) -> tuple[dict[str, Any], list[str]]:
    model = worker.split("-", 1)[1]
    return apply_scale_change(
        config(),
        "mediagate",
        ScaleChange(model=model, **fields),
        current_limits=DEPLOYED_LIMITS,
        worker=worker,
    )


def test_a_change_touches_only_the_numbers_it_names() -> None:
    new, lines = change(max_replicas=8, free_weight=0.25)
    assert lines == [
        "TextToImage-sd.autoscaling_config.max_replicas: 4 -> 8",
        "Scheduler-sd.user_config.queue_weights.0: 0.5 -> 0.25",
    ]
    app = new["applications"][0]
    worker, scheduler = app["deployments"]
    assert worker["ray_actor_options"] == {"num_gpus": 1}  # untouched: would restart replicas
    limits = worker["autoscaling_config"]
    assert limits["max_replicas"] == 8 and limits["min_replicas"] == 1
    assert limits["upscale_delay_s"] == 1.0  # the rest carried over, so nothing resets
    assert "policy" not in limits and "aggregation_function" not in limits
    assert scheduler["user_config"] == {
        "batching": {"max_batch_size": 4},
        "queue_weights": {"0": 0.25},
    }
    assert app["autoscaling_policy"] == config()["applications"][0]["autoscaling_policy"]
    assert new["applications"][1] == {"name": "other", "import_path": "x:y"}  # kept deployed


def test_initial_replicas_follows_new_bounds() -> None:
    new, _ = change(min_replicas=2, max_replicas=3)
    limits = new["applications"][0]["deployments"][0]["autoscaling_config"]
    assert (limits["min_replicas"], limits["initial_replicas"], limits["max_replicas"]) == (2, 2, 3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "nothing to change"),
        ({"min_replicas": 5}, "must not exceed max"),
        ({"max_replicas": 0}, "--max must be between 1"),
        ({"max_replicas": 5000}, "--max must be between 1"),
        ({"min_replicas": -1}, "--min must be >= 0"),
        ({"target": 0}, "--target must be > 0"),
        ({"target": float("nan")}, "--target must be > 0"),
        ({"free_weight": 11}, "--free-weight must be between 0 and 10"),
        ({"min_replicas": 0}, "image models keep at least one replica"),
    ],
)
def test_bad_changes_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ScaleError, match=message):
        change(**fields)


def test_zero_is_allowed_for_video_and_on_request_for_images() -> None:
    _, lines = change("TextToVideo-wan", min_replicas=0)
    assert lines == ["TextToVideo-wan.autoscaling_config.min_replicas: 1 -> 0"]
    _, lines = change(min_replicas=0, allow_zero_images=True)
    assert lines == ["TextToImage-sd.autoscaling_config.min_replicas: 1 -> 0"]


def test_scale_rows_from_serve_details() -> None:
    details = {
        "applications": {
            "mediagate": {
                "deployments": {
                    "TextToImage-sd": {
                        "target_num_replicas": 3,
                        "replicas": [
                            {"state": "RUNNING"},
                            {"state": "RUNNING"},
                            {"state": "STARTING"},
                        ],
                        "deployment_config": {"autoscaling_config": DEPLOYED_LIMITS},
                    },
                    "Scheduler-sd": {},
                    "Router": {},
                }
            }
        }
    }
    [row] = scale_rows(details, "mediagate", {"sd": {"free": 7, "pro": 2}})
    assert row == {
        "model": "sd",
        "deployment": "TextToImage-sd",
        "replicas": 2,
        "target_replicas": 3,
        "min": 1,
        "max": 4,
        "target_per_replica": 2.0,
        "queue": {"free": 7.0, "pro": 2.0},
    }


def test_the_free_class_comes_from_the_deployed_tier_policy(tmp_path: Path) -> None:
    """`scale set --free-weight` weighs the lowest class of the policy the routers run,
    not of the tier file on the operator's machine."""
    import yaml

    from mediagate.cli.scale import deployed_free_class

    shipped = yaml.safe_load(
        (Path(scale.__file__).parents[1] / "configs" / "tiers.yaml").read_text()
    )
    for tier in shipped["tiers"].values():
        tier["priority_class"] += 5  # the deployed policy numbers its classes 5, 6, 7
    inline = {"Router": {"deployment_config": {"user_config": {"tiers": shipped}}}}
    assert deployed_free_class(inline) == 5
    tiers_file = tmp_path / "tiers.yaml"
    tiers_file.write_text(yaml.safe_dump(shipped))
    by_file = {"Router": {"deployment_config": {"user_config": {"tiers_file": str(tiers_file)}}}}
    assert deployed_free_class(by_file) == 5
    assert deployed_free_class({}) == 0  # no router config: the shipped policy
