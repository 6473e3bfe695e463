"""What the workers' ``drain_s`` relies on, checked on the session's Ray Serve: a replica
that Serve removes while it runs a request finishes it within its graceful stop
(``graceful_shutdown_timeout_s``, set from the model's ``drain_s``), and loses it
when the graceful stop is shorter than the run.

The autoscaling policy weighs running free work, so it may ask for fewer replicas than
are busy (autoscaling/policy.py): Serve then stops busy replicas, and a video run
outlasts Serve's own 20 s graceful stop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from autoscaling.naming import worker_drain_s
from mediagate.protocol.catalog import Scaling

RUN_S = 6.0


class Slow:
    """Sleeps as asked; answers with the replica that ran it."""

    async def __call__(self, seconds: float) -> str:
        from ray import serve

        await asyncio.sleep(seconds)
        return str(serve.get_replica_context().replica_id.unique_id)


def shrink_to_one_when_busy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """A deployment-level autoscaling policy that does what the queue policy may do:
    ask for fewer replicas than are busy (here: one, once two requests run)."""
    if ctx.policy_state.get("shrunk") or ctx.total_num_requests >= 2:
        return 1, {"shrunk": True}
    return 2, {}


async def run_while_shrinking(app: str, graceful_stop_s: float) -> list[str]:
    """Two replicas each take a ``RUN_S`` request; the autoscaler then removes one of
    them. What each caller got: the replica that answered, or the error's name."""
    from ray import serve

    slow = serve.deployment(
        max_ongoing_requests=1,
        ray_actor_options={"num_cpus": 0},  # beside the session's other applications
        graceful_shutdown_timeout_s=graceful_stop_s,
        graceful_shutdown_wait_loop_s=1,
        autoscaling_config={
            "min_replicas": 1,
            "initial_replicas": 2,
            "max_replicas": 2,
            "upscale_delay_s": 0,
            "downscale_delay_s": 0,
            "metrics_interval_s": 0.2,
            "look_back_period_s": 0.5,
            "policy": {"policy_function": f"{__name__}:shrink_to_one_when_busy"},
        },
    )(Slow)
    handle = serve.run(slow.bind(), name=app, route_prefix=None)

    async def call() -> str:
        try:
            return str(await handle.remote(RUN_S))
        except Exception as error:
            return type(error).__name__

    answers = list(await asyncio.gather(call(), call()))
    serve.delete(app)
    return answers


@pytest.mark.usefixtures("serve_port")
async def test_a_removed_replica_finishes_its_run_within_its_drain() -> None:
    drained = await run_while_shrinking(
        "drain-long", worker_drain_s(Scaling(drain_s=3 * RUN_S), "text-to-video")
    )
    assert len(set(drained)) == 2, drained  # both replicas answered: one after its stop began
    cut = await run_while_shrinking("drain-short", graceful_stop_s=1.0)
    assert cut.count("ActorDiedError") == 1, cut  # the removed replica's run was lost
