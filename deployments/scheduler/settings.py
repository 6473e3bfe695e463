"""A scheduler's live settings (its Serve ``user_config``), typed."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class VideoSchedulerSettings(BaseModel):
    """Live settings (the Serve config's ``user_config``)."""

    model_config = ConfigDict(extra="forbid")

    slots_per_replica: int = Field(1, ge=1, description="Jobs one worker replica runs at once.")
    lease_s: float = Field(
        30.0, gt=0, description="A running job whose worker is silent this long is lost."
    )
    max_attempts: int = Field(
        2, ge=1, description="Runs a job may lose (its worker died mid-job) before it fails."
    )
    max_dispatches: int = Field(
        10, ge=1, description="Dispatches in all, reached or not, before a job fails."
    )
    redispatch_delay_s: float = Field(
        1.0, ge=0, description="Pause before retrying a dispatch that reached no worker."
    )
    reconcile_s: float = Field(2.0, gt=0, description="How often memory and store are compared.")
    content_ttl_s: float = Field(86_400, gt=0, description="How long finished files stay.")
    queue_weights: dict[int, float] | None = Field(
        None,
        description="Per priority class, how much a waiting job counts for the autoscaler "
        "(default: class 0, free, counts half).",
    )
