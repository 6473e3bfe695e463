"""A local multi-node Ray cluster with fake GPU nodes, in its own process.

Run by tests/integration/test_cluster_placement.py: ``ray.cluster_utils.Cluster``
changes the Ray state of the process that starts it (and its token setting), so it
must not be the test session's process. Prints one JSON line (addresses and node
ids), then keeps the cluster up until its stdin closes.

Usage: python -m tests.integration.fake_gpu_cluster DASHBOARD_PORT
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from ray.cluster_utils import Cluster

    dashboard_port = int(sys.argv[1])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 0,
            "resources": {"head": 1},
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
        },
    )
    try:
        a10g = cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A10G": 1})
        a100 = cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A100": 1})
        cluster.wait_for_nodes()
        print(
            json.dumps(
                {
                    "ray_address": cluster.address,
                    "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
                    "nodes": {
                        # Ray infers `head_node` as None (its __init__ sets it so, unannotated);
                        # it is the started head `Node` here.
                        "head": cluster.head_node.node_id,  # type: ignore[attr-defined]
                        "A10G": a10g.node_id,
                        "A100": a100.node_id,
                    },
                }
            ),
            flush=True,
        )
        sys.stdin.read()  # until the test closes it
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
