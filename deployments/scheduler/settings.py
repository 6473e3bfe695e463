"""A scheduler's live settings (its Serve ``user_config``), typed, one model per kind.

Both kinds share the queue's settings (slots per replica, minimum shares, the
autoscaler's weights); image schedulers add batching and preemption, video schedulers
leases and attempts. A key left out of ``user_config`` reads as its default (for video,
the application's ``args.video``), so taking a key out of a config undoes it; an
unknown key is refused with its name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from autoscaling.policy import queue_weights_from_config
from deployments.scheduler.preemption import PreemptionPolicy
from mediagate.protocol.catalog import Batching


class QueueSettings(BaseModel):
    """What every scheduler's queue takes, image or video."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slots_per_replica: int = Field(1, ge=1, description="Work one worker replica runs at once.")
    min_shares: dict[int, float] = Field(
        default_factory=dict,
        description="Per priority class, the least share of dispatches it gets while it has "
        "work, e.g. {0: 0.1}: free work gets at least 10% even under a paid flood.",
    )
    queue_weights: dict[int, float] | None = Field(
        None,
        description="Per priority class, how much a waiting request counts for the autoscaler "
        "(default: class 0, free, counts half).",
    )
    seat_shares: dict[int, float] = Field(
        default_factory=dict,
        description="Per class, the share of the slots it may fill (step-level models: "
        "lower classes leave seats free for the top one); a class left out may fill all.",
    )
    retired: Literal["moved", "drain", "removed"] | None = Field(
        None,
        description="Set by `mediagate models` on a version leaving service; it takes no "
        "new work. moved: a new version serves the model, queued work goes there; drain: "
        "the model is being removed, queued work is served first; removed: queued work "
        "fails (model_removed, not charged). Its worker then scales to zero.",
    )

    @field_validator("min_shares")
    @classmethod
    def _shares_are_fractions(cls, shares: dict[int, float]) -> dict[int, float]:
        if any(not 0.0 <= share <= 1.0 for share in shares.values()):
            raise ValueError("min_shares must be between 0 and 1")
        return shares

    @field_validator("queue_weights")
    @classmethod
    def _weights_in_range(cls, weights: dict[int, float] | None) -> dict[int, float] | None:
        return None if weights is None else queue_weights_from_config(weights)

    def weights(self) -> dict[int, float]:
        """The autoscaler's weight per class, defaults filled in; every class counts
        fully once retired (its workers stay while any work waits, however weighed)."""
        if self.retired is not None:
            return {}
        return queue_weights_from_config(self.queue_weights)

    def held_back(self, *, busy: int, slots: int) -> frozenset[int]:
        """The classes that must leave the free slots to higher classes now: those whose
        ``seat_shares`` of the slots are filled."""
        return frozenset(cls for cls, share in self.seat_shares.items() if busy >= share * slots)

    @field_validator("seat_shares")
    @classmethod
    def _shares_in_range(cls, shares: dict[int, float]) -> dict[int, float]:
        if any(not 0 < share <= 1 for share in shares.values()):
            raise ValueError("seat_shares must be above 0 and at most 1")
        return shares


class BatchingOverride(BaseModel):
    """Batching keys that replace the catalog's for this model, live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=1, description="Most images in one call.")
    batch_wait_s: float | None = Field(
        None, ge=0, le=5, description="How long to hold a partial batch hoping for more."
    )

    def over(self, catalog: Batching) -> Batching:
        return Batching.model_validate(catalog.model_dump() | self.model_dump(exclude_none=True))


class ImageSchedulerSettings(QueueSettings):
    """An image scheduler's live settings."""

    batching: BatchingOverride = Field(
        default_factory=BatchingOverride,
        description="Batching keys that replace the catalog entry's (max_batch_size, "
        "batch_wait_s).",
    )
    preemption: PreemptionPolicy = Field(
        default_factory=PreemptionPolicy,
        description='When a running lower-class batch is taken back, e.g. {"enabled": false}.',
    )
    redispatch_delay_s: float = Field(
        1.0, ge=0, description="Pause before running again a batch whose worker died."
    )


class VideoSchedulerSettings(QueueSettings):
    """A video scheduler's settings: declared in the application's ``args.video``; its
    ``user_config`` may override single keys live."""

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
    standby: bool = Field(
        False,
        description="Set by `mediagate models swap` on a new version while it starts beside "
        "the live one, lifted when traffic moves to it: until then it takes no job from the "
        "store (a start that fails must not have cost queued jobs an attempt).",
    )
