"""mediagate's operator endpoints (``/v1/ops/*``, operator keys only): the status with
autoscaling limits and replicas, and live limit changes, checked as `mediagate scale
set` checks them (``autoscaling.limits``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_REPLICAS_LIMIT = 1000  # a worker's max replicas, from the console or the CLI


class LimitsChange(BaseModel):
    """``POST /v1/ops/limits``: what to change for one model (unset fields keep their
    deployed value)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    min_replicas: int | None = Field(None, ge=0, le=MAX_REPLICAS_LIMIT)
    max_replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS_LIMIT)
    target_ongoing_requests: float | None = Field(None, gt=0, le=1000)
    free_weight: float | None = Field(None, ge=0, le=10)
    allow_zero: bool = Field(False, description="Let an image model go to zero replicas.")


class LimitsChanged(BaseModel):
    object: Literal["ops.limits_change"] = "ops.limits_change"
    model: str
    changes: list[str] = Field(description="One line per value changed; empty: none did.")


class ScalingRow(BaseModel):
    """One model's workers: replicas running and targeted, and the limits."""

    model: str
    deployment: str
    replicas: int
    target_replicas: int | None
    min: int | None
    max: int | None
    target_per_replica: float | None


class OpsStatus(BaseModel):
    """``GET /v1/ops/status``: ``GET /v1/status``'s queues, plus autoscaling per model
    and the recent operator changes."""

    object: Literal["ops.status"] = "ops.status"
    at: float
    models: dict[str, Any]
    scaling: list[ScalingRow]
    scaling_error: str | None = Field(None, description="Why no scaling rows, if none.")
    limit_changes_allowed: bool
    recent_changes: list[dict[str, Any]]
