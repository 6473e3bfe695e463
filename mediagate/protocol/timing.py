"""Where an image request's time went, hop by hop, as the standard ``Server-Timing``
response header (https://www.w3.org/TR/server-timing/): one entry per stage, in the
order the request passes them, each in milliseconds. Every stage is measured where it
happens (the worker times the pipeline, the scheduler the queue and its round trip to
the worker, the router the rest), and the stages add up to the
router's whole handling time, so nothing hides between them:

- ``router``: from the request body to the hand-over (authentication, validation,
  tier checks, the early refusal decision, the quota reservation);
- ``to_scheduler``: both hops between router and scheduler;
- ``queue``: waiting in the scheduler's queue (preempted runs included);
- ``dispatch``: the scheduler's round trip to the worker, less the worker's pipeline
  (both hops, the worker's thread hand-off and its lock);
- ``pipeline``: the diffusers call (the whole batch's);
- ``hand_over``: the router's images to its image processes and their files back,
  waiting for a free one included (beyond the three stages they time themselves);
- ``moderate``: the image check of the outputs, there (when one is configured);
- ``encode``: encoding this request's images (PNG, JPEG or WebP, and base64), there;
- ``sign``: signing their C2PA manifests, there (absent when signing is off);
- ``respond``: the router's other work on the answer (storing, the response).

What the client measures beyond their sum is the ingress (HAProxy or Serve's proxy)
and the network.
"""

from __future__ import annotations

from collections.abc import Mapping

SERVER_TIMING_HEADER = "server-timing"

STAGES = (
    "router",
    "to_scheduler",
    "queue",
    "dispatch",
    "pipeline",
    "hand_over",
    "moderate",
    "encode",
    "sign",
    "respond",
)


def server_timing(timings_ms: Mapping[str, float]) -> str:
    """The header value: the known stages present, in order (``router;dur=0.42, ...``)."""
    return ", ".join(
        f"{stage};dur={timings_ms[stage]:.2f}" for stage in STAGES if stage in timings_ms
    )


def parse_server_timing(value: str) -> dict[str, float]:
    """The stages of a ``Server-Timing`` value (what a benchmark reads back)."""
    parsed = {}
    for entry in value.split(","):
        name, _, parameters = entry.strip().partition(";")
        for parameter in parameters.split(";"):
            key, _, number = parameter.strip().partition("=")
            if key == "dur" and name:
                parsed[name] = float(number)
    return parsed
