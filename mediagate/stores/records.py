"""What the state store keeps about a video job: plain data, serialised as JSON."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "in_progress", "completed", "failed"]
ACTIVE_STATUSES: tuple[JobStatus, ...] = ("queued", "in_progress")
FINAL_STATUSES: tuple[JobStatus, ...] = ("completed", "failed")
VideoVariant = Literal["video", "thumbnail", "spritesheet"]


class JobCheckpoint(BaseModel):
    """Where a step-level video job's latest checkpoint is (issue 17): the next dispatch
    resumes from it when the worker running the job is lost."""

    model_config = ConfigDict(extra="forbid")

    artifact: str = Field(description="Artifact id of the checkpoint (``ckp_...``).")
    step: int = Field(ge=0, description="Denoising steps it holds done.")
    progress: int = Field(0, ge=0, le=100, description="The job's progress at that step.")


class VideoJobRecord(BaseModel):
    """One video job. ``attempt`` counts dispatches and fences stale workers' writes."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Public id, `video_...`.")
    account_id: str = Field(description="Owner; every other account gets 404.")
    model: str = Field(description="Catalog model id.")
    status: JobStatus = Field(description="Life-cycle state, exactly OpenAI's four values.")
    progress: int = Field(0, ge=0, le=100, description="Percent of denoising steps done.")
    prompt: str = Field(description="The prompt.")
    seconds: int = Field(description="Clip length asked for.")
    size: str = Field(description="WIDTHxHEIGHT.")
    created_at: float = Field(description="Unix time the job was accepted.")
    started_at: float | None = Field(None, description="Unix time of the latest dispatch.")
    completed_at: float | None = Field(None, description="Unix time it completed or failed.")
    expires_at: float | None = Field(None, description="Unix time its content is deleted.")
    attempt: int = Field(0, ge=0, description="Dispatches so far; the worker echoes it.")
    lease_expires_at: float | None = Field(
        None, description="While in_progress: the worker renews this; past it, the job is lost."
    )
    worker_started_at: float | None = Field(
        None, description="When a worker took up the current dispatch (None: not yet)."
    )
    runs_lost: int = Field(0, ge=0, description="Runs whose worker vanished mid-job.")
    model_version: str | None = Field(
        None, description="The model version of its latest dispatch (what made it)."
    )
    priority_class: int = Field(
        0, description="The owner's tier's priority class when accepted: higher runs first."
    )
    queue_deadline_at: float | None = Field(
        None,
        description="Unix time past which a job never yet dispatched fails (`queue_timeout`) "
        "instead of running: accepted + its tier's max_queue_wait_s. None: it never expires.",
    )
    error_code: str | None = Field(None, description="Why it failed (machine-readable).")
    error_message: str | None = Field(None, description="Why it failed (for humans).")
    remixed_from: str | None = Field(None, description="Source job of a remix.")
    reservation_id: str | None = Field(
        None, description="The quota reservation (a video slot) this job holds until it ends."
    )
    generation: dict[str, Any] = Field(
        default_factory=dict, description="Resolved pipeline arguments (a VideoTask's inputs)."
    )
    artifacts: dict[str, str] = Field(
        default_factory=dict, description="Variant -> artifact id, once completed."
    )
    checkpoint: JobCheckpoint | None = Field(
        None, description="Step-level models: the latest checkpoint of the running job."
    )

    @property
    def ref(self) -> str:
        """``account/job``: what cross-account indexes hold."""
        return f"{self.account_id}/{self.id}"


def split_ref(ref: str) -> tuple[str, str]:
    account_id, _, job_id = ref.partition("/")
    return account_id, job_id


class EndpointDelivery(BaseModel):
    """An outbox event's delivery to one webhook endpoint."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(0, ge=0, description="Attempts made so far.")
    next_attempt_at: float = Field(description="Unix time of the next attempt.")
    delivered_at: float | None = Field(None, description="When a 2xx answered.")
    given_up: str | None = Field(
        None, description="Why no more attempts are made (endpoint gone, disabled, 410)."
    )
    last_error: str | None = Field(None, description="What the last failed attempt got.")

    @property
    def pending(self) -> bool:
        return self.delivered_at is None and self.given_up is None


class OutboxEvent(BaseModel):
    """An event written in the same transition that finished its job, kept until every
    endpoint that wanted it has it (or was given up on). The sender holding it is named
    in ``claim`` until ``due_at``; after that any sender may take it up again."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="`evt_...`: the `webhook-id` of every attempt.")
    account_id: str = Field(description="Whose endpoints get it.")
    type: str = Field(description="Event type, e.g. `video.completed`.")
    payload: str = Field(description="The exact JSON body signed and sent.")
    created_at: float = Field(description="Unix time of the transition.")
    due_at: float = Field(description="When a sender should next look at it.")
    claim: str | None = Field(None, description="The sender working on it, until due_at.")
    deliveries: dict[str, EndpointDelivery] | None = Field(
        None, description="Per endpoint id; None until a sender first takes it up."
    )

    @property
    def ref(self) -> str:
        return f"{self.account_id}/{self.id}"
