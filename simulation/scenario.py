"""A surge scenario as data: the fleet (node types, models with their service times,
Serve autoscaling and scheduler settings), the workload (accounts, rates, the spike,
clients' retries and patience) and the events an SRE asks "what if" about.

The models' ``autoscaling`` and ``scheduler`` keys are exactly the Serve config's
``autoscaling_config`` and the scheduler's ``user_config``: they are validated by
Ray's ``AutoscalingConfig`` and mediagate's scheduler settings, so a scenario's numbers
can be copied into a Serve config and back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCENARIOS_DIR = Path(__file__).parent / "scenarios"
DAY_S = 86_400.0
HOUR_S = 3_600.0

RequestKind = Literal["image", "edit", "video"]
KINDS: tuple[RequestKind, ...] = ("image", "edit", "video")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeType(_Frozen):
    """A kind of GPU node the cluster launches (one entry of cluster.yaml's node types)."""

    gpus: int = Field(ge=1, description="GPUs per node.")
    boot_s: float = Field(ge=0, description="Launch to joining the cluster (cloud boot).")
    cost_per_hour: float = Field(ge=0, description="What a node costs while it exists.")
    min_nodes: int = Field(0, ge=0, description="Nodes kept however idle.")
    max_nodes: int = Field(ge=0, description="The fleet cap for this type.")
    idle_timeout_s: float = Field(300, ge=0, description="An empty node is released after this.")


class ServiceTime(_Frozen):
    """Seconds one call takes on one replica: ``base_s + per_image_s x images`` (a video
    job is one item). Fill from a GPU's measurements (scripts/bench_overhead.py)."""

    base_s: float = Field(ge=0)
    per_image_s: float = Field(ge=0)

    def of(self, images: int) -> float:
        return self.base_s + self.per_image_s * images


class ModelProfile(_Frozen):
    """One model as the fleet serves it."""

    kind: Literal["image", "video"]
    node_type: str
    gpus_per_replica: int = Field(1, ge=1)
    load_s: float = Field(ge=0, description="A placed replica's start: weights to GPU, warm-up.")
    service: ServiceTime
    max_batch_size: int = Field(1, ge=1, description="The catalog's batching.max_batch_size.")
    batch_wait_s: float = Field(0.0, ge=0, description="The catalog's batching.batch_wait_s.")
    preempt_stop_s: float = Field(
        0.2, ge=0, description="A preempted batch's worker stops at its next step: this long."
    )
    autoscaling: dict[str, Any] = Field(description="The worker's Serve autoscaling_config.")
    scheduler: dict[str, Any] = Field(
        default_factory=dict, description="The scheduler's user_config."
    )


class Spike(_Frozen):
    """Demand rising to ``multiplier`` x the baseline within ``ramp_h`` hours from
    ``start_h``, then decaying back with a time constant of ``decay_h`` hours."""

    start_h: float = Field(ge=0)
    ramp_h: float = Field(gt=0)
    multiplier: float = Field(ge=1)
    decay_h: float = Field(gt=0)
    new_accounts: int = Field(
        0, ge=0, description="Accounts created during the spike (they join as it rises)."
    )
    new_tier_shares: dict[str, float] = Field(
        default_factory=dict, description="Tier shares of the new accounts."
    )


class Clients(_Frozen):
    """How clients of a tier behave when refused or kept waiting."""

    retry_probability: float = Field(
        0.7, ge=0, le=1, description="A refused request is sent again."
    )
    max_retries: int = Field(3, ge=0)
    honours_retry_after: float = Field(
        0.8, ge=0, le=1, description="Share of clients that wait Retry-After; others back off."
    )
    backoff_s: float = Field(2.0, ge=0, description="The wait of a client that ignores it.")
    max_retry_wait_s: float = Field(
        900, ge=0, description="A Retry-After longer than this is not waited for: given up."
    )
    min_patience_s: float = Field(
        30, ge=0, description="Every client waits this long (its timeout's floor)."
    )
    patience_s: float = Field(
        120, gt=0, description="Mean wait beyond that (exponential) before a client leaves."
    )


class Workload(_Frozen):
    """The trace's generator: reproducible from ``seed``."""

    accounts: int = Field(ge=1, description="Accounts existing at the start.")
    tier_shares: dict[str, float] = Field(description="Share of the accounts by tier.")
    activity_by_tier: dict[str, float] = Field(
        description="Relative requests per account by tier (paid users send more)."
    )
    account_activity_sigma: float = Field(
        1.0, ge=0, description="Log-normal spread of activity between accounts of a tier."
    )
    old_account_age_days: float = Field(
        30, ge=0, description="Age of the accounts existing at the start."
    )
    base_rate_per_s: float = Field(gt=0, description="Mean arrivals per second before the spike.")
    diurnal_amplitude: float = Field(0.5, ge=0, lt=1, description="Peak-to-mean of the day cycle.")
    diurnal_peak_h: float = Field(17, ge=0, lt=24)
    spike: Spike | None = None
    kind_shares: dict[str, dict[RequestKind, float]] = Field(
        description="Per tier, the share of images, edits and videos."
    )
    images_per_request: dict[str, dict[int, float]] = Field(
        default_factory=dict, description="Per tier, n -> share (default: one image)."
    )
    clients: dict[str, Clients] = Field(default_factory=dict, description="Per tier.")

    def client(self, tier: str) -> Clients:
        return self.clients.get(tier) or Clients()


class RegionFailure(_Frozen):
    """A share of every node type's nodes lost at once, and that share of the cap with
    them, until ``duration_h`` has passed."""

    at_h: float = Field(ge=0)
    duration_h: float = Field(gt=0)
    fleet_share: float = Field(0.5, gt=0, le=1)


class Scenario(_Frozen):
    """Everything one simulated run needs."""

    name: str = "surge"
    seed: int = 7
    days: float = Field(7, gt=0)
    tiers_file: str | None = Field(None, description="A tier file; default: the shipped one.")
    control_interval_s: float = Field(
        1.0, gt=0, description="How often Serve's controller runs the autoscaling policy."
    )
    ray_autoscaler_interval_s: float = Field(5.0, gt=0)
    upscaling_speed: float = Field(1.0, gt=0, description="cluster.yaml's upscaling_speed.")
    sample_interval_s: float = Field(60.0, gt=0, description="Fleet samples for the report.")
    node_types: dict[str, NodeType]
    models: dict[str, ModelProfile]
    model_for_kind: dict[RequestKind, str]
    workload: Workload
    region_failure: RegionFailure | None = None

    @model_validator(mode="after")
    def _references_exist(self) -> Scenario:
        for name, model in self.models.items():
            if model.node_type not in self.node_types:
                raise ValueError(f"model {name}: unknown node type {model.node_type!r}")
        for kind, model_name in self.model_for_kind.items():
            if model_name not in self.models:
                raise ValueError(f"model_for_kind.{kind}: unknown model {model_name!r}")
        return self

    @property
    def duration_s(self) -> float:
        return self.days * DAY_S

    def with_changes(self, changes: dict[str, Any]) -> Scenario:
        """This scenario with ``changes`` (nested keys, e.g. ``{"models": {"flux":
        {"scheduler": {...}}}}``) merged in, validated again."""
        return Scenario.model_validate(_merged(self.model_dump(), changes))


def _merged(base: Any, changes: Any) -> Any:
    if isinstance(base, dict) and isinstance(changes, dict):
        return {**base, **{k: _merged(base.get(k), v) for k, v in changes.items()}}
    return changes


def load_scenario(path: str | Path | None = None) -> Scenario:
    """A scenario file (YAML); the shipped ``surge.yaml`` by default."""
    source = Path(path) if path is not None else SCENARIOS_DIR / "surge.yaml"
    data = yaml.safe_load(source.read_text())
    if data.get("tiers_file"):  # relative to the scenario file
        data["tiers_file"] = str((source.parent / data["tiers_file"]).resolve())
    return Scenario.model_validate(data)
