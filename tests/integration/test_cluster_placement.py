"""Placement on a multi-node cluster: a local Ray cluster (``ray.cluster_utils.Cluster``)
with a CPU head offering the `head` resource, and two nodes that declare one fake GPU
each (an A10G and an A100, no GPU behind them). `mediagate up --address` deploys a
config shaped like serve.gpu.yaml: routers and schedulers must land on the head, the
image worker on the A10G node and the video worker on the A100 node; the worker on a
"GPU" node still finds no CUDA and serves on the CPU in float32.

Marked `own_ray_cluster`: it runs before the session's shared cluster exists.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import deployments_of, free_port, mediagate_up, write_up_config

MEDIAGATE = str(Path(sys.executable).with_name("mediagate"))
ROOT = Path(__file__).resolve().parents[2]


def placement_config(home: Path) -> Path:
    head = {"num_cpus": 0, "resources": {"head": 0.01}}
    return write_up_config(
        home / "serve.placement.yaml",
        {"models": ["tiny-sd", "tiny-wan"]},
        [
            {"name": "Router", "ray_actor_options": head},
            {"name": "Webhooks", "ray_actor_options": head},
            {"name": "Scheduler-tiny-sd", "ray_actor_options": head},
            {"name": "Scheduler-tiny-wan", "ray_actor_options": head},
            {
                "name": "TextToImage-tiny-sd",
                "ray_actor_options": {
                    "num_cpus": 1,
                    "num_gpus": 1,
                    "accelerator_type": "A10G",
                },
            },
            {
                "name": "TextToVideo-tiny-wan",
                "ray_actor_options": {
                    "num_cpus": 1,
                    "num_gpus": 1,
                    "accelerator_type": "A100",
                },
            },
        ],
    )


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("placement")
    dashboard_port, port = free_port(), free_port()
    env = {
        **os.environ,
        "MEDIAGATE_HOME": str(home),
        # The cluster's own token (for the cluster, `mediagate up/down` and this test),
        # not whatever ~/.ray/auth_token holds on this machine.
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    # The cluster lives in a child process: Cluster() would change this one's Ray state.
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.fake_gpu_cluster", str(dashboard_port)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        cluster = json.loads(child.stdout.readline())
        up = mediagate_up(
            env,
            *("--address", cluster["dashboard_url"], "--port", str(port)),
            *("--config", str(placement_config(home))),
        )
        assert up.returncode == 0, up.stderr[-3000:]
        yield {
            "env": env,
            "address": cluster["dashboard_url"],
            "ray_address": cluster["ray_address"],
            "base_url": f"http://127.0.0.1:{port}",
            "nodes": cluster["nodes"],
        }
    finally:
        subprocess.run([MEDIAGATE, "down"], env=env, capture_output=True, timeout=120)
        if child.stdin is not None:
            child.stdin.close()  # the child shuts its cluster down
        child.wait(timeout=120)


@pytest.mark.own_ray_cluster
def test_routers_on_the_head_workers_on_their_gpu_nodes(gpu_cluster: dict[str, Any]) -> None:
    # Plain HTTP with the token: Ray's own client would fix this process's token setting
    # before the session's shared cluster starts.
    token = gpu_cluster["env"]["RAY_AUTH_TOKEN"]
    answer = httpx.get(
        f"{gpu_cluster['address']}/api/serve/applications/",
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    answer.raise_for_status()
    details = answer.json()
    deployments = deployments_of(details)
    nodes = gpu_cluster["nodes"]
    where = {
        name: {replica["node_id"] for replica in deployment["replicas"]}
        for name, deployment in deployments.items()
    }
    assert where == {
        "Router": {nodes["head"]},
        "Webhooks": {nodes["head"]},
        "Scheduler-tiny-sd": {nodes["head"]},
        "Scheduler-tiny-wan": {nodes["head"]},
        "TextToImage-tiny-sd": {nodes["A10G"]},
        "TextToVideo-tiny-wan": {nodes["A100"]},
    }
    # The proxy stays on the head too (HeadOnly).
    proxies = {proxy["node_id"] for proxy in details["proxies"].values()}
    assert proxies == {nodes["head"]}


@pytest.mark.own_ray_cluster
def test_a_worker_on_a_fake_gpu_node_serves_on_the_cpu(gpu_cluster: dict[str, Any]) -> None:
    env = gpu_cluster["env"]
    created = subprocess.run(
        [MEDIAGATE, "keys", "create", "--tier", "pro", "--account", "placement"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    key = created.stdout.strip().splitlines()[-1]
    answer = httpx.post(
        f"{gpu_cluster['base_url']}/v1/images/generations",
        json={"prompt": "a red barn", "size": "64x64"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"][0]["b64_json"]

    # Ask the replica itself what it saw (from a separate driver process, so that this
    # one never joins the cluster): Ray gave it GPU 0, torch found no CUDA.
    script = (
        "import json, sys, ray\n"
        "from ray import serve\n"
        "ray.init(address=sys.argv[1], namespace='serve', log_to_driver=False)\n"
        "handle = serve.get_deployment_handle('TextToImage-tiny-sd', app_name='model-tiny-sd-v1')\n"
        "print(json.dumps(handle.placement_report.remote().result(timeout_s=60)))\n"
    )
    asked = subprocess.run(
        [sys.executable, "-c", script, gpu_cluster["ray_address"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert asked.returncode == 0, asked.stderr[-3000:]
    seen = json.loads(asked.stdout.strip().splitlines()[-1])
    assert seen["node_id"] == gpu_cluster["nodes"]["A10G"]
    assert seen["cuda_visible_devices"] == "0" and seen["gpu_ids"] in ([0], ["0"])
    assert (seen["device"], seen["dtype"]) == ("cpu", "float32")


@pytest.mark.own_ray_cluster
def test_a_model_added_live_keeps_its_scheduler_on_the_head(gpu_cluster: dict[str, Any]) -> None:
    """`mediagate models add` on a GPU cluster: the new model's scheduler goes where
    the router goes (the head's resource), never onto a GPU node. (Its worker runs on
    the head's CPUs: both fake GPUs are taken.)"""
    env, nodes = gpu_cluster["env"], gpu_cluster["nodes"]

    def cli(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MEDIAGATE, *command], env=env, capture_output=True, text=True, timeout=300
        )

    added = cli("models", "add", "tiny-b", "--like", "tiny-sd", "--gpus", "0")
    assert added.returncode == 0, added.stderr[-3000:]
    try:
        answer = httpx.get(
            f"{gpu_cluster['address']}/api/serve/applications/",
            headers={"authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"},
            timeout=30,
        )
        deployments = deployments_of(answer.json())
        where = {replica["node_id"] for replica in deployments["Scheduler-tiny-b"]["replicas"]}
        assert where == {nodes["head"]}
    finally:
        removed = cli("models", "remove", "tiny-b", "--now")
        assert removed.returncode == 0, removed.stderr[-3000:]
