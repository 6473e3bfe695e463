"""Webhooks (a mediagate extension; OpenAI registers endpoints in its dashboard): an
account registers endpoints with ``POST /v1/webhooks`` and gets ``video.completed`` and
``video.failed`` events, in OpenAI's payload shape, signed as Standard Webhooks
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature``), which the official
client checks with ``client.webhooks.unwrap()``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EventType = Literal["video.completed", "video.failed"]
EVENT_TYPES: tuple[EventType, ...] = ("video.completed", "video.failed")
MAX_URL_CHARS = 2048


class WebhookEndpointCreate(BaseModel):
    """``POST /v1/webhooks``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=MAX_URL_CHARS,
        description="http(s) URL the events are POSTed to; public addresses only unless the "
        "operator allows private ones.",
    )
    events: list[EventType] = Field(
        default_factory=lambda: list(EVENT_TYPES),
        min_length=1,
        description="Event types to send (default: all).",
    )

    @field_validator("events")
    @classmethod
    def _distinct(cls, events: list[EventType]) -> list[EventType]:
        return sorted(set(events))


EndpointStatus = Literal["enabled", "disabled"]


class WebhookEndpointView(BaseModel):
    """One endpoint as its owner sees it; ``secret`` only in the answer that created it."""

    id: str = Field(description="`wh_...`")
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[EventType]
    created_at: int
    status: EndpointStatus
    disabled_reason: str | None = Field(
        None, description="Why deliveries stopped (the endpoint answered 410, or kept failing)."
    )
    failing_since: int | None = Field(
        None, description="Unix time of the first failed delivery since its last success."
    )
    secret: str | None = Field(
        None, description="`whsec_...`: shown once, when the endpoint is created."
    )


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointView]


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class EventData(BaseModel):
    id: str = Field(description="The job the event is about (`video_...`).")


class WebhookEvent(BaseModel):
    """The body POSTed to an endpoint: OpenAI's event shape."""

    id: str = Field(description="`evt_...`; also the `webhook-id` header, the same on retries.")
    object: Literal["event"] = "event"
    created_at: int
    type: EventType
    data: EventData
