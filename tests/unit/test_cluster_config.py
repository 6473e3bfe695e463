"""The cluster definitions: cluster.yaml against Ray's own launcher schema, the KubeRay
RayService manifest, and their agreement with the GPU Serve config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def load(relative: str) -> Any:
    return yaml.safe_load((ROOT / relative).read_text())


def gpu_serve_config() -> dict[str, Any]:
    return dict(load("mediagate/configs/serve.gpu.yaml"))


def deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    [app] = config["applications"]
    return {entry["name"]: entry for entry in app["deployments"]}


def test_cluster_yaml_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(cluster)))
    # The same check refuses a typo, so it is not vacuous.
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu.a10g"]["max_worker"] = 3
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


def test_every_node_starts_locked_down_in_the_fast_mode() -> None:
    """The mode `mediagate up` uses on one machine: token authentication and the HAProxy
    ingress on every node; the dashboard never on all interfaces; one token file."""
    from mediagate.cli.local_ray import SERVE_THROUGHPUT_ENVIRONMENT, WORKER_PRIORITY_ENVIRONMENT

    cluster = load("cluster.yaml")
    every_node = SERVE_THROUGHPUT_ENVIRONMENT | WORKER_PRIORITY_ENVIRONMENT
    fast = [f"{name}={value}" for name, value in every_node.items()]
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [line for line in cluster[commands] if " start " in line]
        for needed in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH=/etc/mediagate/", *fast):
            assert needed in start, f"{commands} lacks {needed}"
        assert "0.0.0.0" not in start
    assert "/etc/mediagate/ray_auth_token" in cluster["file_mounts"]

    manifest = load("deploy/kuberay/rayservice.yaml")
    ray_cluster = manifest["spec"]["rayClusterConfig"]
    assert ray_cluster["authOptions"] == {"mode": "token"}
    groups = [ray_cluster["headGroupSpec"], *ray_cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container["env"]}
            assert every_node.items() <= env.items(), container["name"]


def test_head_runs_routers_and_schedulers_gpu_nodes_run_workers() -> None:
    cluster = load("cluster.yaml")
    node_types = cluster["available_node_types"]
    head = node_types[cluster["head_node_type"]]
    assert head["resources"].get("head") == 1 and not head["resources"].get("GPU")
    assert "--resources='{\"head\": 1}'" in " ".join(cluster["head_start_ray_commands"])
    offered = {
        name: set(spec["resources"])
        for name, spec in node_types.items()
        if name != "ray.head.default"
    }
    for name, entry in deployments(gpu_serve_config()).items():
        options = entry.get("ray_actor_options", {})
        if name in ("Router", "Webhooks") or name.startswith("Scheduler-"):
            assert options.get("resources", {}).get("head"), f"{name} is not pinned to the head"
            assert not options.get("num_gpus")
        else:
            assert options["num_gpus"] >= 1 and options.get("accelerator_type"), name
            wanted = f"accelerator_type:{options['accelerator_type']}"
            assert any(wanted in resources for resources in offered.values()), (
                f"{name} asks for {wanted}, which no node type of cluster.yaml offers"
            )
            limits = entry["autoscaling_config"]
            assert limits["min_replicas"] <= limits["max_replicas"]
    for spec in node_types.values():
        if spec is not head:
            assert spec["max_workers"] >= spec["min_workers"] and spec["idle_timeout_s"] > 0


def test_gpu_serve_config_declares_the_queue_policy_and_validates() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = gpu_serve_config()
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["autoscaling_policy"] == {"policy_function": "autoscaling.policy:scale_workers"}
    video = deployments(config)["TextToVideo-wan-1.3b"]["autoscaling_config"]
    assert video["min_replicas"] == 0  # an idle video model gives its GPU back
    images = deployments(config)["TextToImage-sd-turbo"]["autoscaling_config"]
    assert images["min_replicas"] >= 1


def test_kuberay_rayservice_is_the_same_service() -> None:
    from ray.serve.schema import ServeDeploySchema

    manifest = load("deploy/kuberay/rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config["applications"] == gpu_serve_config()["applications"]
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert '\\"head\\": 1' in head["rayStartParams"]["resources"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    for name, accelerator in (("gpu-a10g", "A10G"), ("gpu-a100", "A100")):
        group = groups[name]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert f"accelerator_type:{accelerator}" in group["rayStartParams"]["resources"]
        [container] = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize(
    "path", ["mediagate/configs/serve.yaml", "mediagate/configs/serve.gpu.yaml"]
)
def test_shipped_serve_configs_hold_only_settings_the_deployments_accept(path: str) -> None:
    """Every scheduler's user_config parses as its kind's settings (an unknown key is an
    error naming it) and the application's args as AppArgs."""
    from deployments.app import AppArgs
    from deployments.scheduler.settings import ImageSchedulerSettings, VideoSchedulerSettings

    [app] = load(path)["applications"]
    AppArgs.model_validate(app["args"])
    entries = deployments({"applications": [app]})
    checked = 0
    for name, entry in entries.items():
        if not name.startswith("Scheduler-") or "user_config" not in entry:
            continue
        is_video = f"TextToVideo-{name.removeprefix('Scheduler-')}" in entries
        settings = VideoSchedulerSettings if is_video else ImageSchedulerSettings
        settings.model_validate(entry["user_config"])
        checked += 1
    assert checked or path.endswith("serve.yaml")
    with pytest.raises(ValueError, match="max_batch"):
        ImageSchedulerSettings.model_validate({"max_batch": 8})  # a misplaced key, named


def test_kuberay_keeps_the_heads_control_ports_to_ray_pods_and_the_operator() -> None:
    """The dashboard binds 0.0.0.0 in a pod (KubeRay calls it); the NetworkPolicy is what
    keeps 6379, 8265 and 10001 away from everything but the cluster's own pods and the
    operator, and leaves only Serve's port open to the Ingress."""
    policy = load("deploy/kuberay/networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    open_to_all: set[int] = set()
    for rule in policy["spec"]["ingress"]:
        ports = {port["port"] for port in rule["ports"]}
        if "from" not in rule:
            open_to_all |= ports
        else:
            assert all(source for source in rule["from"])  # no empty selector (= everyone)
    assert open_to_all == {8000}
